"""End to end with real processes: `frameshm capture | inference | controller` on one
pipeline TOML. The test-pattern camera shows nobody for 6 s, then the astronaut
photograph for 5 s; the HOG detector (slowed to ~11 fps by a plug-in wrapper) finds her,
the controller goes Standby -> Validation -> Tracking -> Standby, the capture rate moves
3 -> 30 -> 3 fps, and inference stays one inference time behind capture (it skips frames
instead of falling behind)."""

import os
import re
import signal
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import wait_until
from frameshm.roles import read_metrics
from frameshm.sources.test_pattern import read_stamp

pytest.importorskip("cv2")
pytest.importorskip("skimage")

HERE = os.path.dirname(os.path.abspath(__file__))
DELAY_MS = 70
OFF_S, ON_S = 6.0, 5.0


class SlowHOG:
    """Plug-in detector (loaded by the inference process as test_roles_e2e:SlowHOG): the
    built-in HOG person detector made slower than the camera, like a heavy model."""

    def __init__(self, delay_ms=DELAY_MS, **hog_params):
        from frameshm.detectors import HOGPersonDetector

        self.hog = HOGPersonDetector(**hog_params)
        self.delay = delay_ms / 1000.0

    def __call__(self, frame):
        time.sleep(self.delay)
        return self.hog(frame)


CONFIG = f"""
[streams]
frames = "e2e-cam"

[capture]
source = "test:?width=320&height=240&fps=30&person=cycle&off_s={OFF_S}&on_s={ON_S}"
standby_fps = 3
alarmed_fps = 30

[inference]
detector = "test_roles_e2e:SlowHOG"
[inference.detector_params]
delay_ms = {DELAY_MS}

[controller]
validation_frames = 3
tracking_exit_frames = 8
classes = [0]
"""


def start_role(spawn, *argv):
    return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=argv[0],
                 env_extra={"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")})


def probe(name, out, halt, stamps):
    with frameshm.Reader(name, consumer="probe", spin=False) as r:
        while not halt.is_set():
            try:
                f = r.wait_next(0.2)
            except frameshm.Timeout:
                continue
            if stamps:
                st = read_stamp(f.array)
                out.append((f.seq, f.timestamp_ns, st if f.valid() else None))
            else:
                out.append((f.ref_seq, f.copy(), f.timestamp_ns, time.monotonic_ns()))


def rate(frames, t0, t1):
    return sum(1 for _, ts, _ in frames if t0 <= ts <= t1) / ((t1 - t0) / 1e9)


def transitions(log):
    return [(m.group(1), m.group(2), int(m.group(3)))
            for m in re.finditer(r"INFO: (\w+) -> (\w+): frame seq \S+ \(ts (\d+) ns\)", log)]


def test_sentry_pipeline_end_to_end(spawn, tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(CONFIG)
    frames, dets, halt = [], [], threading.Event()
    threads = [threading.Thread(target=probe, args=("e2e-cam", frames, halt, True), daemon=True),
               threading.Thread(target=probe, args=("e2e-cam.detections", dets, halt, False), daemon=True)]
    roles = {}
    modes = []  # (monotonic ns, mode) at every change seen by polling
    inf_metrics = []
    try:
        for t in threads:
            t.start()
        roles["controller"] = start_role(spawn, "controller", "--config", str(cfg))
        roles["inference"] = start_role(spawn, "inference", "--config", str(cfg))
        # inference consumes the frames, the controller the detections (it only writes the
        # frames stream's mode, control byte 0, which needs no registration)
        wait_until(lambda: "inference" in {c["name"] for c in frameshm.stream_info("e2e-cam")["consumers"]}
                   and "controller" in {c["name"] for c in frameshm.stream_info("e2e-cam.detections")["consumers"]},
                   30, what="inference and controller attached")
        roles["capture"] = start_role(spawn, "capture", "--config", str(cfg))
        wait_until(lambda: frames, 20, what="first frame")
        start = frames[0][1]  # ~ the source's open: the person schedule's origin
        deadline = start + int((OFF_S + ON_S + OFF_S - 0.5) * 1e9)  # before the person comes back
        back_to_standby = None
        next_metrics = 0
        while time.monotonic_ns() < deadline:
            mode = frameshm.stream_info("e2e-cam")["control"][0]
            now = time.monotonic_ns()
            if not modes or modes[-1][1] != mode:
                modes.append((now, mode))
                if len(modes) >= 3 and mode == frameshm.MODE_STANDBY and back_to_standby is None:
                    back_to_standby = now
                    deadline = min(deadline, now + int(3.2e9))
            if now >= next_metrics:
                try:
                    m = read_metrics("e2e-cam.inference")
                    if m:
                        inf_metrics.append((now, m))
                except frameshm.StreamNotFound:
                    pass
                next_metrics = now + 250_000_000
            time.sleep(0.02)
        cap_metrics = read_metrics("e2e-cam.capture")
        for role in ("capture", "inference", "controller"):
            roles[role].send_signal(signal.SIGTERM)
        for role, child in roles.items():
            assert child.wait(20) == 0, f"{role}: {child.stderr[-3000:]}"
    finally:
        halt.set()
        for t in threads:
            t.join(10)

    ctl_log = roles["controller"].stderr
    cap_log = roles["capture"].stderr
    # -- the controller: Standby -> Validation -> Tracking -> Standby, because of the person
    trans = transitions(ctl_log)
    core = []
    for a, b, _ in trans:
        if (a, b) == ("Validation", "Standby") and core and core[-1] == ("Standby", "Validation"):
            core.pop()  # an unconfirmed sighting, debounced away: allowed, not what we check
        else:
            core.append((a, b))
    assert core[:3] == [("Standby", "Validation"), ("Validation", "Tracking"), ("Tracking", "Standby")], ctl_log
    person_ts = [ts for _, ts, st in frames if st is not None and st.person]
    assert person_ts, "the person never appeared"
    first_person, last_person = min(person_ts), max(person_ts)
    assert trans[0][2] >= first_person, "no alarm before the person appears"
    exit_ts = next(ts for a, b, ts in trans if (a, b) == ("Tracking", "Standby"))
    assert exit_ts > last_person, "tracking lasts as long as the person is in view"

    # -- the mode (control byte 0) and the capture rate: 3 -> 30 -> 3 fps
    assert [m for _, m in modes][:3] == [0, 1, 0], modes
    t_alarm, t_back = modes[1][0], modes[2][0]
    s = 1_000_000_000
    standby1 = rate(frames, start + s // 2, t_alarm)
    alarmed = rate(frames, t_alarm + s // 2, t_back)
    standby2 = rate(frames, t_back + s // 2, frames[-1][1])
    print(f"\ne2e capture rates: standby {standby1:.1f} fps over {(t_alarm - start) / 1e9 - 0.5:.1f}s, "
          f"alarmed {alarmed:.1f} fps over {(t_back - t_alarm) / 1e9 - 0.5:.1f}s, "
          f"standby {standby2:.1f} fps over {(frames[-1][1] - t_back) / 1e9 - 0.5:.1f}s")
    assert (t_alarm - start) / 1e9 >= 3.0 and (t_back - t_alarm) / 1e9 >= 3.0
    assert (frames[-1][1] - t_back) / 1e9 >= 2.5
    assert 1.5 <= standby1 <= 6, standby1
    assert alarmed >= 15, alarmed
    assert 1.5 <= standby2 <= 6, standby2
    assert "mode Standby -> Alarmed: 30 fps (source-paced)" in cap_log
    assert "mode Alarmed -> Standby: 3 fps (source-paced)" in cap_log
    assert cap_metrics["source_paced"] is True and cap_metrics["reconnects"] == 0

    # -- frames: in order and intact
    assert all(st is not None and st.crc_ok and st.timestamp_ns == ts for _, ts, st in frames[:-1])
    nos = [st.frame_no for _, _, st in frames if st is not None]
    assert nos == sorted(nos)

    # -- inference never falls behind: skipped grows while alarmed, latency stays bounded
    during = [(t, m) for t, m in inf_metrics if t_alarm + s // 2 <= t <= t_back]
    assert len(during) >= 4, inf_metrics
    (_, m0), (_, m1) = during[0], during[-1]
    processed, skipped = m1["processed"] - m0["processed"], m1["skipped"] - m0["skipped"]
    print(f"e2e inference while alarmed: {processed} processed, {skipped} skipped, "
          f"infer {m1['infer_ms']['mean']:.0f} ms, latency {m1['latency_ms']['mean']:.0f} ms")
    assert processed >= 10 and skipped >= processed, (m0, m1)
    alarmed_dets = [(ref, rows, ts, arr) for ref, rows, ts, arr in dets if t_alarm + s // 2 <= ts <= t_back]
    latency = np.array([(arr - ts) / 1e6 for _, _, ts, arr in alarmed_dets])
    print(f"e2e detections latency while alarmed: median {np.median(latency):.0f} ms, "
          f"p90 {np.percentile(latency, 90):.0f} ms, max {latency.max():.0f} ms")
    # Bounded by the inference time of the same windows, not by a wall-clock figure: a loaded
    # machine slows the detector itself (267 ms per frame instead of ~90 ms at load 6), and
    # that is no backlog. What may come on top is the frame's age at pick-up (about a frame
    # period) and the delivery to this process.
    infer_mean = float(np.mean([m["infer_ms"]["mean"] for _, m in during]))
    infer_peak = max(m["infer_ms"]["max"] for _, m in during)
    print(f"e2e inference time while alarmed: mean {infer_mean:.0f} ms, max {infer_peak:.0f} ms")
    assert np.median(latency) < infer_mean + 150, (infer_mean, latency)
    assert np.percentile(latency, 90) < infer_peak + 250 and latency.max() < infer_peak + 700, (infer_peak, latency)
    # the frame each detection was computed from was the newest or nearly: its age at
    # pick-up is the latency minus the inference time, not a growing backlog
    ages = [m["latency_ms"]["mean"] - m["infer_ms"]["mean"] for _, m in during]
    assert np.median(ages) < 100, ages
    # detections are tied to their camera frames (seq and capture timestamp)
    by_seq = {seq: ts for seq, ts, _ in frames}
    tied = [ts == by_seq[ref] for ref, _, ts, _ in dets if ref in by_seq]
    assert len(tied) >= len(dets) - 2 and all(tied)
    refs = [ref for ref, _, _, _ in dets]
    assert refs == sorted(refs)
    # while the person was in view the detector saw her (class 0), and nobody before
    with_person = [rows for ref, rows, ts, _ in dets if first_person + s // 2 <= ts <= last_person]
    assert with_person and np.mean([len(r) > 0 and (r[:, 5] == 0).any() for r in with_person]) > 0.9
    assert all(len(rows) == 0 for ref, rows, ts, _ in dets if ts < first_person)
