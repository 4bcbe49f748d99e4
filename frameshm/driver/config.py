"""The driver's TOML configuration: policy that maps streams to pool profiles
(docs/driver-protocol.md §8 documents every key; docs/examples/driver_camera_*.toml).

    cfg = frameshm.driver.config.load("driver.toml")
    cfg.rule_for(1001).profile          # 'raw'
    cfg.profiles["raw"].footprint       # bytes of every region of one such stream

Unknown tables and keys, wrong types and out-of-range values raise :class:`DriverConfigError`
naming the file, the table and the key (with a did-you-mean suggestion).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .. import _core
from ..config import ConfigError, read_toml
from ..config import suggest as _suggest
from ..errors import FrameshmError

# The layout limits are libframeshm's (frameshm.h); the policy checks against the same.
MAX_NSLOTS = _core.MAX_NSLOTS
MIN_STRIDE = _core.MIN_STRIDE
MAX_STRIDE = _core.MAX_STRIDE
MAX_POOLS = _core.MAX_POOLS
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL


class DriverConfigError(ConfigError):
    """The driver configuration is invalid (the message says where and why)."""


def _check_keys(table: Dict[str, Any], known: Dict[str, Any], where: str) -> None:
    for key in table:
        if key not in known:
            raise DriverConfigError(f"{where}: unknown key {key!r}{_suggest(key, known)}; known: {', '.join(known)}")


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DriverConfigError(f"{what}: expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise DriverConfigError(f"{what}: {v} is outside {lo}..{hi}")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise DriverConfigError(f"{what}: expected true or false, got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise DriverConfigError(f"{what}: expected a non-empty string, got {v!r}")
    return v


def _mode(v: Any, what: str) -> int:
    if isinstance(v, str):  # "0660" / "0o660" / "660"
        s = v.strip().lower()
        s = s[2:] if s.startswith("0o") else s
        try:
            v = int(s, 8)
        except ValueError:
            raise DriverConfigError(f"{what}: expected an octal mode such as 0o660, got {v!r}") from None
    v = _int(v, what, 0, 0o777)
    if not v & 0o600 == 0o600:
        raise DriverConfigError(f"{what}: 0o{v:o} must let the owner read and write (0o600)")
    return v


def _uid(v: Any, what: str) -> int:
    if isinstance(v, str):
        try:
            return pwd.getpwnam(v).pw_uid
        except KeyError:
            raise DriverConfigError(f"{what}: no user named {v!r}") from None
    return _int(v, what, 0, 2**32 - 2)


def _gid(v: Any, what: str) -> int:
    if isinstance(v, str):
        try:
            return grp.getgrnam(v).gr_gid
        except KeyError:
            raise DriverConfigError(f"{what}: no group named {v!r}") from None
    return _int(v, what, 0, 2**32 - 2)


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list):
        raise DriverConfigError(f"{what}: expected a list, got {v!r}")
    return v


def _name(v: Any, what: str) -> str:
    v = _str(v, what)
    try:
        _core.stream_id_for_name(v)  # validates the name as the core does
    except ValueError as exc:
        raise DriverConfigError(f"{what}: {exc}") from None
    return v


def fmt_bytes(n: int) -> str:
    v = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if v < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} bytes"  # pragma: no cover


# ---- profiles and stream rules ------------------------------------------------------------


@dataclass
class Profile:
    """A stream's pool layout: header ring slots and (pool_id, stride_bytes) pairs."""

    name: str
    header_nslots: int
    pools: List[Tuple[int, int]]

    @property
    def footprint(self) -> int:
        """Bytes of shared memory one stream of this profile occupies (every region file,
        control region included)."""
        return _core.profile_footprint(self.header_nslots, [s for _, s in self.pools])

    def describe(self) -> str:
        pools = ", ".join(f"pool {pid}: {fmt_bytes(s)}" for pid, s in self.pools)
        return (
            f"profile {self.name}: {self.header_nslots} header slots, {pools}; "
            f"footprint {fmt_bytes(self.footprint)} ({self.footprint} bytes) per stream"
        )


_PROFILE_KEYS = {"header_nslots": "power of two, 1..2^24", "pools": "list of {pool_id, stride_bytes}"}
_POOL_KEYS = {"pool_id": "1..65535, distinct", "stride_bytes": "power-of-two multiple of 64"}


def _profile(name: str, table: Any, where: str) -> Profile:
    w = f"{where}: [profiles.{name}]"
    if not isinstance(table, dict):
        raise DriverConfigError(f"{w} must be a table")
    _check_keys(table, _PROFILE_KEYS, w)
    if "header_nslots" not in table or "pools" not in table:
        raise DriverConfigError(f"{w} needs header_nslots and pools")
    n = _int(table["header_nslots"], f"{w} header_nslots", 1, MAX_NSLOTS)
    if n & (n - 1):
        raise DriverConfigError(f"{w} header_nslots: {n} is not a power of two")
    pools = _list(table["pools"], f"{w} pools")
    if not 1 <= len(pools) <= MAX_POOLS:
        raise DriverConfigError(f"{w} pools: a profile has 1 to {MAX_POOLS} payload pools, not {len(pools)}")
    out: List[Tuple[int, int]] = []
    for i, pool in enumerate(pools):
        pw = f"{w} pools[{i}]"
        if not isinstance(pool, dict):
            raise DriverConfigError(f"{pw}: expected {{pool_id = ..., stride_bytes = ...}}, got {pool!r}")
        _check_keys(pool, _POOL_KEYS, pw)
        if "pool_id" not in pool or "stride_bytes" not in pool:
            raise DriverConfigError(f"{pw} needs pool_id and stride_bytes")
        pid = _int(pool["pool_id"], f"{pw} pool_id", 1, 65535)
        stride = _int(pool["stride_bytes"], f"{pw} stride_bytes", MIN_STRIDE, MAX_STRIDE)
        if stride & (stride - 1):
            raise DriverConfigError(f"{pw} stride_bytes: {stride} is not a power-of-two multiple of {MIN_STRIDE}")
        if any(pid == p for p, _ in out):
            raise DriverConfigError(f"{pw} pool_id: {pid} appears twice")
        out.append((pid, stride))
    return Profile(name, n, out)


@dataclass
class StreamRule:
    """Which streams get which profile: an inclusive id range (``id_range``), a list of
    ids (``ids``), one id, or a name. ``lo``/``hi`` bound the ids the rule can match."""

    index: int
    lo: int
    hi: int
    profile: str
    name: Optional[str] = None
    producer_uids: List[int] = field(default_factory=list)
    ids: Optional[Tuple[int, ...]] = None  # a list of ids (sorted); None: every id in lo..hi
    # Who may set the stream's control bytes under the sealed transport (the driver writes
    # them): these uids; empty: whoever may produce it (producer_uids; empty too: every
    # admitted client, who could as well produce it). The driver's uid and root always may.
    control_uids: List[int] = field(default_factory=list)

    def may_control(self, uid: int) -> bool:
        allowed = self.control_uids or self.producer_uids
        return not allowed or uid in allowed

    def matches(self, stream_id: int) -> bool:
        if self.ids is not None:
            return stream_id in self.ids
        return self.lo <= stream_id <= self.hi

    @property
    def count(self) -> int:
        """How many stream ids the rule covers."""
        return len(self.ids) if self.ids is not None else self.hi - self.lo + 1

    def overlaps(self, other: "StreamRule") -> bool:
        if self.hi < other.lo or other.hi < self.lo:
            return False
        if self.ids is None and other.ids is None:
            return True
        listed = self.ids if self.ids is not None else other.ids
        rule = other if self.ids is not None else self
        return any(rule.matches(i) for i in listed)

    def describe(self) -> str:
        if self.name is not None:
            what = f"stream {self.name!r} (id {self.lo})"
        elif self.ids is not None and len(self.ids) > 1:
            what = "streams " + ", ".join(map(str, self.ids))
        elif self.lo == self.hi:
            what = f"stream {self.lo}"
        else:
            what = f"streams {self.lo}..{self.hi}"
        extra = f", producers: uids {self.producer_uids}" if self.producer_uids else ""
        if self.control_uids:
            extra += f", control bytes: uids {self.control_uids}"
        return f"{what} -> profile {self.profile}{extra}"


_STREAM_KEYS = {
    "id_range": "[first, last]: every id from first to last",
    "ids": "[a, b, ...]: exactly these ids",
    "id": "one stream id",
    "name": "stream name (id derived as the core does)",
    "profile": "profile name",
    "producer_uids": "uids (or user names) allowed to produce",
    "control_uids": "uids (or user names) allowed to set control bytes (transport = \"memfd\")",
}
_ID_KEYS = ("id_range", "ids", "id", "name")


def _rule(i: int, table: Any, profiles: Dict[str, Profile], where: str) -> StreamRule:
    w = f"{where}: [[streams]] #{i + 1}"
    if not isinstance(table, dict):
        raise DriverConfigError(f"{w} must be a table")
    _check_keys(table, _STREAM_KEYS, w)
    given = [k for k in _ID_KEYS if k in table]
    if len(given) != 1:
        raise DriverConfigError(
            f"{w} needs exactly one of id_range = [first, last], ids = [a, b, ...], id = N or name = \"...\""
        )
    name = None
    ids = None
    if "id_range" in table:
        rng = _list(table["id_range"], f"{w} id_range")
        if len(rng) != 2:
            raise DriverConfigError(f"{w} id_range: expected [first, last], got {rng!r}")
        lo = _int(rng[0], f"{w} id_range[0]", 1, 2**32 - 1)
        hi = _int(rng[1], f"{w} id_range[1]", 1, 2**32 - 1)
        if lo > hi:
            raise DriverConfigError(f"{w} id_range: first {lo} is above last {hi}")
    elif "ids" in table:
        listed = _list(table["ids"], f"{w} ids")
        if not listed:
            raise DriverConfigError(f"{w} ids: expected at least one id, got []")
        vals = [_int(v, f"{w} ids[{k}]", 1, 2**32 - 1) for k, v in enumerate(listed)]
        if len(set(vals)) != len(vals):
            raise DriverConfigError(f"{w} ids: {vals!r} lists an id twice")
        if len(vals) == 2 and abs(vals[1] - vals[0]) > 1:
            # frameshm 0.2 read `ids = [first, last]` as a range: refuse the one form whose
            # meaning changed rather than drop the ids between without a word.
            a, b = vals
            raise DriverConfigError(
                f"{w} ids = [{a}, {b}] is ambiguous: frameshm 0.2 read it as the range {min(a, b)}..{max(a, b)}. "
                f"Write id_range = [{min(a, b)}, {max(a, b)}] for every id from {min(a, b)} to {max(a, b)}, "
                f"or give {a} and {b} a [[streams]] table each (id = {a}, id = {b}) for exactly those two"
            )
        ids = tuple(sorted(vals))
        lo, hi = ids[0], ids[-1]
    elif "id" in table:
        lo = hi = _int(table["id"], f"{w} id", 1, 2**32 - 1)
    else:
        name = _name(table["name"], f"{w} name")
        lo = hi = _core.stream_id_for_name(name)
    if "profile" not in table:
        raise DriverConfigError(f"{w} needs profile = \"...\"")
    prof = _str(table["profile"], f"{w} profile")
    if prof not in profiles:
        raise DriverConfigError(
            f"{w} profile: no profile {prof!r}{_suggest(prof, profiles)}; defined: {', '.join(profiles) or 'none'}"
        )
    uids = [_uid(u, f"{w} producer_uids") for u in _list(table.get("producer_uids", []), f"{w} producer_uids")]
    cuids = [_uid(u, f"{w} control_uids") for u in _list(table.get("control_uids", []), f"{w} control_uids")]
    return StreamRule(i, lo, hi, prof, name, uids, ids, cuids)


# ---- the whole file -------------------------------------------------------------------------


_DRIVER_KEYS = {
    "socket": "control socket path",
    "base_dir": "base directory",
    "namespace": "namespace",
    "file_mode": "mode of region files",
    "group": "group of region files and the socket",
    "keepalive_interval_ms": "client keepalive interval",
    "lease_expiry_missed": "missed keepalives before expiry",
    "announce_interval_ms": "ShmPoolAnnounce period",
    "cleanup_on_exit": "remove provisioned streams on graceful exit",
    "shm_budget_bytes": "most bytes all provisioned streams may hold together (0: no limit)",
    "transport": '"file" (region files, the spec\'s URIs) or "memfd" (sealed memfds passed over the socket)',
}
TRANSPORTS = ("file", "memfd")
_POLICY_KEYS = {"allow_uids": "uids allowed to attach", "allow_gids": "gids allowed to attach"}
_TABLES = {"driver": _DRIVER_KEYS, "policy": _POLICY_KEYS, "profiles": None, "streams": None}


@dataclass
class DriverConfig:
    path: str = "<defaults>"
    socket: str = "/run/frameshm/driver.sock"
    base_dir: Optional[str] = None
    namespace: str = "default"
    file_mode: int = 0o600
    group: Optional[str] = None
    gid: int = -1
    keepalive_interval_ms: int = 1000
    lease_expiry_missed: int = 3
    announce_interval_ms: int = 1000
    cleanup_on_exit: bool = True
    shm_budget_bytes: int = 0
    transport: str = "file"
    allow_uids: List[int] = field(default_factory=list)
    allow_gids: List[int] = field(default_factory=list)
    profiles: Dict[str, Profile] = field(default_factory=dict)
    streams: List[StreamRule] = field(default_factory=list)

    @property
    def lease_expiry_ms(self) -> int:
        return self.keepalive_interval_ms * self.lease_expiry_missed

    @property
    def resolved_base_dir(self) -> str:
        return self.base_dir or os.environ.get("FRAMESHM_DIR") or "/dev/shm"

    def rule_for(self, stream_id: int) -> Optional[StreamRule]:
        for r in self.streams:
            if r.matches(stream_id):
                return r
        return None

    def profile_for(self, stream_id: int) -> Optional[Profile]:
        r = self.rule_for(stream_id)
        return self.profiles[r.profile] if r else None


def from_dict(data: Dict[str, Any], where: str = "configuration") -> DriverConfig:
    cfg = DriverConfig(path=where)
    if not isinstance(data, dict):
        raise DriverConfigError(f"{where}: expected tables")
    for key, value in data.items():
        if key not in _TABLES:
            homes = [t for t, keys in _TABLES.items() if keys and key in keys]
            hint = f" (it belongs in [{homes[0]}])" if homes else _suggest(key, _TABLES)
            raise DriverConfigError(f"{where}: unknown table or key {key!r}{hint}; tables: {', '.join(_TABLES)}")
    drv = data.get("driver", {})
    if not isinstance(drv, dict):
        raise DriverConfigError(f"{where}: driver must be a table ([driver])")
    w = f"{where}: [driver]"
    _check_keys(drv, _DRIVER_KEYS, w)
    if "socket" in drv:
        cfg.socket = _str(drv["socket"], f"{w} socket")
    if not os.path.isabs(cfg.socket):
        raise DriverConfigError(f"{w} socket: {cfg.socket!r} must be an absolute path")
    if len(os.fsencode(cfg.socket)) > SOCKET_PATH_MAX:
        raise DriverConfigError(f"{w} socket: {cfg.socket!r} is longer than {SOCKET_PATH_MAX} bytes")
    if "base_dir" in drv:
        cfg.base_dir = _str(drv["base_dir"], f"{w} base_dir")
        if not os.path.isabs(cfg.base_dir):
            raise DriverConfigError(f"{w} base_dir: {cfg.base_dir!r} must be an absolute path")
    if "namespace" in drv:
        cfg.namespace = _name(drv["namespace"], f"{w} namespace")
    if "file_mode" in drv:
        cfg.file_mode = _mode(drv["file_mode"], f"{w} file_mode")
    if "group" in drv:
        g = drv["group"]
        cfg.gid = _gid(g, f"{w} group")
        cfg.group = str(g)
    if "keepalive_interval_ms" in drv:
        cfg.keepalive_interval_ms = _int(drv["keepalive_interval_ms"], f"{w} keepalive_interval_ms", 10, 60000)
    if "lease_expiry_missed" in drv:
        cfg.lease_expiry_missed = _int(drv["lease_expiry_missed"], f"{w} lease_expiry_missed", 1, 100)
    if "announce_interval_ms" in drv:
        cfg.announce_interval_ms = _int(drv["announce_interval_ms"], f"{w} announce_interval_ms", 10, 60000)
    if "cleanup_on_exit" in drv:
        cfg.cleanup_on_exit = _bool(drv["cleanup_on_exit"], f"{w} cleanup_on_exit")
    if "shm_budget_bytes" in drv:
        cfg.shm_budget_bytes = _int(drv["shm_budget_bytes"], f"{w} shm_budget_bytes", 0, 2**63 - 1)
    if "transport" in drv:
        cfg.transport = _str(drv["transport"], f"{w} transport")
        if cfg.transport not in TRANSPORTS:
            raise DriverConfigError(f"{w} transport: {cfg.transport!r} is not one of {', '.join(TRANSPORTS)}")

    pol = data.get("policy", {})
    if not isinstance(pol, dict):
        raise DriverConfigError(f"{where}: policy must be a table ([policy])")
    w = f"{where}: [policy]"
    _check_keys(pol, _POLICY_KEYS, w)
    cfg.allow_uids = [_uid(u, f"{w} allow_uids") for u in _list(pol.get("allow_uids", []), f"{w} allow_uids")]
    cfg.allow_gids = [_gid(g, f"{w} allow_gids") for g in _list(pol.get("allow_gids", []), f"{w} allow_gids")]

    profs = data.get("profiles", {})
    if not isinstance(profs, dict):
        raise DriverConfigError(f"{where}: profiles must be tables ([profiles.<name>])")
    for name, table in profs.items():
        cfg.profiles[name] = _profile(name, table, where)

    rules = data.get("streams", [])
    if not isinstance(rules, list):
        raise DriverConfigError(f"{where}: streams must be an array of tables ([[streams]])")
    for i, table in enumerate(rules):
        r = _rule(i, table, cfg.profiles, where)
        for other in cfg.streams:
            if r.overlaps(other):
                raise DriverConfigError(
                    f"{where}: [[streams]] #{i + 1} ({r.describe()}) overlaps #{other.index + 1} ({other.describe()})"
                )
        cfg.streams.append(r)
    return cfg


def load(path: str) -> DriverConfig:
    return from_dict(read_toml(path, DriverConfigError), where=os.fspath(path))


def check_report(cfg: DriverConfig) -> str:
    """What `frameshm driver --check` prints: every profile's footprint, every rule, totals
    against the base directory's free space."""
    lines = [f"config {cfg.path}: valid"]
    lines.append(
        f"socket {cfg.socket}; base {cfg.resolved_base_dir}, namespace {cfg.namespace}; "
        f"file mode 0o{cfg.file_mode:o}" + (f", group {cfg.group} ({cfg.gid})" if cfg.gid >= 0 else "")
        + (", sealed memfd transport" if cfg.transport == "memfd" else "")
    )
    lines.append(
        f"keepalive every {cfg.keepalive_interval_ms} ms, leases expire after {cfg.lease_expiry_ms} ms "
        f"({cfg.lease_expiry_missed} missed); announce every {cfg.announce_interval_ms} ms"
    )
    for p in cfg.profiles.values():
        lines.append(p.describe())
    total = 0
    for r in cfg.streams:
        p = cfg.profiles[r.profile]
        count = r.count
        total += count * p.footprint
        lines.append(f"{r.describe()}: {count} stream(s) x {fmt_bytes(p.footprint)} = {fmt_bytes(count * p.footprint)}")
    lines.append(f"all configured streams at once: {fmt_bytes(total)} ({total} bytes)")
    if cfg.shm_budget_bytes:
        verdict = "fits" if total <= cfg.shm_budget_bytes else "DOES NOT FIT: attaches beyond the budget are refused"
        lines.append(f"budget shm_budget_bytes = {fmt_bytes(cfg.shm_budget_bytes)}: {verdict}")
    try:
        room, fs_free = _core.shm_room(cfg.resolved_base_dir)
    except (OSError, ValueError, FrameshmError) as exc:
        lines.append(f"free space of {cfg.resolved_base_dir}: unknown ({exc})")
    else:
        verdict = "fits" if total <= room else "DOES NOT FIT: attaches beyond the free space are refused"
        note = f" (capped by available memory; the file system has {fmt_bytes(fs_free)})" if room < fs_free else ""
        lines.append(f"room in {cfg.resolved_base_dir} now: {fmt_bytes(room)} ({room} bytes){note}: {verdict}")
    return "\n".join(lines)
