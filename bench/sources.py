"""Media sources, recording and replay: what they cost and how fast they go.

    PYTHONPATH=. python3 bench/sources.py [--seconds 4] [--frames 150] [--no-rtsp]

The recorder's CPU per frame includes its start-up (interpreter, imports: ~0.3 s).

1. Decode of a 1080p H.264 file (made here with PyAV, 30 fps): frameshm's ``file:`` source
   (realtime=0, into the loaned slot of a stream, committed: decode -> stream as the capture
   producer does it) vs ``cv2.VideoCapture`` on the same file (decode -> its own array): frames/s and
   CPU ms per frame (process CPU time / frames; both decoders may use threads).
2. The same for a live 1080p RTSP stream (GStreamer's gst-rtsp-server, tests/python/
   rtsp_server.py, 30 fps): CPU per frame over ``--seconds``, and the age of each frame when
   handed out (now - its timestamp; cv2 has no timestamps: n/a). The server's CPU is not
   counted.
3. Record throughput: a producer process publishes raw frames (640x480 at 1000 fps and 1080p
   RGB at 120 fps, more than the recorder keeps up with here), a `frameshm record` process
   records them; MB/s and frames/s the recorder
   wrote (first to last recorded frame, by its own clock), next to the disk's sequential
   write speed measured in the same run (the same writev calls of 6.2 MB, no frameshm).
4. Replay rate at ``--speed max`` (no consumer) of the 1080p recording.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine_info  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPS = 3
RTSP_SERVER = os.path.join(HERE, "..", "tests", "python", "rtsp_server.py")


def make_video(path, n, w=1920, h=1080):
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23"}
        for i in range(n):
            frame = np.roll(base, 4 * i, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def cpu():
    return time.process_time()


def bench_frameshm_source(uri, n=None, seconds=None):
    from frameshm.sources import open_source

    from frameshm import Writer

    src = open_source(uri)
    src.open()
    w = Writer(f"bench-src-{os.getpid()}", shape=src.shape, nslots=4)  # decode -> stream, as capture does
    ages = []
    frames = 0
    c0, t0 = cpu(), time.monotonic()
    try:
        while (n is None or frames < n) and (seconds is None or time.monotonic() - t0 < seconds):
            view = w.loan()
            try:
                ts = src.read_into(view, 2.0)
            except Exception:  # noqa: BLE001 - end of the file
                break
            w.commit(ts)
            ages.append(time.monotonic_ns() - ts)
            frames += 1
    finally:
        el, c1 = time.monotonic() - t0, cpu()
        stats = src.stats()
        src.close()
        w.close()
    return dict(frames=frames, fps=frames / el, cpu_ms=(c1 - c0) * 1e3 / max(frames, 1),
                age_ms=float(np.median(ages)) / 1e6 if ages else None, stats=stats)


def bench_cv2(url, n=None, seconds=None):
    import cv2

    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        return None
    frames = 0
    c0, t0 = cpu(), time.monotonic()
    while (n is None or frames < n) and (seconds is None or time.monotonic() - t0 < seconds):
        ok, _img = cap.read()
        if not ok:
            break
        frames += 1
    el, c1 = time.monotonic() - t0, cpu()
    cap.release()
    return dict(frames=frames, fps=frames / el, cpu_ms=(c1 - c0) * 1e3 / max(frames, 1), age_ms=None)


def disk_write_mb_s(path, mb=1200, chunk=1920 * 1080 * 3):
    buf = np.random.default_rng(1).integers(0, 256, chunk, dtype=np.uint8)
    head = bytes(128)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.monotonic()
    written = 0
    while written < mb * 1e6:
        written += os.writev(fd, [head, memoryview(buf)])
    el = time.monotonic() - t0
    os.close(fd)
    os.unlink(path)
    return written / el / 1e6


def bench_cv2_isolated(url, n=None, seconds=None):
    """bench_cv2 in a child process: OpenCV's wheel and PyAV's each bundle their own FFmpeg,
    and the two in one process have crashed this benchmark once (SIGSEGV)."""
    import json

    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); from sources import bench_cv2; "
            f"print(json.dumps(bench_cv2({url!r}, {n!r}, {seconds!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def bench_record(tmp, shape, frames, env, fps):
    name = f"bench-rec-{shape[1]}"
    out = os.path.join(tmp, f"run-{shape[1]}")
    nbytes = int(np.prod(shape))
    prod = subprocess.Popen([sys.executable, "-c", f"""
import sys, time, numpy as np, frameshm
w = frameshm.Writer({name!r}, shape={shape!r}, nslots=32)
frames = [np.random.default_rng(i).integers(0, 256, {shape!r}, dtype=np.uint8) for i in range(4)]
print("READY", flush=True)
import select
i = 0
t0 = time.monotonic_ns()
while not select.select([sys.stdin], [], [], 0)[0]:
    w.publish(frames[i % 4], timestamp_ns=t0 + i * {int(1e9 / fps)}); i += 1
    time.sleep(max(0, (t0 + i * {int(1e9 / fps)} - time.monotonic_ns()) / 1e9))
w.close()
"""], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert prod.stdout.readline().strip() == "READY"
    c0 = os.times()
    rec = subprocess.run([sys.executable, "-m", "frameshm", "record", "--stream", name, "--out", out,
                          "--frames", str(frames), "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    c1 = os.times()
    rec_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    prod.stdin.write("x\n")
    prod.stdin.close()
    prod.wait(30)
    if rec.returncode:
        raise SystemExit(rec.stderr)
    from frameshm.recording import Recording

    with Recording(out) as r:
        recs = r.records()
        span = (recs[-1].recorded_ns - recs[0].recorded_ns) / 1e9
        n = len(recs)
    return dict(frames=n, fps=(n - 1) / span, mb_s=(n - 1) * nbytes / span / 1e6, out=out,
                line=rec.stdout.strip(), cpu_s=rec_cpu)


def bench_replay(out, env):
    from frameshm.replay import Replayer

    rp = Replayer(out, speed=None, nslots=16)
    t0 = time.monotonic()
    n = rp.run()
    el = time.monotonic() - t0
    return dict(frames=n, fps=n / el)


def gi_python():
    for py in (sys.executable, "/usr/bin/python3"):
        if subprocess.run([py, "-c", "import gi; gi.require_version('GstRtspServer','1.0')"],
                          capture_output=True).returncode == 0:
            return py
    return None


def main() -> int:
    import faulthandler

    # Two early runs of this script died of SIGSEGV without a trace (not reproduced since,
    # in five runs and 23 source open/read/close cycles): if it happens again, say where.
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--no-rtsp", action="store_true")
    args = ap.parse_args()
    info = machine_info()
    sys.stdout.reconfigure(line_buffering=True)
    print(f"# {info.get('cpu', '?')}, {info['nproc']} CPUs, load {open('/proc/loadavg').read().split()[:3]}")
    tmp = tempfile.mkdtemp(prefix="fshm-bench-src-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    shm = tempfile.mkdtemp(prefix="fshm-bench-shm-", dir="/dev/shm")
    env = dict(os.environ, FRAMESHM_DIR=shm, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    os.environ["FRAMESHM_DIR"] = shm
    try:
        video = os.path.join(tmp, "1080p.mp4")
        make_video(video, args.frames)
        print("\n## 1080p H.264 file decode -> RGB (frameshm: into a stream slot)")
        print(f"{REPS} interleaved repetitions each; median (min-max)")
        print("| reader | frames | fps | CPU ms/frame |\n|---|---|---|---|")
        runs = {"frameshm file: (realtime=0)": [], "cv2.VideoCapture": []}
        for _ in range(REPS):  # interleaved, so that load swings hit both alike
            runs["frameshm file: (realtime=0)"].append(bench_frameshm_source(f"file:{video}?realtime=0"))
            runs["cv2.VideoCapture"].append(bench_cv2_isolated(video))
        for label, res in runs.items():
            fps = [r["fps"] for r in res]
            cpu_ms = [r["cpu_ms"] for r in res]
            print(f"| {label} | {res[0]['frames']} | {np.median(fps):.1f} ({min(fps):.0f}-{max(fps):.0f}) | "
                  f"{np.median(cpu_ms):.2f} ({min(cpu_ms):.2f}-{max(cpu_ms):.2f}) |")

        if not args.no_rtsp:
            py = gi_python()
            if py is None:
                print("\n(no gi/GstRtspServer: RTSP skipped)")
            else:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                srv = subprocess.Popen([py, RTSP_SERVER, str(port), "1920", "1080", "30"], stdout=subprocess.PIPE, text=True)
                try:
                    assert srv.stdout.readline().strip() == "ready"
                    url = f"rtsp://127.0.0.1:{port}/test"
                    print("\n## 1080p H.264 RTSP stream, 30 fps (gst-rtsp-server on 127.0.0.1)")
                    print("| reader | frames | fps | CPU ms/frame | frame age at hand-out, median ms |\n|---|---|---|---|---|")
                    r1 = bench_frameshm_source(url + "?timeout=5", seconds=args.seconds)
                    r2 = bench_cv2_isolated(url, seconds=args.seconds)
                    for label, res in (("frameshm rtsp:", r1), ("cv2.VideoCapture", r2)):
                        if res is None:
                            print(f"| {label} | cannot open | | | |")
                            continue
                        age = f"{res['age_ms']:.1f}" if res["age_ms"] is not None else "n/a"
                        print(f"| {label} | {res['frames']} | {res['fps']:.1f} | {res['cpu_ms']:.2f} | {age} |")
                    print(f"frameshm source stats: {r1['stats']}")
                finally:
                    srv.send_signal(signal.SIGKILL)
                    srv.wait(10)

        print(f"\n## Record throughput (recordings in {tmp})")
        disk = disk_write_mb_s(os.path.join(tmp, "disk.bin"))
        print(f"disk sequential write (writev of 6.2 MB, page cache, no fsync): {disk:.0f} MB/s")
        print("| frames | offered fps | recorded | fps | MB/s | recorder CPU ms/frame | recorder's report |\n"
              "|---|---|---|---|---|---|---|")
        outs = {}
        for shape, n, fps in (((480, 640, 3), 1000, 1000.0), ((1080, 1920, 3), 300, 120.0)):
            res = bench_record(tmp, shape, n, env, fps)
            outs[shape] = res["out"]
            print(f"| {shape[1]}x{shape[0]} RGB | {fps:g} | {res['frames']} | {res['fps']:.1f} | {res['mb_s']:.0f} | "
                  f"{res['cpu_s'] * 1e3 / res['frames']:.2f} | {res['line']} |")
        res = bench_replay(outs[(1080, 1920, 3)], env)
        print(f"\n## Replay --speed max, 1080p: {res['frames']} frames at {res['fps']:.1f} frames/s "
              f"({res['fps'] * 1920 * 1080 * 3 / 1e6:.0f} MB/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    print(f"\nload average at the end: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
