"""The driver's sealed transport (`transport = "memfd"`, issue 14 items 2 and 8): a real
driver (root), a real producer (root) and a real consumer running as another user
(`nobody`, admitted through the socket's group), and a hostile `nobody` client that
speaks the driver protocol itself and gets the descriptors a consumer gets. It must not
be able to write the ring, the pools or the control region (mmap/mprotect PROT_WRITE,
re-opening through /proc/self/fd, write, ftruncate): consumers' entries and the control
bytes are written by the driver (ShmConsumerRegister, ShmSetControl), which refuses a
queue another process created and control bytes from a uid its policy does not name. As
an admitted producer of another stream it cannot resize its own regions either. Nothing
lies in the base directory to truncate. Meanwhile the producer and the consumer keep
running and every frame the consumer copies is the producer's. A second test runs
consumers and the pipeline's mode controller: entries appear when consumers attach and go
when they close or are SIGKILLed; the controller's mode reaches the stream through the
driver."""

from __future__ import annotations

import grp
import json
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from fshm_helpers import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as another user")

CONFIG = """
[driver]
socket = "{sock}"
base_dir = "{base}"
file_mode = 0o660
group = {gid}
transport = "memfd"
keepalive_interval_ms = 200
announce_interval_ms = 200

[policy]
allow_gids = [{gid}]

[profiles.p]
header_nslots = 8
pools = [{{pool_id = 1, stride_bytes = 4096}}, {{pool_id = 2, stride_bytes = 65536}}]

[[streams]]
ids = [1001]
profile = "p"
producer_uids = [0]

[[streams]]
ids = [1002]
profile = "p"
"""

# After the imports: root's Python installation may not be readable by nobody.
AS_NOBODY = "import os\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"

PRODUCER = """
import pathlib, sys, time
import numpy as np
import frameshm
w = frameshm.Writer(stream_id=1001, driver=sys.argv[1], shape=(4096,), dtype="uint8")
stop = pathlib.Path(sys.argv[2])
i = 0
print("ready", flush=True)
while not stop.exists():
    a = np.full(4096, i & 0xFF, np.uint8)
    a[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
    w.publish(a)
    i += 1
    time.sleep(0.004)
w.close()
print(i, flush=True)
"""

CONSUMER = """
import json, pathlib, sys
import numpy as np
import frameshm
{drop}
r = frameshm.Reader(stream_id=1001, driver=sys.argv[1], consumer="viewer")
stop, attacked = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
frames = bad = after = torn = 0
while not stop.exists():
    try:
        f = r.wait_latest(timeout=0.5)
    except frameshm.Timeout:
        continue
    a = np.array(f.array)
    if not f.valid():
        torn += 1
        continue
    seq = int(np.frombuffer(a[:8].tobytes(), np.uint64)[0])
    frames += 1
    bad += int(seq != f.seq or not (a[8:] == (seq & 0xFF)).all())
    after += attacked.exists()
    if frames == 1:
        print("reading", flush=True)
r.close()
print(json.dumps({"frames": frames, "bad": bad, "after": after, "torn": torn}), flush=True)
"""

HOSTILE = """
import array, ctypes, errno, fcntl, json, mmap, os, pathlib, socket, struct, sys
from frameshm.driver import protocol as P
{drop}

sock_path, base, viewer_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
held = []

def attach(stream_id, role, client_id):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sock_path)
    held.append(s)
    s.send(P.encode(P.AttachRequest(client_id, stream_id, client_id, role)))
    data, anc, _flags, _addr = s.recvmsg(P.MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
    fds = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", raw[: len(raw) - len(raw) % 4])
    return P.decode(data), fds

def err(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def mprotect_write(fd, size):
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return "mmap-failed"
    rc = libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE)
    e = ctypes.get_errno()
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return "ok" if rc == 0 else errno.errorcode.get(e, str(e))

def attacks(fd):
    size = os.fstat(fd).st_size
    return {
        "mmap_write": err(lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)),
        "mprotect_write": mprotect_write(fd, size),
        "reopen_rw": err(lambda: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))),
        "write": err(lambda: os.pwrite(fd, b"x" * 64, 4096)),
        "truncate": err(lambda: os.ftruncate(fd, 0)),
        "seals": fcntl.fcntl(fd, F_GET_SEALS),
    }

def request(s, msg):
    s.send(P.encode(msg))
    while True:  # announces and the like may come first
        m = P.decode(s.recv(P.MAX_MESSAGE))
        if isinstance(m, P.ControlResponse) and m.correlation_id == msg.correlation_id:
            return {"code": int(m.code), "value": m.value, "text": m.error_message}

def table(m):
    # ACTIVE consumer entries (state 2) of the control region mapped at m
    out = []
    for i in range(64):
        off = 4096 + 128 * i
        state, _flags, pid = struct.unpack_from("<IIQ", m, off)
        if state == 2:
            out.append({"index": i, "pid": pid, "name": m[off + 64:off + 96].rstrip(bytes(1)).decode()})
    return out

out = {}
resp, fds = attach(1001, P.Role.CONSUMER, 0x7001)
out["consumer"] = {"code": int(resp.code), "nfds": len(fds)}
ctl, regions = fds[0], fds[1:]
out["regions"] = [attacks(fd) for fd in regions]
# The control region as well: the consumer table, latest_seq, the producer's liveness and
# the control bytes are out of reach of every consumer.
out["ctl"] = attacks(ctl)
m = mmap.mmap(ctl, os.fstat(ctl).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
out["table_before"] = table(m)
s, lease = held[-1], resp.lease_id
# What it can still ask the driver for: a control byte (refused: producer_uids = [0]
# and no control_uids), an entry naming a queue of another process (the viewer's pid),
# and an entry of its own.
out["set_control"] = request(s, P.SetControl(11, lease, 1001, 0, 0x5A))
forged = f"/fshm-{viewer_pid:x}-0-1"
out["forged_queue"] = request(s, P.ConsumerRegister(12, lease, 1001, 0x7001, 0, 0, "forged", forged))
out["own"] = request(s, P.ConsumerRegister(13, lease, 1001, 0x7001, P.CONSUMER_FLAG_NO_QUEUE, 0, "hostile", ""))
out["again"] = request(s, P.ConsumerRegister(14, lease, 1001, 0x7001, P.CONSUMER_FLAG_NO_QUEUE, 0, "hostile", ""))
out["table_after"] = table(m)
# Filling the table: one user's consumers (the viewer, the entry above, and more leases)
# hold at most 16 of the 64 entries; the rest stays for others.
fill = []
for i in range(16):
    r, _fds = attach(1001, P.Role.CONSUMER, 0x7200 + i)
    for fd in _fds:
        os.close(fd)
    fill.append(request(held[-1], P.ConsumerRegister(20 + i, r.lease_id, 1001, 0x7200 + i,
                                                      P.CONSUMER_FLAG_NO_QUEUE, 0, f"fill{i}", "")))
out["fill"] = [(f["code"], f["value"]) for f in fill]
out["control0"] = m[120]
out["me"] = os.getpid()
resp, fds = attach(1001, P.Role.PRODUCER, 0x7002)
out["producer_1001"] = {"code": int(resp.code), "nfds": len(fds)}
resp, fds = attach(1002, P.Role.PRODUCER, 0x7003)
out["producer_1002"] = {"code": int(resp.code), "nfds": len(fds),
                        "truncate": [err(lambda fd=fd: os.ftruncate(fd, 0)) for fd in fds],
                        "grow": [err(lambda fd=fd: os.ftruncate(fd, os.fstat(fd).st_size + 4096)) for fd in fds],
                        "writable": [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR for fd in fds]}
out["files"] = sorted(str(p) for p in pathlib.Path(base).rglob("*")
                      if p.name in ("frameshm.ctl", "header.ring") or p.name.endswith(".pool"))
print(json.dumps(out))
"""


@pytest.fixture
def shared_dir():
    """A directory another user can reach (pytest's tmp_path is root's 0700)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="frameshm-sealed-"))
    d.chmod(0o755)
    (d / "shm").mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(base):
    env = dict(os.environ, FRAMESHM_DIR=str(base))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env


def _python(code, *args, env, as_nobody=None, **kw):
    code = textwrap.dedent(code).replace("{drop}", AS_NOBODY.format(**as_nobody) if as_nobody else "")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class _Sealed:
    """The driver a test runs on CONFIG, and the clients it starts through :meth:`start`."""

    def __init__(self, shared_dir):
        nobody = pwd.getpwnam("nobody")
        self.gid = nobody.pw_gid
        self.ids = {"uid": nobody.pw_uid, "gid": self.gid}
        self.dir = shared_dir
        self.base, self.sock, self.stop = shared_dir / "shm", shared_dir / "driver.sock", shared_dir / "stop"
        self.env = _env(self.base)
        self.procs = []
        self.driver = None

    def log(self):
        return (self.dir / "driver.log").read_text()

    def start(self, code, *args, as_nobody=False, **kw):
        """A Python client (as nobody if `as_nobody`), killed at teardown if still running."""
        p = _python(code, *args, env=self.env, as_nobody=self.ids if as_nobody else None, **kw)
        self.procs.append(p)
        return p

    def start_producer(self):
        """PRODUCER (root) on stream 1001, once it is publishing."""
        p = self.start(PRODUCER, self.sock, self.stop)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        return p


@pytest.fixture
def sealed(shared_dir):
    """`frameshm driver` (root) on CONFIG in shared_dir; at teardown every client still
    running is killed, the driver is stopped with SIGTERM and must exit 0."""
    s = _Sealed(shared_dir)
    config = shared_dir / "driver.toml"
    config.write_text(CONFIG.format(sock=s.sock, base=s.base, gid=s.gid))
    log = open(shared_dir / "driver.log", "wb")
    s.driver = subprocess.Popen([sys.executable, "-m", "frameshm", "driver", "--config", str(config)],
                                env=s.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: s.sock.exists() or s.driver.poll() is not None, 15, what="driver socket")
        assert s.driver.poll() is None, s.log()
        yield s
    finally:
        s.stop.touch()
        for p in s.procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        if s.driver.poll() is None:
            s.driver.send_signal(signal.SIGTERM)
        rc = s.driver.wait(timeout=15)
        log.close()
    assert rc == 0, s.log()


def test_another_user_cannot_write_or_resize_sealed_regions(sealed, shared_dir):
    assert grp.getgrgid(sealed.gid)  # the socket's group: nobody's own
    attacked = shared_dir / "attacked"
    producer = sealed.start_producer()
    consumer = sealed.start(CONSUMER, sealed.sock, sealed.stop, attacked, as_nobody=True)
    assert consumer.stdout.readline().strip() == "reading", consumer.stderr.read()

    epochs_1001 = lambda: sealed.log().count("stream 1001 now at epoch")
    before = epochs_1001()
    hostile = sealed.start(HOSTILE, sealed.sock, sealed.base, consumer.pid, as_nobody=True)
    out, errs = hostile.communicate(timeout=60)
    assert hostile.returncode == 0, errs
    res = json.loads(out)
    attacked.touch()

    assert res["consumer"] == {"code": 0, "nfds": 4}  # control region, ring, two pools
    for r in res["regions"]:
        # Read-only descriptions: no writable mapping, now or later, no write, no
        # truncation; mode 0600 keeps /proc/self/fd from re-opening them writable.
        assert r["mmap_write"] == "EACCES" and r["mprotect_write"] == "EACCES", r
        assert r["reopen_rw"] == "EACCES" and r["write"] == "EBADF", r
        assert r["truncate"] in ("EINVAL", "EBADF"), r
        assert r["seals"] & 0x7 == 0x7, r  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
    # The control region likewise (read-only description), and its size is sealed.
    c = res["ctl"]
    assert c["mmap_write"] == "EACCES" and c["mprotect_write"] == "EACCES", c
    assert c["reopen_rw"] == "EACCES" and c["write"] == "EBADF", c
    assert c["truncate"] in ("EINVAL", "EBADF") and c["seals"] & 0x7 == 0x7, c
    # The viewer's entry, written by the driver with the viewer's own pid.
    assert [(e["name"], e["pid"]) for e in res["table_before"]] == [("viewer", consumer.pid)], res
    assert res["set_control"]["code"] == 3 and "control bytes" in res["set_control"]["text"], res
    assert res["control0"] == 0, res
    assert res["forged_queue"]["code"] == 3, res  # a queue named for the viewer's pid
    # Its own entry: one per lease (registering again replaces it), with its pid.
    assert res["own"]["code"] == 0 and res["again"]["code"] == 0, res
    mine = [e for e in res["table_after"] if e["name"] == "hostile"]
    assert mine == [{"index": res["again"]["value"], "pid": res["me"], "name": "hostile"}], res
    assert [e for e in res["table_after"] if e["name"] == "viewer"] == res["table_before"], res
    # nobody's viewer and hostile entry, then 14 more: 16, and no further.
    assert [code for code, _index in res["fill"][:14]] == [0] * 14, res["fill"]
    assert res["fill"][14:] == [[3, -1004]] * 2, res["fill"]
    assert res["producer_1001"] == {"code": 3, "nfds": 0}  # REJECTED by producer_uids
    p2 = res["producer_1002"]
    assert p2["code"] == 0 and p2["nfds"] == 4 and all(p2["writable"]), p2
    assert p2["truncate"] == ["EPERM"] * 4 and p2["grow"] == ["EPERM"] * 4, p2
    assert res["files"] == []  # nothing in the base directory to truncate or write

    # Both kept running: the consumer still gets the producer's frames, all intact.
    time.sleep(1.0)  # frames after the attacks
    assert producer.poll() is None and consumer.poll() is None
    # The hostile client's requests moved nobody: no re-attach, so no new epoch of 1001.
    assert epochs_1001() == before, sealed.log()
    sealed.stop.touch()
    pout, perr = producer.communicate(timeout=30)
    cout, cerr = consumer.communicate(timeout=30)
    assert producer.returncode == 0, perr
    assert consumer.returncode == 0, cerr
    stats = json.loads(cout.strip().splitlines()[-1])
    assert stats["bad"] == 0 and stats["after"] >= 5, stats
    assert sealed.driver.poll() is None


# A nobody client that maps the control region the way consumers get it (read-only) and
# prints its consumer table and control bytes on every line it reads.
INSPECTOR = """
import array, json, mmap, os, socket, struct, sys
from frameshm.driver import protocol as P
{drop}
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.send(P.encode(P.AttachRequest(0x7101, 1001, 0x7101, P.Role.CONSUMER)))
data, anc, _f, _a = s.recvmsg(P.MAX_MESSAGE, socket.CMSG_SPACE(16 * 4))
fds = []
for level, kind, raw in anc:
    fds += array.array("i", raw[: len(raw) - len(raw) % 4])
m = mmap.mmap(fds[0], os.fstat(fds[0]).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
for _line in sys.stdin:
    entries, queues = [], {}
    for i in range(64):
        off = 4096 + 128 * i
        state, _flags, pid = struct.unpack_from("<IIQ", m, off)
        if state != 0:
            name = m[off + 64:off + 96].rstrip(bytes(1)).decode()
            entries.append([name, pid, state])
            queues[name] = m[off + 96:off + 128].rstrip(bytes(1)).decode()
    print(json.dumps({"entries": sorted(entries), "queues": queues, "control": list(m[120:128])}), flush=True)
"""

VIEWER = """
import json, pathlib, sys
import frameshm
{drop}
r = frameshm.Reader(stream_id=1001, driver=sys.argv[1], consumer=sys.argv[3])
stop = pathlib.Path(sys.argv[2])
first = True
while not stop.exists():
    try:
        r.wait_latest(timeout=0.5)
    except frameshm.Timeout:
        continue
    if first:
        # How the library mapped the stream: every memfd region, the control region
        # included, readable and shared, never writable.
        maps = {}
        for line in open("/proc/self/maps"):
            if "/memfd:fshm-" in line:
                maps[line.split("/memfd:")[1].split()[0]] = line.split()[1]
        print("reading", json.dumps(maps), flush=True)
        first = False
r.close()
print("closed", flush=True)
"""

# The pipeline's controller: a Reader that does not subscribe, and roles.mode, as
# frameshm.roles.controller does.
CONTROLLER = """
import sys
import frameshm
from frameshm.roles import mode
{drop}
r = frameshm.Reader(stream_id=1001, driver=sys.argv[1], subscribe=False)
try:
    mode.write_state(r, "Tracking")
    mode.write_mode(r, mode.MODE_ALARMED)
    print("ok", mode.read_mode(r), mode.read_state(r), flush=True)
except frameshm.FrameshmError as e:
    print(type(e).__name__, mode.read_mode(r), flush=True)
r.close()
"""


def _queue_exists(name):
    """Whether POSIX message queue `name` exists (we are root: any user's)."""
    import ctypes
    import errno

    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    rt.mq_open.restype = ctypes.c_int
    rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    fd = rt.mq_open(name.encode(), os.O_RDONLY)
    if fd >= 0:
        rt.mq_close(fd)
        return True
    assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())
    return False


def test_driver_registers_consumers_frees_their_entries_and_sets_the_mode(sealed):
    sock, stop = sealed.sock, sealed.stop
    producer = sealed.start_producer()
    viewers = {name: sealed.start(VIEWER, sock, stop, name, as_nobody=True) for name in ("a", "b")}
    for v in viewers.values():
        word, _, maps = v.stdout.readline().partition(" ")
        assert word == "reading", v.stderr.read()
        maps = json.loads(maps)
        assert "fshm-1001-frameshm.ctl" in maps and "fshm-header.ring" in maps, maps
        assert set(maps.values()) == {"r--s"}, maps
    inspector = sealed.start(INSPECTOR, sock, as_nobody=True, stdin=subprocess.PIPE)

    def look():
        inspector.stdin.write("\n")
        inspector.stdin.flush()
        line = inspector.stdout.readline()
        assert line, inspector.stderr.read()
        return json.loads(line)

    ACTIVE = 2
    want = sorted([["a", viewers["a"].pid, ACTIVE], ["b", viewers["b"].pid, ACTIVE]])
    first = look()
    assert first["entries"] == want
    queues = first["queues"]
    assert all(_queue_exists(q) for q in queues.values()), queues

    # A nobody controller is refused (producer_uids = [0]: only root may steer 1001);
    # root's, the pipeline's, sets the mode and the state through the driver. Both
    # register nothing (passive) and leave the table as it was.
    c = sealed.start(CONTROLLER, sock, as_nobody=True)
    out, err = c.communicate(timeout=60)
    assert out.split() == ["DriverRejected", "0"], (out, err)
    c = sealed.start(CONTROLLER, sock)
    out, err = c.communicate(timeout=60)
    assert out.split() == ["ok", "1", "Tracking"], (out, err)
    state = look()
    assert state["control"][:2] == [1, 3] and state["entries"] == want, state

    # A viewer SIGKILLed: the driver sees its socket close and, once the process is
    # dead, frees its entry and removes its queue (the driver runs as root here).
    viewers["a"].kill()
    viewers["a"].wait()
    wait_until(lambda: look()["entries"] == want[1:], 30, what="the killed viewer's entry freed")
    assert not _queue_exists(queues["a"]) and _queue_exists(queues["b"]), queues
    # A third viewer attaches, then every viewer closes cleanly: the table empties.
    v = sealed.start(VIEWER, sock, stop, "c", as_nobody=True)
    assert v.stdout.readline().startswith("reading "), v.stderr.read()
    assert [e[0] for e in look()["entries"]] == ["b", "c"]
    stop.touch()
    for v in (viewers["b"], v):
        vout, verr = v.communicate(timeout=30)
        assert v.returncode == 0 and "closed" in vout, verr
    wait_until(lambda: look()["entries"] == [], 30, what="the closed viewers' entries freed")
    assert not _queue_exists(queues["b"]), queues
    pout, perr = producer.communicate(timeout=30)
    assert producer.returncode == 0, perr
