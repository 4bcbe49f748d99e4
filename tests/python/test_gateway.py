"""The gateway (`frameshm gateway`) with real processes and real sockets on 127.0.0.1:
configuration, HTTP and WebSocket access checks, the frame messages, and load with 20
clients of which some stop reading. Helpers here are shared with test_gateway_browser.py
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

from frameshm.config import ConfigError, from_dict  # noqa: E402


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
        ({"host": "a b"}, r"\[gateway\] host"),
        ({"client_queue": 0}, r"\[gateway\] client_queue"),
        ({"allowed_origins": ["http://x:1/path"]}, r"\[gateway\] allowed_origins"),
        ({"max_fps": -1}, r"\[gateway\] max_fps"),
    ]
    for table, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"gateway": table})


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
        assert seqs[-1] - seqs[0] == 19, "process-all: consecutive frames to a client that keeps up"
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


# ---- load: 20 clients, some of which stop reading ----------------------------------------------


def _stalled_client(port: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again (a tiny
    receive buffer, so the gateway's writes back up quickly)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
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
    gw = start_role(spawn, "gateway", "--frames", "load", "--port", str(port))
    stalled = []
    try:
        wait_gateway("load.gateway")
        counts = [0] * n_good
        seqs = [[] for _ in range(n_good)]
        ready = threading.Event()
        result = {}

        async def good(i, t_end):
            async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=20) as ws:
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

        stalled = [_stalled_client(port) for _ in range(n_stalled)]
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
        wait_gateway("gwd.gateway")
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:

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
        st, _, page = http_get(f"http://127.0.0.1:{port}/")
        assert st == 200 and b'rel="icon"' in page
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            assert gw.wait(20) == 0, gw.stderr[-3000:]
        finally:
            cam.close()
            dets.close()
    assert "favicon" not in gw.stderr and "rejected" not in gw.stderr, gw.stderr[-3000:]
