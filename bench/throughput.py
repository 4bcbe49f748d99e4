#!/usr/bin/env python3
"""Throughput of frameshm from Python.

(a) publish with one copy vs plain memcpy of the same bytes, 1080x1920x3 uint8:
    np.copyto(dst, src) into a pre-faulted array vs Writer.publish(src); medians over many
    interleaved iterations and their ratio (target: publish <= 1.1x memcpy). For reference
    also memcpy into a ring of 4 arrays (the working set of a 4-slot stream) and
    loan() + np.copyto(view, src) + commit().
(b) loan()/commit() of tiny frames (shape (4,) uint32, 16 bytes) in a tight loop:
    frames/s with no consumer and with one registered consumer draining in another
    process (wait_latest, and wait_next) (target: >= 200k frames/s).
(c) read side: a consumer looping wait_latest() + .array while a producer process
    commits 1080p frames unthrottled (without filling them, and filling them), plus
    read_latest(copy=False).array polling.

    python bench/throughput.py                  # ~30 s
    python bench/throughput.py --iters 300 --seconds 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SHAPE = (1080, 1920, 3)
TINY = (4,)


# ---------------------------------------------------------------------------------------
# (a) publish vs memcpy


def bench_copy(iters: int, block: int = 20) -> dict:
    import frameshm

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=SHAPE, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 1                       # pre-fault
    ring = [np.ones_like(src) for _ in range(4)]
    w = frameshm.Writer("tp-publish", shape=SHAPE, dtype="uint8", nslots=4)
    try:
        pub = w.publish
        loan, commit = w.loan, w.commit
        clock = time.perf_counter_ns
        times = {"memcpy": [], "memcpy_ring4": [], "publish": [], "loan_copy_commit": []}

        def one(kind, i):
            if kind == "memcpy":
                t0 = clock()
                np.copyto(dst, src)
                return clock() - t0
            if kind == "memcpy_ring4":
                d = ring[i & 3]
                t0 = clock()
                np.copyto(d, src)
                return clock() - t0
            if kind == "publish":
                t0 = clock()
                pub(src)
                return clock() - t0
            t0 = clock()
            v = loan()
            np.copyto(v, src)
            commit()
            return clock() - t0

        kinds = list(times)
        for k in kinds:              # warm-up: fault in every slot / ring buffer
            for i in range(8):
                one(k, i)
        order = random.Random(1)
        done = 0
        while done < iters:
            n = min(block, iters - done)
            order.shuffle(kinds)     # interleaved blocks in random order: drift and cache
            for k in kinds:          # effects of the previous block hit every kind alike
                for i in range(n):
                    times[k].append(one(k, done + i))
            done += n
    finally:
        w.close()
    out = {"iters": iters, "bytes": int(np.prod(SHAPE))}
    for k, v in times.items():
        a = np.asarray(v, dtype=np.float64) / 1e3
        out[k] = {"median_us": float(np.median(a)), "p10_us": float(np.percentile(a, 10)),
                  "p90_us": float(np.percentile(a, 90)),
                  "gbps_median": out["bytes"] / (np.median(a) * 1e3)}
    base = out["memcpy"]["median_us"]
    out["ratio_publish_vs_memcpy"] = out["publish"]["median_us"] / base
    out["ratio_publish_vs_memcpy_ring4"] = out["publish"]["median_us"] / out["memcpy_ring4"]["median_us"]
    out["ratio_loan_copy_commit_vs_memcpy"] = out["loan_copy_commit"]["median_us"] / base
    return out


# ---------------------------------------------------------------------------------------
# (b) tiny loan/commit rate


def drain_consumer(stream, mode, ready, stop, results):
    out = {"mode": mode}
    try:
        import frameshm

        r = frameshm.Reader(stream, consumer=f"drain-{mode}")
        wait = r.wait_latest if mode == "latest" else r.wait_next
        ready.set()
        got = skipped = 0
        t_first = t_last = None
        while not stop.is_set():
            try:
                f = wait(0.1)
            except frameshm.Timeout:
                continue
            got += 1
            skipped += f.skipped
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
        out.update(received=got, skipped=skipped, overruns=r.overruns,
                   span_s=(t_last - t_first) if got > 1 else 0.0)
        r.close()
    except BaseException:
        out["error"] = traceback.format_exc()
        ready.set()
    results.put(out)


def tiny_rate(w, seconds: float, publish: bool = False) -> dict:
    loan, commit = w.loan, w.commit
    src = np.arange(4, dtype=np.uint32)
    pub = w.publish
    n = 0
    clock = time.perf_counter
    t0 = clock()
    end = t0 + seconds
    while True:
        if publish:
            for _ in range(1000):
                pub(src)
        else:
            for i in range(1000):
                v = loan()
                v[0] = i
                commit()
        n += 1000
        if clock() >= end:
            break
    dt = clock() - t0
    return {"frames": n, "seconds": dt, "fps": n / dt}


def bench_tiny(ctx, seconds: float) -> list:
    import frameshm

    rows = []
    w = frameshm.Writer("tp-tiny", shape=TINY, dtype="uint32", nslots=16)
    try:
        tiny_rate(w, 0.2)   # warm-up
        r = tiny_rate(w, seconds)
        rows.append({"case": "loan/commit, no consumer", **r})
        r = tiny_rate(w, seconds, publish=True)
        rows.append({"case": "publish(16 B), no consumer", **r})
        for mode in ("latest", "next"):
            ready, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
            p = ctx.Process(target=drain_consumer, args=("tp-tiny", mode, ready, stop, q))
            p.start()
            try:
                ready.wait(30)
                time.sleep(0.2)
                tiny_rate(w, 0.2)
                r = tiny_rate(w, seconds)
                stop.set()
                c = q.get(timeout=30)
            finally:
                stop.set()
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
                    p.join()
            row = {"case": f"loan/commit, 1 consumer draining (wait_{mode})", **r,
                   "consumer_received": c.get("received"),
                   "consumer_fps": c["received"] / c["span_s"] if c.get("span_s") else None,
                   "consumer_skipped": c.get("skipped")}
            if c.get("error"):
                row["error"] = c["error"]
            rows.append(row)
        info = frameshm.stream_info("tp-tiny")
        rows.append({"case": "_stream_counters", "desc_sent": info.get("desc_sent"),
                     "desc_dropped": info.get("desc_dropped")})
    finally:
        w.close()
    return rows


# ---------------------------------------------------------------------------------------
# (c) read side


def unthrottled_producer(stream, fill, ready, start, stop, results):
    out = {"fill": fill}
    try:
        import frameshm

        w = frameshm.Writer(stream, shape=SHAPE, dtype="uint8", nslots=4)
        src = np.ones(SHAPE, np.uint8)
        ready.set()
        start.wait(30)
        n = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            for _ in range(16):
                v = w.loan()
                if fill:
                    np.copyto(v, src)
                w.commit()
            n += 16
        out.update(frames=n, fps=n / (time.perf_counter() - t0))
        del v
        w.close()
    except BaseException:
        out["error"] = traceback.format_exc()
        ready.set()
    results.put(out)


def bench_read(ctx, seconds: float) -> list:
    import frameshm

    rows = []
    for fill in (False, True):
        stream = f"tp-read-{int(fill)}"
        ready, start, stop, q = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        p = ctx.Process(target=unthrottled_producer, args=(stream, fill, ready, start, stop, q))
        p.start()
        try:
            ready.wait(30)
            r = frameshm.Reader(stream, consumer="read-bench")
            start.set()
            for variant in ("wait_latest", "read_latest"):
                n = skipped = none = 0
                clock = time.perf_counter
                t_warm = clock() + 0.2
                while clock() < t_warm:
                    r.wait_latest(1.0)
                t0 = clock()
                end = t0 + seconds
                if variant == "wait_latest":
                    wait = r.wait_latest
                    while clock() < end:
                        for _ in range(64):
                            f = wait(1.0)
                            a = f.array
                            skipped += f.skipped
                        n += 64
                else:
                    peek = r.read_latest
                    while clock() < end:
                        for _ in range(64):
                            f = peek(copy=False)
                            if f is None:
                                none += 1
                                continue
                            a = f.array
                        n += 64
                dt = clock() - t0
                n -= none
                a = f = None
                rows.append({"case": f"{variant} + .array, producer {'filling' if fill else 'not filling'} "
                                     "1080p frames", "views": n, "seconds": dt, "views_per_s": n / dt,
                             "frames_skipped": skipped if variant == "wait_latest" else None})
            stop.set()
            res = q.get(timeout=30)
            for row in rows[-2:]:
                row["producer_fps"] = res.get("fps")
            if res.get("error"):
                rows[-1]["error"] = res["error"]
            r.close()
        finally:
            stop.set()
            start.set()
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
                p.join()
    return rows


# ---------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=1000, help="iterations per kind in (a) (default 1000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each rate measurement (default 3)")
    ap.add_argument("--parts", default="a,b,c", help="which parts to run (default a,b,c)")
    ap.add_argument("--json", default=None, help="results file (default bench/results/throughput-<time>.json)")
    args = ap.parse_args(argv)
    parts = set(p.strip() for p in args.parts.split(","))

    info = _common.machine_info()
    print(f"# throughput.py — {_common.header_line(info)}\n")
    shm_dir = _common.private_shm_dir("tp")
    old_env = os.environ.get("FRAMESHM_DIR")
    os.environ["FRAMESHM_DIR"] = shm_dir
    ctx = mp.get_context("spawn")
    payload = {"benchmark": "throughput", "machine": info, "args": vars(args), "shape": SHAPE}
    t_start = time.monotonic()
    failed = False
    try:
        if "a" in parts:
            print("running (a) publish vs memcpy ...", file=sys.stderr, flush=True)
            payload["copy"] = bench_copy(args.iters)
        if "b" in parts:
            print("running (b) tiny loan/commit ...", file=sys.stderr, flush=True)
            payload["tiny"] = bench_tiny(ctx, args.seconds)
        if "c" in parts:
            print("running (c) read side ...", file=sys.stderr, flush=True)
            payload["read"] = bench_read(ctx, args.seconds)
    finally:
        if old_env is None:
            os.environ.pop("FRAMESHM_DIR", None)
        else:
            os.environ["FRAMESHM_DIR"] = old_env
        _common.cleanup_shm_dir(shm_dir)
    payload["wall_s"] = time.monotonic() - t_start

    if "copy" in payload:
        c = payload["copy"]
        print(f"### (a) one copy of a 1080x1920x3 uint8 frame ({c['bytes'] / 1e6:.1f} MB), "
              f"median of {c['iters']} interleaved iterations\n")
        names = {"memcpy": "np.copyto(dst, src), one pre-faulted dst",
                 "memcpy_ring4": "np.copyto into a ring of 4 pre-faulted dsts",
                 "publish": "Writer.publish(src) (nslots=4)",
                 "loan_copy_commit": "loan() + np.copyto(view, src) + commit()"}
        rows = []
        for k, label in names.items():
            ratio = c[k]["median_us"] / c["memcpy"]["median_us"]
            rows.append([label, c[k]["median_us"], c[k]["p10_us"], c[k]["p90_us"],
                         f"{c[k]['gbps_median']:.1f}", f"{ratio:.3f}×"])
        print(_common.markdown_table(["operation", "median µs", "p10 µs", "p90 µs", "GB/s", "vs memcpy"], rows))
        verdict = "met" if c["ratio_publish_vs_memcpy"] <= 1.1 else "NOT met"
        print(f"\npublish / memcpy = {c['ratio_publish_vs_memcpy']:.3f}× (target ≤ 1.1×: {verdict})\n")
    if "tiny" in payload:
        print(f"### (b) tiny frames (shape (4,) uint32, 16 B) from Python, {args.seconds:g} s each\n")
        rows = []
        for r in payload["tiny"]:
            if r["case"].startswith("_"):
                continue
            rows.append([r["case"], r["fps"], r.get("consumer_fps"), r.get("consumer_skipped")])
            failed |= bool(r.get("error"))
        print(_common.markdown_table(["case", "producer frames/s", "consumer frames/s", "consumer skipped"],
                                     rows))
        base = next(r for r in payload["tiny"] if r["case"] == "loan/commit, no consumer")
        worst = min(r["fps"] for r in payload["tiny"] if r["case"].startswith("loan/commit"))
        print(f"\nloan/commit: {base['fps']:,.0f}/s without a consumer, {worst:,.0f}/s worst case "
              f"(target ≥ 200k/s: {'met' if worst >= 200e3 else 'NOT met' if base['fps'] < 200e3 else 'met without a consumer only'})\n")
    if "read" in payload:
        print(f"### (c) read side, producer process committing 1080p frames unthrottled, {args.seconds:g} s each\n")
        rows = [[r["case"], r["views_per_s"], r.get("producer_fps"), r.get("frames_skipped")]
                for r in payload["read"]]
        for r in payload["read"]:
            failed |= bool(r.get("error"))
        print(_common.markdown_table(["case", "views/s", "producer frames/s", "frames skipped"], rows))
    for sect in ("tiny", "read"):
        for r in payload.get(sect, []):
            if r.get("error"):
                print(f"\n[{r['case']}] ERROR:\n{r['error']}", file=sys.stderr)
    path = _common.write_results("throughput", payload, args.json)
    print(f"\nresults: {os.path.relpath(path)}  (total {payload['wall_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
