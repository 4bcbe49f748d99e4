"""frameshm.Camera: a V4L2 camera through the C core (libv4l2 for I/O, libv4lconvert for
conversions).

    with frameshm.Camera("/dev/video0", width=640, height=480, fps=30, format="RGB24") as cam:
        cam.formats()                      # what the device offers, native and converted
        for frame in cam.frames():         # zero-copy: a view of the dequeued driver buffer
            process(frame.array)           # read-only numpy array, valid until released
        ...
        with cam.read(timeout=1.0) as f:   # one frame; requeued when the block ends
            keep = f.copy()
        ts = cam.read_into(out)            # one copy/conversion straight into `out`
        seq = cam.capture_to(writer)       # loan a stream slot -> convert once -> commit

Zero-copy frames hold a driver buffer: it goes back to the driver when the frame is
released (``release()``, the end of a ``with`` block, the next step of ``frames()``, or
the frame being garbage collected) *and* no numpy view of it is alive any more - never
while a view is alive. A camera whose buffers are all held raises
:class:`BuffersExhausted` instead of waiting forever.

``format`` takes a V4L2 fourcc (``"YUYV"``, ``"MJPG"``, ``"GREY"``, ``"RGB3"``...) or
``"RGB24"``, ``"BGR24"``, ``"GRAY8"``: native formats are delivered as the device sends
them; RGB24/BGR24 (and YUV 4:2:0) from other formats go through libv4lconvert, GRAY8 is
the luma plane. Frame arrays: packed 4:2:2 ``(h, w, 2)``, RGB/BGR ``(h, w, 3)``, GRAY8
``(h, w)``, NV12/YU12 ``(h*3/2, w)``, MJPEG 1-D bytes.

Errors are :class:`CameraError` subclasses: :class:`DeviceNotFound`,
:class:`DevicePermissionError`, :class:`DeviceBusy`, :class:`DeviceGone` (unplugged
mid-stream, ENODEV), :class:`UnsupportedFormat`, :class:`NotACamera`,
:class:`V4L2Unavailable` (built without libv4l2), :class:`BuffersExhausted`; a frame that
does not come in time raises :class:`frameshm.Timeout`.

Test builds only (``FRAMESHM_TEST_BUILD=1`` at build time; never in wheels):
``FRAMESHM_V4L2_BACKEND=<path>/libfshm_fakev4l2.so`` makes every camera opened afterwards
in this process (and its children) use that library's I/O backend instead of libv4l2
(docs/v4l2.md; tests/c/fake_v4l2.h).
"""

from __future__ import annotations

import fractions
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _core
from ._camera_base import _CameraBase
from ._core import (  # noqa: F401  (the camera errors are created in C, frameshm._core)
    BuffersExhausted,
    CameraError,
    DeviceBusy,
    DeviceGone,
    DeviceNotFound,
    DevicePermissionError,
    NotACamera,
    UnsupportedFormat,
    V4L2Unavailable,
)
from .errors import FrameshmError, InvalidArgument

__all__ = [
    "Camera",
    "CameraFrame",
    "CameraError",
    "DeviceNotFound",
    "DevicePermissionError",
    "DeviceBusy",
    "DeviceGone",
    "UnsupportedFormat",
    "NotACamera",
    "V4L2Unavailable",
    "BuffersExhausted",
    "fourcc",
    "fourcc_str",
    "HAVE_LIBV4L2",
]

#: True when frameshm was built with libv4l2 (else opening a camera raises V4L2Unavailable).
HAVE_LIBV4L2 = bool(_core.HAVE_LIBV4L2)


_ALIASES = {
    "RGB24": "RGB3", "RGB": "RGB3", "BGR24": "BGR3", "BGR": "BGR3", "GRAY8": "GREY", "GRAY": "GREY",
    "MJPEG": "MJPG", "I420": "YU12", "YUV420": "YU12", "Y16": "Y16 ", "YUY2": "YUYV",
}
# Friendly names for what frames are delivered as (the inverse of the main aliases).
_NAMES = {"RGB3": "RGB24", "BGR3": "BGR24", "GREY": "GRAY8"}


def fourcc(name: Union[str, int]) -> int:
    """V4L2 fourcc code of ``"YUYV"`` / ``"RGB24"`` / ... (ints pass through)."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    if not isinstance(name, str):
        raise InvalidArgument(f"format must be a fourcc string like 'YUYV' or 'RGB24', not {name!r}")
    code = _ALIASES.get(name.upper(), name)
    if len(code) != 4 or not code.isascii():
        raise InvalidArgument(f"format {name!r} is not a 4-character V4L2 fourcc (or RGB24/BGR24/GRAY8)")
    b = code.encode("ascii")
    return b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24


def fourcc_str(code: int) -> str:
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))


def _fps_fraction(fps) -> Tuple[int, int]:
    if fps is None or fps == 0:
        return 0, 0
    try:
        f = fractions.Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError):
        raise InvalidArgument(f"fps must be a positive number, not {fps!r}") from None
    if f <= 0:
        raise InvalidArgument(f"fps must be positive, not {fps!r}")
    return f.numerator, f.denominator


def _int_arg(v, what: str) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v > 65535:
        raise InvalidArgument(f"{what} must be a positive int, not {v!r}")
    return int(v)


class CameraFrame:
    """A zero-copy frame: metadata plus :attr:`array`, a read-only numpy view of the
    dequeued driver buffer (or of its one conversion, for converted formats).

    The buffer returns to the driver on :meth:`release` once no view of it is alive."""

    __slots__ = ("_buf", "_shape", "_strides", "_dtype", "_array", "timestamp_ns", "sequence", "index",
                 "nbytes", "driver_timestamp", "dequeue_ns")

    def __init__(self, buf, shape, strides, dtype):
        self._buf = buf
        self._shape = shape
        self._strides = strides
        self._dtype = dtype
        self._array = None
        self.timestamp_ns = buf.timestamp_ns     #: capture time, CLOCK_MONOTONIC
        self.sequence = buf.sequence             #: driver frame counter
        self.index = buf.index                   #: driver buffer index
        self.nbytes = buf.nbytes
        self.driver_timestamp = buf.driver_timestamp  #: False: dequeue time (driver gave none)
        self.dequeue_ns = buf.dequeue_ns

    @property
    def array(self) -> np.ndarray:
        """Read-only view of the frame in the driver's buffer (no copy)."""
        a = self._array
        if a is None:
            # np.asarray(memoryview) keeps the memoryview as the array's base, and the
            # memoryview holds a buffer export of the driver buffer for as long as any
            # view derived from it lives: that is what keeps the buffer from the driver.
            # (np.ndarray(buffer=...) / np.frombuffer would drop the export at once.)
            flat = np.asarray(memoryview(self._buf))
            if self._dtype != flat.dtype:
                flat = flat.view(self._dtype)
            if self._shape is None:
                a = flat
            else:
                item = self._dtype.itemsize
                strides = self._strides or tuple(
                    int(np.prod(self._shape[i + 1:], dtype=np.int64)) * item for i in range(len(self._shape)))
                a = as_strided(flat, self._shape, strides, writeable=False)
            self._array = a
        return a

    def copy(self) -> np.ndarray:
        """A private, contiguous copy."""
        return np.array(self.array, copy=True, order="C")

    def release(self) -> bool:
        """Done with the frame: True if its buffer went back to the driver now, False if
        numpy views of it are still alive (it goes back when the last one is dropped)."""
        self._array = None
        return self._buf.release()

    @property
    def released(self) -> bool:
        return self._buf.released

    @property
    def latency_ns(self) -> int:
        """Now minus the capture timestamp."""
        return _core.now_ns() - self.timestamp_ns

    def __array__(self, dtype=None, copy=None):
        a = self.array
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a.copy() if copy else a

    def __enter__(self) -> "CameraFrame":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        shape = self._shape if self._shape is not None else (self.nbytes,)
        return (f"<frameshm.CameraFrame seq={self.sequence} shape={shape} ts={self.timestamp_ns}"
                f"{' released' if self.released else ''}>")


class Camera(_CameraBase):
    """A V4L2 capture device, streaming from construction (``start=False`` to only open
    it, e.g. to list formats; then :meth:`start`).

    ``width``/``height``: exact frame size (default: the device's current one);
    ``fps``: frames per second (the device's rate control when it has one, else frames are
    dropped by driver timestamp to hold the rate); ``format``: see the module docstring
    (default: the device's current format); ``buffers``: driver buffers to ask for (the
    driver may grant another count, see :attr:`buffers`).
    """

    _NAME = "Camera"

    def __init__(
        self,
        device: str = "/dev/video0",
        width: Optional[int] = None,
        height: Optional[int] = None,
        fps: Optional[float] = None,
        format: Optional[Union[str, int]] = None,
        *,
        buffers: int = 4,
        start: bool = True,
    ):
        self._req = dict(
            fourcc=fourcc(format) if format is not None else 0,
            width=_int_arg(width, "width"),
            height=_int_arg(height, "height"),
            buffers=_int_arg(buffers, "buffers"),
        )
        if (self._req["width"] == 0) != (self._req["height"] == 0):
            raise InvalidArgument("give both width and height, or neither")
        self._req["fps_num"], self._req["fps_den"] = _fps_fraction(fps)
        self.device = device
        self._prev: Optional[CameraFrame] = None
        super().__init__(_core.Camera(device), start)

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Negotiates format, size and rate, maps the buffers and starts streaming."""
        f = self._start()
        # Zero-copy views: the driver's rows (bytesperline) may be padded.
        self._view_shape: Optional[tuple] = self._shape
        self._view_strides: Optional[tuple] = None
        bpl, item = f["bytesperline"], self._dtype.itemsize
        if f["compressed"]:
            self._view_shape = None  # 1-D, the frame's own length
        elif len(self._shape) >= 2 and bpl:
            row = int(np.prod(self._shape[1:])) * item
            if bpl != row:
                if fourcc_str(f["native_fourcc"]) in ("YU12", "YV12"):
                    self._view_shape = None  # padded 3-plane 4:2:0 has no single strided view
                elif len(self._shape) == 3:
                    self._view_strides = (bpl, self._shape[2] * item, item)
                else:
                    self._view_strides = (bpl, item)

    def formats(self) -> List[Dict]:
        """What the device can deliver, one dict per format: ``format`` (fourcc),
        ``description``, ``native`` (False: converted from ``source``), ``compressed`` and
        ``sizes``: ``{"width", "height", "fps"}`` dicts (``fps``: the rates the device lists,
        empty when it cannot say), or one ``{"min_width", "max_width", "step_width",
        "min_height", ...}`` range."""
        out = []
        for code, flags, src, desc in self._cam.formats():
            sizes = []
            for s in self._cam.sizes(code):
                if len(s) == 2:
                    ivals = self._cam.intervals(code, s[0], s[1])
                    sizes.append({"width": s[0], "height": s[1],
                                  "fps": [round(den / num, 3) for num, den, *_ in ivals if num]})
                else:
                    sizes.append(dict(zip(("min_width", "max_width", "step_width", "min_height",
                                           "max_height", "step_height"), s)))
            out.append({
                "format": fourcc_str(code),
                "description": desc,
                "native": not flags & 2,
                "compressed": bool(flags & 1),
                "source": fourcc_str(src) if src else None,
                "sizes": sizes,
            })
        return out

    # -- frames ----------------------------------------------------------------------------

    def read(self, timeout: Optional[float] = None) -> CameraFrame:
        """The next frame, zero-copy. Release it (or use ``with``) when done."""
        buf = self._cam.dequeue(timeout)
        return CameraFrame(buf, self._view_shape, self._view_strides, self._dtype)

    def frames(self, timeout: Optional[float] = None) -> Iterator[CameraFrame]:
        """Zero-copy frames, each released when the next one is asked for; stops when no
        frame comes within ``timeout`` (None: never). Keep data with ``frame.copy()``."""
        try:
            while True:
                if self._prev is not None:
                    self._prev.release()
                    self._prev = None
                try:
                    f = self.read(timeout)
                except FrameshmError as exc:
                    if isinstance(exc, TimeoutError):
                        return
                    raise
                self._prev = f
                yield f
        finally:
            if self._prev is not None:
                self._prev.release()
                self._prev = None

    def __iter__(self) -> Iterator[CameraFrame]:
        return self.frames()

    def read_into(self, out, timeout: Optional[float] = None) -> int:
        """Converts/copies the next frame once into ``out`` (a writable C-contiguous buffer
        of at least :attr:`frame_bytes`), requeues the driver buffer at once and returns
        the capture timestamp (CLOCK_MONOTONIC ns)."""
        ts, _seq, _n, _drv = self._cam.read_into(out, timeout)
        return ts

    def capture_to(self, writer, timeout: Optional[float] = None) -> int:
        """Writes the next frame straight into a slot of ``writer`` (a
        :class:`frameshm.Writer` of this camera's shape and dtype): waits for the frame,
        loans the slot, converts/copies once, commits with the capture timestamp. Returns
        the stream seq."""
        return self._capture_to(writer, timeout)

    def _loan(self, writer, nbytes: int):
        if self._fmt["compressed"]:
            return writer.loan((nbytes,), np.uint8)
        return writer.loan()

    def flush(self, max_age: float = 0.0) -> int:
        """Discards frames captured more than ``max_age`` seconds ago that wait in the
        driver's queue (after a pause or a mode switch). Returns how many."""
        return self._flush(max_age)

    def set_rate(self, fps: Optional[float]) -> bool:
        """Changes the frame rate (None/0: back to the rate asked at construction).
        Returns True when the device paces itself, False when frameshm drops frames to
        hold the rate (devices without rate control, PipeWire's emulation)."""
        return self._set_rate(*_fps_fraction(fps))

    # -- state -----------------------------------------------------------------------------

    def _f(self) -> dict:
        if self._fmt is None:
            raise InvalidArgument("the camera is not started (Camera(..., start=False)): call start()")
        return self._fmt

    @property
    def shape(self) -> tuple:
        """Shape of delivered frames (packed; MJPEG: the maximum size)."""
        self._f()
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        self._f()
        return self._dtype

    @property
    def format(self) -> str:
        """Delivered format's fourcc (``"RGB3"`` for RGB24, ``"GREY"`` for GRAY8...)."""
        return fourcc_str(self._f()["fourcc"])

    @property
    def native_format(self) -> str:
        """The format the device sends."""
        return fourcc_str(self._f()["native_fourcc"])

    @property
    def converted(self) -> bool:
        return self._f()["converted"]

    @property
    def compressed(self) -> bool:
        return self._f()["compressed"]

    @property
    def width(self) -> int:
        return self._f()["width"]

    @property
    def height(self) -> int:
        return self._f()["height"]

    @property
    def bytesperline(self) -> int:
        """Row stride of zero-copy frames (the driver's, possibly padded)."""
        return self._f()["bytesperline"]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one delivered (packed) frame: what read_into() needs."""
        return self._f()["frame_bytes"]

    @property
    def fps(self) -> Optional[float]:
        """The device's reported frame rate (None when it does not say)."""
        num, den = self._f()["device_fps"]
        return num / den if num and den else None

    @property
    def rate_limit(self) -> Optional[float]:
        """Frame rate frameshm enforces by dropping frames (None: the device paces)."""
        num, den = self._f()["rate_limit"]
        return num / den if num and den else None

    @property
    def buffers(self) -> int:
        """Driver buffers granted."""
        return self._f()["buffers"]

    @property
    def info(self) -> dict:
        """driver, card, bus_info, capabilities, backend ("libv4l2", or a test backend)."""
        return self._cam.info()

    @property
    def stats(self) -> dict:
        """delivered, flushed, rate_dropped, errors, driver_gaps, held."""
        return self._cam.stats()

    @property
    def gone(self) -> bool:
        """The device reported it disappeared (ENODEV)."""
        return self._cam.gone

    def close(self) -> None:
        """Stops streaming and releases the device. Frames still held keep their memory
        until released; the device is unmapped and closed with the last one."""
        if self._prev is not None:
            self._prev.release()
            self._prev = None
        super().close()

    def __enter__(self) -> "Camera":
        return self

    def _repr_id(self) -> str:
        return repr(self.device)

    def _repr_format(self) -> str:
        name = _NAMES.get(self.format, self.format)
        return f"{name} {self.width}x{self.height} shape={self._shape}"
