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
           that of the last consumer to hold it. Median and p90 over frames all 8 got. The
           Pipe producer writes one message to each consumer's pipe in turn. The producer's
           hand-off CPU per frame (frameshm commit(); iceoryx2 send() + notify(); Pipe the
           8 sends), timed with the thread's CPU clock around the hand-off alone, is printed
           beside its whole CPU per frame (which the 6.2 MB fill dominates) and set against
           the lowest peer's in the summary; view60 prints it too.
  pingpong 64-byte ping-pong over two streams, both sides blocking: half the round trip
           (median, p90) over --pings round trips after 30 warm-up ones.
  flood    1080p RGB, producer unthrottled for --seconds (fill + hand-off as view60), one
           blocking consumer that holds a view of the newest frame: fps delivered (frames the
           consumer got / the producer's seconds), fps sent, median latency.
  floodl3  flood with a cache-thrashing neighbour process: a numpy loop streaming over a
           buffer twice the L3 size (read from sysfs), same priority, running for the case.
  floor    the futex-wake floor between two processes in C (bench/peers_c.c): one-way wake
           at 60 Hz (futex60) and half a futex ping-pong round trip (futexpp).
  lossless64  64-byte messages carrying (seq, window, the window's first and last seq), the
           producer paced at an offered rate for --window seconds per rate (sleeping until the
           next batch is due: --pace-us of schedule, at most --max-burst/2 messages, 1 at low
           rates; --pace-us 0: every message; run late by the scheduler, it catches up with at most
           --max-burst messages back to back and its schedule slips by the rest, reported as
           "late"; the achieved rate counts the slip),
           one process-all consumer that counts gaps in the seqs it reads. Offered rates double
           from --start-rate while a window is lossless (up to --max-rate), then --refine
           geometric bisection steps; a rate that loses is tried once more before it counts as
           lossy (same rule for every transport). Per transport: the highest rate the producer
           achieved in a lossless window (and its target; SHORT if < 95 % of it), producer and
           consumer CPU per message in that window, the lowest lossy target's losses, and
           whether the limit was the consumer's (it lost while the producer held >= 95 % of the
           rate), the producer's (it fell short there) or --max-rate; the summary adds CPU per
           message of every transport at the highest rate all of them got without loss.
           64 slots / a 64-sample subscriber buffer (safe overflow) for every transport, or
           --slots N for all of them (a longer ring rides out longer stalls of the guest).

Transports:
  fshm         Writer.loan()/commit(); Reader.wait_latest (view60), wait_next (tiny,
               lossless64), read_latest(copy=False) in a loop (poll480)
  fshm-nospin  as fshm with Reader(spin=False)
  fshm-pub     as fshm with Writer.publish(array) (one copy, streaming stores) for the fill
  fshm-pub2    as fshm-pub with Writer(fill_threads=2): publish copies with a helper thread
  fshm-ring    as fshm with Reader(queue=False): frames by seq from the header ring, the
               latest_seq futex as the doorbell (no descriptor queue)
  iox2         iceoryx2 (PyPI package `iceoryx2`, the `bench` extra): publish-subscribe of a
               uint8 slice, loan_slice_uninit + send; view60 adds an event service
               (Notifier.notify / Listener.timed_wait) since a subscriber cannot block;
               tiny, poll480 and lossless64 busy-poll Subscriber.receive()
  iox2-event   lossless64: iceoryx2 as above plus Notifier.notify after every send; the
               consumer blocks in Listener.timed_wait, then receives every sample there is
  pipe         multiprocessing.shared_memory slots + Pipe (view60); a duplex Pipe (pingpong)
  zmq          pyzmq PAIR sockets over ipc:// (pingpong)
  c, c-ring    frameshm's public C API (bench/peers_c.c, built with `make -C bench peers_c`
               against the library's static archive): view60 = loan, memcpy, commit /
               fshm_reader_wait_latest; pingpong = publish / fshm_reader_wait_next;
               lossless64 = publish paced / fshm_reader_wait_next (same search, in C); c-ring
               opens the readers with no_queue = 1 (as Reader(queue=False))
  futex60, futexpp   the floor case's two measurements (C)

    python bench/peers.py                       # every case, one run, ~2.5 minutes
    python bench/peers.py --cases view60,tiny --runs 2 --json out.json
    python bench/peers.py --cases flood,floodl3 --seconds 5
    python bench/peers.py --cases flood,floodl3 --ring 2   # every transport's ring: 2 slots
    python bench/peers.py --cases lossless64 --runs 2      # ~2.5 min a run
    python bench/peers.py --awake --runs 2     # vCPUs kept out of halt (see --awake)

The lossless64 case lives in bench/peers_lossless.py (its CASES entry, worker mains, row, line
and summary helpers, options and the C helper's lossless64 mode); this script runs it. The worker
plumbing both use (iox2_service, incr, await_consumers, await_finished, finish_worker) is in
bench/_common.py.

The header and the last line give the load average and the hypervisor's CPU steal over the
invocation (/proc/stat); every row its own steal.
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
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

import peers_lossless   # the lossless64 case
from _common import (await_consumers, await_finished, cpu_ticks, cpus_kept_awake, finish_worker, incr, iox2_service,
                     pace, steal_pct)

CASES = {
    "view60": dict(shape=(1080, 1920, 3), fps=60, frames=240, warmup=30,
                   transports=("fshm", "fshm-nospin", "fshm-pub", "fshm-ring", "iox2", "pipe")),
    "tiny": dict(shape=(64,), fps=0, nslots=64, transports=("fshm", "fshm-ring", "iox2")),
    "poll480": dict(shape=(480, 640, 3), fps=30, frames=120, warmup=15, transports=("fshm", "iox2")),
    "fanout8": dict(shape=(1080, 1920, 3), fps=30, frames=120, warmup=15, consumers=8,
                    transports=("fshm", "fshm-nospin", "fshm-ring", "iox2", "pipe")),
    "pingpong": dict(shape=(64,), fps=0, pingpong=True, warmup=30,
                     transports=("fshm", "fshm-ring", "iox2", "pipe", "zmq", "c", "c-ring")),
    "flood": dict(shape=(1080, 1920, 3), fps=0, warmup=10,
                  transports=("fshm", "fshm-pub", "fshm-pub2", "fshm-ring", "iox2")),
    "floodl3": dict(shape=(1080, 1920, 3), fps=0, warmup=10, thrash=True,
                    transports=("fshm", "fshm-pub", "fshm-pub2", "fshm-ring", "iox2")),
    "floor": dict(transports=("futex60", "futexpp")),
    "lossless64": peers_lossless.CASE,
}
# Transports run by the C helper (bench/peers_c.c): its mode and arguments per case.
C_MODES = {("view60", "c"): ["view60"], ("view60", "c-ring"): ["view60", None, "ring"],
           ("pingpong", "c"): ["pingpong"], ("pingpong", "c-ring"): ["pingpong", None, "ring"],
           ("floor", "futex60"): ["futex60"], ("floor", "futexpp"): ["futexpp"],
           ("lossless64", "c"): ["lossless64"], ("lossless64", "c-ring"): ["lossless64", "ring"]}
CASES["view60"]["transports"] += ("c", "c-ring")
THROUGHPUT = ("tiny", "flood", "floodl3", "lossless64")   # cases whose figure is a rate (higher is better)
PEERS = ("iox2", "iox2-event", "pipe", "zmq")
BENCH = os.path.dirname(os.path.abspath(__file__))
NSLOTS = 4   # the frame cases' ring (frameshm nslots, iceoryx2 subscriber buffer, pipe slots); --ring
HDR = struct.Struct("<qq")   # seq, t0; written into the first 16 bytes of iceoryx2/pipe payloads


def _iox2_service(case, cfg, suffix=""):
    return iox2_service(cfg, case.get("nslots", cfg.get("ring", NSLOTS)), case.get("consumers", 1), suffix)


def producer_main(cname, transport, cfg, sync, out_q):
    case = CASES[cname]
    out = {"role": "producer"}
    keep = []
    # CPU time of the hand-off alone (what makes a filled frame the consumers'), summed over
    # frames: the fill is the same numpy copy for every transport and dominates the producer's
    # CPU, so a difference in the hand-off drowns in it. None where fill and hand-off are one
    # call (fshm-pub, fshm-pub2).
    handoff_ns = [0]
    cpu_ns = time.thread_time_ns
    try:
        shape = case["shape"]
        nbytes = int(np.prod(shape))
        src = np.random.default_rng(1).integers(0, 256, size=nbytes, dtype=np.uint8)
        if transport.startswith("fshm"):
            import frameshm

            w = frameshm.Writer(cfg["stream"], shape=shape, dtype="uint8", nslots=case.get("nslots", cfg.get("ring", NSLOTS)),
                                fill_threads=2 if transport == "fshm-pub2" else 0)
            keep.append(w)
            flat = src.reshape(shape)

            if transport in ("fshm-pub", "fshm-pub2"):
                publish = w.publish
                handoff_ns = None

                def handoff(i):   # timestamp 0: the commit's clock, after the fill
                    publish(flat)
            else:
                def handoff(i):
                    v = w.loan()
                    v[...] = flat
                    c0 = cpu_ns()   # a system call: read before the timestamp, not inside the latency
                    w.commit(timestamp_ns=time.monotonic_ns())
                    handoff_ns[0] += cpu_ns() - c0

            def tiny(i):
                w.loan()
                w.commit()
        elif transport == "iox2":
            iox2, node, svc, ev = _iox2_service(case, cfg)
            pub = svc.publisher_builder().initial_max_slice_len(nbytes).create()
            notifier = ev.notifier_builder().create()
            keep += [node, svc, ev, pub, notifier]
            notify = cname in ("view60", "fanout8", "flood", "floodl3")

            def handoff(i):
                s = pub.loan_slice_uninit(nbytes)
                dst = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(s.payload_ptr), np.uint8)
                dst[:] = src
                c0 = cpu_ns()
                HDR.pack_into(dst, 0, i, time.monotonic_ns())
                s.assume_init().send()
                if notify:
                    notifier.notify()
                handoff_ns[0] += cpu_ns() - c0

            def tiny(i):
                s = pub.loan_slice_uninit(nbytes)
                s.assume_init().send()
        elif transport == "pipe":
            from multiprocessing import shared_memory

            ring = cfg.get("ring", NSLOTS)
            shm = shared_memory.SharedMemory(name=cfg["shm"], create=True, size=ring * nbytes)
            slots = np.ndarray((ring, nbytes), np.uint8, buffer=shm.buf)
            slots[:] = 0
            conns = cfg["conns"]   # one pipe per consumer (fanout8: 8, in turn)

            def handoff(i):
                s = i % ring
                slots[s] = src
                c0 = cpu_ns()
                msg = HDR.pack(i, time.monotonic_ns())
                for conn in conns:
                    conn.send_bytes(msg)
                handoff_ns[0] += cpu_ns() - c0

            def release():
                nonlocal slots
                del slots
                shm.close()
                shm.unlink()
            keep.append(release)
        else:
            raise ValueError(transport)
        sync["producer_ready"].set()
        await_consumers(sync, case.get("consumers", 1), "the consumers")
        cpu0 = time.process_time()
        if case["fps"]:
            period = int(1e9 / case["fps"])
            total = case["warmup"] + cfg["frames"]
            start = time.monotonic_ns() + period
            for i in range(total):
                pace(i, start, period)
                handoff(i)
            out["sent"] = total
        else:
            op, batch = (tiny, 256) if cname == "tiny" else (handoff, 4)
            t_start = time.monotonic()
            end = t_start + cfg["seconds"]
            i = 0
            while True:
                for _ in range(batch):
                    op(i)
                    i += 1
                if time.monotonic() >= end:
                    break
            out["sent"] = i
            out["elapsed_s"] = time.monotonic() - t_start
        out["cpu_s"] = time.process_time() - cpu0
        out["handoff_s"] = None if handoff_ns is None else handoff_ns[0] / 1e9
        sync["sent"].value = out["sent"]
        sync["producer_done"].set()
        await_finished(sync, case.get("consumers", 1))
    except BaseException:
        out["error"] = traceback.format_exc()
        sync["producer_done"].set()
    finally:
        finish_worker(out_q, out, keep)


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
        last = case.get("warmup", 0) + cfg.get("frames", 0) - 1 if case["fps"] else float("inf")
        done = sync["producer_done"].is_set
        if transport.startswith("fshm"):
            import frameshm

            poll = cname == "poll480"
            r = frameshm.Reader(cfg["stream"], consumer=None if poll else f"bench{idx}",
                                spin=transport != "fshm-nospin", subscribe=not poll,
                                **({"queue": False} if transport == "fshm-ring" else {}))
            keep.append(r)
            incr(sync["ready"])
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
            incr(sync["ready"])
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
                blocking = cname in ("view60", "fanout8", "flood", "floodl3")
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
            incr(sync["ready"])
            cpu0 = time.process_time()
            seq = -1
            while seq < last:
                if not conn.poll(0.25):
                    if done():
                        break
                    continue
                seq, t0 = HDR.unpack(conn.recv_bytes())
                a = np.ndarray(shape, np.uint8, buffer=buf, offset=(seq % cfg.get("ring", NSLOTS)) * nbytes)
                t1 = now()
                got += 1
                if seq >= case["warmup"]:
                    lat.append(t1 - t0)
                    seqs.append(seq)
                del a
            del buf
            keep.append(shm)
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        finish_worker(out_q, out, keep, sync, cpu0=cpu0, got=got, lost=lost, lat=lat, seqs=seqs)


def _pingpong_ends(transport, cfg, role, keep):
    """Opens one end of the ping-pong and returns (send, recv): send() hands 64 bytes to the
    other side, recv(timeout) blocks for the other side's message (False on a timeout)."""
    mine, theirs = ("-ping", "-pong") if role == "pinger" else ("-pong", "-ping")
    if transport.startswith("fshm"):
        import frameshm

        r = frameshm.Reader(cfg["stream"] + theirs, consumer="pp",
                            **({"queue": False} if transport == "fshm-ring" else {}))
        keep.append(r)
        if role == "ponger":   # the pinger's reader exists: see the note in pingpong_main
            cfg["sync"]["producer_ready"].wait(30)
        w = frameshm.Writer(cfg["stream"] + mine, shape=(64,), dtype="uint8", nslots=8)
        keep.append(w)
        loan, commit, wait_next, Timeout = w.loan, w.commit, r.wait_next, frameshm.Timeout

        def send():
            loan()
            commit()

        def recv(timeout):
            try:
                wait_next(timeout)
                return True
            except Timeout:
                return False
        return send, recv
    if transport == "iox2":
        case = CASES["pingpong"]
        iox2, node, svc_out, ev_out = _iox2_service(case, cfg, mine)
        _, node2, svc_in, ev_in = _iox2_service(case, cfg, theirs)
        pub = svc_out.publisher_builder().initial_max_slice_len(64).create()
        notifier = ev_out.notifier_builder().create()
        sub = svc_in.subscriber_builder().create()
        listener = ev_in.listener_builder().create()
        keep += [node, node2, svc_out, ev_out, svc_in, ev_in, pub, notifier, sub, listener]
        receive, timed_wait, ms = sub.receive, listener.timed_wait, iox2.Duration.from_millis

        def send():
            pub.loan_slice_uninit(64).assume_init().send()
            notifier.notify()

        def recv(timeout):
            end = time.monotonic() + timeout
            while True:
                s = receive()
                if s is not None:
                    del s
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                timed_wait(ms(max(1, int(left * 1e3))))
        return send, recv
    if transport == "pipe":
        conn = cfg["conn"]
        msg = bytes(64)

        def send():
            conn.send_bytes(msg)

        def recv(timeout):
            if not conn.poll(timeout):
                return False
            conn.recv_bytes()
            return True
        return send, recv
    if transport == "zmq":
        import zmq

        zctx = zmq.Context()
        sock = zctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        if role == "pinger":
            sock.bind(cfg["ipc"])
        else:
            sock.connect(cfg["ipc"])
        keep.append(zctx.term)
        keep.append(sock)
        msg = bytes(64)

        def send():
            sock.send(msg, copy=True)

        def recv(timeout):
            if not sock.poll(int(timeout * 1e3)):
                return False
            sock.recv(copy=True)
            return True
        return send, recv
    raise ValueError(transport)


def pingpong_main(role, transport, cfg, sync, out_q):
    """Pinger (role "producer" in the results) or ponger ("consumer0"). The ponger opens its
    end once the pinger has opened its own (producer_ready), so that every reader exists
    before the first message; the pinger starts once the ponger is ready."""
    out = {"role": "producer" if role == "pinger" else "consumer0"}
    keep, lat, got = [], [], 0
    cpu0 = None
    cfg = dict(cfg, sync=sync)
    now = time.monotonic_ns
    try:
        warmup, n = CASES["pingpong"]["warmup"], cfg["pings"]
        if role == "ponger" and not transport.startswith("fshm"):
            if not sync["producer_ready"].wait(30):
                raise RuntimeError("the pinger never became ready")
        send, recv = _pingpong_ends(transport, cfg, role, keep)
        if role == "pinger":
            sync["producer_ready"].set()
            await_consumers(sync, 1, "the ponger")
            cpu0 = time.process_time()
            for i in range(warmup + n):
                t0 = now()
                send()
                if not recv(5.0):
                    raise RuntimeError(f"no pong for ping {i}")
                if i >= warmup:
                    lat.append((now() - t0) // 2)
            got = warmup + n
            out["sent"] = got
            sync["producer_done"].set()
        else:
            incr(sync["ready"])
            cpu0 = time.process_time()
            done = sync["producer_done"].is_set
            while got < warmup + n:
                if recv(0.25):
                    got += 1
                    send()
                elif done():
                    break
    except BaseException:
        out["error"] = traceback.format_exc()
        sync["producer_done"].set()
        sync["producer_ready"].set()
    finally:
        if role == "pinger":   # the ponger's last pong must not meet a closed stream
            await_finished(sync, 1, 10)
        finish_worker(out_q, out, keep, sync if role == "ponger" else None, cpu0=cpu0,
                got=got, lost=0, lat=lat, seqs=[])


def thrash_main(nbytes, stop):
    """The cache-thrashing neighbour: streams over nbytes (read + write) until stop is set."""
    buf = np.ones(nbytes // 8)
    while not stop.is_set():
        np.add(buf, 1.0, out=buf)


def l3_bytes():
    """Size of the largest level-3 cache in sysfs (0 if none is listed)."""
    import glob

    best = 0
    for d in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            with open(d + "/level") as fh:
                if fh.read().strip() != "3":
                    continue
            with open(d + "/size") as fh:
                txt = fh.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best


def _peers_c(mode, timeout):
    """Runs the C helper with these arguments: the JSON object it prints, or {"error": ...}."""
    try:
        p = subprocess.run([os.path.join(BENCH, "peers_c")] + mode, capture_output=True, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"peers_c: {e}"}
    if p.returncode != 0:
        return {"error": f"peers_c {' '.join(mode)}: rc {p.returncode}: {p.stderr.strip()}"}
    return json.loads(p.stdout)


def run_c(cname, transport, args):
    """One run of the C helper: it forks its own producer and consumer."""
    mode = list(C_MODES[(cname, transport)])
    if cname == "lossless64":   # peers_c lossless64 WINDOW_S START_RATE MAX_RATE REFINE MAX_BURST PACE_US [ring]
        mode[1:1] = peers_lossless.c_args(args)
        r = _peers_c(mode, 300)
        return r if "error" in r else peers_lossless.lossless_row(r)
    n = args.pings if cname == "pingpong" else (args.frames or CASES.get(cname, {}).get("frames", 240))
    if cname == "floor":
        n = args.pings if transport == "futexpp" else (args.frames or 240)
    mode[1:2] = [str(n)]
    r = _peers_c(mode, 120)
    if "error" in r:
        return r
    return {"sent": r["sent"], "got": r["n"], "lost": 0, "prod_cpu_us": r["prod_cpu_us"],
            "cons_cpu_us": r["cons_cpu_us"], "median_us": r["median_us"], "p90_us": r["p90_us"]}


def run_pair(ctx, cname, transport, args, tag):
    if (cname, transport) in C_MODES:
        return run_c(cname, transport, args)
    cfg = {"stream": f"peers-{os.getpid()}-{tag}", "shm": f"peers-{os.getpid()}-{tag}",
           "frames": args.frames or CASES[cname].get("frames", 0), "seconds": args.seconds,
           "pings": args.pings, "ipc": f"ipc://{os.environ['FRAMESHM_DIR']}/zmq-{tag}", "ring": args.ring,
           **peers_lossless.worker_cfg(args)}
    n = CASES[cname].get("consumers", 1)
    sync = {k: ctx.Event() for k in ("producer_ready", "producer_done")}
    sync["sent"] = ctx.Value("q", 0, lock=False)
    sync["ready"] = ctx.Value("i", 0)
    sync["finished"] = ctx.Value("i", 0)
    lossless = CASES[cname].get("lossless", False)
    if lossless:
        peers_lossless.add_sync(ctx, sync)
    out_q = ctx.Queue()
    pcfg, ccfg = dict(cfg), dict(cfg)
    ccfgs = [ccfg] + [dict(cfg) for _ in range(n - 1)]   # one per consumer
    pingpong = CASES[cname].get("pingpong", False)
    if transport == "pipe":
        pcfg["conns"] = []
        for c in ccfgs:
            rx, tx = ctx.Pipe(duplex=pingpong)
            c["conn"] = rx
            pcfg["conns"].append(tx)
        pcfg["conn"] = pcfg["conns"][0]   # pingpong's and lossless64's one peer
    if lossless:
        procs = [ctx.Process(target=peers_lossless.lossless_consumer, args=(transport, ccfg, sync, out_q)),
                 ctx.Process(target=peers_lossless.lossless_producer, args=(transport, pcfg, sync, out_q))]
    elif pingpong:
        procs = [ctx.Process(target=pingpong_main, args=("ponger", transport, ccfg, sync, out_q)),
                 ctx.Process(target=pingpong_main, args=("pinger", transport, pcfg, sync, out_q))]
    else:
        procs = [ctx.Process(target=consumer_main, args=(cname, transport, ccfgs[i], sync, out_q, i))
                 for i in range(n)]
        procs.append(ctx.Process(target=producer_main, args=(cname, transport, pcfg, sync, out_q)))
    stop = None
    if CASES[cname].get("thrash"):
        stop = ctx.Event()
        procs.append(ctx.Process(target=thrash_main, args=(2 * (l3_bytes() or 32 << 20), stop),
                                 daemon=True))
    for p in procs:
        p.start()
    res = {}
    deadline = time.monotonic() + (300 if lossless else 120)
    while len(res) < n + 1 and time.monotonic() < deadline:
        try:
            r = out_q.get(timeout=1)
            res[r["role"]] = r
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
    if stop is not None:
        stop.set()
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
    if lossless:
        return peers_lossless.lossless_row(pr)
    row = {"sent": pr["sent"], "got": min(c["got"] for c in cons), "lost": sum(c["lost"] for c in cons),
           # CPU per frame handed off: the producer's, and all consumers' together
           "prod_cpu_us": pr["cpu_s"] / max(pr["sent"], 1) * 1e6,
           "cons_cpu_us": sum(c["cpu_s"] for c in cons) / max(pr["sent"], 1) * 1e6}
    if pr.get("handoff_s") is not None and cname != "tiny":
        row["handoff_cpu_us"] = pr["handoff_s"] / max(pr["sent"], 1) * 1e6
    if cname == "tiny":
        row["msgs_per_s"] = cons[0]["got"] / args.seconds
    elif cname in THROUGHPUT:   # flood: rates over the producer's own seconds
        row["fps"] = cons[0]["got"] / pr["elapsed_s"]
        row["fps_sent"] = pr["sent"] / pr["elapsed_s"]
    if cname == "pingpong":
        lat = sorted(res["producer"]["lat"])
        row["median_us"] = statistics.median(lat) / 1e3
        row["p90_us"] = lat[int(0.9 * (len(lat) - 1))] / 1e3
    elif cname != "tiny":
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


def _line(row, cname, t, run):
    head = f"run {run} {cname:8s} {t:12s}"
    if "error" in row:
        return f"{head} ERROR\n{row['error']}"
    if cname == "lossless64":
        return peers_lossless.lossless_line(row, head)
    if cname == "tiny":
        return (f"{head} {row['msgs_per_s'] / 1e3:9.1f} k msg/s  lost {row['lost']} of {row['sent']}  "
                f"cpu/msg prod {row['prod_cpu_us']:.2f} us cons {row['cons_cpu_us']:.2f} us")
    if cname in THROUGHPUT:
        return (f"{head} {row['fps']:8.1f} fps delivered  {row['fps_sent']:8.1f} sent  "
                f"median {row.get('median_us', 0):8.1f} us  cpu/frame prod {row['prod_cpu_us']:.0f} us "
                f"cons {row['cons_cpu_us']:.0f} us")
    what = "half rtt" if cname in ("pingpong",) or t == "futexpp" else "median"
    handoff = f" (hand-off {row['handoff_cpu_us']:.1f} us)" if "handoff_cpu_us" in row else ""
    return (f"{head} {what} {row.get('median_us', 0):8.1f} us  p90 {row.get('p90_us', 0):8.1f} us  "
            f"got {row['got']}/{row['sent']}  cpu/{'msg' if cname == 'pingpong' else 'frame'} "
            f"prod {row['prod_cpu_us']:.1f} us{handoff} cons {row['cons_cpu_us']:.1f} us")


def summary(results, cases):
    """Per case and run: each frameshm transport's figure ÷ the best peer's (and ÷ iceoryx2's)
    in the same run; view60 also ÷ the futex-wake floor of the same run."""
    lines = []
    key_of = {"tiny": "msgs_per_s", "flood": "fps", "floodl3": "fps", "lossless64": "max_lossless"}
    runs = sorted({r["run"] for r in results})
    for cname in cases:
        if cname == "floor":
            continue
        if cname == "lossless64":
            lines += peers_lossless.lossless_common(results, runs)
        key = key_of.get(cname, "median_us")
        higher = cname in THROUGHPUT
        for run in runs:
            rows = {r["transport"]: r[key] for r in results
                    if r["case"] == cname and r["run"] == run and key in r}
            peers = {t: v for t, v in rows.items() if t in PEERS}
            if not peers:
                continue
            best_t = (max if higher else min)(peers, key=peers.get)
            for t, v in rows.items():
                if t in PEERS:
                    continue
                txt = (f"{cname:8s} run {run} {t:12s} / best peer ({best_t}) = {v / peers[best_t]:.2f}"
                       + "".join(f"   / {p} = {v / peers[p]:.2f}" for p in ("iox2", "iox2-event")
                                 if p in peers and best_t != p))
                floor = [r["median_us"] for r in results if r["case"] == "floor" and r["run"] == run
                         and r["transport"] == "futex60" and "median_us" in r]
                if cname == "view60" and floor:
                    txt += f"   / futex floor = {v / floor[0]:.2f}"
                lines.append(txt)
            if cname == "fanout8":   # the goal's second half: the producer's hand-off CPU
                ho = {r["transport"]: r["handoff_cpu_us"] for r in results
                      if r["case"] == cname and r["run"] == run and "handoff_cpu_us" in r}
                best_ho = min((t for t in ho if t in PEERS), key=ho.get, default=None)
                for t, v in ho.items():
                    if best_ho and t not in PEERS:
                        lines.append(f"{cname:8s} run {run} {t:12s} producer hand-off CPU {v:.1f} us / "
                                     f"lowest peer's ({best_ho}, {ho[best_ho]:.1f} us) = {v / ho[best_ho]:.2f}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--transports", default="")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--frames", type=int, default=0, help="measured frames of paced cases")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of the tiny and flood cases")
    ap.add_argument("--pings", type=int, default=2000, help="measured round trips of pingpong")
    ap.add_argument("--ring", type=int, default=NSLOTS,
                    help="slots of the frame cases' ring for every transport: frameshm nslots (a power of "
                         "two), the iceoryx2 subscriber buffer, the pipe's slots (default %(default)s)")
    peers_lossless.add_args(ap)
    ap.add_argument("--awake", action="store_true",
                    help="keep every vCPU out of halt with a SCHED_IDLE busy loop per CPU (see "
                         "_common.cpus_kept_awake): wake-heavy cases otherwise measure the hypervisor's "
                         "halt exits, counted as steal; adds the loops' count to the load average")
    ap.add_argument("--json")
    args = ap.parse_args()
    only = set(filter(None, args.transports.split(",")))
    cases = args.cases.split(",")
    plan = [(c, t) for c in cases for t in CASES[c]["transports"] if not only or t in only]
    if any(k in C_MODES for k in plan):
        # The C helper links the library's static archive, built from this checkout.
        subprocess.run(["make", "-s", "-C", BENCH, "peers_c"], check=True, stdout=subprocess.DEVNULL)
    shm_dir = tempfile.mkdtemp(prefix="fshm-peers-", dir="/dev/shm")
    os.environ["FRAMESHM_DIR"] = shm_dir
    ctx = mp.get_context("spawn")
    results = []
    rev = subprocess.run(["git", "-C", BENCH, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    if subprocess.run(["git", "-C", BENCH, "diff", "--quiet", "HEAD", "--", "../lib", "../binding",
                       "../frameshm", "."]).returncode:
        rev += "+dirty"
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"L3 {l3_bytes() >> 20} MiB; commit {rev}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
          + (f"; frame cases' ring {args.ring} slots" if args.ring != NSLOTS else ""),
          flush=True)
    ticks0 = cpu_ticks()
    try:
        with cpus_kept_awake(args.awake) as spinners:
            if spinners:
                print(f"SCHED_IDLE busy loops keep the CPUs awake: pids {' '.join(map(str, spinners))}", flush=True)
            for run in range(args.runs):
                for cname, t in plan:
                    t0 = cpu_ticks()
                    row = run_pair(ctx, cname, t, args, f"{run}-{cname}-{t}")
                    row.update(run=run, case=cname, transport=t, load=os.getloadavg()[0],
                               steal_pct=steal_pct(t0, cpu_ticks()))
                    results.append(row)
                    print(_line(row, cname, t, run), flush=True)
    finally:
        import shutil

        shutil.rmtree(shm_dir, ignore_errors=True)
    for line in summary(results, cases):
        print(line)
    steal = steal_pct(ticks0, cpu_ticks())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; CPU steal over "
          f"the invocation {'-' if steal is None else f'{steal:.1f} %'}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
