"""System calls per message of a 64 B stream at a fixed rate: producer and process-all
consumer, with and without a message queue (issue 16: "a consumer that keeps up takes
descriptors with no syscall").

Counts come from the kernel (`perf stat -e raw_syscalls:sys_enter,syscalls:sys_enter_futex
-p PID` attached to each process for the measured window only), so unlike times they do
not depend on how busy the machine is; CPU time per message and the consumer's sleeps
(voluntary context switches) are reported beside them. Compare two builds by running
this file with each on PYTHONPATH (the frameshm it imports is the one measured).
Without perf (a guest whose PMU and tracepoints are not exposed) the system-call columns
are left empty and the rest is measured as usual. The "-spin" modes read with
`spin=True` (the Reader's default), the others with `spin=False`.

    python bench/doorbell.py --rates 1000,10000,50000 --seconds 3
    python bench/doorbell.py --rates 100000,300000 --modes noqueue,noqueue-spin
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def producer(stream: str, rate: int, seconds: float) -> None:
    import numpy as np

    import frameshm

    w = frameshm.Writer(stream, shape=(64,), dtype=np.uint8, nslots=64)
    msg = np.zeros(64, np.uint8)
    print("READY", flush=True)
    sys.stdin.readline()  # go
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    sent = 0
    period = 1.0 / rate
    end = t0 + seconds
    # Paced in bursts of at most 8 so a 50 k/s rate does not need a sleep per message.
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - t0) / period) + 1
        for _ in range(min(due - sent, 8)):
            msg[:8] = np.frombuffer(sent.to_bytes(8, "little"), np.uint8)
            w.publish(msg)
            sent += 1
        if sent >= due:
            time.sleep(max(0.0, t0 + sent * period - time.perf_counter()))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    msg[8] = 1  # the end: the consumer stops here rather than at its timeout
    w.publish(msg)
    print(json.dumps({"sent": sent, "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                      "sleeps": r1.ru_nvcsw - r0.ru_nvcsw}), flush=True)
    sys.stdin.readline()  # consumer done
    w.close()


def consumer(stream: str, queue: bool, spin: bool) -> None:
    import frameshm

    r = frameshm.Reader(stream, queue=queue, spin=spin)
    print("READY", flush=True)
    got = lost = 0
    last = None
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        try:
            f = r.wait_next(timeout=1.0)
        except frameshm.FrameshmError:
            break  # the producer stopped: a second without a frame ends the run
        a = f.array
        if a[8]:
            break
        n = int.from_bytes(a[:8].tobytes(), "little")
        if last is not None and n != last + 1:
            lost += max(0, n - last - 1)
        last = n
        got += 1
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"got": got, "lost": lost,
                      "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                      "sleeps": r1.ru_nvcsw - r0.ru_nvcsw}), flush=True)
    r.close()


def _perf(pid: int, out: str) -> subprocess.Popen:
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e",
                             "raw_syscalls:sys_enter,syscalls:sys_enter_futex", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _counts(path: str) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].isdigit():
                out[parts[2].split(":")[-1]] = int(parts[0])
    return out


def one(rate: int, seconds: float, queue: bool, spin: bool, perf: bool) -> dict:
    tmp = tempfile.mkdtemp(prefix="fshm-bell-")
    env = dict(os.environ, FRAMESHM_DIR=tmp)
    stream = f"bell{os.getpid()}"
    me = [sys.executable, os.path.abspath(__file__)]
    p = subprocess.Popen(me + ["--role", "producer", stream, str(rate), str(seconds)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "READY"
    c = subprocess.Popen(me + ["--role", "consumer", stream, "1" if queue else "0", "1" if spin else "0"],
                         env=env, stdout=subprocess.PIPE, text=True)
    assert c.stdout.readline().strip() == "READY"
    perfs = [_perf(p.pid, tmp + "/p.perf"), _perf(c.pid, tmp + "/c.perf")] if perf else []
    time.sleep(0.5)  # perf attached
    p.stdin.write("go\n")
    p.stdin.flush()
    pres = json.loads(p.stdout.readline())
    cres = json.loads(c.stdout.readline())  # after its 1 s timeout
    for pr in perfs:
        pr.send_signal(signal.SIGINT)
        pr.wait(timeout=30)
    p.stdin.write("done\n")
    p.stdin.flush()
    p.wait(timeout=30)
    c.wait(timeout=30)
    pk, ck = (_counts(tmp + "/p.perf"), _counts(tmp + "/c.perf")) if perf else ({}, {})
    shutil.rmtree(tmp, ignore_errors=True)
    n = max(pres["sent"], 1)

    def per(counts, key):
        return counts[key] / n if key in counts else None
    return {"rate": rate, "queue": queue, "sent": pres["sent"], "got": cres["got"], "lost": cres["lost"],
            "p_sys_per_msg": per(pk, "sys_enter"), "p_futex_per_msg": per(pk, "sys_enter_futex"),
            "c_sys_per_msg": per(ck, "sys_enter"), "c_futex_per_msg": per(ck, "sys_enter_futex"),
            "p_cpu_us": pres["cpu_s"] / n * 1e6, "c_cpu_us": cres["cpu_s"] / n * 1e6,
            "c_sleeps_per_msg": cres["sleeps"] / n, "p_sleeps_per_msg": pres["sleeps"] / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--rates", default="1000,10000,50000", help="messages/s, comma separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window per case")
    ap.add_argument("--modes", default="noqueue,queue",
                    help="noqueue (Reader(queue=False)), queue; -spin appended: spin=True")
    a = ap.parse_args()
    if a.role:
        if a.role[0] == "producer":
            producer(a.role[1], int(a.role[2]), float(a.role[3]))
        else:
            consumer(a.role[1], a.role[2] == "1", a.role[3] == "1")
        return 0
    modes = a.modes.split(",")
    for mode in modes:
        if mode.removesuffix("-spin") not in ("noqueue", "queue"):
            ap.error(f"unknown mode {mode!r}")
    perf = _perf_works()
    if not perf:
        print("# perf stat with tracepoints does not work here (apt-get install linux-perf; a guest "
              "may not expose them): system calls not counted", file=sys.stderr)
    import frameshm

    print(f"# frameshm {frameshm.__version__} from {os.path.dirname(frameshm.__file__)}; "
          f"load {open('/proc/loadavg').read().split()[0]}")
    print(f"{'mode':12} {'rate':>6} {'sent':>7} {'lost':>5} {'prod sys/msg':>12} {'prod futex':>10} "
          f"{'cons sys/msg':>12} {'cons futex':>10} {'cons sleeps':>11} {'prod sleeps':>11} "
          f"{'prod CPU us':>11} {'cons CPU us':>11}")

    def num(v, w):
        return f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}"
    for rate in (int(x) for x in a.rates.split(",")):
        for mode in modes:
            r = one(rate, a.seconds, mode.startswith("queue"), mode.endswith("-spin"), perf)
            print(f"{mode:12} {rate:>6} {r['sent']:>7} {r['lost']:>5} {num(r['p_sys_per_msg'], 12)} "
                  f"{num(r['p_futex_per_msg'], 10)} {num(r['c_sys_per_msg'], 12)} {num(r['c_futex_per_msg'], 10)} "
                  f"{r['c_sleeps_per_msg']:>11.2f} {r['p_sleeps_per_msg']:>11.2f} {r['p_cpu_us']:>11.2f} "
                  f"{r['c_cpu_us']:>11.2f}", flush=True)
    return 0


def _perf_works() -> bool:
    """Whether perf can count this process's system calls (a guest may lack the events)."""
    if not shutil.which("perf"):
        return False
    try:
        rc = subprocess.run(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return rc.returncode == 0 and "not supported" not in rc.stderr


if __name__ == "__main__":
    sys.exit(main())
