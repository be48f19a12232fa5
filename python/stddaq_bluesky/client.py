"""Async client for `std-daq api` (our own routes; docs/api.md).

A write is a request to the writer agent: `POST /write_async` answers with its `request_id` at
once, `GET /status/{request_id}` gives its last status (`action`, `message`, `body` with
`images_written`), `POST /write_kill` stops it. Every failure raises `StdDaqError` with std-daq's
own words; nothing here retries a write (a write that was sent may have started).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

#: Statuses after which a request has ended.
FINAL = ("request_success", "request_fail")
#: Statuses that say the writer took the request (it writes the next images).
STARTED = ("request_start", "request_progress")


class StdDaqError(RuntimeError):
    """std-daq refused or failed a request; the message is std-daq's."""


@dataclass(frozen=True)
class Status:
    """The last status of a request, as `GET /status/{request_id}` gives it."""

    request_id: str
    action: str
    message: str
    body: dict[str, Any]

    @property
    def images_written(self) -> int:
        return int(self.body.get("images_written") or 0)

    @property
    def final(self) -> bool:
        return self.action in FINAL


@dataclass(frozen=True)
class ImageFormat:
    """The detector's image as the writer stores it."""

    detector_name: str
    width: int
    height: int
    #: numpy dtype name, e.g. "uint16", "float32".
    dtype: str

    #: The image dataset of a written file: NXmx's NXdata (docs/nxmx.md); std_daq's
    #: `/<detector_name>/data` is the same dataset.
    dataset: str = "/entry/data/data"


class StdDaqClient:
    """One `std-daq api` (e.g. `http://127.0.0.1:8080`)."""

    def __init__(self, api_url: str, timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self._http: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        # Made lazily, inside the running event loop (the RunEngine's), not at import.
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.api_url, timeout=self.timeout)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        try:
            r = await self._client().request(method, path, **kw)
        except httpx.HTTPError as e:
            raise StdDaqError(f"std-daq api at {self.api_url}: {method} {path}: {e}") from e
        try:
            return r.status_code, r.json()
        except ValueError as e:
            raise StdDaqError(
                f"std-daq api at {self.api_url}: {method} {path} answered {r.status_code} "
                f"with no JSON: {r.text[:200]!r}"
            ) from e

    async def image_format(self) -> ImageFormat:
        """The detector's name and image (from `GET /daq/overview`)."""
        code, o = await self._json("GET", "/daq/overview")
        if code != 200:
            raise StdDaqError(f"GET /daq/overview: {o.get('error', code)}")
        d = o["detector"]
        return ImageFormat(d["name"], int(d["image_width"]), int(d["image_height"]), d["dtype"])

    async def write_async(
        self, output_file: str, n_images: int | None = None, **fields: Any
    ) -> str:
        """Starts a write (no `n_images`: until stopped); returns its request id."""
        request: dict[str, Any] = {"output_file": output_file, **fields}
        if n_images is not None:
            request["n_images"] = n_images
        code, j = await self._json("POST", "/write_async", json=request)
        if code != 202:
            raise StdDaqError(f"write {output_file}: {j.get('error', code)}")
        return j["request_id"]

    async def status(self, request_id: str) -> Status | None:
        """The request's last status; None while no status came back yet."""
        code, j = await self._json("GET", f"/status/{request_id}")
        if code == 404:
            raise StdDaqError(j.get("error", f"unknown request {request_id}"))
        if "error" in j:
            # The API lost track of the request (broker gone, no agent): say why.
            raise StdDaqError(f"request {request_id}: {j['error']}")
        if j.get("action") in (None, "sent"):
            return None
        return Status(request_id, j["action"], j.get("message", ""), j.get("body") or {})

    async def kill(self, request_id: str) -> None:
        code, j = await self._json("POST", "/write_kill", json={"request_id": request_id})
        if code != 200:
            raise StdDaqError(f"kill {request_id}: {j.get('error', code)}")

    async def wait_for(
        self, request_id: str, actions: tuple[str, ...], timeout: float, poll: float = 0.05
    ) -> Status:
        """Polls until the request's status is one of `actions` or final; raises on a
        `request_fail` not asked for, and after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            s = await self.status(request_id)
            if s is not None and (s.action in actions or s.final):
                if s.action == "request_fail" and "request_fail" not in actions:
                    raise StdDaqError(s.message)
                return s
            if time.monotonic() > deadline:
                last = s.action if s else "no status yet"
                raise StdDaqError(
                    f"request {request_id}: no {'/'.join(actions)} within {timeout} s "
                    f"(last: {last})"
                )
            await asyncio.sleep(poll)
