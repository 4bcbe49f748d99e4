"""GigE Vision cameras as a capture source (``gige:`` URIs), through Aravis.

    gige:192.168.1.20?pixel_format=Mono8&width=640&height=480&fps=30&packet_size=9000
    gige:Fake_1?width=640&height=480        Aravis' in-process fake camera (tests)

``read_into(out)`` copies each complete frame once from Aravis' buffer pool straight into
``out`` (the slot the capture producer loaned) and gives the buffer back at once.
``set_rate`` sets the camera's AcquisitionFrameRate (True: the camera paces itself);
``flush`` discards frames that waited in the pool longer than the given age. Lost frames
(frame-id gaps, incomplete buffers) are counted: :meth:`GigESource.stats`.

A camera that disappears or restarts mid-stream (no answer, or it no longer lists us as its
controller) raises :class:`~frameshm.sources.SourceGone` from ``read_into``/``set_rate``/
``flush``; the producer then calls ``close()`` and ``open()`` again until it works:
``open()`` raises OSError subclasses (:class:`~frameshm.camera.DeviceNotFound` while the
camera does not answer, :class:`~frameshm.camera.DeviceBusy` while another application
controls it) or SourceGone, which the producer retries, and ValueError subclasses (bad
format/region/rate) that it does not. Every setting, and the rate asked last, is applied
again on every open (GigE cameras keep settings between sessions).

Parameters: ``pixel_format`` (Mono8, Mono16, RGB8, Bayer*8...; default the camera's),
``width``/``height`` (exact; default the camera's current region), ``x``/``y`` (region
offset), ``fps`` (default: the camera's), ``packet_size`` (bytes; default negotiated),
``buffers`` (Aravis buffer pool, default 8).
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

from ..camera import DeviceGone
from ..errors import InvalidArgument
from ..gige import AravisError, GigECamera
from . import SourceGone, check_params, fps_param, int_param, register, size_params
from ._camera import CameraSource

log = logging.getLogger("frameshm.gige")

_KNOWN = ("pixel_format", "width", "height", "x", "y", "fps", "packet_size", "buffers")


class GigESource(CameraSource):
    """A GigE Vision camera (see the module docstring)."""

    _SCHEME = "gige"
    cam: Optional[GigECamera]
    _GONE_AT_OPEN = (DeviceGone, AravisError)

    def __init__(self, path: str, params: Dict[str, str]):
        check_params("gige", params, _KNOWN)
        if not path:
            raise InvalidArgument("gige source: a camera id is required (gige:<IP address>, gige:<name> or gige:Fake_1)")
        super().__init__()
        self.id = path
        self.pixel_format = params.get("pixel_format") or None
        self.width, self.height = size_params("gige", params)
        self.x = int_param("gige", params, "x", 0) or 0
        self.y = int_param("gige", params, "y", 0) or 0
        self.fps = fps_param("gige", params)
        self.packet_size = int_param("gige", params, "packet_size")
        self.buffers = int_param("gige", params, "buffers") or 8
        self._totals: Dict[str, int] = {}    # counters of cameras already closed

    def _new_camera(self) -> GigECamera:
        log.info("opening GigE camera %s", self.id)
        try:
            return GigECamera(self.id, self.pixel_format, self.width, self.height, self.fps, x=self.x, y=self.y,
                              packet_size=self.packet_size, buffers=self.buffers, start=False)
        except self._GONE_AT_OPEN as exc:
            raise SourceGone(str(exc)) from exc

    def _setup(self, cam: GigECamera) -> None:
        info = cam.info()
        log.info("GigE camera %s: %s %s serial %s (%s%s)", self.id, info["vendor"], info["model"], info["serial"],
                 info["protocol"], f" at {info['address']}" if info["address"] else "")
        cam.start()

    def _ready(self, cam: GigECamera) -> None:
        f = cam.format
        log.info("GigE camera %s streaming: %s %dx%d+%d+%d, %g fps%s, %s%d buffers of %d bytes", self.id,
                 f["pixel_format"], f["width"], f["height"], f["x"], f["y"], f["fps"],
                 "" if f["frame_rate_available"] else " (no rate control)",
                 f"packet size {f['packet_size']}, " if f["packet_size"] else "", f["buffers"], f["payload"])

    def _gone(self, exc: Exception) -> SourceGone:
        log.warning("GigE camera %s gone: %s", self.id, exc)
        return super()._gone(exc)

    def set_rate(self, fps: float) -> bool:
        """True when the camera paces itself (AcquisitionFrameRate), else False."""
        paced = self._set_camera_rate(fps)
        if paced is None:
            return False
        log.info("GigE camera %s: rate %g fps asked, %g in force%s", self.id, fps, self.cam.fps,
                 "" if paced else " (no rate control: the producer paces)")
        return paced

    def stats(self) -> Dict[str, int]:
        """The camera's counters (``delivered``, ``lost``, ``id_gaps``, ``incomplete``, ...),
        summed over every connection of this source."""
        out = dict(self._totals)
        if self.cam is not None and not self.cam.closed:
            for k, v in self.cam.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def _closing(self, cam: GigECamera) -> None:
        if not cam.closed:
            for k, v in cam.stats().items():
                self._totals[k] = self._totals.get(k, 0) + v
        s = self._totals
        log.info("closing GigE camera %s%s: %d frames delivered, %d lost so far", self.id,
                 " (gone)" if cam.gone else "", s.get("delivered", 0), s.get("lost", 0))

    def __repr__(self) -> str:
        return f"<GigESource {self.id} {self.cam!r}>"


register("gige", GigESource)
