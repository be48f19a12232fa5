"""`StdDaqDetector`: std-daq as an ophyd-async `StandardDetector` (the logics of ophyd-async 0.17+).

std-daq takes the **data** role, as Odin does in `ophyd_async.fastcs.odin`:

- `StdDaqDataLogic.prepare_unbounded` starts an unbounded write (no `n_images`) to the file the
  `PathProvider` names, waits until the writer took it (so the next images are written), and
  returns a `StreamResourceDataProvider` over the image dataset whose `collections_written`
  is the write's `images_written` (polled from `GET /status/{request_id}`; the agent pushes
  progress every 0.5 s). `stop` (at stage and unstage) stops the write and waits until the file
  is closed, raising if std-daq reports that the write failed.
- The **acquire** logic is the detector's. The default, `FreeRunningAcquireLogic`, is for a
  detector that is already sending frames: it starts nothing, and gives each trigger the next
  frame of the file (trigger k is done once k frames are written; its datum is row k-1). std-daq
  still writes every frame the detector sends while the write is open (it never drops frames),
  so the file holds more rows than the datums name, and a row may predate its trigger: for scans
  that move something between points, drive the detector (an acquire logic of its own control
  system). For tests and the demo, `stddaq_bluesky.simulator.SimulatorAcquireLogic` sends
  exactly the frames asked for with the project's simulator: then rows and events match one to
  one and the file holds exactly the frames of the run.
- `StdDaqTriggerLogic` supports internal triggering and remembers how many exposures were asked
  for (the acquire logic may use it).

Frame i of the run is row i of the dataset, so a stream datum's indices are rows of the file.
Never: write a file name std-daq did not confirm, or report frames the writer did not report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import numpy as np
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    StandardDetector,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    soft_signal_r_and_setter,
)

from .client import STARTED, StdDaqClient, StdDaqError

log = logging.getLogger(__name__)

#: Seconds to wait for the writer to take a write request, and for a stopped write to close.
DEFAULT_TIMEOUT = 30.0


class StdDaqTriggerLogic(DetectorTriggerLogic):
    """Internal triggering; keeps the number of exposures of the last prepare."""

    def __init__(self) -> None:
        self.exposures = 1
        self.livetime = 0.0

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        self.exposures = num
        self.livetime = livetime

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class FreeRunningAcquireLogic(DetectorAcquireLogic):
    """For a detector that sends frames on its own: nothing to start or stop; each acquisition
    asks the data logic for the next frames of the file (as many as the trigger logic's
    exposures), so an event never covers more than its own frames."""

    def __init__(self, trigger_logic: StdDaqTriggerLogic, data_logic: StdDaqDataLogic) -> None:
        self.trigger_logic = trigger_logic
        self.data_logic = data_logic

    async def start_acquiring(self) -> None:
        self.data_logic.request_collections(self.trigger_logic.exposures)

    async def wait_for_idle(self) -> None:
        return None

    async def ensure_stopped(self) -> None:
        return None


class StdDaqDataLogic(DetectorDataLogic):
    """Writes through std-daq: one unbounded write per prepared data provider."""

    def __init__(
        self,
        client: StdDaqClient,
        path_provider: PathProvider,
        poll_interval: float = 0.1,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.client = client
        self.path_provider = path_provider
        self.poll_interval = poll_interval
        self.timeout = timeout
        #: The write's images_written, as std-daq reports it.
        self.images_written, self._set_images_written = soft_signal_r_and_setter(int, 0)
        #: What bluesky sees: images_written, or at most the collections requested when gated.
        self.collections, self._set_collections = soft_signal_r_and_setter(int, 0)
        #: None: every written image is a collection; a number: at most that many are.
        self._requested: int | None = None
        self._gated = False
        self._last_images = 0
        self.request_id: str | None = None
        self.output_file: str | None = None
        self._poll: asyncio.Task | None = None
        #: The final status of the last write (after `stop`).
        self.last_final = None

    def gate(self) -> None:
        """Collections count only as they are requested (`request_collections`)."""
        self._gated = True

    def request_collections(self, n: int) -> None:
        if self._gated:
            self._requested = (self._requested or 0) + n
            self._publish(self._last_images)

    def _publish(self, images: int) -> None:
        self._last_images = images
        self._set_images_written(images)
        if self._gated:
            images = min(images, self._requested or 0)
        self._set_collections(images)

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        output_file = f"{info.directory_path}/{info.filename}.h5"
        image = await self.client.image_format()
        self._requested = 0 if self._gated else None
        self._publish(0)
        request_id = await self.client.write_async(output_file)
        self.request_id, self.output_file = request_id, output_file
        # The writer took it once request_start (or a progress status) is there.
        await self.client.wait_for(request_id, STARTED, self.timeout)
        log.info("std-daq writes %s (request %s)", output_file, request_id)
        self._poll = asyncio.create_task(self._follow(request_id))
        resource = StreamResourceInfo(
            data_key=datakey_name,
            shape=(image.height, image.width),
            chunk_shape=(1, image.height, image.width),
            dtype_numpy=np.dtype(image.dtype).str,
            parameters={"dataset": image.dataset},
        )
        return StreamResourceDataProvider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=[resource],
            mimetype="application/x-hdf5",
            collections_written_signal=self.collections,
        )

    async def _follow(self, request_id: str) -> None:
        while True:
            s = await self.client.status(request_id)
            if s is not None:
                self._publish(s.images_written)
                if s.final:
                    return
            await asyncio.sleep(self.poll_interval)

    async def stop(self) -> None:
        request_id, self.request_id = self.request_id, None
        if request_id is None:
            return
        s = await self.client.status(request_id)
        if s is None or not s.final:
            await self.client.kill(request_id)
            s = await self.client.wait_for(
                request_id, ("request_success", "request_fail"), self.timeout
            )
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError, StdDaqError):
                await self._poll
            self._poll = None
        self._publish(s.images_written)
        self.last_final = s
        log.info("std-daq: %s: %s", self.output_file, s.message)
        if s.action == "request_fail":
            raise StdDaqError(f"the write of {self.output_file} failed: {s.message}")

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class StdDaqDetector(StandardDetector):
    """std-daq behind `std-daq api` at `api_url`, writing where `path_provider` says.

    `acquire_logic` drives the detector; the default (`FreeRunningAcquireLogic`) expects it to be
    sending frames already.
    """

    def __init__(
        self,
        api_url: str,
        path_provider: PathProvider,
        name: str = "",
        acquire_logic: DetectorAcquireLogic | None = None,
        trigger_logic: StdDaqTriggerLogic | None = None,
    ) -> None:
        self.client = StdDaqClient(api_url)
        self.trigger_logic = trigger_logic or StdDaqTriggerLogic()
        self.data_logic = StdDaqDataLogic(self.client, path_provider)
        if acquire_logic is None:
            self.data_logic.gate()
            acquire_logic = FreeRunningAcquireLogic(self.trigger_logic, self.data_logic)
        self.add_detector_logics(self.trigger_logic, acquire_logic, self.data_logic)
        super().__init__(name=name)
