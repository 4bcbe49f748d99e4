"""Recording and replay with real processes and files: `frameshm record` records a frames
stream and its detections, `frameshm replay` republishes them bit-exact with the recorded
timestamp spacing and ref_seq references; a recorder killed with SIGKILL mid-write leaves a
readable (and replayable) recording; segments rotate; export to MP4 decodes back."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import frameshm
from fshm_helpers import child_env, frame_seq_ok, make_frame, wait_until
from frameshm.recording import SEGMENT_HEADER, Recorder, Recording, scan_segment
from frameshm.replay import Replayer, export_mp4

SHAPE = (60, 80, 3)


def cli(*argv):
    return [sys.executable, "-m", "frameshm", *argv]


def consumers(name):
    try:
        return len(frameshm.stream_info(name)["consumers"])
    except frameshm.StreamNotFound:
        return 0


def frame(i):
    return make_frame(i, int(np.prod(SHAPE))).reshape(SHAPE)


def detections(i):
    """A deterministic 'detector': box count and values from the frame's index."""
    return np.full((i % 3, 6), i, np.float32)


def publish_run(name, n, fps=50.0):
    """Frames and, for each, a detections message whose ref_seq is the frame's seq."""
    with frameshm.Writer(name, shape=SHAPE, nslots=16) as w, \
            frameshm.Writer(name + ".detections", max_bytes=1024, nslots=16) as d:
        wait_until(lambda: consumers(name) >= 1 and consumers(name + ".detections") >= 1, 30, what="the recorder")
        t0 = time.monotonic_ns()
        for i in range(n):
            ts = t0 + int(i * 1e9 / fps)
            time.sleep(max(0.0, (ts - time.monotonic_ns()) / 1e9))
            seq = w.publish(frame(i), timestamp_ns=ts)
            d.publish(detections(i), timestamp_ns=ts + 1_000_000, ref_seq=seq)
        time.sleep(0.3)


def test_record_then_replay_is_bit_exact_with_timing_and_references(tmp_path, shm_base):
    name, n, out = "rr-cam", 40, str(tmp_path / "run1")
    env = child_env()
    rec = subprocess.Popen(cli("record", "--stream", name, "--stream", name + ".detections", "--out", out,
                               "--frames", str(n), "--quiet"), env=env, stdout=subprocess.PIPE, text=True)
    publish_run(name, n)
    assert rec.wait(30) == 0
    info = json.loads(subprocess.run(cli("record", "--info", out, "--json", "--verify"), env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert info["streams"][name]["frames"] == n and info["streams"][name + ".detections"]["frames"] == n
    assert info["streams"][name + ".detections"]["ref_stream"] == name and info["problems"] == []
    assert info["streams"][name]["shapes"] == {"60x80x3 uint8": n}

    got = {name: [], name + ".detections": []}
    readers = {k: frameshm.Reader(k, consumer="check", spin=False) for k in got}

    def drain(k):
        for f in readers[k].frames(latest=False, timeout=10):
            got[k].append((f.seq, f.timestamp_ns, f.ref_seq, f.copy()))
            if len(got[k]) == n:
                return

    threads = [threading.Thread(target=drain, args=(k,)) for k in got]
    for t in threads:
        t.start()
    rp = subprocess.run(cli("replay", out, "--speed", "2", "--wait-consumers", "1", "--lossless"), env=env,
                        capture_output=True, text=True, timeout=60)
    assert rp.returncode == 0, rp.stderr
    for t in threads:
        t.join(20)
    for r in readers.values():
        r.close()
    frames, dets = got[name], got[name + ".detections"]
    assert len(frames) == n and len(dets) == n
    for i, (seq, ts, _, arr) in enumerate(frames):
        assert np.array_equal(arr, frame(i)) and frame_seq_ok(arr) == i
    # Timestamps keep the recorded spacing exactly (20 ms frames, detections 1 ms after).
    assert set(np.diff([ts for _, ts, _, _ in frames]).tolist()) <= {20_000_000, 19_999_999, 20_000_001}
    by_seq = {seq: i for i, (seq, _, _, _) in enumerate(frames)}
    for i, (_, ts, ref, arr) in enumerate(dets):
        assert np.array_equal(arr, detections(i))
        assert by_seq[ref] == i, "ref_seq points at the replayed frame it was computed on"
        assert ts - frames[i][1] == 1_000_000


def test_sigkilled_recorder_leaves_a_readable_replayable_recording(tmp_path, shm_base, spawn):
    name, out = "rr-kill", str(tmp_path / "run2")
    prod = spawn(f"""
        from fshm_helpers import make_frame
        w = frameshm.Writer({name!r}, shape={SHAPE!r}, nslots=64)
        say("READY")
        i = 0
        while not stopped():
            w.publish(make_frame(i, {int(np.prod(SHAPE))}).reshape({SHAPE!r}))
            i += 1
            time.sleep(0.002)
        w.close()
    """, label="producer")
    prod.expect("READY")
    rec = subprocess.Popen(cli("record", "--stream", name, "--out", out, "--segment-mb", "0.5", "--quiet"),
                           env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    segdir = tmp_path / "run2" / name

    def written():
        return sum(p.stat().st_size for p in segdir.glob("*.fsr")) if segdir.exists() else 0

    wait_until(lambda: written() > 2_000_000, 60, what="the recorder writing")
    rec.send_signal(signal.SIGKILL)
    rec.wait(20)
    prod.stop()
    segs = sorted(segdir.glob("*.fsr"))
    assert len(segs) >= 4, "rotated at 0.5 MB"
    # A record cut short, as a kill inside a write would leave it: ignored by the reader.
    with open(segs[-1], "ab") as f:
        f.write(b"FSRC" + b"\x80\0\0\0" + b"\x01" * 100)
    # A segment created just before the kill, nothing in it yet: the next recorder numbers past it.
    last_id = int(segs[-1].name[4:-4])
    (segdir / f"seg-{last_id + 1:06d}.fsr").write_bytes(segs[-1].read_bytes()[:SEGMENT_HEADER])
    with Recording(out) as r:
        recs = r.records([name])
        # Every complete record in the files is there, indexed or not, in segments the
        # manifest knows or not (the recorder may die before committing a new segment's row).
        assert len(recs) >= 2_000_000 // (int(np.prod(SHAPE)) + 128) - 1
        assert len(recs) == sum(len(scan_segment(str(p), name)[0]) for p in segdir.glob("*.fsr"))
        idx = [frame_seq_ok(r.read(x)) for x in recs]
        assert None not in idx and idx == sorted(idx)
        assert np.array_equal(r.read(recs[-1]), frame(idx[-1]))
        assert r.verify() == []
        recovered = len(r.recovered)
    # Appending indexes what the killed recorder had not, then replaying reproduces it.
    rec2 = Recorder(out, [name], max_frames=1)
    assert rec2.indexed_recovered == recovered
    rec2.run(duration=0.2)
    with Recording(out) as r:
        assert r.recovered == [] and len(r.records([name])) == len(recs)
        assert r.info()["sessions"] == 2
    reader = frameshm.Reader(name, consumer="check", spin=False)
    seen = []

    def drain():
        for f in reader.frames(latest=False, timeout=10):
            seen.append(frame_seq_ok(f.copy()))
            if len(seen) == len(recs):
                return
            time.sleep(0.002)  # slower than a replay at full speed

    t = threading.Thread(target=drain)
    t.start()
    rp = Replayer(out, [name], speed=None, nslots=8, lossless=True, wait_consumers=1)
    rp.run()
    t.join(20)
    reader.close()
    assert seen == idx, "as fast as possible, yet nothing lost: the replay waited for its reader"
    assert rp.waits > 0


def test_every_nth_and_export_to_mp4(tmp_path, shm_base):
    name, out, out_fps = "rr-exp", str(tmp_path / "run3"), str(tmp_path / "run3-fps")
    rec = Recorder(out, [name], every=2, max_frames=10)
    rec_fps = Recorder(out_fps, [name], max_fps=12.5, max_frames=10)  # frames 40 ms apart: every other
    t = threading.Thread(target=rec.run, kwargs=dict(duration=30))
    t_fps = threading.Thread(target=rec_fps.run, kwargs=dict(duration=30))
    t.start()
    t_fps.start()
    with frameshm.Writer(name, shape=(64, 96, 3), nslots=32) as w:
        wait_until(lambda: consumers(name) >= 2, 30, what="the recorders")
        t0 = time.monotonic_ns()
        for i in range(20):
            a = np.zeros((64, 96, 3), np.uint8)
            a[..., 0] = 10 * i
            w.publish(a, timestamp_ns=t0 + i * 40_000_000)
            time.sleep(0.005)
        t.join(30)
        t_fps.join(30)
    for path in (out, out_fps):
        with Recording(path) as r:
            recs = r.records()
            assert [int(r.read(x)[0, 0, 0]) for x in recs] == [10 * i for i in range(0, 20, 2)]
    mp4 = str(tmp_path / "out.mp4")
    r = subprocess.run(cli("record", "--export", mp4, "--stream", name, out), env=dict(os.environ),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"{mp4}: 10 frames of {name}", r.stderr
    assert export_mp4(out, name, str(tmp_path / "mpeg4.mp4"), codec="mpeg4") == 10
    import av

    with av.open(mp4) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.video[0].codec_context.name in ("h264", "libx264", "mpeg4")
    assert len(decoded) == 10
    assert [round(float(np.median(a[..., 0])) / 20) for a in decoded] == list(range(10))


def test_errors_are_frameshm_errors(tmp_path):
    from frameshm.recording import RecordingError

    with pytest.raises(RecordingError):
        Recording(str(tmp_path))
    (tmp_path / "x").write_text("hi")
    with pytest.raises(RecordingError):
        Recorder(str(tmp_path), ["a"])
    with pytest.raises(frameshm.InvalidArgument):
        Recorder(str(tmp_path / "new"), [])
    assert issubclass(RecordingError, frameshm.FrameshmError)
    r = subprocess.run(cli("record", "--info", str(tmp_path)), env=dict(os.environ), capture_output=True, text=True)
    assert r.returncode == 1 and "not a frameshm recording" in r.stderr


def test_replay_uri_as_a_capture_source(tmp_path, shm_base):
    from frameshm.sources import open_source

    name, out = "rr-src", str(tmp_path / "run4")
    rec = Recorder(out, [name], max_frames=12)
    t = threading.Thread(target=rec.run, kwargs=dict(duration=30))
    t.start()
    with frameshm.Writer(name, shape=SHAPE, nslots=32) as w:
        wait_until(lambda: consumers(name) >= 1, 30, what="the recorder")
        t0 = time.monotonic_ns()
        for i in range(12):
            w.publish(frame(i), timestamp_ns=t0 + i * 10_000_000)
        t.join(30)
    src = open_source(f"replay:{out}?loop=1&speed=max")
    src.open()
    buf = np.empty(src.shape, src.dtype)
    ts = []
    for i in range(18):
        ts.append(src.read_into(buf, 1.0))
        assert np.array_equal(buf, frame(i % 12))
    src.close()
    assert np.all(np.diff(ts) == 10_000_000), "recorded spacing, continued across the loop"
    with pytest.raises(frameshm.InvalidArgument):
        open_source(f"replay:{out}?stream=nope").open()


def _by_content(rec, frames_stream):
    """crc32 of each recorded frame -> its seq, and seq -> crc32."""
    seq_of, crc_of = {}, {}
    for r in rec.records([frames_stream]):
        c = zlib.crc32(rec.read(r))
        seq_of[c], crc_of[r.seq] = r.seq, c
    return seq_of, crc_of


def test_replay_through_inference_gives_the_live_runs_detections(spawn, tmp_path):
    """Live: capture (test pattern) -> inference (a deterministic detector), both streams
    recorded. Then the recorded frames replayed under a new name through a new inference
    role: every frame both runs processed gets the same detections."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def role(*argv, label):
        return spawn(f"from frameshm.cli import main\nsys.exit(main({list(argv)!r}))\n", label=label, env_extra=env)

    live, out1, out2 = "li-cam", str(tmp_path / "live"), str(tmp_path / "replayed")
    cap = role("capture", "--frames", live, "--source", "test:?width=160&height=120&fps=20", "--standby-fps", "20",
               label="capture")
    inf = role("inference", "--frames", live, "--detector", "content_detector:ContentDetector", label="inference")
    stop1, stop2 = threading.Event(), threading.Event()
    rec1 = Recorder(out1, [live, live + ".detections"])
    t1 = threading.Thread(target=rec1.run, args=(stop1,))
    t1.start()
    try:
        wait_until(lambda: rec1.recorders[1].frames >= 25, 60, interval=0.1, what="live detections recorded")
    finally:
        stop1.set()
        t1.join(20)
    for child in (cap, inf):
        child.send_signal(signal.SIGTERM)
        assert child.wait(20) == 0

    replayed = "lr-cam"
    inf2 = role("inference", "--frames", replayed, "--detector", "content_detector:ContentDetector", label="inference2")
    rec2 = Recorder(out2, [replayed, replayed + ".detections"])
    t2 = threading.Thread(target=rec2.run, args=(stop2,))
    t2.start()
    try:
        n = Replayer(out1, [live], rename={live: replayed}, speed=1.0, wait_consumers=2).run()
        wait_until(lambda: rec2.recorders[0].frames == n, 20, interval=0.1, what="the replay recorded")
        time.sleep(0.5)  # the last detections
        inf2.send_signal(signal.SIGTERM)
        assert inf2.wait(20) == 0
    finally:
        stop2.set()
        t2.join(20)

    with Recording(out1) as r1, Recording(out2) as r2:
        live_seq_of, live_crc = _by_content(r1, live)
        _, replay_crc = _by_content(r2, replayed)
        assert sorted(replay_crc.values()) == sorted(live_crc.values()), "every frame replayed bit-exact"
        live_dets = {d.ref_seq: r1.read(d) for d in r1.records([live + ".detections"])}
        same = 0
        for d in r2.records([replayed + ".detections"]):
            orig = live_seq_of[replay_crc[d.ref_seq]]
            if orig in live_dets:
                assert np.array_equal(r2.read(d), live_dets[orig]), f"frame {orig}: different detections"
                same += 1
    assert same >= 10, f"only {same} frames processed by both runs"
