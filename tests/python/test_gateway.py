"""The gateway (`frameshm gateway`) with real processes and real sockets on 127.0.0.1:
configuration, HTTP and WebSocket access checks (the random token by default, the "none"
opt-out), the cap on clients, the frame messages, and load with 20 clients of which some
stop reading. Clients connect with the URL the gateway announces (``ws_url``). Helpers here are shared with test_gateway_browser.py
and test_run.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional
from urllib.parse import urlsplit
import signal

import frameshm
from fshm_helpers import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_role(spawn, *argv):
    return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=argv[0])


def http_get(url: str, headers: Optional[dict] = None, timeout: float = 10.0):
    """(status, headers, body) of a GET, errors included."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def ws_url(page_url: str) -> str:
    """The WebSocket URL of the page at ``page_url`` (the one the gateway announces), its
    ``?token=`` included: what the page's script connects to."""
    u = urlsplit(page_url)
    return f"ws://{u.netloc}/ws" + (f"?{u.query}" if u.query else "")


def split_message(msg: bytes):
    """(header dict, jpeg bytes) of a gateway frame message."""
    n = int.from_bytes(msg[:4], "little")
    return json.loads(msg[4:4 + n]), msg[4 + n:]


def recv_frames(url: str, count: int, timeout: float = 20.0, **kw) -> List[bytes]:
    """The first ``count`` binary messages from the gateway WebSocket."""
    from websockets.sync.client import connect

    out = []
    deadline = time.monotonic() + timeout
    with connect(url, open_timeout=10, **kw) as ws:
        while len(out) < count:
            m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(m, bytes):
                out.append(m)
    return out


def metrics(name: str) -> Optional[dict]:
    from frameshm.roles import read_metrics

    try:
        return read_metrics(name)
    except frameshm.StreamNotFound:
        return None


def wait_gateway(name: str, timeout: float = 30.0) -> dict:
    """The gateway's metrics once it serves (its document carries the URL)."""
    doc = {}

    def up():
        nonlocal doc
        doc = metrics(name) or {}
        return doc.get("url")

    wait_until(up, timeout, interval=0.1, what=f"gateway {name} serving")
    return doc


def all_queues() -> List[str]:
    """Every consumer queue of every stream in the current FRAMESHM_DIR."""
    out = []
    for s in frameshm.list_streams(sample_s=0):
        for c in s.get("consumers", []):
            out.append(c["queue"])
    return out


# ---- configuration ------------------------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import re  # noqa: E402

from frameshm.config import ConfigError, PipelineConfig, from_dict  # noqa: E402


def test_gateway_config_section():
    cfg = from_dict({"gateway": {"port": 0, "quality": 60, "max_width": 320, "token": "s3cret-token"}})
    assert (cfg.gateway.port, cfg.gateway.quality, cfg.gateway.max_width) == (0, 60, 320)
    assert cfg.gateway.host == "127.0.0.1" and cfg.metrics_stream("gateway") == "cam0.gateway"
    bad = [
        ({"prot": 1}, r"unknown key 'prot' in \[gateway\] \(did you mean 'port'\?\)"),
        ({"port": 70000}, r"\[gateway\] port: expected an integer in 0..65535"),
        ({"quality": "high"}, r"\[gateway\] quality: expected an integer"),
        ({"quality": 0}, r"\[gateway\] quality"),
        ({"token": "short"}, r"\[gateway\] token"),
        ({"token": ""}, r"\[gateway\] token: '' is no longer accepted: 'auto' \(the default\)"),
        ({"token": "None"}, r"\[gateway\] token: expected 'auto'"),
        ({"max_clients": 0}, r"\[gateway\] max_clients: expected an integer in 1..1024"),
        ({"host": "a b"}, r"\[gateway\] host"),
        ({"client_queue": 0}, r"\[gateway\] client_queue"),
        ({"allowed_origins": ["http://x:1/path"]}, r"\[gateway\] allowed_origins"),
        ({"max_fps": -1}, r"\[gateway\] max_fps"),
    ]
    for table, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"gateway": table})
    # the default: a token made per run, unguessable and new each time; "none" opts out
    from frameshm.roles.gateway import resolve_token

    assert (PipelineConfig().gateway.token, PipelineConfig().gateway.max_clients) == ("auto", 16)
    made = {resolve_token("auto") for _ in range(50)}
    assert len(made) == 50 and all(re.fullmatch(r"[A-Za-z0-9_-]{32}", t) for t in made), made
    assert from_dict({"gateway": {"token": next(iter(made))}}).gateway.token in made  # a valid token itself
    assert resolve_token("none") is None and resolve_token("s3cret-token") == "s3cret-token"


def test_gateway_cli_rejects_bad_values(spawn):
    child = start_role(spawn, "gateway", "--quality", "101")
    assert child.wait(30) == 1
    assert "[gateway] quality: expected an integer in 1..100, got 101" in child.stderr


def test_downscale_block_average():
    from frameshm.roles.gateway import downscale

    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = downscale(a, 2)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    want = np.rint(a.reshape(2, 2, 3, 2, 3).astype(float).mean(axis=(1, 3)) + 1e-9).astype(np.uint8)
    assert np.abs(out.astype(int) - want).max() <= 1


# ---- HTTP, WebSocket access and the frame messages -------------------------------------------


def test_gateway_serves_page_and_frames_with_access_checks(spawn, tmp_path):
    import simplejpeg
    from websockets.exceptions import InvalidStatus

    port = free_port()
    token = "tok-12345678"
    # 10 fps: a client that keeps up must get every frame (process-all), and a test client
    # on a loaded 2-core machine keeps up with 10 frames a second; the load tests below
    # cover what happens to clients that do not.
    cap = start_role(spawn, "capture", "--frames", "gw", "--source", "test:?width=640&height=480&fps=10",
                     "--standby-fps", "10")
    gw = start_role(spawn, "gateway", "--frames", "gw", "--port", str(port), "--token", token,
                    "--max-width", "320", "--quality", "70")
    try:
        doc = wait_gateway("gw.gateway")
        base = f"http://127.0.0.1:{port}"
        assert doc["url"] == f"{base}/?token={token}"
        # the page: token required, static assets served with their types
        assert http_get(f"{base}/")[0] == 401
        assert http_get(f"{base}/?token=wrong-token")[0] == 401
        st, hdr, body = http_get(f"{base}/?token={token}")
        assert st == 200 and hdr["Content-Type"].startswith("text/html") and b"app.js" in body
        st, hdr, body = http_get(f"{base}/app.js")
        assert st == 200 and "javascript" in hdr["Content-Type"] and b"WebSocket" in body
        assert http_get(f"{base}/style.css")[0] == 200
        assert http_get(f"{base}/../etc/passwd")[0] == 404
        assert http_get(f"{base}/nope")[0] == 404
        # a loopback-only gateway refuses other Host names (DNS rebinding)
        assert http_get(f"{base}/?token={token}", {"Host": f"evil.example:{port}"})[0] == 403
        ws = f"ws://127.0.0.1:{port}/ws"
        for url, kw, status in [
            (ws, {}, 401),                                                          # no token
            (f"{ws}?token=nope-nope", {}, 401),                                     # wrong token
            (f"{ws}?token={token}", {"origin": "http://evil.example"}, 403),        # foreign page
            (f"{ws}?token={token}", {"origin": f"http://localhost:{port}"}, 403),   # not the page's origin
        ]:
            with pytest.raises(InvalidStatus) as ei:
                recv_frames(url, 1, **kw)
            assert ei.value.response.status_code == status, (url, kw)
        # the page's own origin, with the token: frames
        msgs = recv_frames(f"{ws}?token={token}", 20, origin=f"http://127.0.0.1:{port}")
        heads = []
        for m in msgs:
            h, jpeg = split_message(m)
            heads.append(h)
            img = simplejpeg.decode_jpeg(jpeg)
            assert img.shape == (240, 320, 3)  # --max-width 320: 640x480 halved
        assert [h["width"] for h in heads] == [640] * 20 and heads[0]["jpeg_width"] == 320
        seqs = [h["seq"] for h in heads]
        assert seqs == sorted(seqs) and len(set(seqs)) == 20
        gaps = seqs[-1] - seqs[0] - 19
        if gaps:
            # A 2-core machine loaded several times over can starve the gateway or this
            # client even at 10 fps (seen at load 8): then every missing frame must be one
            # the gateway counted (lost by its reader, torn while encoding, or dropped for
            # a slow client), never one that vanished.
            t_end = time.monotonic_ns()
            doc = {}

            def fresh():
                nonlocal doc
                doc = metrics("gw.gateway") or {}
                return doc.get("now_ns", 0) > t_end

            wait_until(fresh, 30, interval=0.2, what="the gateway's metrics after the frames")
            counted = doc["lost"] + doc["torn"] + doc["dropped"]
            assert counted >= gaps, f"process-all: {gaps} frames missing, the gateway counted {counted}: {doc}"
        assert all(h["mode"] == "Standby" and h["boxes"] == [] and h["encode_ms"] > 0 for h in heads)
        # two frames of a moving pattern differ
        assert split_message(msgs[0])[1] != split_message(msgs[-1])[1]
        # capture wall clock ~ now (same machine): the page's latency is meaningful
        assert abs(time.time() * 1000 - heads[-1]["capture_wall_ms"]) < 5000
        doc = wait_until(lambda: (metrics("gw.gateway") or {}).get("encode_ms", {}).get("mean") and
                         metrics("gw.gateway"), 10, what="encode time in the metrics")
        assert doc["rejected"] >= 9 and doc["connections"] >= 1
    finally:
        gw.send_signal(signal.SIGTERM)
        cap.send_signal(signal.SIGTERM)
        assert gw.wait(20) == 0, gw.stderr[-3000:]
        assert cap.wait(20) == 0, cap.stderr[-3000:]
    assert "rejected /ws: WebSocket Origin 'http://evil.example' not allowed" in gw.stderr


class _Watcher(threading.Thread):
    """A WebSocket client in a thread that counts the frames it receives until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.frames, self.error = url, 0, None
        self.connected, self.halt = threading.Event(), threading.Event()
        self.start()

    def run(self):
        from websockets.sync.client import connect

        try:
            with connect(self.url, open_timeout=20) as ws:
                self.connected.set()
                while not self.halt.is_set():
                    try:
                        m = ws.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    if isinstance(m, bytes):
                        self.frames += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.connected.set()

    def stop(self):
        self.halt.set()
        self.join(20)
        assert not self.is_alive()


def test_gateway_default_random_token_and_client_cap(spawn):
    """No token configured: the gateway makes a random one, announces it in its URL (log and
    metrics) and refuses requests without it. With max_clients = 3 the 4th WebSocket is
    refused with 503 (logged, counted) while the 3 others keep getting frames, and a place
    freed by a client that left is taken by the next one."""
    from websockets.exceptions import InvalidStatus

    port = free_port()
    cap = start_role(spawn, "capture", "--frames", "tok", "--source", "test:?width=320&height=240&fps=10",
                     "--standby-fps", "10")
    gw = start_role(spawn, "gateway", "--frames", "tok", "--port", str(port), "--max-clients", "3")
    watchers = []
    try:
        page = wait_gateway("tok.gateway")["url"]
        m = re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?token=([A-Za-z0-9_-]{{32}})", page)
        assert m, page
        token = m.group(1)
        wait_until(lambda: f"serving {page} (page and /ws)" in gw.stderr, 10, what="the URL in the log")
        base, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
        assert http_get(f"{base}/")[0] == 401
        assert http_get(f"{base}/?token={token[:-1]}")[0] == 401
        st, hdr, body = http_get(page)
        assert st == 200 and b"app.js" in body and hdr["Referrer-Policy"] == "no-referrer"
        for url in (ws, f"{ws}?token=", f"{ws}?token={token.swapcase()}"):
            with pytest.raises(InvalidStatus) as ei:
                recv_frames(url, 1)
            assert ei.value.response.status_code == 401, url
        assert ws_url(page) == f"{ws}?token={token}"
        # the cap: 3 clients get frames ...
        watchers = [_Watcher(ws_url(page)) for _ in range(3)]
        for w in watchers:
            assert w.connected.wait(30) and w.error is None, w.error
        wait_until(lambda: all(w.frames >= 3 for w in watchers), 30, what="frames to the 3 clients")
        # ... the 4th is refused before its handshake, and says why
        with pytest.raises(InvalidStatus) as ei:
            recv_frames(ws_url(page), 1)
        resp = ei.value.response
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "5", resp
        assert b"max_clients = 3" in resp.body
        # (the access checks come first: no token is still 401, not 503)
        with pytest.raises(InvalidStatus) as ei:
            recv_frames(ws, 1)
        assert ei.value.response.status_code == 401
        # the 3 keep receiving
        after = [w.frames for w in watchers]
        wait_until(lambda: all(w.frames >= n + 10 for w, n in zip(watchers, after)), 30,
                   what="frames to the 3 clients after the refusal")
        assert all(w.error is None for w in watchers)
        doc = wait_until(lambda: (lambda d: d if d.get("over_capacity") == 1 and d.get("clients") == 3 else None)(
            metrics("tok.gateway") or {}), 10, what="the refusal in the metrics")
        assert doc["max_clients"] == 3 and doc["rejected"] >= 6
        assert "rejected /ws: 3 WebSocket clients already, the most this gateway serves (max_clients = 3)" \
            in gw.stderr
        # one leaves: its place is free again
        watchers.pop().stop()
        wait_until(lambda: (metrics("tok.gateway") or {}).get("clients") == 2, 10, what="a client gone")
        assert len(recv_frames(ws_url(page), 3)) == 3
    finally:
        for w in watchers:
            w.stop()
        gw.send_signal(signal.SIGTERM)
        cap.send_signal(signal.SIGTERM)
        assert gw.wait(20) == 0, gw.stderr[-3000:]
        assert cap.wait(20) == 0, cap.stderr[-3000:]
    assert "without an access token" not in gw.stderr


def test_gateway_token_none_serves_without_one_and_warns(spawn, tmp_path):
    """token = "none" in the config: no token in the URL, the page and the WebSocket answer
    without one, and the gateway says at start-up that every local user can watch."""
    from websockets.sync.client import connect

    cfg = tmp_path / "open.toml"
    cfg.write_text('[streams]\nframes = "open"\n[gateway]\ntoken = "none"\n')
    port = free_port()
    cam = frameshm.Writer("open", shape=(48, 64, 3), dtype="uint8")
    gw = start_role(spawn, "gateway", "--config", str(cfg), "--port", str(port))
    try:
        page = wait_gateway("open.gateway")["url"]
        assert page == f"http://127.0.0.1:{port}/"
        wait_until(lambda: "serving without an access token (token = 'none'): every user of this machine can "
                           "watch the camera" in gw.stderr, 10, what="the warning")
        assert http_get(page)[0] == 200
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            wait_until(lambda: (metrics("open.gateway") or {}).get("clients") == 1, 10, what="client registered")

            def one_frame():
                cam.publish(np.full((48, 64, 3), 7, np.uint8))
                try:
                    m = ws.recv(timeout=0.5)
                except TimeoutError:
                    return None
                return isinstance(m, bytes) and m

            msg = wait_until(one_frame, 20, interval=0.0, what="a frame without a token")
        assert split_message(msg)[0]["width"] == 64
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            assert gw.wait(20) == 0, gw.stderr[-3000:]
        finally:
            cam.close()


# ---- load: 20 clients, some of which stop reading ----------------------------------------------


def _stalled_client(page_url: str) -> socket.socket:
    """A WebSocket client of the gateway serving ``page_url`` that completes the handshake
    and then never reads again (a tiny receive buffer, so the gateway's writes back up
    quickly)."""
    u = urlsplit(ws_url(page_url))
    port, target = u.port, u.path + (f"?{u.query}" if u.query else "")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall((f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "gateway closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def test_gateway_load_slow_clients_do_not_slow_the_others(spawn):
    from websockets.asyncio.client import connect

    port = free_port()
    n_good, n_stalled, window_s = 16, 4, 6.0
    cap = start_role(spawn, "capture", "--frames", "load", "--source", "test:?width=640&height=480&fps=30",
                     "--standby-fps", "30")
    gw = start_role(spawn, "gateway", "--frames", "load", "--port", str(port), "--max-clients", "32")
    stalled = []
    try:
        page = wait_gateway("load.gateway")["url"]
        counts = [0] * n_good
        seqs = [[] for _ in range(n_good)]
        ready = threading.Event()
        result = {}

        async def good(i, t_end):
            async with connect(ws_url(page), open_timeout=20) as ws:
                ready.set()
                while time.monotonic() < t_end:
                    try:
                        m = await asyncio.wait_for(ws.recv(), max(0.05, t_end - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
                    if isinstance(m, bytes):
                        counts[i] += 1
                        seqs[i].append(int(json.loads(m[4:4 + int.from_bytes(m[:4], "little")])["seq"]))

        async def main():
            t_end = time.monotonic() + 2.0 + window_s
            await asyncio.gather(*(good(i, t_end) for i in range(n_good)))

        stalled = [_stalled_client(page) for _ in range(n_stalled)]
        th = threading.Thread(target=lambda: result.setdefault("err", asyncio.run(main())), daemon=True)
        th.start()
        assert ready.wait(20)
        wait_until(lambda: (metrics("load.gateway") or {}).get("clients") == n_good + n_stalled, 20,
                   interval=0.1, what="20 clients connected")
        time.sleep(1.0)  # warm-up: the stalled clients' buffers fill up
        m0 = metrics("load.gateway")
        t0 = time.monotonic()
        time.sleep(window_s - 1.0)
        m1 = metrics("load.gateway")  # all 20 still connected
        elapsed = time.monotonic() - t0
        th.join(window_s + 30)
        assert not th.is_alive()
        taken = m1["frames"] - m0["frames"]
        in_fps = taken / elapsed
        # each good client's seqs over the measuring window: count the frames it got vs produced
        print(f"\ngateway load: in {in_fps:.1f} fps, good clients got {min(counts)}..{max(counts)} frames "
              f"in {2 + window_s:.0f}s, dropped {m1['dropped']}, queued {m1['queued_bytes']} B, "
              f"rss {m0['rss_mb']} -> {m1['rss_mb']} MB, encode {m1['encode_ms']}")
        assert in_fps >= 20, f"capture+gateway should run near 30 fps, got {in_fps:.1f}"
        for s_ in seqs:
            assert s_ == sorted(s_)
            span = s_[-1] - s_[0] + 1
            # full rate: nearly every frame of its span, however stuck the 4 others are
            assert len(s_) >= 0.9 * span and span >= 0.7 * 30 * window_s, (len(s_), span)
        # the stalled clients drop at their end, the good ones (almost) never
        per_client = sorted(m1["client_dropped"])
        assert len(per_client) == n_good + n_stalled
        assert all(d >= 30 for d in per_client[-n_stalled:]), per_client
        # bounded memory: a few queued frames per client, RSS flat
        assert m1["queued_bytes"] <= n_stalled * 3 * 200_000, m1["queued_bytes"]
        assert m1["rss_mb"] - m0["rss_mb"] < 40, (m0["rss_mb"], m1["rss_mb"])
        # a stop with stuck clients still connected is clean and quick
        t_stop = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(20) == 0, gw.stderr[-3000:]
        assert time.monotonic() - t_stop < 15
    finally:
        for s in stalled:
            s.close()
        gw.send_signal(signal.SIGTERM)
        cap.send_signal(signal.SIGTERM)
        gw.wait(20)
        assert cap.wait(20) == 0, cap.stderr[-3000:]


# ---- detections of any age, the controller's state, the favicon --------------------------------


def test_gateway_sends_late_detections_with_their_frame_and_age(spawn):
    """The test plays capture, inference and controller (timestamps of its choosing): the
    newest detections go out with the seq and capture time of their own frame and their
    age, however late (3 s, 25 s: a 1 s window used to drop them) as long as their
    producer runs; once it has stopped they are left out (no ghost boxes). The header
    also carries the controller's state from control byte 1."""
    from websockets.sync.client import connect

    from frameshm.roles import mode as M

    port = free_port()
    cam = frameshm.Writer("gwd", shape=(48, 64, 3), dtype="uint8")
    dets = frameshm.Writer("gwd.detections", dtype="float32", max_bytes=4096)
    gw = start_role(spawn, "gateway", "--frames", "gwd", "--port", str(port))
    t0 = time.monotonic_ns() - 60_000_000_000
    person = np.array([[4, 6, 40, 44, 0.75, 0]], np.float32)
    try:
        page = wait_gateway("gwd.gateway")["url"]
        with connect(ws_url(page), open_timeout=10) as ws:

            def frame(ts):
                """Publishes a frame stamped ``ts`` and returns (its seq, the header sent for it)."""
                seq = cam.publish(np.full((48, 64, 3), 90, np.uint8), timestamp_ns=ts)
                deadline = time.monotonic() + 10
                while True:
                    m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                    if isinstance(m, bytes):
                        h = split_message(m)[0]
                        if h["seq"] == seq:
                            return seq, h

            # frames taken before the gateway registers this client are not sent
            wait_until(lambda: (metrics("gwd.gateway") or {}).get("clients") == 1, 10, what="client registered")
            seq0, h = frame(t0)
            assert (h["boxes"], h["det_seq"], h["det_ts_ns"], h["det_age_ms"]) == ([], None, None, None)
            assert (h["mode"], h["state"]) == ("Standby", None), "no controller ran: no state"

            dets.publish(person, timestamp_ns=t0, ref_seq=seq0)  # a result for frame seq0 ...
            M.write_state(cam, "Tracking")
            M.write_mode(cam, M.MODE_ALARMED)
            seq1, h = frame(t0 + 3_000_000_000)                    # ... arriving 3 s of frames later
            assert h["det_seq"] == seq0 and h["det_ts_ns"] == t0 and h["det_age_ms"] == 3000.0
            assert h["boxes"] == [[4.0, 6.0, 40.0, 44.0, 0.75, 0]]
            assert (h["mode"], h["state"]) == ("Alarmed", "Tracking")
            _, h = frame(t0 + 25_000_000_000)                      # a detector stuck for 25 s: still there
            assert h["det_seq"] == seq0 and h["det_age_ms"] == 25000.0 and len(h["boxes"]) == 1

            t5 = t0 + 30_000_000_000
            dets.publish(np.zeros((0, 6), np.float32), timestamp_ns=t5 + 40_000_000, ref_seq=seq1 + 3)
            M.write_state(cam, "Validation")
            _, h = frame(t5)                                       # the detector is ahead of the gateway
            assert h["det_seq"] == seq1 + 3 and h["det_age_ms"] == -40.0 and h["boxes"] == []
            assert (h["mode"], h["state"]) == ("Alarmed", "Validation")
            M.write_state(cam, None)
            M.write_mode(cam, M.MODE_STANDBY)
            _, h = frame(t5 + 1)
            assert (h["mode"], h["state"]) == ("Standby", None)

            dets.publish(person, timestamp_ns=t5 + 2, ref_seq=seq1 + 4)
            _, h = frame(t5 + 3)
            assert h["det_seq"] == seq1 + 4 and h["boxes"]
            dets.close()                                           # the detector stopped
            # (looked up every half second)
            h = wait_until(lambda: (lambda hd: hd if hd["det_seq"] is None else None)(frame(t5 + 4)[1]), 10,
                           interval=0.05, what="detections of a stopped producer left out")
            assert (h["boxes"], h["det_ts_ns"], h["det_age_ms"]) == ([], None, None)

        # the favicon: no 404 and no warning per page load
        st, hdr, body = http_get(f"http://127.0.0.1:{port}/favicon.ico")
        assert st == 204 and body == b""
        st, _, body = http_get(page)
        assert st == 200 and b'rel="icon"' in body
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            assert gw.wait(20) == 0, gw.stderr[-3000:]
        finally:
            cam.close()
            dets.close()
    assert "favicon" not in gw.stderr and "rejected" not in gw.stderr, gw.stderr[-3000:]
