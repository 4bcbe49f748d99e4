"""frameshm's exception hierarchy.

The classes are created by the C extension (``frameshm._core``), so that C code raises
them without importing Python modules; this module re-exports the transport's. Every
error raised by frameshm derives from :class:`FrameshmError`; where a builtin category
fits, the class also derives from it, so ``except TimeoutError`` or ``except ValueError``
keep working.
"""

from ._core import (  # noqa: F401  (re-exports)
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

__all__ = [
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
]
