"""Built-in deterministic test-pattern camera (``test:`` URIs).

    test:?width=640&height=480&fps=30
    test:?width=320&height=240&person=cycle&off_s=5&on_s=5
    test:?person=file&trigger=/tmp/person      # a person is in view while the file exists

It behaves like a real camera, so the capture producer's pacing, flushing and
reconnection logic can be exercised without hardware:

* Frames are "captured" on a clock at ``fps`` (or the rate asked with ``set_rate``),
  whether or not anybody reads, into ``buffers`` driver buffers; when they are all full
  newer frames are lost (V4L2 behaviour), so a late reader gets stale frames — which is
  what :meth:`flush` exists for. ``ratecontrol=0`` makes ``set_rate`` refuse, so the
  caller has to pace by dropping frames.
* The picture is a slowly scrolling smooth gradient (no edges, so neither the motion nor
  the HOG detector fires on it) and, while a "person" is in view, a real photograph of a
  person (scikit-image's bundled ``astronaut``, no download) drifting left and right —
  OpenCV's HOG people detector fires on it reliably from about 240 px of frame height.
* The first 32 bytes of every frame carry a stamp: magic, person flag, frame number,
  capture timestamp (CLOCK_MONOTONIC, equal to what ``read_into`` returns) and a CRC32
  of the rest of the frame. :func:`read_stamp` decodes it, so any consumer can check
  order, integrity and latency.

Parameters: ``width`` (640), ``height`` (480), ``channels`` (3 RGB or 1 gray), ``fps``
(30: the sensor's maximum rate), ``buffers`` (4), ``ratecontrol`` (1), ``person`` (``off``,
``on``, ``cycle``, ``file``), ``off_s``/``on_s`` (5/5: the cycle, starting with ``off_s``
without a person, counted from the first open), ``trigger`` (path for ``person=file``),
``person_height`` (0.8 of the frame height), ``fail_after`` (0: after this many frames
from each open, raise ``SourceGone`` once, to exercise reconnection).
"""

from __future__ import annotations

import collections
import os
import struct
import threading
import time
import zlib
from typing import Dict, NamedTuple, Optional

import numpy as np

from ..errors import InvalidArgument, Timeout
from . import Source, SourceGone, register

STAMP = struct.Struct("<IIQQII")  # magic, flags, frame_no, timestamp_ns, crc32, reserved
STAMP_BYTES = 32
STAMP_MAGIC = 0x50545346  # b"FSTP"
FLAG_PERSON = 1

PERSON_MODES = ("off", "on", "cycle", "file")
_SCROLL_PX_PER_S = 24.0  # background drift: ~1 px per frame at 30 fps, below any motion threshold
_WAVE_PX = 256           # spatial period of the background (the scroll wraps on it)
_PERSON_PX_PER_S = 90.0  # person drift, so the motion detector fires while it is in view


class Stamp(NamedTuple):
    frame_no: int
    timestamp_ns: int
    person: bool
    crc_ok: bool


def read_stamp(frame) -> Optional[Stamp]:
    """Decodes the stamp of a test-pattern frame (ndarray or Frame); None if it has none."""
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous or arr.size < STAMP_BYTES * 2:
        return None
    flat = arr.reshape(-1)
    magic, flags, frame_no, ts, crc, _ = STAMP.unpack_from(flat[:STAMP_BYTES].tobytes())
    if magic != STAMP_MAGIC:
        return None
    return Stamp(frame_no, ts, bool(flags & FLAG_PERSON), zlib.crc32(flat[STAMP_BYTES:]) == crc)


def _param(params: Dict[str, str], key: str, conv, default, check, what: str):
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value = conv(raw)
    except ValueError:
        raise InvalidArgument(f"test source: {key}={raw!r} is not {what}") from None
    if not check(value):
        raise InvalidArgument(f"test source: {key}={raw!r} must be {what}")
    return value


def _flag(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def load_person_sprite(height: int, channels: int) -> np.ndarray:
    """scikit-image's astronaut photograph scaled to ``height`` pixels (shipped in the
    scikit-image wheel: nothing is downloaded)."""
    try:
        from skimage import data as skdata
        from skimage.transform import resize
    except ImportError:
        raise InvalidArgument(
            "test source: person= needs scikit-image for its person photograph "
            "(pip install 'frameshm[pipeline]')"
        ) from None
    img = skdata.astronaut()  # (512, 512, 3) uint8 RGB
    scaled = resize(img, (height, height), order=1, anti_aliasing=True, preserve_range=True)
    sprite = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if channels == 1:
        sprite = np.rint(sprite @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return np.ascontiguousarray(sprite)


class TestPatternSource(Source):
    """See the module docstring."""

    __test__ = False  # not a pytest test class despite its name

    KNOWN = (
        "width", "height", "channels", "fps", "buffers", "ratecontrol", "person",
        "off_s", "on_s", "trigger", "person_height", "fail_after",
    )

    def __init__(self, path: str, params: Dict[str, str]):
        if path:
            raise InvalidArgument(f"test source takes no path, got {path!r} (use 'test:?width=...')")
        unknown = sorted(set(params) - set(self.KNOWN))
        if unknown:
            raise InvalidArgument(
                f"test source: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(self.KNOWN)}"
            )
        positive = "a number > 0"
        self.width = _param(params, "width", int, 640, lambda v: 16 <= v <= 16384, "an integer 16..16384")
        self.height = _param(params, "height", int, 480, lambda v: 16 <= v <= 16384, "an integer 16..16384")
        self.channels = _param(params, "channels", int, 3, lambda v: v in (1, 3), "1 or 3")
        self.fps = _param(params, "fps", float, 30.0, lambda v: 0 < v <= 1000, "a number in (0, 1000]")
        self.buffers = _param(params, "buffers", int, 4, lambda v: 1 <= v <= 64, "an integer 1..64")
        self.ratecontrol = _param(params, "ratecontrol", _flag, True, lambda v: True, "a boolean (0/1)")
        self.person_mode = params.get("person", "off")
        if self.person_mode not in PERSON_MODES:
            raise InvalidArgument(
                f"test source: person={self.person_mode!r} must be one of {', '.join(PERSON_MODES)}"
            )
        self.off_s = _param(params, "off_s", float, 5.0, lambda v: 0 < v < 1e6, positive)
        self.on_s = _param(params, "on_s", float, 5.0, lambda v: 0 < v < 1e6, positive)
        self.trigger = params.get("trigger")
        if self.person_mode == "file" and not self.trigger:
            raise InvalidArgument("test source: person=file needs trigger=<path>")
        if self.trigger and self.person_mode != "file":
            raise InvalidArgument("test source: trigger= is only used with person=file")
        frac = _param(params, "person_height", float, 0.8, lambda v: 0.1 <= v <= 1.0, "a fraction in [0.1, 1]")
        self.fail_after = _param(params, "fail_after", int, 0, lambda v: v >= 0, "an integer >= 0")
        self.shape = (self.height, self.width, 3) if self.channels == 3 else (self.height, self.width)
        self.dtype = np.dtype(np.uint8)
        if self.width * self.height * self.channels < 4 * STAMP_BYTES:
            raise InvalidArgument("test source: frame too small for its stamp")
        self._person_px = max(8, min(int(round(self.height * frac)), self.height, self.width))
        self._override: Optional[bool] = None
        self._lock = threading.Lock()
        self._opened = False
        self._anchor_ns: Optional[int] = None  # schedule origin: the first open
        self._frame_no = 0                     # virtual captures since the first open
        self._bg = None
        self._sprite = None
        self.driver_dropped = 0                # frames lost because every buffer was full
        self.flushed = 0

    # -- Source interface -------------------------------------------------------------

    def open(self) -> None:
        if self._bg is None:
            self._bg = self._background()
            if self.person_mode != "off":
                self._sprite = load_person_sprite(self._person_px, self.channels)
        now = time.monotonic_ns()
        if self._anchor_ns is None:
            self._anchor_ns = now
        # Like a real device, a reopened sensor starts again at its default rate.
        self._period_ns = int(round(1e9 / self.fps))
        self._next_cap = now
        self._queue = collections.deque()
        self._since_open = 0
        self._opened = True

    def read_into(self, out: np.ndarray, timeout: float) -> int:
        if not self._opened:
            raise SourceGone("test source is not open")
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise InvalidArgument(f"test source fills {self.shape} uint8 C-contiguous buffers, got {out.shape} {out.dtype}")
        if self.fail_after and self._since_open >= self.fail_after:
            self._opened = False
            raise SourceGone(f"test source: simulated disconnect after {self._since_open} frames")
        deadline = time.monotonic_ns() + int(timeout * 1e9)
        while True:
            now = time.monotonic_ns()
            with self._lock:
                self._advance(now)
                item = self._queue.popleft() if self._queue else None
                next_cap = self._next_cap
            if item is not None:
                ts, frame_no = item
                self.render(out, frame_no, ts)
                self._since_open += 1
                return ts
            if next_cap > deadline:
                if deadline > now:
                    time.sleep((deadline - now) / 1e9)
                raise Timeout(f"test source: no frame within {timeout:g}s")
            time.sleep(max(0, next_cap - now) / 1e9)

    def set_rate(self, fps: float) -> bool:
        if not fps > 0:
            raise InvalidArgument(f"frame rate must be > 0, got {fps!r}")
        if not self.ratecontrol:
            return False
        if not self._opened:
            raise SourceGone("test source is not open")
        period = int(round(1e9 / min(fps, self.fps)))
        with self._lock:
            now = time.monotonic_ns()
            self._advance(now)
            self._period_ns = period
            # A sensor reprogrammed to a shorter interval does not wait out the old one.
            self._next_cap = min(self._next_cap, now + period)
        return True

    def flush(self, max_age_ns: int) -> int:
        if not self._opened:
            return 0
        with self._lock:
            now = time.monotonic_ns()
            self._advance(now)
            n = 0
            while self._queue and now - self._queue[0][0] > max_age_ns:
                self._queue.popleft()
                n += 1
        self.flushed += n
        return n

    def close(self) -> None:
        self._opened = False

    # -- person control ---------------------------------------------------------------

    def set_person(self, visible: Optional[bool]) -> None:
        """Forces the person in (True) or out (False) of view; None restores the schedule."""
        if visible is not None and self._sprite is None:
            self._sprite = load_person_sprite(self._person_px, self.channels)
        self._override = visible

    def person_visible(self, ts_ns: int) -> bool:
        if self._override is not None:
            return self._override
        mode = self.person_mode
        if mode == "off":
            return False
        if mode == "on":
            return True
        if mode == "file":
            return os.path.exists(self.trigger)
        t = (ts_ns - self._anchor_ns) / 1e9
        return t % (self.off_s + self.on_s) >= self.off_s

    # -- internals --------------------------------------------------------------------

    def _advance(self, now: int) -> None:
        """Runs the virtual sensor up to ``now``: captures land in free buffers, the rest
        are lost, as with a V4L2 driver nobody dequeues from."""
        if now < self._next_cap:
            return
        n = (now - self._next_cap) // self._period_ns + 1
        free = self.buffers - len(self._queue)
        for i in range(min(n, free)):
            self._queue.append((self._next_cap + i * self._period_ns, self._frame_no + i))
        if n > free:
            self.driver_dropped += n - free
        self._frame_no += n
        self._next_cap += n * self._period_ns

    def _background(self) -> np.ndarray:
        """A smooth wave one period wider than the frame, so scrolling is a slice."""
        h, w = self.height, self.width
        x = np.arange(w + _WAVE_PX, dtype=np.float64)[None, :]
        y = np.arange(h, dtype=np.float64)[:, None]
        base = 110.0 + 25.0 * np.sin(2 * np.pi * x / _WAVE_PX) + 20.0 * (y / h)
        if self.channels == 1:
            return np.ascontiguousarray(np.rint(base).astype(np.uint8))
        rgb = np.stack([base, base * 0.95 + 6.0, base * 0.9 + 12.0], axis=-1)
        return np.ascontiguousarray(np.rint(rgb).astype(np.uint8))

    def render(self, out: np.ndarray, frame_no: int, ts: int) -> None:
        """Draws the frame this source delivers as ``frame_no`` captured at ``ts`` (after
        open()): a pure function of (frame_no, ts) and the person schedule, so frames can
        be regenerated and compared pixel for pixel."""
        if self._bg is None:
            raise InvalidArgument("test source: render() needs open() first")
        t = (ts - self._anchor_ns) / 1e9
        shift = int(t * _SCROLL_PX_PER_S) % _WAVE_PX
        np.copyto(out, self._bg[:, shift:shift + self.width])
        person = self.person_visible(ts)
        if person:
            p = self._person_px
            span = self.width - p
            x0 = 0
            if span > 0:
                pos = int(t * _PERSON_PX_PER_S) % (2 * span)
                x0 = pos if pos <= span else 2 * span - pos  # back and forth
            y0 = (self.height - p) // 2
            out[y0:y0 + p, x0:x0 + p] = self._sprite
        flat = out.reshape(-1)
        crc = zlib.crc32(flat[STAMP_BYTES:])
        STAMP.pack_into(flat, 0, STAMP_MAGIC, FLAG_PERSON if person else 0, frame_no, ts, crc, 0)


def _factory(path: str, params: Dict[str, str]) -> Source:
    return TestPatternSource(path, params)


register("test", _factory)
