"""std-daq for bluesky: an async client for `std-daq api` and an ophyd-async detector.

    from stddaq_bluesky import StdDaqDetector
    det = StdDaqDetector("http://127.0.0.1:8080", path_provider, name="det")
"""

from .client import ImageFormat, Status, StdDaqClient, StdDaqError
from .detector import (
    FreeRunningAcquireLogic,
    StdDaqDataLogic,
    StdDaqDetector,
    StdDaqTriggerLogic,
)
from .simulator import SimulatorAcquireLogic

__all__ = [
    "FreeRunningAcquireLogic",
    "ImageFormat",
    "SimulatorAcquireLogic",
    "Status",
    "StdDaqClient",
    "StdDaqDataLogic",
    "StdDaqDetector",
    "StdDaqError",
    "StdDaqTriggerLogic",
]
__version__ = "0.1.0"
