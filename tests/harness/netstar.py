"""Hosts for the bridge's deployment tests: network namespaces joined in a star, one veth
pair between the hub (the router's host) and each leaf, nothing else routed (a leaf reaches
only the hub, as machines behind one router would), and loopback up in each.

    with Star(["a", "b", "c"]) as net:             # hub "r"
        subprocess.run(net.prefix("a") + ["ping", "-c1", net.hub_addr("a")])
        net.rx_bytes("c")                            # bytes that reached leaf c from the hub

Root only (CAP_NET_ADMIN). Namespaces are named fshm-st-<pid>-<n>-<host>; those of a process
that is gone (a run killed hard) are removed by the next Star.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, List, Sequence

from linkemu import _run, sweep_stale

PREFIX = "fshm-st"


class Star:
    """A hub namespace and one namespace per leaf; leaf i's link is 10.232.<k+i>.0/30, the
    hub at .1, the leaf at .2. A context manager; close() removes every namespace made."""

    _count = 0

    def __init__(self, leaves: Sequence[str], hub: str = "r"):
        Star._count += 1
        n = Star._count
        tag = f"{os.getpid()}-{n}"
        self.hub = hub
        self.leaves = list(leaves)
        self.ns: Dict[str, str] = {h: f"{PREFIX}-{tag}-{h}" for h in [hub, *self.leaves]}
        base = 10 + ((os.getpid() * 7 + n * 5) % 200)
        self._net = {leaf: f"10.232.{base + i}" for i, leaf in enumerate(self.leaves)}
        short = f"{os.getpid() % 100000}{n % 10}"
        self._dev = {leaf: (f"fst{short}{i}h", f"fst{short}{i}l") for i, leaf in enumerate(self.leaves)}
        self._made: List[str] = []
        sweep_stale(PREFIX)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.ns.values():
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        hub = self.ns[self.hub]
        for leaf in self.leaves:
            hdev, ldev = self._dev[leaf]
            _run("ip", "link", "add", hdev, "type", "veth", "peer", "name", ldev)
            for ns, dev, addr in ((hub, hdev, self.hub_addr(leaf)), (self.ns[leaf], ldev, self.leaf_addr(leaf))):
                _run("ip", "link", "set", dev, "netns", ns)
                _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")

    def prefix(self, host: str) -> List[str]:
        """The command prefix running a program on ``host``."""
        return ["ip", "netns", "exec", self.ns[host]]

    def hub_addr(self, leaf: str) -> str:
        """The hub's address on ``leaf``'s link (what the leaf connects to)."""
        return f"{self._net[leaf]}.1"

    def leaf_addr(self, leaf: str) -> str:
        return f"{self._net[leaf]}.2"

    def rx_bytes(self, leaf: str) -> int:
        """Bytes received by ``leaf`` on its link (IP packets: headers, retransmissions)."""
        out = _run("ip", "-n", self.ns[leaf], "-j", "-s", "link", "show", "dev", self._dev[leaf][1])
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def close(self) -> None:
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        self._made = []

    def __enter__(self) -> "Star":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
