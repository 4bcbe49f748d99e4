"""`frameshm gc` cleans what crashes leave: streams of dead producers, and the message
queues of dead consumers — those still named in a consumer table, and those no table
names any more (their stream is gone) — never a live process's; `--dry-run` lists the
same and removes nothing; the report is per stream.

Listing queues needs an mqueue file system. Where none is mounted, the CLI runs (as root)
in a private mount namespace with one mounted just for it (unshare), which shows the
same queues; without root the tests that need it skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import frameshm
from fshm_helpers import (child_env, create_queue, is_queue_name, proc_start_time, queue_exists, stream_dir,
                          unlink_queue)


def _mqueue_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[2] == "mqueue" for line in f if len(line.split()) > 2)


@pytest.fixture
def gc_cli(tmp_path, queue_sweep):
    """gc_cli(*args) -> (rc, stdout, stderr) of `frameshm gc ...` where queues can be listed."""
    prefix = []
    if not _mqueue_mounted():
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("no mqueue file system mounted, and no root to mount one privately")
        mnt = tmp_path / "mqueue"
        mnt.mkdir()
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount -t mqueue none "$0" && exec "$@"', str(mnt)]
        probe = subprocess.run(prefix + ["true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"cannot mount an mqueue file system privately: {probe.stderr.strip()}")

    def run(*args):
        p = subprocess.run(prefix + [sys.executable, "-m", "frameshm", "gc", *args], capture_output=True,
                           text=True, env=child_env(), timeout=60)
        return p.returncode, p.stdout, p.stderr

    return run


def _consumer(spawn, stream: str, label: str):
    child = spawn(f"""
r = frameshm.Reader({stream!r}, consumer={label!r})
announce_queue(r)
say("READY")
while not stopped():
    time.sleep(0.05)
r.close()
""", label=label)
    child.expect("READY")
    [queue] = child.queues
    assert is_queue_name(queue), queue
    return child, queue


def _ours(report: dict, pids) -> dict:
    """The report cut down to what this test made (other processes' dead queues may be
    on the machine too): {stream name: (removed, reason, [(queue, pid, consumer)])} and
    the table-less queues of our pids."""
    streams = {s["name"]: (s["removed"], s["reason"], sorted((q["queue"], q["pid"], q["consumer"])
                                                            for q in s["queues"]))
               for s in report["streams"]}
    orphans = sorted((q["queue"], q["pid"]) for q in report["queues"] if q["pid"] in pids)
    return {"streams": streams, "orphans": orphans}


def test_gc_unlinks_dead_consumers_queues_keeps_live_ones_and_dry_run_lists_the_same(spawn, gc_cli, shm_base):
    # "kept": a live producer (here), a live consumer and a SIGKILLed one.
    w = frameshm.Writer("kept", shape=(4,))
    w.publish(np.zeros(4, np.uint8))
    watcher, watcher_q = _consumer(spawn, "kept", "watcher")
    victim, victim_q = _consumer(spawn, "kept", "victim")
    # "dead": producer and consumer SIGKILLed.
    producer = spawn("""
w = frameshm.Writer("dead", shape=(4,))
w.publish(np.zeros(4, np.uint8))
say("READY")
time.sleep(600)
""", label="producer")
    producer.expect("READY")
    gone, gone_q = _consumer(spawn, "dead", "gone")
    # "vanished": a SIGKILLed consumer whose stream was then removed: no table names its queue.
    orphan, orphan_q = _consumer(spawn, "vanished", "orphan")
    for child in (victim, producer, gone, orphan):
        child.kill()
    shutil.rmtree(stream_dir("vanished"))
    dead_pids = {victim.pid, gone.pid, orphan.pid}
    queues = [watcher_q, victim_q, gone_q, orphan_q]
    try:
        rc, out, err = gc_cli("--dry-run", "--json")
        assert rc == 0, err
        dry = json.loads(out)
        assert dry["dry_run"] and dry["queue_error"] is None
        expected = {
            "streams": {
                "kept": (False, "producer", [(victim_q, victim.pid, "victim")]),
                "dead": (True, "unused", [(gone_q, gone.pid, "gone")]),
            },
            "orphans": [(orphan_q, orphan.pid)],
        }
        assert _ours(dry, dead_pids) == expected
        assert all(queue_exists(q) for q in queues), "a dry run removes nothing"
        assert stream_dir("dead").exists()
        assert frameshm.gc(dry_run=True) == [frameshm._core.stream_id_for_name("dead")]
        assert stream_dir("dead").exists() and queue_exists(victim_q)

        rc, text, err = gc_cli("--dry-run")
        assert rc == 0, err
        kept_id, dead_id = (frameshm._core.stream_id_for_name(n) for n in ("kept", "dead"))
        unlink = "would unlink the queue of a dead consumer"
        assert (f"kept (id {kept_id}): kept: a producer holds it (pid {os.getpid()})\n"
                f"    {unlink}: {victim_q} (consumer victim, pid {victim.pid}, dead)\n") in text
        assert (f"dead (id {dead_id}): would remove (no producer, no live consumer)\n"
                f"    {unlink}: {gone_q} (consumer gone, pid {gone.pid}, dead)\n") in text
        assert f"{unlink} of no stream here: {orphan_q} (pid {orphan.pid}, dead)\n" in text
        assert f"would remove 1 stream(s): {dead_id}; would unlink " in text.splitlines()[-1]

        rc, out, err = gc_cli("--json")
        assert rc == 0, err
        real = json.loads(out)
        assert not real["dry_run"] and _ours(real, dead_pids) == expected, "the real run does what the dry run said"
        assert [queue_exists(q) for q in queues] == [True, False, False, False]
        assert not stream_dir("dead").exists()
        info = frameshm.stream_info("kept")
        assert [c["name"] for c in info["consumers"]] == ["watcher"] and info["consumers_pruned"] == 1
        w.publish(np.ones(4, np.uint8))  # the live stream is untouched

        rc, out, err = gc_cli("--json")
        again = json.loads(out)
        assert _ours(again, dead_pids) == {"streams": {"kept": (False, "producer", [])}, "orphans": []}
    finally:
        watcher.stop()
        w.close()
        for q in queues:
            unlink_queue(q)
    assert not stream_dir("kept").exists()


def test_gc_judges_a_queue_by_the_owner_its_name_records(gc_cli):
    """The name holds the consumer's pid and start time: a live pid with another start
    time is a reused pid (dead owner); a name without the start time (older frameshm) is
    kept while its pid lives; a name frameshm does not make is never touched."""
    me, start = os.getpid(), proc_start_time(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid  # reaped: no such process now (a new one would need ~pid_max forks first)
    mine = f"/fshm-{me:x}-{start:x}-a1b2c3"
    reused = f"/fshm-{me:x}-{start + 1:x}-a1b2c3"
    mine_old = f"/fshm-{me:x}-a1b2c3d4"
    dead_new = f"/fshm-{dead:x}-{start:x}-a1b2c3"
    dead_old = f"/fshm-{dead:x}-a1b2c3d4"
    foreign = f"/fshm-wakebench-{me}"
    names = [mine, reused, mine_old, dead_new, dead_old, foreign]
    try:
        for n in names:
            create_queue(n)
        rc, out, err = gc_cli("--dry-run", "--json")
        assert rc == 0, err
        listed = {q["queue"]: q["pid"] for q in json.loads(out)["queues"]}
        ours = {n: listed[n] for n in names if n in listed}
        assert ours == {reused: me, dead_new: dead, dead_old: dead}
        assert all(queue_exists(n) for n in names)
        rc, out, err = gc_cli("--json")
        assert rc == 0, err
        assert {q["queue"] for q in json.loads(out)["queues"]} & set(names) == {reused, dead_new, dead_old}
        assert [queue_exists(n) for n in names] == [True, False, True, False, False, True]
    finally:
        for n in names:
            unlink_queue(n)


def test_a_readers_queue_name_records_its_owner(shm_base):
    with frameshm.Reader("named", consumer="c") as r:
        q = r._r.queue_name
        assert q == f"/fshm-{os.getpid():x}-{proc_start_time(os.getpid()):x}-{q.rsplit('-', 1)[1]}"
        assert is_queue_name(q)


def test_gc_says_when_it_cannot_list_queues(shm_base):
    if _mqueue_mounted():
        pytest.skip("an mqueue file system is mounted here")
    p = subprocess.run([sys.executable, "-m", "frameshm", "gc"], capture_output=True, text=True, env=child_env(),
                       timeout=60)
    assert p.returncode == 0
    assert p.stdout.splitlines() == [
        "message queues not checked: no mqueue file system is mounted, so message queues cannot be listed "
        "(as root: mkdir -p /dev/mqueue && mount -t mqueue none /dev/mqueue)",
        "removed 0 stream(s); unlinked 0 queue(s) of dead consumers",
    ]
    report = frameshm.admin.gc_report()
    assert report["streams"] == [] and "no mqueue file system is mounted" in report["queue_error"]
