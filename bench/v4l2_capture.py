#!/usr/bin/env python3
"""V4L2 capture -> frameshm stream: CPU per frame and latency, frameshm.Camera vs OpenCV's
cv2.VideoCapture reading the same kind of device in the same run.

The device is PipeWire's V4L2 emulation (tests/harness: private PipeWire + WirePlumber, a
fake camera node sending 640x480 YUYV at 30 fps, reached as /dev/video0 through the
pw-v4l2 LD_PRELOAD library) - there is no kernel V4L2 here. The emulation serves one
capture session per camera node, so every client gets a fresh camera node.

Cases (each a separate client process under the preload, N measured frames after a warm-up):
  frameshm-rgb24  Camera(format="RGB24"): wait -> loan a slot -> libv4lconvert YUYV->RGB24
                  straight into the slot -> commit (what Camera.capture_to does)
  opencv-bgr      cv2.VideoCapture(CAP_V4L2), YUYV, cap.read() (OpenCV converts to BGR)
                  -> Writer.publish(frame) (one copy into the slot)
  frameshm-yuyv   Camera(format="YUYV"): the same loop, a plain copy into the slot
  opencv-yuyv     cv2.VideoCapture with CAP_PROP_CONVERT_RGB=0 (raw YUYV) -> publish

Measured per case:
  CPU per frame   process CPU time (user+sys, every thread of the client, PipeWire's
                  client thread included) over the measured frames / frames
  camera -> stream     commit time - the fake camera's capture instant (carried in a
                       barcode in the frame itself: tests/harness/pattern.py)
  camera -> consumer   when a Reader in another process got the frame - capture instant
  dequeue -> stream    commit time - the V4L2 buffer timestamp (the emulation stamps
                       buffers at VIDIOC_DQBUF, so this is the capture code's own share)

    python bench/v4l2_capture.py                    # all cases, 300 frames each (~1 min)
    python bench/v4l2_capture.py --frames 100 --cases frameshm-rgb24,opencv-bgr
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "harness"))
import _common  # noqa: E402

CASES = ["frameshm-rgb24", "opencv-bgr", "frameshm-yuyv", "opencv-yuyv"]
W, H, FPS = 640, 480, 30
CAMERA = f"YUYV:{W}x{H}@{FPS}"


# ---- the client (runs under the preload) ------------------------------------------------


def client(case: str, name: str, frames: int, warmup: int, out: str) -> None:
    import frameshm

    res = {"case": case, "frames": frames, "warmup": warmup}
    rec = []
    try:
        if case.startswith("frameshm"):
            fmt = "RGB24" if case.endswith("rgb24") else "YUYV"
            cam = frameshm.Camera("/dev/video0", W, H, FPS, fmt, buffers=4)
            w = frameshm.Writer(name, shape=cam.shape, dtype=cam.dtype, nslots=8)
            res["camera"] = repr(cam)

            def one():
                cam.wait(5.0)                    # a frame is there: take a slot now
                view = w.loan()
                ts = cam.read_into(view, 0)      # convert/copy once into the slot
                seq = w.commit(timestamp_ns=ts)
                return seq, ts
        else:
            import cv2

            res["opencv"] = cv2.__version__
            cap = cv2.VideoCapture("/dev/video0", cv2.CAP_V4L2)
            if not cap.isOpened():
                raise RuntimeError("cv2.VideoCapture('/dev/video0', cv2.CAP_V4L2).isOpened() is False")
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"YUYV"))
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, W)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, H)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 4)
            raw = case.endswith("yuyv")
            if raw:
                cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
            shape = (H, W, 2) if raw else (H, W, 3)
            w = frameshm.Writer(name, shape=shape, dtype="uint8", nslots=8)
            res["threads"] = cv2.getNumThreads()
            res["fourcc"] = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1")

            def one():
                ok, frame = cap.read()
                if not ok:
                    raise RuntimeError("cap.read() returned False")
                ts = int(cap.get(cv2.CAP_PROP_POS_MSEC) * 1e6)   # the V4L2 buffer timestamp
                seq = w.publish(frame.reshape(shape), timestamp_ns=ts)
                return seq, ts

        for _ in range(warmup):
            one()
        c0, t0 = time.process_time_ns(), time.monotonic_ns()
        for _ in range(frames):
            seq, ts = one()
            rec.append((seq, ts, time.monotonic_ns()))
        c1, t1 = time.process_time_ns(), time.monotonic_ns()
        res.update(cpu_ns=c1 - c0, wall_ns=t1 - t0, records=rec)
        w.close()
    except Exception as exc:  # reported in the table with the exact error
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(res, f)


# ---- the consumer (another process: this one, not preloaded) ------------------------------


class Consumer(threading.Thread):
    """Process-all reader: (seq, receive time, capture instant from the barcode)."""

    def __init__(self, name: str, fmt: str):
        super().__init__(daemon=True)
        import frameshm
        from pattern import decode

        self.decode = decode
        self.fmt = fmt
        self.r = frameshm.Reader(name, consumer="bench")
        self.got = []
        self.halt = threading.Event()

    def run(self):
        import frameshm

        while not self.halt.is_set():
            try:
                f = self.r.wait_next(0.2)
            except frameshm.Timeout:
                continue
            t = time.monotonic_ns()
            n, ts_us = self.decode(f.array, self.fmt)
            if f.valid():
                self.got.append((f.seq, t, n, ts_us))

    def stop(self):
        self.halt.set()
        self.join(10)
        self.r.close()


def unwrap_us(ts_us: int, ref_ns: int) -> int:
    """Capture instant in ns from the barcode's microseconds mod 2^32, near ref_ns."""
    ref_us = ref_ns // 1000
    return (ref_us - ((ref_us - ts_us) % (1 << 32))) * 1000


def run_case(pw, case: str, frames: int, warmup: int, shm: str) -> dict:
    cam = pw.camera([CAMERA])
    name = "bench-" + case
    out = os.path.join(shm, name + ".json")
    fmt = {"frameshm-rgb24": "RGB3", "opencv-bgr": "BGR3"}.get(case, "YUYV")
    env = cam.env(dict(os.environ, FRAMESHM_DIR=shm, FRAMESHM_NAMESPACE="v4l2bench"))
    os.environ["FRAMESHM_DIR"], os.environ["FRAMESHM_NAMESPACE"] = shm, "v4l2bench"
    consumer = Consumer(name, fmt)
    consumer.start()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", case, "--name", name,
                               "--frames", str(frames), "--warmup", str(warmup), "--out", out],
                              env=env, capture_output=True, text=True, timeout=120 + frames / 10)
        time.sleep(0.3)
    finally:
        consumer.stop()
        cam.stop()
    if not os.path.exists(out):
        return {"case": case, "error": f"client failed (rc={proc.returncode}): {proc.stderr[-2000:]}"}
    with open(out) as f:
        res = json.load(f)
    if "error" in res:
        return res
    by_seq = {seq: (ts, commit) for seq, ts, commit in res.pop("records")}
    cam_stream, cam_consumer, dq_stream, counters = [], [], [], []
    for seq, t_recv, n, ts_us in consumer.got:
        if seq not in by_seq:
            continue  # warm-up frames
        ts, commit = by_seq[seq]
        cap_ns = unwrap_us(ts_us, commit)
        cam_stream.append(commit - cap_ns)
        cam_consumer.append(t_recv - cap_ns)
        dq_stream.append(commit - ts)
        counters.append(n)
    res["measured"] = len(by_seq)
    res["received"] = len(cam_stream)
    res["camera_frames_skipped"] = int(np.sum(np.diff(counters) - 1)) if len(counters) > 1 else None
    res["cpu_us_per_frame"] = res["cpu_ns"] / len(by_seq) / 1e3
    res["fps"] = len(by_seq) / (res["wall_ns"] / 1e9)
    res["camera_to_stream"] = _common.stats_ns(cam_stream)
    res["camera_to_consumer"] = _common.stats_ns(cam_consumer)
    res["dequeue_to_stream"] = _common.stats_ns(dq_stream)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=2, help="cases run in alternation this many times")
    ap.add_argument("--json", default=None, help="results file (default bench/results/v4l2_capture-<time>.json)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        client(args.client, args.name, args.frames, args.warmup, args.out)
        return 0

    import harness

    cases = [c for c in args.cases.split(",") if c]
    info = _common.machine_info()
    info["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    try:
        import cv2

        info["opencv"] = cv2.__version__
    except ImportError as exc:
        info["opencv"] = f"not importable: {exc}"
    shm = _common.private_shm_dir("v4l2")
    results = []
    try:
        with harness.PipeWireHarness() as pw:
            for rnd in range(args.rounds):
                for case in cases:
                    r = run_case(pw, case, args.frames, args.warmup, shm)
                    r["round"] = rnd
                    results.append(r)
                    if "error" in r:
                        print(f"{case}: ERROR {r['error']}", file=sys.stderr)
                    else:
                        print(f"{case} round {rnd}: {r['cpu_us_per_frame']:.0f} us CPU/frame, "
                              f"camera->stream median {r['camera_to_stream']['median_us']:.0f} us", file=sys.stderr)
    finally:
        _common.cleanup_shm_dir(shm)
    path = _common.write_results("v4l2_capture", {"machine": info, "camera": CAMERA, "results": results}, args.json)
    print(_common.header_line(info), f"opencv={info['opencv']}")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], r.get("round", "-"), "error: " + r["error"], "", "", "", "", "", ""])
            continue
        cs, cc, ds = r["camera_to_stream"], r["camera_to_consumer"], r["dequeue_to_stream"]
        rows.append([r["case"], r["round"], r["cpu_us_per_frame"], r["cpu_us_per_frame"] * FPS / 1e4,
                     cs["median_us"], cs["p99_us"], cc["median_us"], ds["median_us"], ds["p99_us"]])
    print(_common.markdown_table(
        ["case", "round", "CPU us/frame", "CPU % at 30 fps", "camera->stream median us", "p99 us",
         "camera->consumer median us", "dequeue->stream median us", "p99 us"], rows))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
