"""Video files, image sequences and network streams through PyAV/FFmpeg (``file:``,
``rtsp:``, ``rtsps:``, ``http:``, ``https:`` URIs).

    file:/data/run.mp4?loop=1&realtime=1          a video file, paced at its own frame rate
    file:/data/run.mp4?realtime=0                 as fast as the pipeline takes the frames
    file:/data/shots/?fps=10                      every image in a folder, name order
    file:/data/shots/*.png?fps=10&loop=1          the images a glob matches
    rtsp://127.0.0.1:8554/cam?transport=tcp       an IP camera
    https://example.org/live.m3u8                 anything FFmpeg opens over HTTP

Every source delivers fixed-shape uint8 frames like the camera sources: ``format=rgb``
(default, (H, W, 3)), ``bgr`` or ``gray`` ((H, W)); ``width``/``height`` scale on request
(FFmpeg's swscale), else the stream's own size. The first frame is decoded in ``open()``,
so the shape is known then.

**Files** decode on the caller's thread, one frame per ``read_into``. With ``realtime=1``
(default) a frame is handed out when its presentation time is due, so the file plays at
its own rate; its timestamp is that due time: CLOCK_MONOTONIC at the start plus the
frame's PTS offset, so the spacing of the timestamps is the file's. Like a camera, it does
not wait for a slow reader: a read gets the frame due now, and the frames in between are
decoded (the next ones need them) but not converted, and counted as ``dropped``. ``realtime=0`` decodes
as fast as it is asked (timestamp: when the frame was decoded). At the end a ``loop=1``
file starts again (timestamps keep increasing); otherwise ``read_into`` raises
:class:`~frameshm.errors.Timeout` from then on (no frames come any more), and
``finished`` is True. Image folders and globs are a file whose frames are the images, in
name order, at ``fps`` (default 30). All images must have one size, unless a
``width``/``height`` is asked.

**Network streams** never accumulate lag: a thread demuxes and decodes everything the
server sends as it arrives (so neither the socket nor FFmpeg buffers grow) and keeps only
the newest frame; a consumer slower than the stream gets the newest frame, and the frames
it did not take are counted as ``dropped``. A frame's timestamp is the arrival time of the
first frame plus its PTS offset (the sender's clock), re-anchored to the arrival time when
that drifts by more than ``max_drift_ms`` (default 500) or the PTS jumps (a server
restart), so frame spacing is the camera's and the timestamps stay on CLOCK_MONOTONIC.
A timestamp is never in the future: frames that arrive faster than their PTS spacing
before any arrived on time (a backlog at connection, when the server or this process was
starved) are stamped at arrival, and the spacing is the sender's from then on.
When the server goes away (end of stream, error, nothing for ``timeout`` seconds)
``read_into`` raises :class:`~frameshm.sources.SourceGone`; the capture producer closes the
source and reopens it until the server is back.

``stats()`` (published with the capture metrics): ``decoded`` frames, ``dropped`` (decoded
but passed over for a newer frame because nobody read them in time; also as ``lost``),
``decode_errors`` (packets FFmpeg refused and frames it flagged corrupt), ``opens``, and
``pts_s``, the presentation time of the last frame handed out.

Parameters: ``format`` (rgb, bgr, gray), ``width``/``height``, and for files ``loop``
(0), ``realtime`` (1), ``fps`` (image sequences: 30; videos: override the file's rate when
``realtime=1``); for network streams ``transport`` (tcp or udp, RTSP only; default tcp),
``timeout`` (seconds without data before the server counts as gone, default 5),
``max_drift_ms`` (500).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import InvalidArgument, InvalidState, Timeout
from . import Source, SourceGone, check_params, int_param, register, size_params

FORMATS = {"rgb": ("rgb24", 3), "bgr": ("bgr24", 3), "gray": ("gray", 1)}
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_FILE_KNOWN = ("format", "width", "height", "loop", "realtime", "fps")
_NET_KNOWN = ("format", "width", "height", "transport", "timeout", "max_drift_ms")


def _av():
    try:
        import av  # noqa: F401
    except ImportError:
        raise InvalidArgument("file:/rtsp:/http: sources need PyAV (pip install 'frameshm[media]')") from None
    return av


def _flag(scheme: str, params: Dict[str, str], key: str, default: bool) -> bool:
    raw = params.get(key)
    if raw in (None, ""):
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"{scheme} source: {key}={raw!r} is not a boolean (0/1)")


def _number(scheme: str, params: Dict[str, str], key: str, default: Optional[float]) -> Optional[float]:
    raw = params.get(key)
    if raw in (None, ""):
        return default
    try:
        v = float(raw)
    except ValueError:
        raise InvalidArgument(f"{scheme} source: {key}={raw!r} is not a number") from None
    if not v > 0:
        raise InvalidArgument(f"{scheme} source: {key}={raw!r} must be positive")
    return v


class _Converter:
    """Decoded VideoFrame -> the source's fixed-shape uint8 array."""

    def __init__(self, scheme: str, params: Dict[str, str]):
        fmt = params.get("format") or "rgb"
        if fmt not in FORMATS:
            raise InvalidArgument(f"{scheme} source: format={fmt!r} must be one of {', '.join(FORMATS)}")
        self.fmt, self.channels = FORMATS[fmt]
        self.width, self.height = size_params(scheme, params)
        self._reformatter = None

    def shape_for(self, frame) -> Tuple[int, ...]:
        w = self.width or frame.width
        h = self.height or frame.height
        return (h, w, 3) if self.channels == 3 else (h, w)

    def into(self, frame, out: np.ndarray) -> None:
        """Converts (and scales) ``frame`` into ``out``: one swscale pass into a frame of
        FFmpeg's, one copy out of its plane. The reformatter is kept: creating swscale's
        context per frame halves the rate at 1080p."""
        h, w = out.shape[0], out.shape[1]
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        conv = self._reformatter.reformat(frame, width=w, height=h, format=self.fmt, threads=0)
        plane = conv.planes[0]
        buf = np.frombuffer(plane, np.uint8)
        c = self.channels
        view = np.lib.stride_tricks.as_strided(buf, shape=out.shape,
                                               strides=(plane.line_size, c, 1) if c == 3 else (plane.line_size, 1))
        np.copyto(out, view)


def _check_out(scheme: str, shape, out: np.ndarray) -> None:
    if out.shape != tuple(shape) or out.dtype != np.uint8:
        raise InvalidArgument(f"{scheme} source fills {tuple(shape)} uint8 buffers, got {out.shape} {out.dtype}")


# -- files and image sequences ------------------------------------------------------------


class FileSource(Source):
    """A video file or an image sequence (see the module docstring)."""

    def __init__(self, path: str, params: Dict[str, str]):
        check_params("file", params, _FILE_KNOWN)
        if not path:
            raise InvalidArgument("file source needs a path, e.g. 'file:/data/run.mp4'")
        self.path = path
        self.conv = _Converter("file", params)
        self.loop = _flag("file", params, "loop", False)
        self.realtime = _flag("file", params, "realtime", True)
        self.fps = _number("file", params, "fps", None)
        self.images = self._image_list(path)
        if self.images is not None and self.fps is None:
            self.fps = 30.0
        self.dtype = np.dtype(np.uint8)
        self.shape = ()
        self.finished = False
        self.decoded = 0
        self.dropped = 0
        self.decode_errors = 0
        self.opens = 0
        self.last_pts_s = 0.0
        self._frames: Optional[Iterator] = None
        self._container = None
        self._pending = None   # (frame, pts_s) decoded ahead (the first, by open())
        self._anchor_ns = 0    # CLOCK_MONOTONIC of pts 0 of the current pass
        self._pass_start_s = 0.0
        self._last_ts = 0

    @staticmethod
    def _image_list(path: str) -> Optional[List[str]]:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXT))
            files = [os.path.join(path, n) for n in names]
        elif glob.has_magic(path):
            files = sorted(glob.glob(path))
        else:
            return None
        if not files:
            raise InvalidArgument(f"file source: no images in {path!r}")
        return files

    # -- decoding ------------------------------------------------------------------------

    def _iter_video(self) -> Iterator:
        av = _av()
        try:
            self._container = av.open(self.path)
        except av.error.FileNotFoundError:
            raise InvalidArgument(f"file source: {self.path} does not exist") from None
        except (av.error.FFmpegError, OSError) as exc:
            raise InvalidArgument(f"file source: cannot open {self.path}: {exc}") from None
        if not self._container.streams.video:
            raise InvalidArgument(f"file source: {self.path} has no video stream")
        vs = self._container.streams.video[0]
        vs.thread_type = "AUTO"
        tb = vs.time_base or Fraction(1, 90000)
        rate = float(vs.average_rate) if vs.average_rate else 30.0
        step = 1.0 / (self.fps or rate)
        n = 0
        first_pts = None
        for packet in self._container.demux(vs):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                self.decode_errors += 1
                continue
            for frame in frames:
                if getattr(frame, "is_corrupt", False):
                    self.decode_errors += 1
                if self.fps is not None or frame.pts is None:
                    pts_s = n * step  # fps asked: the file's rate is overridden
                else:
                    first_pts = frame.pts if first_pts is None else first_pts
                    pts_s = float((frame.pts - first_pts) * tb)
                n += 1
                yield frame, pts_s, step

    def _iter_images(self) -> Iterator:
        av = _av()
        step = 1.0 / self.fps
        for i, name in enumerate(self.images):
            try:
                with av.open(name) as c:
                    frame = next(c.decode(video=0))
            except (av.error.FFmpegError, OSError, StopIteration) as exc:
                self.decode_errors += 1
                if i == 0 and self.decoded == 0:
                    raise InvalidArgument(f"file source: cannot read the image {name}: {exc}") from None
                continue
            yield frame, i * step, step

    def _start_pass(self) -> None:
        self._close_container()
        self._frames = self._iter_images() if self.images is not None else self._iter_video()

    def _next(self):
        """(frame, pts_s, step) of the next frame, starting a new pass at the end when
        looping; None at the end otherwise."""
        for attempt in (0, 1):
            try:
                item = next(self._frames)
                self.decoded += 1
                return item
            except StopIteration:
                if not self.loop or attempt or self.decoded == 0:
                    return None
                self._pass_start_s = self.last_pts_s + self._step
                self._start_pass()
        return None

    # -- Source interface ----------------------------------------------------------------

    def open(self) -> None:
        self.opens += 1
        self.finished = False
        self._pass_start_s = 0.0
        self._step = 1.0 / (self.fps or 30.0)
        self._start_pass()
        first = self._next()
        if first is None:
            self._close_container()
            raise InvalidArgument(f"file source: {self.path} holds no decodable frame")
        self._pending = first
        self.shape = self.conv.shape_for(first[0])
        self._anchor_ns = time.monotonic_ns()

    def read_into(self, out: np.ndarray, timeout: float) -> int:
        if self._frames is None:
            raise InvalidState("file source is not open")
        _check_out("file", self.shape, out)
        item, self._pending = self._pending, None
        if item is None:
            item = self._next()
        if item is None:
            self.finished = True
            time.sleep(max(0.0, min(timeout, 0.05)))
            raise Timeout(f"file source: {self.path} has ended")
        frame, pts_s, self._step = item
        pts_s += self._pass_start_s
        if self.realtime:
            # Like a camera nobody read in time: a frame whose successor is already due is
            # decoded (the next frames need it) but not converted, and counted as dropped.
            while time.monotonic_ns() >= self._anchor_ns + int((pts_s + self._step) * 1e9):
                nxt = self._next()
                if nxt is None:
                    break
                self.dropped += 1
                frame, pts_s, self._step = nxt
                pts_s += self._pass_start_s
            due = self._anchor_ns + int(pts_s * 1e9)
            wait = (due - time.monotonic_ns()) / 1e9
            if wait > timeout:
                self._pending = (frame, pts_s - self._pass_start_s, self._step)
                time.sleep(timeout)
                raise Timeout(f"file source: next frame due in {wait:.3f}s")
            if wait > 0:
                time.sleep(wait)
            ts = due
        else:
            ts = time.monotonic_ns()
        ts = max(ts, self._last_ts + 1)  # strictly increasing, also across loops
        self.conv.into(frame, out)
        self.last_pts_s = pts_s
        self._last_ts = ts
        return ts

    def stats(self) -> Dict[str, int]:
        return {"decoded": self.decoded, "dropped": self.dropped, "lost": self.dropped,
                "decode_errors": self.decode_errors, "opens": self.opens, "pts_s": round(self.last_pts_s, 3)}

    def _close_container(self) -> None:
        self._frames = None
        c, self._container = self._container, None
        if c is not None:
            c.close()

    def close(self) -> None:
        self._pending = None
        self._close_container()

    def __repr__(self) -> str:
        return f"<FileSource {self.path} {self.shape}>"


# -- network streams ----------------------------------------------------------------------


class NetworkSource(Source):
    """An RTSP or HTTP(S) stream (see the module docstring)."""

    def __init__(self, scheme: str, path: str, params: Dict[str, str]):
        check_params(scheme, params, _NET_KNOWN)
        self.scheme = scheme
        self.url = f"{scheme}://{path}"
        self.conv = _Converter(scheme, params)
        transport = params.get("transport") or "tcp"
        if transport not in ("tcp", "udp"):
            raise InvalidArgument(f"{scheme} source: transport={transport!r} must be tcp or udp")
        self.transport = transport
        self.timeout = _number(scheme, params, "timeout", 5.0)
        self.max_drift_ns = (int_param(scheme, params, "max_drift_ms") or 500) * 1_000_000
        self.dtype = np.dtype(np.uint8)
        self.shape = ()
        self.decoded = 0
        self.dropped = 0
        self.decode_errors = 0
        self.opens = 0
        self.last_pts_s = 0.0
        self._cond = threading.Condition()
        self._newest = None       # (frame, ts_ns, pts_s), not yet handed out
        self._gone: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._container = None
        self._anchor: Optional[Tuple[int, float]] = None  # (CLOCK_MONOTONIC ns, pts_s) pair

    def _options(self) -> Dict[str, str]:
        us = str(int(self.timeout * 1e6))
        opts = {"flags": "low_delay"}
        if self.scheme.startswith("rtsp"):
            opts.update(rtsp_transport=self.transport, timeout=us, fflags="nobuffer")
        else:
            # No fflags=nobuffer here: it makes the MP4 demuxer return no packets over HTTP.
            opts.update(rw_timeout=us, reconnect="0")
        return opts

    def open(self) -> None:
        if self._thread is not None:
            return
        av = _av()
        self.opens += 1
        try:
            c = av.open(self.url, options=self._options(), timeout=(self.timeout, self.timeout))
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceGone(f"{self.url}: cannot open: {exc}") from None
        if not c.streams.video:
            c.close()
            raise InvalidArgument(f"{self.url} has no video stream")
        self._container = c
        self._stop.clear()
        self._gone = None
        self._newest = None
        self._anchor = None
        self._thread = threading.Thread(target=self._pump, name=f"frameshm-{self.scheme}", daemon=True)
        self._thread.start()
        # The first frame fixes the shape; it stays queued for the first read.
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self._newest is None and self._gone is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            first, gone = self._newest, self._gone
        if first is None:
            self.close()
            raise SourceGone(f"{self.url}: no frame within {self.timeout:g}s" if gone is None else gone)
        self.shape = self.conv.shape_for(first[0])

    def _timestamp(self, pts_s: Optional[float], now: int) -> int:
        """The sender's frame spacing on our clock: arrival of the anchor frame plus the
        PTS offset, re-anchored when that is off by more than max_drift from arrival."""
        if pts_s is None:
            return now
        if self._anchor is not None:
            t0, p0 = self._anchor
            ts = t0 + int((pts_s - p0) * 1e9)
            if abs(ts - now) <= self.max_drift_ns and ts <= now:
                return ts
        self._anchor = (now, pts_s)
        return now

    def _pump(self) -> None:
        """Demuxes and decodes everything as it arrives; keeps the newest frame."""
        av = _av()
        c = self._container
        vs = c.streams.video[0]
        vs.thread_type = "SLICE"  # frame threading would hold frames back (latency)
        tb = vs.time_base or Fraction(1, 90000)
        reason = f"{self.url}: end of stream"
        try:
            for packet in c.demux(vs):
                if self._stop.is_set():
                    return
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    self.decode_errors += 1
                    continue
                for frame in frames:
                    now = time.monotonic_ns()
                    if getattr(frame, "is_corrupt", False):
                        self.decode_errors += 1
                    pts_s = float(frame.pts * tb) if frame.pts is not None else None
                    ts = self._timestamp(pts_s, now)
                    with self._cond:
                        if self._newest is not None:
                            self.dropped += 1
                        self._newest = (frame, ts, pts_s or 0.0)
                        self.decoded += 1
                        self._cond.notify_all()
        except (av.error.FFmpegError, OSError) as exc:
            reason = f"{self.url}: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever broke the stream, the reader hears it
            reason = f"{self.url}: {type(exc).__name__}: {exc}"
        finally:
            with self._cond:
                if not self._stop.is_set():
                    self._gone = reason
                self._cond.notify_all()

    def read_into(self, out: np.ndarray, timeout: float) -> int:
        if self._thread is None:
            raise SourceGone(f"{self.url} is not open")
        _check_out(self.scheme, self.shape, out)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._newest is None:
                if self._gone is not None:
                    raise SourceGone(self._gone)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{self.url}: no frame within {timeout:g}s")
                self._cond.wait(left)
            (frame, ts, pts_s), self._newest = self._newest, None
        self.conv.into(frame, out)
        self.last_pts_s = pts_s
        return ts

    def flush(self, max_age_ns: int) -> int:
        with self._cond:
            if self._newest is not None and time.monotonic_ns() - self._newest[1] > max_age_ns:
                self._newest = None
                return 1
        return 0

    def stats(self) -> Dict[str, int]:
        return {"decoded": self.decoded, "dropped": self.dropped, "lost": self.dropped,
                "decode_errors": self.decode_errors, "opens": self.opens, "pts_s": round(self.last_pts_s, 3)}

    def close(self) -> None:
        t, self._thread = self._thread, None
        self._stop.set()
        if t is not None:
            # The demuxer notices the stop at the next packet, or gives up after `timeout`
            # without data (PyAV's interrupt callback), so this join is bounded.
            t.join(self.timeout + 2.0)
        c, self._container = self._container, None
        if c is not None and (t is None or not t.is_alive()):
            c.close()
        with self._cond:
            self._newest = None

    def __repr__(self) -> str:
        return f"<NetworkSource {self.url} {self.shape}>"


def _file(path: str, params: Dict[str, str]) -> Source:
    return FileSource(path, params)


for _scheme in ("rtsp", "rtsps", "http", "https"):
    register(_scheme, lambda path, params, s=_scheme: NetworkSource(s, path, params))
register("file", _file)
