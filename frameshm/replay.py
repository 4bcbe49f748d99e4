"""Replaying a recording into live streams, exporting it to MP4, and the `frameshm record`
and `frameshm replay` commands (the layout and the recorder: :mod:`frameshm.recording`).

A replay publishes every recorded frame of the chosen streams, in the order of their
capture timestamps across streams (one clock), byte for byte. The relations survive:

* **timestamps** keep their original spacing: a frame is published with
  ``start + (timestamp - first timestamp)``, ``start`` being CLOCK_MONOTONIC when the replay
  began (at ``speed`` other than 1 frames are published faster or slower, and at ``max``
  as fast as possible, but their timestamps keep the recorded spacing);
* **seq**: each stream's writer numbers its frames itself (1, 2, ... in a new stream), so a
  recorded ``ref_seq`` (a detection's reference to the frame it was computed on) is
  translated to the seq the referenced frame got in this replay; the reference stream is
  the one the recording names (``X.detections`` -> ``X`` by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import InvalidArgument, Timeout
from .recording import Recorder, Recording, RecordingError

log = logging.getLogger("frameshm.replay")

_SEQ_MEMORY = 4096  # per stream: recorded seq -> replayed seq, for ref_seq translation


class Replayer:
    """Publishes a :class:`Recording`'s streams: ``Replayer("run1/").run(stop)``.

    ``speed``: 1.0 (real time), another factor, or None for as fast as possible. ``loop``
    starts again at the end (timestamps keep increasing). ``start_s``/``end_s`` select a
    span, in seconds after the recording's first frame. ``rename`` maps recorded stream
    names to the names to publish under; ``wait_consumers`` holds the first frame until
    each stream has that many consumers (so a test or a pipeline misses nothing).
    ``lossless`` never overwrites a frame a process-all consumer (``wait_next``) has not
    taken yet: the replay goes no faster than the slowest of them (a model evaluated on
    every frame at ``speed=None``); drain-to-latest consumers are not waited for."""

    def __init__(self, recording, streams: Optional[Sequence[str]] = None, *, speed: Optional[float] = 1.0,
                 loop: bool = False, start_s: Optional[float] = None, end_s: Optional[float] = None,
                 rename: Optional[Dict[str, str]] = None, nslots: int = 8, wait_consumers: int = 0,
                 lossless: bool = False, base_dir: Optional[str] = None, namespace: Optional[str] = None):
        self.rec = recording if isinstance(recording, Recording) else Recording(recording)
        if speed is not None and not speed > 0:
            raise InvalidArgument(f"replay: speed must be > 0 or 'max', not {speed!r}")
        self.speed, self.loop = speed, loop
        self.records = self.rec.records(streams, start_s, end_s)
        if not self.records:
            raise RecordingError(f"{self.rec.path}: no frames to replay in that span")
        self.names = sorted({r.stream for r in self.records})
        self.rename = {n: (rename or {}).get(n, n) for n in self.names}
        if lossless and nslots < 8:
            raise InvalidArgument("replay: lossless needs nslots >= 8 (it keeps a margin of slots)")
        self.nslots, self.wait_consumers, self.lossless = nslots, wait_consumers, lossless
        self.waits = 0  # lossless: times a frame waited for a consumer
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        self.published = 0
        self.passes = 0
        self.writers = {}

    def _open_writers(self) -> None:
        from .stream import Writer

        for n in self.names:
            s = self.rec.streams[n]
            if s.fixed is not None:
                shape, dtype = s.fixed
                w = Writer(self.rename[n], shape=shape, dtype=dtype, nslots=self.nslots, **self._addr)
            else:
                largest = max(r.nbytes for r in self.records if r.stream == n)
                w = Writer(self.rename[n], max_bytes=max(1, largest), nslots=self.nslots, **self._addr)
            self.writers[n] = w

    def _await_consumers(self, stop: threading.Event) -> None:
        from .admin import stream_info

        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            counts = [len(stream_info(self.rename[n], **self._addr).get("consumers", [])) for n in self.names]
            if min(counts) >= self.wait_consumers:
                return
            stop.wait(0.05)
        if not stop.is_set():
            raise Timeout(f"replay: fewer than {self.wait_consumers} consumer(s) after 60s")

    # Lossless: at most this many frames ahead of the slowest process-all consumer (its
    # reported position may lead what it has finished reading by one; the rest is margin).
    _LEAD_MARGIN = 3

    def _await_readers(self, name: str, seq: int, floor: Dict[str, int], stop: threading.Event) -> None:
        """Blocks until publishing ``seq`` on ``name`` overwrites nothing a process-all
        consumer still has to read. ``floor`` caches the slowest position seen, so the
        control region is read only when the replay gets close to it."""
        from .admin import stream_info

        limit = self.nslots - self._LEAD_MARGIN
        while seq - floor.get(name, 0) >= limit and not stop.is_set():
            consumers = [c for c in stream_info(self.rename[name], **self._addr)["consumers"]
                         if c.get("process_all") and c.get("alive", True)]
            floor[name] = min((c["last_seq_plus1"] for c in consumers), default=seq)
            if seq - floor[name] >= limit:
                self.waits += 1
                stop.wait(0.001)

    def run(self, stop: Optional[threading.Event] = None) -> int:
        """Publishes until the end (or forever with ``loop``) or ``stop``; returns the
        number of frames published."""
        stop = stop or threading.Event()
        self._open_writers()
        try:
            if self.wait_consumers:
                self._await_consumers(stop)
            first = self.records[0].timestamp_ns
            span = self.records[-1].timestamp_ns - first
            gaps = np.diff([r.timestamp_ns for r in self.records[: 64]])
            step = int(np.median(gaps)) if len(gaps) else 33_000_000
            origin = time.monotonic_ns()   # the replay's time of the first frame
            seqmap: Dict[str, "OrderedDict[int, int]"] = {n: OrderedDict() for n in self.names}
            refs = {n: self.rec.streams[n].ref_stream for n in self.names}
            next_seq: Dict[str, int] = {}   # lossless: each stream's next seq, once known
            floor: Dict[str, int] = {}
            while not stop.is_set():
                for r in self.records:
                    if stop.is_set():
                        break
                    offset = r.timestamp_ns - first
                    if self.speed is not None:
                        due = origin + int(offset / self.speed)
                        wait = (due - time.monotonic_ns()) / 1e9
                        if wait > 0 and stop.wait(wait):
                            break
                    ref = r.ref_seq
                    if ref is not None and refs[r.stream] in seqmap:
                        ref = seqmap[refs[r.stream]].get(ref, ref)
                    w = self.writers[r.stream]
                    if self.lossless and r.stream in next_seq:
                        self._await_readers(r.stream, next_seq[r.stream], floor, stop)
                    view = w.loan(r.shape, r.dtype) if self.rec.streams[r.stream].fixed is None else w.loan()
                    self.rec.read_into(r, view)
                    seq = w.commit(origin + offset, ref_seq=ref)
                    next_seq[r.stream] = seq + 1
                    m = seqmap[r.stream]
                    m[r.seq] = seq
                    if len(m) > _SEQ_MEMORY:
                        m.popitem(last=False)
                    self.published += 1
                self.passes += 1
                if not self.loop:
                    break
                # The next pass continues the clock: one frame period after the last frame.
                origin += int((span + step) / (self.speed or 1.0)) if self.speed else span + step
                if self.speed is None:
                    origin = max(origin, time.monotonic_ns())
                for m in seqmap.values():
                    m.clear()
        finally:
            for w in self.writers.values():
                w.close()
            self.writers = {}
        return self.published


def export_mp4(recording, stream: str, out: str, *, codec: Optional[str] = None, bgr: bool = False,
               start_s: Optional[float] = None, end_s: Optional[float] = None, crf: int = 18) -> int:
    """Encodes a recorded uint8 frame stream ((H, W, 3) RGB, or BGR with ``bgr``, or
    (H, W) gray) to a video file through PyAV, frame times from the recorded timestamps.
    ``codec``: default libx264 (H.264) when PyAV's FFmpeg has it, else mpeg4. Returns the
    number of frames written."""
    from .sources.media import _av

    av = _av()
    rec = recording if isinstance(recording, Recording) else Recording(recording)
    records = rec.records([stream], start_s, end_s)
    if not records:
        raise RecordingError(f"{rec.path}: stream {stream!r} has no frames in that span")
    first = records[0]
    if first.dtype != np.uint8 or not (len(first.shape) == 2 or (len(first.shape) == 3 and first.shape[2] == 3)):
        raise InvalidArgument(f"export: {stream!r} holds {first.shape} {first.dtype} frames, not uint8 images")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    h, w = first.shape[:2]
    fmt = "gray" if len(first.shape) == 2 else ("bgr24" if bgr else "rgb24")
    tb = Fraction(1, 1000)
    n = 0
    last_pts = -1
    with av.open(out, "w") as c:
        gaps = np.diff([r.timestamp_ns for r in records[:64]])
        fps = Fraction(round(1e9 / float(np.median(gaps)))) if len(gaps) and np.median(gaps) > 0 else Fraction(30)
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height = w + (w & 1), h + (h & 1)  # yuv420p wants even sizes
        vs.pix_fmt = "yuv420p"
        vs.time_base = tb
        if codec == "libx264":
            vs.options = {"crf": str(crf)}
        for r in records:
            if r.shape != first.shape or r.dtype != first.dtype:
                continue
            arr = rec.read(r)
            if (w & 1) or (h & 1):
                pad = ((0, h & 1), (0, w & 1)) + (((0, 0),) if arr.ndim == 3 else ())
                arr = np.pad(arr, pad, mode="edge")
            frame = av.VideoFrame.from_ndarray(arr, format=fmt)
            pts = int((r.timestamp_ns - first.timestamp_ns) // 1_000_000)
            frame.pts = max(pts, last_pts + 1)
            frame.time_base = tb
            last_pts = frame.pts
            for p in vs.encode(frame):
                c.mux(p)
            n += 1
        for p in vs.encode():
            c.mux(p)
    return n


# -- the commands ---------------------------------------------------------------------------


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=NAME, got {text!r}")
    a, b = text.split("=", 1)
    return a, b


def _speed(text: str) -> Optional[float]:
    if text == "max":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speed is a factor (1.0) or 'max', not {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("speed must be > 0")
    return v


def add_parsers(sub) -> None:
    p = sub.add_parser("record", help="record streams to a directory (segments + SQLite index); --info, --export")
    p.add_argument("path", nargs="?", help="recording directory (or use --out)")
    p.add_argument("--stream", action="append", default=[], help="stream to record (repeatable)")
    p.add_argument("--out", help="recording directory (created, or appended to)")
    p.add_argument("--every", type=int, default=1, help="keep every Nth frame")
    p.add_argument("--max-fps", type=float, help="keep at most this many frames per second per stream")
    p.add_argument("--segment-mb", type=float, default=1024.0, help="start a new segment file after this many MB")
    p.add_argument("--segment-s", type=float, help="... or after this many seconds")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames per stream")
    p.add_argument("--ref", action="append", default=[], type=_kv, metavar="STREAM=REFSTREAM",
                   help="STREAM's ref_seq points into REFSTREAM (default X.detections=X)")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.add_argument("--info", action="store_true", help="summarise the recording at PATH")
    p.add_argument("--verify", action="store_true", help="with --info: check every frame's CRC")
    p.add_argument("--json", action="store_true", help="with --info: as JSON")
    p.add_argument("--export", metavar="FILE.mp4", help="encode --stream of the recording at PATH to a video")
    p.add_argument("--bgr", action="store_true", help="with --export: frames are BGR")
    p.add_argument("--codec", help="with --export: FFmpeg encoder (default libx264, else mpeg4)")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("replay", help="publish a recording's streams again, original timing and references")
    p.add_argument("path", help="recording directory")
    p.add_argument("--stream", action="append", default=[], help="only this stream (repeatable)")
    p.add_argument("--speed", type=_speed, default=1.0, help="1.0 (real time), a factor, or 'max'")
    p.add_argument("--loop", action="store_true", help="start again at the end")
    p.add_argument("--from", dest="start_s", type=float, help="seconds after the first frame")
    p.add_argument("--to", dest="end_s", type=float, help="seconds after the first frame")
    p.add_argument("--rename", action="append", default=[], type=_kv, metavar="RECORDED=PUBLISHED")
    p.add_argument("--nslots", type=int, default=8)
    p.add_argument("--wait-consumers", type=int, default=0,
                   help="hold the first frame until every stream has this many consumers")
    p.add_argument("--lossless", action="store_true",
                   help="never overwrite a frame a process-all consumer has not taken (go at its pace)")
    p.set_defaults(func=cmd_replay)


def _print_info(info: dict, problems: Optional[List[str]]) -> None:
    print(f"{info['path']}: {info['duration_s']:.3f} s, {info['sessions']} session(s), "
          f"{info['segment_bytes'] / 1e6:.1f} MB in segments")
    for name, s in info["streams"].items():
        shapes = ", ".join(f"{k} ({v})" if len(s["shapes"]) > 1 else k for k, v in s["shapes"].items())
        ref = f", ref_seq -> {s['ref_stream']}" if s["ref_stream"] else ""
        rec = f", {s['recovered']} recovered from segment tails" if s["recovered"] else ""
        print(f"  {name}: {s['frames']} frames, {s['fps']} fps, {s['first_s']}..{s['last_s']} s, "
              f"{s['bytes'] / 1e6:.1f} MB, {shapes}{ref}{rec}")
    if problems is not None:
        print("verify: " + ("every frame checks out" if not problems else "; ".join(problems)))


def cmd_record(args) -> int:
    from ._signals import stop_on_signals

    if args.info or args.export:
        if not args.path:
            raise InvalidArgument("record --info/--export: give the recording directory")
        with Recording(args.path) as rec:
            if args.export:
                names = args.stream or [n for n, s in rec.streams.items() if s.fixed and s.fixed[1] == np.uint8]
                if len(names) != 1:
                    raise InvalidArgument(f"record --export: name the stream with --stream (one of {', '.join(rec.streams)})")
                n = export_mp4(rec, names[0], args.export, codec=args.codec, bgr=args.bgr)
                print(f"{args.export}: {n} frames of {names[0]}")
                return 0
            info = rec.info()
            problems = rec.verify() if args.verify else None
            if args.json:
                if problems is not None:
                    info["problems"] = problems
                print(json.dumps(info, indent=2))
            else:
                _print_info(info, problems)
            return 1 if problems else 0
    out = args.out or args.path
    if not out or not args.stream:
        raise InvalidArgument("record: give --stream NAME (repeatable) and --out DIR")
    recorder = Recorder(out, args.stream, every=args.every, max_fps=args.max_fps,
                        segment_bytes=int(args.segment_mb * 1e6), segment_seconds=args.segment_s,
                        refs=dict(args.ref), max_frames=args.frames, base_dir=args.base_dir,
                        namespace=args.namespace, argv=" ".join(sys.argv))
    tty = sys.stderr.isatty()

    def status(line: str) -> None:
        if tty:
            sys.stderr.write("\r" + line[:200] + "\033[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    stop = threading.Event()
    with stop_on_signals(stop):
        stats = recorder.run(stop, duration=args.duration, status_every=0 if args.quiet else (1.0 if tty else 10.0),
                             status=status)
    if tty and not args.quiet:
        sys.stderr.write("\n")
    for name, s in stats.items():
        print(f"{name}: {s['frames']} frames, {s['bytes'] / 1e6:.1f} MB" +
              (f", {s['missed']} missed" if s["missed"] else "") + (f", {s['overruns']} overrun" if s["overruns"] else ""))
    return 0


def cmd_replay(args) -> int:
    from ._signals import stop_on_signals

    rp = Replayer(args.path, args.stream or None, speed=args.speed, loop=args.loop, start_s=args.start_s,
                  end_s=args.end_s, rename=dict(args.rename), nslots=args.nslots,
                  wait_consumers=args.wait_consumers, lossless=args.lossless, base_dir=args.base_dir,
                  namespace=args.namespace)
    stop = threading.Event()
    t0 = time.monotonic()
    with stop_on_signals(stop):
        n = rp.run(stop)
    el = time.monotonic() - t0
    print(f"replayed {n} frames of {', '.join(rp.names)} in {el:.2f} s ({n / max(el, 1e-9):.1f} frames/s)")
    return 0
