"""frameshm's exception hierarchy.

Every error raised by frameshm derives from :class:`FrameshmError`; where a builtin
category fits, the class also derives from it, so ``except TimeoutError`` or
``except ValueError`` keep working.
"""


class FrameshmError(Exception):
    """Base class of every frameshm error."""


class InvalidArgument(FrameshmError, ValueError):
    """A bad name, shape, dtype, size or option (nothing was created or changed)."""


class StreamNotFound(FrameshmError, FileNotFoundError):
    """No stream of that name/id exists in the base directory and namespace."""


class StreamBusy(FrameshmError):
    """The stream already has a live producer (one producer per stream)."""


class CorruptStream(FrameshmError):
    """Shared memory failed validation (bad magic, sizes, header fields, paths)."""


class FrameTooLarge(FrameshmError, ValueError):
    """The frame is larger than every payload pool of the stream; it was dropped."""


class ResourceLimit(FrameshmError, OSError):
    """A system limit was hit: /dev/shm full, message-queue limits, file limits."""


class Timeout(FrameshmError, TimeoutError):
    """No frame arrived in time. The message says whether the producer is alive."""


class ProducerDead(Timeout):
    """No frame arrived in time and the producer process is gone (crashed or killed)."""


class Overrun(FrameshmError):
    """The producer overwrote the frame while it was being copied, every time tried."""


class StreamClosed(FrameshmError, ValueError):
    """Operation on a closed Reader or Writer."""


class DriverUnavailable(FrameshmError, ConnectionError):
    """No frameshm driver answers on the control socket (driver model)."""


class DriverRejected(FrameshmError):
    """The driver refused the attach; the message carries its response code and reason
    (e.g. a second producer, REQUIRE_EXISTING on a missing stream, a profile that does not
    fit in shared memory, a peer the policy does not allow)."""


class LeaseLost(FrameshmError):
    """The driver ended this client's lease (detached, expired, revoked, driver shut down
    or gone). Writers re-attach by themselves and raise this only when that fails;
    readers raise it only when opened with ``lease_events=True``."""


__all__ = [
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
]
