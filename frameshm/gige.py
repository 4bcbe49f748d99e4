"""frameshm.GigECamera: a GigE Vision camera through the C core (Aravis, libaravis-0.8).

    with frameshm.GigECamera("192.168.1.20", pixel_format="Mono8", width=640, height=480,
                             fps=30, packet_size=9000) as cam:
        ts = cam.read_into(out)            # one copy from Aravis' buffer pool into `out`
        seq = cam.capture_to(writer)       # loan a stream slot -> copy once -> commit
        cam.stats()                        # delivered / lost (id gaps + incomplete) / ...

Camera ids: an IPv4 address (opened directly: GVCP to that address only, no discovery),
``"Fake_1"`` (Aravis' in-process fake camera: no network; the unit-test camera), or any
other Aravis device id / camera name (found by Aravis' discovery, which broadcasts on
every interface).

Every setting is applied on every start - pixel format (``Mono8``, ``Mono16``, ``RGB8``,
``Bayer*8``...), region (``width``/``height``/``x``/``y``; default the camera's current
one), frame rate, packet size (0: negotiated) - because GigE cameras keep settings
between sessions. Frames are ``(h, w)`` uint8 (Mono8, Bayer), ``(h, w)`` uint16 (Mono16)
or ``(h, w, 3)`` uint8 (RGB8).

Lost frames are counted, not hidden: ``stats()["lost"]`` = buffers Aravis returned
incomplete (``incomplete``) + frames the camera sent that no buffer got: missing frame ids
(``id_gaps``; GigE ids are 16-bit and wrap from 65535 to 1) or, for Aravis' in-process
fake, which numbers only the frames it fills, its ``underruns``.

Disconnects: when the camera stops answering or we lose control of it (Aravis' heartbeat
"control-lost", or a restarted camera that no longer lists us as its controller), reads
raise :class:`~frameshm.camera.DeviceGone`; close the camera and open it again when it
is back (the ``gige:`` capture source does this through the capture producer). Other
errors: :class:`~frameshm.camera.DeviceNotFound` (no answer at open),
:class:`~frameshm.camera.DeviceBusy` (another application controls it),
:class:`~frameshm.camera.UnsupportedFormat`, :class:`GigEUnavailable` (built without
Aravis), :class:`AravisError`; a frame that does not come in time raises
:class:`frameshm.Timeout`.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ._camera_base import _CameraBase
from ._core import AravisError, GigEUnavailable  # noqa: F401  (created in C)
from .errors import InvalidArgument

__all__ = ["GigECamera", "GigEUnavailable", "AravisError", "HAVE_ARAVIS"]

def _ext():
    """frameshm._gige, imported on first use: it loads Aravis and GLib, which a process
    that only moves frames never needs."""
    from . import _gige

    return _gige


def __getattr__(name: str):
    if name == "HAVE_ARAVIS":
        #: True when frameshm was built with Aravis (else opening a camera raises GigEUnavailable).
        return bool(_ext().HAVE_ARAVIS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _uint(v, what: str, lo: int = 0) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or v > 1 << 20:
        raise InvalidArgument(f"{what} must be a non-negative int, not {v!r}")
    return int(v)


class GigECamera(_CameraBase):
    """A GigE Vision camera, streaming from construction (``start=False`` to only open it).

    ``pixel_format``: GenICam name (default: the camera's current one); ``width``/``height``
    (exact, both or neither) and ``x``/``y``: the region; ``fps``: the camera's
    AcquisitionFrameRate (default: leave it); ``packet_size``: GigE stream packet size in
    bytes (default: negotiated); ``buffers``: Aravis buffers in the pool.
    """

    _NAME = "GigECamera"

    def __init__(self, id: str, pixel_format: Optional[str] = None, width: Optional[int] = None,
                 height: Optional[int] = None, fps: Optional[float] = None, *, x: int = 0, y: int = 0,
                 packet_size: Optional[int] = None, buffers: int = 8, start: bool = True):
        if not isinstance(id, str) or not id:
            raise InvalidArgument("a GigE camera id is required: an IP address, a camera name or Fake_1")
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
            raise InvalidArgument(f"fps must be a positive number, not {fps!r}")
        self._req = dict(pixel_format=pixel_format or None, width=_uint(width, "width"),
                         height=_uint(height, "height"), x=_uint(x, "x"), y=_uint(y, "y"),
                         fps=float(fps or 0.0), packet_size=_uint(packet_size, "packet_size"),
                         buffers=_uint(buffers, "buffers"))
        if (self._req["width"] == 0) != (self._req["height"] == 0):
            raise InvalidArgument("give both width and height, or neither")
        self.id = id
        super().__init__(_ext().GigECamera(id), start)

    def start(self) -> None:
        """Applies every setting, allocates the buffer pool and starts acquisition."""
        self._start()

    # -- frames ----------------------------------------------------------------------------

    def read_into(self, out, timeout: Optional[float] = None) -> int:
        """Copies the next complete frame once into ``out`` (a writable C-contiguous buffer
        of at least :attr:`frame_bytes`) and returns its arrival timestamp
        (CLOCK_MONOTONIC ns)."""
        return self._cam.read_into(out, timeout)[0]

    def read_frame(self, out, timeout: Optional[float] = None) -> Dict[str, int]:
        """Like :meth:`read_into`, returning ``timestamp_ns``, ``frame_id`` (the camera's
        block id), ``nbytes``, ``lost_before`` (frames lost since the previous one) and
        ``camera_timestamp``."""
        ts, fid, n, lost, cts = self._cam.read_into(out, timeout)
        return {"timestamp_ns": ts, "frame_id": fid, "nbytes": n, "lost_before": lost, "camera_timestamp": cts}

    def read(self, timeout: Optional[float] = None) -> np.ndarray:
        """The next frame as a new array."""
        out = np.empty(self.shape, self.dtype)
        self._cam.read_into(out, timeout)
        return out

    def capture_to(self, writer, timeout: Optional[float] = None) -> int:
        """Writes the next frame straight into a slot of ``writer`` (a
        :class:`frameshm.Writer` of this camera's shape and dtype): waits for the frame,
        loans the slot, copies once, commits with the arrival timestamp. Returns the seq."""
        return self._capture_to(writer, timeout)

    def flush(self, max_age: float = 0.0) -> int:
        """Discards frames received more than ``max_age`` seconds ago that wait in the
        buffer pool. Returns how many."""
        return self._flush(max_age)

    def set_rate(self, fps: Optional[float]) -> bool:
        """Sets the camera's frame rate (None/0: back to the rate asked at start). Returns
        True when the camera paces itself, False when it has no rate control."""
        return self._set_rate(float(fps or 0.0))

    def probe(self) -> None:
        """Raises DeviceGone unless the camera answers and we still control it."""
        self._cam.probe()

    # -- state -----------------------------------------------------------------------------

    def info(self) -> Dict[str, str]:
        """``id``, ``device_id``, ``vendor``, ``model``, ``serial``, ``protocol``, ``address``."""
        return self._cam.info()

    def stats(self) -> Dict[str, int]:
        """Counters: ``delivered``, ``lost`` (= ``incomplete`` + max(``id_gaps``, ``underruns``)), ``id_gaps``,
        ``incomplete``, ``underruns`` (Aravis had no free buffer), ``flushed``,
        ``timeouts``, ``resent_packets``, ``missing_packets``."""
        return self._cam.stats()

    @property
    def format(self) -> Dict:
        """The format in force: ``pixel_format``, ``width``, ``height``, ``x``, ``y``,
        ``fps``, ``frame_rate_available``, ``packet_size``, ``payload``, ``frame_bytes``..."""
        return dict(self._fmt or {})

    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def frame_bytes(self) -> int:
        return self._fmt["frame_bytes"]

    @property
    def pixel_format(self) -> str:
        return self._fmt["pixel_format"]

    @property
    def fps(self) -> float:
        return self._fmt["fps"]

    @property
    def gone(self) -> bool:
        return self._cam.gone

    def __enter__(self) -> "GigECamera":
        return self

    def _repr_id(self) -> str:
        return self.id

    def _repr_format(self) -> str:
        f = self._fmt
        return f"{f['pixel_format']} {f['width']}x{f['height']} @ {f['fps']:g} fps"
