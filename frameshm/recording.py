"""Recordings of streams on disk: the layout, the recorder and the reader.

A recording is a directory (layout in docs/recording.md):

    run1/
      recording.sqlite              the manifest: sessions, streams, segments, frame index
      cam0/seg-000001.fsr           segment files: self-describing frame records
      cam0.detections/seg-000002.fsr

Every frame is one record in a segment file of its stream: a 64-byte-aligned header (magic,
seq, capture/publish/record timestamps, ref_seq, dtype, shape, payload size, CRC32 over
header and payload) followed by the frame's bytes exactly as the producer wrote them. The
manifest indexes every record (stream, seq, timestamps, ref_seq, segment, offset), committed
a few times a second. Segment records are written with one ``writev`` each, straight from
the shared-memory view (the frame is checked untorn after the write, and the record cut off
again if the producer overwrote it meanwhile), so a recorder killed with SIGKILL leaves
every record it wrote complete on disk except possibly the last; the reader finds records
the manifest had not indexed yet by scanning the segment tails (CRC-checked), and the next
recorder appending to the directory indexes them for good.

All streams are recorded on one clock: the producers' CLOCK_MONOTONIC capture timestamps
(the machine's), plus the recorder's own CLOCK_MONOTONIC when it took each frame; each
session stores CLOCK_REALTIME - CLOCK_MONOTONIC so times convert to wall-clock.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import FrameshmError, InvalidArgument, StreamNotFound, Timeout

log = logging.getLogger("frameshm.record")

MANIFEST = "recording.sqlite"
FORMAT_VERSION = 1
SEGMENT_MAGIC = b"FSHMSEG1"
SEGMENT_HEADER = 64           # bytes before the first record of a segment file
RECORD_MAGIC = b"FSRC"
ALIGN = 64                    # records and payloads start on 64-byte boundaries
# magic, header_len, seq, timestamp_ns, publish_ns, recorded_ns, ref_seq (-1: none),
# nbytes, dtype (numpy str, NUL-padded), ndim, crc32; then ndim u64 dims, zero padding
RECORD = struct.Struct("<4sIQqqqqQ8sII")
CRC_OFFSET = RECORD.size - 4
MAX_NDIM = 16


class RecordingError(FrameshmError):
    """A recording directory is missing, not a recording, or damaged beyond what the
    reader can skip."""


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_header(seq: int, ts: int, pub: int, rec: int, ref_seq: Optional[int], dtype: np.dtype,
                  shape: Tuple[int, ...], payload) -> bytes:
    """The record header for ``payload`` (any buffer), CRC included."""
    dstr = dtype.str.encode()
    hlen = _pad(RECORD.size + 8 * len(shape))
    nbytes = memoryview(payload).nbytes
    head = bytearray(hlen)
    RECORD.pack_into(head, 0, RECORD_MAGIC, hlen, seq, ts, pub, rec, -1 if ref_seq is None else ref_seq,
                     nbytes, dstr, len(shape), 0)
    struct.pack_into(f"<{len(shape)}Q", head, RECORD.size, *shape)
    crc = zlib.crc32(payload, zlib.crc32(head))
    struct.pack_into("<I", head, CRC_OFFSET, crc)
    return bytes(head)


@dataclass
class Record:
    """One frame's index entry (from the manifest or a segment scan)."""

    stream: str
    seq: int
    timestamp_ns: int
    publish_ns: int
    recorded_ns: int
    ref_seq: Optional[int]
    dtype: np.dtype
    shape: Tuple[int, ...]
    nbytes: int
    path: str        # segment file, absolute
    offset: int      # of the payload in it
    recovered: bool = False  # found by scanning a segment, not (yet) in the manifest


def _decode_header(buf: bytes) -> Optional[Tuple]:
    """The fields of a record header, or None if ``buf`` does not start with a sane one."""
    if len(buf) < RECORD.size:
        return None
    magic, hlen, seq, ts, pub, rec, ref, nbytes, dstr, ndim, crc = RECORD.unpack_from(buf, 0)
    if magic != RECORD_MAGIC or ndim > MAX_NDIM or hlen != _pad(RECORD.size + 8 * ndim) or len(buf) < hlen:
        return None
    shape = struct.unpack_from(f"<{ndim}Q", buf, RECORD.size)
    try:
        dtype = np.dtype(dstr.rstrip(b"\0").decode())
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
        return None
    return hlen, seq, ts, pub, rec, (None if ref < 0 else ref), nbytes, dtype, tuple(shape), crc


def scan_segment(path: str, stream: str, start: int = SEGMENT_HEADER) -> Tuple[List[Record], int]:
    """Records in ``path`` from ``start``, each CRC-checked, up to the first incomplete or
    damaged one (a record cut short by a kill). Returns them and the end offset."""
    out: List[Record] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = start
        while pos + RECORD.size <= size:
            f.seek(pos)
            head = f.read(_pad(RECORD.size + 8 * MAX_NDIM))
            fields = _decode_header(head)
            if fields is None:
                break
            hlen, seq, ts, pub, rec, ref, nbytes, dtype, shape, crc = fields
            if pos + hlen + nbytes > size:
                break
            f.seek(pos + hlen)
            payload = f.read(nbytes)
            zeroed = bytearray(head[:hlen])
            struct.pack_into("<I", zeroed, CRC_OFFSET, 0)
            if zlib.crc32(payload, zlib.crc32(zeroed)) != crc:
                break
            out.append(Record(stream, seq, ts, pub, rec, ref, dtype, shape, nbytes, path, pos + hlen, True))
            pos += _pad(hlen + nbytes)
    return out, pos


# -- the manifest ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, started_ns INTEGER NOT NULL, realtime_offset_ns INTEGER NOT NULL,
    started_wall TEXT NOT NULL, ended_ns INTEGER, argv TEXT);
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, ref_stream TEXT);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL REFERENCES streams(id),
    session_id INTEGER NOT NULL REFERENCES sessions(id), path TEXT NOT NULL,
    created_ns INTEGER NOT NULL, closed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS frames (
    stream_id INTEGER NOT NULL, seq INTEGER NOT NULL, timestamp_ns INTEGER NOT NULL,
    publish_ns INTEGER NOT NULL, recorded_ns INTEGER NOT NULL, ref_seq INTEGER,
    segment_id INTEGER NOT NULL, offset INTEGER NOT NULL, nbytes INTEGER NOT NULL,
    dtype TEXT NOT NULL, shape TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS frames_by_time ON frames (stream_id, timestamp_ns);
CREATE INDEX IF NOT EXISTS frames_by_segment ON frames (segment_id, offset);
"""


def _connect(root: str, create: bool) -> sqlite3.Connection:
    path = os.path.join(root, MANIFEST)
    if not create and not os.path.exists(path):
        raise RecordingError(f"{root} is not a frameshm recording (no {MANIFEST})")
    try:
        if create:
            os.makedirs(root, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', 'frameshm-recording')")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(FORMAT_VERSION),))
            db.commit()
        else:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        version = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
    except sqlite3.Error as exc:
        raise RecordingError(f"{path}: {exc}") from None
    if version is None or int(version[0]) != FORMAT_VERSION:
        raise RecordingError(f"{path}: recording format {version and version[0]!r}, this frameshm reads {FORMAT_VERSION}")
    return db


def _index_rows(db: sqlite3.Connection, root: str) -> Tuple[Dict[str, List[Record]], Dict[int, Tuple[str, str]]]:
    streams = {sid: name for sid, name in db.execute("SELECT id, name FROM streams")}
    segs = {sid: (streams[st], os.path.join(root, p))
            for sid, st, p in db.execute("SELECT id, stream_id, path FROM segments")}
    # Segment files the manifest does not know yet: created just before the recorder died,
    # their row not committed. Their number is their id; they are scanned like tails.
    known = {path for _st, path in segs.values()}
    for name in streams.values():
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            path = os.path.join(d, f)
            if f.startswith("seg-") and f.endswith(".fsr") and f[4:-4].isdigit() and path not in known:
                segs.setdefault(int(f[4:-4]), (name, path))
    out: Dict[str, List[Record]] = {name: [] for name in streams.values()}
    dtypes: Dict[str, np.dtype] = {}
    q = ("SELECT stream_id, seq, timestamp_ns, publish_ns, recorded_ns, ref_seq, segment_id, offset, nbytes, "
         "dtype, shape FROM frames ORDER BY segment_id, offset")
    for st, seq, ts, pub, rec, ref, seg, off, nb, dstr, shp in db.execute(q):
        dt = dtypes.get(dstr) or dtypes.setdefault(dstr, np.dtype(dstr))
        out[streams[st]].append(Record(streams[st], seq, ts, pub, rec, ref, dt, tuple(json.loads(shp)), nb,
                                       segs[seg][1], off))
    return out, segs


def _recover(root: str, index: Dict[str, List[Record]], segs: Dict[int, Tuple[str, str]]) -> List[Record]:
    """Records present in the segments but not (yet) in the manifest."""
    last_end: Dict[str, int] = {}
    for recs in index.values():
        for r in recs:
            last_end[r.path] = max(last_end.get(r.path, 0), r.offset + r.nbytes)
    found: List[Record] = []
    for _sid, (stream, path) in sorted(segs.items()):
        if not os.path.exists(path):
            continue
        start = _pad(last_end[path]) if path in last_end else SEGMENT_HEADER
        if os.path.getsize(path) > start:
            recs, _ = scan_segment(path, stream, start)
            found.extend(recs)
    return found


# -- reading --------------------------------------------------------------------------------


@dataclass
class StreamSummary:
    name: str
    frames: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    shapes: Dict[str, int] = field(default_factory=dict)   # "1080x1920x3 uint8" -> count
    ref_stream: Optional[str] = None
    recovered: int = 0

    @property
    def fixed(self) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
        return None if len(self.shapes) != 1 else self._fixed

    _fixed: Optional[Tuple[Tuple[int, ...], np.dtype]] = None


class Recording:
    """A recording directory, read-only: ``Recording("run1/")``.

    ``streams`` summarises each stream; ``records(...)`` lists index entries in timestamp
    order (across streams: one clock); ``read(record)`` / ``read_into(record, out)`` load a
    frame's bytes, ``frames(...)`` yields (record, array) pairs. Records the recorder wrote but had not indexed when it died are found by
    scanning the segment tails (``Record.recovered``)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise RecordingError(f"{path}: no such recording directory")
        db = _connect(self.path, create=False)
        try:
            index, segs = _index_rows(db, self.path)
            self.refs = dict(db.execute("SELECT name, ref_stream FROM streams"))
            self.sessions = [dict(zip(("id", "started_ns", "realtime_offset_ns", "started_wall", "ended_ns"), row))
                             for row in db.execute("SELECT id, started_ns, realtime_offset_ns, started_wall, "
                                                   "ended_ns FROM sessions ORDER BY id")]
        except sqlite3.Error as exc:
            raise RecordingError(f"{self.path}/{MANIFEST}: {exc}") from None
        finally:
            db.close()
        self.recovered = _recover(self.path, index, segs)
        for r in self.recovered:
            index.setdefault(r.stream, []).append(r)
        self._by_stream = {k: sorted(v, key=lambda r: r.timestamp_ns) for k, v in index.items()}
        self.streams: Dict[str, StreamSummary] = {}
        for name, recs in self._by_stream.items():
            s = StreamSummary(name, ref_stream=self.refs.get(name))
            for r in recs:
                s.frames += 1
                s.bytes += r.nbytes
                key = f"{'x'.join(map(str, r.shape))} {r.dtype.name}"
                s.shapes[key] = s.shapes.get(key, 0) + 1
                s.recovered += r.recovered
            if recs:
                s.first_ns, s.last_ns = recs[0].timestamp_ns, recs[-1].timestamp_ns
                s._fixed = (recs[0].shape, recs[0].dtype)
            self.streams[name] = s
        self._fds: Dict[str, int] = {}

    @property
    def start_ns(self) -> int:
        firsts = [s.first_ns for s in self.streams.values() if s.frames]
        return min(firsts) if firsts else 0

    @property
    def end_ns(self) -> int:
        return max((s.last_ns for s in self.streams.values() if s.frames), default=0)

    def records(self, streams: Optional[Sequence[str]] = None, start_s: Optional[float] = None,
                end_s: Optional[float] = None) -> List[Record]:
        """Index entries of ``streams`` (default all) in timestamp order, optionally only
        those from ``start_s`` to ``end_s`` seconds after the recording's first frame."""
        names = list(self.streams) if streams is None else list(streams)
        for n in names:
            if n not in self.streams:
                raise StreamNotFound(f"{self.path} holds no stream {n!r} (it has: {', '.join(self.streams)})")
        lo = self.start_ns + int(start_s * 1e9) if start_s is not None else None
        hi = self.start_ns + int(end_s * 1e9) if end_s is not None else None
        out = [r for n in names for r in self._by_stream[n]
               if (lo is None or r.timestamp_ns >= lo) and (hi is None or r.timestamp_ns <= hi)]
        out.sort(key=lambda r: (r.timestamp_ns, r.stream))
        return out

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise RecordingError(f"segment {path}: {exc}") from None
        return fd

    def read_into(self, rec: Record, out: np.ndarray) -> None:
        """The frame's bytes straight into ``out`` (C-contiguous, rec.nbytes bytes)."""
        if out.nbytes != rec.nbytes:
            raise InvalidArgument(f"buffer of {out.nbytes} bytes for a {rec.nbytes}-byte frame")
        if rec.nbytes == 0:
            return
        mv = memoryview(out).cast("B")
        if mv.nbytes != rec.nbytes:
            raise InvalidArgument(f"buffer of {mv.nbytes} bytes for a {rec.nbytes}-byte frame")
        got = os.preadv(self._fd(rec.path), [mv], rec.offset)
        if got != rec.nbytes:
            raise RecordingError(f"{rec.path}: frame {rec.seq} at {rec.offset} is cut short ({got} of {rec.nbytes} bytes)")

    def read(self, rec: Record) -> np.ndarray:
        """The frame as a new array of its recorded shape and dtype."""
        out = np.empty(rec.shape, rec.dtype)
        self.read_into(rec, out)
        return out

    def frames(self, streams: Optional[Sequence[str]] = None, start_s: Optional[float] = None,
               end_s: Optional[float] = None) -> Iterator[Tuple[Record, np.ndarray]]:
        """(record, array) pairs in timestamp order, as :meth:`records` selects them."""
        for r in self.records(streams, start_s, end_s):
            yield r, self.read(r)

    def verify(self) -> List[str]:
        """Checks every record's CRC against its segment; the problems found."""
        problems = []
        by_seg: Dict[str, List[Record]] = {}
        for recs in self._by_stream.values():
            for r in recs:
                by_seg.setdefault(r.path, []).append(r)
        for path, recs in by_seg.items():
            if not os.path.exists(path):
                problems.append(f"{path}: missing")
                continue
            stream = recs[0].stream
            found, _ = scan_segment(path, stream)
            good = {(r.offset, r.seq) for r in found}
            bad = [r for r in recs if (r.offset, r.seq) not in good]
            if bad:
                problems.append(f"{path}: {len(bad)} record(s) fail their check, first seq {bad[0].seq}")
        return problems

    def info(self) -> dict:
        """A JSON-able summary (``frameshm record --info``)."""
        dur = (self.end_ns - self.start_ns) / 1e9
        seg_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.path) for f in fs
                        if f.endswith(".fsr"))
        streams = {}
        for n, s in self.streams.items():
            span = (s.last_ns - s.first_ns) / 1e9
            streams[n] = {"frames": s.frames, "bytes": s.bytes, "fps": round((s.frames - 1) / span, 2) if span > 0 else 0.0,
                          "first_s": round((s.first_ns - self.start_ns) / 1e9, 3),
                          "last_s": round((s.last_ns - self.start_ns) / 1e9, 3), "shapes": s.shapes,
                          "ref_stream": s.ref_stream, "recovered": s.recovered}
        return {"path": self.path, "format_version": FORMAT_VERSION, "sessions": len(self.sessions),
                "duration_s": round(dur, 3), "segment_bytes": seg_bytes,
                "recovered_frames": len(self.recovered), "streams": streams}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- recording ------------------------------------------------------------------------------


class _StreamRecorder(threading.Thread):
    """Reads one stream (process-all) and appends its frames to segment files."""

    def __init__(self, owner: "Recorder", name: str, stream_id: int):
        super().__init__(name=f"record-{name}", daemon=True)
        self.owner, self.stream, self.stream_id = owner, name, stream_id
        self.frames = 0        # recorded
        self.bytes = 0
        self.seen = 0          # received (before every/max_fps)
        self.missed = 0        # lost before we got them (the producer lapped us)
        self.overruns = 0      # overwritten while being written: cut off again
        self.error: Optional[BaseException] = None
        self._fd = -1
        self._seg_id = 0
        self._seg_bytes = 0
        self._seg_started = 0.0
        self._pos = 0
        self._next_due = 0

    def _rotate(self) -> None:
        self._close_segment()
        o = self.owner
        seg_id = o._new_segment_id()
        rel = os.path.join(self.stream, f"seg-{seg_id:06d}.fsr")
        path = os.path.join(o.path, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        head = bytearray(SEGMENT_HEADER)
        head[:8] = SEGMENT_MAGIC
        struct.pack_into("<II", head, 8, FORMAT_VERSION, SEGMENT_HEADER)
        os.write(fd, head)
        self._fd, self._seg_id, self._pos = fd, seg_id, SEGMENT_HEADER
        self._seg_bytes, self._seg_started = 0, time.monotonic()
        o._queue_op(("segment", seg_id, self.stream_id, rel, time.monotonic_ns()))

    def _close_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self.owner._queue_op(("closed", self._seg_id))
            self._fd = -1

    def _keep(self, ts: int) -> bool:
        o = self.owner
        self.seen += 1
        if o.every > 1 and (self.seen - 1) % o.every:
            return False
        if o.max_fps:
            period = int(1e9 / o.max_fps)
            if ts < self._next_due - period // 10:
                return False
            self._next_due = self._next_due + period if ts - self._next_due < period else ts + period
        return True

    def _write(self, frame) -> bool:
        """Appends ``frame``; False if it was overwritten meanwhile (cut off again)."""
        o = self.owner
        if self._fd < 0 or self._seg_bytes >= o.segment_bytes or (
                o.segment_seconds and time.monotonic() - self._seg_started >= o.segment_seconds):
            self._rotate()
        arr = frame.array
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        payload = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
        rec_ns = time.monotonic_ns()
        head = encode_header(frame.seq, frame.timestamp_ns, frame.publish_ns, rec_ns, frame.ref_seq,
                             arr.dtype, arr.shape, payload)
        pad = _pad(len(head) + payload.nbytes) - len(head) - payload.nbytes
        bufs = [head, payload, bytes(pad)]
        start = self._pos
        total = len(head) + payload.nbytes + pad
        done = os.writev(self._fd, bufs)
        while done < total:  # a short write (rare): the rest
            rest = b"".join(bytes(b) for b in bufs)[done:]
            done += os.write(self._fd, rest)
        if not frame.valid():
            # The producer overwrote the slot while we copied it: the record may be torn.
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
            self.overruns += 1
            return False
        self._pos += total
        self._seg_bytes += total
        self.frames += 1
        self.bytes += payload.nbytes
        o._queue_op(("frame", self.stream_id, frame.seq, frame.timestamp_ns, frame.publish_ns, rec_ns,
                     frame.ref_seq, self._seg_id, start + len(head), payload.nbytes, arr.dtype.str,
                     json.dumps(list(arr.shape))))
        return True

    def run(self) -> None:
        from .stream import Reader

        o = self.owner
        try:
            r = None
            while r is None and not o._stop.is_set():
                try:
                    r = Reader(self.stream, consumer=f"record-{os.getpid()}", spin=False, **o._addr)
                except StreamNotFound:
                    o._stop.wait(0.2)
            if r is None:
                return
            with r:
                catch_up = False
                while not o._stop.is_set():
                    try:
                        # Process-all; but after an overrun the recorder is a whole ring
                        # behind, reading the slot the producer writes next: it jumps to the
                        # newest frame once (the ones between count as missed) rather than
                        # writing and cutting off one doomed frame after another.
                        f = r.wait_latest(0.2) if catch_up else r.wait_next(0.2)
                    except Timeout:
                        continue
                    self.missed += f.skipped
                    if not self._keep(f.timestamp_ns):
                        continue
                    catch_up = not self._write(f)
                    if o.max_frames and self.frames >= o.max_frames:
                        break
        except BaseException as exc:  # noqa: BLE001 - reported by Recorder.run
            self.error = exc
        finally:
            self._close_segment()


class Recorder:
    """Records streams into a recording directory (created, or appended to).

    ``Recorder("run1/", ["cam0", "cam0.detections"]).run(stop)`` records every frame of
    both until ``stop`` is set (or ``duration`` seconds, or ``max_frames`` per stream);
    ``every=N`` keeps every Nth frame, ``max_fps`` at most that rate. Segment files rotate
    at ``segment_bytes`` and, if given, ``segment_seconds``. ``refs`` names the stream a
    stream's ``ref_seq`` points into (default: ``X.detections`` -> ``X`` when both are
    recorded), which replay needs to keep the references right."""

    def __init__(self, path: str, streams: Sequence[str], *, every: int = 1, max_fps: Optional[float] = None,
                 segment_bytes: int = 1 << 30, segment_seconds: Optional[float] = None,
                 refs: Optional[Dict[str, str]] = None, max_frames: int = 0,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None, argv: Optional[str] = None):
        if not streams:
            raise InvalidArgument("record: name at least one stream")
        if len(set(streams)) != len(streams):
            raise InvalidArgument("record: a stream is named twice")
        if every < 1 or (max_fps is not None and not max_fps > 0) or segment_bytes < 1 or (
                segment_seconds is not None and not segment_seconds > 0) or max_frames < 0:
            raise InvalidArgument("record: every >= 1, max_fps > 0, segment size/seconds > 0, max_frames >= 0")
        self.path = os.path.abspath(path)
        self.every, self.max_fps, self.max_frames = every, max_fps, max_frames
        self.segment_bytes, self.segment_seconds = segment_bytes, segment_seconds
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        refs = dict(refs or {})
        for s in streams:
            if s.endswith(".detections") and s[: -len(".detections")] in streams:
                refs.setdefault(s, s[: -len(".detections")])
        self._stop = threading.Event()
        self._ops: List[tuple] = []
        self._lock = threading.Lock()
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RecordingError(f"{path} exists and is not a directory")
        if os.path.isdir(self.path) and os.listdir(self.path) and not os.path.exists(os.path.join(self.path, MANIFEST)):
            raise RecordingError(f"{path} is a non-empty directory but not a recording")
        self._db = _connect(self.path, create=True)
        self.indexed_recovered = self._index_recovered()
        db = self._db
        cur = db.execute("INSERT INTO sessions (started_ns, realtime_offset_ns, started_wall, argv) VALUES (?,?,?,?)",
                         (time.monotonic_ns(), time.time_ns() - time.monotonic_ns(),
                          time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv))
        self.session_id = cur.lastrowid
        ids = {}
        for s in streams:
            db.execute("INSERT OR IGNORE INTO streams (name, ref_stream) VALUES (?, ?)", (s, refs.get(s)))
            if refs.get(s):
                db.execute("UPDATE streams SET ref_stream=? WHERE name=?", (refs[s], s))
            ids[s] = db.execute("SELECT id FROM streams WHERE name=?", (s,)).fetchone()[0]
        self._next_seg = max(db.execute("SELECT max(id) FROM segments").fetchone()[0] or 0, self._max_seg_on_disk) + 1
        db.commit()
        self.recorders = [_StreamRecorder(self, s, ids[s]) for s in streams]
        self.started = time.monotonic()

    def _index_recovered(self) -> int:
        """Indexes the records a killed recorder left unindexed, before appending."""
        index, segs = _index_rows(self._db, self.path)
        self._max_seg_on_disk = max(segs, default=0)  # new segments are numbered past every file
        found = _recover(self.path, index, segs)
        if not found:
            return 0
        seg_of = {path: sid for sid, (_s, path) in segs.items()}
        sid_of = dict(self._db.execute("SELECT name, id FROM streams"))
        in_manifest = {row[0] for row in self._db.execute("SELECT id FROM segments")}
        session = self._db.execute("SELECT max(id) FROM sessions").fetchone()[0] or 0
        self._db.executemany(
            "INSERT INTO segments (id, stream_id, session_id, path, created_ns, closed) VALUES (?,?,?,?,0,1)",
            [(sid, sid_of[st], session, os.path.relpath(path, self.path)) for sid, (st, path) in sorted(segs.items())
             if sid not in in_manifest and any(r.path == path for r in found)])
        self._db.executemany(
            "INSERT INTO frames VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(sid_of[r.stream], r.seq, r.timestamp_ns, r.publish_ns, r.recorded_ns, r.ref_seq, seg_of[r.path],
              r.offset, r.nbytes, r.dtype.str, json.dumps(list(r.shape))) for r in found])
        self._db.commit()
        log.info("indexed %d frame(s) a previous recorder wrote but had not indexed", len(found))
        return len(found)

    def _new_segment_id(self) -> int:
        with self._lock:
            sid = self._next_seg
            self._next_seg += 1
            return sid

    def _queue_op(self, op: tuple) -> None:
        with self._lock:
            self._ops.append(op)

    def _commit(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        if not ops:
            return
        db = self._db
        for op in ops:
            kind = op[0]
            if kind == "frame":
                db.execute("INSERT INTO frames VALUES (?,?,?,?,?,?,?,?,?,?,?)", op[1:])
            elif kind == "segment":
                db.execute("INSERT INTO segments (id, stream_id, session_id, path, created_ns) VALUES (?,?,?,?,?)",
                           (op[1], op[2], self.session_id, op[3], op[4]))
            elif kind == "closed":
                db.execute("UPDATE segments SET closed=1 WHERE id=?", (op[1],))
        db.commit()

    def status(self) -> str:
        """One line: per stream, frames, rate and bytes so far."""
        el = max(1e-6, time.monotonic() - self.started)
        parts = []
        for r in self.recorders:
            extra = "".join(f" {k} {v}" for k, v in (("missed", r.missed), ("overruns", r.overruns)) if v)
            parts.append(f"{r.stream}: {r.frames} frames {r.frames / el:.1f} fps {r.bytes / 1e6:.1f} MB{extra}")
        return f"[{el:.0f}s] " + " | ".join(parts)

    def stats(self) -> Dict[str, dict]:
        return {r.stream: {"frames": r.frames, "bytes": r.bytes, "seen": r.seen, "missed": r.missed,
                           "overruns": r.overruns} for r in self.recorders}

    def run(self, stop: Optional[threading.Event] = None, duration: Optional[float] = None,
            status_every: float = 0.0, status=None) -> Dict[str, dict]:
        """Records until ``stop`` is set, ``duration`` passes or every stream has
        ``max_frames``; returns :meth:`stats`. ``status(line)`` is called every
        ``status_every`` seconds."""
        for r in self.recorders:
            r.start()
        next_status = time.monotonic() + status_every
        waiter = stop if stop is not None else threading.Event()
        try:
            while True:
                if stop is not None and stop.is_set():
                    break
                if duration is not None and time.monotonic() - self.started >= duration:
                    break
                if not any(r.is_alive() for r in self.recorders):
                    break
                waiter.wait(0.1)
                self._commit()
                if status and status_every and time.monotonic() >= next_status:
                    status(self.status())
                    next_status += status_every
        finally:
            self._stop.set()
            for r in self.recorders:
                r.join(10)
            self._commit()
            self._db.execute("UPDATE sessions SET ended_ns=? WHERE id=?", (time.monotonic_ns(), self.session_id))
            self._db.commit()
            # A finished recording's manifest is one self-contained file again (no -wal/-shm
            # beside it), readable from read-only media; the next recorder turns WAL back on.
            try:
                self._db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.Error:  # a reader holds it open: the WAL stays, equally valid
                pass
            self._db.close()
        errors = [r.error for r in self.recorders if r.error is not None]
        if errors:
            err = errors[0]
            if isinstance(err, FrameshmError):
                raise err
            raise RecordingError(f"recording {self.path}: {type(err).__name__}: {err}") from err
        return self.stats()

