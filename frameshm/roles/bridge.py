"""``frameshm bridge``: the Zenoh bridge as a role (frameshm/bridge.py, docs/bridge.md).

Takes its streams and endpoints from the ``[bridge]`` table of the pipeline TOML and the
command line (``--listen``/``--connect``/``--export``/``--import``, each repeatable and
replacing the table's list), runs until SIGINT/SIGTERM, and publishes its metrics as
``<frames>.bridge`` (``frameshm ls``, ``frameshm bridge --status``).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from ..bridge import MODES, Bridge
from ..config import PipelineConfig

log = logging.getLogger("frameshm.bridge")


def bridge_from_config(cfg: PipelineConfig, base_dir: Optional[str] = None,
                       namespace: Optional[str] = None) -> Bridge:
    b = cfg.bridge
    return Bridge(b.listen, b.connect, exports=b.exports, imports=b.imports, key_prefix=b.key_prefix,
                  mode=b.mode, scouting=b.scouting, process_all=b.process_all, jpeg_quality=b.jpeg_quality,
                  jpeg_subsampling=b.jpeg_subsampling,
                  consumer=b.consumer, zenoh_config=b.zenoh_config or None,
                  metrics=cfg.metrics_stream("bridge"), base_dir=base_dir, namespace=namespace,
                  driver=cfg.driver)


def run(cfg: PipelineConfig, stop: threading.Event, base_dir: Optional[str] = None,
        namespace: Optional[str] = None) -> int:
    bridge = bridge_from_config(cfg, base_dir, namespace)
    bridge.start()
    rc = bridge.run(stop)
    log.info("stopped%s", f" ({bridge.failed} failed)" if bridge.failed else "")
    return rc


def add_parser(sub) -> None:
    """Adds ``frameshm bridge``; it runs through :func:`frameshm.roles.config_from_args`
    like the other roles."""
    from . import add_config_arguments, add_run_arguments

    p = sub.add_parser("bridge", help="streams to and from other machines over Eclipse Zenoh (docs/bridge.md)")
    add_config_arguments(p)
    p.add_argument("--listen", action="append", metavar="ENDPOINT",
                   help="Zenoh endpoint to listen on, e.g. tcp/0.0.0.0:7447 (repeatable; default "
                        "tcp/127.0.0.1:7447 when neither --listen nor --connect is given)")
    p.add_argument("--connect", action="append", metavar="ENDPOINT",
                   help="Zenoh endpoint of another bridge or a router, e.g. tcp/10.0.0.2:7447 (repeatable)")
    p.add_argument("--export", action="append", dest="exports", metavar="NAME[:ENCODING]",
                   help="local stream to send, encoding raw (default), jpeg or zstd (repeatable)")
    p.add_argument("--import", action="append", dest="imports", metavar="NAME",
                   help="remote stream to write here as a local stream (repeatable)")
    p.add_argument("--mode", choices=MODES,
                   help="Zenoh mode (client: through a router; router: the router others connect to, "
                        "with or without streams of its own)")
    p.add_argument("--scouting", action="store_true", default=None, help="find peers by UDP multicast on the LAN")
    p.add_argument("--process-all", action="store_true", default=None,
                   help="every frame in order with back-pressure (default: latest frame, drops at the sender)")
    p.add_argument("--zenoh-config", metavar="FILE", help="a Zenoh JSON5 configuration (TLS, access control)")
    p.add_argument("--driver", metavar="SOCKET",
                   help="a frameshm driver's socket: the bridged streams attach through it ([streams] driver)")
    add_run_arguments(p, "bridge", set_example="bridge.jpeg_quality=80")
