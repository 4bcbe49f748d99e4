#!/usr/bin/env python3
"""GigE Vision capture: frameshm's gige: source vs Aravis' own arv-camera-test-0.8, both
receiving from the same fake camera (arv-fake-gv-camera-0.8 on 127.0.0.1, the real GigE
Vision protocol over loopback) in the same run.

Cases, one client process each, run one after the other against the same camera:
  frameshm        a GigESource (gige:127.0.0.1?pixel_format=Mono8&...) driven like the
                  capture producer: loan a stream slot -> read_into (one copy from the
                  Aravis buffer) -> commit, no consumer attached
  arv-camera-test arv-camera-test-0.8 -n 127.0.0.1 -w W -h H -f FPS -i PACKET: Aravis
                  receiving into its buffers and giving them back (no copy, no stream)

Measured over a window that starts after a warm-up (same window for both):
  fps        frames per second that reached the client (frameshm: frames committed to the
             stream, from stream_info; arv-camera-test: its per-second counts in the window)
  client CPU user+sys time of the client process (all threads, Aravis' receive thread
             included) / wall time, in % of one core - from /proc/<pid>/stat
  camera CPU the fake camera process over the same window (context: it shares the machine)
  lost       frameshm: stats()["lost"]; arv-camera-test: n_failures + n_underruns

    python bench/gige.py                       # 640x480 and 1920x1080 Mono8 at 100 fps, ~30 s
    python bench/gige.py --seconds 8 --packet-size 9000

Only 127.0.0.1 is used, the camera is opened by address (no discovery broadcast), and
only the processes started here are signalled.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

IP = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")

CHILD = r"""
import sys, time, numpy as np, frameshm
from frameshm.sources import open_source
uri, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
src = open_source(uri)
src.open()
src.set_rate(float(sys.argv[4]))
w = frameshm.Writer(name, shape=src.shape, dtype=src.dtype, nslots=4)
print("READY", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    view = w.loan()
    try:
        ts = src.read_into(view, 2.0)
    except frameshm.Timeout:
        continue
    w.commit(ts)
print("STATS", src.stats(), flush=True)
src.close()
w.close()
"""


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


class Camera:
    def __init__(self, serial: str):
        exe, tool = shutil.which("arv-fake-gv-camera-0.8"), shutil.which("arv-tool-0.8")
        if not exe or not tool:
            sys.exit("needs aravis-tools and aravis-tools-cli (scripts/setup.sh installs them)")
        self.proc = subprocess.Popen([exe, "-i", IP, "-s", serial], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run([tool, "-a", IP, "control", "DeviceID"], capture_output=True, text=True).stdout
            if serial in out:
                return
            time.sleep(0.2)
        self.stop()
        sys.exit("the fake camera did not come up")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def window(pid: int, cam_pid: int, warmup: float, length: float, frames_fn):
    """Samples CPU ticks (client, camera) and a frame counter at warmup and warmup+length."""
    time.sleep(warmup)
    t0, c0, k0, f0 = time.monotonic(), cpu_ticks(pid), cpu_ticks(cam_pid), frames_fn()
    time.sleep(length)
    t1, c1, k1, f1 = time.monotonic(), cpu_ticks(pid), cpu_ticks(cam_pid), frames_fn()
    dt = t1 - t0
    return {"seconds": dt, "client_cpu_pct": 100.0 * (c1 - c0) / TICK / dt,
            "camera_cpu_pct": 100.0 * (k1 - k0) / TICK / dt, "frames": (f1 - f0) if f0 is not None else None,
            "fps": (f1 - f0) / dt if f0 is not None else None}


def run_frameshm(cam: Camera, w: int, h: int, fps: float, pkt: int, seconds: float, warmup: float):
    import frameshm

    name = f"bench-gige-{os.getpid()}"
    uri = f"gige:{IP}?pixel_format=Mono8&width={w}&height={h}&fps={fps:g}&packet_size={pkt}"
    p = subprocess.Popen([sys.executable, "-c", CHILD, uri, name, str(seconds + warmup + 1), f"{fps:g}"],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("READY"):
        p.kill()
        raise RuntimeError(f"frameshm client failed to start: {line!r}")
    try:
        res = window(p.pid, cam.proc.pid, warmup, seconds, lambda: frameshm.stream_info(name)["frames"])
        out = p.stdout.read()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    m = re.search(r"STATS (\{.*\})", out)
    stats = eval(m.group(1)) if m else {}  # noqa: S307 - our own child's dict repr
    res["lost"] = stats.get("lost")
    res["stats"] = stats
    return res


def run_arv(cam: Camera, w: int, h: int, fps: float, pkt: int, seconds: float, warmup: float):
    exe = shutil.which("arv-camera-test-0.8")
    if not exe:
        sys.exit("needs aravis-tools-cli (arv-camera-test-0.8)")
    total = seconds + warmup + 1
    p = subprocess.Popen([exe, "-n", IP, "-w", str(w), "-h", str(h), "-f", f"{fps:g}", "-i", str(pkt),
                          "--duration", f"{total:g}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        res = window(p.pid, cam.proc.pid, warmup, seconds, lambda: None)
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    per_sec = [int(x) for x in re.findall(r"^\s*(\d+) frames/s", out, re.M)]
    # the per-second lines that fall inside the window (skip the warm-up ones and the last)
    inside = per_sec[int(warmup):int(warmup) + int(seconds)] or per_sec
    res["fps"] = sum(inside) / len(inside) if inside else None
    counters = {k: int(v) for k, v in re.findall(r"^(n_\w+)\s*=\s*(\d+)", out, re.M)}
    res["lost"] = counters.get("n_failures", 0) + counters.get("n_underruns", 0)
    res["stats"] = counters
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per case")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--packet-size", type=int, default=1400)
    ap.add_argument("--out", help="results JSON path (default bench/results/gige-<time>.json)")
    args = ap.parse_args()
    info = _common.machine_info()
    sizes = [(640, 480, 100.0), (1920, 1080, 100.0)]
    base = _common.private_shm_dir("gige")
    os.environ["FRAMESHM_DIR"] = base
    cam = Camera(f"BENCH{os.getpid() % 10000}")
    rows, results = [], []
    try:
        for w, h, fps in sizes:
            for case, fn in (("frameshm gige:", run_frameshm), ("arv-camera-test-0.8", run_arv)):
                r = fn(cam, w, h, fps, args.packet_size, args.seconds, args.warmup)
                r.update(case=case, width=w, height=h, fps_asked=fps, packet_size=args.packet_size)
                results.append(r)
                rows.append([f"{w}x{h}", f"{fps:g}", case, _common.fmt(r["fps"]), _common.fmt(r["client_cpu_pct"]),
                             _common.fmt(r["camera_cpu_pct"]), r["lost"]])
                print(rows[-1], flush=True)
    finally:
        cam.stop()
        _common.cleanup_shm_dir(base)
    table = _common.markdown_table(
        ["size (Mono8)", "fps asked", "client", "fps received", "client CPU % of a core", "fake camera CPU %",
         "lost"], rows)
    print()
    print(_common.header_line(info))
    print(f"packet size {args.packet_size}, {args.seconds:g} s window after {args.warmup:g} s warm-up\n")
    print(table)
    path = _common.write_results("gige", {"machine": info, "args": vars(args), "results": results}, args.out)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
