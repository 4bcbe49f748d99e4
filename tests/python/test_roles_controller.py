"""Controller: the sentry state machine transition by transition (table-driven, counted
in frames and timed in seconds), the person filter, the mode in control byte 0 and the
state in byte 1, and the real controller process writing them from a detections stream
fed by the test — including the timed release behind a detector that takes a second a
frame."""

import signal
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import queue_exists, wait_until
from frameshm.roles import mode as M
from frameshm.roles.controller import MODE_OF_STATE, Sentry, State, person_in

S, V, T = State.STANDBY, State.VALIDATION, State.TRACKING

# (validation_frames, tracking_exit_frames, input per detection frame, expected state after each)
TABLE = [
    ("nobody stays standby", 3, 2, "000", [S, S, S]),
    ("a sighting starts validation", 3, 2, "1", [V]),
    ("validation confirmed after 3 in a row", 3, 2, "111", [V, V, T]),
    ("a miss during validation aborts it", 3, 2, "1101", [V, V, S, V]),
    ("validation restarts from one after an abort", 3, 2, "11011", [V, V, S, V, V]),
    ("tracking survives fewer misses than the exit count", 3, 3, "11100100", [V, V, T, T, T, T, T, T]),
    ("tracking ends after exit-count misses in a row", 3, 3, "111000", [V, V, T, T, T, S]),
    ("a sighting resets the miss count", 3, 2, "11101010", [V, V, T, T, T, T, T, T]),
    ("back in standby it takes a new validation", 3, 1, "11101", [V, V, T, S, V]),
    ("validation_frames=1 goes straight to tracking", 1, 2, "1001", [T, T, S, T]),
    ("validation_frames=2", 2, 1, "1101", [V, T, S, V]),
    ("tracking_exit_frames=1 leaves on the first miss", 2, 1, "110", [V, T, S]),
]


@pytest.mark.parametrize("vf, exit_frames, inputs, expected", [row[1:] for row in TABLE], ids=[r[0] for r in TABLE])
def test_sentry_transitions(vf, exit_frames, inputs, expected):
    sm = Sentry(validation_frames=vf, tracking_exit_frames=exit_frames)
    assert sm.state is S and sm.mode == frameshm.MODE_STANDBY
    got = []
    for ch in inputs:
        got.append(sm.step(ch == "1"))
        assert sm.state is got[-1]
        assert sm.mode == (frameshm.MODE_STANDBY if sm.state is S else frameshm.MODE_ALARMED)
    assert got == expected


# (tracking_exit_frames, tracking_exit_s, (person?, capture time in s) per detection frame,
#  expected state after each); validation_frames = 2 throughout
TIMED = [
    ("a slow detector: the first miss 2 s after the last sighting releases", 10, 1.5,
     [(1, 0), (1, 1), (0, 2), (0, 3)], [V, T, T, S]),
    ("the time counts from the last sighting, not from the first miss", 10, 1.5,
     [(1, 0), (1, 1), (0, 1.4), (1, 2), (0, 3), (0, 3.5)], [V, T, T, T, T, S]),
    ("exactly tracking_exit_s releases", 10, 1.5, [(1, 0), (1, 1), (0, 2.5)], [V, T, S]),
    ("a fast detector: the frame count comes first", 3, 1.5,
     [(1, 0), (1, 0.03), (0, 0.07), (0, 0.1), (0, 0.13)], [V, T, T, T, S]),
    ("0 s: frames only", 3, 0, [(1, 0), (1, 1), (0, 10), (0, 20), (0, 30)], [V, T, T, T, S]),
    ("a clock going back counts as no time", 10, 1.5, [(1, 5), (1, 6), (0, 1), (0, 7)], [V, T, T, T]),
    ("entry is counted in frames, however far apart", 10, 1.5, [(1, 0), (0, 60), (1, 61), (1, 120)], [V, S, V, T]),
]


@pytest.mark.parametrize("exit_frames, exit_s, steps, expected", [row[1:] for row in TIMED],
                         ids=[r[0] for r in TIMED])
def test_sentry_timed_release(exit_frames, exit_s, steps, expected):
    sm = Sentry(validation_frames=2, tracking_exit_frames=exit_frames, tracking_exit_s=exit_s)
    got = [sm.step(bool(p), int(t * 1e9)) for p, t in steps]
    assert got == expected


def test_sentry_without_timestamps_counts_frames():
    sm = Sentry(validation_frames=1, tracking_exit_frames=3, tracking_exit_s=0.5)
    assert [sm.step(p) for p in (True, False, False, False)] == [T, T, T, S]
    assert sm.unseen_ns == 0


def test_mode_mapping_and_bad_thresholds():
    assert MODE_OF_STATE == {S: frameshm.MODE_STANDBY, V: frameshm.MODE_ALARMED, T: frameshm.MODE_ALARMED}
    for bad in ({"validation_frames": 0}, {"tracking_exit_frames": -1}, {"validation_frames": 2.5},
                {"tracking_exit_frames": True}, {"tracking_exit_s": -1}, {"tracking_exit_s": True},
                {"tracking_exit_s": float("nan")}, {"tracking_exit_s": "2"}):
        with pytest.raises(frameshm.InvalidArgument):
            Sentry(**bad)


def test_tracking_exit_s_config():
    from frameshm.config import ConfigError, from_dict

    assert from_dict({}).controller.tracking_exit_s == 2.0
    assert from_dict({"controller": {"tracking_exit_s": 0}}).controller.tracking_exit_s == 0.0
    for table, msg in [({"tracking_exit_s": -1}, r"\[controller\] tracking_exit_s: expected a number >= 0"),
                       ({"tracking_exit_s": "2s"}, r"\[controller\] tracking_exit_s: expected a number"),
                       ({"tracking_exit": 2}, r"unknown key 'tracking_exit' in \[controller\] "
                                              r"\(did you mean 'tracking_exit_s'\?\)")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"controller": table})


def test_the_state_byte_names_every_state(name, shm_base):
    assert M.STATE_CONTROL == 1 and set(M.STATE_CODES) == {str(s) for s in State}
    assert M.STATE_NONE not in M.STATE_NAMES
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name, subscribe=False) as ctl:
        assert M.read_state(ctl) is None
        for st in State:
            M.write_state(ctl, str(st))
            assert M.read_state(w) == str(st) and M.read_mode(w) == M.MODE_STANDBY  # byte 0 untouched
        M.write_state(ctl, None)
        assert w.control(1) == 0 and M.read_state(w) is None
        w.set_control(1, 200)
        assert M.read_state(ctl) is None


def test_the_mode_is_control_byte_0_and_strangers_read_as_standby(name, shm_base):
    assert (M.MODE_CONTROL, M.MODE_STANDBY, M.MODE_ALARMED) == (0, 0, 1)
    assert (frameshm.MODE_STANDBY, frameshm.MODE_ALARMED) == (M.MODE_STANDBY, M.MODE_ALARMED)
    assert [M.mode_of(v) for v in (0, 1, 2, 77, 255)] == [M.MODE_STANDBY, M.MODE_ALARMED] + [M.MODE_STANDBY] * 3
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name, subscribe=False) as ctl:
        assert M.read_mode(w) == M.read_mode(ctl) == M.MODE_STANDBY
        M.write_mode(ctl, M.MODE_ALARMED)
        assert w.control(0) == M.MODE_ALARMED and M.read_mode(w) == M.MODE_ALARMED
        assert [w.control(i) for i in range(1, 8)] == [0] * 7  # the other bytes are not the pipeline's
        w.set_control(0, 77)
        assert M.read_mode(ctl) == M.MODE_STANDBY


def test_person_filter():
    dets = np.array([[0, 0, 10, 10, 0.3, 0], [0, 0, 10, 10, 0.9, 2], [0, 0, 10, 10, 0.6, 0]], np.float32)
    assert person_in(np.zeros((0, 6), np.float32)) == (False, 0, 0.0)
    assert person_in(dets) == (True, 3, pytest.approx(0.9))
    assert person_in(dets, min_score=0.5) == (True, 2, pytest.approx(0.9))
    assert person_in(dets, classes=[0]) == (True, 2, pytest.approx(0.6))
    assert person_in(dets, min_score=0.7, classes=[0]) == (False, 0, 0.0)
    assert person_in(dets, classes=[5, 7]) == (False, 0, 0.0)


# ---- the controller process ------------------------------------------------------------------


def start_role(spawn, *argv):
    return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=argv[0])


PERSON = np.array([[10, 20, 50, 120, 0.9, 0]], np.float32)
WEAK = np.array([[10, 20, 50, 120, 0.1, 0]], np.float32)
CAT = np.array([[10, 20, 50, 120, 0.9, 15]], np.float32)
NOBODY = np.zeros((0, 6), np.float32)


def test_controller_process_drives_the_mode_byte(spawn, tmp_path):
    frames_name, dets_name = "ctl-cam", "ctl-cam.dets"  # FRAMESHM_DIR is private to the test
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
[streams]
frames = "{frames_name}"
detections = "{dets_name}"
[controller]
validation_frames = 3
tracking_exit_frames = 2
tracking_exit_s = 0          # counted in frames only: the feed below runs on the real clock
min_score = 0.5
classes = [0]
""")
    # the test plays capture (owner of the frames stream) and inference (detections)
    cam = frameshm.Writer(frames_name, shape=(8, 8), dtype="uint8")
    dets = frameshm.Writer(dets_name, dtype="float32", max_bytes=4096)
    ctl = start_role(spawn, "controller", "--config", str(cfg))
    try:
        wait_until(lambda: any(c["name"] == "controller" for c in frameshm.stream_info(dets_name)["consumers"]),
                   20, what="controller registered on the detections stream")
        cam.mode = frameshm.MODE_ALARMED
        wait_until(lambda: cam.mode == frameshm.MODE_STANDBY, 10, what="controller writes Standby at start")

        seq = [0]

        def feed(rows, expect_state, expect_mode):
            cam.publish(np.zeros((8, 8), np.uint8))
            ts = time.monotonic_ns()
            s = dets.publish(rows, timestamp_ns=ts, ref_seq=seq[0])
            seq[0] += 1
            # the controller consumed it (its consumer entry took this seq)
            wait_until(lambda: next(c for c in frameshm.stream_info(dets_name)["consumers"]
                                    if c["name"] == "controller")["last_seq_plus1"] == s + 1,
                       10, what=f"controller took detections seq {s}")
            if expect_mode is not None:
                wait_until(lambda: cam.mode == expect_mode, 5, what=f"mode {expect_mode}")
            return ts

        def transitions():
            return [line.split("INFO: ", 1)[1].split(":", 1)[0]
                    for line in ctl.stderr.splitlines() if " -> " in line]

        assert M.read_state(cam) == "Standby"
        feed(PERSON, V, frameshm.MODE_ALARMED)
        wait_until(lambda: transitions() == ["Standby -> Validation"], 5, what="transition logged")
        assert M.read_state(cam) == "Validation", "the state byte is written before the mode"
        feed(WEAK, S, frameshm.MODE_STANDBY)       # below min_score: nobody, validation aborted
        feed(CAT, S, frameshm.MODE_STANDBY)        # not a person class
        feed(PERSON, V, frameshm.MODE_ALARMED)
        feed(PERSON, V, frameshm.MODE_ALARMED)
        ts = feed(PERSON, T, frameshm.MODE_ALARMED)
        wait_until(lambda: len(transitions()) == 4, 5, what="four transitions")
        # the mode stays Alarmed from Validation to Tracking: only the state byte tells
        wait_until(lambda: M.read_state(cam) == "Tracking", 5, what="state byte Tracking")
        assert transitions() == ["Standby -> Validation", "Validation -> Standby",
                                 "Standby -> Validation", "Validation -> Tracking"]
        assert f"(ts {ts} ns)" in ctl.stderr, "a transition names the frame that caused it"
        feed(NOBODY, T, frameshm.MODE_ALARMED)     # one miss of two
        feed(PERSON, T, frameshm.MODE_ALARMED)     # resets the miss count
        feed(NOBODY, T, frameshm.MODE_ALARMED)
        assert cam.mode == frameshm.MODE_ALARMED
        feed(NOBODY, S, frameshm.MODE_STANDBY)
        wait_until(lambda: transitions()[-1:] == ["Tracking -> Standby"], 5, what="tracking ended")
        assert len(transitions()) == 5

        # metrics stream and the --status command
        from frameshm.roles import read_metrics

        m = wait_until(lambda: (read_metrics(f"{frames_name}.controller") or {}).get("detection_frames") == 10
                       and read_metrics(f"{frames_name}.controller"), 5, what="controller metrics")
        assert m["state"] == "Standby" and m["transitions"] == 5 and m["person_frames"] == 5
        assert m["last_transition"]["to"] == "Standby"

        # back to alarmed, then a clean stop resets the mode to Standby
        for _ in range(3):
            feed(PERSON, None, None)
        wait_until(lambda: cam.mode == frameshm.MODE_ALARMED, 5, what="alarmed again")
        queues = [c["queue"] for s in (frames_name, dets_name) for c in frameshm.stream_info(s)["consumers"]
                  if c["name"] == "controller"]
        # it consumes detections; the frames stream's mode byte needs no registration
        assert len(queues) == 1 and all(queue_exists(q) for q in queues)
        assert not [c for c in frameshm.stream_info(frames_name)["consumers"] if c["name"] == "controller"]
        ctl.send_signal(signal.SIGTERM)
        assert ctl.wait(20) == 0, ctl.stderr
        assert not any(queue_exists(q) for q in queues), "the controller unlinked its queue"
        assert cam.mode == frameshm.MODE_STANDBY
        assert M.read_state(cam) is None, "no controller, no state"
        assert "mode reset to Standby" in ctl.stderr
        for s in (frames_name, dets_name):
            assert not [c for c in frameshm.stream_info(s)["consumers"] if c["name"] == "controller"]
    finally:
        cam.close()
        dets.close()


def test_controller_warns_when_detections_stall_and_stops_on_sigint(spawn):
    ctl = start_role(spawn, "controller", "--frames", "stall-cam", "--set", "controller.stall_warning_s=0.3",
                     "--set", "controller.metrics=false")
    ctl_line = wait_until(lambda: "no detections from" in ctl.stderr, 20, what="stall warning")
    assert ctl_line
    ctl.send_signal(signal.SIGINT)
    assert ctl.wait(20) == 0, ctl.stderr
    assert "SIGINT received" in ctl.stderr


def test_controller_releases_tracking_in_seconds_behind_a_slow_detector(spawn, tmp_path):
    """Detections come once a second (capture timestamps 1 s apart, as from a detector at
    1 fps): with tracking_exit_frames = 30 the camera would stay Alarmed for 30 s after the
    person left; tracking_exit_s = 2.5 releases it at the first frame without a person
    captured 2.5 s after the last one with. Entry still takes validation_frames frames."""
    frames_name, dets_name = "slow-cam", "slow-cam.detections"
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
[streams]
frames = "{frames_name}"
[controller]
validation_frames = 2
tracking_exit_frames = 30
tracking_exit_s = 2.5
classes = [0]
""")
    cam = frameshm.Writer(frames_name, shape=(8, 8), dtype="uint8")
    dets = frameshm.Writer(dets_name, dtype="float32", max_bytes=4096)
    ctl = start_role(spawn, "controller", "--config", str(cfg))
    try:
        wait_until(lambda: any(c["name"] == "controller" for c in frameshm.stream_info(dets_name)["consumers"]),
                   20, what="controller registered on the detections stream")
        wait_until(lambda: M.read_state(cam) == "Standby", 10, what="controller state Standby at start")
        t0 = time.monotonic_ns()

        def feed(rows, t_s, expect):
            s = dets.publish(rows, timestamp_ns=t0 + int(t_s * 1e9), ref_seq=int(t_s))
            wait_until(lambda: next(c for c in frameshm.stream_info(dets_name)["consumers"]
                                    if c["name"] == "controller")["last_seq_plus1"] == s + 1,
                       10, what=f"controller took detections seq {s}")
            wait_until(lambda: M.read_state(cam) == expect, 10, what=f"state {expect} after t={t_s}s")

        feed(PERSON, 0, "Validation")
        feed(PERSON, 1, "Tracking")     # validation_frames = 2
        feed(PERSON, 2, "Tracking")     # the last sighting
        feed(NOBODY, 3, "Tracking")     # 1 s without
        feed(NOBODY, 4, "Tracking")     # 2 s without
        assert cam.mode == frameshm.MODE_ALARMED
        feed(NOBODY, 5, "Standby")      # 3 s >= 2.5 s: released after 3 misses of the 30 the count wants
        wait_until(lambda: cam.mode == frameshm.MODE_STANDBY, 5, what="mode Standby (written after the state)")
        wait_until(lambda: "Tracking -> Standby" in ctl.stderr, 5, what="release logged")
        lines = [x for x in ctl.stderr.splitlines() if "Tracking -> Standby" in x]
        assert len(lines) == 1, lines
        line = lines[0]  # released by the frame captured at t0 + 5 s, not earlier
        assert f"(ts {t0 + 5_000_000_000} ns)" in line and "after 3.0s without a person" in line, line
        from frameshm.roles import read_metrics

        # the metrics follow the state byte (published at the transition)
        m = wait_until(lambda: (read_metrics(f"{frames_name}.controller") or {}).get("transitions") == 3
                       and read_metrics(f"{frames_name}.controller"), 5, what="metrics of the release")
        assert m["state"] == "Standby" and m["transitions"] == 3 and m["unseen_s"] == 3.0, m
        assert m["detection_frames"] == 6 and m["person_frames"] == 3, m
        ctl.send_signal(signal.SIGTERM)
        assert ctl.wait(20) == 0, ctl.stderr
        assert M.read_state(cam) is None and cam.mode == frameshm.MODE_STANDBY
    finally:
        cam.close()
        dets.close()
