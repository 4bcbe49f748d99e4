"""Pipeline configuration: one TOML file shared by the capture, inference and controller
roles (docs/pipeline.md documents every key; docs/examples/pipeline.toml is a full example).

    cfg = frameshm.config.load("pipeline.toml")        # or PipelineConfig() for defaults
    cfg.set("capture.standby_fps", 5)                  # a command-line override, validated
    cfg.capture.standby_fps, cfg.streams.frames, cfg.metrics_stream("capture")

Unknown tables and keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the file, the table and the key.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._choices import BRIDGE_ENCODINGS, BRIDGE_MODES, JPEG_SUBSAMPLING
from .errors import InvalidArgument

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser is on PyPI as tomli
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
STREAM_NAME_MAX = 63
CONSUMER_NAME_MAX = 31
ROLES = ("capture", "inference", "controller", "gateway", "bridge")
# Longest suffix appended to the frames stream's name for a role's metrics stream.
_METRICS_SUFFIX_MAX = max(len("." + r) for r in ROLES)


class ConfigError(InvalidArgument):
    """The pipeline configuration is invalid (the message says where and why)."""


# ---- value checkers: each returns the normalised value or raises ValueError(reason) ----


def _number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"expected a number, got {v!r}")
        if v < lo or v > hi or (lo_open and v == lo):
            bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise ValueError(f"expected a number {bound}" + (f" and <= {hi:g}" if hi != math.inf else "") + f", got {v!r}")
        return float(v)

    return check


def _integer(lo: int, hi: int, pow2: bool = False) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v}")
        if pow2 and v & (v - 1):
            raise ValueError(f"expected a power of two, got {v}")
        return v

    return check


def _boolean(v):
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _name(maxlen: int, allow_empty: bool = False) -> Callable[[Any], str]:
    def check(v):
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {v!r}")
        if allow_empty and v == "":
            return v
        if not (1 <= len(v) <= maxlen and _NAME_RE.match(v)):
            raise ValueError(
                f"{v!r} is not a valid name: 1-{maxlen} characters of A-Z a-z 0-9 _ . -, not starting with . or -"
            )
        return v

    return check


def _socket_path(v):
    if not isinstance(v, str) or (v and not v.startswith("/")):
        raise ValueError(f"expected the absolute path of a frameshm driver's socket (or ''), got {v!r}")
    return v


def _source(v):
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a source URI such as 'test:' or 'v4l2:/dev/video0', got {v!r}")
    from .sources import parse_uri

    parse_uri(v)  # InvalidArgument names what is wrong
    return v


def _detector(v):
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected 'auto', 'dnn', 'hog', 'motion' or 'package.module:callable', got {v!r}")
    from .detectors import BUILTIN, _MODULE_RE

    if v in BUILTIN:
        return v
    mod, sep, attr = v.partition(":")
    if not sep or not _MODULE_RE.match(mod) or not _MODULE_RE.match(attr):
        raise ValueError(f"expected {', '.join(sorted(BUILTIN))} or 'package.module:callable', got {v!r}")
    return v


def _table(v):
    if not isinstance(v, dict):
        raise ValueError(f"expected a table of keyword arguments, got {v!r}")
    return dict(v)


def _class_ids(v):
    if not isinstance(v, list):
        raise ValueError(f"expected a list of class ids (numbers), got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"expected a list of class ids (numbers), got element {x!r}")
        out.append(float(x))
    return out


def _host(v):
    if not isinstance(v, str) or not v or len(v) > 253 or not re.match(r"^[A-Za-z0-9_.:%-]+$", v):
        raise ValueError(f"expected a host name or IP address such as '127.0.0.1' or '0.0.0.0', got {v!r}")
    return v


TOKEN_AUTO = "auto"   # [gateway] token: a new random token each time the gateway starts
TOKEN_NONE = "none"   # [gateway] token: no token at all (the gateway warns)


def _token(v):
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    if v in (TOKEN_AUTO, TOKEN_NONE):
        return v
    if not v:
        # it used to mean "no token": refused rather than silently given another meaning
        raise ValueError(f"'' is no longer accepted: {TOKEN_AUTO!r} (the default) makes a random token per run, "
                         f"{TOKEN_NONE!r} serves without one (every local user can then watch the camera)")
    if len(v) < 8 or len(v) > 256 or not re.match(r"^[A-Za-z0-9_.~-]+$", v):
        raise ValueError(f"expected {TOKEN_AUTO!r} (a random token per run), {TOKEN_NONE!r} (no token) "
                         f"or 8-256 characters of A-Z a-z 0-9 _ . ~ -")
    return v


def _origins(v):
    if not isinstance(v, list):
        raise ValueError(f"expected a list of origins such as ['http://myhost:8080'], got {v!r}")
    for o in v:
        if not isinstance(o, str) or not re.match(r"^https?://[^/\s]+$", o):
            raise ValueError(f"expected origins of the form 'http://host:port' (no path), got {o!r}")
    return list(v)


_ENDPOINT_RE = re.compile(r"^[a-z0-9]+/\S+$")


def _endpoints(v):
    if not isinstance(v, list) or not all(isinstance(e, str) and _ENDPOINT_RE.match(e) for e in v):
        raise ValueError(f"expected a list of Zenoh endpoints such as ['tcp/127.0.0.1:7447'], got {v!r}")
    return list(v)


def _bridged(v):
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise ValueError(f"expected a list of stream names such as ['cam0', 'cam0:jpeg'], got {v!r}")
    from .bridge import BridgeError, parse_spec

    for spec in v:
        try:
            parse_spec(spec)
        except BridgeError as exc:
            raise ValueError(str(exc)) from None
    return list(v)


def _choice(options: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(v):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(map(repr, options))}, got {v!r}")
        return v

    check.options = options  # type: ignore[attr-defined]  (tests check it is the owner's tuple)
    return check


def _key_prefix(v):
    if not isinstance(v, str) or not v or any(c in v for c in "*$?# ") or v.strip("/") != v:
        raise ValueError(f"expected a Zenoh key such as 'frameshm' (no wildcards, no outer '/'), got {v!r}")
    return v


def _path_or_empty(v):
    if not isinstance(v, str):
        raise ValueError(f"expected a file path (or ''), got {v!r}")
    return v


def _opt(check: Callable[[Any], Any], default: Any, doc: str):
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- sections --------------------------------------------------------------------------


@dataclass
class StreamsConfig:
    frames: str = _opt(_name(STREAM_NAME_MAX - _METRICS_SUFFIX_MAX), "cam0", "camera frames stream")
    detections: str = _opt(_name(STREAM_NAME_MAX, allow_empty=True), "",
                           "detections stream (default: '<frames>.detections')")
    driver: str = _opt(_socket_path, "", "a frameshm driver's socket: the frames and detections streams "
                       "attach through it (docs/driver.md); metrics streams stay local")


@dataclass
class CaptureConfig:
    source: str = _opt(_source, "test:", "source URI (test:, v4l2:, gige:, file:, rtsp:, http(s):, replay:)")
    standby_fps: float = _opt(_number(0, 1000, lo_open=True), 3.0, "frame rate in mode Standby")
    alarmed_fps: float = _opt(_number(0, 1000, lo_open=True), 30.0, "frame rate in mode Alarmed")
    flush_max_age_ms: float = _opt(_number(0, 10_000), 50.0,
                                   "on Standby -> Alarmed, discard buffered frames older than this")
    nslots: int = _opt(_integer(1, 1024, pow2=True), 8, "slots of the frames stream")
    read_timeout_s: float = _opt(_number(0, 3600, lo_open=True), 2.0, "a source read longer than this is a stall")
    reconnect_interval_s: float = _opt(_number(0, 3600, lo_open=True), 1.0, "pause between reconnection attempts")
    metrics: bool = _opt(_boolean, True, "publish the '<frames>.capture' metrics stream")


@dataclass
class InferenceConfig:
    detector: str = _opt(_detector, "auto", "'auto' (dnn, else hog, else motion), 'dnn', 'hog', 'motion' or "
                         "'package.module:callable'")
    detector_params: Dict[str, Any] = _opt(_table, {}, "keyword arguments for the detector")
    consumer: str = _opt(_name(CONSUMER_NAME_MAX), "inference", "consumer label on the frames stream")
    max_detections: int = _opt(_integer(1, 100_000), 256, "rows kept per frame (highest scores)")
    nslots: int = _opt(_integer(1, 1024, pow2=True), 8, "slots of the detections stream")
    copy_input: bool = _opt(_boolean, True,
                            "copy each frame before inference (false: zero-copy, torn frames discarded)")
    metrics: bool = _opt(_boolean, True, "publish the '<frames>.inference' metrics stream")


@dataclass
class ControllerConfig:
    validation_frames: int = _opt(_integer(1, 100_000), 3,
                                  "consecutive frames with a person that confirm Validation -> Tracking")
    tracking_exit_frames: int = _opt(_integer(1, 100_000), 10,
                                     "consecutive frames without a person that end Tracking")
    tracking_exit_s: float = _opt(_number(0, 86_400), 2.0,
                                  "seconds of capture time without a person that end Tracking, whichever "
                                  "comes first with tracking_exit_frames (0: frames only)")
    min_score: float = _opt(_number(), 0.0, "detections scoring below this are ignored")
    classes: List[float] = _opt(_class_ids, [], "class ids that count as a person (empty: any)")
    consumer: str = _opt(_name(CONSUMER_NAME_MAX), "controller", "consumer label on both streams")
    stall_warning_s: float = _opt(_number(0, 3600, lo_open=True), 5.0,
                                  "warn when no detections arrived for this long")
    metrics: bool = _opt(_boolean, True, "publish the '<frames>.controller' metrics stream")


@dataclass
class GatewayConfig:
    host: str = _opt(_host, "127.0.0.1", "address to listen on ('0.0.0.0': every interface)")
    port: int = _opt(_integer(0, 65535), 8080, "TCP port of the page and the WebSocket (0: any free port)")
    token: str = _opt(_token, TOKEN_AUTO, "access token required in ?token= ('auto': a random one per run, "
                      "printed in the page's URL; 'none': no token)")
    allowed_origins: List[str] = _opt(_origins, [],
                                      "extra WebSocket Origins accepted besides the page's own")
    quality: int = _opt(_integer(1, 100), 80, "JPEG quality")
    max_width: int = _opt(_integer(0, 16384), 0,
                          "downscale frames wider than this by an integer factor (0: full size)")
    max_fps: float = _opt(_number(0, 1000), 0.0, "encode and send at most this rate (0: every frame)")
    client_queue: int = _opt(_integer(1, 64), 2, "frames queued per client; a slow client drops the oldest")
    max_clients: int = _opt(_integer(1, 1024), 16, "WebSocket clients served at once; more are refused with "
                            "HTTP 503")
    consumer: str = _opt(_name(CONSUMER_NAME_MAX), "gateway", "consumer label on the frames stream")
    metrics: bool = _opt(_boolean, True, "publish the '<frames>.gateway' metrics stream")


@dataclass
class BridgeConfig:
    listen: List[str] = _opt(_endpoints, [], "Zenoh endpoints to listen on (none and no connect: "
                             "'tcp/127.0.0.1:7447', loopback only)")
    connect: List[str] = _opt(_endpoints, [], "Zenoh endpoints of other bridges or a router to connect to")
    exports: List[str] = _opt(_bridged, [], "local streams sent to the other side, each 'NAME' or "
                              f"'NAME:ENCODING' ({', '.join(BRIDGE_ENCODINGS)})")
    imports: List[str] = _opt(_bridged, [], "remote streams written here as local streams of the same name")
    mode: str = _opt(_choice(BRIDGE_MODES), "peer", "Zenoh mode: 'peer', 'client' of a router, or "
                     "'router' (other bridges connect to it as clients; streams of its own optional)")
    scouting: bool = _opt(_boolean, False, "find peers by UDP multicast on the LAN")
    process_all: bool = _opt(_boolean, False, "every frame in order with back-pressure (false: latest "
                             "frame, a slow link drops at the sender)")
    jpeg_quality: int = _opt(_integer(1, 100), 90, "JPEG quality of the 'jpeg' encoding")
    jpeg_subsampling: str = _opt(_choice(JPEG_SUBSAMPLING), "420", "chroma subsampling of the 'jpeg' "
                                 "encoding ('444': full colour resolution, ~1.6x the CPU)")
    key_prefix: str = _opt(_key_prefix, "frameshm", "Zenoh keys are '<key_prefix>/<stream>/...'")
    zenoh_config: str = _opt(_path_or_empty, "", "a Zenoh JSON5 configuration file (TLS, access control), "
                             "the keys above applied on top")
    consumer: str = _opt(_name(CONSUMER_NAME_MAX), "bridge", "consumer label on exported streams")
    metrics: bool = _opt(_boolean, True, "publish the '<frames>.bridge' metrics stream")


SECTIONS: Dict[str, type] = {
    "streams": StreamsConfig,
    "capture": CaptureConfig,
    "inference": InferenceConfig,
    "controller": ControllerConfig,
    "gateway": GatewayConfig,
    "bridge": BridgeConfig,
}


@dataclass
class PipelineConfig:
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    path: Optional[str] = None  # the file it came from, for messages

    @property
    def frames_stream(self) -> str:
        return self.streams.frames

    @property
    def detections_stream(self) -> str:
        return self.streams.detections or f"{self.streams.frames}.detections"

    @property
    def driver(self) -> Optional[str]:
        """The driver socket the frames and detections streams attach through, or None."""
        return self.streams.driver or None

    def metrics_stream(self, role: str) -> Optional[str]:
        """Name of a role's metrics stream, None if that role's metrics are off."""
        if role not in ROLES:
            raise InvalidArgument(f"unknown role {role!r}")
        return f"{self.streams.frames}.{role}" if getattr(self, role).metrics else None

    def set(self, dotted: str, value: Any) -> None:
        """Sets ``"section.key"`` to ``value`` with the same checks as the file."""
        section, _, key = dotted.partition(".")
        table = getattr(self, section, None) if section in SECTIONS else None
        before = getattr(table, key, None) if table is not None else None
        _set_value(self, section, key, value, self._where())
        try:
            self._check_cross(self._where())
        except ConfigError:
            setattr(table, key, before)  # leave the configuration as it was
            raise

    def _where(self) -> str:
        return self.path or "configuration"

    def _check_cross(self, where: str) -> None:
        dets = self.detections_stream
        if len(dets) > STREAM_NAME_MAX:
            raise ConfigError(f"{where}: [streams] detections: default name {dets!r} is too long; set it explicitly")
        if dets == self.streams.frames:
            raise ConfigError(f"{where}: [streams] detections must differ from frames ({dets!r})")
        from .bridge import parse_spec

        exported = {parse_spec(x)[0] for x in self.bridge.exports}
        both = exported & {parse_spec(x)[0] for x in self.bridge.imports}
        if both:
            raise ConfigError(f"{where}: [bridge] {', '.join(sorted(both))} both exported and imported")
        metrics = {f"{self.streams.frames}.{r}" for r in ROLES}
        if dets in metrics:
            raise ConfigError(f"{where}: [streams] detections {dets!r} collides with a metrics stream name")


def _set_value(cfg: PipelineConfig, section: str, key: str, value: Any, where: str) -> None:
    cls = SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"{where}: unknown table [{section}]{suggest(section, SECTIONS)}; known: {', '.join(SECTIONS)}")
    specs = {f.name: f for f in fields(cls)}
    f = specs.get(key)
    if f is None:
        raise ConfigError(
            f"{where}: unknown key {key!r} in [{section}]{suggest(key, specs)}; known: {', '.join(specs)}"
        )
    try:
        norm = f.metadata["check"](value)
    except (ValueError, InvalidArgument) as exc:
        raise ConfigError(f"{where}: [{section}] {key}: {exc}") from None
    setattr(getattr(cfg, section), key, norm)


def suggest(word: str, known) -> str:
    """' (did you mean ...?)' for the closest known word, or ''."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(data: Dict[str, Any], where: str = "configuration") -> PipelineConfig:
    """A validated configuration from parsed TOML (tables of keys)."""
    cfg = PipelineConfig(path=where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected tables, got {type(data).__name__}")
    for section, table in data.items():
        if section not in SECTIONS and not isinstance(table, dict):
            homes = [name for name, cls in SECTIONS.items() if section in {f.name for f in fields(cls)}]
            hint = f" (it belongs in [{homes[0]}])" if len(homes) == 1 else ""
            raise ConfigError(f"{where}: key {section!r} outside any table{hint}; tables: {', '.join(SECTIONS)}")
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown table [{section}]{suggest(section, SECTIONS)}; known: {', '.join(SECTIONS)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section} must be a table ([{section}]), got {table!r}")
        for key, value in table.items():
            _set_value(cfg, section, key, value, where)
    cfg._check_cross(where)
    return cfg


def _toml(error=None):
    if tomllib is None:
        raise (error or ConfigError)("reading TOML needs Python 3.11+ (tomllib) or the tomli package: "
                                     "pip install tomli")
    return tomllib


def read_toml(path: str, error=None) -> Dict[str, Any]:
    """Parses a TOML file; every failure is an ``error`` (ConfigError by default) naming
    the file. Shared by the pipeline and driver configs."""
    error = error or ConfigError
    _toml(error)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise error(f"config path is a directory: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None


def load(path: str) -> PipelineConfig:
    """Reads and validates a pipeline TOML file."""
    return from_dict(read_toml(path), where=path)


def load_or_default(path: Optional[str]) -> PipelineConfig:
    return load(os.fspath(path)) if path else PipelineConfig()


def describe() -> List[Tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the reference table in docs/pipeline.md."""
    out = []
    for section, cls in SECTIONS.items():
        inst = cls()
        for f in fields(cls):
            out.append((section, f.name, getattr(inst, f.name), f.metadata["doc"]))
    return out
