"""The seed deployment of the driver model, runnable: 3 cameras -> 3 processors -> a checker.

    python docs/examples/driver_pipeline.py --config docs/examples/driver_camera_small.toml --seconds 10

Starts ``frameshm driver`` with the given config (or uses one already listening with
``--no-driver``), then, each in its own process:

* three camera producers on stream ids 1001-1003 publishing 1920x1080 uint16 frames
  (4,147,200 bytes: they land in the raw profile's 4 MiB pool), each stamped with its
  stream id and frame number;
* three processors (``frameshm.Processor``) 1001->2001, 1002->2002, 1003->2003 halving the
  frames to 960x540 (1,036,800 bytes: the processed profile's 2 MiB pool), writing straight
  into the output pools and tagging each output with its source frame's seq;
* a checker reading 2001-2003 that traces every processed frame back to its source: the
  stamp must name the right camera, ``ref_seq - frame_no`` must stay constant per camera
  epoch (seq and frame number advance together) and the pixels must be the source's.

Prints one JSON summary line and exits 0 when every processed frame checked out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np

CAMERAS = (1001, 1002, 1003)
RAW_SHAPE = (1080, 1920)
OUT_SHAPE = (540, 960)
STAMP_MAGIC = 0x5A5A


def _pattern(shape):
    y, x = np.indices(shape, dtype=np.uint32)
    return ((x + 3 * y) & 0xFFFF).astype(np.uint16)


def stamp(a, sid, n):
    # Even columns, so a 2x decimation keeps the stamp intact.
    a[0, 0:8:2] = (STAMP_MAGIC, sid & 0xFFFF, n & 0xFFFF, (n >> 16) & 0xFFFF)


def read_stamp(a):
    magic, sid, lo, hi = (int(v) for v in a[0, 0:4])
    return (sid, lo | (hi << 16)) if magic == STAMP_MAGIC else (None, None)


def camera(sock, sid, fps, seconds, q):
    import frameshm

    base = _pattern(RAW_SHAPE)
    with frameshm.Writer(stream_id=sid, driver=sock, shape=RAW_SHAPE, dtype="uint16") as w:
        pool = min(s for _pid, s in w.pools if s >= base.nbytes)
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            out = w.loan()
            np.add(base, n & 0xFF, out=out)
            stamp(out, sid, n)
            w.commit()
            n += 1
            time.sleep(max(0.0, t0 + n / fps - time.monotonic()))
        q.put({"role": "camera", "stream": sid, "frames": n, "pool_stride": pool, "epoch": w.epoch})


def processor(sock, sid, seconds, q):
    import frameshm

    with frameshm.Processor(sid, sid + 1000, out_shape=OUT_SHAPE, out_dtype="uint16", driver=sock,
                            consumer=f"proc-{sid}") as p:
        pool = min(s for _pid, s in p.writer.pools if s >= int(np.prod(OUT_SHAPE)) * 2)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            try:
                frame, out = p.next(timeout=0.5)
            except frameshm.Timeout:
                continue
            np.copyto(out, frame.array[::2, ::2])
        p.commit()
        q.put({"role": "processor", "stream": sid + 1000, **p.stats(), "pool_stride": pool})


def checker(sock, seconds, q):
    import frameshm

    readers = {sid + 1000: frameshm.Reader(stream_id=sid + 1000, driver=sock, consumer="checker")
               for sid in CAMERAS}
    base_small = _pattern(RAW_SHAPE)[::2, ::2]
    got = {s: 0 for s in readers}
    bad = []
    delta = {}
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            for out_sid, r in readers.items():
                try:
                    f = r.wait_next(timeout=0.05)
                except frameshm.Timeout:
                    continue
                a = f.array
                sid, n = read_stamp(a)
                expect = base_small + np.uint16(n & 0xFF) if n is not None else None
                if expect is not None:  # the decimated stamp sits in columns 0-3
                    expect[0, 0:4] = (STAMP_MAGIC, sid & 0xFFFF, n & 0xFFFF, (n >> 16) & 0xFFFF)
                pixels_ok = expect is not None and np.array_equal(a, expect)
                ok = f.valid() and sid == out_sid - 1000 and f.ref_seq is not None and pixels_ok
                if ok:
                    d = f.ref_seq - n
                    key = (out_sid, f.epoch)
                    if delta.setdefault(key, d) != d:
                        ok = False
                if ok:
                    got[out_sid] += 1
                else:
                    bad.append({"stream": out_sid, "seq": f.seq, "ref_seq": f.ref_seq, "stamp": [sid, n]})
    finally:
        for r in readers.values():
            r.close()
    q.put({"role": "checker", "checked": got, "bad": bad[:10], "nbad": len(bad)})


def wait_for_socket(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"driver exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"driver socket {path} did not appear")


def socket_from_config(path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)["driver"]["socket"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "driver_camera_small.toml"))
    ap.add_argument("--socket", help="driver socket (default: the config's)")
    ap.add_argument("--no-driver", action="store_true", help="use a driver that is already running")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=10.0)
    args = ap.parse_args(argv)
    sock = args.socket or socket_from_config(args.config)
    driver = None
    if not args.no_driver:
        driver = subprocess.Popen([sys.executable, "-m", "frameshm", "driver", "--config", args.config])
        wait_for_socket(sock, driver)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=checker, args=(sock, args.seconds + 1.5, q))]
    procs += [ctx.Process(target=processor, args=(sock, sid, args.seconds + 1.0, q)) for sid in CAMERAS]
    procs += [ctx.Process(target=camera, args=(sock, sid, args.fps, args.seconds, q)) for sid in CAMERAS]
    results = []
    try:
        for p in procs:
            p.start()
            if p is procs[0] or p is procs[len(CAMERAS)]:
                time.sleep(0.5)  # consumers attach before the producers start
        for _ in procs:
            results.append(q.get(timeout=args.seconds + 60))
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        if driver is not None:
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=10)
    summary = {
        "cameras": sorted((r for r in results if r["role"] == "camera"), key=lambda r: r["stream"]),
        "processors": sorted((r for r in results if r["role"] == "processor"), key=lambda r: r["stream"]),
        "checker": next(r for r in results if r["role"] == "checker"),
        "driver_exit": driver.returncode if driver is not None else None,
    }
    print(json.dumps(summary))
    ok = summary["checker"]["nbad"] == 0 and all(v > 0 for v in summary["checker"]["checked"].values())
    return 0 if ok and all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
