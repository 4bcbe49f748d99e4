"""`frameshm run`: the whole pipeline from one config, one process per role.

Starts the gateway, the controller, inference and capture (the built-in test pattern
unless the config or ``--source`` names a camera) as separate ``frameshm <role>``
processes on the same configuration, waits until the page is served and prints its URL
(with the gateway's access token: a random one made here unless the config or ``--token``
gives one or ``none``; it reaches the gateway through the environment, not its command line).

It restarts nothing: if any role exits, that is reported with its exit status and the
whole pipeline is stopped (exit status 1). On Ctrl-C / SIGTERM every role gets SIGTERM
and is waited for (each stops within about a second, also under load; a role still
running after ``STOP_TIMEOUT_S`` is killed, and what it left is removed with ``frameshm
gc``), so no stream files or queues are left behind. The roles run in a session of their
own: a Ctrl-C in the terminal reaches this supervisor only, which sends each of them
SIGTERM (capture first), whatever it was doing at that moment. They also get SIGTERM if
this supervisor itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from ..config import ConfigError, PipelineConfig
from ..errors import InvalidArgument

log = logging.getLogger("frameshm.run")

ORDER = ("gateway", "controller", "inference", "capture")  # consumers first: nothing is missed
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0   # a backstop: every role stops well within it (tests/python/test_shutdown.py)
TEST_SOURCE = "test:?width=640&height=480&fps=30"
TEST_SOURCE_PERSON = TEST_SOURCE + "&person=cycle&off_s=8&on_s=5"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def default_sets() -> list:
    """Without --config: the test pattern, with a person walking in when its photograph
    (scikit-image) and a person detector (frameshm[dnn] with its model, or any OpenCV for HOG) are installed,
    only persons alarming; else the plain pattern. The detector is the default "auto"."""
    from ..detectors_dnn import dnn_unavailable_reason

    person_detector = dnn_unavailable_reason() is None or _importable("cv2")
    if _importable("skimage") and person_detector:
        return [("capture.source", TEST_SOURCE_PERSON), ("inference.detector", "auto"), ("controller.classes", [0])]
    return [("capture.source", TEST_SOURCE)]
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort
        pass


def _toml_value(v) -> str:
    """A TOML literal for a --set override passed on to the children."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise InvalidArgument(f"cannot pass {v!r} on to the roles")


class Pipeline:
    def __init__(self, cfg: PipelineConfig, overrides: List[str], stop: threading.Event, *,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None, log_level: str = "info",
                 token: Optional[str] = None, detector_ok: bool = True):
        self.cfg = cfg
        self.overrides = overrides
        self.stop = stop
        self.base_dir, self.namespace = base_dir, namespace
        self.log_level = log_level
        self.token = token  # what the gateway checks (None: no token), passed as it is
        self.procs: Dict[str, subprocess.Popen] = {}

    def _argv(self, role: str) -> List[str]:
        argv = [sys.executable, "-m", "frameshm"]
        if self.base_dir:
            argv += ["--base-dir", self.base_dir]
        if self.namespace:
            argv += ["--namespace", self.namespace]
        argv += [role, "--log-level", self.log_level]
        if self.cfg.path and self.cfg.path not in ("configuration", "command line"):
            argv += ["--config", self.cfg.path]
        for kv in self.overrides:
            argv += ["--set", kv]
        return argv

    def _start(self, role: str) -> None:
        env = dict(os.environ)
        if role == "gateway":
            from ..config import TOKEN_NONE
            from .gateway import TOKEN_ENV

            # not on the command line, where ps shows it; "none" said explicitly, so that an
            # "auto" in the file does not make the gateway another token than the one printed
            env[TOKEN_ENV] = self.token or TOKEN_NONE
        self.procs[role] = subprocess.Popen(self._argv(role), stdin=subprocess.DEVNULL, env=env,
                                            preexec_fn=_die_with_parent, start_new_session=True)
        log.info("started %s (pid %d)", role, self.procs[role].pid)

    def _exited(self) -> Optional[str]:
        for role, p in self.procs.items():
            if p.poll() is not None:
                return role
        return None

    def _gateway_url(self) -> Optional[str]:
        from . import read_metrics

        name = self.cfg.metrics_stream("gateway")
        if name is not None:
            try:
                doc = read_metrics(name, self.base_dir, self.namespace)
            except Exception:  # noqa: BLE001 - not there yet
                return None
            return doc.get("url") if doc else None
        g = self.cfg.gateway
        try:
            with socket.create_connection((g.host if g.host not in ("0.0.0.0", "::") else "127.0.0.1", g.port), 0.5):
                pass
        except OSError:
            return None
        return f"http://{g.host}:{g.port}/" + (f"?token={self.token}" if self.token else "")

    def _check_port(self) -> None:
        g = self.cfg.gateway
        if g.port == 0:
            return
        family = socket.AF_INET6 if ":" in g.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((g.host, g.port))
            except OSError as exc:
                raise InvalidArgument(f"cannot listen on {g.host}:{g.port} ({exc.strerror or exc}); "
                                      f"choose another with --port") from None

    def run(self) -> int:
        self._check_port()
        rc = 0
        try:
            for role in ORDER:
                if self.stop.is_set():
                    break  # stopped while starting: the roles started so far are stopped below
                self._start(role)
            url = None
            deadline = time.monotonic() + READY_TIMEOUT_S
            while url is None and not self.stop.is_set():
                gone = self._exited()
                if gone:
                    break
                url = self._gateway_url()
                if url is None:
                    if time.monotonic() > deadline:
                        log.error("the gateway did not come up within %.0fs", READY_TIMEOUT_S)
                        return 1
                    self.stop.wait(0.1)
            if url is not None:
                print(f"frameshm run: pipeline {self.cfg.frames_stream!r} is up; open {url}", flush=True)
                print("frameshm run: Ctrl-C stops every role", flush=True)
            while not self.stop.is_set():
                gone = self._exited()
                if gone:
                    code = self.procs[gone].returncode
                    log.error("%s exited unexpectedly (%s); stopping the pipeline (nothing is restarted)",
                              gone, f"status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}")
                    rc = 1
                    if code < 0:
                        self._gc()  # while the streams are up: its queue and consumer entry
                    break
                self.stop.wait(0.2)
        finally:
            rc = self._shutdown() or rc
        return rc

    def _shutdown(self) -> int:
        rc = 0
        t0 = time.monotonic()
        running = {}
        for role in reversed(ORDER):  # capture first: nobody is left waiting on a live producer
            p = self.procs.get(role)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                running[role] = p
        took = {}
        deadline = t0 + STOP_TIMEOUT_S
        while running and time.monotonic() < deadline:  # all at once, each timed
            for role, p in list(running.items()):
                if p.poll() is not None:
                    took[role] = time.monotonic() - t0
                    del running[role]
            if running:
                time.sleep(0.02)
        killed = False
        for role, p in running.items():
            log.error("%s did not stop within %.0fs: killing it", role, STOP_TIMEOUT_S)
            p.kill()
            p.wait()
            killed = True
        for role in reversed(ORDER):
            p = self.procs.get(role)
            if p is not None and p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.error("%s stopped with status %s", role, p.returncode)
                rc = 1
        if killed or any(p.returncode is not None and p.returncode < 0 and p.returncode != -signal.SIGTERM
                         and p.returncode != -signal.SIGINT for p in self.procs.values()):
            self._gc()
        log.info("pipeline stopped%s", " (" + ", ".join(f"{r} in {t:.2f}s" for r, t in took.items()) + ")"
                 if took else "")
        return rc

    def _gc(self) -> None:
        from ..admin import gc

        try:
            removed = gc(self.base_dir, self.namespace)
        except Exception as exc:  # noqa: BLE001
            log.error("cleaning up after a killed role failed: %s", exc)
            return
        if removed:
            log.info("removed what a killed role left: %s", removed)


# ---- command line -----------------------------------------------------------------------


def add_parser(sub) -> None:
    from . import _parse_kv

    def raw_kv(text: str):
        key, value = _parse_kv(text)  # argparse error on bad syntax
        return key, value

    p = sub.add_parser("run", help="the whole pipeline (capture, inference, controller, gateway) in one command")
    p.add_argument("--config", "-c", help="pipeline TOML file (docs/pipeline.md); default: built-in test pattern")
    p.add_argument("--source", help="camera source URI (default: the config's, else a test pattern)")
    p.add_argument("--host", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default 8080; 0: any free port)")
    p.add_argument("--token", help="gateway access token (or $FRAMESHM_GATEWAY_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", type=raw_kv,
                   help="override any config key for every role (value in TOML syntax)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from ..config import load_or_default
    from . import setup_logging, stop_on_signals
    from .gateway import TOKEN_ENV

    cfg = load_or_default(args.config)
    sets = []
    if args.source is not None:
        sets.append(("capture.source", args.source))
    elif not args.config:
        sets += default_sets()
    for key, value in (("gateway.host", args.host), ("gateway.port", args.port)):
        if value is not None:
            sets.append((key, value))
    sets += list(args.set)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    saved, cfg.path = cfg.path, "command line"
    try:
        for key, value in sets:
            cfg.set(key, value)
        if token is not None:
            cfg.set("gateway.token", token)
    finally:
        cfg.path = saved
    from .gateway import resolve_token

    token = resolve_token(cfg.gateway.token)  # "auto": made once here, so the printed URL is the gateway's
    setup_logging(args.log_level)  # before the detector: its first load may convert a model for a while
    # every role is checked here, before anything starts (a bad detector fails now)
    from ..detectors import load_detector

    try:
        det = load_detector(cfg.inference.detector, cfg.inference.detector_params)
        closer = getattr(det, "close", None)
        if callable(closer):
            closer()
    except (ImportError, InvalidArgument, ConfigError) as exc:
        raise InvalidArgument(f"[inference] detector {cfg.inference.detector!r}: {exc}") from None
    overrides = [f"{k}={_toml_value(v)}" for k, v in sets if k != "gateway.token"]
    stop = threading.Event()
    with stop_on_signals(stop):
        return Pipeline(cfg, overrides, stop, base_dir=args.base_dir, namespace=args.namespace,
                        log_level=args.log_level, token=token).run()
