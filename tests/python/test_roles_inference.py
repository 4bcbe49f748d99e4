"""Inference role in a real process: drain-to-latest with a slow plug-in detector
(skipped grows, latency stays bounded), detections tied to their source frames, metrics,
and failures of the plug-in.

The plug-in detectors below are loaded by the child as ``test_roles_inference:<name>``
(PYTHONPATH = this directory), exercising the module:callable path end to end."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import frame_seq_ok, make_frame, queue_exists, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
FRAME_BYTES = 4096


# ---- plug-in detectors (run inside the inference process) ------------------------------------


class SlowEcho:
    """Reports the seq embedded in the frame (fshm_helpers.make_frame) as its class, after
    ``delay_ms``: the test can then check which frame the detector really saw."""

    def __init__(self, delay_ms=0):
        self.delay = delay_ms / 1000.0

    def __call__(self, frame):
        if self.delay:
            time.sleep(self.delay)
        seq = frame_seq_ok(frame)
        return [[0, 0, 1, 1, 1.0, -2.0 if seq is None else float(seq)]]


def bad_shape(frame):
    return np.zeros((2, 3))


def flaky(frame):
    seq = frame_seq_ok(frame)
    if seq % 2:
        raise RuntimeError(f"model hiccup on {seq}")
    return [[0, 0, 1, 1, 1.0, float(seq)]]


# ---- helpers ---------------------------------------------------------------------------------


def start_role(spawn, *argv):
    return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=argv[0],
                 env_extra={"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")})


class Camera(threading.Thread):
    """The test's frames producer: make_frame(seq) frames at `fps`, timestamps recorded."""

    def __init__(self, name, fps, nslots=64):
        super().__init__(daemon=True)
        self.w = frameshm.Writer(name, shape=(FRAME_BYTES,), dtype="uint8", nslots=nslots)
        self.fps = fps
        self.ts = {}
        self.error = None
        self.halt = threading.Event()

    def run(self):
        period = 1.0 / self.fps
        t0 = time.monotonic()
        i = 0
        while not self.halt.is_set():
            ts = time.monotonic_ns()
            self.ts[i] = ts  # a fresh stream: seq i is the i-th frame
            if self.w.publish(make_frame(i, FRAME_BYTES), timestamp_ns=ts) != i:
                self.error = f"frame {i} got another seq"
                return
            i += 1
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self):
        self.halt.set()
        if self.is_alive() or self.ident is not None:
            self.join(10)
        self.w.close()
        assert self.error is None, self.error


def collect(name, out, halt):
    """Process-all reader of the detections stream: (ref_seq, rows, timestamp, arrival)."""
    with frameshm.Reader(name, consumer="probe", spin=False) as r:
        while not halt.is_set():
            try:
                f = r.wait_next(0.2)
            except frameshm.Timeout:
                continue
            out.append((f.ref_seq, f.copy(), f.timestamp_ns, time.monotonic_ns(), f.skipped))


def stop_role(child, sig=signal.SIGTERM):
    child.send_signal(sig)
    rc = child.wait(20)
    assert rc == 0, child.stderr
    return child.stderr


# ---- tests -----------------------------------------------------------------------------------


def test_slow_detector_drains_to_latest_with_bounded_latency(spawn):
    cam = Camera("inf-cam", fps=100)
    got, halt = [], threading.Event()
    probe = threading.Thread(target=collect, args=("inf-cam.detections", got, halt), daemon=True)
    inf = None
    try:
        probe.start()
        inf = start_role(spawn, "inference", "--frames", "inf-cam", "--detector", "test_roles_inference:SlowEcho",
                         "--param", "delay_ms=60")
        wait_until(lambda: any(c["name"] == "inference" for c in frameshm.stream_info("inf-cam")["consumers"]),
                   20, what="inference attached")
        cam.start()
        wait_until(lambda: len(got) >= 30, 30, what="30 detection frames")
        metrics = json.loads(subprocess.run(
            [sys.executable, "-m", "frameshm", "inference", "--frames", "inf-cam", "--status"],
            capture_output=True, text=True, timeout=30, check=True).stdout)
        consumer = next(c for c in frameshm.stream_info("inf-cam")["consumers"] if c["name"] == "inference")
        stderr = stop_role(inf)
        inf = None
    finally:
        halt.set()
        probe.join(10)
        cam.stop()
        if inf is not None:
            inf.kill()

    assert consumer["process_all"] is False, "inference must use drain-to-latest"
    assert not queue_exists(consumer["queue"]), "the role unlinked its descriptor queue"
    refs = [g[0] for g in got]
    assert refs == sorted(refs) and len(set(refs)) == len(refs)
    for ref, rows, ts, _arrival, _ in got:
        assert rows.shape == (1, 6) and rows.dtype == np.float32
        assert rows[0, 5] == ref, "the detector saw exactly the frame named by ref_seq, untorn"
        assert ts == cam.ts[ref], "detections carry the source frame's capture timestamp"
    # 100 fps in, ~16 fps out: most frames are skipped, and the detector always gets the newest
    gaps = np.diff(refs)
    assert np.median(gaps) >= 3, gaps
    latency_ms = np.array([(arr - ts) / 1e6 for _, _, ts, arr, _ in got])
    assert np.median(latency_ms) < 200 and latency_ms.max() < 600, latency_ms
    # metrics: processed, skipped, inference time, latency - and the frame age at pick-up
    # (latency minus inference time) stays near one frame period, not a growing backlog
    assert metrics["role"] == "inference" and metrics["detector"] == "test_roles_inference:SlowEcho"
    assert metrics["processed"] >= 10 and metrics["skipped"] >= 2 * metrics["processed"], metrics
    assert 55 <= metrics["infer_ms"]["mean"] < 300, metrics
    assert metrics["latency_ms"]["mean"] - metrics["infer_ms"]["mean"] < 60, metrics
    assert "stopped:" in stderr and "skipped" in stderr


def test_zero_copy_mode_and_detector_errors_are_counted(spawn):
    cam = Camera("flaky-cam", fps=50)
    got, halt = [], threading.Event()
    probe = threading.Thread(target=collect, args=("flaky-cam.detections", got, halt), daemon=True)
    try:
        probe.start()
        inf = start_role(spawn, "inference", "--frames", "flaky-cam", "--detector", "test_roles_inference:flaky",
                         "--set", "inference.copy_input=false")
        wait_until(lambda: any(c["name"] == "inference" for c in frameshm.stream_info("flaky-cam")["consumers"]),
                   20, what="inference attached")
        cam.start()
        wait_until(lambda: len(got) >= 10, 20, what="10 detection frames")
        from frameshm.roles import read_metrics

        m = wait_until(lambda: (read_metrics("flaky-cam.inference") or {}).get("errors", 0) >= 5
                       and read_metrics("flaky-cam.inference"), 10, what="errors in metrics")
        stderr = stop_role(inf, signal.SIGINT)
    finally:
        halt.set()
        probe.join(10)
        cam.stop()
    for ref, rows, _, _, _ in got:
        assert ref % 2 == 0 and rows[0, 5] == ref
    assert m["errors"] >= 5 and m["processed"] >= 5
    # logged once with its traceback, not once per frame
    assert stderr.count("RuntimeError: model hiccup") == 1, stderr


def test_a_detector_returning_garbage_stops_the_role_cleanly(spawn):
    cam = frameshm.Writer("bad-cam", shape=(FRAME_BYTES,), dtype="uint8")
    try:
        inf = start_role(spawn, "inference", "--frames", "bad-cam", "--detector", "test_roles_inference:bad_shape")
        wait_until(lambda: any(c["name"] == "inference" for c in frameshm.stream_info("bad-cam")["consumers"]),
                   20, what="inference attached")
        cam.publish(make_frame(0, FRAME_BYTES))
        rc = inf.wait(20)
        assert rc == 1
        assert "detector output has shape (2, 3); expected (N, 6)" in inf.stderr
        assert "Traceback" not in inf.stderr
        # it closed its queue and streams on the way out
        assert not frameshm.stream_info("bad-cam")["consumers"]
        with pytest.raises(frameshm.StreamNotFound):
            frameshm.stream_info("bad-cam.detections")
    finally:
        cam.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--detector", "test_roles_inference:nothing_here"], "has no attribute 'nothing_here'"),
        (["--detector", "test_roles_inference:SlowEcho", "--param", "delay=5"], "bad parameters {'delay': 5}"),
        (["--detector", "hog", "--param", "win_stride=7"], "hog detector: bad win_stride=7"),
        (["--detector", "test_roles_inference"], "expected auto, dnn, hog, motion or 'package.module:callable'"),
    ],
)
def test_bad_detector_specs_fail_before_touching_streams(shm_base, args, message):
    env = dict(os.environ, PYTHONPATH=HERE)
    proc = subprocess.run([sys.executable, "-m", "frameshm", "inference", "--frames", "x", *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
