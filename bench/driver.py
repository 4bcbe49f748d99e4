#!/usr/bin/env python3
"""What the driver model costs, measured side by side with plain (driver-less) streams.

(a) open + close of a producer: Writer(stream_id, driver=...) (attach: the driver
    provisions a new epoch; close: detach, the driver provisions the next one) vs a plain
    Writer creating and removing its own stream; same 8-slot, 64 KiB + 256 KiB profile.
    Medians over interleaved iterations.
(b) loan()/commit() of 16-byte frames in a tight loop (the per-loan lease check is two
    atomic loads): frames/s through the driver vs plain, interleaved rounds, medians.
(c) a consumer's open (attach + map) vs a plain Reader's.

    python bench/driver.py            # ~20 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import frameshm

CONFIG = """
[driver]
socket = "{sock}"
base_dir = "{base}"
keepalive_interval_ms = 1000
[profiles.p]
header_nslots = 8
pools = [{{pool_id = 1, stride_bytes = 65536}}, {{pool_id = 2, stride_bytes = 262144}}]
[[streams]]
ids = [1, 100]
profile = "p"
"""


def start_driver(tmp):
    sock = os.path.join(tmp, "d.sock")
    cfg = os.path.join(tmp, "d.toml")
    base = os.path.join(tmp, "shm-driver")
    os.makedirs(base)
    with open(cfg, "w") as fh:
        fh.write(CONFIG.format(sock=sock, base=base))
    p = subprocess.Popen([sys.executable, "-m", "frameshm", "driver", "--config", cfg],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit("driver did not start")
        time.sleep(0.05)
    return p, sock, base


def rate(w, seconds):
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(1000):
            v = w.loan()
            v[0] = n
            w.commit()
            n += 1
        if time.perf_counter() >= end:
            return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        plain_base = os.path.join(tmp, "shm-plain")
        os.makedirs(plain_base)
        drv, sock, dbase = start_driver(tmp)
        try:
            # (a) producer open+close
            t_drv, t_plain = [], []
            for i in range(args.iters):
                t0 = time.perf_counter()
                w = frameshm.Writer(stream_id=1, driver=sock, base_dir=dbase, shape=(4,), dtype="uint32")
                w.close()
                t_drv.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                w = frameshm.Writer(stream_id=1, base_dir=plain_base, shape=(4,), dtype="uint32", nslots=8,
                                    pools=[65536, 262144])
                w.close()
                t_plain.append(time.perf_counter() - t0)
            # (c) consumer open+close (the stream exists in both cases)
            c_drv, c_plain = [], []
            with frameshm.Writer(stream_id=2, driver=sock, base_dir=dbase, shape=(4,), dtype="uint32"), \
                 frameshm.Writer(stream_id=2, base_dir=plain_base, shape=(4,), dtype="uint32", nslots=8,
                                 pools=[65536, 262144]):
                for i in range(args.iters):
                    t0 = time.perf_counter()
                    frameshm.Reader(stream_id=2, driver=sock, base_dir=dbase).close()
                    c_drv.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    frameshm.Reader(stream_id=2, base_dir=plain_base).close()
                    c_plain.append(time.perf_counter() - t0)
            # (b) loan/commit rate
            r_drv, r_plain = [], []
            with frameshm.Writer(stream_id=3, driver=sock, base_dir=dbase, shape=(4,), dtype="uint32") as wd, \
                 frameshm.Writer(stream_id=3, base_dir=plain_base, shape=(4,), dtype="uint32", nslots=8,
                                 pools=[65536, 262144]) as wp:
                for _ in range(args.rounds):
                    r_drv.append(rate(wd, args.seconds))
                    r_plain.append(rate(wp, args.seconds))
        finally:
            drv.terminate()
            drv.wait(10)

    def ms(xs):
        return statistics.median(xs) * 1e3

    print(f"(a) producer open+close: driver {ms(t_drv):.2f} ms, plain {ms(t_plain):.2f} ms "
          f"(ratio {ms(t_drv) / ms(t_plain):.2f}), medians of {args.iters}")
    print(f"(c) consumer open+close: driver {ms(c_drv):.2f} ms, plain {ms(c_plain):.2f} ms "
          f"(ratio {ms(c_drv) / ms(c_plain):.2f})")
    md, mp_ = statistics.median(r_drv), statistics.median(r_plain)
    print(f"(b) loan/commit 16 B: driver {md / 1e6:.2f} M/s, plain {mp_ / 1e6:.2f} M/s "
          f"(ratio {md / mp_:.3f}), medians of {args.rounds} x {args.seconds:.0f} s rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
