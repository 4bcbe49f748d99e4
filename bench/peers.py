#!/usr/bin/env python3
"""frameshm side by side with iceoryx2 (and multiprocessing.shared_memory + Pipe) in one run.

Every (case, transport) pair runs in two fresh spawned processes, a producer and a consumer;
the cases alternate transports so a change of machine load hits all of them alike.

Cases:
  view60   1080p RGB at 60 fps, blocking consumer. Latency = the consumer's monotonic clock
           when it holds a numpy view of the frame minus the producer's, taken after the fill,
           right before the hand-off. Median and p90 in us.
  tiny     64-byte messages, producer unthrottled for --seconds; a process-all consumer;
           64 slots (iceoryx2: a 64-sample subscriber buffer, safe overflow).
           Messages/s the consumer read, how many it lost, CPU per message.
  poll480  640x480 RGB at 30 fps, the consumer busy-polls (no sleep). Latency as view60.
  fanout8  1080p RGB at 30 fps to 8 blocking consumers (as view60 each); latency of a frame =
           that of the last consumer to hold it. Median and p90 over frames all 8 got.

Transports:
  fshm         Writer.loan()/commit(); Reader.wait_latest (view60), wait_next (tiny),
               read_latest(copy=False) in a loop (poll480)
  fshm-nospin  as fshm with Reader(spin=False)
  fshm-ring    as fshm with Reader(queue=False): frames by seq from the header ring, the
               latest_seq futex as the doorbell (no descriptor queue)
  iox2         iceoryx2 (PyPI package `iceoryx2`, the `bench` extra): publish-subscribe of a
               uint8 slice, loan_slice_uninit + send; view60 adds an event service
               (Notifier.notify / Listener.timed_wait) since a subscriber cannot block;
               tiny and poll480 busy-poll Subscriber.receive()
  pipe         multiprocessing.shared_memory slots + Pipe (view60 only)

    python bench/peers.py                       # every case, one run, ~1 minute
    python bench/peers.py --cases view60,tiny --runs 2 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import struct
import sys
import tempfile
import time
import traceback

import numpy as np

CASES = {
    "view60": dict(shape=(1080, 1920, 3), fps=60, frames=240, warmup=30,
                   transports=("fshm", "fshm-nospin", "iox2", "pipe")),
    "tiny": dict(shape=(64,), fps=0, nslots=64, transports=("fshm", "fshm-ring", "iox2")),
    "poll480": dict(shape=(480, 640, 3), fps=30, frames=120, warmup=15, transports=("fshm", "iox2")),
    "fanout8": dict(shape=(1080, 1920, 3), fps=30, frames=120, warmup=15, consumers=8,
                    transports=("fshm", "fshm-nospin", "iox2")),
}
NSLOTS = 4
HDR = struct.Struct("<qq")   # seq, t0; written into the first 16 bytes of iceoryx2/pipe payloads


def _pace(i, start, period):
    d = start + i * period - time.monotonic_ns()
    if d > 0:
        time.sleep(d / 1e9)


def _iox2_service(case, cfg):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    name = iox2.ServiceName.new(cfg["stream"])
    n = case.get("consumers", 1)
    svc = (node.service_builder(name).publish_subscribe(iox2.Slice[ctypes.c_uint8])
           .max_publishers(1).max_subscribers(n + 1).history_size(0)
           .subscriber_max_buffer_size(case.get("nslots", NSLOTS))
           .subscriber_max_borrowed_samples(2).enable_safe_overflow(True).open_or_create())
    ev = (node.service_builder(iox2.ServiceName.new(cfg["stream"] + "/ev")).event()
          .max_listeners(n + 1).open_or_create())
    return iox2, node, svc, ev


def producer_main(cname, transport, cfg, sync, out_q):
    case = CASES[cname]
    out = {"role": "producer"}
    keep = []
    try:
        shape = case["shape"]
        nbytes = int(np.prod(shape))
        src = np.random.default_rng(1).integers(0, 256, size=nbytes, dtype=np.uint8)
        if transport.startswith("fshm"):
            import frameshm

            w = frameshm.Writer(cfg["stream"], shape=shape, dtype="uint8", nslots=case.get("nslots", NSLOTS))
            keep.append(w)
            flat = src.reshape(shape)

            def handoff(i):
                v = w.loan()
                v[...] = flat
                w.commit(timestamp_ns=time.monotonic_ns())

            def tiny(i):
                w.loan()
                w.commit()
        elif transport == "iox2":
            iox2, node, svc, ev = _iox2_service(case, cfg)
            pub = svc.publisher_builder().initial_max_slice_len(nbytes).create()
            notifier = ev.notifier_builder().create()
            keep += [node, svc, ev, pub, notifier]
            notify = cname in ("view60", "fanout8")

            def handoff(i):
                s = pub.loan_slice_uninit(nbytes)
                dst = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(s.payload_ptr), np.uint8)
                dst[:] = src
                HDR.pack_into(dst, 0, i, time.monotonic_ns())
                s.assume_init().send()
                if notify:
                    notifier.notify()

            def tiny(i):
                s = pub.loan_slice_uninit(nbytes)
                s.assume_init().send()
        elif transport == "pipe":
            from multiprocessing import shared_memory

            shm = shared_memory.SharedMemory(name=cfg["shm"], create=True, size=NSLOTS * nbytes)
            slots = np.ndarray((NSLOTS, nbytes), np.uint8, buffer=shm.buf)
            slots[:] = 0
            conn = cfg["conn"]

            def handoff(i):
                s = i % NSLOTS
                slots[s] = src
                conn.send_bytes(HDR.pack(i, time.monotonic_ns()))

            def release():
                nonlocal slots
                del slots
                shm.close()
                shm.unlink()
            keep.append(release)
        else:
            raise ValueError(transport)
        sync["producer_ready"].set()
        until = time.monotonic() + 30
        while sync["ready"].value < case.get("consumers", 1):
            if time.monotonic() > until:
                raise RuntimeError("the consumers never became ready")
            time.sleep(0.01)
        time.sleep(0.2)
        cpu0 = time.process_time()
        if case["fps"]:
            period = int(1e9 / case["fps"])
            total = case["warmup"] + cfg["frames"]
            start = time.monotonic_ns() + period
            for i in range(total):
                _pace(i, start, period)
                handoff(i)
            out["sent"] = total
        else:
            end = time.monotonic() + cfg["seconds"]
            i = 0
            while True:
                for _ in range(256):
                    tiny(i)
                    i += 1
                if time.monotonic() >= end:
                    break
            out["sent"] = i
        out["cpu_s"] = time.process_time() - cpu0
        sync["sent"].value = out["sent"]
        sync["producer_done"].set()
        until = time.monotonic() + 20
        while sync["finished"].value < case.get("consumers", 1) and time.monotonic() < until:
            time.sleep(0.01)
    except BaseException:
        out["error"] = traceback.format_exc()
        sync["producer_done"].set()
    finally:
        for k in reversed(keep):
            if callable(k):
                k()
            elif hasattr(k, "close"):
                k.close()
        out_q.put(out)


def _count(v):
    with v.get_lock():
        v.value += 1


def consumer_main(cname, transport, cfg, sync, out_q, idx=0):
    case = CASES[cname]
    out = {"role": f"consumer{idx}"}
    lat, got, lost = [], 0, 0
    seqs = []
    cpu0 = None
    keep = []
    now = time.monotonic_ns
    try:
        if not sync["producer_ready"].wait(30):
            raise RuntimeError("producer never became ready")
        shape = case["shape"]
        nbytes = int(np.prod(shape))
        last = case.get("warmup", 0) + cfg.get("frames", 0) - 1
        done = sync["producer_done"].is_set
        if transport.startswith("fshm"):
            import frameshm

            poll = cname == "poll480"
            r = frameshm.Reader(cfg["stream"], consumer=None if poll else f"bench{idx}",
                                spin=transport != "fshm-nospin", subscribe=not poll,
                                **({"queue": False} if transport == "fshm-ring" else {}))
            keep.append(r)
            _count(sync["ready"])
            cpu0 = time.process_time()
            if cname == "tiny":
                while True:
                    try:
                        f = r.wait_next(0.25)
                    except frameshm.Timeout:
                        if done():
                            break
                        continue
                    got += 1
                    lost += f.skipped
                    del f
            elif poll:
                seen = -1
                peek = r.read_latest
                while True:
                    f = peek(copy=False)
                    if f is None or f.seq == seen:
                        if done() and seen >= last:
                            break
                        continue
                    a = f.array
                    t1 = now()
                    seen = f.seq
                    got += 1
                    if seen >= case["warmup"]:
                        lat.append(t1 - f.timestamp_ns)
                    del a, f
                    if seen >= last:
                        break
            else:
                while True:
                    try:
                        f = r.wait_latest(0.25)
                    except frameshm.Timeout:
                        if done():
                            break
                        continue
                    a = f.array
                    t1 = now()
                    got += 1
                    if f.seq >= case["warmup"]:
                        lat.append(t1 - f.timestamp_ns)
                        seqs.append(f.seq)
                    seq = f.seq
                    del a, f
                    if seq >= last:
                        break
        elif transport == "iox2":
            iox2, node, svc, ev = _iox2_service(case, cfg)
            sub = svc.subscriber_builder().create()
            listener = ev.listener_builder().create()
            keep += [node, svc, ev, sub, listener]
            _count(sync["ready"])
            cpu0 = time.process_time()
            receive = sub.receive
            if cname == "tiny":
                idle = 0
                while True:
                    s = receive()
                    if s is None:
                        idle += 1
                        if idle > 1000 and done():
                            break
                        continue
                    got += 1
                    del s
                lost = sync["sent"].value - got
            else:
                blocking = cname in ("view60", "fanout8")
                tmo = iox2.Duration.from_millis(250)
                seq = -1
                while seq < last:
                    if blocking:
                        listener.timed_wait(tmo)
                    newest = None
                    while True:   # drain to the newest, as wait_latest does
                        s = receive()
                        if s is None:
                            break
                        newest = s
                    if newest is None:
                        if done():
                            break
                        continue
                    a = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(newest.payload_ptr),
                                      np.uint8).reshape(shape)
                    t1 = now()
                    seq, t0 = HDR.unpack_from(a.reshape(-1), 0)
                    got += 1
                    if seq >= case["warmup"]:
                        lat.append(t1 - t0)
                        seqs.append(seq)
                    del a, newest
        elif transport == "pipe":
            from multiprocessing import resource_tracker, shared_memory

            reg = resource_tracker.register
            resource_tracker.register = lambda *a, **k: None
            try:
                shm = shared_memory.SharedMemory(name=cfg["shm"])
            finally:
                resource_tracker.register = reg
            conn = cfg["conn"]
            buf = shm.buf
            _count(sync["ready"])
            cpu0 = time.process_time()
            seq = -1
            while seq < last:
                if not conn.poll(0.25):
                    if done():
                        break
                    continue
                seq, t0 = HDR.unpack(conn.recv_bytes())
                a = np.ndarray(shape, np.uint8, buffer=buf, offset=(seq % NSLOTS) * nbytes)
                t1 = now()
                got += 1
                if seq >= case["warmup"]:
                    lat.append(t1 - t0)
                del a
            del buf
            keep.append(shm)
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        _count(sync["ready"])
        _count(sync["finished"])
        for k in reversed(keep):
            if hasattr(k, "close"):
                k.close()
        out.update(got=got, lost=lost, lat=lat, seqs=seqs,
                   cpu_s=time.process_time() - cpu0 if cpu0 is not None else 0.0)
        out_q.put(out)


def run_pair(ctx, cname, transport, args, tag):
    cfg = {"stream": f"peers-{os.getpid()}-{tag}", "shm": f"peers-{os.getpid()}-{tag}",
           "frames": args.frames or CASES[cname].get("frames", 0), "seconds": args.seconds}
    n = CASES[cname].get("consumers", 1)
    sync = {k: ctx.Event() for k in ("producer_ready", "producer_done")}
    sync["sent"] = ctx.Value("q", 0, lock=False)
    sync["ready"] = ctx.Value("i", 0)
    sync["finished"] = ctx.Value("i", 0)
    out_q = ctx.Queue()
    pcfg, ccfg = dict(cfg), dict(cfg)
    if transport == "pipe":
        rx, tx = ctx.Pipe(duplex=False)
        pcfg["conn"], ccfg["conn"] = tx, rx
    procs = [ctx.Process(target=consumer_main, args=(cname, transport, ccfg, sync, out_q, i))
             for i in range(n)]
    procs.append(ctx.Process(target=producer_main, args=(cname, transport, pcfg, sync, out_q)))
    for p in procs:
        p.start()
    res = {}
    deadline = time.monotonic() + 120
    while len(res) < n + 1 and time.monotonic() < deadline:
        try:
            r = out_q.get(timeout=1)
            res[r["role"]] = r
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    errs = [r["error"] for r in res.values() if "error" in r]
    if errs or len(res) < n + 1:
        return {"error": "\n".join(errs) or "a process died"}
    cons = [res[f"consumer{i}"] for i in range(n)]
    pr = res["producer"]
    row = {"sent": pr["sent"], "got": min(c["got"] for c in cons), "lost": sum(c["lost"] for c in cons),
           # CPU per frame handed off: the producer's, and all consumers' together
           "prod_cpu_us": pr["cpu_s"] / max(pr["sent"], 1) * 1e6,
           "cons_cpu_us": sum(c["cpu_s"] for c in cons) / max(pr["sent"], 1) * 1e6}
    if cname == "tiny":
        row["msgs_per_s"] = cons[0]["got"] / args.seconds
    else:
        if n == 1:
            lat = cons[0]["lat"]
        else:   # per frame, the last consumer to hold it; frames every consumer got
            per = [dict(zip(c["seqs"], c["lat"])) for c in cons]
            common = set(per[0]).intersection(*per[1:])
            lat = [max(d[s] for d in per) for s in common]
            row["frames_all_got"] = len(common)
        lat = sorted(lat)
        if lat:
            row["median_us"] = statistics.median(lat) / 1e3
            row["p90_us"] = lat[int(0.9 * (len(lat) - 1))] / 1e3
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--transports", default="")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--frames", type=int, default=0, help="measured frames of paced cases")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of the tiny case")
    ap.add_argument("--json")
    args = ap.parse_args()
    only = set(filter(None, args.transports.split(",")))
    shm_dir = tempfile.mkdtemp(prefix="fshm-peers-", dir="/dev/shm")
    os.environ["FRAMESHM_DIR"] = shm_dir
    ctx = mp.get_context("spawn")
    results = []
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    try:
        for run in range(args.runs):
            for cname in args.cases.split(","):
                for t in CASES[cname]["transports"]:
                    if only and t not in only:
                        continue
                    row = run_pair(ctx, cname, t, args, f"{run}-{cname}-{t}")
                    row.update(run=run, case=cname, transport=t, load=os.getloadavg()[0])
                    results.append(row)
                    if "error" in row:
                        print(f"run {run} {cname:8s} {t:12s} ERROR\n{row['error']}", flush=True)
                    elif cname == "tiny":
                        print(f"run {run} {cname:8s} {t:12s} {row['msgs_per_s'] / 1e3:9.1f} k msg/s  "
                              f"lost {row['lost']} of {row['sent']}  cpu/msg prod "
                              f"{row['prod_cpu_us']:.2f} us cons {row['cons_cpu_us']:.2f} us", flush=True)
                    else:
                        print(f"run {run} {cname:8s} {t:12s} median {row.get('median_us', 0):8.1f} us  "
                              f"p90 {row.get('p90_us', 0):8.1f} us  got {row['got']}/{row['sent']}  "
                              f"cpu/frame prod {row['prod_cpu_us']:.0f} us cons {row['cons_cpu_us']:.0f} us",
                              flush=True)
    finally:
        import shutil

        shutil.rmtree(shm_dir, ignore_errors=True)
    for cname in args.cases.split(","):
        rows = [r for r in results if r["case"] == cname and "error" not in r]
        key = "msgs_per_s" if cname == "tiny" else "median_us"
        iox = [r[key] for r in rows if r["transport"] == "iox2" and key in r]
        for t in CASES[cname]["transports"]:
            mine = [r[key] for r in rows if r["transport"] == t and key in r]
            if mine and iox and t != "iox2":
                ratios = [m / i for m, i in zip(mine, iox)]
                print(f"{cname:8s} {t:12s} / iox2 = " + ", ".join(f"{x:.2f}" for x in ratios))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
