"""The `frameshm` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Optional

from . import __version__
from .admin import gc_report, list_streams
from .config import ROLES


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# Keys of a role's metrics document worth a place in `ls` (the rest: `<role> --status`).
_METRIC_KEYS = ("state", "mode", "fps", "target_fps", "processed", "skipped", "infer_ms", "latency_ms",
                "encode_ms", "clients", "transitions", "lost", "reconnects", "peers", "bytes_per_s",
                "drops")


def _role_metrics(info: dict, args) -> str:
    """A role's metrics streams are named <frames>.<role>: show their newest document."""
    name = info.get("name", "")
    role = name.rsplit(".", 1)[-1] if "." in name else ""
    if role not in ROLES or info.get("producer") != "alive":
        return ""
    try:
        from .roles import read_metrics

        doc = read_metrics(name, base_dir=args.base_dir, namespace=args.namespace) or {}
    except Exception:  # noqa: BLE001 - a listing never fails on one stream's metrics
        return ""
    parts = []
    for k in _METRIC_KEYS:
        if k in doc:
            v = doc[k]
            if isinstance(v, dict):  # {"last", "mean", "max"} timings
                v = "mean {mean} max {max}".format(**v) if {"mean", "max"} <= v.keys() else v
            parts.append(f"{k} {v}")
    return ", ".join(parts)


def cmd_ls(args) -> int:
    streams = list_streams(args.base_dir, args.namespace, sample_s=args.sample)
    if args.json:
        print(json.dumps(streams, indent=2))
        return 0
    if not streams:
        print("no streams")
        return 0
    now = time.monotonic_ns()
    for s in sorted(streams, key=lambda s: s.get("name", "")):
        if "error" in s:
            print(f"{s['stream_id']:>10}  ?  CORRUPT: {s['error']}")
            continue
        latest = s["latest_seq_plus1"]
        idle = (now - s["activity_ns"]) / 1e9 if s["activity_ns"] else float("nan")
        fps = f"{s['fps']:.1f}" if "fps" in s else "-"
        pools = ",".join(_fmt_bytes(p) for p in s["pool_strides"]) or "-"
        print(
            f"{s['name']} (id {s['stream_id']}){' [driver]' if s.get('driver_managed') else ''}: "
            f"producer {s['producer']}"
            f"{' pid ' + str(s['producer_pid']) if s['producer_pid'] else ''}, epoch {s['epoch']}, "
            f"fps {fps}, frames {s['frames']}, seq {latest - 1 if latest else '-'}, "
            f"idle {idle:.1f}s, slots {s['nslots']} x pools {pools}, control {bytes(s['control']).hex(' ')}, "
            f"drops: no-pool {s['drops_nopool']}, queue-full {s['descriptors_dropped']}"
        )
        metrics = _role_metrics(s, args)
        if metrics:
            print(f"    metrics: {metrics}")
        for c in s["consumers"]:
            taken = c["last_seq_plus1"]
            lag = latest - taken if taken else None
            print(
                f"    consumer {c['name']} pid {c['pid']} {'alive' if c['alive'] else 'DEAD'} "
                f"{'process-all' if c['process_all'] else 'latest'}"
                f"{' max ' + str(c['max_rate_hz']) + ' Hz' if c.get('max_rate_hz') else ''}: "
                f"lag {lag if lag is not None else '-'}, "
                f"descriptors {c['delivered']}, queue-full drops {c['queue_full']}"
            )
    return 0


_GC_KEPT = {
    "producer": "a producer holds it",
    "consumers": "live consumers wait on it",
    "driver": "its driver runs",
}
_GC_REMOVED = {
    "unused": "no producer, no live consumer",
    "corrupt": "control region failed validation, no producer",
    "no control region": "a directory without a control region",
}


def _gc_queue(q: dict) -> str:
    label = f"consumer {q['consumer']}, " if q.get("consumer") else ""
    return f"{q['queue'] or '(no queue)'} ({label}pid {q['pid']}, dead)"


def cmd_gc(args) -> int:
    report = gc_report(args.base_dir, args.namespace, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    qverb = "would unlink" if args.dry_run else "unlinked"
    for s in report["streams"]:
        what = f"{s['name'] or 'stream'} (id {s['stream_id']})"
        if "error" in s:
            print(f"{what}: not checked: {s['error']}")
            continue
        if s["removed"]:
            print(f"{what}: {verb} ({_GC_REMOVED.get(s['reason'], s['reason'])})")
        elif s["queues"] or args.verbose:
            why = _GC_KEPT.get(s["reason"], s["reason"])
            if s["reason"] == "producer" and s.get("producer_pid"):
                why += f" (pid {s['producer_pid']})"
            elif s["reason"] == "consumers":
                why = f"{s['live_consumers']} live consumer(s) wait on it"
            print(f"{what}: kept: {why}")
        for q in s["queues"]:
            print(f"    {qverb} the queue of a dead consumer: {_gc_queue(q)}")
    for q in report["queues"]:
        print(f"{qverb} the queue of a dead consumer of no stream here: {_gc_queue(q)}")
    if report["queues_not_listed"]:
        print(f"{qverb} {report['queues_not_listed']} more such queue(s)")
    if report["queue_error"]:
        print(f"message queues not checked: {report['queue_error']}")
    removed = [s["stream_id"] for s in report["streams"] if s["removed"]]
    nqueues = (sum(len(s["queues"]) for s in report["streams"]) + len(report["queues"])
               + report["queues_not_listed"])
    print(f"{verb} {len(removed)} stream(s)" + (": " + ", ".join(map(str, removed)) if removed else "")
          + f"; {qverb} {nqueues} queue(s) of dead consumers")
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(seconds=args.seconds, fps=args.fps, width=args.width, height=args.height, name=args.name)


def _version_text() -> str:
    """`frameshm --version`: the package, the libframeshm it loaded, and the build's features."""
    from . import _core
    from .clib import build_features

    feats = [line.strip() for line in build_features().splitlines()[1:] if line.strip()]
    return "\n".join([f"frameshm {__version__} (libframeshm {_core.VERSION_STRING}, {_core.__file__})", *feats])


class _VersionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_text())   # as written: argparse's version action would re-wrap it
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="frameshm", description="shared-memory frame streams")
    p.add_argument("--version", action=_VersionAction, nargs=0,
                   help="the package and libframeshm versions and the build's features")
    p.add_argument("--base-dir", default=None, help="base directory (default $FRAMESHM_DIR or /dev/shm)")
    p.add_argument("--namespace", default=None, help="namespace (default $FRAMESHM_NAMESPACE or 'default')")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="list streams: producer, epoch, fps, consumers, lag, drops")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--sample", type=float, default=0.5, help="seconds to sample fps over (0: skip)")
    ls.set_defaults(func=cmd_ls)
    g = sub.add_parser("gc", help="remove dead streams and dead consumers' message queues; says what went",
                       description="Removes the namespace's streams whose producer is gone and that no "
                       "live consumer uses, and takes dead consumers out of every stream's table. Then it "
                       "unlinks the message queues of your dead consumers that no table names any more: "
                       "those of every namespace and base directory on this machine (a queue's name, not "
                       "a stream, records its owner), so it also cleans up after other runs of yours.")
    g.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    g.add_argument("--json", action="store_true", help="the report as JSON")
    g.add_argument("-v", "--verbose", action="store_true", help="also list the streams kept, and why")
    g.set_defaults(func=cmd_gc)
    d = sub.add_parser("demo", help="a live test-pattern stream with two consumer processes")
    d.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    d.add_argument("--fps", type=float, default=30.0)
    d.add_argument("--width", type=int, default=640)
    d.add_argument("--height", type=int, default=480)
    d.add_argument("--name", default="demo")
    d.set_defaults(func=cmd_demo)
    from .roles import add_role_parsers  # capture, inference, controller

    add_role_parsers(sub)
    from .roles.gateway import add_parser as add_gateway_parser
    from .roles.run import add_parser as add_run_parser

    add_gateway_parser(sub)
    from .roles.bridge import add_parser as add_bridge_parser

    add_bridge_parser(sub)
    add_run_parser(sub)
    from .virtualcam import add_parser as add_virtualcam_parser

    add_virtualcam_parser(sub)
    from .replay import add_parsers as add_record_replay_parsers

    add_record_replay_parsers(sub)
    from .driver import add_arguments as add_driver_arguments, run_from_args as run_driver

    dr = sub.add_parser("driver", help="the SHM driver: owns region files, grants leases (docs/driver-protocol.md)")
    add_driver_arguments(dr)
    dr.set_defaults(func=run_driver)
    return p


# Commands that run until stopped: SIGINT/SIGTERM stop them with status 0 from the moment
# main() starts, whatever they are doing (frameshm/_signals.py).
LONG_RUNNING = frozenset({"capture", "inference", "controller", "gateway", "bridge", "run", "driver", "virtualcam",
                          "record", "replay"})
_GLOBAL_OPTIONS_WITH_VALUE = ("--base-dir", "--namespace")


def _command_of(argv) -> Optional[str]:
    """The subcommand in ``argv``, found without building the parser (which imports every
    role): the first word that is neither a global option nor its value."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


# Commands whose process ends without the interpreter's teardown once the command has
# closed everything it made. The bridge's Zenoh session leaves Rust runtime threads behind
# its close; one that calls into Python while the interpreter finalizes is made to
# pthread_exit, and that forced unwind through Rust frames aborts the process ("FATAL:
# exception not rethrown", SIGABRT after a clean stop: seen under load).
EXIT_WITHOUT_TEARDOWN = frozenset({"bridge"})


def main(argv=None) -> int:
    from ._signals import StopRequested, startup_stops, stopped_while_starting

    program = argv is None  # the process's own command line (not a call from Python code)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    long_running = command in LONG_RUNNING
    try:
        with startup_stops() if long_running else contextlib.nullcontext():
            args = build_parser().parse_args(argv)
            rc = args.func(args)
    except StopRequested:
        rc = 0  # stopped before it had started anything
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, never tracebacks
        from .errors import FrameshmError

        if stopped_while_starting():
            return 0  # the StopRequested that cut the start-up short, turned into `exc` on its way
        if isinstance(exc, FrameshmError):
            print(f"frameshm: {exc}", file=sys.stderr)
            return 1
        raise
    if program and long_running:
        # The command has stopped and released everything it made: a second Ctrl-C now
        # changes nothing (not a traceback on the way out). What is left is the
        # interpreter's teardown, whose cycle collections over every imported module cost
        # ~0.1 s of CPU, most of a stop on a busy machine; frozen objects are skipped by
        # them (and still freed by reference counting).
        import gc
        import signal

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        gc.freeze()
        if command in EXIT_WITHOUT_TEARDOWN:
            import logging

            logging.shutdown()
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError):
                    pass
            os._exit(rc if isinstance(rc, int) else 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
