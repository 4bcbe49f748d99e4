"""CPU per call of the Python API's per-message path, in one process with no system call
in it: a 64 B stream, a queueless process-all Reader (so nothing waits or sleeps), and
1080p frames on a 4-slot ring for a big frame's view (read again, cache-hot).

What it isolates is the Python binding's own cost per message (argument parsing, layout
checks, Frame and ndarray objects, clock reads), which bounds the message rate of a Python
producer or consumer that keeps up. Times are the minimum over repeats of a timeit loop,
so load on the machine shows less than in latencies; still compare two builds in the same
invocation, interleaved (``--builds``: each a directory put first on PYTHONPATH, run in
turn ``--rounds`` times).

    python bench/python_calls.py                               # the frameshm importable here
    python bench/python_calls.py --builds /old/checkout,/new/checkout --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402


def measure(number: int, repeat: int) -> dict:
    import numpy as np

    import frameshm

    out = {}
    w = frameshm.Writer("calls64", shape=(64,), dtype=np.uint8, nslots=64)
    r = frameshm.Reader("calls64", queue=False, spin=False)
    msg = np.zeros(64, np.uint8)
    pack_into = struct.Struct("<qqqq").pack_into   # as bench/peers_lossless.py's producer

    def loan_commit():
        pack_into(w.loan(), 0, 1, 2, 3, 4)
        w.commit()

    def loan_next_array():
        loan_commit()
        r.wait_next(1.0).array

    unpack_from = struct.Struct("<qqqq").unpack_from   # as bench/peers_lossless.py's consumer

    def loan_next_unpack_array():
        loan_commit()
        unpack_from(r.wait_next(1.0).array, 0)

    def loan_next_unpack_frame():   # the frame's buffer: no ndarray per message
        loan_commit()
        unpack_from(r.wait_next(1.0), 0)

    def pub_next():
        w.publish(msg)
        r.wait_next(1.0)

    def pub_next_array():
        w.publish(msg)
        r.wait_next(1.0).array

    def pub_latest_array():
        w.publish(msg)
        r.wait_latest(1.0).array

    fns = {"publish": lambda: w.publish(msg), "loan+pack_into+commit": loan_commit,
           "loan+pack_into+commit+wait_next+array": loan_next_array,
           "...+wait_next+unpack_from(.array)": loan_next_unpack_array,
           "...+wait_next+unpack_from(frame)": loan_next_unpack_frame, "publish+wait_next": pub_next,
           "publish+wait_next+array": pub_next_array, "publish+wait_latest+array": pub_latest_array}
    for name, fn in fns.items():
        try:
            fn()
        except TypeError:   # a build whose frames are not buffers yet
            out[name] = float("nan")
            continue
        out[name] = min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9
        # publish alone laps the reader; the next case starts from the newest frame
        try:
            r.wait_latest(0)
        except frameshm.Timeout:
            pass
    w.close()
    r.close()

    big = frameshm.Writer("calls1080", shape=(1080, 1920, 3), dtype=np.uint8, nslots=4)
    rb = frameshm.Reader("calls1080", queue=False, spin=False)
    frame = np.zeros((1080, 1920, 3), np.uint8)
    for _ in range(4):
        big.publish(frame)   # every slot written once, then only reads are timed
    def latest_array():   # the newest frame again each time: nothing new is committed
        rb.read_latest(copy=False).array

    out["1080p read_latest(copy=False)+array"] = min(timeit.repeat(latest_array, number=number // 10,
                                                       repeat=repeat)) / (number // 10) * 1e9
    big.close()
    rb.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builds", default="", help="comma-separated checkouts to compare (default: this one)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the builds")
    ap.add_argument("--number", type=int, default=20000, help="calls per timeit loop")
    ap.add_argument("--repeat", type=int, default=9, help="timeit loops; the minimum is kept")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.number, args.repeat)))
        return 0
    builds = [b for b in args.builds.split(",") if b] or [""]
    results = {b or "(default)": [] for b in builds}
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[0]
    shm_dir = _common.private_shm_dir("calls")   # streams on a tmpfs, removed afterwards
    try:
        for _ in range(args.rounds):
            for b in builds:
                env = dict(os.environ, FRAMESHM_DIR=shm_dir)
                if b:
                    env["PYTHONPATH"] = os.path.abspath(b) + os.pathsep + env.get("PYTHONPATH", "")
                run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                      "--number", str(args.number), "--repeat", str(args.repeat)],
                                     env=env, capture_output=True, text=True, timeout=600, check=True)
                results[b or "(default)"].append(json.loads(run.stdout))
    finally:
        _common.cleanup_shm_dir(shm_dir)
    with open("/proc/loadavg") as f:
        load1 = f.read().split()[0]
    print(f"ns per call, min of {args.repeat} loops of {args.number}; one column per round; "
          f"load {load0} -> {load1}")
    for case in next(iter(results.values()))[0]:   # in the order measure() ran them
        for b, runs in results.items():
            print(f"{case:40s} {b:20s} " + "  ".join(f"{r[case]:7.0f}" for r in runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": [load0, load1], "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
