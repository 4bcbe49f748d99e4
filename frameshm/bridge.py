"""The Zenoh bridge: frameshm streams beyond one machine (docs/bridge.md).

    with frameshm.Bridge(listen=["tcp/127.0.0.1:7447"], exports=["cam0"]):       # machine A
        ...
    with frameshm.Bridge(connect=["tcp/A:7447"], imports=["cam0"]):              # machine B
        frameshm.Reader("cam0").wait_latest()   # the producer's seq, timestamp, shape, dtype

A bridge is one Zenoh session carrying any number of streams each way:

* **exporting** a stream, it is an ordinary local consumer (a :class:`~frameshm.Reader`,
  consumer label ``bridge``) that puts each frame it takes, with its metadata, on the key
  ``<prefix>/<name>/frames``;
* **importing** a stream, it is the producer (a :class:`~frameshm.Writer`) of a local
  stream of that name, created on the first frame with the remote stream's layout, and
  recreated when the remote producer restarts (its epoch changes) or a frame outgrows it.
  Each frame keeps the remote seq (gaps are the frames the link dropped, counted by
  readers as skipped), capture timestamp, ``ref_seq``, shape and dtype.

Latest-frame semantics end to end (the default): the exporter takes the newest frame and
puts it (Zenoh's ``CongestionControl.BLOCK``) when its send window has room: importers
acknowledge each frame they receive, and the window (_bridge_window.py) keeps about one
frame waiting in front of the link, whatever the buffers below would take. The frames
produced meanwhile are dropped at the sender (it takes the newest next), never queued; the importer writes what arrives in order
but drops a frame that waited longer than the producer's interval to its successor (a burst
that TCP releases after a retransmission is written whole; a slow importer converges to the
newest frame). ``process_all=True`` instead reads every frame in order and
applies back-pressure through a bounded receive queue: for links that can carry the
stream.

Frames are whole or dropped: every frame travels as one Zenoh message whose attachment
(:data:`HEADER`) states its size, which the importer checks before publishing anything.
Each exporter declares a Zenoh liveliness token while its source stream is producing, so
an importer knows at once when the remote producer, bridge or link is gone: it closes
its local writer (local readers see the producer gone) and says so in the log.

Control bytes flow both ways: the exporter sends the source stream's bytes with every
frame and the importer mirrors them; a byte a local process changes on the imported
stream (e.g. a controller's mode) is sent back and set on the source stream.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._bridge_window import ACK, SendWindow
from ._choices import BRIDGE_ENCODINGS as ENCODINGS, BRIDGE_MODES as MODES, JPEG_SUBSAMPLING  # shared with config.py
from .errors import DriverUnavailable, FrameshmError, InvalidArgument, LeaseLost, ProducerDead, Timeout

log = logging.getLogger("frameshm.bridge")

DEFAULT_LISTEN = "tcp/127.0.0.1:7447"   # loopback only unless told otherwise
WAIT_S = 0.25            # bounded waits: the stop flag is checked at least this often
CONTROL_ECHO_S = 2.0     # how long a control byte sent back waits for the source to echo it
PROCESS_ALL_QUEUE = 8    # frames an importer holds in process-all mode before pushing back
# Latest mode: frames an importer holds while it writes an earlier one. TCP hands frames over in
# bursts after a retransmission (a lost packet holds up everything behind it for a round
# trip); a burst's frames are still whole and in order, so they are written unless the
# importer has fallen behind the producer's pace (see _Importer._next_latest).
LATEST_HOLD = 4

MAGIC = b"FSHB"
VERSION = 1
_ENC_CODES = {name: i for i, name in enumerate(ENCODINGS)}
# The attachment of every frame message (little-endian):
#   magic, version, encoding, dtype code, ndim, flags (1: has ref_seq), 3 pad,
#   source epoch, seq, capture timestamp (sender's CLOCK_MONOTONIC), ref_seq,
#   send time (sender's CLOCK_MONOTONIC), sender's CLOCK_REALTIME - CLOCK_MONOTONIC,
#   decoded payload bytes, exporter instance, sender's boot id,
#   source nslots, source's largest pool (bytes), the source's 8 control bytes,
#   shape (MAX_DIMS uint32, ndim used).
HEADER = struct.Struct(f"<4sBBBBB3xQQQQQqQQ16sII8s{_core.MAX_DIMS}I")
_HEADER_TS = struct.Struct("<Q")
_HEADER_TS_AT = struct.calcsize("<4sBBBBB3xQQ")   # the producer's capture timestamp
_CONTROL = struct.Struct("<BB")   # control byte index, value (importer -> exporter)
_HEADER_EPOCH_SEQ = struct.Struct("<QQ")
_HEADER_EPOCH_AT = struct.calcsize("<4sBBBBB3x")
_HEADER_INSTANCE = struct.Struct("<Q")
_HEADER_INSTANCE_AT = struct.calcsize("<4sBBBBB3xQQQQQqQ")

_CODE_DTYPE = {}


def _dtype_tables():
    from .stream import _CODE_DTYPES, _DTYPE_CODES

    if not _CODE_DTYPE:
        _CODE_DTYPE.update(_CODE_DTYPES)
    return _DTYPE_CODES


class BridgeError(FrameshmError):
    """The bridge cannot run: Zenoh missing, a session that does not open (bad endpoint,
    port taken), or an invalid bridge setting."""


def _zenoh():
    try:
        import zenoh
    except ImportError:
        raise BridgeError("the bridge needs Eclipse Zenoh's Python package: pip install 'frameshm[bridge]'") \
            from None
    return zenoh


def _jpeg():
    try:
        import simplejpeg
    except ImportError:
        raise BridgeError("the jpeg encoding needs simplejpeg (libjpeg-turbo): pip install 'frameshm[bridge]'") \
            from None
    return simplejpeg


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise BridgeError("the zstd encoding needs python-zstandard: pip install 'frameshm[bridge]'") \
            from None
    return zstandard


# zstd level 1: the fast end (hundreds of MB/s per core); tensors with structure (depth
# maps, masks, sparse features) still shrink severalfold, noise does not shrink at all.
ZSTD_LEVEL = 1


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)   # unknown: timestamps are translated through the wall clock


def _clock_offset() -> int:
    return time.time_ns() - time.monotonic_ns()


def parse_spec(spec: str) -> Tuple[str, str]:
    """``NAME[:ENCODING]`` -> (name, encoding)."""
    from .config import STREAM_NAME_MAX, _name

    name, _, enc = spec.partition(":")
    enc = enc or "raw"
    if enc not in ENCODINGS:
        raise BridgeError(f"stream {spec!r}: unknown encoding {enc!r}; known: {', '.join(ENCODINGS)}")
    try:
        _name(STREAM_NAME_MAX)(name)
    except ValueError as exc:
        raise BridgeError(f"stream {spec!r}: {exc}") from None
    return name, enc


class _Stat:
    """Counters of one bridged stream over the metrics window."""

    def __init__(self):
        self.frames = self.bytes = self.drops = 0
        self.window = (time.monotonic_ns(), 0, 0)
        self.latency: deque = deque(maxlen=1024)   # the newest, between two snapshots

    def snapshot(self, now: int) -> dict:
        t0, f0, b0 = self.window
        dt = max(1, now - t0) / 1e9
        self.window = (now, self.frames, self.bytes)
        lat = sorted(self.latency)
        self.latency.clear()
        out = {"frames": self.frames, "drops": self.drops, "fps": round((self.frames - f0) / dt, 2),
               "bytes": self.bytes, "bytes_per_s": int((self.bytes - b0) / dt)}
        if lat:
            out["latency_ms"] = {"median": round(lat[len(lat) // 2], 3), "max": round(lat[-1], 3)}
        return out


@dataclass
class _Export:
    name: str
    encoding: str
    state: str = "waiting"      # waiting (no producer yet) | live | producer-gone
    stat: _Stat = field(default_factory=_Stat)
    window: Optional[SendWindow] = None   # latest mode, while its thread runs


@dataclass
class _Import:
    name: str
    state: str = "waiting"      # waiting (no exporter seen) | live | remote-gone
    stat: _Stat = field(default_factory=_Stat)
    remote_epoch: Optional[int] = None


class Bridge:
    """One Zenoh session bridging streams between machines (module docstring, docs/bridge.md).

    ``listen`` / ``connect``: Zenoh endpoints (``tcp/HOST:PORT``, ``udp/...``, ``tls/...``);
    with neither, the bridge listens on ``tcp/127.0.0.1:7447`` (loopback only).
    ``exports`` / ``imports``: stream names, an export optionally ``NAME:jpeg`` (8-bit
    frames JPEG-compressed on the wire) or ``NAME:zstd`` (lossless, any dtype); default
    ``raw``, bit-exact. ``mode``: Zenoh's
    ``peer`` (default), ``client`` (through a router) or ``router`` (a Zenoh router that
    other bridges connect to as clients; it may bridge streams of its own or none). ``scouting``: find
    peers by UDP multicast on the LAN (off by default). ``zenoh_config``: a Zenoh JSON5
    configuration file (TLS, access control) that the settings above are applied on top
    of. ``metrics``: name of a metrics stream (``frameshm ls``), None for none.
    ``driver``: a ``frameshm driver``'s socket: every bridged stream is then attached through
    that driver (exports read with a consumer lease, imports written with a producer lease
    into the layout of the driver's profile); the metrics stream stays local.
    """

    def __init__(self, listen: Sequence[str] = (), connect: Sequence[str] = (), *,
                 exports: Sequence[str] = (), imports: Sequence[str] = (), key_prefix: str = "frameshm",
                 mode: str = "peer", scouting: bool = False, process_all: bool = False,
                 jpeg_quality: int = 90, jpeg_subsampling: str = "420", consumer: str = "bridge",
                 zenoh_config: Optional[str] = None,
                 metrics: Optional[str] = None, base_dir: Optional[str] = None,
                 namespace: Optional[str] = None, driver: Optional[str] = None):
        if mode not in MODES:
            raise BridgeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not key_prefix or any(c in key_prefix for c in "*$?#") or key_prefix.strip("/") != key_prefix:
            raise BridgeError(f"key_prefix {key_prefix!r}: a Zenoh key without wildcards or outer '/'")
        if not 1 <= int(jpeg_quality) <= 100:
            raise BridgeError(f"jpeg_quality must be 1..100, not {jpeg_quality!r}")
        if jpeg_subsampling not in JPEG_SUBSAMPLING:
            raise BridgeError(f"jpeg_subsampling must be one of {', '.join(JPEG_SUBSAMPLING)}, not {jpeg_subsampling!r}")
        self.exports = [_Export(*parse_spec(s)) for s in exports]
        for spec in imports:
            if ":" in spec:
                raise BridgeError(f"import {spec!r}: an import is a stream name; the encoding is the exporter's "
                                  "choice (--export NAME:ENCODING on the other side)")
        self.imports = [_Import(parse_spec(s)[0]) for s in imports]
        names = [e.name for e in self.exports] + [i.name for i in self.imports]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise BridgeError(f"stream(s) {', '.join(sorted(dup))} named twice: a stream is exported or "
                              "imported once per bridge")
        if any(e.encoding == "jpeg" for e in self.exports):
            _jpeg()   # missing: said now, not by a stream's thread later
        if any(e.encoding == "zstd" for e in self.exports):
            _zstd()
        if not self.exports and not self.imports and mode != "router":
            raise BridgeError("nothing to bridge: give at least one stream to export or import "
                              "(or run it as a router: mode 'router')")
        if mode == "client" and not connect and not scouting:
            raise BridgeError("mode 'client' needs a router to connect to (connect) or scouting")
        self.listen = list(listen) if listen or connect or mode == "client" else [DEFAULT_LISTEN]
        self.connect = list(connect)
        self.prefix = key_prefix
        self.mode = mode
        self.scouting = bool(scouting)
        self.process_all = bool(process_all)
        self.jpeg_quality = int(jpeg_quality)
        self.jpeg_subsampling = jpeg_subsampling
        self.consumer = consumer
        self.zenoh_config = zenoh_config
        self.metrics_name = metrics
        if driver is not None and not os.path.isabs(driver):
            raise BridgeError(f"driver: the absolute path of a frameshm driver's socket, not {driver!r}")
        self.driver = driver
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._session = None
        self._metrics = None
        self._callbacks = 0                        # Zenoh callbacks handed out (see _callback)
        self._callbacks_lock = threading.Lock()
        self._released: "queue.SimpleQueue" = queue.SimpleQueue()   # ... and the threads that ran them
        self._boot = _boot_id()
        self.started_ns = 0
        self.failed: Optional[str] = None   # the stream whose thread failed, if one did

    # -- life cycle -------------------------------------------------------------------

    def _config(self):
        zenoh = _zenoh()
        try:
            conf = zenoh.Config.from_file(self.zenoh_config) if self.zenoh_config else zenoh.Config()
            conf.insert_json5("mode", json.dumps(self.mode))
            conf.insert_json5("listen/endpoints", json.dumps(self.listen))
            conf.insert_json5("connect/endpoints", json.dumps(self.connect))
            conf.insert_json5("scouting/multicast/enabled", json.dumps(self.scouting))
            # Gossip has peers learn each other's endpoints from the peers they meet and
            # connect directly: discovery too, so off unless asked for (links are the ones
            # configured: a relay, a tunnel or a firewall hole stays the path taken).
            conf.insert_json5("scouting/gossip/enabled", json.dumps(self.scouting))
            # Zenoh would carry payloads between two sessions on one host through its own
            # shared memory, bypassing the link: between machines it never can, and on one
            # host (tests, benchmarks, network namespaces) it would hide the link measured.
            conf.insert_json5("transport/shared_memory/enabled", "false")
        except (zenoh.ZError, OSError, ValueError) as exc:
            raise BridgeError(f"zenoh configuration: {exc}") from None
        return conf

    def start(self) -> "Bridge":
        """Opens the Zenoh session and starts one thread per bridged stream."""
        if self._stop.is_set():
            raise BridgeError("this bridge was closed: a new Bridge starts again")
        zenoh = _zenoh()
        conf = self._config()
        # Zenoh's own log (a peer refused for its certificate, a link lost) when RUST_LOG
        # asks for it, e.g. RUST_LOG=warn: silent otherwise, as Zenoh's binding is.
        zenoh.try_init_log_from_env()
        try:
            self._session = zenoh.open(conf)
        except zenoh.ZError as exc:
            raise BridgeError(f"cannot open the Zenoh session (listen {self.listen}, connect {self.connect}): "
                              f"{exc}") from None
        self.started_ns = time.monotonic_ns()
        try:
            if self.metrics_name:
                from .roles import Metrics

                self._metrics = Metrics(self.metrics_name, **self._addr)
            for e in self.exports:
                self._spawn(f"export {e.name}", self._run_export, e)
            for i in self.imports:
                self._spawn(f"import {i.name}", self._run_import, i)
            if self._metrics is not None:
                self._spawn("metrics", self._run_metrics, None)
        except BaseException:
            self.close()
            raise
        log.info("zenoh session %s (%s): listen %s, connect %s, multicast scouting %s; exporting %s, importing %s",
                 self._session.info.zid(), self.mode, self.listen or "-", self.connect or "-",
                 "on" if self.scouting else "off",
                 ", ".join(f"{e.name} ({e.encoding})" for e in self.exports) or "-",
                 ", ".join(i.name for i in self.imports) or "-")
        return self

    def _spawn(self, label: str, target, arg) -> None:
        t = threading.Thread(target=self._guard, args=(label, target, arg), name=f"bridge {label}", daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, label, target, arg) -> None:
        try:
            target(arg)
        except Exception:  # noqa: BLE001 - one stream failing is logged and stops the bridge
            log.exception("%s failed; stopping the bridge", label)
            self.failed = label
            self._stop.set()

    def _callback(self, fn):
        """``fn`` as a Zenoh callback whose release close() can wait for.

        Zenoh runs a Python callback in a thread of its own ("pyo3-closure"), created by
        the thread that declared the subscriber and so a daemon like the bridge's threads:
        the interpreter does not wait for it at exit. Undeclaring ends that thread only
        later, and if the interpreter is finalizing when it takes the GIL back inside
        Zenoh's code, CPython ends it with pthread_exit, whose unwinding through Rust aborts
        the whole process ("FATAL: exception not rethrown", after a clean stop: 1 in ~100
        runs of docs/bridge.md's example on a loaded machine, core dump read). The drop
        hook runs in that thread as its last act; close() joins the thread it names."""
        with self._callbacks_lock:
            self._callbacks += 1
        return _zenoh().handlers.Callback(fn, drop=lambda: self._released.put(threading.current_thread()))

    def _join_callbacks(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._callbacks:
            try:
                t = self._released.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.warning("%d Zenoh callback thread(s) not released within %.0f s", self._callbacks, timeout)
                return
            with self._callbacks_lock:
                self._callbacks -= 1
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _run_metrics(self, _arg) -> None:
        while not self._stop.wait(WAIT_S):
            self._publish_metrics()

    def run(self, stop: threading.Event) -> int:
        """Runs until ``stop`` is set (or a stream's thread fails: then 1), then closes."""
        if self._session is None:
            self.start()
        try:
            while not stop.is_set() and not self._stop.is_set():
                stop.wait(WAIT_S)
        finally:
            self.close()
        return 1 if self.failed else 0

    def close(self) -> None:
        """Stops every stream's thread, closes the local streams it made and the session."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        if self._metrics is not None:   # its thread has ended: the writer is ours again
            self._metrics.close()
            self._metrics = None
        if self._session is not None:
            try:
                self._session.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the zenoh session: %s", exc)
            self._session = None
        self._join_callbacks()

    def __enter__(self) -> "Bridge":
        return self.start() if self._session is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------

    def peers(self) -> List[str]:
        """Zenoh ids of the peers and routers this session is connected to."""
        if self._session is None:
            return []
        info = self._session.info
        return [str(z) for z in list(info.peers_zid()) + list(info.routers_zid())]

    def stats(self) -> dict:
        """The metrics document: per stream direction, state, frames, drops, fps, bytes/s,
        latency; overall fps, bytes/s and drops."""
        now = time.monotonic_ns()
        streams = {}
        for e in self.exports:
            streams[e.name] = {"dir": "export", "state": e.state, "encoding": e.encoding, **e.stat.snapshot(now)}
            peers = e.window.state() if e.window is not None else {}
            if peers:   # the send window: acknowledging importers, the smallest window (frames)
                tight = min(peers.values(), key=lambda p: p["window"])
                streams[e.name].update(importers=len(peers), window=tight["window"], rtt_min_ms=tight["rtt_min_ms"],
                                       rtt_ms=tight["rtt_ms"])
        for i in self.imports:
            streams[i.name] = {"dir": "import", "state": i.state, **i.stat.snapshot(now)}
        doc = {"role": "bridge", "peers": len(self.peers()), "state": ",".join(
            f"{n}:{s['state']}" for n, s in streams.items()),
            "fps": round(sum(s["fps"] for s in streams.values()), 2),
            "bytes_per_s": sum(s["bytes_per_s"] for s in streams.values()),
            "drops": sum(s["drops"] for s in streams.values()), "streams": streams}
        lats = [s["latency_ms"]["median"] for s in streams.values() if "latency_ms" in s]
        if lats:
            doc["latency_ms"] = max(lats)
        return doc

    def _publish_metrics(self) -> None:
        m = self._metrics
        now = time.monotonic_ns()
        if m is not None and m.due(now):
            m.publish(self.stats(), now)

    def _key(self, name: str, what: str) -> str:
        return f"{self.prefix}/{name}/{what}"

    # -- exporting: a local consumer that puts every frame it takes -------------------------

    def _run_export(self, e: _Export) -> None:
        from .admin import stream_info
        from .stream import Reader

        zenoh = _zenoh()
        codes = _dtype_tables()
        s = self._session
        # BLOCK in both modes: a frame is many Zenoh fragments, and DROP discards whatever
        # does not fit the transmit queue, fragments included, so on a link slower than the
        # stream every frame would be cut short and none would arrive. Blocking holds this
        # thread while Zenoh's queue is full; the send window (below) holds it while the
        # kernel's buffers would still take frames. The newest frame is then taken and those
        # in between are dropped here, at the sender (latest mode), or left to the source
        # ring (process-all).
        cc = zenoh.CongestionControl.BLOCK
        pub = s.declare_publisher(self._key(e.name, "frames"), congestion_control=cc,
                                  priority=zenoh.Priority.DATA, express=True)
        jpeg = _jpeg() if e.encoding == "jpeg" else None
        zc = _zstd().ZstdCompressor(level=ZSTD_LEVEL) if e.encoding == "zstd" else None
        reader = Reader(e.name, consumer=self.consumer, spin=False, driver=self.driver, **self._addr)
        # Control bytes sent back by importers are set through a handle of their own, from
        # Zenoh's thread (the reader above is busy waiting in this one).
        control = Reader(e.name, subscribe=False, driver=self.driver, **self._addr)
        control_lock = threading.Lock()

        def on_control(sample):
            raw = sample.payload.to_bytes()
            if len(raw) != _CONTROL.size:
                return
            index, value = _CONTROL.unpack(raw)
            if index < 8:
                with control_lock:
                    control.set_control(index, value)
                log.info("%s: control byte %d set to %d by a remote importer", e.name, index, value)

        ctl_sub = s.declare_subscriber(self._key(e.name, "control"), self._callback(on_control))
        # Latest mode: the next frame is taken when every importer has room for it
        # (_bridge_window.py), not when the kernel's buffers do.
        window = None if self.process_all else SendWindow()
        e.window = window
        ack_sub = None
        if window is not None:
            ack_sub = s.declare_subscriber(self._key(e.name, "ack"),
                                           self._callback(lambda sample: window.on_ack(sample.payload.to_bytes())))
        token = None
        instance = 0
        wait = reader.wait_next if self.process_all else reader.wait_latest
        epoch, nslots, max_bytes = None, 0, 0
        warned_jpeg = False
        try:
            while not self._stop.is_set():
                if window is not None and not window.wait(WAIT_S):
                    continue
                try:
                    f = wait(WAIT_S)
                except Timeout as exc:
                    # Dead, or closed the stream: either way importers must not wait on it.
                    if e.state == "live" and (isinstance(exc, ProducerDead) or reader.producer[0] != "alive"):
                        log.warning("%s: the producer is gone (%s); importers are told", e.name, exc)
                        e.state = "producer-gone"
                        token.undeclare()
                        token = None
                    continue
                if token is None:
                    instance = random.getrandbits(63) | 1
                    token = s.liveliness().declare_token(self._key(e.name, f"exporter/{instance:016x}"))
                    log.info("%s: %s", e.name, "frames flowing" if e.state == "waiting" else "frames flowing again")
                    e.state = "live"
                if f.epoch != epoch:
                    epoch, nslots, max_bytes = f.epoch, 8, f.nbytes
                    try:
                        info = stream_info(e.name, **self._addr)
                        nslots, max_bytes = info["nslots"], max(info["pool_strides"] or [f.nbytes])
                    except FrameshmError as exc:
                        # A driver's stream outside this bridge's base dir / namespace: the
                        # importer sizes its stream by the frames then (or by its own driver).
                        log.debug("%s: layout not readable (%s): announcing %d slots of %d bytes", e.name, exc,
                                  nslots, max_bytes)
                e.stat.drops += f.skipped
                arr = f.array
                enc = e.encoding
                if jpeg is not None and not (arr.dtype == np.uint8 and (arr.ndim == 2 or (
                        arr.ndim == 3 and arr.shape[2] in (1, 3)))):
                    if not warned_jpeg:
                        log.warning("%s: %s %s frames are not 8-bit pictures: sent raw", e.name, arr.shape, arr.dtype)
                        warned_jpeg = True
                    enc = "raw"
                if enc == "jpeg":
                    pic = arr if arr.ndim == 3 else arr[:, :, None]
                    rgb = pic.shape[2] == 3
                    data = jpeg.encode_jpeg(np.ascontiguousarray(pic), quality=self.jpeg_quality,
                                            colorspace="RGB" if rgb else "GRAY",
                                            colorsubsampling=self.jpeg_subsampling if rgb else "Gray")
                elif enc == "zstd":
                    data = zc.compress(np.ascontiguousarray(arr))   # lossless: bit-exact after decode
                else:
                    data = arr.tobytes()
                if not f.valid():
                    e.stat.drops += 1   # overwritten while being copied: never sent torn
                    continue
                shape = tuple(f.shape) + (0,) * (_core.MAX_DIMS - len(f.shape))
                with control_lock:
                    ctl = bytes(control.control(i) for i in range(8))
                ref = f.ref_seq
                hdr = HEADER.pack(MAGIC, VERSION, _ENC_CODES[enc], codes[np.dtype(f.dtype)], len(f.shape),
                                  1 if ref is not None else 0, f.epoch, f.seq, f.timestamp_ns, ref or 0,
                                  time.monotonic_ns(), _clock_offset(), f.nbytes, instance, self._boot,
                                  nslots, max_bytes, ctl, *shape)
                if window is not None:
                    window.reset(instance, f.epoch)
                    window.sending(f.seq)
                pub.put(data, attachment=hdr)
                e.stat.frames += 1
                e.stat.bytes += len(data)
        finally:
            if token is not None:
                token.undeclare()
            ctl_sub.undeclare()
            if ack_sub is not None:
                ack_sub.undeclare()
            pub.undeclare()
            reader.close()
            control.close()

    # -- importing: the producer of a local stream of the remote's frames --------------------

    def _run_import(self, im: _Import) -> None:
        _Importer(self, im).run()


class _Importer:
    def __init__(self, bridge: Bridge, im: _Import):
        self.b = bridge
        self.im = im
        self.name = im.name
        self.cv = threading.Condition()
        self.held: deque = deque()             # undelivered samples, oldest first (latest mode)
        self.fifo: "queue.Queue" = queue.Queue(PROCESS_ALL_QUEUE)
        self.live: Dict[int, bool] = {}        # exporter instance -> token present
        self.gone = set()                      # instances whose token went: their late frames are dropped
        self.events = []                       # liveliness changes for the worker
        self.writer = None
        self.layout = None                     # (nslots, max_bytes) of the local stream
        self.mirror = [None] * 8               # control bytes as the bridge last set them
        self.pending: Dict[int, Tuple[int, float]] = {}   # index -> (value sent back, until)
        self.made = False
        self.jpeg = None
        self.zd = None
        self.refused = 0                       # frames not published in a row (no room, no driver lease)
        self.ack_id = random.getrandbits(64)   # this importer, in the exporter's send window
        self.ack_pub = None

    # Zenoh's threads --------------------------------------------------------------------

    def on_frame(self, sample) -> None:
        att = sample.attachment
        item = (att.to_bytes() if att is not None else b"", sample.payload, time.monotonic_ns())
        self._ack(item[0])
        if self.b.process_all:
            while not self.b._stop.is_set():   # back-pressure: Zenoh holds the link's frames
                try:
                    self.fifo.put(item, timeout=WAIT_S)
                    break
                except queue.Full:
                    continue
            with self.cv:
                self.cv.notify()
            return
        with self.cv:
            self.held.append(item)
            if len(self.held) > LATEST_HOLD:
                self.held.popleft()
                self.im.stat.drops += 1        # newest wins: far behind, the oldest goes
            self.cv.notify()

    def _ack(self, raw: bytes) -> None:
        """Tells the exporter this frame is off the link (its send window): on receipt, not
        on delivery, so that what the window measures is the path, and a frame this side
        drops as stale still frees the room it took."""
        if len(raw) != HEADER.size or raw[:4] != MAGIC:
            return
        epoch, seq = _HEADER_EPOCH_SEQ.unpack_from(raw, _HEADER_EPOCH_AT)
        (instance,) = _HEADER_INSTANCE.unpack_from(raw, _HEADER_INSTANCE_AT)
        try:
            self.ack_pub.put(ACK.pack(self.ack_id, instance, epoch, seq))
        except Exception as exc:  # noqa: BLE001 - a closing session: the exporter's stall rule covers it
            log.debug("%s: acknowledgement not sent: %s", self.name, exc)

    def on_liveliness(self, sample) -> None:
        zenoh = _zenoh()
        try:
            instance = int(str(sample.key_expr).rsplit("/", 1)[-1], 16)
        except ValueError:
            return
        with self.cv:
            self.events.append((instance, sample.kind == zenoh.SampleKind.PUT))
            self.cv.notify()

    # the worker thread ------------------------------------------------------------------

    def run(self) -> None:
        s = self.b._session
        zenoh = _zenoh()
        # DROP: an acknowledgement is 32 bytes on a direction that carries no frames, and
        # this put runs in Zenoh's receiving thread, which must never wait; a lost one is
        # covered by the next (they are cumulative).
        self.ack_pub = s.declare_publisher(self.b._key(self.name, "ack"), congestion_control=zenoh.CongestionControl.DROP,
                                           priority=zenoh.Priority.INTERACTIVE_HIGH, express=True)
        sub = s.declare_subscriber(self.b._key(self.name, "frames"), self.b._callback(self.on_frame))
        lsub = s.liveliness().declare_subscriber(self.b._key(self.name, "exporter/*"),
                                                 self.b._callback(self.on_liveliness), history=True)
        ctl_pub = s.declare_publisher(self.b._key(self.name, "control"), congestion_control=zenoh.CongestionControl.BLOCK,
                                      priority=zenoh.Priority.INTERACTIVE_HIGH, express=True)
        try:
            while not self.b._stop.is_set():
                with self.cv:
                    if not self.held and not self.events and self.fifo.empty():
                        self.cv.wait(WAIT_S)
                    item = self._next_latest()
                    events, self.events = self.events, []
                for instance, alive in events:
                    self._liveliness(instance, alive)
                if item is None:
                    try:
                        item = self.fifo.get_nowait()
                    except queue.Empty:
                        pass
                if item is not None:
                    self._deliver(*item)
                if self.writer is not None:
                    self._send_control_back(ctl_pub)
                    self.writer.heartbeat()
        finally:
            sub.undeclare()
            self.ack_pub.undeclare()
            lsub.undeclare()
            ctl_pub.undeclare()
            self._close_writer(unlink=self.b.driver is None)   # a driver's files are the driver's
            if self.made and self.b.driver is None:
                try:   # closed earlier on a remote's departure: removed unless consumers remain
                    _core.stream_gc(self.name, **self.b._addr)
                except FrameshmError:
                    pass

    def _next_latest(self) -> Optional[tuple]:
        """The held sample to write next (under self.cv): the oldest one, unless it has waited
        here longer than the producer's interval to its successor, which means writing it
        would leave this importer behind the stream's pace; it is dropped then. A burst that
        TCP releases at once is written whole (its frames have barely waited) while a
        persistently slow importer still converges to the newest frame, and no frame waits
        more than one producer interval: latency stays bounded by the link + one frame."""
        now = time.monotonic_ns()
        held = self.held
        while held:
            item = held.popleft()
            if not held:
                return item
            try:
                gap = _HEADER_TS.unpack_from(held[0][0], _HEADER_TS_AT)[0] - _HEADER_TS.unpack_from(
                    item[0], _HEADER_TS_AT)[0]
            except struct.error:
                return item                   # _deliver validates and counts it
            if 0 < gap and now - item[2] <= gap:
                return item
            self.im.stat.drops += 1           # newest wins: a newer one is here and this is late
        return None

    def _liveliness(self, instance: int, alive: bool) -> None:
        if alive:
            self.live[instance] = True
            self.gone.discard(instance)
            return
        self.live.pop(instance, None)
        self.gone.add(instance)
        if not self.live and self.im.state == "live":
            log.warning("%s: the remote exporter is gone (its producer, bridge or the link); "
                        "closing the local stream until it is back", self.name)
            self.im.state = "remote-gone"
            self._close_writer(unlink=False)

    def _close_writer(self, unlink: bool) -> None:
        if self.writer is not None:
            self.writer.close(unlink=unlink)
            self.writer = None
            self.layout = None

    def _deliver(self, raw_hdr: bytes, payload, recv_ns: int) -> None:
        st = self.im.stat
        if len(raw_hdr) != HEADER.size:
            st.drops += 1
            return
        (magic, version, enc, code, ndim, flags, epoch, seq, ts, ref, send_ns, offset, nbytes, instance,
         boot, nslots, max_bytes, ctl, *shape) = HEADER.unpack(raw_hdr)
        _dtype_tables()
        dt = _CODE_DTYPE.get(code)
        if (magic != MAGIC or version != VERSION or dt is None or not 1 <= ndim <= _core.MAX_DIMS
                or enc >= len(ENCODINGS) or nslots < 1 or nslots & (nslots - 1)):
            st.drops += 1
            return
        if instance in self.gone:
            return   # a straggler from an exporter already gone
        shape = tuple(shape[:ndim])
        if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != nbytes:
            st.drops += 1
            return
        data = payload.to_bytes()
        if ENCODINGS[enc] == "jpeg":
            arr = self._decode_jpeg(data, shape)
            if arr is None:
                st.drops += 1
                return
        elif ENCODINGS[enc] == "zstd":
            arr = self._decode_zstd(data, nbytes, dt, shape)
            if arr is None:
                st.drops += 1
                return
        else:
            if len(data) != nbytes:
                st.drops += 1   # a frame is whole or not delivered
                return
            arr = np.frombuffer(data, dt).reshape(shape)
        if boot != self.b._boot or boot == bytes(16):
            # Another machine: its CLOCK_MONOTONIC means nothing here; go through the wall
            # clocks (as good as their synchronisation, NTP/PTP).
            delta = offset - _clock_offset()
            ts, send_ns = max(1, ts + delta), send_ns + delta
        try:
            self._ensure_writer(epoch, seq, nslots, max(max_bytes, nbytes))
        except (DriverUnavailable, LeaseLost) as exc:
            self._refused(seq, exc)
            return
        if self.im.state != "live":
            log.info("%s: %s (remote epoch %d)", self.name,
                     "frames arriving" if self.im.state == "waiting" else "frames arriving again", epoch)
            self.im.state = "live"
        self._mirror_control(ctl)
        w = self.writer
        if seq < w._w.next_seq:
            # Only under a driver (without one the stream is made anew): the remote
            # numbering went back and the driver's stream keeps its own; it carries on.
            seq = None
        try:
            w.publish(arr, timestamp_ns=ts, ref_seq=ref if flags & 1 else None, seq=seq)
        except (InvalidArgument, LeaseLost) as exc:
            self._refused(seq, exc)
            return
        if self.refused:
            log.info("%s: frames published again after %d refused", self.name, self.refused)
            self.refused = 0
        now = time.monotonic_ns()
        st.frames += 1
        st.bytes += len(data)
        st.latency.append((now - ts) / 1e6)

    def _refused(self, seq, exc) -> None:
        self.im.stat.drops += 1
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            log.warning("%s: frame %s not published (%d so far): %s", self.name, seq, self.refused, exc)

    def _decode_zstd(self, data: bytes, nbytes: int, dt, shape) -> Optional[np.ndarray]:
        if self.zd is None:
            self.zd = _zstd().ZstdDecompressor()
        try:
            # bounded by the header's size: a hostile frame cannot make us allocate more
            raw = self.zd.decompress(data, max_output_size=nbytes)
        except Exception:  # noqa: BLE001 - zstandard.ZstdError and friends: a bad frame
            return None
        if len(raw) != nbytes:
            return None
        return np.frombuffer(raw, dt).reshape(shape)

    def _decode_jpeg(self, data: bytes, shape) -> Optional[np.ndarray]:
        if self.jpeg is None:
            self.jpeg = _jpeg()
        gray = len(shape) == 2 or shape[2] == 1
        try:
            arr = self.jpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB")
        except ValueError:
            return None
        if arr.size != int(np.prod(shape)):
            return None
        return arr.reshape(shape)

    def _ensure_writer(self, epoch: int, seq: int, nslots: int, max_bytes: int) -> None:
        from .stream import Writer

        im = self.im
        w = self.writer
        driver = self.b.driver
        if driver is not None:
            # The driver's profile decides the layout: a remote restart is a new lease, not
            # a new layout, and a frame larger than its pools cannot be helped (refused).
            if w is None or im.remote_epoch != epoch:
                if w is not None:
                    log.info("%s: the remote producer restarted (remote epoch %d -> %d): producer lease "
                             "renewed", self.name, im.remote_epoch, epoch)
                    self._close_writer(unlink=False)
                self.writer = Writer(self.name, max_bytes=max_bytes, driver=driver, **self.b._addr)
                self.made = True
                self.layout = (self.writer.nslots, max(stride for _pid, stride in self.writer.pools))
                im.remote_epoch = epoch
                self.mirror = [None] * 8
                log.info("%s: local stream epoch %d through the driver (%d slots, largest pool %d bytes) for "
                         "remote epoch %d", self.name, self.writer.epoch, self.layout[0], self.layout[1], epoch)
            return
        back = w is not None and seq < w._w.next_seq
        if w is not None and im.remote_epoch == epoch and max_bytes <= self.layout[1] and not back:
            return
        if w is not None:
            why = ("the remote producer restarted" if im.remote_epoch != epoch else
                   "the remote stream was made anew" if back else "a frame larger than the local stream")
            log.info("%s: %s (remote epoch %d -> %d): local stream recreated", self.name, why,
                     im.remote_epoch, epoch)
            # Sequence numbers carry on across a local restart; a remote numbering that
            # went back (its stream was removed and made anew) needs a stream made anew.
            self._close_writer(unlink=back)
        self.writer = Writer(self.name, max_bytes=max_bytes, nslots=nslots, **self.b._addr)
        if seq < self.writer._w.next_seq:
            # Left by an earlier writer (this bridge's, closed when the remote went away).
            self.writer.close(unlink=True)
            self.writer = Writer(self.name, max_bytes=max_bytes, nslots=nslots, **self.b._addr)
        self.made = True
        self.layout = (nslots, max_bytes)
        im.remote_epoch = epoch
        self.mirror = [None] * 8
        log.info("%s: local stream epoch %d (%d slots of %d bytes) for remote epoch %d", self.name,
                 self.writer.epoch, nslots, max_bytes, epoch)

    def _mirror_control(self, ctl: bytes) -> None:
        w = self.writer
        now = time.monotonic()
        for i, v in enumerate(ctl):
            pend = self.pending.get(i)
            if pend is not None:
                if v != pend[0] and now < pend[1]:
                    continue   # the source has not echoed our write yet: keep the local value
                del self.pending[i]
            if self.mirror[i] != v:
                if w.control(i) != v:
                    w.set_control(i, v)
                self.mirror[i] = v

    def _send_control_back(self, pub) -> None:
        w = self.writer
        for i in range(8):
            if self.mirror[i] is None:
                continue
            v = w.control(i)
            if v != self.mirror[i] and self.pending.get(i, (None,))[0] != v:
                pub.put(_CONTROL.pack(i, v))
                self.pending[i] = (v, time.monotonic() + CONTROL_ECHO_S)
                self.mirror[i] = v
                log.info("%s: control byte %d = %d written here, sent to the source", self.name, i, v)


__all__ = ["Bridge", "BridgeError", "ENCODINGS", "HEADER", "DEFAULT_LISTEN", "parse_spec"]
