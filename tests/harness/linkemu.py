#!/usr/bin/env python3
"""A slow, lossy network link between two network namespaces: the stand-in for `tc netem`.

The kernels CI runs on are built without ``sch_netem``, but with NFQUEUE (iptables'
``-j NFQUEUE`` target and the nfnetlink queue): every packet leaving a namespace through
its veth is handed to a user-space process, which lets it go after a fixed delay or drops
it with a given probability. Two parts:

* :class:`NfQueue` and :func:`delay_queue` — the user-space end of one NFQUEUE, over raw
  netlink (no libnetfilter_queue). NFQUEUE lets a verdict come in any order, by packet id;
  with one fixed delay the packets fall due in the order they came, so they wait in a FIFO
  and one batch verdict (``NFQNL_MSG_VERDICT_BATCH``: every queued id up to N) releases all
  that are due. A packet chosen to be lost gets its ``NF_DROP`` verdict at once. Only the
  packet's metadata is copied to user space (``NFQNL_COPY_META``), and GSO packets are
  queued whole (``NFQA_CFG_F_GSO``), as netem sees them: the loss is per packet the stack
  handed to the device, which for TCP over a veth with TSO is up to 64 KiB.
  Run as ``python3 linkemu.py queue --num N --delay-ms D --loss P`` inside a namespace.

* :class:`EmulatedLink` — two namespaces (unique names, removed on close and on the next
  run if a crashed one left them), a veth pair between them (10.231.X.1 in ``a``,
  10.231.X.2 in ``b``), an iptables rule in each sending everything that leaves through
  the veth to a queue, and one :func:`delay_queue` process per namespace. Each direction
  is delayed and dropped on its own, like netem on both ends: ``delay_ms=20`` is 20 ms one
  way, 40 ms round trip. ``prefix(side)`` runs a command in a side's namespace.

Needs root, iproute2 and iptables (``scripts/setup.sh test`` installs them). Shared memory,
message queues and the filesystem are not namespaced by ``ip netns exec``: frameshm streams
stay visible to every process, only their network is split.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import List, Optional, Tuple

# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_queue.h>
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 0x4
NF_DROP, NF_ACCEPT = 0, 1
NLA_TYPE_MASK = 0x3FFF   # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")    # len, type, flags, seq, pid (host order)
_NLATTR = struct.Struct("=HH")         # len, type (host order); payloads are big-endian here


def _attr(kind: int, payload: bytes) -> bytes:
    n = _NLATTR.size + len(payload)
    return _NLATTR.pack(n, kind) + payload + bytes(-n % 4)


class NfQueue:
    """One NFQUEUE's user-space end over a raw NETLINK_NETFILTER socket."""

    def __init__(self, num: int, maxlen: int = 65536):
        self.num = num
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # Packets wait in the kernel (not in this socket) until their verdict; the socket
        # only carries their metadata. A notification that does not fit is not queued
        # either: the kernel drops its packet (user_dropped in /proc/net/netfilter/
        # nfnetlink_queue), so no batch verdict can release a packet never seen, but the
        # loss is not one asked for: delay_queue counts the ids it skipped as "unseen".
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)   # SO_RCVBUFFORCE (root)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack(">BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen)))
        self._config(_attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_GSO))
                     + _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_GSO)))
        self.sock.setblocking(False)

    def _msg(self, kind: int, flags: int, body: bytes) -> bytes:
        self._seq += 1
        nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.num))   # res_id: big-endian
        payload = nfgen + body
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), (NFNL_SUBSYS_QUEUE << 8) | kind,
                              NLM_F_REQUEST | flags, self._seq, 0) + payload

    def _config(self, attrs: bytes) -> None:
        self.sock.send(self._msg(NFQNL_MSG_CONFIG, NLM_F_ACK, attrs))
        data = self.sock.recv(65536)
        n, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
            if err:
                raise OSError(-err, f"NFQUEUE {self.num} configuration: {os.strerror(-err)}")

    def verdict(self, packet_id: int, verdict: int, batch: bool = False) -> None:
        kind = NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT
        self.sock.send(self._msg(kind, 0, _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))))

    def receive(self, buf: bytearray) -> List[Tuple[int, float]]:
        """The packets queued since the last call (nonblocking): (id, t), where t is
        time.monotonic() just after the recv() that returned the packet's notification.
        The packet was queued before its notification was sent, so t is never before its
        arrival: a delay counted from t is a floor."""
        ids = []
        view = memoryview(buf)
        while True:
            try:
                n = self.sock.recv_into(buf)
            except BlockingIOError:
                return ids
            t = time.monotonic()
            off = 0
            while off + _NLMSGHDR.size <= n:
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(view, off)
                if length < _NLMSGHDR.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    a = off + _NLMSGHDR.size + 4   # after nfgenmsg
                    end = off + length
                    while a + _NLATTR.size <= end:
                        alen, akind = _NLATTR.unpack_from(view, a)
                        if alen < _NLATTR.size:
                            break
                        if akind & NLA_TYPE_MASK == NFQA_PACKET_HDR:
                            ids.append((struct.unpack_from(">I", view, a + _NLATTR.size)[0], t))
                            break
                        a += (alen + 3) & ~3
                elif kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", view, off + _NLMSGHDR.size)
                    if err:
                        raise OSError(-err, f"NFQUEUE {self.num}: {os.strerror(-err)}")
                off += (length + 3) & ~3

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def delay_queue(num: int, delay_s: float, loss: float, seed: Optional[int] = None,
                stop=lambda: False, ready=lambda: None) -> dict:
    """Holds every packet of queue ``num`` for ``delay_s`` and drops a fraction ``loss``
    of them, until ``stop()``; returns the counts."""
    q = NfQueue(num)
    rng = random.Random(seed)
    due = collections.deque()          # (release time, packet id), in arrival = id order
    buf = bytearray(1 << 16)
    poll = select.poll()
    poll.register(q.fileno(), select.POLLIN)
    # drain_ms_max: the longest a packet's notification was read after poll() returned.
    # A packet stamped with that return time (as this loop once did) would have been
    # released that much early: 1.1 ms was seen on a loaded 2-core VM (SCHED_FIFO does
    # not stop interrupts or the hypervisor from stalling this process mid-drain).
    counts = {"queued": 0, "dropped": 0, "accepted": 0, "late_ms_max": 0.0, "drain_ms_max": 0.0,
              "unseen": 0}
    next_id = None
    ready()
    try:
        while not stop():
            timeout = 200
            if due:
                timeout = max(0, min(timeout, int((due[0][0] - time.monotonic()) * 1000 + 0.999)))
            poll.poll(timeout)
            woke = time.monotonic()
            # Each packet's delay counts from when its notification was read, not from
            # poll()'s return: the drain can be stalled, and a packet that arrived during
            # the stall, stamped with the earlier time, went out up to the stall early.
            for pid, t in q.receive(buf):
                if next_id is not None:
                    counts["unseen"] += (pid - next_id) & 0xFFFFFFFF   # ids are consecutive, u32
                next_id = (pid + 1) & 0xFFFFFFFF
                counts["queued"] += 1
                counts["drain_ms_max"] = max(counts["drain_ms_max"], (t - woke) * 1e3)
                if loss and rng.random() < loss:
                    q.verdict(pid, NF_DROP)
                    counts["dropped"] += 1
                else:
                    due.append((t + delay_s, pid))
            now = time.monotonic()
            last = None
            while due and due[0][0] <= now:
                t, last = due.popleft()
                counts["accepted"] += 1
                counts["late_ms_max"] = max(counts["late_ms_max"], (now - t) * 1e3)
            if last is not None:
                q.verdict(last, NF_ACCEPT, batch=True)
    finally:
        q.close()    # the kernel drops what is still queued
    return counts


def _queue_main(args) -> int:
    # A link's delay is its whole point: on a loaded machine a time-shared emulator would
    # release packets tens of ms late. It sleeps in poll() between packets, so a real-time
    # priority costs nothing (and the kernel's RT throttling bounds any mistake).
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (PermissionError, OSError):
        pass
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    counts = delay_queue(args.num, args.delay_ms / 1e3, args.loss, args.seed, stop=lambda: bool(stopping),
                         ready=lambda: print("READY", flush=True))
    print("COUNTS", json.dumps(counts), flush=True)
    return 0


# -- two namespaces joined by a veth pair -------------------------------------------------

def loss_based_cc() -> str:
    """A loss-based TCP congestion control a new network namespace may choose: CUBIC where
    the host allows it, else Reno. A namespace other than the first may only pick one of
    net.ipv4.tcp_allowed_congestion_control, and a host whose default is BBR may list
    "reno bbr" there (seen on a 6.18 guest): both back off on loss, which is what a test
    of a slow lossy link needs."""
    try:
        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
            allowed = f.read().split()
    except OSError:
        allowed = []
    return "cubic" if "cubic" in allowed else "reno"


PREFIX = "fshm-le"


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout.strip()}")
    return r.stdout


def _pdeathsig():
    # The queue process must not outlive the test that made it (a stranded NFQUEUE reader
    # is harmless once the namespace goes, but a namespace cannot go while it runs).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def sweep_stale(prefix: str = PREFIX) -> None:
    """Removes the network namespaces named ``<prefix>-<pid>-<n>-<host>`` whose process is
    gone (a run killed hard): the emulated links' and the test networks' (netstar.py)."""
    out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True).stdout
    for m in re.finditer(rf"^({prefix}-(\d+)-\d+-\w+)\b", out, re.M):
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            subprocess.run(["ip", "netns", "del", m.group(1)], stderr=subprocess.DEVNULL)
        except PermissionError:
            pass


class EmulatedLink:
    """Two network namespaces joined by a veth pair, each direction delayed by ``delay_ms``
    and losing a fraction ``loss`` of its packets (module docstring). A context manager;
    ``close()`` always removes everything it made."""

    _count = 0

    def __init__(self, delay_ms: float = 20.0, loss: float = 0.01, seed: Optional[int] = None,
                 cc: Optional[str] = None):
        EmulatedLink._count += 1
        n = EmulatedLink._count
        tag = f"{os.getpid()}-{n}"
        self.ns = (f"{PREFIX}-{tag}-a", f"{PREFIX}-{tag}-b")
        short = f"{os.getpid() % 100000}{n % 100}"
        self.veth = (f"fle{short}a", f"fle{short}b")
        subnet = 10 + (os.getpid() + n) % 240
        self.a_host, self.b_host = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self.delay_ms, self.loss = float(delay_ms), float(loss)
        # TCP's congestion control in both namespaces (per namespace in Linux), None: the
        # host's default. It decides what a lossy link carries: through 20 ms / 1 % loss
        # BBR keeps tens of MB/s, CUBIC (the kernel's default, always built in) under 1 MB/s.
        self.cc = cc
        self.desc = f"veth between two network namespaces, {delay_ms:g} ms each way, {loss:.1%} loss each way " \
                    "(NFQUEUE link emulator)" + (f", TCP {cc}" if cc else "")
        self._procs: List[subprocess.Popen] = []
        self.counts: List[dict] = []
        self._made: List[str] = []
        sweep_stale()
        try:
            self._build(seed)
        except BaseException:
            self.close()
            raise

    def _build(self, seed: Optional[int]) -> None:
        for ns in self.ns:
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
        _run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for i, (ns, dev, addr) in enumerate(zip(self.ns, self.veth, (self.a_host, self.b_host))):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.cc:
                _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={self.cc}")
            # On the way in, not out: a packet leaving a socket stays charged to it until
            # it is freed, and TCP's small-queue limit would then allow only a couple of
            # packets in the emulator per socket (netem orphans them; NFQUEUE cannot). An
            # arriving packet was orphaned by IP's receive path before PREROUTING.
            # No --queue-bypass: without its reader a queue drops, so a dead emulator
            # shows as a dead link rather than as a link without delay.
            _run("ip", "netns", "exec", ns, "iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", dev,
                 "-j", "NFQUEUE", "--queue-num", "0")
            argv = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "queue",
                    "--num", "0", "--delay-ms", str(self.delay_ms), "--loss", str(self.loss)]
            if seed is not None:
                argv += ["--seed", str(seed + i)]
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=_pdeathsig)
            self._procs.append(p)
            line = p.stdout.readline()
            if not line.startswith("READY"):
                p.wait(timeout=10)
                raise RuntimeError(f"link emulator in {ns} did not start: {line}{p.stdout.read()}")

    def prefix(self, side: str) -> List[str]:
        """The command prefix running a program in side ``a`` or ``b``."""
        return ["ip", "netns", "exec", self.ns[0 if side == "a" else 1]]

    def host(self, side: str) -> str:
        return self.a_host if side == "a" else self.b_host

    def close(self) -> List[dict]:
        """Stops the queues (their counts: ``self.counts``, a then b) and removes the
        namespaces (the veth pair goes with them)."""
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                out, _ = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            m = re.search(r"^COUNTS (.*)$", out or "", re.M)
            if m:
                self.counts.append(json.loads(m.group(1)))
        self._procs = []
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        self._made = []
        return self.counts

    def __enter__(self) -> "EmulatedLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("queue", help="serve one NFQUEUE in this namespace (delay, loss)")
    q.add_argument("--num", type=int, default=0)
    q.add_argument("--delay-ms", type=float, default=20.0)
    q.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped, e.g. 0.01")
    q.add_argument("--seed", type=int)
    s = sub.add_parser("shell", help="make a link and run a command in side a (b's address in $PEER)")
    s.add_argument("--delay-ms", type=float, default=20.0)
    s.add_argument("--loss", type=float, default=0.01)
    s.add_argument("command", nargs="+")
    args = ap.parse_args()
    if args.cmd == "queue":
        return _queue_main(args)
    with EmulatedLink(args.delay_ms, args.loss) as link:
        rc = subprocess.run(link.prefix("a") + args.command, env=dict(os.environ, PEER=link.b_host)).returncode
    print("counts (a, b):", link.counts, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
