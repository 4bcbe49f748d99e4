"""Pipeline roles: the processes of a camera sentry, connected by frameshm streams.

    capture ──frames──▶ inference ──detections──▶ controller
       ▲                                              │
       └─── mode: control byte 0 (Standby / Alarmed) ◀┘

* :mod:`.capture` — reads a :class:`~frameshm.sources.Source` into the frames stream at
  the rate the mode asks for (``frameshm capture``).
* :mod:`.inference` — drain-to-latest detection, publishing a detections stream tied to
  the source frames (``frameshm inference``).
* :mod:`.controller` — the Standby / Validation / Tracking state machine that writes the
  frames stream's mode (``frameshm controller``).
* :mod:`.mode` — what the mode is: Standby or Alarmed in control byte 0 of the frames
  stream (the controller's state beside it in byte 1), bytes the transport carries
  without interpreting.

Every role takes the pipeline TOML (:mod:`frameshm.config`), stops cleanly on SIGINT /
SIGTERM (closing its streams and queues), and publishes its counters about twice a second
as a small JSON metrics stream named ``<frames>.<role>`` (read with :func:`read_metrics`,
listed by ``frameshm ls``, printed by ``frameshm <role> --status``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Dict, Optional

import numpy as np

from .._signals import stop_on_signals
from ..config import PipelineConfig

METRICS_MAX_BYTES = 4096
METRICS_INTERVAL_NS = 500_000_000
LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"


class Metrics:
    """Publishes a role's counters as a JSON document in a uint8 stream, at most every
    ``interval_ns`` — never per frame, so the hot path pays one clock comparison."""

    def __init__(self, name: Optional[str], interval_ns: int = METRICS_INTERVAL_NS, *,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None):
        from ..stream import Writer

        self.name = name
        self._interval = interval_ns
        self._next = 0
        self._w = None
        if name:
            self._w = Writer(name, max_bytes=METRICS_MAX_BYTES, dtype="uint8", nslots=2,
                             base_dir=base_dir, namespace=namespace)

    def due(self, now_ns: int) -> bool:
        return self._w is not None and now_ns >= self._next

    def publish(self, values: Dict[str, Any], now_ns: Optional[int] = None) -> None:
        if self._w is None:
            return
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self._next = now_ns + self._interval
        doc = json.dumps(values, separators=(",", ":"), allow_nan=False).encode()
        if len(doc) > METRICS_MAX_BYTES:
            logging.getLogger("frameshm.metrics").warning(
                "metrics document of %d bytes exceeds %d; not published", len(doc), METRICS_MAX_BYTES
            )
            return
        self._w.publish(np.frombuffer(doc, np.uint8), timestamp_ns=now_ns)

    def heartbeat(self) -> None:
        if self._w is not None:
            self._w.heartbeat()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def read_metrics(name: str, base_dir: Optional[str] = None, namespace: Optional[str] = None) -> Optional[dict]:
    """The newest metrics document of a role (stream ``<frames>.<role>``), None if that
    stream exists but has published nothing yet. Raises StreamNotFound if it does not exist.

    Uses the admin view to find the stream first, so a missing stream does not get
    created by attaching a reader to it."""
    from ..admin import stream_info
    from ..stream import Reader

    stream_info(name, base_dir=base_dir, namespace=namespace)  # StreamNotFound if absent
    with Reader(name, subscribe=False, base_dir=base_dir, namespace=namespace) as r:
        arr = r.read_latest(copy=True)
    if arr is None:
        return None
    return json.loads(arr.tobytes().decode())


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr, force=True)


# ---- command line (the `frameshm capture|inference|controller|gateway` subcommands) ---------


def _parse_kv(text: str):
    """``key=value`` with the value read as TOML (numbers, booleans, strings, lists)."""
    import argparse

    from ..config import ConfigError, _toml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        toml = _toml()
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        value = toml.loads(f"v = {raw}")["v"]
    except toml.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.strip(), value


def add_config_arguments(p) -> None:
    """The options every role starts with: ``--config``, ``--frames``."""
    p.add_argument("--config", "-c", help="pipeline TOML file (docs/pipeline.md)")
    p.add_argument("--frames", help="frames stream name (overrides [streams] frames)")


def add_run_arguments(p, role: str, set_example: str = "capture.nslots=16") -> None:
    """The options every role ends with (``--log-level``, ``--status``, ``--set``), and
    the subcommand's function: :func:`config_from_args`, then the role's ``run``."""
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--status", action="store_true", help=f"print the running {role}'s metrics as JSON and exit")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", type=_parse_kv,
                   help=f"override any config key (value in TOML syntax), e.g. --set {set_example}")
    p.set_defaults(func=_run_role, role=role)


def add_role_parsers(sub) -> None:
    """Adds the capture, inference and controller subcommands to the `frameshm` argument
    parser (the gateway's: :func:`frameshm.roles.gateway.add_parser`)."""

    def common(p, role):
        add_config_arguments(p)
        add_run_arguments(p, role)

    p = sub.add_parser("capture", help="camera/source -> frames stream, rate driven by the controller's mode")
    common(p, "capture")
    p.add_argument("--source", help="source URI, e.g. 'test:?width=640&height=480' (overrides [capture] source)")
    p.add_argument("--standby-fps", type=float)
    p.add_argument("--alarmed-fps", type=float)

    p = sub.add_parser("inference", help="drain-to-latest detection: frames stream -> detections stream")
    common(p, "inference")
    p.add_argument("--detections", help="detections stream name (overrides [streams] detections)")
    p.add_argument("--detector", help="'auto' (default), 'dnn', 'hog', 'motion' or 'package.module:callable'")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", type=_parse_kv,
                   help="detector keyword argument (value in TOML syntax); repeatable")

    p = sub.add_parser("controller", help="Standby/Validation/Tracking state machine driving the capture mode")
    common(p, "controller")
    p.add_argument("--detections", help="detections stream name (overrides [streams] detections)")
    p.add_argument("--validation-frames", type=int)
    p.add_argument("--tracking-exit-frames", type=int)


def config_from_args(args) -> PipelineConfig:
    """The pipeline configuration of a role subcommand: the TOML file (or the defaults),
    then the role's own options, then ``--set`` (then, for inference, ``--param``)."""
    from ..config import load_or_default

    cfg = load_or_default(args.config)
    where = "command line"
    overrides = [("streams.frames", args.frames)]
    if args.role == "capture":
        overrides += [("capture.source", args.source), ("capture.standby_fps", args.standby_fps),
                      ("capture.alarmed_fps", args.alarmed_fps)]
    elif args.role == "inference":
        overrides += [("streams.detections", args.detections), ("inference.detector", args.detector)]
    elif args.role == "gateway":
        from .gateway import token_from_args

        overrides += [("gateway.host", args.host), ("gateway.port", args.port),
                      ("gateway.token", token_from_args(args)), ("gateway.quality", args.quality),
                      ("gateway.max_width", args.max_width), ("gateway.max_fps", args.max_fps),
                      ("gateway.max_clients", args.max_clients)]
    elif args.role == "bridge":
        overrides += [("bridge.listen", args.listen), ("bridge.connect", args.connect),
                      ("bridge.exports", args.exports), ("bridge.imports", args.imports),
                      ("bridge.mode", args.mode), ("bridge.scouting", args.scouting),
                      ("bridge.process_all", args.process_all), ("bridge.zenoh_config", args.zenoh_config),
                      ("streams.driver", args.driver)]
    else:
        overrides += [("streams.detections", args.detections),
                      ("controller.validation_frames", args.validation_frames),
                      ("controller.tracking_exit_frames", args.tracking_exit_frames)]
    saved, cfg.path = cfg.path, where  # errors from flags name the command line, not the file
    try:
        for key, value in overrides:
            if value is not None:
                cfg.set(key, value)
        for key, value in args.set:
            cfg.set(key, value)
        if args.role == "inference" and args.param:
            params = dict(cfg.inference.detector_params)
            params.update(dict(args.param))
            cfg.set("inference.detector_params", params)
    finally:
        cfg.path = saved
    return cfg


def _run_role(args) -> int:
    cfg = config_from_args(args)
    if args.status:
        name = cfg.metrics_stream(args.role)
        if name is None:
            print(f"frameshm: {args.role} metrics are disabled in the configuration", file=sys.stderr)
            return 1
        doc = read_metrics(name, args.base_dir, args.namespace)
        print(json.dumps(doc, indent=2))
        return 0
    setup_logging(args.log_level)
    if args.role == "capture":
        from .capture import run
    elif args.role == "inference":
        from .inference import run
    elif args.role == "gateway":
        from .gateway import run
    elif args.role == "bridge":
        from .bridge import run
    else:
        from .controller import run
    stop = threading.Event()
    with stop_on_signals(stop):
        return run(cfg, stop, base_dir=args.base_dir, namespace=args.namespace)


__all__ = ["Metrics", "read_metrics", "stop_on_signals", "setup_logging", "add_role_parsers", "config_from_args"]
