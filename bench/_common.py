"""Helpers shared by the frameshm benchmarks: machine info, statistics, tables, temp dirs, and
the worker-process plumbing of peers.py and peers_lossless.py."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import frameshm

        info["frameshm"] = frameshm.__version__
        import hashlib

        so = frameshm._core.__file__
        with open(so, "rb") as f:
            info["frameshm_core_sha1"] = hashlib.sha1(f.read()).hexdigest()[:12]
    except Exception:  # pragma: no cover - reported, not fatal
        pass
    try:
        import zmq

        info["pyzmq"] = zmq.__version__
        info["libzmq"] = zmq.zmq_version()
    except Exception:
        info["pyzmq"] = None
    try:
        rev = subprocess.run(["git", "-C", BENCH_DIR, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        # "+dirty": tracked library sources (lib/, devices/, binding/, frameshm/) differ from the commit.
        dirty = subprocess.run(["git", "-C", os.path.dirname(BENCH_DIR), "status", "--porcelain",
                                "--untracked-files=no", "--", "lib", "devices", "binding", "frameshm"],
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return info


def cpu_ticks() -> Optional[list]:
    """The machine's CPU time counters (/proc/stat's "cpu" line: user nice system idle iowait
    irq softirq steal ...), to tell how much of a run's wall time the hypervisor took."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_pct(t0: Optional[list], t1: Optional[list]) -> Optional[float]:
    """Share of the CPU time between two cpu_ticks() that was stolen (a virtual machine's
    CPUs given to other guests): on these VMs it reached 40-58 % during a run, which halves
    what the run could do however quiet the load average says the machine is."""
    if not t0 or not t1 or len(t0) < 8 or len(t1) < 8:
        return None
    d = [b - a for a, b in zip(t0, t1)]
    total = sum(d[:8])
    return 100.0 * d[7] / total if total > 0 else None


def stats_ns(samples: Sequence[int]) -> dict:
    """Latency statistics in microseconds from nanosecond samples."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    us = a / 1e3
    return {
        "n": int(a.size),
        "median_us": float(np.median(us)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "min_us": float(us.min()),
        "max_us": float(us.max()),
        "mean_us": float(us.mean()),
    }


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    rows = [[fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def private_shm_dir(tag: str) -> str:
    """A fresh tmpfs directory for FRAMESHM_DIR (real shared memory, private to this run)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if base is None:
        raise SystemExit("/dev/shm is missing: the benchmarks need a tmpfs for shared memory")
    path = os.path.join(base, f"bench-{tag}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    if not is_tmpfs(path):
        shutil.rmtree(path, ignore_errors=True)
        raise SystemExit(f"{base} is not a tmpfs: the benchmarks need real shared memory")
    return path


def cleanup_shm_dir(path: str) -> None:
    """Unlinks leftover consumer queues (via frameshm gc) and removes the directory."""
    if not path or not os.path.isdir(path):
        return
    try:
        import frameshm

        frameshm.gc(base_dir=path)
    except Exception:
        pass
    shutil.rmtree(path, ignore_errors=True)


def write_results(kind: str, payload: dict, out: Optional[str] = None) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(RESULTS_DIR, f"{kind}-{stamp}.json")
    with open(out, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    return out


def header_line(info: dict) -> str:
    parts = [f"nproc={info.get('nproc')}", f"kernel={info.get('kernel')}",
             f"python={info.get('python')}", f"numpy={info.get('numpy')}"]
    if info.get("pyzmq"):
        parts.append(f"pyzmq={info['pyzmq']} (libzmq {info.get('libzmq')})")
    if info.get("git"):
        parts.append(f"git={info['git']}")
    if info.get("loadavg_at_start"):
        parts.append(f"loadavg={info['loadavg_at_start']}")
    return ", ".join(parts)


def is_tmpfs(path: str) -> bool:
    """True if `path` lives on a tmpfs mount (longest mount-point prefix in /proc/mounts)."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return False
    return fstype == "tmpfs"


# ---- peers.py and peers_lossless.py: their spawned producer and consumer processes ----
# sync is the dict of multiprocessing objects peers.run_pair makes: "ready" and "finished"
# (locked Values, counts of consumers), the Events "producer_ready" and "producer_done", ...


def iox2_service(cfg, nslots, consumers=1, suffix=""):
    """The iceoryx2 node, publish-subscribe service (a uint8 slice; nslots samples per
    subscriber, safe overflow) and event service of stream cfg["stream"] + suffix."""
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    name = iox2.ServiceName.new(cfg["stream"] + suffix)
    svc = (node.service_builder(name).publish_subscribe(iox2.Slice[ctypes.c_uint8])
           .max_publishers(1).max_subscribers(consumers + 1).history_size(0)
           .subscriber_max_buffer_size(nslots)
           .subscriber_max_borrowed_samples(2).enable_safe_overflow(True).open_or_create())
    ev = (node.service_builder(iox2.ServiceName.new(cfg["stream"] + suffix + "/ev")).event()
          .max_listeners(consumers + 1).open_or_create())
    return iox2, node, svc, ev


def incr(v):
    """v.value += 1 under v's lock."""
    with v.get_lock():
        v.value += 1


def await_consumers(sync, n, who):
    """A producer's start: waits until n consumers are ready (RuntimeError after 30 s), then
    0.2 s more."""
    until = time.monotonic() + 30
    while sync["ready"].value < n:
        if time.monotonic() > until:
            raise RuntimeError(f"{who} never became ready")
        time.sleep(0.01)
    time.sleep(0.2)


def await_finished(sync, n, seconds=20):
    """A producer's end: waits (at most seconds) until n consumers are finished, so that none
    meets a closed stream."""
    until = time.monotonic() + seconds
    while sync["finished"].value < n and time.monotonic() < until:
        time.sleep(0.01)


def finish_worker(out_q, out, keep, sync=None, *, cpu0=False, **fields):
    """The `finally:` of every worker main. A consumer (sync given) counts itself ready, so
    that a producer still waiting goes on, and finished. Then what keep holds is closed, last
    first (a callable is called instead), out gets fields (with cpu0, a time.process_time()
    or None, also cpu_s: the CPU seconds since then, taken after the closes; 0.0 for None)
    and goes to out_q."""
    if sync is not None:
        incr(sync["ready"])
        incr(sync["finished"])
    for k in reversed(keep):
        if callable(k):
            k()
        elif hasattr(k, "close"):
            k.close()
    if cpu0 is not False:
        fields["cpu_s"] = time.process_time() - cpu0 if cpu0 is not None else 0.0
    out.update(fields)
    out_q.put(out)


def pace(i: int, start_ns: int, period_ns: int) -> None:
    """Sleeps until message i of a schedule that began at start_ns (CLOCK_MONOTONIC) is
    due, one every period_ns; a period of 0 never sleeps."""
    if period_ns:
        d = start_ns + i * period_ns - time.monotonic_ns()
        if d > 0:
            time.sleep(d / 1e9)


@contextlib.contextmanager
def cpus_kept_awake(enabled: bool = True):
    """Runs one SCHED_IDLE busy loop per CPU for the duration, so no vCPU halts.

    On these VMs a wake-up that lands on a halted vCPU costs the guest a trip through the
    hypervisor, which /proc/stat counts as steal: an idle machine showed 16-30 % steal over a
    wake-heavy run (64 B ping-pong, lossless64) and under 2 % with every vCPU kept busy. A
    SCHED_IDLE task runs only when nothing else wants the CPU and is preempted at once by any
    wake-up, so it takes no CPU time from the measured processes; it only changes what an
    idle CPU does. Every transport in a run sees the same machine either way."""
    if not enabled:
        yield []
        return
    # Each loop also ends when its parent is gone (a benchmark killed by a signal runs no
    # finally clause).
    code = ("import os\n"
            "parent = os.getppid()\n"
            "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
            "while os.getppid() == parent:\n"
            "    for _ in range(1000000):\n"
            "        pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(machine_info(), indent=2))
    sys.exit(0)
