"""A blueapi device factory for std-daq (docs/bluesky.md has a blueapi config using it).

blueapi calls device factories with the fixtures they name; `path_provider` is the one blueapi
gives every detector (numtracker's `StartDocumentPathProvider` when configured). The API address
comes from `STDDAQ_API_URL` (default `http://127.0.0.1:8080`), the device name from
`STDDAQ_DEVICE_NAME` (default `stddaq`).

A beamline module would hold, with dodal's `DeviceManager` (blueapi's `deviceManager` source):

    from dodal.device_manager import DeviceManager
    from stddaq_bluesky.blueapi import stddaq as _stddaq
    devices = DeviceManager()

    @devices.factory()
    def stddaq(path_provider: PathProvider) -> StdDaqDetector:
        return _stddaq(path_provider)
"""

from __future__ import annotations

import os

from ophyd_async.core import PathProvider

from .detector import StdDaqDetector


def stddaq(path_provider: PathProvider) -> StdDaqDetector:
    """The std-daq detector of this beamline, free-running acquire logic."""
    return StdDaqDetector(
        os.environ.get("STDDAQ_API_URL", "http://127.0.0.1:8080"),
        path_provider,
        name=os.environ.get("STDDAQ_DEVICE_NAME", "stddaq"),
    )
