"""The `frameshm` command line (`python -m frameshm ...`) against real streams."""

import json
import os
import re
import subprocess
import sys

import numpy as np

import frameshm
from fshm_helpers import child_env, queue_exists, stream_dir, unlink_queue, write_at


def cli(*args, timeout=60):
    proc = subprocess.run([sys.executable, "-m", "frameshm", *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def gc_summary(out: str) -> str:
    """The last line of `frameshm gc`: what it removed in all."""
    return out.strip().splitlines()[-1]


def test_version():
    rc, out, _ = cli("--version")
    first, *features = out.strip().splitlines()
    # The package and the C library it loaded agree (one version, in the C header).
    assert rc == 0 and first.startswith(f"frameshm {frameshm.__version__} (libframeshm {frameshm.__version__}, ")
    assert frameshm._core.VERSION_STRING == frameshm.__version__ == frameshm._core.HEADER_VERSION_STRING
    # Then what the build found: one line per optional feature.
    assert [f.split()[1] for f in features if f.startswith("[")] == ["v4l2", "aravis", "pipewire"]


def test_ls_without_streams():
    rc, out, err = cli("ls", "--sample", "0")
    assert (rc, out.strip(), err) == (0, "no streams", "")
    rc, out, _ = cli("ls", "--json", "--sample", "0")
    assert rc == 0 and json.loads(out) == []


def _live_stream(name):
    w = frameshm.Writer(name, shape=(8,), dtype="uint8", nslots=16)
    viewer = frameshm.Reader(name, consumer="viewer")
    logger = frameshm.Reader(name, consumer="logger")
    for i in range(5):
        w.publish(np.full(8, i, np.uint8))
    assert viewer.wait_latest(timeout=5).seq == 4
    assert logger.wait_next(timeout=5).seq == 0
    for i in range(5, 10):
        w.publish(np.full(8, i, np.uint8))
    return w, viewer, logger


def test_ls_shows_a_live_stream(name):
    w, viewer, logger = _live_stream(name)
    try:
        rc, out, err = cli("ls", "--sample", "0")
        assert rc == 0, err
        lines = out.splitlines()
        head = lines[0]
        assert head.startswith(f"{name} (id {w.stream_id}): producer alive pid {os.getpid()}, epoch 1, ")
        assert "frames 10" in head and "seq 9" in head and "slots 16 x pools 64 B" in head
        assert "fps -" in head
        cons = {m.group(1): m for m in
                (re.match(r"\s+consumer (\S+) pid (\d+) (alive|DEAD) (latest|process-all): lag (\S+),", line)
                 for line in lines[1:]) if m}
        assert set(cons) == {"viewer", "logger"}
        assert cons["viewer"].group(2, 3, 4, 5) == (str(os.getpid()), "alive", "latest", "5")
        assert cons["logger"].group(2, 3, 4, 5) == (str(os.getpid()), "alive", "process-all", "9")
        # with a sampling window: a measured rate
        rc, out, _ = cli("ls", "--sample", "0.2")
        assert rc == 0 and re.search(r"fps \d+\.\d", out.splitlines()[0])
    finally:
        viewer.close()
        logger.close()
        w.close()


def test_ls_json(name):
    w, viewer, logger = _live_stream(name)
    try:
        rc, out, err = cli("ls", "--json", "--sample", "0")
        assert rc == 0, err
        [s] = json.loads(out)
        assert (s["name"], s["stream_id"], s["producer"], s["producer_pid"]) == (name, w.stream_id, "alive", os.getpid())
        assert (s["epoch"], s["frames"], s["latest_seq_plus1"], s["nslots"]) == (1, 10, 10, 16)
        cons = {c["name"]: c for c in s["consumers"]}
        assert cons["viewer"]["last_seq_plus1"] == 5 and not cons["viewer"]["process_all"]
        assert cons["logger"]["last_seq_plus1"] == 1 and cons["logger"]["process_all"]
        assert all(c["alive"] and c["queue"].startswith("/fshm-") for c in cons.values())
    finally:
        viewer.close()
        logger.close()
        w.close()


def test_ls_namespace_and_base_dir(name, tmp_path):
    with frameshm.Writer(name, shape=(1,), namespace="ns1"):
        rc, out, _ = cli("ls", "--sample", "0")
        assert out.strip() == "no streams"
        rc, out, _ = cli("--namespace", "ns1", "ls", "--sample", "0")
        assert out.startswith(f"{name} (id ")
    other = tmp_path / "other"
    other.mkdir()
    with frameshm.Writer(name, shape=(1,), base_dir=str(other)):
        rc, out, _ = cli("--base-dir", str(other), "ls", "--json", "--sample", "0")
        assert [s["name"] for s in json.loads(out)] == [name]


def test_cli_reports_errors_without_traceback():
    rc, out, err = cli("--base-dir", "relative/dir", "ls")
    assert rc == 1
    assert err.startswith("frameshm: ") and "absolute" in err and "Traceback" not in err


def test_gc_removes_dead_streams_and_keeps_live_ones(spawn, shm_base, queue_sweep):
    dead, live, watched = "dead-stream", "live-stream", "watched-stream"
    # A producer and its consumer, both SIGKILLed.
    producer = spawn(f"""
w = frameshm.Writer({dead!r}, shape=(4,))
for i in range(5):
    w.publish(np.full(4, i, np.uint8))
say("READY")
time.sleep(600)
""", label="producer")
    producer.expect("READY")
    reader = spawn(f"""
r = frameshm.Reader({dead!r}, consumer="gone")
announce_queue(r)
r.wait_latest(timeout=10)
say("READY")
time.sleep(600)
""", label="reader")
    reader.expect("READY")
    [queue] = reader.queues
    # A stream whose producer died but which a live consumer still watches.
    producer2 = spawn(f"""
w = frameshm.Writer({watched!r}, shape=(4,))
w.publish(np.zeros(4, np.uint8))
say("READY")
time.sleep(600)
""", label="producer2")
    producer2.expect("READY")
    watcher = frameshm.Reader(watched, consumer="watcher")
    try:
        with frameshm.Writer(live, shape=(4,)) as w:
            w.publish(np.zeros(4, np.uint8))
            producer.kill()
            reader.kill()
            producer2.kill()
            rc, out, _ = cli("ls", "--sample", "0")
            assert rc == 0
            assert re.search(rf"^{dead} \(id \d+\): producer dead pid {producer.pid},", out, re.M)
            assert re.search(rf"consumer gone pid {reader.pid} DEAD latest", out)
            assert re.search(rf"^{live} \(id \d+\): producer alive", out, re.M)

            rc, out, err = cli("gc")
            assert rc == 0, err
            dead_id = frameshm._core.stream_id_for_name(dead)
            assert gc_summary(out).startswith(f"removed 1 stream(s): {dead_id}; unlinked ")
            assert f"{dead} (id {dead_id}): removed (no producer, no live consumer)\n" in out
            assert f"    unlinked the queue of a dead consumer: {queue} (consumer gone, pid {reader.pid}, dead)" in out
            assert not stream_dir(dead).exists()
            assert not queue_exists(queue), "gc unlinks dead consumers' queues"
            assert stream_dir(live).exists() and stream_dir(watched).exists()
            names = sorted(s["name"] for s in frameshm.list_streams())
            assert names == sorted([live, watched])
            assert frameshm.stream_info(watched)["producer"] == "dead"
            w.publish(np.ones(4, np.uint8))  # the live stream is untouched
            assert gc_summary(cli("gc")[1]).startswith("removed 0 stream(s); unlinked ")
    finally:
        watcher.close()
        unlink_queue(queue)
    assert not stream_dir(live).exists()
    # The watched stream's consumer left: now gc takes it too.
    rc, out, _ = cli("gc")
    assert gc_summary(out).startswith(f"removed 1 stream(s): {frameshm._core.stream_id_for_name(watched)};")
    assert frameshm.list_streams() == []


def test_gc_removes_closed_and_corrupt_streams(name, queue_sweep):
    w = frameshm.Writer(name, shape=(1,), unlink_on_close=False)
    w.close()
    w2 = frameshm.Writer("corrupt-stream", shape=(1,), unlink_on_close=False)
    w2.close()
    write_at(stream_dir("corrupt-stream") / "frameshm.ctl", 0, b"garbage!")
    rc, out, _ = cli("ls", "--sample", "0")
    assert rc == 0
    assert re.search(r"^\s*\d+\s+\?\s+CORRUPT: .*bad magic", out, re.M)
    assert re.search(rf"^{name} \(id \d+\): producer closed", out, re.M)
    rc, out, _ = cli("ls", "--json", "--sample", "0")
    by_id = {s["stream_id"]: s for s in json.loads(out)}
    assert "bad magic" in by_id[frameshm._core.stream_id_for_name("corrupt-stream")]["error"]
    rc, out, _ = cli("gc")
    assert rc == 0 and gc_summary(out).startswith("removed 2 stream(s)")
    corrupt_id = frameshm._core.stream_id_for_name("corrupt-stream")  # its name is unreadable now
    assert f"stream (id {corrupt_id}): removed (control region failed validation, no producer)\n" in out
    assert re.search(rf"^{name} \(id \d+\): removed \(no producer, no live consumer\)$", out, re.M)
    assert frameshm.list_streams() == []
    assert not stream_dir(name).exists() and not stream_dir("corrupt-stream").exists()


def test_gc_api_matches_cli(name, queue_sweep):
    w = frameshm.Writer(name, shape=(1,), unlink_on_close=False)
    sid = w.stream_id
    w.close()
    assert frameshm.gc() == [sid]
    assert frameshm.gc() == []
