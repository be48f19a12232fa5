"""`SimulatorAcquireLogic`: the project's detector simulator (`std-det-sim`) standing in for a
detector's own control, for tests and the demo.

Each `start_acquiring` sends exactly the exposures of the last prepare (`bp.count`: one frame per
trigger; a fly scan: all its frames at kickoff) at `rate` frames/s, with frame numbers running on
from one acquisition to the next (a detector's frame counter does not go back within a run:
std-daq would take frames that go back as a new acquisition). `wait_for_idle` waits for the
simulator to finish and raises if it failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ophyd_async.core import DetectorAcquireLogic

from .detector import StdDaqTriggerLogic


class SimulatorAcquireLogic(DetectorAcquireLogic):
    def __init__(
        self,
        simulator: str | Path,
        config: str | Path,
        trigger_logic: StdDaqTriggerLogic,
        rate: float = 100.0,
        first_frame: int = 1,
    ) -> None:
        self.simulator = str(simulator)
        self.config = str(config)
        self.trigger_logic = trigger_logic
        self.rate = rate
        #: The frame number the next acquisition starts with.
        self.next_frame = first_frame
        self._proc: asyncio.subprocess.Process | None = None

    async def start_acquiring(self) -> None:
        await self.wait_for_idle()
        n = self.trigger_logic.exposures
        self._proc = await asyncio.create_subprocess_exec(
            self.simulator, "--config", self.config, "--images", str(n),
            "--rate", str(self.rate), "--start-frame", str(self.next_frame),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.next_frame += n

    async def wait_for_idle(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{self.simulator} failed ({proc.returncode}): {err.decode(errors='replace')}"
            )

    async def ensure_stopped(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
        await self.wait_for_idle_quietly()

    async def wait_for_idle_quietly(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.wait()
