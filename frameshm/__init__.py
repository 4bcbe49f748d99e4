"""frameshm: live camera frames and tensors between processes through shared memory.

    w = frameshm.Writer("cam0", shape=(480, 640, 3), dtype="uint8")
    r = frameshm.Reader("cam0", consumer="inference")
    w.publish(frame)
    f = r.wait_latest(timeout=1.0); f.array  # zero-copy numpy view
"""

from .errors import (
    CorruptStream,
    DriverRejected,
    DriverUnavailable,
    FrameshmError,
    FrameTooLarge,
    InvalidArgument,
    LeaseLost,
    Overrun,
    ProducerDead,
    ResourceLimit,
    StreamBusy,
    StreamClosed,
    StreamNotFound,
    Timeout,
)
from . import _core
from .stream import MODE_ALARMED, MODE_STANDBY, Frame, Reader, Writer
from .admin import gc, list_streams, stream_info
from .camera import Camera
from .gige import GigECamera
from .virtualcam import VirtualCamera
from .processor import Processor

__version__ = "0.1.0"

__all__ = [
    "Writer",
    "Reader",
    "Frame",
    "Camera",
    "GigECamera",
    "VirtualCamera",
    "Processor",
    "MODE_STANDBY",
    "MODE_ALARMED",
    "stream_info",
    "list_streams",
    "gc",
    "FrameshmError",
    "InvalidArgument",
    "StreamNotFound",
    "StreamBusy",
    "CorruptStream",
    "FrameTooLarge",
    "ResourceLimit",
    "Timeout",
    "ProducerDead",
    "Overrun",
    "StreamClosed",
    "DriverUnavailable",
    "DriverRejected",
    "LeaseLost",
    "__version__",
]
