#!/usr/bin/env python3
"""Where a Python view60 consumer's latency goes.

A spawned producer publishes 1080p RGB at 60 fps the way bench/peers.py's view60 does
(`loan()`, a numpy copy, `commit(timestamp_ns=now)`); this process reads with
`wait_latest` (spin on by default) and reads the clock right after the wait returns and
again after `.array`. Per frame, against the producer's timestamp:

  commit   publish_ns - timestamp: the producer's own commit call (only frames that came
           with a descriptor carry publish_ns; a frame the spin caught has none)
  return   when wait_latest returned
  array    when .array was in hand (what peers.py's view60 reports)

    python bench/view_probe.py --runs 2
    python bench/view_probe.py --runs 2 --awake     # vCPUs kept out of halt, as peers.py --awake
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from _common import cleanup_shm_dir, cpus_kept_awake, pace, private_shm_dir, stats_ns

SHAPE = (1080, 1920, 3)


def producer(name: str, frames: int, start: "mp.synchronize.Event") -> None:
    import frameshm

    w = frameshm.Writer(name, shape=SHAPE, dtype="uint8", nslots=4)
    src = np.random.default_rng(1).integers(0, 256, size=SHAPE, dtype=np.uint8)
    start.wait(10)
    period = int(1e9 / 60)
    t0 = time.monotonic_ns() + 100_000_000
    for i in range(frames):
        pace(i, t0, period)
        v = w.loan()
        v[...] = src
        w.commit(timestamp_ns=time.monotonic_ns())
    time.sleep(0.5)
    w.close()


def one_run(frames: int, warmup: int, spin: bool) -> dict:
    import frameshm

    name = f"probe-{os.getpid()}-{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    p = ctx.Process(target=producer, args=(name, frames, start))
    p.start()
    r = None
    for _ in range(200):
        try:
            r = frameshm.Reader(name, spin=spin)
            break
        except frameshm.FrameshmError:
            time.sleep(0.05)
    if r is None:
        p.kill()
        raise SystemExit("the producer's stream never appeared")
    start.set()
    now = time.monotonic_ns
    commit, ret, arr = [], [], []
    seq = -1
    try:
        while seq < frames - 1:
            try:
                f = r.wait_latest(2.0)
            except frameshm.Timeout:
                break
            t1 = now()
            a = f.array
            t2 = now()
            seq = f.seq
            if seq >= warmup:
                ret.append(t1 - f.timestamp_ns)
                arr.append(t2 - f.timestamp_ns)
                if f.publish_ns:
                    commit.append(f.publish_ns - f.timestamp_ns)
            del a, f
    finally:
        r.close()
        p.join(10)
    return {"frames": len(ret), "commit": commit, "return": ret, "array": arr}


def fmt(xs: list) -> str:
    st = stats_ns(xs)
    if not st["n"]:
        return "-"
    return f"{st['median_us']:.1f} us (p90 {st['p90_us']:.1f}; n {st['n']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--no-spin", action="store_true")
    ap.add_argument("--awake", action="store_true", help="a SCHED_IDLE busy loop per CPU (see peers.py)")
    args = ap.parse_args()
    shm = private_shm_dir("probe")
    os.environ["FRAMESHM_DIR"] = shm
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; spin {not args.no_spin}; "
          f"awake {args.awake}", flush=True)
    try:
        with cpus_kept_awake(args.awake):
            for run in range(args.runs):
                res = one_run(args.frames, 30, not args.no_spin)
                print(f"run {run}: {res['frames']} frames; commit {fmt(res['commit'])}; "
                      f"return {fmt(res['return'])}; array {fmt(res['array'])}", flush=True)
    finally:
        cleanup_shm_dir(shm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
