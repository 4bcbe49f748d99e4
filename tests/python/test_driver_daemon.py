"""The driver as a real process (`python -m frameshm driver --config ...`), spoken to with
raw SOCK_SEQPACKET sockets and the protocol module: attach rules, leases, keepalive
expiry, epoch bumps and announces, hostile input, restarts, shutdown, footprint limits,
policy, and the seed configuration. docs/driver-protocol.md is the reference.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from frameshm import _core
from frameshm.driver import config as C
from frameshm.driver import protocol as P
from fshm_helpers import child_env, mounted_tmpfs, stream_dirs, tmpfs_room, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEED = ROOT / "docs" / "examples" / "driver_camera_example.toml"
SMALL = ROOT / "docs" / "examples" / "driver_camera_small.toml"
KA_MS = 100          # the expiry tests: leases expire after 300 ms without keepalives
MISSED = 3
DEF_KA_MS = 200      # every other test: 5 s, so that a loaded machine never expires a lease
DEF_MISSED = 25      # the test did not mean to let go
CTL_BYTES = 4096 + 64 * 128
MAGIC = 0x544F504C53484D31

PROFILES = """
[profiles.small]
header_nslots = 8
pools = [{pool_id = 1, stride_bytes = 4096}, {pool_id = 2, stride_bytes = 65536}]

[profiles.other]
header_nslots = 4
pools = [{pool_id = 3, stride_bytes = 1024}]

[profiles.huge]
header_nslots = 16777216
pools = [{pool_id = 1, stride_bytes = 2147483648}]

[profiles.seedraw]
header_nslots = 1024
pools = [{pool_id = 1, stride_bytes = 1048576}, {pool_id = 2, stride_bytes = 4194304}]

[[streams]]
id_range = [1001, 1003]
profile = "small"

[[streams]]
id = 2001
profile = "other"

[[streams]]
name = "cam-named"
profile = "other"

[[streams]]
id = 9000
profile = "huge"

[[streams]]
id = 9001
profile = "seedraw"

[[streams]]
id = 4000
profile = "small"
producer_uids = [4242]
"""


def config_text(sock: str, base: str, extra_driver: str = "", extra: str = PROFILES, ka_ms: int = DEF_KA_MS,
                missed: int = DEF_MISSED, announce_ms: int = 200, file_mode: str = "0o600",
                cleanup: bool = True) -> str:
    lines = [
        "[driver]",
        f'socket = "{sock}"',
        f'base_dir = "{base}"',
        'namespace = "default"',
        f"file_mode = {file_mode}",
        f"keepalive_interval_ms = {ka_ms}",
        f"lease_expiry_missed = {missed}",
        f"announce_interval_ms = {announce_ms}",
        f"cleanup_on_exit = {'true' if cleanup else 'false'}",
    ]
    return "\n".join(lines) + "\n" + extra_driver + "\n" + extra


class DriverProc:
    """`python -m frameshm driver` in a subprocess; its stderr lines are collected."""

    def __init__(self, cfg_path: pathlib.Path, sock: str, env=None):
        self.cfg_path = cfg_path
        self.sock = sock
        self.env = env
        self.proc = None
        self.lines = []

    def start(self, expect_ok: bool = True) -> "DriverProc":
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "frameshm", "driver", "--config", str(self.cfg_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=self.env or child_env(),
        )
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        if expect_ok:
            wait_until(lambda: any("listening on" in l for l in self.lines) or self.proc.poll() is not None,
                       20, what="driver start")
            assert self.proc.poll() is None, self.text()
        return self

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10) -> str:
        rx = re.compile(pattern)
        return wait_until(lambda: next((l for l in self.lines if rx.search(l)), None), timeout,
                          what=f"driver log {pattern!r}; log:\n{self.text()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._t.join(timeout=5)
        return rc

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Client:
    """A raw control connection."""

    corr = 100

    def __init__(self, sock: str):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.connect(sock)
        self.pending = []
        self._stops = []

    def close(self):
        for ev in self._stops:
            ev.set()
        self.s.close()

    def keep_alive(self, resp: P.AttachResponse, client_id, role) -> None:
        """Keepalives from a background thread until close()."""
        stop = threading.Event()

        def run():
            while not stop.wait(KA_MS / 1000):
                try:
                    self.keepalive(resp, client_id, role)
                except OSError:
                    return

        threading.Thread(target=run, daemon=True).start()
        self._stops.append(stop)

    def send(self, msg) -> None:
        self.send_raw(P.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.s.send(data)

    def recv(self, timeout: float = 5.0):
        """Next message (decoded), or None on EOF."""
        if self.pending:
            return self.pending.pop(0)
        self.s.settimeout(timeout)
        data = self.s.recv(P.MAX_MESSAGE)
        if not data:
            return None
        return P.decode(data)

    def expect(self, cls, timeout: float = 5.0, pred=lambda m: True, skip_announces: bool = True):
        """First message of type cls matching pred; announces are skipped (other messages
        are kept for later)."""
        deadline = time.monotonic() + timeout
        kept = []
        try:
            for i, m in enumerate(self.pending):
                if isinstance(m, cls) and pred(m):
                    del self.pending[i]
                    return m
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {cls.__name__} within {timeout}s; got {kept}")
                self.s.settimeout(left)
                try:
                    data = self.s.recv(P.MAX_MESSAGE)
                except socket.timeout:
                    raise AssertionError(f"no {cls.__name__} within {timeout}s; got {kept}") from None
                if not data:
                    raise AssertionError(f"connection closed while waiting for {cls.__name__}; got {kept}")
                m = P.decode(data)
                if isinstance(m, cls) and pred(m):
                    return m
                if not (skip_announces and isinstance(m, P.PoolAnnounce)):
                    kept.append(m)
        finally:
            self.pending.extend(kept)

    def attach(self, stream_id, client_id, role=P.Role.PRODUCER, mode=P.PublishMode.EXISTING_OR_CREATE,
               layout=0, max_dims=8, hugepages=0) -> P.AttachResponse:
        Client.corr += 1
        corr = Client.corr
        self.send(P.AttachRequest(corr, stream_id, client_id, role, layout, max_dims, mode, hugepages))
        return self.expect(P.AttachResponse, pred=lambda m: m.correlation_id == corr)

    def detach(self, resp: P.AttachResponse, client_id, role) -> P.DetachResponse:
        Client.corr += 1
        corr = Client.corr
        self.send(P.DetachRequest(corr, resp.lease_id, resp.stream_id, client_id, role))
        return self.expect(P.DetachResponse, pred=lambda m: m.correlation_id == corr)

    def keepalive(self, resp: P.AttachResponse, client_id, role) -> None:
        self.send(P.LeaseKeepalive(resp.lease_id, resp.stream_id, client_id, role, time.monotonic_ns()))

    def eof(self, timeout: float = 5.0) -> bool:
        """True once the driver closed the connection (messages before that are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.s.recv(P.MAX_MESSAGE):
                    return True
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
        return False


@pytest.fixture
def sockdir():
    # sun_path is 108 bytes: pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="fshm-drv-", dir="/tmp")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_driver(tmp_path, sockdir, shm_base):
    drivers = []

    def _make(text: str = None, env=None, start: bool = True, **kw) -> DriverProc:
        sock = str(sockdir / "driver.sock")
        cfg = tmp_path / f"driver{len(drivers)}.toml"
        cfg.write_text(text if text is not None else config_text(sock, str(shm_base), **kw))
        d = DriverProc(cfg, sock, env)
        drivers.append(d)
        return d.start() if start else d

    yield _make
    for d in drivers:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
    # Nothing may be left: a SIGKILLed driver's streams are removed here, with the
    # namespace and user directories they emptied (a clean stop removes those itself,
    # which conftest checks).
    for p in stream_dirs(shm_base):
        shutil.rmtree(p, ignore_errors=True)
        for d in (p.parent, p.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break


@pytest.fixture
def driver(make_driver):
    d = make_driver()
    yield d
    if d.alive:
        assert d.stop() == 0, d.text()


def read_superblock(path: str) -> tuple:
    with open(path, "rb") as f:
        b = f.read(64)
    return struct.unpack_from("<QIQIhHIIIQQQ", b)


def uri_path(uri: str) -> str:
    assert uri.startswith("shm:file?path=")
    return uri[len("shm:file?path="):]


def check_regions(resp: P.AttachResponse, base: pathlib.Path, nslots: int, pools) -> None:
    """Every granted URI names a regular file, canonical and inside the base directory,
    whose superblock matches the grant (as a client validates it)."""
    base = os.path.realpath(base)
    paths = [(uri_path(resp.header_uri), 1, 0, 256)] + [
        (uri_path(p.uri), 2, p.pool_id, p.stride_bytes) for p in resp.pools]
    for path, rtype, pool_id, stride in paths:
        assert os.path.isabs(path) and os.path.realpath(path) == path
        assert path.startswith(base + "/")
        st = os.lstat(path)
        assert os.path.stat.S_ISREG(st.st_mode)
        assert st.st_size == 64 + nslots * stride
        sb = read_superblock(path)
        assert sb[0] == MAGIC and sb[1] == 1
        assert (sb[2], sb[3], sb[4], sb[5], sb[6], sb[7], sb[8]) == (
            resp.epoch, resp.stream_id, rtype, pool_id, nslots, stride, stride)
    assert [(p.pool_id, p.nslots, p.stride_bytes) for p in resp.pools] == [(i, nslots, s) for i, s in pools]
    assert os.path.dirname(uri_path(resp.header_uri)).endswith(f"/{resp.stream_id}/{resp.epoch}")


def current_epoch(base, sid, **kw) -> int:
    return _core.driver_current_epoch(sid, base_dir=str(base), **kw)


# ---- attach ---------------------------------------------------------------------------------


def test_attach_grants_driver_created_regions(driver, shm_base):
    c = Client(driver.sock)
    t0 = time.monotonic_ns()
    r = c.attach(1001, 77)
    assert r.code == P.Code.OK, r.error_message
    assert r.lease_id == 1
    assert (r.stream_id, r.epoch, r.layout_version, r.header_nslots, r.header_slot_bytes, r.max_dims) == (
        1001, 1, 1, 8, 256, 8)
    expiry = DEF_KA_MS * DEF_MISSED * 10**6
    assert t0 + expiry <= r.lease_expiry_ns <= time.monotonic_ns() + expiry
    check_regions(r, shm_base, 8, [(1, 4096), (2, 65536)])
    assert current_epoch(shm_base, 1001) == 1
    # The control region announces the same files; nobody produced yet.
    info = _core.stream_info(stream_id=1001)
    assert info["epoch"] == 1 and info["producer"] == "none" and info["nslots"] == 8
    # The epoch change is announced, naming the producer.
    a = c.expect(P.PoolAnnounce, skip_announces=False)
    assert (a.stream_id, a.producer_id, a.epoch, a.clock_domain, a.header_uri) == (1001, 77, 1, 1, r.header_uri)
    assert a.pools == r.pools
    driver.wait_log(r"attach: lease 1 stream 1001 producer client 77")

    # A consumer sees the same epoch (consumers do not bump); a named stream lives in its
    # id's directory and its control region carries the name.
    cons = Client(driver.sock)
    rc = cons.attach(1001, 78, P.Role.CONSUMER)
    assert rc.code == P.Code.OK and rc.epoch == 1 and rc.lease_id == 2 and rc.header_uri == r.header_uri
    sid = _core.stream_id_for_name("cam-named")
    rn = cons.attach(sid, 79, P.Role.CONSUMER)
    assert rn.code == P.Code.OK, rn.error_message
    check_regions(rn, shm_base, 4, [(3, 1024)])
    assert _core.stream_info("cam-named")["name"] == "cam-named"

    # Detach: OK, the producer's own revoke notice (DETACHED), an epoch bump announced to
    # the stream's other lease holder.
    d = c.detach(r, 77, P.Role.PRODUCER)
    assert d.code == P.Code.OK
    rv = c.expect(P.LeaseRevoked)
    assert (rv.lease_id, rv.reason, rv.role) == (1, P.RevokeReason.DETACHED, P.Role.PRODUCER)
    rv = cons.expect(P.LeaseRevoked, pred=lambda m: m.lease_id == 1)
    assert rv.reason == P.RevokeReason.DETACHED
    a = cons.expect(P.PoolAnnounce, pred=lambda m: m.stream_id == 1001 and m.epoch == 2, skip_announces=False)
    assert a.producer_id == 0
    assert current_epoch(shm_base, 1001) == 2
    assert not os.path.exists(os.path.dirname(uri_path(r.header_uri)))  # old epoch removed
    # Detaching again: unknown lease.
    assert c.detach(r, 77, P.Role.PRODUCER).code == P.Code.REJECTED
    driver.wait_log(r"detach: lease 1 stream 1001 producer")
    driver.wait_log(r"epoch: stream 1001 now at epoch 2")
    c.close()
    cons.close()


def test_attach_rules(driver, shm_base):
    p = Client(driver.sock)
    r1 = p.attach(1001, 10)
    assert r1.code == P.Code.OK
    # One producer per stream.
    q = Client(driver.sock)
    r = q.attach(1001, 11)
    assert r.code == P.Code.REJECTED
    assert r.error_message == f"stream 1001 already has producer client 10 (pid {os.getpid()})"
    assert (r.lease_id, r.epoch, r.stream_id, r.header_uri, r.pools) == (2**64 - 1, 2**64 - 1, 2**32 - 1, "", [])
    # A clientId with an active lease cannot attach again (any role, any stream).
    r = q.attach(1002, 10, P.Role.CONSUMER)
    assert r.code == P.Code.REJECTED and "clientId 10 already holds lease" in r.error_message
    # No rule, no profile.
    r = q.attach(7, 12)
    assert r.code == P.Code.REJECTED and r.error_message == "no profile for stream 7"
    # REQUIRE_EXISTING on a stream never provisioned; after an EXISTING_OR_CREATE attach it works.
    r = q.attach(1002, 13, P.Role.CONSUMER, mode=P.PublishMode.REQUIRE_EXISTING)
    assert r.code == P.Code.REJECTED and "not provisioned" in r.error_message
    assert not (pathlib.Path(_core.namespace_dir(str(shm_base))) / "1002").exists()
    r = q.attach(1002, 14, P.Role.CONSUMER, mode=255)  # null publishMode = EXISTING_OR_CREATE
    assert r.code == P.Code.OK
    r = q.attach(1002, 15, P.Role.PRODUCER, mode=P.PublishMode.REQUIRE_EXISTING)
    assert r.code == P.Code.OK and r.epoch == 2  # a producer bumps
    # Parameter validation (spec §4.3).
    cases = [
        (dict(stream_id=1003, client_id=0), P.Code.INVALID_PARAMS, "clientId 0"),
        (dict(stream_id=1003, client_id=20, role=3), P.Code.INVALID_PARAMS, "role 3"),
        (dict(stream_id=1003, client_id=20, max_dims=9), P.Code.INVALID_PARAMS, "maxDims 9"),
        (dict(stream_id=1003, client_id=20, mode=7), P.Code.UNSUPPORTED, "publishMode 7"),
        (dict(stream_id=1003, client_id=20, hugepages=1), P.Code.REJECTED, "hugepage"),
        (dict(stream_id=1003, client_id=20, hugepages=5), P.Code.INVALID_PARAMS, "requireHugepages"),
        (dict(stream_id=1003, client_id=20, layout=2), P.Code.REJECTED, "expectedLayoutVersion 2"),
        (dict(stream_id=0, client_id=20), P.Code.INVALID_PARAMS, "streamId 0"),
        (dict(stream_id=4000, client_id=20), P.Code.REJECTED, "may not produce stream 4000"),
    ]
    for kw, code, text in cases:
        r = q.attach(**kw)
        assert r.code == code and text in r.error_message, (kw, r)
    assert not (pathlib.Path(_core.namespace_dir(str(shm_base))) / "1003").exists()
    r = q.attach(1003, 21, layout=1, max_dims=4)
    assert r.code == P.Code.OK and r.max_dims == 8
    r = q.attach(4000, 22, P.Role.CONSUMER)  # producer_uids limits producers only
    assert r.code == P.Code.OK
    # Lease ids only grow, never reused: detach and attach again.
    assert q.detach(r, 22, P.Role.CONSUMER).code == P.Code.OK
    r2 = q.attach(4000, 22, P.Role.CONSUMER)
    assert r2.code == P.Code.OK and r2.lease_id > r.lease_id
    # The driver logs an attach after answering it, and a thread of ours collects the
    # lines: on a loaded machine they can lag the answers. They come in order.
    driver.wait_log(rf"attach: lease {r2.lease_id} ")
    ids = [int(m.group(1)) for m in map(re.compile(r"attach: lease (\d+)").search, driver.lines) if m]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == 1
    p.close()
    q.close()


def test_keepalive_extends_and_expiry_revokes(make_driver, shm_base):
    driver = make_driver(ka_ms=KA_MS, missed=MISSED)
    c = Client(driver.sock)
    r = c.attach(1001, 31, P.Role.CONSUMER)
    assert r.code == P.Code.OK
    deadline = time.monotonic() + 4 * KA_MS * MISSED / 1000
    while time.monotonic() < deadline:  # well past one expiry period
        c.keepalive(r, 31, P.Role.CONSUMER)
        time.sleep(KA_MS / 1000)
    # Still alive: a second attach with the same clientId is refused.
    other = Client(driver.sock)
    assert other.attach(1002, 31, P.Role.CONSUMER).code == P.Code.REJECTED
    # A keepalive for a lease this connection does not hold does not extend it.
    other.send(P.LeaseKeepalive(r.lease_id, 1001, 31, P.Role.CONSUMER, 0))
    rv = other.expect(P.LeaseRevoked)
    assert rv.reason == P.RevokeReason.REVOKED and rv.error_message == f"unknown lease {r.lease_id}"
    other.send(P.LeaseKeepalive(999, 1001, 31, P.Role.CONSUMER, 0))
    assert other.expect(P.LeaseRevoked).error_message == "unknown lease 999"
    # Stop: expired after interval x missed.
    t0 = time.monotonic()
    rv = c.expect(P.LeaseRevoked, timeout=5)
    waited = time.monotonic() - t0
    assert (rv.lease_id, rv.reason) == (r.lease_id, P.RevokeReason.EXPIRED)
    assert waited < 2.0
    assert "no keepalive for 300 ms" in rv.error_message
    # Its keepalives are now answered with "unknown lease"; the client id is free again.
    c.keepalive(r, 31, P.Role.CONSUMER)
    assert c.expect(P.LeaseRevoked).error_message == f"unknown lease {r.lease_id}"
    assert other.attach(1002, 31, P.Role.CONSUMER).code == P.Code.OK
    driver.wait_log(rf"expiry: lease {r.lease_id} stream 1001 consumer")
    c.close()
    other.close()
    assert driver.stop() == 0


PRODUCER_CHILD = r'''
import os, socket, sys, threading, time
sys.path.insert(0, {root!r})
from frameshm.driver import protocol as P
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({sock!r})
s.send(P.encode(P.AttachRequest(1, {sid}, {cid}, 1, 0, 8, 2, 0)))
while True:
    m = P.decode(s.recv(4096))
    if isinstance(m, P.AttachResponse):
        break
assert m.code == 0, m
def keepalive():
    while True:
        s.send(P.encode(P.LeaseKeepalive(m.lease_id, {sid}, {cid}, 1, time.monotonic_ns())))
        time.sleep({ka})
threading.Thread(target=keepalive, daemon=True).start()
if {fork}:
    pid = os.fork()
    if pid == 0:  # the grandchild keeps the connection open after its parent is gone
        time.sleep(60)
        os._exit(0)
    print("GRANDCHILD", pid, flush=True)
print("READY", m.lease_id, m.epoch, flush=True)
if {fork}:
    os._exit(0)
time.sleep(60)
'''


def spawn_producer(sock, sid, cid, fork=False):
    code = PRODUCER_CHILD.format(root=str(ROOT), sock=sock, sid=sid, cid=cid, ka=KA_MS / 1000, fork=fork)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=child_env())
    grandchild = None
    while True:
        line = proc.stdout.readline()
        assert line, "producer child exited early"
        if line.startswith("GRANDCHILD"):
            grandchild = int(line.split()[1])
        if line.startswith("READY"):
            _, lease, epoch = line.split()
            return proc, int(lease), int(epoch), grandchild


def test_stopped_producer_expires_and_epoch_bumps(make_driver, shm_base):
    driver = make_driver(ka_ms=KA_MS, missed=5)
    cons = Client(driver.sock)
    rc = cons.attach(1001, 41, P.Role.CONSUMER)
    assert rc.code == P.Code.OK and rc.epoch == 1
    cons.keep_alive(rc, 41, P.Role.CONSUMER)
    proc, lease, epoch, _ = spawn_producer(driver.sock, 1001, 42)
    try:
        assert epoch == 2
        cons.expect(P.PoolAnnounce, pred=lambda m: m.epoch == 2 and m.producer_id == 42, skip_announces=False)
        time.sleep(3 * KA_MS * 5 / 1000)  # keepalives keep it
        assert current_epoch(shm_base, 1001) == 2
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        rv = cons.expect(P.LeaseRevoked, timeout=5, pred=lambda m: m.lease_id == lease)
        assert rv.reason == P.RevokeReason.EXPIRED and rv.role == P.Role.PRODUCER and rv.client_id == 42
        a = cons.expect(P.PoolAnnounce, timeout=5, pred=lambda m: m.epoch > 2, skip_announces=False)
        assert a.epoch == 3 and a.producer_id == 0
        assert time.monotonic() - t0 < 3
        assert current_epoch(shm_base, 1001) == 3
        # The stream has no producer now: a new one may attach (and bumps again).
        p2 = Client(driver.sock)
        r2 = p2.attach(1001, 43)
        assert r2.code == P.Code.OK and r2.epoch == 4
        p2.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=10)
    cons.close()
    assert driver.stop() == 0


def test_producer_gone_revokes_and_bumps(driver, shm_base):
    cons = Client(driver.sock)
    rc = cons.attach(1001, 51, P.Role.CONSUMER)
    assert rc.code == P.Code.OK
    cons.keep_alive(rc, 51, P.Role.CONSUMER)
    # Connection closed.
    p = Client(driver.sock)
    r = p.attach(1001, 52)
    assert r.code == P.Code.OK and r.epoch == 2
    p.close()
    rv = cons.expect(P.LeaseRevoked, pred=lambda m: m.lease_id == r.lease_id)
    assert rv.reason == P.RevokeReason.REVOKED and "connection closed" in rv.error_message
    cons.expect(P.PoolAnnounce, pred=lambda m: m.epoch == 3, skip_announces=False)
    cons.close()


def test_dead_pid_with_open_connection(make_driver, shm_base):
    """Long expiry (3 s): only the 0.5 s pid poll can end the lease this quickly."""
    d = make_driver(ka_ms=1000, missed=3)
    cons = Client(d.sock)
    rc = cons.attach(1001, 61, P.Role.CONSUMER)
    assert rc.code == P.Code.OK
    cons.keep_alive(rc, 61, P.Role.CONSUMER)
    # The child keeps sending keepalives from its keepalive thread only until it exits;
    # the forked grandchild (sleeping) holds the connection open but sends nothing.
    proc, lease, epoch, grandchild = spawn_producer(d.sock, 1001, 62, fork=True)
    try:
        t0 = time.monotonic()
        rv = cons.expect(P.LeaseRevoked, timeout=5, pred=lambda m: m.lease_id == lease)
        assert rv.reason == P.RevokeReason.REVOKED
        assert rv.error_message == f"process {proc.pid} exited"
        assert time.monotonic() - t0 < 2.5
    finally:
        proc.wait(timeout=10)
        os.kill(grandchild, signal.SIGKILL)
    cons.close()
    assert d.stop() == 0


# ---- hostile input ----------------------------------------------------------------------------


def test_malformed_messages_answered_and_survived(driver, shm_base):
    c = Client(driver.sock)
    good = P.encode(P.AttachRequest(4242, 1001, 71, 2, 0, 8, 2, 0))

    def answer(data, cls=P.AttachResponse):
        c.send_raw(data)
        return c.expect(cls)

    r = answer(b"garbage")
    assert (r.correlation_id, r.code) == (0, P.Code.INVALID_PARAMS)
    r = answer(b"\x00" * 3000)
    assert r.code == P.Code.UNSUPPORTED and "schemaId 0" in r.error_message
    r = answer(good + b"\x00" * 5000)  # oversized: truncated by the 4096-byte receive
    assert (r.correlation_id, r.code) == (4242, P.Code.INVALID_PARAMS) and "larger than 4096" in r.error_message
    r = answer(struct.pack("<HHHH", 24, 1, 999, 1) + good[8:])
    assert (r.correlation_id, r.code) == (0, P.Code.UNSUPPORTED)
    r = answer(struct.pack("<HHHH", 24, 1, 901, 7) + good[8:])
    assert (r.correlation_id, r.code) == (4242, P.Code.UNSUPPORTED)
    r = answer(struct.pack("<HHHH", 16, 1, 901, 1) + good[8:24])
    assert (r.correlation_id, r.code) == (4242, P.Code.INVALID_PARAMS)
    r = answer(good[:20])
    assert (r.correlation_id, r.code) == (4242, P.Code.INVALID_PARAMS)
    r = answer(struct.pack("<HHHH", 24, 42, 901, 1) + good[8:])
    assert r.code == P.Code.UNSUPPORTED
    d = answer(P.encode(P.DetachRequest(555, 1, 2, 3, 1))[:20], P.DetachResponse)
    assert (d.correlation_id, d.code) == (555, P.Code.INVALID_PARAMS)
    r = answer(P.encode(P.PoolAnnounce(1001, 0, 1, 1, 1, 8, 256, [], "shm:file?path=/x")))
    assert r.code == P.Code.INVALID_PARAMS and "ShmPoolAnnounce is sent by the driver" in r.error_message
    # A longer block (forward compatible) is served normally.
    r = answer(struct.pack("<HHHH", 32, 1, 901, 1) + good[8:] + b"\x01" * 8)
    assert (r.correlation_id, r.code) == (4242, P.Code.OK), r.error_message
    # 10 malformed so far: six more and the connection is closed.
    for _ in range(6):
        c.send_raw(b"\xff" * 9)
    assert c.eof()
    # The driver lives on and serves others; the closed connection's lease ended.
    c2 = Client(driver.sock)
    assert c2.attach(1001, 71, P.Role.CONSUMER).code == P.Code.OK
    assert driver.alive
    c2.close()


def test_garbage_flood_from_many_connections(driver):
    import random

    rnd = random.Random(7)
    conns = [Client(driver.sock) for _ in range(8)]
    for i in range(400):
        c = conns[i % len(conns)]
        n = rnd.choice([0, 1, 7, 8, 9, 24, 32, 33, 100, 4096])
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        if n >= 8 and rnd.random() < 0.5:  # a plausible header with garbage behind
            data = struct.pack("<HHHH", rnd.choice([0, 24, 25, 65535]), rnd.randint(0, 8), 901, 1) + data[8:]
        try:
            c.send_raw(data)
        except OSError:
            conns[i % len(conns)] = Client(driver.sock)  # closed after 16 bad messages
    for c in conns:
        c.close()
    c = Client(driver.sock)
    r = c.attach(1001, 81)
    assert r.code == P.Code.OK and driver.alive
    c.close()


def test_client_not_reading_is_disconnected(driver):
    c = Client(driver.sock)
    r = c.attach(1001, 91, P.Role.CONSUMER)
    assert r.code == P.Code.OK
    c.s.setblocking(False)
    sent = 0
    try:  # every unknown-lease keepalive is answered; never read the answers
        for _ in range(20000):
            c.send(P.LeaseKeepalive(12345, 1001, 91, 2, 0))
            sent += 1
    except OSError:  # our send buffer is full, or the driver already hung up
        pass
    other = Client(driver.sock)
    t0 = time.monotonic()
    assert other.attach(1002, 92, P.Role.CONSUMER).code == P.Code.OK
    assert time.monotonic() - t0 < 2
    driver.wait_log(r"closed: it does not read its socket", timeout=10)
    assert c.eof(timeout=10)
    other.close()
    c.close()


# ---- restart and shutdown ---------------------------------------------------------------------


def test_killed_driver_restart_bumps_epochs(make_driver, shm_base):
    d = make_driver()
    p = Client(d.sock)
    r = p.attach(1001, 101)
    assert r.code == P.Code.OK
    p.keep_alive(r, 101, P.Role.PRODUCER)
    sid = _core.stream_id_for_name("cam-named")
    assert p.attach(sid, 102, P.Role.CONSUMER).code == P.Code.OK
    before = current_epoch(shm_base, 1001)
    # A second driver on the same socket refuses to start.
    d2 = make_driver(start=False)
    d2.start(expect_ok=False)
    assert d2.proc.wait(timeout=20) == 1
    assert any("another driver is already listening" in l for l in d2.lines), d2.text()
    d.stop(signal.SIGKILL)
    assert p.eof()  # the connection died with the driver
    p.close()
    assert os.path.exists(d.sock)  # a stale socket file
    d3 = make_driver(start=False)
    d3.start()
    d3.wait_log(r"removed stale socket")
    d3.wait_log(r"epoch: stream 1001 now at epoch 2 \(driver restart \(was epoch 1\)\)")
    assert current_epoch(shm_base, 1001) == before + 1
    assert current_epoch(shm_base, sid, name="cam-named") == 2
    c = Client(d3.sock)
    # Provisioned before the restart: REQUIRE_EXISTING works; consumers get the new epoch.
    rc = c.attach(1001, 103, P.Role.CONSUMER, mode=P.PublishMode.REQUIRE_EXISTING)
    assert rc.code == P.Code.OK and rc.epoch == before + 1 and rc.lease_id == 1
    rp = c.attach(1001, 104)
    assert rp.code == P.Code.OK and rp.epoch == before + 2
    c.close()
    assert d3.stop() == 0
    assert not stream_dirs(shm_base)


def test_startup_replaces_unreadable_control_region(make_driver, shm_base):
    ns = pathlib.Path(_core.namespace_dir(str(shm_base)))
    sdir = ns / "1002"
    (sdir / "5").mkdir(parents=True)
    (sdir / "frameshm.ctl").write_bytes(b"\xff" * CTL_BYTES)
    d = make_driver()
    d.wait_log(r"stream 1002: .*recreating it")
    assert current_epoch(shm_base, 1002) == 6
    assert sorted(p.name for p in sdir.iterdir()) == ["6", "frameshm.ctl"]
    assert d.stop() == 0
    assert not sdir.exists()


def test_sigterm_shutdown_notifies_and_cleans_up(make_driver, shm_base):
    d = make_driver()
    a = Client(d.sock)
    b = Client(d.sock)
    idle = Client(d.sock)  # no lease: still told
    assert a.attach(1001, 111).code == P.Code.OK
    assert b.attach(1001, 112, P.Role.CONSUMER).code == P.Code.OK
    assert b.attach(2001, 113, P.Role.CONSUMER).code == P.Code.OK
    assert len(stream_dirs(shm_base)) == 2
    d.proc.send_signal(signal.SIGTERM)
    for c in (a, b, idle):
        m = c.expect(P.DriverShutdown, timeout=10)
        assert m.reason == P.ShutdownReason.NORMAL and "SIGTERM" in m.error_message
        assert c.eof()
        c.close()
    # Wait for the exit this SIGTERM started: d.stop() would send a second one, which
    # kills a driver that has already put its handlers back and is still exiting (seen
    # on a loaded machine: rc -15 after a complete shutdown).
    assert d.proc.wait(timeout=30) == 0
    assert d.stop() == 0
    assert not stream_dirs(shm_base)
    assert not os.path.exists(d.sock)
    assert any("removed stream 1001" in l for l in d.lines)
    assert d.lines[-1].endswith("stopped")


def test_cleanup_on_exit_false_keeps_streams(make_driver, shm_base, sockdir):
    text = config_text(str(sockdir / "driver.sock"), str(shm_base), cleanup=False)
    d = make_driver(text)
    c = Client(d.sock)
    r = c.attach(1001, 121)
    assert r.code == P.Code.OK and r.epoch == 1
    assert d.stop() == 0  # with the producer still attached: shutdown does not bump
    c.close()
    assert len(stream_dirs(shm_base)) == 1
    d2 = make_driver(text)  # restart: bumps the kept stream before any lease
    d2.wait_log(r"stream 1001 now at epoch 2 \(driver restart \(was epoch 1\)\)")
    c = Client(d2.sock)
    r = c.attach(1001, 122, P.Role.CONSUMER, mode=P.PublishMode.REQUIRE_EXISTING)
    assert r.code == P.Code.OK and r.epoch == 2
    c.close()
    assert d2.stop() == 0
    assert _core.driver_remove(1001, base_dir=str(shm_base))


# ---- footprint ------------------------------------------------------------------------------


@pytest.fixture
def small_shm(tmp_path):
    """A 64 MiB tmpfs as the driver's base directory: the room check meets a real limit."""
    with mounted_tmpfs(tmp_path / "small-shm", "64m") as path:
        yield pathlib.Path(os.path.realpath(path))


def test_profile_too_big_is_refused_and_nothing_created(small_shm, make_driver, sockdir):
    MiB = 1 << 20
    assert os.statvfs(small_shm).f_bavail * os.statvfs(small_shm).f_frsize == 64 * MiB
    if tmpfs_room(small_shm) < 64 * MiB:
        pytest.skip("less than 64 MiB of memory available to back the tmpfs")
    d = make_driver(config_text(str(sockdir / "driver.sock"), str(small_shm)))
    c = Client(d.sock)
    r = c.attach(9000, 131)
    assert r.code == P.Code.REJECTED
    assert re.match(r"stream 9000 needs 32\.0 PiB \(profile footprint, \d+ bytes\) but .* has 64\.0 MiB free$",
                    r.error_message), r.error_message
    r = c.attach(9001, 132, P.Role.CONSUMER)
    assert r.code == P.Code.REJECTED
    assert r.error_message == (f"stream 9001 needs 5.0 GiB (profile footprint, 5368983744 bytes) but "
                               f"{small_shm} has 64.0 MiB free")
    assert not stream_dirs(small_shm)
    assert not list(small_shm.rglob("*.pool"))
    # The refusal costs nothing: other streams still attach.
    assert c.attach(1001, 133).code == P.Code.OK
    assert len(stream_dirs(small_shm)) == 1
    c.close()
    assert d.stop() == 0
    assert not stream_dirs(small_shm)


def test_shm_budget(make_driver, shm_base):
    small = C.Profile("s", 8, [(1, 4096), (2, 65536)]).footprint
    d = make_driver(extra_driver=f"shm_budget_bytes = {2 * small}")
    c = Client(d.sock)
    assert c.attach(1001, 141).code == P.Code.OK
    assert c.attach(1002, 142, P.Role.CONSUMER).code == P.Code.OK
    r = c.attach(1003, 143, P.Role.CONSUMER)
    assert r.code == P.Code.REJECTED and "shm_budget_bytes" in r.error_message
    assert r.error_message.startswith(f"stream 1003 needs {C.fmt_bytes(small)} (profile footprint, {small} bytes)")
    # A bump of a stream already held stays within the budget.
    assert c.attach(1002, 144).code == P.Code.OK
    c.close()
    assert d.stop() == 0


def test_seed_config_footprints():
    MiB = 1 << 20
    cfg = C.load(str(SEED))
    raw, proc = cfg.profiles["raw"], cfg.profiles["processed"]
    assert (raw.header_nslots, raw.pools) == (1024, [(1, 1 * MiB), (2, 4 * MiB)])
    assert (proc.header_nslots, proc.pools) == (512, [(1, 512 * 1024), (2, 2 * MiB)])
    assert raw.footprint == 64 + 1024 * 256 + 2 * 64 + 1024 * (1 * MiB + 4 * MiB) + CTL_BYTES == 5368983744
    assert proc.footprint == 64 + 512 * 256 + 2 * 64 + 512 * (512 * 1024 + 2 * MiB) + CTL_BYTES == 1342320832
    assert raw.footprint > 5 * 2**30
    assert [cfg.rule_for(i).profile for i in (1001, 1002, 1003, 2001, 2002, 2003)] == ["raw"] * 3 + ["processed"] * 3
    assert cfg.rule_for(1004) is None and cfg.rule_for(2004) is None
    assert cfg.file_mode == 0o660 and cfg.keepalive_interval_ms == 1000 and cfg.lease_expiry_missed == 3
    # Three cameras alone exceed half of a 24 GiB machine (tmpfs' default size).
    assert 3 * raw.footprint > 12 * 2**30
    assert 3 * raw.footprint + 3 * proc.footprint == 20133913728
    small = C.load(str(SMALL))
    assert [p.pools for p in small.profiles.values()] == [raw.pools, proc.pools]
    assert small.profiles["raw"].footprint == 64 + 16 * 256 + 2 * 64 + 16 * 5 * MiB + CTL_BYTES
    assert small.profiles["processed"].footprint == 64 + 16 * 256 + 2 * 64 + 16 * (512 * 1024 + 2 * MiB) + CTL_BYTES
    assert [(r.lo, r.hi, r.profile) for r in small.streams] == [(r.lo, r.hi, r.profile) for r in cfg.streams]


def test_check_output():
    out = subprocess.run([sys.executable, "-m", "frameshm", "driver", "--config", str(SEED), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "profile raw: 1024 header slots, pool 1: 1.0 MiB, pool 2: 4.0 MiB; footprint 5.0 GiB (5368983744 bytes)" in text
    assert "profile processed: 512 header slots, pool 1: 512.0 KiB, pool 2: 2.0 MiB; footprint 1.3 GiB (1342320832 bytes)" in text
    assert "streams 1001..1003 -> profile raw: 3 stream(s) x 5.0 GiB = 15.0 GiB" in text
    assert "streams 2001..2003 -> profile processed" in text
    assert "all configured streams at once: 18.8 GiB (20133913728 bytes)" in text
    assert re.search(r"room in /dev/shm now: .*: (fits|DOES NOT FIT)", text)
    out = subprocess.run([sys.executable, "-m", "frameshm.driver", "--config", str(SMALL), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "footprint 80.0 MiB (83902656 bytes)" in out.stdout


def test_driver_removes_the_socket_directories_it_made(tmp_path, sockdir, shm_base):
    """A clean stop leaves nothing: the socket, and the directories created for it."""
    sock = sockdir / "run" / "frameshm" / "driver.sock"
    cfg = tmp_path / "driver.toml"
    cfg.write_text(config_text(str(sock), str(shm_base)))
    d = DriverProc(cfg, str(sock)).start()
    assert sock.parent.is_dir()
    import numpy as np

    import frameshm

    with frameshm.Writer(stream_id=1001, driver=str(sock), shape=(8,)) as w:
        w.publish(np.zeros(8, np.uint8))
    assert d.stop() == 0, d.text()
    assert not (sockdir / "run").exists(), "the directories it made for its socket went with it"
    assert sockdir.is_dir(), "a directory that was there before stays"
    # Only the epoch ledger stays (docs/wire-format.md §1), so that epochs never go back.
    left = [p.name for p in shm_base.iterdir() if not p.name.startswith(".frameshm-epochs-")]
    assert left == [], "its streams went, with the directories above them"
    # A directory that is not empty at exit (someone else's file in it) stays.
    d = DriverProc(cfg, str(sock)).start()
    (sock.parent / "other").write_text("")
    assert d.stop() == 0, d.text()
    assert not sock.exists() and (sock.parent / "other").exists()


# ---- configuration and policy ---------------------------------------------------------------


def test_id_list_and_id_range_are_distinct_forms(tmp_path):
    """`ids` lists exactly its ids; `id_range` covers first..last; `id` one id."""
    p = tmp_path / "ids.toml"
    p.write_text(
        "[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
        "[[streams]]\nids = [1005, 1001, 1003]\nprofile = 'raw'\n"
        "[[streams]]\nid_range = [2001, 2003]\nprofile = 'raw'\n"
        "[[streams]]\nids = [3001, 3002]\nprofile = 'raw'\n"
        "[[streams]]\nids = [4000]\nprofile = 'raw'\n"
        "[[streams]]\nid = 1002\nprofile = 'raw'\n"
    )
    cfg = C.load(str(p))
    covered = {i for i in range(900, 5000) if cfg.rule_for(i) is not None}
    assert covered == {1001, 1002, 1003, 1005, 2001, 2002, 2003, 3001, 3002, 4000}
    assert cfg.rule_for(1002).index == 4 and cfg.rule_for(1003).index == 0
    assert [r.describe() for r in cfg.streams] == [
        "streams 1001, 1003, 1005 -> profile raw", "streams 2001..2003 -> profile raw",
        "streams 3001, 3002 -> profile raw", "stream 4000 -> profile raw", "stream 1002 -> profile raw"]
    report = C.check_report(cfg)
    assert "streams 1001, 1003, 1005 -> profile raw: 3 stream(s)" in report
    assert "streams 2001..2003 -> profile raw: 3 stream(s)" in report
    assert "stream 4000 -> profile raw: 1 stream(s)" in report


@pytest.mark.parametrize("body, message", [
    ("[driver]\nkeepalive_interval = 5\n", "unknown key 'keepalive_interval' (did you mean 'keepalive_interval_ms'?)"),
    ("[drivr]\n", "unknown table or key 'drivr' (did you mean 'driver'?)"),
    ("socket = '/x'\n", "(it belongs in [driver])"),
    ("[profiles.a]\nheader_nslots = 12\npools = [{pool_id = 1, stride_bytes = 64}]\n", "12 is not a power of two"),
    ("[profiles.a]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 100}]\n", "not a power-of-two multiple of 64"),
    ("[profiles.a]\nheader_nslots = 8\npools = [{pool_id = 1, stride = 64}]\n", "did you mean 'stride_bytes'?"),
    ("[profiles.a]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}, {pool_id = 1, stride_bytes = 128}]\n",
     "pool_id: 1 appears twice"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n[[streams]]\nid = 1\nprofile = 'rwa'\n",
     "no profile 'rwa' (did you mean 'raw'?)"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nid_range = [1, 10]\nprofile = 'raw'\n[[streams]]\nid = 5\nprofile = 'raw'\n", "overlaps #1"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nid_range = [1, 10]\nid = 3\nprofile = 'raw'\n", "exactly one of"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nids = [1, 3, 5]\nprofile = 'raw'\n[[streams]]\nid_range = [5, 9]\nprofile = 'raw'\n",
     "#2 (streams 5..9 -> profile raw) overlaps #1 (streams 1, 3, 5 -> profile raw)"),
    # frameshm 0.2 read `ids = [first, last]` as a range: that form is refused, never reread.
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nids = [1001, 1003]\nprofile = 'raw'\n",
     "ids = [1001, 1003] is ambiguous: frameshm 0.2 read it as the range 1001..1003. Write id_range = [1001, 1003]"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nid_range = [1, 2, 3]\nprofile = 'raw'\n", "id_range: expected [first, last], got [1, 2, 3]"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nid_range = [9, 3]\nprofile = 'raw'\n", "id_range: first 9 is above last 3"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nids = []\nprofile = 'raw'\n", "ids: expected at least one id"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nids = [4, 7, 4]\nprofile = 'raw'\n", "lists an id twice"),
    ("[profiles.raw]\nheader_nslots = 8\npools = [{pool_id = 1, stride_bytes = 64}]\n"
     "[[streams]]\nids = [1, 2]\nprofile = 'raw'\n[[streams]]\nids = [7, 2, 9]\nprofile = 'raw'\n", "overlaps #1"),
    ("[driver]\nsocket = 'relative.sock'\n", "must be an absolute path"),
    ("[driver]\ngroup = 'no-such-group-xyz'\n", "no group named 'no-such-group-xyz'"),
    ("[driver]\nfile_mode = 0o060\n", "must let the owner read and write"),
])
def test_config_errors(tmp_path, body, message):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(C.DriverConfigError) as ei:
        C.load(str(p))
    assert message in str(ei.value)
    assert str(p) in str(ei.value) or "no group" in str(ei.value)
    out = subprocess.run([sys.executable, "-m", "frameshm", "driver", "--config", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_policy_refuses_other_users(make_driver, sockdir, shm_base):
    os.chmod(sockdir, 0o755)
    d = make_driver(extra_driver="group = 65534", file_mode="0o660")
    st = os.stat(d.sock)
    assert st.st_gid == 65534 and st.st_mode & 0o777 == 0o660
    code = textwrap.dedent(f"""
        import os, socket, sys
        sys.path.insert(0, {str(ROOT)!r})
        from frameshm.driver import protocol as P
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({d.sock!r})
        s.send(P.encode(P.AttachRequest(5, 1001, 151, 2, 0, 8, 2, 0)))
        r = P.decode(s.recv(4096))
        print(r.correlation_id, r.code, r.error_message)
        print("EOF" if s.recv(4096) == b"" else "OPEN")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("5 3 uid 65534") and "may not attach" in first
    assert second == "EOF"
    assert not stream_dirs(shm_base)
    d.wait_log(r"refused pid \d+ uid 65534")
    assert d.stop() == 0
    # With the uid allowed, the same client attaches.
    d2 = make_driver(extra_driver="group = 65534", file_mode="0o660",
                     extra=PROFILES.replace("[profiles.small]", "[policy]\nallow_uids = [65534]\n\n[profiles.small]"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("5 0 ")
    # Group policy: region files and directories are the group's.
    ring = next(pathlib.Path(shm_base).rglob("header.ring"))
    assert ring.stat().st_gid == 65534 and ring.stat().st_mode & 0o777 == 0o660
    assert ring.parent.stat().st_mode & 0o7777 == 0o2770
    assert d2.stop() == 0
