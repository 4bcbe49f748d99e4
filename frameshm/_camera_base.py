"""What the camera wrappers (:class:`frameshm.Camera`, :class:`frameshm.GigECamera`) share:
the low-level ``_core`` camera they wrap, opened at construction and started unless
``start=False``; the negotiated format dict; waiting, flushing, rate changes and
``capture_to`` through it; ``closed``, ``close()``, ``__exit__`` and the repr.
Each public class keeps its own constructor, docstrings, annotations and device-specific
parts (the public methods whose docstrings differ call the private helpers here).
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import InvalidArgument
from .stream import _CODE_DTYPES


class _CameraBase:
    """Base of the camera wrappers; not public."""

    #: the public class name, for the repr
    _NAME: str
    #: start() keyword arguments, set by the subclass' constructor
    _req: dict

    # -- life cycle ------------------------------------------------------------------------

    def __init__(self, core_camera: Any, start: bool) -> None:
        """Takes the just-opened ``_core`` camera; starts it (``start()``) when ``start``,
        closing it again if that fails."""
        self._cam = core_camera
        self._fmt: Optional[dict] = None
        if start:
            try:
                self.start()
            except BaseException:
                self._cam.close()
                raise

    def start(self) -> None:  # each camera's own, with its docstring
        raise NotImplementedError

    def _start(self) -> dict:
        """Starts the core camera with the constructor's settings; returns its format."""
        self._cam.start(**self._req)
        self._fmt = f = self._cam.format()
        self._dtype = _CODE_DTYPES[f["dtype"]]
        self._shape = tuple(f["shape"])
        return f

    def close(self) -> None:
        self._cam.close()

    # __enter__ is each camera's own (annotated with its class)

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frames ----------------------------------------------------------------------------

    def _loan(self, writer, nbytes: int):
        """The slot of ``writer`` the next frame (``nbytes`` long) is written into."""
        return writer.loan()

    def _capture_to(self, writer, timeout: Optional[float]) -> int:
        nbytes = self._cam.wait(timeout)
        view = self._loan(writer, nbytes)
        ts = self._cam.read_into(view, 0)[0]
        return writer.commit(timestamp_ns=ts)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the next frame without taking it; returns its size in bytes."""
        return self._cam.wait(timeout)

    def _flush(self, max_age: float) -> int:
        if max_age < 0:
            raise InvalidArgument(f"max_age must be >= 0 seconds, not {max_age!r}")
        return self._cam.flush(int(max_age * 1e9))

    def _set_rate(self, *rate) -> bool:
        paced = self._cam.set_rate(*rate)
        self._fmt = self._cam.format()
        return paced

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._cam.closed

    def _repr_id(self) -> str:
        """How the repr names the camera."""
        raise NotImplementedError

    def _repr_format(self) -> str:
        """The repr's description of the format in force."""
        raise NotImplementedError

    def __repr__(self) -> str:
        head = f"<frameshm.{self._NAME} {self._repr_id()}"
        if self.closed:
            return f"{head} closed>"
        if not self._fmt:
            return f"{head} not started>"
        return f"{head} {self._repr_format()}>"
