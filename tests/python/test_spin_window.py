"""The Reader's window hook (fshm_reader_on_window): as a spin window opens, the binding
builds the Frame and the array of the frame it returned last, so that the path the next
frame takes to the caller is warm (docs/benchmarks.md §11). Checked in a child process
whose only Python thread is the waiting one, the one case the binding does it in: a Frame
class that notes every frame it frees shows the extra frames, each a frame the Reader had
returned; with a second Python thread alive there are none."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fshm_helpers import child_env

CONSUMER = textwrap.dedent(
    r"""
    import gc, json, subprocess, sys, threading
    import numpy as np
    import frameshm
    from frameshm import _core, stream

    PRODUCER = '''
    import sys, time, numpy as np, frameshm
    w = frameshm.Writer(sys.argv[1], shape=(120, 160, 3), nslots=8)
    print("ready", flush=True)
    for batch in range(2):
        sys.stdin.readline()
        t = time.monotonic()
        for i in range(150):
            t += 0.005
            while t - time.monotonic() > 0:
                time.sleep(t - time.monotonic())
            w.publish(np.full((120, 160, 3), (batch * 150 + i) % 251, np.uint8))
    sys.stdin.readline()
    w.close()
    '''

    freed = []

    class Counted(frameshm.Frame):
        __slots__ = ()

        def __del__(self):
            freed.append(self.seq)

    name = sys.argv[1]
    prod = subprocess.Popen([sys.executable, "-c", PRODUCER, name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert prod.stdout.readline() == "ready\n"
    r = _core.Reader(name, consumer="win", spin=True, frame_type=Counted,
                     dtypes=stream._DTYPE_TABLE, array_type=np.ndarray)

    def batch(last):
        del freed[:]
        got = []
        prod.stdin.write("go\n")
        prod.stdin.flush()
        while True:
            f = r.wait_latest(5.0)
            a = f.array
            assert a.shape == (120, 160, 3) and int(a[0, 0, 0]) == f.seq % 251, (f.seq, a[0, 0, 0])
            got.append(f.seq)
            del a, f
            if got[-1] >= last:
                break
        gc.collect()
        extra = list(freed)
        for s in got:
            extra.remove(s)   # each returned frame is freed once
        return {"got": len(got), "rehearsed": len(extra),
                "not_returned": sorted(set(extra) - set(got))}

    out = {"alone": batch(149)}
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    out["threaded"] = batch(299)
    stop.set()
    t.join()
    prod.stdin.write("end\n")
    prod.stdin.flush()
    prod.wait(10)
    r.close()
    print(json.dumps(out))
    """
)


def test_window_builds_the_previous_frame_only_when_the_waiting_thread_is_alone(name):
    p = subprocess.run([sys.executable, "-c", CONSUMER, name], env=child_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Exception ignored" not in p.stderr, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    alone, threaded = out["alone"], out["threaded"]
    # A loaded machine skips windows (a frame already late) and rests the spin after misses.
    assert alone["rehearsed"] >= 10, out
    assert alone["not_returned"] == [], out
    assert threaded["rehearsed"] == 0, out
