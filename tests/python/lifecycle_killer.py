"""Kill-at-random-moment harness for the consumer lifecycle (test_crash_lifecycle.py).

Run as ``python lifecycle_killer.py STREAM TRIALS MQUEUE_DIR``, with FRAMESHM_DIR set and
an mqueue file system at MQUEUE_DIR. A producer (its own process) publishes; forked
children open and close Readers in a loop and are SIGKILLed after a random delay, so a
kill lands anywhere in registration, queue creation, unregistration or queue removal.
Prints one JSON line: what the kills left (queues named after the killed pids, and
consumer-table slots not free) before anything cleaned up, after the producer's own
pruning, after `frameshm gc`, and how many consumers fit afterwards; and every queue a
kill left orphaned: named by no slot right after the kill, so that no pruning can ever
find it (only gc's machine-wide scan), with the slot that named it one kill earlier.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import frameshm
from frameshm import admin

CTL_HEADER = 4096
CONSUMER_BYTES = 128
MAX_CONSUMERS = 64

PRODUCER = r"""
import sys, time
import numpy as np
import frameshm
w = frameshm.Writer(sys.argv[1], shape=(4,), dtype="uint8", nslots=4)
print("READY", flush=True)
i = 0
while True:   # killed by the harness; publishing is what runs the producer's pruning
    w.publish(np.full(4, i % 256, np.uint8))
    i += 1
    time.sleep(0.01)
"""


def ctl_path(stream: str) -> str:
    sid = frameshm._core.stream_id_for_name(stream)
    [path] = glob.glob(os.path.join(os.environ["FRAMESHM_DIR"], "tensorpool-*", "default", str(sid),
                                    "frameshm.ctl"))
    return path


def busy_slots(stream: str) -> list:
    """(index, state word, pid) of every consumer slot not free."""
    with open(ctl_path(stream), "rb") as f:
        data = f.read()
    out = []
    for i in range(MAX_CONSUMERS):
        off = CTL_HEADER + i * CONSUMER_BYTES
        state, _flags, pid = struct.unpack_from("<IIQ", data, off)
        if state:
            out.append((i, state, pid))
    return out


def slot_queues(stream: str) -> dict:
    """queue name (as listed in the mqueue fs) -> [index, kind, pid in the state word, pid
    field] of the busy slot naming it."""
    with open(ctl_path(stream), "rb") as f:
        data = f.read()
    out = {}
    for i in range(MAX_CONSUMERS):
        off = CTL_HEADER + i * CONSUMER_BYTES
        state, _flags, pid = struct.unpack_from("<IIQ", data, off)
        q = data[off + 96:off + 128].split(b"\0", 1)[0].decode(errors="replace").lstrip("/")
        if state and q:
            out[q] = [i, state & 0xFF, state >> 8, pid]
    return out


def queue_pid(name: str) -> int:
    parts = name.lstrip("/").split("-")
    return int(parts[1], 16) if len(parts) >= 3 and parts[0] == "fshm" else -1


def queues_of(mqdir: str, pids: set) -> list:
    return sorted(n for n in os.listdir(mqdir) if queue_pid(n) in pids)


def churn(stream: str) -> None:
    """A forked child: open and close Readers until killed."""
    try:
        while True:
            r = frameshm.Reader(stream, consumer="churn")
            r.close()
    finally:
        os._exit(0)


def main() -> None:
    stream, trials, mqdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    prod = subprocess.Popen([sys.executable, "-c", PRODUCER, stream], stdout=subprocess.PIPE, text=True)
    try:
        assert prod.stdout.readline().strip() == "READY"
        rng = random.Random(int(os.environ.get("KILL_SEED", "0")) or None)
        killed = set()
        # What each kill left for pruning (the next child's open prunes it, so it is
        # tallied right after the kill): entries by kind (1 claiming, 2 active,
        # 3 releasing) and queues.
        left = {"claiming": 0, "active": 0, "releasing": 0, "queue": 0}
        orphaned, named_before, killed_before = [], {}, None
        for trial in range(trials):
            pid = os.fork()
            if pid == 0:
                churn(stream)
            # Up to ~25 ms: past a child's first open (a few ms) and well into its loop,
            # so kills fall on every phase of open and close.
            time.sleep(rng.uniform(0.0, 0.025))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed.add(pid)
            for _i, state, _pid in busy_slots(stream):
                kind = {1: "claiming", 2: "active", 3: "releasing"}.get(state & 0xFF)
                if kind and (state >> 8 == pid or _pid == pid):
                    left[kind] += 1
            left["queue"] += len(queues_of(mqdir, {pid}))
            # Slots first, then queues: nobody but the (pruning) producer is alive, and a
            # pruner unlinks a queue before freeing the slot naming it, so a queue listed
            # now that no slot named a moment ago is one no pruning will ever find.
            named = slot_queues(stream)
            for q in queues_of(mqdir, killed):
                if q not in named and not any(o["queue"] == q for o in orphaned):
                    orphaned.append({"trial": trial, "queue": q, "killed": pid, "killed_before": killed_before,
                                     "slot_before": named_before.get(q)})
            named_before, killed_before = named, pid
        before = {"queues": len(queues_of(mqdir, killed)), "slots": busy_slots(stream)}
        # The producer prunes every 0.5 s while it publishes: give it a generous while.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not busy_slots(stream) and not queues_of(mqdir, killed):
                break
            time.sleep(0.1)
        after_prune = {"queues": queues_of(mqdir, killed), "slots": busy_slots(stream)}
        admin.gc_report()
        after_gc = {"queues": queues_of(mqdir, killed), "slots": busy_slots(stream)}
        readers, fit, refused = [], 0, None
        try:
            for _ in range(MAX_CONSUMERS + 1):
                readers.append(frameshm.Reader(stream, consumer="fit"))
                fit += 1
        except frameshm.FrameshmError as exc:
            refused = type(exc).__name__
        for r in readers:
            r.close()
        print(json.dumps({"trials": trials, "left_by_kills": left, "before": before, "after_prune": after_prune,
                          "after_gc": after_gc, "fit": fit, "refused": refused,
                          "orphaned": orphaned}), flush=True)
    finally:
        prod.kill()
        prod.wait()
        admin.gc()   # the killed producer's stream


if __name__ == "__main__":
    main()
