#!/usr/bin/env python3
"""Publish -> consumer-holds-a-numpy-view latency of 1080p RGB frames, frameshm vs baselines.

Every case runs in two fresh processes (multiprocessing, spawn): a producer and a consumer.

Metric: the producer takes t0 = time.monotonic_ns() right before the hand-off (the frame
is already written into the transport's buffer, except for the publish() variant whose
one copy is part of the hand-off); the consumer takes t1 = time.monotonic_ns() as soon as
it holds a numpy array of the frame; latency = t1 - t0 (same CLOCK_MONOTONIC in both).

Cases (each at 60 fps, paced by the producer with absolute-schedule sleeps, and unthrottled):
  frameshm loan/commit   loan(), np.copyto(view, src), t0, commit(timestamp_ns=t0)
      reader: wait_latest spin=True (default) | wait_latest spin=False | wait_next
  frameshm publish       t0, publish(src, timestamp_ns=t0); reader wait_latest spin=True
  mp.shared_memory+Pipe  np.copyto(shm slot, src), t0, conn.send_bytes((seq, slot, t0));
                         consumer recv_bytes() then np.ndarray over the shm buffer
  pyzmq PUB/SUB ipc://   np.copyto(ring buffer, src), t0, send([header, buffer], copy=False);
                         consumer recv_multipart(copy=False) then np.frombuffer
Unthrottled runs also give the sustained rate: frames/s the producer handed off and
frames/s the consumer received.

    python bench/latency.py                      # everything, ~2 minutes
    python bench/latency.py --frames 300 --frames-unthrottled 1000 --cases fshm
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import struct
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SHAPE = (1080, 1920, 3)
FRAME_BYTES = SHAPE[0] * SHAPE[1] * SHAPE[2]
NSLOTS = 4          # frameshm slots, shm+Pipe slots
ZMQ_RING = 8        # pyzmq zero-copy send buffers
HDR = struct.Struct("<qqq")   # seq, slot, t0  (seq -1 = end)


def have_zmq() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


def make_cases(include_zmq: bool):
    cases = []
    for fps in (60, 0):
        rate = "60fps" if fps else "max"
        cases += [
            dict(id=f"fshm-loan-latest-spin-{rate}", transport="frameshm", produce="loan", read="latest",
                 spin=True, fps=fps, label="frameshm loan/commit, wait_latest spin=True"),
            dict(id=f"fshm-loan-latest-nospin-{rate}", transport="frameshm", produce="loan", read="latest",
                 spin=False, fps=fps, label="frameshm loan/commit, wait_latest spin=False"),
            dict(id=f"fshm-loan-next-{rate}", transport="frameshm", produce="loan", read="next",
                 spin=True, fps=fps, label="frameshm loan/commit, wait_next"),
            dict(id=f"fshm-publish-latest-spin-{rate}", transport="frameshm", produce="publish", read="latest",
                 spin=True, fps=fps, label="frameshm publish(frame) (t0 before its copy), wait_latest spin=True"),
            dict(id=f"mp-shm-pipe-{rate}", transport="pipe", produce="copy", read="next", spin=None, fps=fps,
                 label="multiprocessing.shared_memory + Pipe"),
        ]
        if include_zmq:
            cases.append(dict(id=f"zmq-ipc-{rate}", transport="zmq", produce="copy", read="next", spin=None,
                              fps=fps, label="pyzmq PUB/SUB ipc://, copy=False"))
    return cases


# ---------------------------------------------------------------------------------------
# producer side


def producer_main(case, cfg, ev, final_seq, results):
    """Creates the transport, waits for the consumer, hands off warmup + measured frames."""
    out = {"role": "producer", "case": case["id"]}
    cleanup = []
    try:
        if cfg.get("pin"):
            os.sched_setaffinity(0, {0})
        rng = np.random.default_rng(1)
        src = rng.integers(0, 256, size=SHAPE, dtype=np.uint8)
        period = int(1e9 / case["fps"]) if case["fps"] else 0
        warmup, nframes, cap_s = cfg["warmup"], cfg["frames"], cfg["max_seconds"]
        total = warmup + nframes
        t = case["transport"]

        if t == "frameshm":
            import frameshm

            w = frameshm.Writer(cfg["stream"], shape=SHAPE, dtype="uint8", nslots=NSLOTS)
            cleanup.append(w.close)
            if case["produce"] == "loan":
                def handoff(i):
                    v = w.loan()
                    np.copyto(v, src)
                    t0 = time.monotonic_ns()
                    w.commit(timestamp_ns=t0)
            else:
                def handoff(i):
                    t0 = time.monotonic_ns()
                    w.publish(src, timestamp_ns=t0)

            def finish():
                pass
        elif t == "pipe":
            from multiprocessing import shared_memory

            shm = shared_memory.SharedMemory(name=cfg["shm_name"], create=True, size=NSLOTS * FRAME_BYTES)
            st = {"slots": np.ndarray((NSLOTS,) + SHAPE, np.uint8, buffer=shm.buf)}
            st["slots"][:] = 0   # fault the pages in, as frameshm's pools are
            conn = cfg["conn"]

            def release():
                st.clear()   # drop the numpy views before closing the mapping
                shm.close()
                shm.unlink()
            cleanup.append(release)

            def handoff(i):
                s = i % NSLOTS
                np.copyto(st["slots"][s], src)
                t0 = time.monotonic_ns()
                conn.send_bytes(HDR.pack(i, s, t0))

            def finish():
                conn.send_bytes(HDR.pack(-1, 0, 0))
        elif t == "zmq":
            import zmq

            zctx = zmq.Context()
            pub = zctx.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, 4)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(cfg["zmq_addr"])
            cleanup.append(zctx.term)
            cleanup.append(pub.close)
            ring = [np.zeros(SHAPE, np.uint8) for _ in range(ZMQ_RING)]

            def handoff(i):
                buf = ring[i % ZMQ_RING]
                np.copyto(buf, src)
                t0 = time.monotonic_ns()
                pub.send(HDR.pack(i, 0, t0), zmq.SNDMORE)
                pub.send(buf, copy=False)

            def finish():
                pub.send(HDR.pack(-1, 0, 0), zmq.SNDMORE)
                pub.send(b"")
        else:
            raise ValueError(t)

        ev["producer_ready"].set()
        if not ev["consumer_ready"].wait(30):
            raise RuntimeError("consumer never became ready")
        time.sleep(0.2)   # let a zmq subscription propagate; same pause for every case

        start = time.monotonic_ns() + period
        deadline = time.monotonic_ns() + int(cap_s * 1e9)
        measured_start = None
        produced = 0
        for i in range(total):
            last = i == total - 1 or (i >= warmup and time.monotonic_ns() >= deadline)
            if last:
                final_seq.value = i
            _common.pace(i, start, period)
            if i == warmup:
                measured_start = time.monotonic_ns()
            handoff(i)
            produced += 1
            if last:
                break
        measured_end = time.monotonic_ns()
        finish()
        ev["producer_done"].set()
        out.update(
            produced=produced,
            measured_frames=produced - warmup,
            measured_s=(measured_end - measured_start) / 1e9 if measured_start else 0.0,
        )
        # Keep the transport alive until the consumer has its last frame.
        ev["consumer_done"].wait(15)
    except BaseException:
        out["error"] = traceback.format_exc()
        ev["producer_done"].set()
    finally:
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:
                pass
        results.put(out)


# ---------------------------------------------------------------------------------------
# consumer side


def _attach_untracked(name):
    """SharedMemory(name) without registering it with the resource tracker.

    Python 3.11 registers segments attached by name and unlinks them when the attaching
    process's tracker exits. Spawned children share the parent's tracker, so the usual
    resource_tracker.unregister() in the consumer would also drop the *producer's*
    registration and make its unlink() print a KeyError in the tracker. Not registering
    at all is the clean form of "unregister in the consumer"."""
    from multiprocessing import resource_tracker, shared_memory

    orig = resource_tracker.register
    resource_tracker.register = lambda *a, **k: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = orig


def consumer_main(case, cfg, ev, final_seq, results):
    out = {"role": "consumer", "case": case["id"]}
    lat = []
    recv_ns = []
    cleanup = []
    got = 0
    extra = {}
    try:
        if cfg.get("pin"):
            os.sched_setaffinity(0, {1})
        if not ev["producer_ready"].wait(30):
            raise RuntimeError("producer never became ready")
        warmup = cfg["warmup"]
        t = case["transport"]
        now = time.monotonic_ns

        if t == "frameshm":
            import frameshm

            r = frameshm.Reader(cfg["stream"], consumer="bench", spin=case["spin"])
            cleanup.append(r.close)
            wait = r.wait_latest if case["read"] == "latest" else r.wait_next
            ev["consumer_ready"].set()
            while True:
                try:
                    f = wait(0.25)
                except frameshm.Timeout:
                    if ev["producer_done"].is_set():
                        break
                    continue
                a = f.array
                t1 = now()
                got += 1
                seq = f.seq
                if seq >= warmup:
                    lat.append(t1 - f.timestamp_ns)
                    recv_ns.append(t1)
                del a, f
                if seq >= final_seq.value:
                    break
            extra["overruns"] = r.overruns
        elif t == "pipe":
            conn = cfg["conn"]
            shm = _attach_untracked(cfg["shm_name"])
            cleanup.append(shm.close)
            buf = shm.buf
            ev["consumer_ready"].set()
            while True:
                if not conn.poll(0.25):
                    if ev["producer_done"].is_set():
                        break
                    continue
                seq, slot, t0 = HDR.unpack(conn.recv_bytes())
                if seq < 0:
                    break
                a = np.ndarray(SHAPE, np.uint8, buffer=buf, offset=slot * FRAME_BYTES)
                t1 = now()
                got += 1
                if seq >= warmup:
                    lat.append(t1 - t0)
                    recv_ns.append(t1)
                del a
            del buf
        elif t == "zmq":
            import zmq

            zctx = zmq.Context()
            sub = zctx.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 4)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(cfg["zmq_addr"])
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            cleanup.append(zctx.term)
            cleanup.append(sub.close)
            ev["consumer_ready"].set()
            while True:
                if not sub.poll(250):
                    if ev["producer_done"].is_set():
                        break
                    continue
                parts = sub.recv_multipart(copy=False)
                seq, _slot, t0 = HDR.unpack(parts[0].bytes)
                if seq < 0:
                    break
                a = np.frombuffer(parts[1].buffer, np.uint8).reshape(SHAPE)
                t1 = now()
                got += 1
                if seq >= warmup:
                    lat.append(t1 - t0)
                    recv_ns.append(t1)
                del a, parts
                if seq >= final_seq.value:
                    break
        else:
            raise ValueError(t)
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        ev["consumer_ready"].set()
        ev["consumer_done"].set()
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception:
                pass
        out.update(received=got, latencies_ns=lat,
                   recv_span_s=(recv_ns[-1] - recv_ns[0]) / 1e9 if len(recv_ns) > 1 else 0.0, **extra)
        results.put(out)


# ---------------------------------------------------------------------------------------
# driver


def run_case(ctx, case, args, shm_dir, sock_dir):
    fps = case["fps"]
    cfg = {
        "warmup": args.warmup,
        "frames": args.frames if fps else args.frames_unthrottled,
        "max_seconds": args.max_seconds,
        "stream": f"lat-{case['id']}",
        "shm_name": f"fshmbench-{os.getpid()}-{case['id']}",
        "zmq_addr": f"ipc://{sock_dir}/{case['id']}.sock",
        "pin": args.pin,
    }
    ev = {k: ctx.Event() for k in ("producer_ready", "consumer_ready", "producer_done", "consumer_done")}
    final_seq = ctx.Value("q", 2**62, lock=False)
    results = ctx.Queue()
    pcfg, ccfg = dict(cfg), dict(cfg)
    if case["transport"] == "pipe":
        recv_end, send_end = ctx.Pipe(duplex=False)
        pcfg["conn"], ccfg["conn"] = send_end, recv_end
    cons = ctx.Process(target=consumer_main, args=(case, ccfg, ev, final_seq, results), name="consumer")
    prod = ctx.Process(target=producer_main, args=(case, pcfg, ev, final_seq, results), name="producer")
    cons.start()
    prod.start()
    if case["transport"] == "pipe":
        recv_end.close()
        send_end.close()
    got = {}
    budget = time.monotonic() + args.max_seconds + 60
    try:
        while len(got) < 2 and time.monotonic() < budget:
            try:
                r = results.get(timeout=1.0)
                got[r["role"]] = r
            except queue_mod.Empty:
                if not prod.is_alive() and not cons.is_alive() and results.empty():
                    break
    finally:
        for p in (prod, cons):
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if case["transport"] == "pipe":   # only if the producer died before unlinking
            try:
                from multiprocessing import shared_memory

                s = _attach_untracked(cfg["shm_name"])
                s.close()
                s.unlink()
            except FileNotFoundError:
                pass
    pr, cr = got.get("producer", {}), got.get("consumer", {})
    errors = [x["error"] for x in (pr, cr) if x.get("error")]
    if len(got) < 2:
        errors.append("missing results from " + ", ".join(sorted({"producer", "consumer"} - set(got))))
    lat = cr.get("latencies_ns", [])
    res = {
        "id": case["id"],
        "label": case["label"],
        "rate": f"{fps} fps" if fps else "unthrottled",
        "fps_target": fps,
        "produced": pr.get("produced"),
        "measured_frames": pr.get("measured_frames"),
        "received_measured": len(lat),
        "received_total": cr.get("received"),
        "overruns": cr.get("overruns"),
        **_common.stats_ns(lat),
    }
    if pr.get("measured_s"):
        res["producer_fps"] = pr["measured_frames"] / pr["measured_s"]
    if cr.get("recv_span_s"):
        res["consumer_fps"] = (len(lat) - 1) / cr["recv_span_s"]
    if errors:
        res["errors"] = errors
    return res


def print_tables(results):
    rows60 = [r for r in results if r["fps_target"]]
    rowsmax = [r for r in results if not r["fps_target"]]
    base = {}
    for r in results:
        if r["id"].startswith("mp-shm-pipe"):
            base[r["fps_target"]] = r.get("median_us")
    lines = []
    if rows60:
        lines.append("### 60 fps (paced), 1080x1920x3 uint8, publish -> numpy view\n")
        lines.append(_common.markdown_table(
            ["case", "frames", "median µs", "p99 µs", "max µs", "median vs shm+Pipe"],
            [[r["label"], r.get("received_measured"), r.get("median_us"), r.get("p99_us"), r.get("max_us"),
              _ratio(r.get("median_us"), base.get(r["fps_target"]))] for r in rows60]))
        lines.append("")
    if rowsmax:
        lines.append("### Unthrottled, 1080x1920x3 uint8\n")
        lines.append(_common.markdown_table(
            ["case", "produced fps", "delivered fps", "frames seen", "median µs", "p99 µs",
             "median vs shm+Pipe"],
            [[r["label"], r.get("producer_fps"), r.get("consumer_fps"),
              f"{r.get('received_measured')}/{r.get('measured_frames')}", r.get("median_us"), r.get("p99_us"),
              _ratio(r.get("median_us"), base.get(r["fps_target"]))] for r in rowsmax]))
    print("\n".join(lines))
    for r in results:
        for e in r.get("errors", []):
            print(f"\n[{r['id']}] ERROR:\n{e}", file=sys.stderr)


def _ratio(a, b):
    if not a or not b:
        return "-"
    return f"{a / b:.2f}×"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=540, help="measured frames per 60 fps case (default 540 = 9 s)")
    ap.add_argument("--frames-unthrottled", type=int, default=4000,
                    help="measured frames per unthrottled case (default 4000; capped by --max-seconds)")
    ap.add_argument("--warmup", type=int, default=30, help="frames handed off before measuring (default 30)")
    ap.add_argument("--max-seconds", type=float, default=4.0,
                    help="stop an unthrottled case's measured phase after this long (default 4)")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case ids to run (default all)")
    ap.add_argument("--pin", action="store_true",
                    help="pin the producer to CPU 0 and the consumer to CPU 1 (default: let the scheduler place them)")
    ap.add_argument("--no-zmq", action="store_true", help="skip the pyzmq baseline")
    ap.add_argument("--json", default=None, help="results file (default bench/results/latency-<time>.json)")
    args = ap.parse_args(argv)
    # Paced cases are bounded by their frame count; give them room beyond --max-seconds.
    include_zmq = have_zmq() and not args.no_zmq
    if not include_zmq and not args.no_zmq:
        print("pyzmq not importable: skipping the zmq baseline (pip install pyzmq)", file=sys.stderr)
    cases = make_cases(include_zmq)
    if args.cases:
        keys = [k.strip() for k in args.cases.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c["id"] for k in keys)]

    info = _common.machine_info()
    print(f"# latency.py — {_common.header_line(info)}{', pinned (producer cpu0, consumer cpu1)' if args.pin else ''}\n")
    shm_dir = _common.private_shm_dir("lat")
    sock_dir = tempfile.mkdtemp(prefix="fshm-bench-zmq-")
    old_env = os.environ.get("FRAMESHM_DIR")
    os.environ["FRAMESHM_DIR"] = shm_dir   # inherited by the spawned processes
    ctx = mp.get_context("spawn")
    results = []
    t_start = time.monotonic()
    try:
        for case in cases:
            t0 = time.monotonic()
            paced_cap = args.frames / case["fps"] + 5 if case["fps"] else args.max_seconds
            a = argparse.Namespace(**vars(args))
            a.max_seconds = paced_cap if case["fps"] else args.max_seconds
            res = run_case(ctx, case, a, shm_dir, sock_dir)
            res["wall_s"] = time.monotonic() - t0
            results.append(res)
            msg = (f"  {case['id']:<32} median {_common.fmt(res.get('median_us'))} µs  "
                   f"p99 {_common.fmt(res.get('p99_us'))} µs  n={res.get('n', 0)}  "
                   f"({res['wall_s']:.1f} s)")
            if not case["fps"]:
                msg += (f"  produced {_common.fmt(res.get('producer_fps'))} fps, "
                        f"delivered {_common.fmt(res.get('consumer_fps'))} fps")
            if res.get("errors"):
                msg += "  ERROR"
            print(msg, file=sys.stderr, flush=True)
    finally:
        if old_env is None:
            os.environ.pop("FRAMESHM_DIR", None)
        else:
            os.environ["FRAMESHM_DIR"] = old_env
        _common.cleanup_shm_dir(shm_dir)
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)
    print()
    print_tables(results)
    payload = {"benchmark": "latency", "machine": info, "args": {k: v for k, v in vars(args).items()},
               "shape": SHAPE, "nslots": NSLOTS, "wall_s": time.monotonic() - t_start, "results": results}
    path = _common.write_results("latency", payload, args.json)
    print(f"\nresults: {os.path.relpath(path)}  (total {payload['wall_s']:.0f} s)")
    return 1 if any(r.get("errors") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
