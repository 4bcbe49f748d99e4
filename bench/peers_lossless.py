"""bench/peers.py's lossless64 case: the highest paced rate a process-all consumer keeps up with.

peers.py runs it (`python bench/peers.py --cases lossless64`; the case, its options and its
transports are described there). This module holds the case's entry in peers.CASES, its
producer and consumer mains (spawned by peers.run_pair), its row, line and summary helpers, and
the C helper's lossless64 arguments. The worker plumbing it shares with peers.py comes from
bench/_common.py (it does not import peers.py).
"""

from __future__ import annotations

import ctypes
import struct
import time
import traceback

from _common import await_consumers, await_finished, finish_worker, incr, iox2_service

CASE = dict(shape=(64,), fps=0, nslots=64, lossless=True,
            transports=("fshm", "fshm-ring", "iox2", "iox2-event", "c", "c-ring"))   # peers.CASES["lossless64"]
P64 = struct.Struct("<qqqq")   # seq, window, first seq of the window, last seq of the window
MAXW = 64                      # windows per (case, transport) at most
WFIELDS = 4                    # per window, written by the consumer: got, lost, bad, cpu_ns


def worker_cfg(args):
    """The case's part of a worker's cfg, from the command line."""
    return {"window": args.window, "start_rate": args.start_rate, "max_rate": args.max_rate,
            "refine": args.refine, "max_burst": args.max_burst, "pace_us": args.pace_us,
            "slots": args.slots}


def add_sync(ctx, sync):
    """The shared values the producer and the consumer exchange per window."""
    sync["wres"] = ctx.Array("q", MAXW * WFIELDS, lock=False)
    sync["acked"] = ctx.Value("i", -1, lock=False)
    sync["ended"] = ctx.Value("i", -1, lock=False)
    sync["cons_cpu0"] = ctx.Value("q", 0, lock=False)


def add_args(ap):
    ap.add_argument("--window", type=float, default=2.0, help="seconds per offered rate (lossless64)")
    ap.add_argument("--start-rate", type=int, default=5000, help="first offered rate, msg/s (lossless64)")
    ap.add_argument("--max-rate", type=int, default=320000, help="highest offered rate (lossless64)")
    ap.add_argument("--refine", type=int, default=3, help="bisection steps after doubling (lossless64)")
    ap.add_argument("--slots", type=int, default=CASE["nslots"],
                    help="lossless64: slots of the ring (frameshm) and samples of the subscriber buffer "
                         "(iceoryx2), every transport alike; a power of two")
    ap.add_argument("--max-burst", type=int, default=16,
                    help="lossless64: most messages the producer sends back to back when it runs late; "
                         "beyond that its schedule slips (0: catch up in full)")
    ap.add_argument("--pace-us", type=int, default=200,
                    help="lossless64: the producer sleeps until a batch of messages is due, at most this "
                         "much of its schedule and at most --max-burst/2 messages (0: before every message)")


def _lossless(w):
    return w["acked"] and w["lost"] == 0 and w["bad"] == 0 and w["got"] == w["n"]


def lossless_producer(transport, cfg, sync, out_q):
    """Sends windows of 64-byte messages, each paced at one offered rate, and chooses the next
    rate from what the consumer counted in the last window (its gaps in the sequence numbers
    inside the payloads): doubling from --start-rate while a window is lossless, then
    --refine geometric bisection steps between the highest lossless rate and the lowest lossy
    one. A rate that loses is tried once more (the same rule for every transport) before it
    counts as lost. Each window records the rate the producer achieved (lossless_row tells a
    consumer's limit from a producer that could not offer the rate)."""
    out = {"role": "producer"}
    keep, windows = [], []
    try:
        if transport.startswith("fshm"):
            import frameshm

            w = frameshm.Writer(cfg["stream"], shape=(64,), dtype="uint8", nslots=cfg["slots"])
            keep.append(w)
            loan, commit, pack_into = w.loan, w.commit, P64.pack_into

            def send(seq, win, first, last):
                pack_into(loan(), 0, seq, win, first, last)
                commit()
        elif transport in ("iox2", "iox2-event"):
            iox2, node, svc, ev = iox2_service(cfg, cfg["slots"])
            pub = svc.publisher_builder().initial_max_slice_len(64).create()
            notifier = ev.notifier_builder().create()
            keep += [node, svc, ev, pub, notifier]
            loan_slice, memmove, pack = pub.loan_slice_uninit, ctypes.memmove, P64.pack
            notify = notifier.notify if transport == "iox2-event" else None

            def send(seq, win, first, last):
                s = loan_slice(64)
                memmove(s.payload_ptr, pack(seq, win, first, last), 32)
                s.assume_init().send()
                if notify is not None:
                    notify()
        else:
            raise ValueError(transport)
        sync["producer_ready"].set()
        await_consumers(sync, 1, "the consumer")
        wres, acked, ended = sync["wres"], sync["acked"], sync["ended"]
        clock, sleep = time.monotonic_ns, time.sleep
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)   # PR_SET_TIMERSLACK 1 ns: sleeps end on time
        nxt = 0
        cap = cfg["max_burst"]

        def window(rate):
            nonlocal nxt
            k = len(windows)
            if k >= MAXW:
                raise RuntimeError("too many windows")
            n = max(2, int(rate * cfg["window"]))
            first, last = nxt, nxt + n - 1
            nxt += n
            # Sleep until a batch of q messages is due (at most pace_us of schedule, at most
            # half the burst cap): q = 1 sleeps before every message.
            q = max(1, min(cap // 2 if cap else n, rate * cfg["pace_us"] // 1_000_000))
            c0 = time.process_time()
            t0 = base = clock()
            i = burst = late = 0
            while i < n:
                due = min(n, (clock() - base) * rate // 1_000_000_000 + 1)   # messages due by now
                if cap and due - i > cap:   # run late by the scheduler: the schedule slips
                    late += due - i - cap
                    base += (due - i - cap) * 1_000_000_000 // rate
                    due = i + cap
                if due - i > burst:
                    burst = due - i
                while i < due:
                    send(first + i, k, first, last)
                    i += 1
                if i < n:   # ahead of the schedule: sleep until message i + q - 1 is due
                    d = base + (min(i + q, n) - 1) * 1_000_000_000 // rate - clock()
                    if d > 0:
                        sleep(d / 1e9)
            t1 = clock()
            cpu = time.process_time() - c0
            ended.value = k
            until = time.monotonic() + 2.0
            while acked.value < k and time.monotonic() < until:
                sleep(0.0005)
            got, lost, bad, cpu_ns = wres[k * WFIELDS:(k + 1) * WFIELDS]
            prev = wres[(k - 1) * WFIELDS + 3] if k else sync["cons_cpu0"].value
            row = {"rate": rate, "n": n, "achieved": (n - 1) * 1e9 / max(t1 - t0, 1),
                   "max_burst": int(burst), "late": int(late), "acked": acked.value >= k, "got": got, "lost": lost,
                   "bad": bad, "prod_cpu_us": cpu / n * 1e6,
                   "cons_cpu_us": (cpu_ns - prev) / 1e3 / n if acked.value >= k else None}
            windows.append(row)
            return row

        def trial(rate):
            """True if one of two windows at this rate was lossless (the same rule for every
            transport: a single loss may be a scheduling hiccup, two in a row is a limit)."""
            for _ in range(2):
                if _lossless(window(rate)):
                    return True
            return False

        best, fail = None, None
        rate = cfg["start_rate"]
        while True:   # doubling
            if trial(rate):
                best = rate
                if rate * 2 > cfg["max_rate"]:
                    break
                rate *= 2
            else:
                fail = rate
                break
        while best is None and rate > 1000:   # even the start rate lost: halve
            rate //= 2
            if trial(rate):
                best = rate
            else:
                fail = rate
        for _ in range(cfg["refine"] if best is not None and fail is not None else 0):
            mid = int(round((best * fail) ** 0.5, -2))
            if mid <= best or mid >= fail:
                break
            if trial(mid):
                best = mid
            else:
                fail = mid
        out.update(best=best, fail=fail, windows=windows, sent=nxt)
        sync["producer_done"].set()
        await_finished(sync, 1)
    except BaseException:
        out["error"] = traceback.format_exc()
        sync["producer_done"].set()
    finally:
        finish_worker(out_q, out, keep)


def lossless_consumer(transport, cfg, sync, out_q):
    """Process-all consumer of lossless64: reads the sequence number, window and the window's
    first/last seq from every message's payload and counts per window what it got, what the
    gaps in the sequence lost (including a lost tail), and messages out of order. A window is
    closed when its last message arrives, or when the consumer, idle, has seen the producer
    mark the window ended and then found nothing more to read."""
    out = {"role": "consumer0"}
    keep = []
    got = 0
    try:
        if not sync["producer_ready"].wait(30):
            raise RuntimeError("producer never became ready")
        wres, acked, ended = sync["wres"], sync["acked"], sync["ended"]
        done = sync["producer_done"].is_set
        unpack_from, cpu_ns = P64.unpack_from, time.process_time_ns
        st = {"win": -1, "open": False, "expect": 0, "last": 0, "got": 0, "lost": 0, "bad": 0,
              "end_seen": -1}

        def close():
            k = st["win"]
            lost = st["lost"] + max(0, st["last"] + 1 - st["expect"])   # a lost tail
            wres[k * WFIELDS:(k + 1) * WFIELDS] = [st["got"], lost, st["bad"], cpu_ns()]
            st["open"] = False
            acked.value = k

        def on(seq, win, first, last):
            if win != st["win"]:
                if st["open"]:
                    close()
                st.update(win=win, open=True, expect=first, last=last, got=0, lost=0, bad=0)
            if seq >= st["expect"] and st["open"]:
                st["lost"] += seq - st["expect"]   # the gap before this message
                st["expect"] = seq + 1
                st["got"] += 1
                if seq == last:
                    close()
            else:
                st["bad"] += 1   # duplicate, out of order, or after its window was closed

        def idle():
            """True when the case is over. Closes a window whose end the producer marked and
            after which a whole read attempt found nothing (its tail was lost)."""
            if st["open"]:
                if st["end_seen"] == st["win"]:
                    close()
                elif ended.value >= st["win"]:
                    st["end_seen"] = st["win"]
                return False
            return done()

        if transport.startswith("fshm"):
            import frameshm

            r = frameshm.Reader(cfg["stream"], consumer="bench0",
                                **({"queue": False} if transport == "fshm-ring" else {}))
            keep.append(r)
            wait_next, Timeout = r.wait_next, frameshm.Timeout
            overwritten = 0
            sync["cons_cpu0"].value = cpu_ns()
            incr(sync["ready"])
            while True:
                try:
                    f = wait_next(0.01)
                except Timeout:
                    if idle():
                        break
                    continue
                m = unpack_from(f, 0)   # the frame's bytes in place, no array per message
                if f.valid():
                    on(*m)
                    got += 1
                else:
                    # Read in place after the producer lapped us: the bytes are a later
                    # message's. Not counted: the gap it leaves counts as lost.
                    overwritten += 1
                del f
            out["overwritten"] = overwritten
        elif transport in ("iox2", "iox2-event"):
            iox2, node, svc, ev = iox2_service(cfg, cfg["slots"])
            sub = svc.subscriber_builder().create()
            listener = ev.listener_builder().create()
            keep += [node, svc, ev, sub, listener]
            receive, string_at = sub.receive, ctypes.string_at
            sync["cons_cpu0"].value = cpu_ns()
            incr(sync["ready"])
            if transport == "iox2":   # busy-poll, as tiny
                empty = 0
                while True:
                    s = receive()
                    if s is None:
                        empty += 1
                        if empty >= 1000:
                            empty = 0
                            if idle():
                                break
                        continue
                    on(*unpack_from(string_at(s.payload_ptr, 32), 0))
                    got += 1
                    del s
            else:   # block on the event service, then take every sample there is
                timed_wait, tmo = listener.timed_wait, iox2.Duration.from_millis(10)
                while True:
                    timed_wait(tmo)
                    n0 = got
                    while True:
                        s = receive()
                        if s is None:
                            break
                        on(*unpack_from(string_at(s.payload_ptr, 32), 0))
                        got += 1
                        del s
                    if got == n0 and idle():
                        break
        else:
            raise ValueError(transport)
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        finish_worker(out_q, out, keep, sync, got=got)


def c_args(args):
    """The C helper's lossless64 arguments after the mode: WINDOW_S START_RATE MAX_RATE REFINE
    MAX_BURST PACE_US SLOTS (peers.run_c; its JSON goes through lossless_row like the workers')."""
    return [str(args.window), str(args.start_rate), str(args.max_rate), str(args.refine),
            str(args.max_burst), str(args.pace_us), str(args.slots)]


def lossless_row(pr):
    """lossless64's row. The figure is the highest rate the producer achieved in a lossless
    window (with its target, CPU per message, largest burst and slip). limit: "consumer" when
    the lowest lossy target lost in windows the producer offered at >= 95 % of the target;
    "producer" when it fell short there too (it ran late: the loss may be the slip's bursts);
    "cap" when --max-rate was lossless. short: the best window itself was offered below 95 %."""
    ws = pr["windows"]
    ok = [x for x in ws if _lossless(x)]
    row = {"sent": pr["sent"], "fail_rate": pr["fail"], "windows": ws, "best_rate": pr["best"],
           "producer_max": max(x["achieved"] for x in ws) if ws else None}
    if ok:
        w = max(ok, key=lambda x: x["achieved"])
        row.update(best_rate=w["rate"], max_lossless=w["achieved"], prod_cpu_us=w["prod_cpu_us"],
                   cons_cpu_us=w["cons_cpu_us"], max_burst=w["max_burst"], late=w["late"],
                   short=w["achieved"] < 0.95 * w["rate"])
    if pr["fail"] is not None:
        fw = [x for x in ws if x["rate"] == pr["fail"]]
        row["fail_lost"] = [(x["lost"], x["n"]) for x in fw]
        row["fail_achieved"] = [x["achieved"] for x in fw]
        row["fail_max_burst"] = [x["max_burst"] for x in fw]
        row["fail_late"] = [x["late"] for x in fw]
        row["limit"] = ("consumer" if any(x["achieved"] >= 0.95 * x["rate"] for x in fw)
                        else "producer")
    else:
        row["limit"] = "cap"
    return row


def lossless_line(row, head):
    """The printed lines of a row (head: peers._line's "run N case transport")."""
    steal = f"  steal {row['steal_pct']:.1f} %" if row.get("steal_pct") is not None else ""
    if row.get("max_lossless") is None:
        txt = f"{head} no lossless window"
    else:
        txt = (f"{head} max lossless {row['max_lossless'] / 1e3:7.1f} k msg/s (target "
               f"{row['best_rate'] / 1e3:.1f} k{', SHORT' if row['short'] else ''}; max burst "
               f"{row['max_burst']}, late {row['late']})  "
               f"cpu/msg prod {row['prod_cpu_us']:.2f} us cons {row['cons_cpu_us']:.2f} us")
    if row.get("fail_rate") is not None:
        lost = ", ".join(f"{a} of {b}" for a, b in row["fail_lost"])
        ach = ", ".join(f"{a / 1e3:.1f} k" for a in row["fail_achieved"])
        txt += (f"\n{'':31s}next {row['fail_rate'] / 1e3:.1f} k msg/s: lost {lost} "
                f"(achieved {ach}; max burst {', '.join(map(str, row['fail_max_burst']))}; "
                f"late {', '.join(map(str, row['fail_late']))}); "
                f"limit: {row['limit']}")
    elif row.get("limit") == "cap":
        txt += f"\n{'':31s}lossless up to --max-rate (limit: cap)"
    return (txt + f"\n{'':31s}producer's best window {row['producer_max'] / 1e3:.1f} k msg/s; "
            f"{len(row['windows'])} windows{steal}")


def lossless_common(results, runs):
    """CPU per message of every transport at the same target rate, the highest one at which
    every transport of the run had a lossless window (with the rate achieved)."""
    lines = []
    for run in runs:
        rows = [r for r in results if r["case"] == "lossless64" and r["run"] == run and "windows" in r]
        per = []
        for r in rows:
            ok = {}
            for w in r["windows"]:
                if _lossless(w):
                    ok.setdefault(w["rate"], w)
            per.append((r["transport"], ok))
        common = set.intersection(*(set(ok) for _, ok in per)) if per else set()
        if not common:
            continue
        rate = max(common)
        lines.append(f"lossless64 run {run} at target {rate / 1e3:.1f} k msg/s (lossless for all), "
                     "cpu/msg cons / prod (achieved): " + ", ".join(
                         f"{t} {ok[rate]['cons_cpu_us']:.2f} / {ok[rate]['prod_cpu_us']:.2f} us "
                         f"({ok[rate]['achieved'] / 1e3:.1f} k)" for t, ok in per))
    return lines
