"""frameshm's SHM driver (SHM Driver Model Spec v1.0): one process owns every region file
of the streams its configuration covers, grants leases over a Unix SOCK_SEQPACKET control
socket and announces epochs. Run it with ``frameshm driver --config driver.toml``
(docs/driver-protocol.md: protocol, rules and configuration).

Clients never talk to this package directly: ``frameshm.Writer``/``Reader`` with
``driver=<socket path>`` attach through the C core's lease client.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import DriverConfig, DriverConfigError, Profile, StreamRule, check_report, load
from .server import Driver, DriverError, serve

__all__ = [
    "Driver",
    "DriverConfig",
    "DriverConfigError",
    "DriverError",
    "Profile",
    "StreamRule",
    "add_arguments",
    "check_report",
    "load",
    "main",
    "run_from_args",
    "serve",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="driver TOML (docs/driver-protocol.md)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print every profile's footprint and stream rule, and exit")


def run_from_args(args) -> int:
    try:
        cfg = load(args.config)
    except DriverConfigError as exc:
        print(f"frameshm driver: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(check_report(cfg))
        return 0
    return serve(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frameshm.driver", description="frameshm SHM driver")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
