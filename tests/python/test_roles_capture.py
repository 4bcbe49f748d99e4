"""Capture producer in a real process: the rate follows the mode byte (3 → 30 → 3 fps),
stale buffered frames are flushed on Standby → Alarmed, the source reconnects after
SourceGone, and SIGINT/SIGTERM leave nothing behind."""

import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import wait_until
from frameshm.roles import read_metrics
from frameshm.sources.test_pattern import read_stamp


def start_role(spawn, *argv):
    return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=argv[0])


class Probe(threading.Thread):
    """Process-all reader of the frames stream: (seq, capture ts, publish ns, stamp)."""

    def __init__(self, name):
        super().__init__(daemon=True)
        self.r = frameshm.Reader(name, consumer="probe", spin=False)
        self.frames = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                f = self.r.wait_next(0.2)
            except frameshm.Timeout:
                continue
            stamp = read_stamp(f.array)
            ok = f.valid()
            self.frames.append((f.seq, f.timestamp_ns, f.publish_ns, stamp if ok else None))

    def stop(self):
        self.halt.set()
        self.join(10)
        self.r.close()


def metrics_or_none(name):
    try:
        return read_metrics(name)
    except frameshm.StreamNotFound:
        return None


def rate(frames, t0_ns, t1_ns):
    """Frames per second by capture timestamp over [t0, t1]."""
    n = sum(1 for _, ts, _, _ in frames if t0_ns <= ts <= t1_ns)
    return n / ((t1_ns - t0_ns) / 1e9)


def check_integrity(frames):
    seqs = [f[0] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    stamps = [f[3] for f in frames if f[3] is not None]
    assert len(stamps) >= len(frames) - 2  # a view lapped while reading is not counted
    for (_, ts, _, st) in frames:
        if st is not None:
            assert st.crc_ok and st.timestamp_ns == ts
    nos = [s.frame_no for s in stamps]
    assert nos == sorted(nos) and len(set(nos)) == len(nos)


def test_rate_follows_the_mode_and_alarm_flushes_stale_frames(spawn):
    # ratecontrol=0: the source runs at 30 fps and cannot be slowed, so capture paces by
    # dropping and sleeps in between, letting the emulated driver queue fill with stale
    # frames — which the flush on Standby -> Alarmed must discard.
    cap = start_role(spawn, "capture", "--frames", "cap-cam", "--log-level", "debug",
                     "--source", "test:?width=160&height=120&fps=30&ratecontrol=0&buffers=4")
    probe = Probe("cap-cam")
    modectl = frameshm.Reader("cap-cam", consumer="modectl", spin=False)
    try:
        probe.start()
        wait_until(lambda: probe.frames, 20, what="first frame")
        start = probe.frames[0][1]
        time.sleep(2.6)
        t_alarm = time.monotonic_ns()
        modectl.mode = frameshm.MODE_ALARMED
        time.sleep(2.6)
        t_standby = time.monotonic_ns()
        modectl.mode = frameshm.MODE_STANDBY
        time.sleep(2.6)
        t_end = time.monotonic_ns()
        m = read_metrics("cap-cam.capture")
        cap.send_signal(signal.SIGINT)
        assert cap.wait(20) == 0, cap.stderr
    finally:
        probe.stop()
        modectl.close()

    frames = probe.frames
    check_integrity(frames)
    s = 1_000_000_000
    standby1 = rate(frames, start + s // 2, t_alarm)
    alarmed = rate(frames, t_alarm + s // 2, t_standby)
    standby2 = rate(frames, t_standby + s // 2, t_end - s // 10)
    print(f"capture rates (drop-paced): standby {standby1:.1f} fps, alarmed {alarmed:.1f} fps, "
          f"standby {standby2:.1f} fps")
    assert 1.5 <= standby1 <= 6, standby1
    assert alarmed >= 15, alarmed
    assert 1.5 <= standby2 <= 6, standby2
    # After the flush nothing that sat in the driver queue goes out. The flush runs after
    # t_alarm and discards frames older than flush_max_age_ms (50), so every frame the
    # capture commits after its mode line was taken at t_alarm - 50 ms or later, however
    # late a loaded machine lets the capture notice the flip or publish. (A wall-clock age
    # bound cannot tell a stale frame from a fresh one published late.) The debug log
    # orders the commits and the mode line as the capture did them.
    log = cap.stderr
    lines = log.splitlines()
    flip = next(i for i, ln in enumerate(lines) if "mode Standby -> Alarmed" in ln)
    back = next(i for i, ln in enumerate(lines) if "mode Alarmed -> Standby" in ln)
    alarmed_ts = [int(hit.group(1)) for ln in lines[flip:back]
                  if (hit := re.search(r"frame seq \d+ ts (\d+)", ln))]
    assert len(alarmed_ts) >= 15, alarmed_ts
    too_old = [(t_alarm - ts) / 1e6 for ts in alarmed_ts if ts < t_alarm - 50_000_000]
    assert not too_old, f"frames taken this many ms before the alarm went out after the flush: {too_old}"
    assert re.search(r"mode Standby -> Alarmed: 30 fps \(paced by dropping\), flushed \d+ stale frame", log), log
    assert "mode Alarmed -> Standby: 3 fps" in log
    assert "SIGINT received: stopping" in log and "stopped:" in log
    assert m["role"] == "capture" and m["source_paced"] is False and m["paced_drops"] > 0
    assert m["transitions"] == 2 and m["mode"] == "Standby"


def test_reconnects_when_the_source_goes_away(spawn):
    cap = start_role(spawn, "capture", "--frames", "gone-cam", "--log-level", "debug",
                     "--source", "test:?width=64&height=48&fps=50&fail_after=20",
                     "--standby-fps", "50", "--set", "capture.reconnect_interval_s=0.3")
    probe = Probe("gone-cam")
    try:
        probe.start()

        def reconnected_twice():
            m = metrics_or_none("gone-cam.capture")
            return m if m and m["reconnects"] >= 2 and m["frames"] >= 50 else None

        wait_until(reconnected_twice, 30, what="two reconnects")
        epoch = frameshm.stream_info("gone-cam")["epoch"]
        cap.send_signal(signal.SIGTERM)
        assert cap.wait(20) == 0, cap.stderr
    finally:
        probe.stop()
    assert epoch == 1, "the stream stays up across reconnects (same producer epoch)"
    frames = probe.frames
    check_integrity(frames)
    gaps = np.diff([ts for _, ts, _, _ in frames]) / 1e9
    assert (gaps >= 0.25).sum() >= 2, "two visible reconnection pauses"
    log = cap.stderr
    assert log.count("source gone (test source: simulated disconnect after 20 frames)") >= 2
    assert re.search(r"DEBUG: frame seq \d+ ts \d+", log), "each frame is logged at debug level"
    assert "SIGTERM received" in log


def test_bad_source_parameters_are_reported(shm_base):
    proc = subprocess.run([sys.executable, "-m", "frameshm", "capture", "--source", "test:?widht=64"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "unknown parameter(s) widht" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.parametrize("ratecontrol", [1, 0])
def test_an_alarm_takes_effect_at_once_not_after_the_standby_period(spawn, ratecontrol):
    """Standby at 1 fps: a flip to Alarmed right after a frame went out must not wait for
    the rest of that second (the capture was blocked in a read or napping)."""
    name = f"flip-{ratecontrol}"
    cap = start_role(spawn, "capture", "--frames", name, "--set", "capture.standby_fps=1",
                     "--source", f"test:?width=160&height=120&fps=30&ratecontrol={ratecontrol}")
    probe = Probe(name)
    modectl = frameshm.Reader(name, consumer="modectl", spin=False)
    try:
        probe.start()
        wait_until(lambda: len(probe.frames) >= 2, 20, what="two standby frames")
        n = len(probe.frames)
        wait_until(lambda: len(probe.frames) > n, 5, what="a fresh standby frame")
        time.sleep(0.05)  # the capture is now inside its ~1 s wait for the next one
        t_alarm = time.monotonic_ns()
        modectl.mode = frameshm.MODE_ALARMED
        wait_until(lambda: any(pub > t_alarm for _, _, pub, _ in probe.frames), 5, what="a frame after the alarm")
        first = min(pub for _, _, pub, _ in probe.frames if pub > t_alarm)
        reaction_ms = (first - t_alarm) / 1e6
        cap.send_signal(signal.SIGINT)
        assert cap.wait(20) == 0, cap.stderr
    finally:
        probe.stop()
        modectl.close()
    print(f"ratecontrol={ratecontrol}: first frame {reaction_ms:.0f} ms after the alarm")
    assert reaction_ms < 300, reaction_ms
