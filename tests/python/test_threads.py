"""One Reader or Writer shared by several Python threads (issue 14, item 1).

The library's handles serve one thread at a time; the binding serialises the calls of a
Python object's threads with a guard (a wait holds it one 50 ms slice at a time). Before
that, a wait on one thread and read_latest / valid() / producer / mode on another across
an epoch change crashed the process (use-after-unmap). These tests run that mix in a
child process, so a crash shows as a signal exit instead of killing the test runner.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import frameshm
from fshm_helpers import child_env

MIX = textwrap.dedent(
    r"""
    import subprocess, sys, threading, time
    import numpy as np
    import frameshm

    PRODUCER = '''
    import sys, time, numpy as np, frameshm
    import os
    name, secs, stop_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    end, i = time.monotonic() + secs, 0
    while time.monotonic() < end and not os.path.exists(stop_file):
        with frameshm.Writer(name, shape=(64, 64), nslots=2) as w:
            for k in range(3):
                w.publish(np.full((64, 64), i % 251, np.uint8))
                w.mode = i % 2
                i += 1
    '''

    name, seconds = sys.argv[1], float(sys.argv[2])
    stop = threading.Event()
    counts = {"frames": 0, "peeks": 0, "valid": 0, "producer": 0, "mode": 0, "epochs": set()}
    errors = []
    r = frameshm.Reader(name)

    def guarded(fn):
        def run():
            try:
                while not stop.is_set():
                    fn()
            except Exception as e:  # anything but the expected per-call outcomes
                errors.append(repr(e))
                stop.set()
        return run

    def waiter():
        try:
            f = r.wait_latest(timeout=0.2)
        except (frameshm.Timeout, frameshm.ProducerDead):
            return
        a = f.array
        assert a.shape == (64, 64)
        assert int(a[0, 0]) == int(a[-1, -1]) or not f.valid()  # untorn unless overwritten
        counts["frames"] += 1
        counts["epochs"].add(f.epoch)

    def peeker():
        try:
            f = r.read_latest(copy=False)
            if f is not None:
                f.valid()
                counts["peeks"] += 1
            c = r.read_latest(copy=True)
            assert c is None or c.shape == (64, 64)
        except frameshm.Overrun:
            pass  # 2 slots and a producer at full speed: starved, and told so

    def checker():
        r.producer
        counts["producer"] += 1
        r.mode
        counts["mode"] += 1
        r.epoch, r.overruns, r.drops

    held = []

    def holder():
        # frames handed to another thread, re-checked there while the waiter remaps
        try:
            f = r.read_latest(copy=False)
        except frameshm.Overrun:
            f = None
        if f is not None:
            held.append(f)
        for g in held[-8:]:
            g.valid()
            int(g.array[0, 0])
            counts["valid"] += 1
        del held[:-8]

    # The producer is another process restarting as fast as it can (three frames per
    # epoch, 2 slots): every restart remaps the Reader under the other threads' calls.
    # Runs for `seconds`, then on until every kind of call has run enough times (a loaded
    # machine gives the threads fewer turns), within a generous bound.
    stop_file = sys.argv[3]
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, name, "90", stop_file])
    threads = [threading.Thread(target=guarded(f)) for f in (waiter, peeker, checker, holder)]
    for t in threads:
        t.start()
    start = time.monotonic()
    time.sleep(seconds)
    while time.monotonic() - start < 60 and not stop.is_set() and not (
            counts["frames"] >= 2 and counts["peeks"] > 10 and counts["valid"] > 10
            and counts["producer"] > 10 and len(counts["epochs"]) >= 2):
        time.sleep(0.1)
    stop.set()
    open(stop_file, "w").close()
    for t in threads:
        t.join(30)
    if producer.wait(30) != 0:
        errors.append(f"producer exited with {producer.returncode}")
    r.close()
    alive = [t for t in threads if t.is_alive()]
    print("COUNTS", counts["frames"], counts["peeks"], counts["valid"], counts["producer"],
          len(counts["epochs"]), "ERRORS", errors, "ALIVE", len(alive), flush=True)
    """
)


def test_reader_shared_by_threads_across_epoch_changes(name, tmp_path):
    script = tmp_path / "mix.py"
    script.write_text(MIX)
    p = subprocess.run([sys.executable, str(script), name, "4", str(tmp_path / "stop")], env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (
        f"child exited with {p.returncode}"
        f"{' (' + signal.Signals(-p.returncode).name + ')' if p.returncode < 0 else ''}\n"
        f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("COUNTS")][-1]
    parts = line.split()
    frames, peeks, valid, producer, epochs = map(int, parts[1:6])
    assert "ERRORS []" in line and line.endswith("ALIVE 0"), line
    # every kind of call ran many times, over several epochs
    assert frames >= 2 and peeks > 10 and valid > 10 and producer > 10, line
    assert epochs >= 2, line


def test_writer_shared_by_threads(name):
    """publish on one thread, heartbeat / mode / control / getters on others."""
    import threading

    errors = []
    with frameshm.Writer(name, shape=(256, 256, 3), nslots=4) as w, frameshm.Reader(name) as r:
        stop = threading.Event()

        def run(fn):
            def loop():
                try:
                    while not stop.is_set():
                        fn()
                except Exception as e:  # pragma: no cover
                    errors.append(repr(e))
                    stop.set()
            return threading.Thread(target=loop)

        frame = np.zeros((256, 256, 3), np.uint8)
        seqs = []
        threads = [
            run(lambda: seqs.append(w.publish(frame))),   # >= 64 KiB: GIL released
            run(lambda: (w.heartbeat(), setattr(w, "mode", 1), w.mode, w.epoch, w.stream_id)),
        ]
        for t in threads:
            t.start()
        f = r.wait_latest(timeout=10)
        assert f.array.shape == (256, 256, 3)
        stop.wait(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) > 10


@pytest.mark.parametrize("closer", ["reader", "writer"])
def test_close_from_another_thread_while_in_use(name, closer):
    import threading

    w = frameshm.Writer(name, shape=(512, 512), nslots=2)
    r = frameshm.Reader(name)
    out = []

    def use():
        try:
            if closer == "reader":
                r.wait_latest(timeout=30)
            else:
                for _ in range(100000):
                    w.publish(np.zeros((512, 512), np.uint8))
            out.append("done")
        except frameshm.StreamClosed:
            out.append("closed")

    t = threading.Thread(target=use)
    t.start()
    import time

    time.sleep(0.3)
    (r if closer == "reader" else w).close()
    t.join(30)
    assert not t.is_alive() and out == ["closed"], out
    r.close()
    w.close()
