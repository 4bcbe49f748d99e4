#!/usr/bin/env python3
"""Gateway benchmark: frames/s and CPU of `frameshm gateway` at 640x480 and 1280x720,
30 fps, with 1, 10 and 20 WebSocket clients; and JPEG encode time, simplejpeg
(libjpeg-turbo, what the gateway uses) against cv2.imencode on the same frames.

Each case runs a real `frameshm capture` (test pattern, 30 fps) and a real `frameshm
gateway` in a private tmpfs FRAMESHM_DIR; the clients (websockets, asyncio) run in this
process and count what they receive. Gateway CPU = utime + stime of its process over the
measuring window (/proc/<pid>/stat), in % of one core.

    python bench/gateway.py [--seconds 6] [--quality 80]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (cleanup_shm_dir, header_line, machine_info, markdown_table,  # noqa: E402
                     private_shm_dir, write_results)

SIZES = [(640, 480), (1280, 720)]
CLIENTS = [1, 10, 20]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(base: str, name: str):
    from frameshm.roles import read_metrics

    try:
        return read_metrics(name, base_dir=base)
    except Exception:  # noqa: BLE001 - not up yet
        return None


async def clients(url: str, n: int, seconds: float):
    """``n`` clients of the WebSocket at ``url`` (the announced one, with its token)."""
    from websockets.asyncio.client import connect

    counts = [0] * n
    nbytes = [0] * n

    async def one(i, t_end):
        async with connect(url, open_timeout=20, max_size=None) as ws:
            while time.monotonic() < t_end:
                try:
                    m = await asyncio.wait_for(ws.recv(), max(0.05, t_end - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if isinstance(m, bytes):
                    counts[i] += 1
                    nbytes[i] += len(m)

    t_end = time.monotonic() + seconds
    await asyncio.gather(*(one(i, t_end) for i in range(n)))
    return counts, nbytes


def run_case(width: int, height: int, n: int, seconds: float, quality: int) -> dict:
    base = private_shm_dir("gw")
    port = free_port()
    env = dict(os.environ, FRAMESHM_DIR=base)
    cmd = [sys.executable, "-m", "frameshm"]
    cap = subprocess.Popen(cmd + ["capture", "--frames", "bench", "--source",
                                  f"test:?width={width}&height={height}&fps=30", "--standby-fps", "30",
                                  "--log-level", "warning"], env=env)
    gw = subprocess.Popen(cmd + ["gateway", "--frames", "bench", "--port", str(port), "--quality", str(quality),
                                 "--max-clients", str(max(CLIENTS)), "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (metrics(base, "bench.gateway") or {}).get("url"):
            if time.monotonic() > deadline or gw.poll() is not None:
                raise SystemExit("gateway did not start")
            time.sleep(0.1)
        query = urlsplit(metrics(base, "bench.gateway")["url"]).query  # ?token=, made by the gateway
        ws_url = f"ws://127.0.0.1:{port}/ws" + (f"?{query}" if query else "")
        warm = 1.5

        async def measured():
            task = asyncio.ensure_future(clients(ws_url, n, warm + seconds))
            await asyncio.sleep(warm)
            m0, c0, t0 = metrics(base, "bench.gateway"), cpu_s(gw.pid), time.monotonic()
            await asyncio.sleep(seconds - 0.6)
            m1, c1, t1 = metrics(base, "bench.gateway"), cpu_s(gw.pid), time.monotonic()
            counts, nbytes = await task
            return m0, m1, c1 - c0, t1 - t0, counts, nbytes

        m0, m1, cpu, dt, counts, nbytes = asyncio.run(measured())
        encoded = m1["encoded"] - m0["encoded"]
        if "now_ns" in m1 and m1["now_ns"] > m0.get("now_ns", 0):
            mdt = (m1["now_ns"] - m0["now_ns"]) / 1e9  # the documents' own times (published every 0.5 s)
        else:
            mdt = dt
        rx = np.array(counts) / (warm + seconds)
        return {
            "size": f"{width}x{height}", "clients": n,
            "gateway_fps": round(encoded / mdt, 1), "in_fps": round((m1["frames"] - m0["frames"]) / mdt, 1),
            "cpu_pct": round(100 * cpu / dt, 1),
            "client_fps_min": round(float(rx.min()), 1), "client_fps_mean": round(float(rx.mean()), 1),
            "jpeg_kb": round(sum(nbytes) / max(1, sum(counts)) / 1024, 1),
            "encode_ms_mean": m1["encode_ms"]["mean"], "latency_ms_mean": m1["latency_ms"]["mean"],
            "dropped": m1["dropped"] - m0["dropped"], "rss_mb": m1["rss_mb"],
        }
    finally:
        for p in (gw, cap):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (gw, cap):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        cleanup_shm_dir(base)


def encode_compare(quality: int, reps: int = 60) -> list:
    """simplejpeg vs cv2.imencode on the same test-pattern frames (single thread)."""
    import simplejpeg

    from frameshm.sources import open_source

    try:
        import cv2
    except ImportError:
        cv2 = None
    out = []
    for w, h in SIZES:
        src = open_source(f"test:?width={w}&height={h}&fps=1000&person=on" if _has_skimage()
                          else f"test:?width={w}&height={h}&fps=1000")
        src.open()
        frames = []
        try:
            for _ in range(8):
                buf = np.empty(src.shape, src.dtype)
                src.read_into(buf, 5.0)
                frames.append(buf)
        finally:
            src.close()
        row = {"size": f"{w}x{h}"}
        for name, fn in [
            ("simplejpeg_420", lambda f: simplejpeg.encode_jpeg(f, quality=quality, colorspace="RGB",
                                                                colorsubsampling="420")),
            ("cv2_imencode", (lambda f: cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR),
                                                     [cv2.IMWRITE_JPEG_QUALITY, quality])[1]) if cv2 else None),
            ("cv2_imencode_no_cvt", (lambda f: cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, quality])[1])
             if cv2 else None),
        ]:
            if fn is None:
                continue
            for f in frames[:2]:
                fn(f)  # warm-up
            ts, size = [], 0
            for i in range(reps):
                f = frames[i % len(frames)]
                t0 = time.perf_counter_ns()
                b = fn(f)
                ts.append(time.perf_counter_ns() - t0)
                size += len(b)
            row[f"{name}_ms"] = round(float(np.median(ts)) / 1e6, 2)
            row[f"{name}_kb"] = round(size / reps / 1024, 1)
        out.append(row)
    return out


def _has_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--quality", type=int, default=80)
    args = ap.parse_args()
    info = machine_info()
    print(header_line(info), flush=True)
    enc = encode_compare(args.quality)
    print(markdown_table(list(enc[0].keys()), [list(r.values()) for r in enc]), flush=True)
    rows = []
    for w, h in SIZES:
        for n in CLIENTS:
            r = run_case(w, h, n, args.seconds, args.quality)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print()
    keys = ["size", "clients", "gateway_fps", "cpu_pct", "client_fps_min", "client_fps_mean", "jpeg_kb",
            "encode_ms_mean", "latency_ms_mean", "rss_mb"]
    print(markdown_table(keys, [[r[k] for k in keys] for r in rows]))
    path = write_results("gateway", {"machine": info, "quality": args.quality, "encode": enc, "cases": rows})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
