#!/usr/bin/env python3
"""Zenoh bridge benchmark: a 30 fps RGB stream from a producer process through two real
`frameshm bridge` processes (exporter, importer) to a reader, at 640x480 and 1920x1080,
raw and JPEG; beside it the floor — a bare Zenoh put/subscribe of the same bytes between
two Python processes — and a GStreamer RTP/JPEG pipeline over UDP on the same link.

Measured per case over the window: frames delivered per second, added latency (capture
timestamp -> the reader has the frame; one host, one CLOCK_MONOTONIC) median / p99 and its
drift (median of the window's last third - of its first third: a backlog makes it grow), CPU
per frame of each side (utime + stime of its process from /proc, divided by the frames
delivered) and bytes on the wire per second (payload bytes the exporter put).

The link is loopback, or with ``--netns`` two network namespaces joined by a veth pair
(needs root and iproute2), optionally shaped with ``tc`` (``--rate 100mbit``). ``--delay``
and ``--loss`` (each way) go through tests/harness/linkemu.py, the NFQUEUE link emulator
(iptables; the stand-in for ``tc netem``, which the kernels we run on lack), or through
netem itself with ``--netem``. Through namespaces, ``link MB/s`` is what crossed the veth
from the sender's side to the receiver's (IP packets: headers and retransmissions
included; all flows of the case). Shared memory and message queues are not namespaced by
the network: the producer and the reader run in the root namespace, each bridge in its own
network namespace.

    python bench/bridge.py [--seconds 6] [--cases 640x480-raw,...] [--netns [--rate 100mbit]]
    python bench/bridge.py --netns --delay 20ms --loss 1%      # the emulated WAN-ish link
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (cleanup_shm_dir, cpu_ticks, steal_pct, header_line, machine_info, markdown_table,  # noqa: E402
                     private_shm_dir, write_results)

SIZES = {"640x480": (480, 640, 3), "1920x1080": (1080, 1920, 3)}
FPS = 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

PRODUCER = r"""
import sys, time, numpy as np, frameshm
h, w = {h}, {w}
y, x = np.mgrid[0:h, 0:w]
rng = np.random.default_rng(1)
base = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))], -1).astype(np.uint8)
noise = rng.integers(0, 8, size=base.shape, dtype=np.uint8)   # a camera's sensor noise
wr = frameshm.Writer("bench", shape=(h, w, 3), dtype="uint8", nslots=8)
print("READY", flush=True)
period = 1 / {fps}
t_next = time.monotonic()
i = 0
while True:
    frame = wr.loan()
    np.add(np.roll(base, i, axis=1), noise, out=frame)
    wr.commit()
    i += 4
    t_next += period
    time.sleep(max(0.0, t_next - time.monotonic()))
"""

# The floor: the same bytes put by one Python process and received by another, with the
# bridge's session settings (explicit endpoint, no scouting, no shared-memory transport,
# BLOCK, express), the capture timestamp in the attachment. It puts every frame (nothing
# to drain), so on a link slower than the stream its puts fall behind the clock.
FLOOR_PUB = r"""
import sys, time, struct, json, numpy as np, zenoh
h, w, endpoint = {h}, {w}, {endpoint!r}
conf = zenoh.Config()
conf.insert_json5("listen/endpoints", json.dumps([endpoint]))
conf.insert_json5("connect/endpoints", "[]")
conf.insert_json5("scouting/multicast/enabled", "false")
conf.insert_json5("scouting/gossip/enabled", "false")
conf.insert_json5("transport/shared_memory/enabled", "false")
s = zenoh.open(conf)
pub = s.declare_publisher("floor/bench", congestion_control=zenoh.CongestionControl.BLOCK, express=True)
y, x = np.mgrid[0:h, 0:w]
base = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (w + h))], -1).astype(np.uint8)
print("READY", flush=True)
period = 1 / {fps}
t_next = time.monotonic()
i = 0
while True:
    ts = time.monotonic_ns()
    frame = np.roll(base, i, axis=1)    # stands for the frame the producer wrote
    pub.put(frame.tobytes(), attachment=struct.pack("<Q", ts))
    i += 4
    t_next += period
    time.sleep(max(0.0, t_next - time.monotonic()))
"""

FLOOR_SUB = r"""
import sys, time, struct, json, threading, zenoh
endpoint = {endpoint!r}
conf = zenoh.Config()
conf.insert_json5("listen/endpoints", "[]")
conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
conf.insert_json5("scouting/multicast/enabled", "false")
conf.insert_json5("scouting/gossip/enabled", "false")
conf.insert_json5("transport/shared_memory/enabled", "false")
s = zenoh.open(conf)
lat = []
nbytes = [0]
lock = threading.Lock()
def cb(sample):
    data = sample.payload.to_bytes()          # the copy the importer makes too
    now = time.monotonic_ns()
    ts, = struct.unpack("<Q", sample.attachment.to_bytes())
    with lock:
        lat.append(now - ts)
        nbytes[0] += len(data)
sub = s.declare_subscriber("floor/bench", cb)
print("READY", flush=True)
for line in sys.stdin:                         # "MARK": start of the window; "DUMP": its end
    with lock:
        if line.strip() == "MARK":
            lat.clear(); nbytes[0] = 0
        else:
            print("RESULT", json.dumps({{"lat": lat, "bytes": nbytes[0]}}), flush=True)
"""


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc, prefix: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


class Link:
    """Where each side runs: loopback, or two network namespaces joined by a veth pair."""

    def __init__(self, netns: bool, rate: Optional[str], delay: Optional[str], loss: Optional[str],
                 netem: bool = False, cc: Optional[str] = None):
        self.netns = netns
        self.desc = "loopback"
        self.a_host = self.b_host = "127.0.0.1"
        self.emu = None
        if not netns:
            return
        if (delay or loss) and not netem:
            if rate:
                raise SystemExit("--rate with --delay/--loss needs --netem (the emulator does not shape)")
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "harness"))
            from linkemu import EmulatedLink

            self.emu = EmulatedLink(_ms(delay or "0ms"), _fraction(loss or "0%"), cc=cc)
            self.ns, self.veth = self.emu.ns, self.emu.veth
            self.a_host, self.b_host = self.emu.a_host, self.emu.b_host
            self.desc = self.emu.desc
            return
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"fshm-bra-{tag}", f"fshm-brb-{tag}")
        self.veth = (f"fbra{tag}", f"fbrb{tag}")
        self.a_host, self.b_host = "10.231.0.1", "10.231.0.2"
        run = lambda *cmd: subprocess.run(cmd, check=True)  # noqa: E731
        for ns in self.ns:
            run("ip", "netns", "add", ns)
        try:
            run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
            for ns, dev, addr in zip(self.ns, self.veth, (self.a_host, self.b_host)):
                run("ip", "link", "set", dev, "netns", ns)
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
                run("ip", "-n", ns, "link", "set", "lo", "up")
                if delay or loss:
                    netem = ["netem"] + (["delay", delay] if delay else []) + (["loss", loss] if loss else [])
                    if rate:
                        netem += ["rate", rate]
                    run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *netem)
                elif rate:
                    run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", "256kb", "latency", "50ms")
        except BaseException:
            self.close()
            raise
        self.desc = f"veth between two network namespaces, {rate or 'unshaped'}" + (
            f", netem delay {delay} loss {loss}" if delay or loss else "")

    def prefix(self, side: str) -> List[str]:
        if not self.netns:
            return []
        return ["ip", "netns", "exec", self.ns[0 if side == "a" else 1]]

    def rx_bytes(self) -> Optional[int]:
        """Bytes received by the receiving side's veth (IP packets from the sender's side)."""
        if not self.netns:
            return None
        out = subprocess.run(["ip", "-n", self.ns[1], "-j", "-s", "link", "show", "dev", self.veth[1]],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def close(self) -> None:
        if self.emu is not None:
            self.emu.close()
            print(f"link emulator counts (into a, into b): {self.emu.counts}", flush=True)
        elif self.netns:
            for ns in self.ns:
                subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|us)?", text.strip())
    if not m:
        raise SystemExit(f"--delay {text!r}: e.g. 20ms")
    return float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1e3, "us": 1e-3}[m.group(2)]


def _fraction(text: str) -> float:
    t = text.strip()
    return float(t[:-1]) / 100 if t.endswith("%") else float(t)


def _popen(argv, env, **kw):
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, **kw)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_bridge_case(size: str, encoding: str, seconds: float, link: Link, shm: str) -> dict:
    import frameshm

    h, w, _ = SIZES[size]
    port = free_port()
    env = dict(os.environ, FRAMESHM_DIR=shm, PYTHONUNBUFFERED="1")
    env.pop("FRAMESHM_NAMESPACE", None)
    fm = [sys.executable, "-m", "frameshm"]
    procs = []
    try:
        prod = _popen([sys.executable, "-c", PRODUCER.format(h=h, w=w, fps=FPS)], dict(env, FRAMESHM_NAMESPACE="a"))
        procs.append(prod)
        wait_line(prod, "READY")
        spec = "bench" if encoding == "raw" else "bench:jpeg"
        a = _popen(link.prefix("a") + fm + ["--namespace", "a", "bridge", "--frames", "bench",
                                            "--listen", f"tcp/{link.a_host}:{port}", "--export", spec], env)
        b = _popen(link.prefix("b") + fm + ["--namespace", "b", "bridge", "--frames", "bench",
                                            "--connect", f"tcp/{link.a_host}:{port}", "--import", "bench"], env)
        procs += [a, b]
        r = frameshm.Reader("bench", namespace="b", base_dir=shm, consumer="bench", spin=False)
        try:
            r.wait_latest(60)
            deadline = time.monotonic() + 1.5            # warm-up
            while time.monotonic() < deadline:
                r.wait_latest(5)
            cpu0 = (cpu_s(a.pid), cpu_s(b.pid))
            rx0 = link.rx_bytes()
            from frameshm.roles import read_metrics

            m0 = read_metrics("bench.bridge", base_dir=shm, namespace="a")
            i0 = read_metrics("bench.bridge", base_dir=shm, namespace="b")
            lat, skipped = [], 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                f = r.wait_latest(5)
                lat.append(f.latency_ns)
                skipped += f.skipped
            dt = time.monotonic() - t0
            cpu1 = (cpu_s(a.pid), cpu_s(b.pid))
            rx1 = link.rx_bytes()
            m1 = read_metrics("bench.bridge", base_dir=shm, namespace="a")
            i1 = read_metrics("bench.bridge", base_dir=shm, namespace="b")
        finally:
            r.close()
        n = len(lat)
        ex, im = m1["streams"]["bench"], i1["streams"]["bench"]
        sent = ex["frames"] - m0["streams"]["bench"]["frames"]
        wire = None
        if sent:
            # bytes_per_s is over the metrics window; the mean size per frame is steadier
            wire = ex["bytes_per_s"] / max(ex["fps"], 1e-9) * n / dt
        lat_ms = np.asarray(lat) / 1e6
        return {"case": f"{size}-{encoding}", "kind": "bridge", "size": size, "encoding": encoding,
                "fps": n / dt, "skipped": skipped,
                # where the frames the reader missed went: dropped by the exporter (newest
                # wins at the sender), by the importer (a newer one arrived before it wrote
                # this one), or published by the importer but superseded before the reader
                "export_drops": ex["drops"] - m0["streams"]["bench"]["drops"],
                "import_drops": im["drops"] - i0["streams"]["bench"]["drops"],
                "imported": im["frames"] - i0["streams"]["bench"]["frames"], "median_ms": float(np.median(lat_ms)),
                "p99_ms": float(np.percentile(lat_ms, 99)),
                # a backlog shows as latency growing over the window
                "drift_ms": float(np.median(lat_ms[-(n // 3):]) - np.median(lat_ms[: n // 3])) if n >= 3 else None,
                "cpu_ms_per_frame_export": (cpu1[0] - cpu0[0]) * 1e3 / max(n, 1),
                "cpu_ms_per_frame_import": (cpu1[1] - cpu0[1]) * 1e3 / max(n, 1),
                "wire_MBps": wire / 1e6 if wire else None,
                "link_MBps": (rx1 - rx0) / dt / 1e6 if rx0 is not None else None,
                # the exporter's send window at the end (frames) and its importer's round trips
                "window": ex.get("window"), "rtt_min_ms": ex.get("rtt_min_ms"), "rtt_ms": ex.get("rtt_ms")}
    finally:
        _stop(procs)


def run_floor_case(size: str, seconds: float, link: Link) -> dict:
    h, w, _ = SIZES[size]
    endpoint = f"tcp/{link.a_host}:{free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    try:
        pub = _popen(link.prefix("a") + [sys.executable, "-c", FLOOR_PUB.format(h=h, w=w, fps=FPS, endpoint=endpoint)],
                     env)
        procs.append(pub)
        wait_line(pub, "READY")
        sub = _popen(link.prefix("b") + [sys.executable, "-c", FLOOR_SUB.format(endpoint=endpoint)], env)
        procs.append(sub)
        wait_line(sub, "READY")
        time.sleep(1.5)
        cpu0 = (cpu_s(pub.pid), cpu_s(sub.pid))
        rx0 = link.rx_bytes()
        sub.stdin.write("MARK\n")
        sub.stdin.flush()
        t0 = time.monotonic()
        time.sleep(seconds)
        sub.stdin.write("DUMP\n")
        sub.stdin.flush()
        dt = time.monotonic() - t0
        cpu1 = (cpu_s(pub.pid), cpu_s(sub.pid))
        rx1 = link.rx_bytes()
        res = json.loads(wait_line(sub, "RESULT").split(None, 1)[1])
        lat_ms = np.asarray(res["lat"]) / 1e6
        n = len(lat_ms)
        return {"case": f"{size}-floor", "kind": "zenoh floor", "size": size, "encoding": "raw",
                "fps": n / dt, "skipped": None, "median_ms": float(np.median(lat_ms)) if n else None,
                "drift_ms": float(np.median(lat_ms[-(n // 3):]) - np.median(lat_ms[: n // 3])) if n >= 3 else None,
                "p99_ms": float(np.percentile(lat_ms, 99)) if n else None,
                "cpu_ms_per_frame_export": (cpu1[0] - cpu0[0]) * 1e3 / max(n, 1),
                "cpu_ms_per_frame_import": (cpu1[1] - cpu0[1]) * 1e3 / max(n, 1),
                "wire_MBps": res["bytes"] / dt / 1e6,
                "link_MBps": (rx1 - rx0) / dt / 1e6 if rx0 is not None else None}
    finally:
        _stop(procs)


def run_gstreamer_case(size: str, seconds: float, link: Link, quality: int = 90) -> Optional[dict]:
    """videotestsrc -> jpegenc -> rtpjpegpay -> udpsink | udpsrc -> depay -> jpegdec ->
    fpsdisplaysink: delivered fps and CPU per frame (no per-frame latency: GStreamer's
    pipelines do not carry our capture timestamps)."""
    gst = "gst-launch-1.0"
    h, w, _ = SIZES[size]
    port = free_port()
    src = (f"videotestsrc is-live=true pattern=smpte ! video/x-raw,format=I420,width={w},height={h},framerate={FPS}/1 "
           f"! jpegenc quality={quality} ! rtpjpegpay ! udpsink host={link.b_host} port={port} sync=false")
    dst = (f'udpsrc port={port} caps="application/x-rtp,media=video,encoding-name=JPEG,payload=26,'
           f'clock-rate=90000" ! rtpjpegdepay ! jpegdec ! fpsdisplaysink video-sink=fakesink '
           f"text-overlay=false silent=false sync=false")
    procs = []
    try:
        rx = subprocess.Popen(link.prefix("b") + ["sh", "-c", f"exec {gst} -v {dst}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(rx)
        time.sleep(1.0)
        tx = subprocess.Popen(link.prefix("a") + ["sh", "-c", f"exec {gst} -q {src}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(tx)
        time.sleep(2.0)
        cpu0 = (cpu_s(tx.pid), cpu_s(rx.pid))
        rx0 = link.rx_bytes()
        time.sleep(seconds)
        cpu1 = (cpu_s(tx.pid), cpu_s(rx.pid))
        rx1 = link.rx_bytes()
    except FileNotFoundError:
        return None
    finally:
        _stop(procs)
    out = rx.stdout.read() if rx.stdout else ""
    rates = [float(m) for m in re.findall(r"average: ([0-9.]+)", out)]
    fps = rates[-1] if rates else None
    n = (fps or 0) * seconds
    return {"case": f"{size}-gstreamer", "kind": "GStreamer RTP/JPEG (UDP)", "size": size, "encoding": "jpeg",
            "fps": fps, "skipped": None, "median_ms": None, "p99_ms": None,
            "cpu_ms_per_frame_export": (cpu1[0] - cpu0[0]) * 1e3 / max(n, 1),
            "cpu_ms_per_frame_import": (cpu1[1] - cpu0[1]) * 1e3 / max(n, 1), "wire_MBps": None,
            "link_MBps": (rx1 - rx0) / seconds / 1e6 if rx0 is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--cases", default="", help="comma-separated subset, e.g. 640x480-raw,640x480-floor")
    ap.add_argument("--netns", action="store_true", help="two network namespaces joined by a veth pair (root)")
    ap.add_argument("--rate", help="tc rate limit on the veth, e.g. 100mbit (with --netns)")
    ap.add_argument("--delay", help="delay each way, e.g. 20ms (with --netns: the NFQUEUE link emulator)")
    ap.add_argument("--loss", help="loss each way, e.g. 1%% (with --netns: the NFQUEUE link emulator)")
    ap.add_argument("--netem", action="store_true", help="--delay/--loss through tc netem (needs sch_netem)")
    ap.add_argument("--cc", help="TCP congestion control in both namespaces, e.g. cubic (with --delay/--loss; "
                                 "default: the host's)")
    ap.add_argument("--no-gstreamer", action="store_true")
    args = ap.parse_args()

    def stop(signum, _frame):   # SIGTERM (and SIGINT, even where a shell ignored it) clean up
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    info = machine_info()
    try:
        import zenoh  # noqa: F401
        from importlib.metadata import version

        info["eclipse-zenoh"] = version("eclipse-zenoh")
    except Exception:
        raise SystemExit("the bridge benchmark needs eclipse-zenoh: pip install 'frameshm[bridge]'")
    print(header_line(info))
    wanted = set(filter(None, args.cases.split(",")))
    if (args.delay or args.loss) and not args.netns:
        raise SystemExit("--delay/--loss need --netns")
    if args.cc and not (args.netns and (args.delay or args.loss) and not args.netem):
        raise SystemExit("--cc goes with --netns --delay/--loss (the emulated link)")
    link = Link(args.netns, args.rate, args.delay, args.loss, args.netem, args.cc)
    shm = private_shm_dir("bridge")
    results = []
    try:
        for size in SIZES:
            plan = [(f"{size}-floor", lambda: run_floor_case(size, args.seconds, link))]
            for enc in ("raw", "jpeg"):
                plan.append((f"{size}-{enc}", lambda enc=enc: run_bridge_case(size, enc, args.seconds, link, shm)))
            if not args.no_gstreamer:
                plan.append((f"{size}-gstreamer", lambda: run_gstreamer_case(size, args.seconds, link)))
            for case, fn in plan:
                if wanted and case not in wanted:
                    continue
                t0 = cpu_ticks()
                res = fn()
                if res is None:
                    continue
                res["steal_pct"] = steal_pct(t0, cpu_ticks())
                results.append(res)
                print(json.dumps(res), flush=True)
    finally:
        cleanup_shm_dir(shm)
        link.close()
    with open("/proc/loadavg") as f:
        info["loadavg_at_end"] = " ".join(f.read().split()[:3])
    print(f"\n{FPS} fps, {args.seconds:.0f} s per case, {link.desc}; "
          f"loadavg {info.get('loadavg_at_start')} at start, {info['loadavg_at_end']} at end\n")
    print(markdown_table(
        ["case", "delivered fps", "missed (sender / importer)", "median ms", "p99 ms", "drift ms",
         "CPU ms/frame sender", "CPU ms/frame receiver", "wire MB/s", "link MB/s", "steal %"],
        [[r["case"], r["fps"], f"{r['skipped']} ({r['export_drops']} / {r['import_drops']})" if "export_drops" in r
          else r.get("skipped", "–"), r["median_ms"], r["p99_ms"], r.get("drift_ms"), r["cpu_ms_per_frame_export"],
          r["cpu_ms_per_frame_import"], r["wire_MBps"], r["link_MBps"], r.get("steal_pct")] for r in results]))
    path = write_results("bridge", {"machine": info, "link": link.desc, "seconds": args.seconds, "results": results})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
