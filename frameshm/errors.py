"""frameshm's exception hierarchy.

The classes are created by the C extension (``frameshm._core``), so that C code raises
them without importing Python modules; this module re-exports the transport's. Every
error raised by frameshm derives from :class:`FrameshmError`; where a builtin category
fits, the class also derives from it, so ``except TimeoutError`` or ``except ValueError``
keep working.

The device modules re-export theirs (:mod:`frameshm.camera`, :mod:`frameshm.gige`,
:mod:`frameshm.virtualcam`); the pipeline's are Python subclasses of these, in the module
that raises them: ``ConfigError``/``DriverConfigError`` and ``DetectorError``
(InvalidArgument), ``SourceGone`` and ``DriverError`` (OSError), ``DecodeError``
(ValueError). Wrong argument types stay plain ``TypeError``, as in Python itself.
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
