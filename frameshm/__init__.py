"""frameshm: live camera frames and tensors between processes through shared memory.

    w = frameshm.Writer("cam0", shape=(480, 640, 3), dtype="uint8")
    r = frameshm.Reader("cam0", consumer="inference")
    w.publish(frame)
    f = r.wait_latest(timeout=1.0); f.array  # zero-copy numpy view
"""

from . import _core
from .errors import (
    CorruptStream,
    DriverRejected,
    DriverUnavailable,
    FrameshmError,
    FrameTooLarge,
    InvalidArgument,
    InvalidState,
    LeaseLost,
    Overrun,
    PermissionDenied,
    ProducerDead,
    ResourceLimit,
    StreamBusy,
    StreamClosed,
    StreamNotFound,
    Timeout,
)
from .stream import Frame, Reader, Writer
from .admin import gc, list_streams, stream_info
from .camera import Camera
from .gige import GigECamera
from .virtualcam import VirtualCamera
from .processor import Processor
from .bridge import Bridge, BridgeError
from .clib import cmake_dir, get_include, get_library_dir, pkgconfig_dir

# The version frameshm was built as: libframeshm's header version (one place for both).
__version__ = _core.HEADER_VERSION_STRING

__all__ = [
    "Writer",
    "Reader",
    "Frame",
    "Camera",
    "GigECamera",
    "VirtualCamera",
    "Processor",
    "Bridge",
    "BridgeError",
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
    "PermissionDenied",
    "Timeout",
    "ProducerDead",
    "Overrun",
    "StreamClosed",
    "InvalidState",
    "DriverUnavailable",
    "DriverRejected",
    "LeaseLost",
    "get_include",
    "get_library_dir",
    "pkgconfig_dir",
    "cmake_dir",
    "show",
    "__version__",
]


def __getattr__(name: str):
    # MODE_STANDBY / MODE_ALARMED: the pipeline's meaning of control byte 0
    # (frameshm.roles.mode), kept here for compatibility and loaded only when asked for, so
    # that `import frameshm` does not load the pipeline: the transport itself gives the
    # control bytes no meaning.
    if name in ("MODE_STANDBY", "MODE_ALARMED"):
        from .roles import mode

        return getattr(mode, name)
    if name == "show":  # the Jupyter view: imports anywidget only when used
        from .notebook import show

        return show
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

