"""Gateway: the frames stream as JPEG over WebSocket, and a live page to watch it.

    frames stream ──wait_next──▶ [frame thread] JPEG (libjpeg-turbo via simplejpeg)
                                      │ call_soon_threadsafe
                                      ▼
                  [asyncio loop] broadcast ──▶ per-client deque(maxlen=client_queue) ──▶ sender task ──▶ ws

* Process-all: the frame thread takes every frame of the frames stream in order
  (``Reader.wait_next``), encodes it once and hands the bytes to the event loop, which
  appends them to every client's small bounded queue. A client that reads slowly (or not
  at all) only blocks its own sender task: its queue drops the oldest frame (counted as
  the client's ``dropped``), the gateway and the other clients are not slowed down, and
  memory stays bounded (``client_queue`` frames plus the socket buffers per client).
  Frames with no client connected are taken but not encoded.
* Each binary WebSocket message is ``u32 little-endian header length | JSON header |
  JPEG``; the header carries the frame's seq, capture time (CLOCK_MONOTONIC and the wall
  clock equivalent, for the page's latency), size, the frames stream's mode and the
  controller's state (control bytes 0 and 1, read together per frame) and the newest
  detections (passive handle on the detections stream, boxes in camera pixels) with the
  seq and capture time of the frame they were computed from and their age relative to
  this frame: a slow detector's boxes still go out, the page marks them stale or draws
  them on their own frame (docs/pipeline.md, "Timing").
  Text messages are JSON status documents (the roles' metrics) about twice a second.
* HTTP on the same port serves the page (``frameshm/web``: ``/``, ``/app.js``,
  ``/style.css``; ``/favicon.ico`` is an empty 204); ``/ws`` is the WebSocket. Binds
  127.0.0.1 by default.
* Access: ``/`` and ``/ws`` need ``?token=...``. By default (``token = "auto"``) the
  token is a new random one each run, shown in the URL the gateway logs and publishes in
  its metrics (``url``), which ``frameshm run`` prints, as Jupyter does: a loopback bind
  is reachable by every local user, while the streams themselves are private (0600), so
  being on the machine must not be enough. ``token = "none"`` serves without one, with a
  warning. The WebSocket's Origin, when present (every browser sends one), must be the
  page's own origin or one of ``allowed_origins``; on a loopback bind the Host header
  must name the loopback too (no DNS rebinding). At most ``max_clients`` WebSockets are
  served at once (each costs up to ``client_queue`` frames and 256 KiB of socket
  buffer): past that the upgrade is refused with 503, after the access checks.

Metrics (``<frames>.gateway``): frames taken, lost, encoded, encode time, latency
(capture → queued to the clients), clients with their sent/dropped counts, queued bytes,
resident memory, WebSocket upgrades refused at the client cap (``over_capacity``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from importlib import resources
from typing import Dict, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..config import TOKEN_AUTO, TOKEN_NONE, PipelineConfig
from ..errors import FrameshmError, InvalidArgument, Overrun, ProducerDead, StreamNotFound, Timeout
from ..stream import Reader
from . import Metrics, read_metrics
from .mode import MODE_NAMES, read_mode, read_state

log = logging.getLogger("frameshm.gateway")

WAIT_S = 0.25
STATUS_INTERVAL_S = 0.5
STOP_POLL_S = 0.05      # the event loop looks at the stop flag this often
CLOSE_GRACE_S = 0.5     # for clients to answer the close (1001) before their connection is aborted
ABORT_WAIT_S = 0.5
MAX_BOXES = 64
# Detections are sent with their age whatever the detector's speed, as long as the role
# that publishes them runs (a stopped one's boxes would be ghosts); checked this often.
DETECTOR_CHECK_NS = 500_000_000
WS_PATH = "/ws"
TOKEN_BYTES = 24         # of randomness in an "auto" token: 32 URL-safe characters
FULL_RETRY_AFTER_S = 5   # Retry-After of a WebSocket upgrade refused at the client cap
SEND_BUFFER_BYTES = 256 * 1024  # kernel send buffer per client (no autotuning to megabytes)
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/index.html": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}
_TOKEN_PATHS = {"/", "/index.html", WS_PATH}


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InvalidArgument(f"the gateway needs the {module!r} package: pip install {module} "
                              f"(or pip install -e . in the frameshm checkout)") from None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(value: str) -> Optional[str]:
    """The token the gateway checks for a ``[gateway] token`` value: a new random one for
    "auto", None (no check) for "none", else the value itself."""
    if value == TOKEN_AUTO:
        return secrets.token_urlsafe(TOKEN_BYTES)
    if value == TOKEN_NONE:
        return None
    return value


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def downscale(arr: np.ndarray, k: int) -> np.ndarray:
    """Block average by an integer factor ``k`` (H, W, C) -> (H//k, W//k, C), uint8."""
    if k <= 1:
        return arr
    h, w, c = arr.shape[0] // k * k, arr.shape[1] // k * k, arr.shape[2]
    acc = np.uint16 if k <= 16 else np.uint32
    blocks = arr[:h, :w].reshape(h // k, k, w // k, k, c)
    out = blocks.sum(axis=(1, 3), dtype=acc)
    out += (k * k) // 2
    out //= k * k
    return out.astype(np.uint8)


def colorspace_of(shape) -> str:
    """simplejpeg colourspace for a frame shape; InvalidArgument when it cannot be a picture."""
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return "GRAY"
    if len(shape) == 3 and shape[2] == 3:
        return "RGB"
    if len(shape) == 3 and shape[2] == 4:
        return "RGBX"
    raise InvalidArgument(f"frames of shape {tuple(shape)} are not an image: expected (H, W), (H, W, 1), "
                          f"(H, W, 3) RGB or (H, W, 4) RGBX uint8")


class _Stat:
    __slots__ = ("n", "total", "peak", "last")

    def __init__(self):
        self.n, self.total, self.peak, self.last = 0, 0.0, 0.0, 0.0

    def add(self, v: float) -> None:
        self.n += 1
        self.total += v
        self.last = v
        self.peak = max(self.peak, v)

    def snapshot(self) -> dict:
        out = {"last": round(self.last, 3), "mean": round(self.total / self.n, 3) if self.n else 0.0,
               "max": round(self.peak, 3)}
        self.n, self.total, self.peak = 0, 0.0, 0.0
        return out


class _Client:
    """One WebSocket client: a bounded queue of frames plus the newest status text."""

    __slots__ = ("ws", "queue", "event", "status", "sent", "dropped", "peer", "since")

    def __init__(self, ws, maxlen: int):
        self.ws = ws
        self.queue: deque = deque(maxlen=maxlen)
        self.event = asyncio.Event()
        self.status: Optional[str] = None
        self.sent = 0
        self.dropped = 0
        self.peer = "%s:%s" % tuple(ws.remote_address[:2]) if ws.remote_address else "?"
        self.since = time.monotonic()

    def push(self, msg: bytes) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1  # the deque drops the oldest
        self.queue.append(msg)
        self.event.set()

    def push_status(self, text: str) -> None:
        self.status = text
        self.event.set()

    def queued_bytes(self) -> int:
        return sum(len(m) for m in self.queue) + (len(self.status) if self.status else 0)


class Gateway:
    def __init__(self, cfg: PipelineConfig, stop: threading.Event, *, token: Optional[str] = None,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None):
        self.cfg = cfg
        self.c = cfg.gateway
        self.stop = stop
        self.token = resolve_token(self.c.token if token is None else token)
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        self._jpeg = _need("simplejpeg")
        _need("websockets")
        self._static = {}
        web = resources.files("frameshm") / "web"
        for path, (fname, ctype) in _STATIC.items():
            try:
                self._static[path] = ((web / fname).read_bytes(), ctype)
            except OSError as exc:
                raise InvalidArgument(f"the gateway's page is missing from the installation ({exc}); "
                                      f"reinstall frameshm") from None
        self.clients: Dict[int, _Client] = {}
        # WebSocket connections let through the access checks and the cap, from the check
        # (before the handshake: several may be past it at once) until they end; what
        # max_clients bounds.
        self._admitted: set = set()
        self.url = ""
        self.port = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # counters
        self.frames = 0          # taken from the stream (process-all)
        self.lost = 0            # lost by the reader (overruns)
        self.encoded = 0
        self.torn = 0            # overwritten while encoding
        self.rate_skipped = 0    # over max_fps
        self.idle = 0            # taken while no client was connected (not encoded)
        self.sent = 0            # frame messages sent, over all clients
        self.client_drops = 0    # of clients that left
        self.connections = 0
        self.rejected = 0
        self.over_capacity = 0   # WebSocket upgrades refused at max_clients (also in rejected)
        self.bad_frames = 0
        self.encode_ms = _Stat()
        self.latency_ms = _Stat()
        self._window = (time.monotonic_ns(), 0, 0)
        self._warned_shape = False
        self._detector_seen = (0, False)  # (when checked, the detections' producer alive)
        self._reader: Optional[Reader] = None
        self._connections: set = set()  # every accepted TCP connection (what a shutdown may abort)
        self.failed = False

    # -- the frame thread ------------------------------------------------------------------

    def _frame_loop(self, reader: Reader) -> None:
        c = self.c
        det: Optional[Reader] = None
        period = int(1e9 / c.max_fps) if c.max_fps > 0 else 0
        next_due = 0
        producer_gone = False
        try:
            det = Reader(self.cfg.detections_stream, subscribe=False, driver=self.cfg.driver, **self._addr)
            while not self.stop.is_set():
                try:
                    f = reader.wait_next(WAIT_S)
                except Timeout as exc:
                    if isinstance(exc, ProducerDead) and not producer_gone:
                        log.warning("%s", exc)
                        producer_gone = True
                    continue
                producer_gone = False
                self.frames += 1
                self.lost += f.skipped
                if not self.clients:
                    self.idle += 1
                    continue
                if period:
                    if f.timestamp_ns < next_due - period // 10:
                        self.rate_skipped += 1
                        continue
                    next_due = next_due + period if f.timestamp_ns - next_due < period else f.timestamp_ns + period
                msg = self._encode(f, det)
                if msg is not None:
                    self._loop.call_soon_threadsafe(self._broadcast, msg)
        except BaseException:
            log.exception("frame thread failed")
            self.failed = True
            self.stop.set()
            raise
        finally:
            if det is not None:
                det.close()

    def _encode(self, f, det: Reader) -> Optional[bytes]:
        c = self.c
        arr = f.array
        try:
            if arr.dtype != np.uint8:
                raise InvalidArgument(f"frames of dtype {arr.dtype} are not an image: expected uint8")
            cs = colorspace_of(arr.shape)
        except InvalidArgument as exc:
            self.bad_frames += 1
            if not self._warned_shape:
                self._warned_shape = True
                log.error("%s; frames are not sent", exc)
            return None
        img = arr if arr.ndim == 3 else arr[:, :, None]
        k = -(-img.shape[1] // c.max_width) if c.max_width and img.shape[1] > c.max_width else 1
        t0 = time.perf_counter_ns()
        img = downscale(img, k)
        jpeg = self._jpeg.encode_jpeg(img, quality=c.quality, colorspace=cs,
                                      colorsubsampling="Gray" if cs == "GRAY" else "420")
        t1 = time.perf_counter_ns()
        if not f.valid():
            self.torn += 1  # the producer lapped the slot while we read it
            return None
        boxes, det_seq, det_ts, det_age_ms = [], None, None, None
        d = det.read_latest(copy=False)
        if d is not None and self._detector_running(det):
            try:
                rows = d.copy()
            except Overrun:
                rows = None
            if rows is not None and rows.ndim == 2 and rows.shape[1] == 6:
                # signed: < 0 when the detector already finished a newer frame than this one
                det_seq, det_ts = d.ref_seq, d.timestamp_ns
                det_age_ms = round((f.timestamp_ns - d.timestamp_ns) / 1e6, 1)
                boxes = [[round(float(v), 1) for v in r[:4]] + [round(float(r[4]), 3), int(r[5])]
                         for r in rows[:MAX_BOXES]]
        # mode before state: the controller writes the state first, so this state is at
        # least as new as the mode
        mode = MODE_NAMES[read_mode(self._reader)]
        state = read_state(self._reader)
        now = time.monotonic_ns()
        header = {
            "seq": f.seq, "ts_ns": f.timestamp_ns,
            "capture_wall_ms": (time.time_ns() - (now - f.timestamp_ns)) / 1e6,
            "width": int(arr.shape[1]), "height": int(arr.shape[0]),
            "jpeg_width": int(img.shape[1]), "jpeg_height": int(img.shape[0]),
            "mode": mode, "state": state,
            "boxes": boxes, "det_seq": det_seq, "det_ts_ns": det_ts, "det_age_ms": det_age_ms,
            "encode_ms": round((t1 - t0) / 1e6, 3),
        }
        hb = json.dumps(header, separators=(",", ":")).encode()
        self.encoded += 1
        self.encode_ms.add((t1 - t0) / 1e6)
        self.latency_ms.add((now - f.timestamp_ns) / 1e6)
        return len(hb).to_bytes(4, "little") + hb + jpeg

    def _detector_running(self, det: Reader) -> bool:
        """Whether the detections' producer runs, looked up at most every DETECTOR_CHECK_NS
        (it reads the producer's /proc entry)."""
        now = time.monotonic_ns()
        at, running = self._detector_seen
        if now - at >= DETECTOR_CHECK_NS:
            try:
                running = det.producer_alive
            except FrameshmError:
                running = False
            self._detector_seen = (now, running)
        return running

    # -- the event loop --------------------------------------------------------------------

    def _broadcast(self, msg: bytes) -> None:
        for cl in self.clients.values():
            cl.push(msg)

    async def _sender(self, cl: _Client) -> None:
        ws = cl.ws
        while True:
            await cl.event.wait()
            cl.event.clear()
            if cl.status is not None:
                text, cl.status = cl.status, None
                await ws.send(text)
            while cl.queue:
                await ws.send(cl.queue.popleft())
                cl.sent += 1
                self.sent += 1

    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
        if sock is not None:
            try:  # bounded kernel buffering too: a stalled client holds at most this much
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError:
                pass
        cl = _Client(ws, self.c.client_queue)
        self.clients[id(cl)] = cl
        self.connections += 1
        log.info("client %s connected (%d now)", cl.peer, len(self.clients))
        sender = asyncio.get_running_loop().create_task(self._sender(cl))
        try:
            receiver = asyncio.ensure_future(self._drain_incoming(ws))
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            receiver.cancel()
            if sender.done() and not sender.cancelled():
                exc = sender.exception()
                if exc is not None and not isinstance(exc, ConnectionClosed):
                    log.warning("client %s: %r", cl.peer, exc)
        finally:
            sender.cancel()
            self.clients.pop(id(cl), None)
            self._admitted.discard(ws)
            self.client_drops += cl.dropped
            log.info("client %s disconnected after %.1fs: %d frames sent, %d dropped (%d left)",
                     cl.peer, time.monotonic() - cl.since, cl.sent, cl.dropped, len(self.clients))

    @staticmethod
    async def _drain_incoming(ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for _ in ws:  # clients have nothing to say; keeps pings/close flowing
                pass
        except ConnectionClosed:
            pass

    def _response(self, status: HTTPStatus, body: bytes, ctype: str = "text/plain; charset=utf-8", extra=()):
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                           # the page's URL carries the token: never sent on as a Referer
                           ("Referrer-Policy", "no-referrer"), ("Connection", "close"), *extra])
        return Response(status.value, status.phrase, headers, body)

    def _reject(self, status: HTTPStatus, why: str, request, extra=()):
        self.rejected += 1
        log.warning("rejected %s: %s", urlsplit(request.path).path, why)
        return self._response(status, (why + "\n").encode(), extra=extra)

    def _process_request(self, connection, request):
        parts = urlsplit(request.path)
        path = parts.path
        host = request.headers.get("Host", "")
        hostname = urlsplit("//" + host).hostname or ""
        if _is_loopback(self.c.host) and not _is_loopback(hostname):
            return self._reject(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this loopback-only gateway", request)
        if path in _TOKEN_PATHS and self.token:
            given = parse_qs(parts.query).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return self._reject(HTTPStatus.UNAUTHORIZED, "missing or wrong ?token=", request)
        if path == WS_PATH:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in {f"http://{host}", *self.c.allowed_origins}:
                return self._reject(HTTPStatus.FORBIDDEN, f"WebSocket Origin {origin!r} not allowed", request)
            # checked after the access checks: whoever has no token learns nothing
            if len(self._admitted) >= self.c.max_clients:
                self.over_capacity += 1
                return self._reject(HTTPStatus.SERVICE_UNAVAILABLE,
                                    f"{len(self._admitted)} WebSocket clients already, the most this gateway "
                                    f"serves (max_clients = {self.c.max_clients})", request,
                                    [("Retry-After", str(FULL_RETRY_AFTER_S))])
            self._admitted.add(connection)
            return None  # go on with the WebSocket handshake
        if path == "/favicon.ico":  # asked for by browsers that ignore the page's data: icon
            return self._response(HTTPStatus.NO_CONTENT, b"")
        static = self._static.get(path)
        if static is None:
            return self._reject(HTTPStatus.NOT_FOUND, f"no such page: {path}", request)
        body, ctype = static
        csp = ("default-src 'self'; img-src 'self' blob: data:; "
               f"connect-src 'self' ws://{host}; frame-ancestors 'none'")
        return self._response(HTTPStatus.OK, body, ctype, [("Content-Security-Policy", csp)])

    async def _status_loop(self, metrics: Optional[Metrics]) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            now = time.monotonic_ns()
            doc = self._snapshot(now)
            if metrics is not None:
                metrics.publish(doc, now)
            if self.clients:
                roles = await loop.run_in_executor(None, self._role_metrics)
                text = json.dumps({"type": "status", "gateway": doc, **roles}, separators=(",", ":"))
                for cl in self.clients.values():
                    cl.push_status(text)
            wake = loop.time() + STATUS_INTERVAL_S
            while not self.stop.is_set() and loop.time() < wake:
                await asyncio.sleep(STOP_POLL_S)

    def _role_metrics(self) -> dict:
        out = {}
        for role in ("capture", "inference", "controller"):
            name = self.cfg.metrics_stream(role)
            if name is None:
                continue
            try:
                out[role] = read_metrics(name, **self._addr)
            except StreamNotFound:
                out[role] = None
            except Exception as exc:  # noqa: BLE001 - status is best effort
                log.debug("metrics of %s: %s", role, exc)
                out[role] = None
        return out

    def _snapshot(self, now: int) -> dict:
        t0, e0, f0 = self._window
        dt = max(1, now - t0) / 1e9
        self._window = (now, self.encoded, self.frames)
        clients = list(self.clients.values())
        return {
            "role": "gateway", "frames_stream": self.cfg.frames_stream, "url": self.url, "now_ns": now,
            "frames": self.frames, "lost": self.lost, "encoded": self.encoded, "torn": self.torn,
            "idle": self.idle, "rate_skipped": self.rate_skipped, "bad_frames": self.bad_frames,
            "fps": round((self.encoded - e0) / dt, 2), "in_fps": round((self.frames - f0) / dt, 2),
            "encode_ms": self.encode_ms.snapshot(), "latency_ms": self.latency_ms.snapshot(),
            "clients": len(clients), "max_clients": self.c.max_clients, "connections": self.connections,
            "rejected": self.rejected, "over_capacity": self.over_capacity,
            "sent": self.sent, "dropped": self.client_drops + sum(cl.dropped for cl in clients),
            "client_sent": [cl.sent for cl in clients][:32], "client_dropped": [cl.dropped for cl in clients][:32],
            "queued_bytes": sum(cl.queued_bytes() for cl in clients), "rss_mb": _rss_mb(),
            "quality": self.c.quality,
        }

    async def _main(self) -> int:
        from websockets.asyncio.server import serve

        c = self.c
        self._loop = asyncio.get_running_loop()
        ws_log = logging.getLogger("frameshm.gateway.ws")  # one line per HTTP request is too chatty
        if not ws_log.isEnabledFor(logging.DEBUG):
            ws_log.setLevel(logging.WARNING)
        metrics = reader = None
        thread = None
        try:
            metrics = Metrics(self.cfg.metrics_stream("gateway"), **self._addr)
            reader = self._reader = Reader(self.cfg.frames_stream, consumer=c.consumer, spin=False,
                                           driver=self.cfg.driver, **self._addr)
            try:
                server = await serve(self._handler, c.host, c.port, process_request=self._process_request,
                                     compression=None, max_size=4096, max_queue=4, ping_interval=10,
                                     ping_timeout=20, close_timeout=2, open_timeout=10,
                                     logger=logging.getLogger("frameshm.gateway.ws"),
                                     create_connection=_tracked_connection_class(self._connections,
                                                                                 self._admitted))
            except OSError as exc:
                raise InvalidArgument(f"cannot listen on {c.host}:{c.port}: {exc.strerror or exc}") from None
            self.port = server.sockets[0].getsockname()[1]
            shown = c.host if c.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            if ":" in shown:
                shown = f"[{shown}]"
            self.url = f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")
            if not self.token:
                who = ("every user of this machine" if _is_loopback(c.host)
                       else f"anyone who can reach {c.host}:{self.port}")
                log.warning("serving without an access token (token = %r): %s can watch the camera; "
                            "[gateway] token = %r (the default) makes a random one per run", TOKEN_NONE, who,
                            TOKEN_AUTO)
            # the whole URL, token included, as Jupyter prints it: the way in for whoever
            # reads this log (or the metrics, same user only)
            log.info("serving %s (page and %s) for %r, JPEG quality %d%s%s, at most %d clients", self.url,
                     WS_PATH, self.cfg.frames_stream, c.quality,
                     f", max width {c.max_width}" if c.max_width else "",
                     f", max {c.max_fps:g} fps" if c.max_fps else "", c.max_clients)
            thread = threading.Thread(target=self._frame_loop, args=(reader,), name="gateway-frames",
                                      daemon=True)
            thread.start()
            try:
                await self._status_loop(metrics)
            finally:
                self.stop.set()
                await self._close_server(server)
        finally:
            self.stop.set()
            if thread is not None:
                await self._loop.run_in_executor(None, thread.join, 5)
            for obj in (reader, metrics):
                if obj is not None:
                    obj.close()
            log.info("stopped: %d frames taken, %d encoded, %d lost, %d torn, %d sent to %d connection(s), "
                     "%d dropped for slow clients", self.frames, self.encoded, self.lost, self.torn, self.sent,
                     self.connections, self.client_drops)
        return 1 if self.failed else 0

    async def _close_server(self, server) -> None:
        """Stops listening and closes every connection, in at most CLOSE_GRACE_S + ABORT_WAIT_S.

        websockets' own close is not bounded: the close frame (1001, going away) queues
        behind what the client has not read yet and is waited for, so a client that stopped
        reading holds it until a keepalive ping times out, 10 to 30 s later; a connection
        that never sent its request holds it for open_timeout. Those two cannot take part
        in a close handshake and are aborted at once; the others get the grace period to
        answer, then whatever is still open is aborted too."""
        server.close()  # stops listening; closes every open connection with 1001
        for conn in list(self._connections):
            if conn.request is None or _backed_up(conn.transport):
                conn.transport.abort()
        try:
            await asyncio.wait_for(server.wait_closed(), CLOSE_GRACE_S)
            return
        except asyncio.TimeoutError:
            pass
        stuck = list(self._connections)
        log.info("aborting %d connection(s) that did not close within %.1fs", len(stuck), CLOSE_GRACE_S)
        for conn in stuck:
            conn.transport.abort()
        try:
            await asyncio.wait_for(server.wait_closed(), ABORT_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("connections still open %.1fs after they were aborted", ABORT_WAIT_S)

    def run(self) -> int:
        return asyncio.run(self._main())


def _backed_up(transport) -> bool:
    """More is queued for this client than the write limit: it is not reading."""
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]


def _tracked_connection_class(connections: set, admitted: set):
    """A websockets ServerConnection that is in ``connections`` from the moment its TCP
    connection is accepted (before any handshake) until it is lost: what a shutdown may
    have to abort. It leaves ``admitted`` when lost too (a handshake that failed after the
    checks never reaches the handler, which would otherwise take it out)."""
    from websockets.asyncio.server import ServerConnection

    class TrackedConnection(ServerConnection):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            connections.add(self)

        def connection_lost(self, exc) -> None:
            connections.discard(self)
            admitted.discard(self)
            super().connection_lost(exc)

    return TrackedConnection


def run(cfg: PipelineConfig, stop: threading.Event, base_dir: Optional[str] = None,
        namespace: Optional[str] = None, token: Optional[str] = None) -> int:
    return Gateway(cfg, stop, token=token, base_dir=base_dir, namespace=namespace).run()


# ---- command line: `frameshm gateway` ------------------------------------------------------

TOKEN_ENV = "FRAMESHM_GATEWAY_TOKEN"


def add_parser(sub) -> None:
    """Adds ``frameshm gateway``; it runs through :func:`frameshm.roles.config_from_args`
    like the other roles."""
    from . import add_config_arguments, add_run_arguments

    p = sub.add_parser("gateway", help="frames stream -> JPEG over WebSocket, with a live page (127.0.0.1:8080)")
    add_config_arguments(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it up)")
    p.add_argument("--port", type=int, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--token", help=f"access token for ?token=: 'auto' (default: a random one, printed in the URL), "
                   f"'none' (no token) or your own (or ${TOKEN_ENV}; [gateway] token)")
    p.add_argument("--max-clients", type=int, help="WebSocket clients served at once (default 16; more get 503)")
    p.add_argument("--quality", type=int, help="JPEG quality 1-100")
    p.add_argument("--max-width", type=int, help="downscale wider frames by an integer factor")
    p.add_argument("--max-fps", type=float, help="send at most this rate (0: every frame)")
    add_run_arguments(p, "gateway", set_example="gateway.client_queue=4")


def token_from_args(args) -> Optional[str]:
    """``--token``, else $FRAMESHM_GATEWAY_TOKEN, else None (the config's)."""
    return args.token if args.token is not None else os.environ.get(TOKEN_ENV)
