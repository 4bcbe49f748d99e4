"""The frameshm driver (SHM Driver Model Spec v1.0): sole owner of region files, lease
authority and ShmPoolAnnounce emitter, on a Unix SOCK_SEQPACKET control socket.

One thread, one selector loop. Nothing a client sends can block it: sockets are
non-blocking, every packet is decoded defensively (protocol.decode), a client whose send
buffer is full is disconnected instead of waited for, and a connection that keeps sending
garbage is closed. Region files are created and removed only through the C core
(_core.driver_provision / driver_remove). docs/driver-protocol.md is the reference.
"""

from __future__ import annotations

import array
import errno
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, TextIO, Tuple

from .. import _core
from .._signals import STOP_SIGNALS, restore_handlers
from ..errors import CorruptStream, FrameshmError, ResourceLimit, StreamNotFound
from . import protocol as P
from .config import DriverConfig, StreamRule, fmt_bytes

LAYOUT_VERSION = 1
MAX_DIMS = 8
MAX_BAD_MESSAGES = 16
PID_POLL_NS = 500_000_000
READS_PER_WAKEUP = 64
# Sealed transport: consumer-table entries (64 per stream) one uid other than the
# driver's may hold per stream, so that one user cannot fill the table for the others.
MAX_ENTRIES_PER_UID = 16
# ShmControlResponse.value of a refused registration the client reports as ResourceLimit
# (the library's FSHM_E_LIMIT).
LIMIT_CODE = -1004
URI_PREFIX = "shm:file?path="


def _mono() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC on Linux, as the C core's fshm_now_ns


def _proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state, starttime) of a process from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rp = data.rfind(b")")
    fields = data[rp + 2:].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    if pid <= 0:
        return True  # not visible from our pid namespace: rely on the connection and keepalives
    st = _proc_stat(pid)
    if st is None:
        return False
    state, started = st
    if state in ("Z", "X"):
        return False
    return start is None or started == start


def _supplementary_groups(pid: int) -> Set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _uri_path(uri: str) -> str:
    return uri[len(URI_PREFIX):].split("|", 1)[0] if uri.startswith(URI_PREFIX) else ""


class DriverError(FrameshmError, OSError):
    """The driver cannot start (socket taken, bad base directory, ...): an OSError, as the
    socket or directory the system refused is what went wrong."""


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    pid_start: Optional[int]
    allowed: bool
    refusal: str = ""
    leases: Set[int] = field(default_factory=set)
    bad: int = 0
    closed: bool = False
    closing: bool = False  # scheduled for closing: nothing more it sends is handled

    def label(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


@dataclass(eq=False)
class Lease:
    lease_id: int
    stream_id: int
    client_id: int
    role: int
    conn: Conn
    expiry_ns: int
    # Sealed transport: the consumer-table entry the driver wrote for this lease
    # (index, queue name), freed when the lease ends.
    entry: Optional[Tuple[int, str]] = None


@dataclass(eq=False)
class Stream:
    stream_id: int
    rule: StreamRule
    grant: Optional[dict] = None   # the current epoch's regions (driver_provision's dict)
    producer: Optional[int] = None  # lease id
    leases: Set[int] = field(default_factory=set)
    last_epoch: int = 0
    # transport = "memfd": the stream's sealed control region (kept across epochs), the
    # current epoch's regions (header ring, pools) read-write for the producer, and
    # read-only descriptions of the same for consumers. The driver holds them for as long
    # as the epoch is current: they are the only way to the memory.
    ctl_fd: int = -1
    ro_ctl_fd: int = -1  # the control region as consumers get it: read-only
    region_fds: List[int] = field(default_factory=list)
    ro_fds: List[int] = field(default_factory=list)

    def close_regions(self) -> None:
        for fd in self.region_fds + self.ro_fds:
            os.close(fd)
        self.region_fds, self.ro_fds = [], []

    def close_all(self) -> None:
        self.close_regions()
        if self.ctl_fd >= 0:
            os.close(self.ctl_fd)
            self.ctl_fd = -1
        if self.ro_ctl_fd >= 0:
            os.close(self.ro_ctl_fd)
            self.ro_ctl_fd = -1

    def fds_for(self, role: int) -> List[int]:
        """What an attach response carries: control region, header ring, pools. Consumers
        get read-only descriptions of all three (they cannot map them writable, nor, being
        another user than the driver, re-open them writable: mode 0600): the driver writes
        their consumer-table entries and the control bytes for them (ShmConsumerRegister,
        ShmSetControl), so no consumer can write what the producer or another consumer
        reads. Sealed, nobody can truncate any of them."""
        if self.ctl_fd < 0:
            return []
        if role == P.Role.PRODUCER:
            return [self.ctl_fd] + self.region_fds
        return [self.ro_ctl_fd] + self.ro_fds


def _readonly(fd: int) -> int:
    """A read-only description of a sealed region (its mapping can never be made writable)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def _role_name(role: int) -> str:
    return {1: "producer", 2: "consumer"}.get(role, f"role {role}")


class Driver:
    def __init__(self, cfg: DriverConfig, log: Optional[TextIO] = None):
        self.cfg = cfg
        self.log_file = log if log is not None else sys.stderr
        self.sel = selectors.DefaultSelector()
        self.lsock: Optional[socket.socket] = None
        self.sock_ino: Optional[Tuple[int, int]] = None
        self.made_dirs: List[str] = []
        self.conns: Dict[int, Conn] = {}
        self.leases: Dict[int, Lease] = {}
        self.clients: Dict[int, int] = {}  # client_id -> lease_id (active leases)
        self.streams: Dict[int, Stream] = {}
        self.next_lease_id = 1
        self.pending_close: List[Tuple[Conn, str]] = []
        self.stop_signal: Optional[int] = None
        self.my_uid = os.geteuid()
        self.expiry_ns = cfg.keepalive_interval_ms * cfg.lease_expiry_missed * 1_000_000
        self.announce_ns = cfg.announce_interval_ms * 1_000_000
        self.base_dir = cfg.resolved_base_dir
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None

    # ---- logging ----

    def log(self, text: str) -> None:
        try:
            print(f"frameshm driver: {text}", file=self.log_file, flush=True)
        except (OSError, ValueError):
            pass

    # ---- startup ----

    def _check_socket_free(self) -> None:
        path = self.cfg.socket
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise DriverError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            self.log(f"removed stale socket {path} (nobody listening)")
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DriverError(f"{path}: cannot tell whether another driver uses it: {exc.strerror}") from None
        finally:
            probe.close()
        raise DriverError(f"another driver is already listening on {path}")

    def _listen(self) -> None:
        path = self.cfg.socket
        parent = os.path.dirname(path) or "."
        missing = []  # the socket's directories this driver creates, deepest first
        d = os.path.abspath(parent)
        while not os.path.lexists(d) and os.path.dirname(d) != d:
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self.made_dirs = missing
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # never reachable with wider permissions than intended
        try:
            s.bind(path)
        except OSError as exc:
            s.close()
            raise DriverError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        if self.cfg.gid >= 0:
            os.chown(path, -1, self.cfg.gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        s.listen(128)
        s.setblocking(False)
        st = os.stat(path)
        self.sock_ino = (st.st_dev, st.st_ino)
        self.lsock = s
        self.sel.register(s, selectors.EVENT_READ, self._on_accept)

    def _startup_bump(self) -> None:
        """Streams a previous driver left behind move to a new epoch before any lease is
        granted (spec §10): a restarted driver never reissues an epoch."""
        try:
            ns_dir = _core.namespace_dir(self.base_dir, self.cfg.namespace)
        except StreamNotFound:
            return  # no base directory yet: nothing was left behind
        except FrameshmError as exc:
            raise DriverError(f"base directory: {exc}") from None
        try:
            entries = sorted(os.listdir(ns_dir))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DriverError(f"cannot list {ns_dir}: {exc.strerror}") from None
        for entry in entries:
            if not entry.isdigit() or str(int(entry)) != entry:
                continue
            sid = int(entry)
            rule = self.cfg.rule_for(sid)
            if rule is None or sid == 0 or sid >= 2**32:
                continue
            st = self._stream(sid, rule)
            sdir = os.path.join(ns_dir, entry)
            try:
                before = _core.driver_current_epoch(sid, **self._addr(rule))
            except CorruptStream as exc:
                # A control region this build cannot read: the driver owns the files, so
                # it starts the stream over, above every epoch directory left there.
                epochs = [int(e) for e in os.listdir(sdir) if e.isdigit()]
                self.log(f"stream {sid}: {exc}; recreating it")
                _core.driver_remove(sid, **self._addr(rule))
                st.last_epoch = max(epochs, default=0)
                before = st.last_epoch
            except FrameshmError as exc:  # e.g. another stream's name on this id: not ours
                self.log(f"stream {sid}: {exc}; left alone")
                continue
            try:
                self._provision(st, f"driver restart (was epoch {before})")
            except FrameshmError:
                st.grant = None  # not provisioned: the next EXISTING_OR_CREATE attach retries

    # ---- streams and epochs ----

    def _addr(self, rule: StreamRule) -> dict:
        return {"name": rule.name, "base_dir": self.base_dir, "namespace": self.cfg.namespace}

    def _stream(self, sid: int, rule: StreamRule) -> Stream:
        st = self.streams.get(sid)
        if st is None:
            st = self.streams[sid] = Stream(sid, rule)
        return st

    def _provision(self, st: Stream, why: str) -> None:
        """Moves the stream to a new epoch; raises FrameshmError (logged, st.grant left as
        it was) when that fails."""
        prof = self.cfg.profiles[st.rule.profile]
        budget = self.cfg.shm_budget_bytes
        if budget:
            held = sum(self.cfg.profiles[o.rule.profile].footprint for o in self.streams.values()
                       if o is not st and o.grant is not None)
            if held + prof.footprint > budget:
                left = max(0, budget - held)
                text = (f"stream {st.stream_id} needs {fmt_bytes(prof.footprint)} (profile footprint, "
                        f"{prof.footprint} bytes) but the driver's budget (shm_budget_bytes = "
                        f"{fmt_bytes(budget)}) has {fmt_bytes(left)} left")
                self.log(f"stream {st.stream_id}: cannot provision a new epoch ({why}): {text}")
                raise ResourceLimit(errno.ENOSPC, text)
        sealed = self.cfg.transport == "memfd"
        kw = dict(header_nslots=prof.header_nslots, pools=prof.pools, file_mode=self.cfg.file_mode,
                  gid=self.cfg.gid, min_epoch=st.last_epoch + 1, **self._addr(st.rule))
        try:
            if sealed:
                g = _core.driver_provision_sealed(st.stream_id, ctl_fd=st.ctl_fd, **kw)
            else:
                g = _core.driver_provision(st.stream_id, **kw)
        except FrameshmError as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.log(f"stream {st.stream_id}: cannot provision a new epoch ({why}): {text}")
            raise
        if sealed:
            # The old epoch's memory goes once its last holder unmaps it.
            st.close_regions()
            st.ctl_fd = g.pop("ctl_fd")
            st.region_fds = g.pop("region_fds")
            try:
                if st.ro_ctl_fd < 0:
                    st.ro_ctl_fd = _readonly(st.ctl_fd)
                for fd in st.region_fds:
                    st.ro_fds.append(_readonly(fd))
            except OSError as exc:  # out of descriptors: grant nothing rather than write access
                st.close_regions()
                text = f"cannot make read-only descriptors: {exc.strerror}"
                self.log(f"stream {st.stream_id}: cannot provision a new epoch ({why}): {text}")
                raise ResourceLimit(exc.errno, text) from None
        st.grant = g
        st.last_epoch = g["epoch"]
        self.log(f"epoch: stream {st.stream_id} now at epoch {g['epoch']} ({why})")

    def _current(self, st: Stream) -> bool:
        """The stream's files are still where the last epoch put them."""
        g = st.grant
        if g is not None and st.region_fds:
            return True  # sealed regions: nobody but the driver can make them go
        if g is None or not os.path.isfile(_uri_path(g["header_uri"])):
            return False
        try:
            return _core.driver_current_epoch(st.stream_id, **self._addr(st.rule)) == g["epoch"]
        except FrameshmError:
            return False

    def _bump(self, st: Stream, why: str) -> None:
        try:
            self._provision(st, why)
        except FrameshmError:
            st.grant = None  # stale: the next attach provisions again
            return
        self._announce(st)

    # ---- messages out ----

    def _send(self, conn: Conn, msg: P.Message, fds: Optional[List[int]] = None) -> bool:
        if conn.closed:
            return False
        try:
            flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                conn.sock.sendmsg([P.encode(msg)], anc, flags)
            else:
                conn.sock.send(P.encode(msg), flags)
            return True
        except BlockingIOError:
            self._schedule_close(conn, "it does not read its socket (send buffer full)")
        except (BrokenPipeError, ConnectionResetError):
            self._schedule_close(conn, "connection closed by the client")
        except OSError as exc:
            self._schedule_close(conn, f"send failed: {exc.strerror}")
        return False

    def _announce_msg(self, st: Stream) -> Optional[P.PoolAnnounce]:
        g = st.grant
        if g is None:
            return None
        prod = self.leases.get(st.producer) if st.producer else None
        return P.PoolAnnounce(
            stream_id=st.stream_id,
            producer_id=prod.client_id if prod else 0,
            epoch=g["epoch"],
            announce_timestamp_ns=_mono(),
            layout_version=g["layout_version"],
            header_nslots=g["header_nslots"],
            header_slot_bytes=g["header_slot_bytes"],
            pools=[P.PoolInfo(p["pool_id"], p["nslots"], p["stride_bytes"], p["uri"]) for p in g["pools"]],
            header_uri=g["header_uri"],
        )

    def _holders(self, st: Stream) -> List[Conn]:
        seen: Dict[int, Conn] = {}
        for lid in sorted(st.leases):
            c = self.leases[lid].conn
            seen.setdefault(id(c), c)
        return list(seen.values())

    def _announce(self, st: Stream) -> None:
        msg = self._announce_msg(st)
        if msg is None:
            return
        for c in self._holders(st):
            self._send(c, msg)

    def _reply_error(self, conn: Conn, code: int, text: str, corr: Optional[int], tid: Optional[int]) -> None:
        if tid == P.T_DETACH_REQUEST and corr is not None:
            self._send(conn, P.DetachResponse(corr, code, text))
        elif tid in (P.T_CONSUMER_REGISTER, P.T_SET_CONTROL) and corr is not None:
            self._send(conn, P.ControlResponse(corr, code, 0, text))
        else:
            self._send(conn, P.AttachResponse(corr if corr is not None and tid == P.T_ATTACH_REQUEST else 0, code,
                                              error_message=text))

    # ---- connections ----

    def _on_accept(self, _mask: int) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                s, _addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again on the next wakeup
                self.log(f"accept failed: {exc.strerror}")
                return
            s.setblocking(False)
            try:
                pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            except OSError:
                s.close()
                continue
            allowed, why = self._peer_allowed(pid, uid, gid)
            st = _proc_stat(pid) if pid > 0 else None
            conn = Conn(s, pid, uid, gid, st[1] if st else None, allowed, why)
            self.conns[s.fileno()] = conn
            self.sel.register(s, selectors.EVENT_READ, lambda _m, c=conn: self._on_readable(c))

    def _peer_allowed(self, pid: int, uid: int, gid: int) -> Tuple[bool, str]:
        if uid == 0 or uid == self.my_uid or uid in self.cfg.allow_uids:
            return True, ""
        if self.cfg.allow_gids and ({gid} | _supplementary_groups(pid)) & set(self.cfg.allow_gids):
            return True, ""
        return False, (
            f"uid {uid} (pid {pid}) may not attach: the driver's policy allows "
            f"uids {sorted({0, self.my_uid, *self.cfg.allow_uids})} and gids {sorted(self.cfg.allow_gids)}"
        )

    def _schedule_close(self, conn: Conn, why: str) -> None:
        if not conn.closed and not conn.closing:
            conn.closing = True
            self.pending_close.append((conn, why))

    def _flush_closes(self) -> None:
        while self.pending_close:
            conn, why = self.pending_close.pop(0)
            self._close_conn(conn, why)

    def _close_conn(self, conn: Conn, why: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
        if conn.leases:
            self.log(f"connection of {conn.label()} closed: {why}")
        for lid in sorted(conn.leases):
            lease = self.leases.get(lid)
            if lease is not None:
                self._end_lease(lease, P.RevokeReason.REVOKED, why)

    def _on_readable(self, conn: Conn) -> None:
        for _ in range(READS_PER_WAKEUP):
            if conn.closed or conn.closing:
                return
            try:
                data, _anc, flags, _addr = conn.sock.recvmsg(P.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:  # closed with our messages unread
                self._schedule_close(conn, "connection closed by the client")
                return
            except OSError as exc:
                self._schedule_close(conn, f"receive failed: {exc.strerror}")
                return
            if not data and not flags & socket.MSG_TRUNC:
                self._schedule_close(conn, "connection closed by the client")
                return
            if flags & socket.MSG_TRUNC:
                hdr = P.peek_header(data)
                tid = hdr[1] if hdr and hdr[2] == P.DRIVER_SCHEMA_ID else None
                self._bad(conn, P.DecodeError(
                    P.Code.INVALID_PARAMS, f"message larger than {P.MAX_MESSAGE} bytes",
                    P.correlation_of(data), tid))
                continue
            self._on_packet(conn, data)

    def _bad(self, conn: Conn, err: P.DecodeError) -> None:
        conn.bad += 1
        self._reply_error(conn, err.code, err.message, err.correlation_id, err.template_id)
        if conn.bad >= MAX_BAD_MESSAGES:
            self.log(f"closing the connection of {conn.label()}: {conn.bad} malformed messages (last: {err.message})")
            self._schedule_close(conn, f"{conn.bad} malformed messages")

    def _on_packet(self, conn: Conn, data: bytes) -> None:
        if not conn.allowed:
            hdr = P.peek_header(data)
            tid = hdr[1] if hdr and hdr[2] == P.DRIVER_SCHEMA_ID else None
            self._reply_error(conn, P.Code.REJECTED, conn.refusal, P.correlation_of(data), tid)
            self.log(f"refused {conn.label()}: {conn.refusal}")
            self._schedule_close(conn, "not allowed by policy")
            return
        try:
            msg = P.decode(data)
        except P.DecodeError as err:
            self._bad(conn, err)
            return
        if isinstance(msg, P.AttachRequest):
            self._attach(conn, msg)
        elif isinstance(msg, P.DetachRequest):
            self._detach(conn, msg)
        elif isinstance(msg, P.LeaseKeepalive):
            self._keepalive(conn, msg)
        elif isinstance(msg, P.ConsumerRegister):
            self._register(conn, msg)
        elif isinstance(msg, P.SetControl):
            self._set_control(conn, msg)
        else:
            self._bad(conn, P.DecodeError(
                P.Code.INVALID_PARAMS, f"{P.message_name(msg)} is sent by the driver, not to it"))

    # ---- requests ----

    def _attach(self, conn: Conn, req: P.AttachRequest) -> None:
        role = _role_name(req.role)

        def refuse(code: P.Code, text: str) -> None:
            self._send(conn, P.AttachResponse(req.correlation_id, code, error_message=text))
            self.log(f"attach refused ({code.name}): stream {req.stream_id} {role} client {req.client_id} "
                     f"({conn.label()}): {text}")

        if req.client_id == 0 or req.client_id == P.U32_NULL:
            return refuse(P.Code.INVALID_PARAMS, f"clientId {req.client_id} is not valid")
        if req.role not in (P.Role.PRODUCER, P.Role.CONSUMER):
            return refuse(P.Code.INVALID_PARAMS, f"role {req.role} is neither PRODUCER (1) nor CONSUMER (2)")
        if req.stream_id == 0 or req.stream_id == P.U32_NULL:
            return refuse(P.Code.INVALID_PARAMS, f"streamId {req.stream_id} is not valid")
        if req.max_dims > MAX_DIMS and req.max_dims != P.U8_NULL:
            return refuse(P.Code.INVALID_PARAMS, f"maxDims {req.max_dims} exceeds this driver's {MAX_DIMS}")
        if req.require_hugepages not in (0, 1, P.U8_NULL):
            return refuse(P.Code.INVALID_PARAMS, f"requireHugepages {req.require_hugepages} is not a Bool")
        if req.publish_mode not in (1, 2, P.U8_NULL):
            return refuse(P.Code.UNSUPPORTED, f"publishMode {req.publish_mode} is not supported")
        if req.expected_layout_version not in (0, LAYOUT_VERSION):
            return refuse(P.Code.REJECTED, f"expectedLayoutVersion {req.expected_layout_version} does not match "
                          f"the stream's layout version {LAYOUT_VERSION}")
        if req.require_hugepages == 1:
            return refuse(P.Code.REJECTED, "requireHugepages: this driver provides no hugepage-backed regions")
        rule = self.cfg.rule_for(req.stream_id)
        if rule is None:
            return refuse(P.Code.REJECTED, f"no profile for stream {req.stream_id}")
        if req.role == P.Role.PRODUCER and rule.producer_uids and conn.uid not in rule.producer_uids:
            return refuse(P.Code.REJECTED, f"uid {conn.uid} may not produce stream {req.stream_id} "
                          f"(producer_uids {rule.producer_uids})")
        held = self.clients.get(req.client_id)
        if held is not None:
            other = self.leases[held]
            return refuse(P.Code.REJECTED, f"clientId {req.client_id} already holds lease {held} "
                          f"({_role_name(other.role)} of stream {other.stream_id})")
        st = self.streams.get(req.stream_id)
        if req.role == P.Role.PRODUCER and st is not None and st.producer is not None:
            prod = self.leases[st.producer]
            return refuse(P.Code.REJECTED, f"stream {req.stream_id} already has producer client {prod.client_id} "
                          f"(pid {prod.conn.pid})")
        mode = P.PublishMode.EXISTING_OR_CREATE if req.publish_mode == P.U8_NULL else req.publish_mode
        if mode == P.PublishMode.REQUIRE_EXISTING and (st is None or st.grant is None):
            return refuse(P.Code.REJECTED, f"stream {req.stream_id} is not provisioned (publishMode REQUIRE_EXISTING)")
        st = self._stream(req.stream_id, rule)
        bumped = False
        if req.role == P.Role.PRODUCER or not self._current(st):
            why = f"{role} client {req.client_id} attached" if req.role == P.Role.PRODUCER else "first attach"
            try:
                self._provision(st, why)
                bumped = True
            except FrameshmError as exc:
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return refuse(P.Code.REJECTED, text)
                return refuse(P.Code.INTERNAL_ERROR, f"cannot provision stream {req.stream_id}: {text}")
        g = st.grant
        now = _mono()
        lease = Lease(self.next_lease_id, req.stream_id, req.client_id, req.role, conn, now + self.expiry_ns)
        self.next_lease_id += 1
        self.leases[lease.lease_id] = lease
        self.clients[lease.client_id] = lease.lease_id
        conn.leases.add(lease.lease_id)
        st.leases.add(lease.lease_id)
        if req.role == P.Role.PRODUCER:
            st.producer = lease.lease_id
        self._send(conn, P.AttachResponse(
            correlation_id=req.correlation_id,
            code=P.Code.OK,
            lease_id=lease.lease_id,
            lease_expiry_ns=lease.expiry_ns,
            stream_id=g["stream_id"],
            epoch=g["epoch"],
            layout_version=g["layout_version"],
            header_nslots=g["header_nslots"],
            header_slot_bytes=g["header_slot_bytes"],
            max_dims=g["max_dims"],
            pools=[P.PoolInfo(p["pool_id"], p["nslots"], p["stride_bytes"], p["uri"]) for p in g["pools"]],
            header_uri=g["header_uri"],
        ), st.fds_for(req.role))
        self.log(f"attach: lease {lease.lease_id} stream {req.stream_id} {role} client {req.client_id} "
                 f"({conn.label()}) epoch {g['epoch']}")
        if bumped:
            self._announce(st)

    def _end_lease(self, lease: Lease, reason: P.RevokeReason, why: str) -> None:
        if self.leases.pop(lease.lease_id, None) is None:
            return
        if self.clients.get(lease.client_id) == lease.lease_id:
            del self.clients[lease.client_id]
        lease.conn.leases.discard(lease.lease_id)
        st = self.streams[lease.stream_id]
        st.leases.discard(lease.lease_id)
        self._free_entry(st, lease)
        notice = P.LeaseRevoked(_mono(), lease.lease_id, lease.stream_id, lease.client_id, lease.role, reason, why)
        targets = [lease.conn]
        if lease.role == P.Role.PRODUCER:
            st.producer = None
            targets += [c for c in self._holders(st) if c is not lease.conn]
        for c in targets:
            self._send(c, notice)
        word = {1: "detach", 2: "expiry", 3: "revoke"}[int(reason)]
        self.log(f"{word}: lease {lease.lease_id} stream {lease.stream_id} {_role_name(lease.role)} "
                 f"client {lease.client_id} ({lease.conn.label()}): {why}")
        if lease.role == P.Role.PRODUCER and self.stop_signal is None:
            self._bump(st, f"producer lease {lease.lease_id} ended: {reason.name}")

    def _detach(self, conn: Conn, req: P.DetachRequest) -> None:
        lease = self.leases.get(req.lease_id)
        if (lease is None or lease.conn is not conn or lease.stream_id != req.stream_id
                or lease.client_id != req.client_id or lease.role != req.role):
            self._send(conn, P.DetachResponse(req.correlation_id, P.Code.REJECTED,
                                              f"unknown lease {req.lease_id} (not active on this connection "
                                              f"for stream {req.stream_id} client {req.client_id} "
                                              f"{_role_name(req.role)})"))
            return
        self._end_lease(lease, P.RevokeReason.DETACHED, "detached by the client")
        self._send(conn, P.DetachResponse(req.correlation_id, P.Code.OK))

    # ---- the sealed control region, written for consumers (frameshm's extensions) ----

    def _sealed_lease(self, conn: Conn, corr: int, lease_id: int, stream_id: int, what: str):
        """The (lease, sealed stream) of one of conn's leases, or (None, None) after
        answering with the refusal."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.conn is not conn or lease.stream_id != stream_id:
            self._send(conn, P.ControlResponse(corr, P.Code.REJECTED, 0,
                                               f"{what}: unknown lease {lease_id} for stream {stream_id} "
                                               f"on this connection"))
            return None, None
        st = self.streams[lease.stream_id]
        if st.ctl_fd < 0:
            self._send(conn, P.ControlResponse(corr, P.Code.UNSUPPORTED, 0,
                                               f"{what}: stream {stream_id} uses the file transport, whose "
                                               f"clients write the control file themselves"))
            return None, None
        return lease, st

    def _free_entry(self, st: Stream, lease: Lease) -> None:
        if lease.entry is None or st.ctl_fd < 0:
            return
        idx, queue = lease.entry
        lease.entry = None
        if lease.conn.closed and _pid_alive(lease.conn.pid, lease.conn.pid_start):
            # The socket closed without a detach: the process is most likely exiting
            # (SIGKILL closes its files before it is a zombie) and its queue still exists.
            # Pruning (ours on every pid poll, the producer's) frees the entry and removes
            # the queue once the process is dead; freeing it now would leave the queue
            # named nowhere.
            return
        try:
            _core.driver_consumer_remove(st.ctl_fd, idx, lease.conn.pid, queue)
        except FrameshmError as exc:
            self.log(f"stream {st.stream_id}: cannot free consumer entry {idx}: {exc}")

    def _register(self, conn: Conn, req: P.ConsumerRegister) -> None:
        lease, st = self._sealed_lease(conn, req.correlation_id, req.lease_id, req.stream_id,
                                       "ShmConsumerRegister")
        if lease is None:
            return

        def refuse(code: P.Code, text: str, value: int = 0) -> None:
            self._send(conn, P.ControlResponse(req.correlation_id, code, value, text))
            self.log(f"consumer registration refused: stream {req.stream_id} lease {req.lease_id} "
                     f"({conn.label()}): {text}")

        if lease.role != P.Role.CONSUMER or lease.client_id != req.client_id:
            return refuse(P.Code.REJECTED, f"lease {req.lease_id} is not consumer client {req.client_id}'s")
        known = P.CONSUMER_FLAG_PROCESS_ALL | P.CONSUMER_FLAG_NO_QUEUE
        if req.flags & ~known:
            return refuse(P.Code.INVALID_PARAMS, f"unknown consumer flags {req.flags:#x}")
        # A re-registration (the consumer saw its entry gone, or re-attached) replaces
        # the lease's entry: one entry per lease.
        self._free_entry(st, lease)
        if conn.uid != self.my_uid:
            held = sum(1 for lid in st.leases if self.leases[lid].entry is not None
                       and self.leases[lid].conn.uid == conn.uid)
            if held >= MAX_ENTRIES_PER_UID:
                return refuse(P.Code.REJECTED, f"uid {conn.uid} already holds {held} consumer entries of "
                              f"stream {req.stream_id} (at most {MAX_ENTRIES_PER_UID} per user)", LIMIT_CODE)
        try:
            idx = _core.driver_consumer_add(
                st.ctl_fd, conn.pid, req.consumer_name, req.queue_name,
                no_queue=bool(req.flags & P.CONSUMER_FLAG_NO_QUEUE),
                process_all=bool(req.flags & P.CONSUMER_FLAG_PROCESS_ALL), max_rate_hz=req.max_rate_hz)
        except FrameshmError as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return refuse(P.Code.REJECTED, text, LIMIT_CODE if isinstance(exc, ResourceLimit) else 0)
        lease.entry = (idx, req.queue_name)
        self._send(conn, P.ControlResponse(req.correlation_id, P.Code.OK, idx))

    def _set_control(self, conn: Conn, req: P.SetControl) -> None:
        lease, st = self._sealed_lease(conn, req.correlation_id, req.lease_id, req.stream_id, "ShmSetControl")
        if lease is None:
            return
        if conn.uid != self.my_uid and not st.rule.may_control(conn.uid):
            allowed = st.rule.control_uids or st.rule.producer_uids
            text = f"uid {conn.uid} may not set stream {req.stream_id}'s control bytes (uids {allowed})"
            self.log(f"set control refused ({conn.label()}): {text}")
            self._send(conn, P.ControlResponse(req.correlation_id, P.Code.REJECTED, 0, text))
            return
        try:
            _core.driver_set_control(st.ctl_fd, req.index, req.value)
        except FrameshmError as exc:
            self._send(conn, P.ControlResponse(req.correlation_id, P.Code.INVALID_PARAMS, 0, str(exc)))
            return
        self._send(conn, P.ControlResponse(req.correlation_id, P.Code.OK, 0))

    def _keepalive(self, conn: Conn, ka: P.LeaseKeepalive) -> None:
        lease = self.leases.get(ka.lease_id)
        if (lease is not None and lease.conn is conn and lease.stream_id == ka.stream_id
                and lease.client_id == ka.client_id and lease.role == ka.role):
            lease.expiry_ns = _mono() + self.expiry_ns
            return
        self._send(conn, P.LeaseRevoked(_mono(), ka.lease_id, ka.stream_id, ka.client_id, ka.role & 0xFF,
                                        P.RevokeReason.REVOKED, f"unknown lease {ka.lease_id}"))

    # ---- timers ----

    def _next_expiry(self) -> Optional[int]:
        return min((l.expiry_ns for l in self.leases.values()), default=None)

    def _drain(self) -> None:
        """Handles whatever is already readable (without waiting)."""
        for key, mask in self.sel.select(0):
            key.data(mask)
        self._flush_closes()

    def _expire(self) -> None:
        nxt = self._next_expiry()
        if nxt is None or nxt > _mono():
            return
        # Keepalives may be waiting in sockets (a long provisioning held the loop):
        # read them before expiring anyone.
        self._drain()
        now = _mono()
        for lease in sorted(self.leases.values(), key=lambda l: l.lease_id):
            if lease.lease_id in self.leases and lease.expiry_ns <= now:
                self._end_lease(lease, P.RevokeReason.EXPIRED,
                                f"no keepalive for {self.cfg.lease_expiry_ms} ms")

    def _poll_pids(self) -> None:
        for conn in list(self.conns.values()):
            if conn.leases and not _pid_alive(conn.pid, conn.pid_start):
                self._schedule_close(conn, f"process {conn.pid} exited")
        # Sealed control regions: the entries of consumers that died (left by _free_entry,
        # or whose producer is not running to prune them) go, with their queues.
        for st in self.streams.values():
            if st.ctl_fd >= 0:
                try:
                    _core.driver_prune(st.ctl_fd)
                except FrameshmError as exc:
                    self.log(f"stream {st.stream_id}: cannot prune consumers: {exc}")

    def _announce_all(self) -> None:
        for sid in sorted(self.streams):
            st = self.streams[sid]
            if st.leases:
                self._announce(st)

    # ---- main loop ----

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _on_wake(self, _mask: int) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _loop(self) -> None:
        next_announce = _mono() + self.announce_ns
        next_pid_poll = _mono() + PID_POLL_NS
        while self.stop_signal is None:
            deadline = min(next_announce, next_pid_poll, self._next_expiry() or next_announce)
            timeout = max(0.0, (deadline - _mono()) / 1e9)
            for key, mask in self.sel.select(timeout):
                key.data(mask)
                if self.stop_signal is not None:
                    break
            self._flush_closes()
            if self.stop_signal is not None:
                break
            self._expire()
            now = _mono()
            if now >= next_pid_poll:
                self._poll_pids()
                next_pid_poll = now + PID_POLL_NS
            self._flush_closes()
            if now >= next_announce:
                self._announce_all()
                next_announce = now + self.announce_ns
            self._flush_closes()

    def _shutdown(self, reason: P.ShutdownReason, text: str) -> None:
        notice = P.DriverShutdown(_mono(), reason, text)
        for conn in list(self.conns.values()):
            self._send(conn, notice)
        for conn in list(self.conns.values()):
            conn.closed = True
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
        self.conns.clear()
        self.pending_close.clear()
        if self.cfg.cleanup_on_exit and self.cfg.transport == "file":
            for sid in sorted(self.streams):
                st = self.streams[sid]
                try:
                    if _core.driver_remove(sid, **self._addr(st.rule)):
                        self.log(f"removed stream {sid}")
                except FrameshmError as exc:
                    self.log(f"cannot remove stream {sid}: {exc}")
        for st in self.streams.values():
            st.close_all()
        self._close_listener()

    def _close_listener(self) -> None:
        if self.lsock is not None:
            try:
                self.sel.unregister(self.lsock)
            except (KeyError, ValueError):
                pass
            self.lsock.close()
            self.lsock = None
            try:
                st = os.stat(self.cfg.socket)
                if (st.st_dev, st.st_ino) == self.sock_ino:
                    os.unlink(self.cfg.socket)
            except OSError:
                pass
        # Leave nothing behind: the directories made for the socket go too, as long as
        # nothing else was put in them meanwhile (rmdir removes only empty ones).
        for d in self.made_dirs:
            try:
                os.rmdir(d)
            except OSError:
                break
        self.made_dirs = []

    def run(self) -> int:
        """Runs until SIGTERM/SIGINT; 0 after a graceful shutdown, 1 if it cannot start."""
        # From before the start-up: a stop request while the socket is being set up is
        # answered after it, by the ordinary shutdown (no half-made socket file left).
        old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            return self._run()
        finally:
            restore_handlers(old)

    def _run(self) -> int:
        try:
            self._check_socket_free()
            self._startup_bump()
            self._listen()
        except (DriverError, FrameshmError, OSError) as exc:
            self.log(f"cannot start: {exc}")
            self._close_listener()
            return 1
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.log(
            f"listening on {self.cfg.socket} (base {self.base_dir}, namespace {self.cfg.namespace}, "
            f"{len(self.cfg.streams)} stream rule(s), lease expiry {self.cfg.lease_expiry_ms} ms)"
        )
        rc = 0
        try:
            self._loop()
            name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
            self.log(f"shutting down ({name})")
            self._shutdown(P.ShutdownReason.NORMAL, f"driver shutting down ({name})")
        except BaseException as exc:  # an internal error still tells the clients
            self.log(f"internal error: {exc!r}; shutting down")
            self._shutdown(P.ShutdownReason.ERROR, f"driver internal error: {exc}")
            rc = 1
            if not isinstance(exc, Exception):
                raise
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self.sel.unregister(self._wake_r)
            self._wake_r.close()
            self._wake_w.close()
        self.log("stopped")
        return rc


def serve(cfg: DriverConfig, log: Optional[TextIO] = None) -> int:
    return Driver(cfg, log).run()
