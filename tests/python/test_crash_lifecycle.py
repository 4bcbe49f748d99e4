"""Issue 14, items 3 and 4: what crashes and other local users can do to the consumer
lifecycle.

* A consumer SIGKILLed at any moment of opening or closing a Reader leaves nothing the
  producer's pruning or `frameshm gc` does not remove: no message queue, no stuck
  consumer-table slot, and all 64 consumers still fit (kill-at-random-moment harness,
  lifecycle_killer.py, 200 kills).
* When no message queue can be had (the system-wide queues_max reached, or this user's
  RLIMIT_MSGQUEUE), a new Reader goes on without one and still gets every kind of frame
  (wait_latest, wait_next, max_rate_hz), woken by a futex on the control region.

Queues are counted in an mqueue file system. As root the harness runs in a private IPC
and mount namespace (its own queues, its own fs.mqueue limits, an mqueue mounted just
for it), so nothing else on the machine is counted or disturbed; without root it needs
/dev/mqueue mounted, and fails saying so otherwise (CI runs as root).
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
from frameshm.admin import stream_info
from fshm_helpers import child_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _mqueue_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "mqueue":
                return parts[1]
    return ""


def _private_ipc_prefix(mnt) -> list:
    """Runs a command in a new IPC + mount namespace with an mqueue fs at mnt (root)."""
    assert os.geteuid() == 0 and shutil.which("unshare"), "needs root and unshare(1)"
    mnt.mkdir()
    return ["unshare", "--ipc", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t mqueue none "$0" && exec "$@"', str(mnt)]


@pytest.mark.timeout(120)
def test_kill_at_random_moment_leaves_nothing_pruning_or_gc_misses(tmp_path):
    if os.geteuid() == 0:
        mnt = tmp_path / "mqueue"
        cmd = _private_ipc_prefix(mnt) + [sys.executable, os.path.join(HERE, "lifecycle_killer.py"),
                                          "churned", "200", str(mnt)]
    else:
        mnt = _mqueue_mount()
        if not mnt:
            pytest.fail("counting message queues needs an mqueue file system: mount one at "
                        "/dev/mqueue, or run as root (a private one is mounted then)")
        cmd = [sys.executable, os.path.join(HERE, "lifecycle_killer.py"), "churned", "200", mnt]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=100)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    # The kills did land inside the lifecycle: most left a registered entry (and its
    # queue) for pruning; some a half-done claim or release.
    assert res["left_by_kills"]["active"] + res["left_by_kills"]["claiming"] >= 20, res
    # No kill left a queue that no slot names (which no pruning could ever find): a
    # pruner killed between taking a dead consumer's slot and unlinking its queue left
    # one, freed without its queue by the next pruner (1 in ~6 loaded runs).
    assert res["orphaned"] == [], res
    # The producer's own pruning (while it publishes) already leaves nothing...
    assert res["after_prune"] == {"queues": [], "slots": []}, res
    # ...gc finds nothing more, and the table is whole: 64 fit, the 65th is refused.
    assert res["after_gc"] == {"queues": [], "slots": []}, res
    assert res["fit"] == 64 and res["refused"] == "ResourceLimit", res


_NO_QUEUE_READER = r"""
import resource
if os.environ.get("MSGQUEUE_RLIMIT_ZERO"):
    # This user's bytes of queues: none left (RLIMIT_MSGQUEUE binds root too).
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))
r = frameshm.Reader("noq", consumer="noq")
say("QUEUE_NAME", repr(r._r.queue_name))
got = [int(r.wait_latest(timeout=10).copy()[0]) for _ in range(5)]
nxt = [int(r.wait_next(timeout=10).copy()[0]) for _ in range(20)]
r.close()
slow = frameshm.Reader("noq", consumer="slow", max_rate_hz=10)
t0 = time.monotonic()
n = 0
while time.monotonic() - t0 < 1.0:
    slow.wait_latest(timeout=10)
    n += 1
slow.close()
say("RESULT", json.dumps({"latest": got, "next": nxt, "slow": n}))
"""


def _publish_until(child, w, key="RESULT", timeout=30.0):
    """Publishes frames 0, 1, 2... every 5 ms until the child prints its result."""
    import time
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        w.publish(np.full(8, i % 256, np.uint8))
        i += 1
        time.sleep(0.005)
        if any(line.startswith(key) for line in child.output):
            return child.expect_json(key)
        if child.proc.poll() is not None:
            break
    return child.expect_json(key, timeout=1)


def _check_no_queue_result(res):
    assert all(0 <= v < 256 for v in res["latest"]), res
    # wait_next takes frames in order (a few may be skipped under load, never reordered).
    nxt = res["next"]
    assert all((b - a) % 256 in range(1, 64) for a, b in zip(nxt, nxt[1:])), res
    # max_rate_hz=10 paces a reader without a queue too: ~10 in a second at 200 fps.
    assert 3 <= res["slow"] <= 16, res


def test_reader_without_queue_rlimit_msgqueue(spawn):
    with frameshm.Writer("noq", shape=(8,), dtype="uint8", nslots=8) as w:
        child = spawn(_NO_QUEUE_READER, label="noq", env_extra={"MSGQUEUE_RLIMIT_ZERO": "1"})
        assert child.expect("QUEUE_NAME") == "''"   # registered, but no queue
        _check_no_queue_result(_publish_until(child, w))
        assert child.stop() == 0
        assert not stream_info("noq")["consumers"]   # the child's slots went with it


def test_reader_without_queue_queues_max(tmp_path):
    """The system-wide queues_max, filled for real in a private IPC namespace: a Reader
    that is not exempt from it (no CAP_SYS_RESOURCE) gets frames anyway."""
    mnt = tmp_path / "mqueue"
    script = r"""
import os, subprocess, sys
open("/proc/sys/fs/mqueue/queues_max", "w").write("1\n")
import ctypes, ctypes.util
rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
assert rt.mq_open(b"/filler", os.O_RDONLY | os.O_CREAT, 0o600, None) != -1
sys.exit(subprocess.call(sys.argv[1:]))
"""
    probe = r"""
import os, sys, time, json, threading
import numpy as np
import frameshm, ctypes, ctypes.util
rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
# The limit is real for us: creating a queue fails with ENOSPC.
assert rt.mq_open(b"/probe", os.O_RDONLY | os.O_CREAT, 0o600, None) == -1
assert ctypes.get_errno() == 28, ctypes.get_errno()
w = frameshm.Writer("limited", shape=(4,), dtype="uint8", nslots=4)
r = frameshm.Reader("limited")
assert r._r.queue_name == "", r._r.queue_name
stop = threading.Event()
def produce():
    i = 0
    while not stop.is_set():
        w.publish(np.full(4, i % 256, np.uint8)); i += 1; time.sleep(0.005)
t = threading.Thread(target=produce); t.start()
try:
    vals = [int(r.wait_next(timeout=10).copy()[0]) for _ in range(10)]
finally:
    stop.set(); t.join()
r.close(); w.close()
print("RESULT", json.dumps(vals), flush=True)
"""
    cmd = _private_ipc_prefix(mnt) + [sys.executable, "-c", script,
                                      "setpriv", "--bounding-set", "-sys_resource",
                                      "--inh-caps", "-sys_resource", sys.executable, "-c", probe]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    vals = json.loads(p.stdout.split("RESULT", 1)[1])
    assert len(vals) == 10 and all((b - a) % 256 in range(1, 64) for a, b in zip(vals, vals[1:])), vals
