"""What the camera sources (``v4l2:``, ``gige:``) share: a :class:`~frameshm.sources.Source`
wrapping one camera object (:class:`frameshm.Camera`, :class:`frameshm.GigECamera`) that
the capture producer closes and opens again when the device is lost.

:class:`CameraSource` owns the life cycle: ``open()`` creates the camera (the subclass'
:meth:`~CameraSource._new_camera`), runs the device-specific set-up, applies the rate asked
last, and closes the camera again if any of that fails - mapping the errors that mean "the
device went away" to :class:`~frameshm.sources.SourceGone`. ``read_into``/``flush`` (and
:meth:`~CameraSource._set_camera_rate`, for the subclass' ``set_rate``) map the camera's
:class:`~frameshm.camera.DeviceGone` to ``SourceGone`` through :meth:`~CameraSource._gone`.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Tuple

import numpy as np

from ..camera import DeviceGone
from ..errors import InvalidState
from . import Source, SourceGone


class CameraSource(Source):
    """A source reading from one camera object, re-created on every open."""

    #: URI scheme, for messages
    _SCHEME: str
    #: errors raised while opening and setting up the camera that mean it is gone (retried)
    _GONE_AT_OPEN: Tuple[type, ...] = (DeviceGone,)

    def __init__(self) -> None:
        self._rate: Optional[float] = None   # asked with set_rate(); re-applied on reopen
        self.cam: Any = None

    # -- what a camera source defines ------------------------------------------------------

    @abc.abstractmethod
    def _new_camera(self) -> Any:
        """Creates the camera (closed again by open() if the set-up then fails)."""

    def _setup(self, cam: Any) -> None:
        """Device-specific set-up of a new camera, before the rate asked last is applied."""

    def _ready(self, cam: Any) -> None:
        """After the set-up and the rate, before the camera is taken into use."""

    def _closing(self, cam: Any) -> None:
        """Just before the camera is closed (its counters are still readable)."""

    def _gone(self, exc: Exception) -> SourceGone:
        """The SourceGone to raise for the camera's DeviceGone ``exc``."""
        return SourceGone(str(exc))

    # -- the shared life cycle -------------------------------------------------------------

    def open(self) -> None:
        if self.cam is not None:
            return
        cam = self._new_camera()
        try:
            self._setup(cam)
            if self._rate is not None:
                cam.set_rate(self._rate)
            self._ready(cam)
        except self._GONE_AT_OPEN as exc:
            cam.close()
            raise SourceGone(str(exc)) from exc
        except BaseException:
            cam.close()
            raise
        self.cam = cam
        self.shape = cam.shape
        self.dtype = cam.dtype

    def _camera(self) -> Any:
        if self.cam is None:
            raise InvalidState(f"{self._SCHEME} source is not open")
        return self.cam

    def read_into(self, out: np.ndarray, timeout: float) -> int:
        try:
            return self._camera().read_into(out, timeout)
        except DeviceGone as exc:
            raise self._gone(exc) from exc

    def _set_camera_rate(self, fps: float) -> Optional[bool]:
        """Remembers ``fps`` (applied again on every open) and asks the open camera for it:
        the camera's answer (True: it paces itself), None when not open."""
        self._rate = fps
        if self.cam is None:
            return None
        try:
            return self.cam.set_rate(fps)
        except DeviceGone as exc:
            raise self._gone(exc) from exc

    def flush(self, max_age_ns: int) -> int:
        try:
            return self._camera().flush(max_age_ns / 1e9)
        except DeviceGone as exc:
            raise self._gone(exc) from exc

    def close(self) -> None:
        cam, self.cam = self.cam, None
        if cam is not None:
            self._closing(cam)
            cam.close()
