"""Helpers shared by the frameshm Python tests (imported by conftest.py and the tests).

Nothing here mocks the library: streams, files, queues and processes are real.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import pathlib
import queue
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from typing import Callable, List, Optional

import numpy as np
import pytest

import frameshm
from frameshm import _core

# ---- wire-format offsets (docs/wire-format.md) -------------------------------------

SUPERBLOCK = 64
SLOT_BYTES = 256
MAGIC_OFF = 0                  # superblock and control region magic (u64)
SH_SEQ_COMMIT = 0
SH_VALUES_LEN = 8
SH_PAYLOAD_SLOT = 12
SH_POOL_ID = 16
SH_PAYLOAD_OFFSET = 18
SH_TIMESTAMP = 22
SH_HEADER_LEN = 60
SH_MSG_HEADER = 64
TH = 72                        # TensorHeader block, relative to the slot
TH_DTYPE = TH + 0
TH_MAJOR = TH + 2
TH_NDIMS = TH + 4
TH_PROGRESS_UNIT = TH + 6
TH_PROGRESS_STRIDE = TH + 7
TH_DIMS = TH + 11
TH_STRIDES = TH + 43
CTL_HEADER_URI = 208           # control region: announce block's header ring URI (512 bytes)
CTL_POOL0_URI = 720 + 16       # first pool entry's URI (496 bytes)
CTL_BYTES = 4096 + 64 * 128

ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 8, 8: 8, 9: 4, 10: 8, 11: 1, 13: 1}

SUPPORTED_DTYPES = [
    "uint8", "int8", "uint16", "int16", "uint32", "int32",
    "uint64", "int64", "float32", "float64", "bool",
]

# ---- paths -------------------------------------------------------------------------


def ns_dir(base_dir=None, namespace=None) -> pathlib.Path:
    return pathlib.Path(_core.namespace_dir(base_dir, namespace))


def stream_dir(name: str, base_dir=None, namespace=None) -> pathlib.Path:
    return ns_dir(base_dir, namespace) / str(_core.stream_id_for_name(name))


def epoch_dir(name: str, epoch: int) -> pathlib.Path:
    return stream_dir(name) / str(epoch)


def stream_dirs(base: pathlib.Path) -> List[pathlib.Path]:
    """Every stream directory under a base directory (any user, any namespace)."""
    out = []
    for user in base.glob("tensorpool-*"):
        for ns in user.iterdir():
            if ns.is_dir():
                out.extend(p for p in ns.iterdir() if p.name.isdigit())
    return sorted(out)


@contextlib.contextmanager
def mounted_tmpfs(path: pathlib.Path, size: str):
    """A real small file system for room checks: a fresh tmpfs of ``size`` (mount(8)
    syntax, e.g. "64m") mounted on ``path``, unmounted again however the test ends. Skips
    the test when it cannot be mounted (needs root or CAP_SYS_ADMIN)."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
        why = r.stderr.strip() if r.returncode else ""
    except OSError as exc:
        why = str(exc)
    if why:
        path.rmdir()
        pytest.skip(f"cannot mount a {size} tmpfs on {path} (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield path
    finally:
        # Detached: a driver or mapping a failed test left behind cannot keep it mounted.
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
        path.rmdir()


def tmpfs_room(path) -> int:
    """What the library counts as room on a tmpfs: its free space, but no more than the
    memory that can back it (MemAvailable + SwapFree)."""
    st = os.statvfs(path)
    mem = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            mem[key] = int(rest.split()[0]) * 1024
    return min(st.f_bavail * st.f_frsize, mem.get("MemAvailable", 0) + mem.get("SwapFree", 0))


def tree(path: pathlib.Path) -> List[str]:
    """Sorted relative paths of everything below `path` (for before/after comparisons)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- slot header surgery -----------------------------------------------------------


def slot_offset(slot: int) -> int:
    return SUPERBLOCK + slot * SLOT_BYTES


def read_slot(ring_path, slot: int) -> bytes:
    with open(ring_path, "rb") as f:
        f.seek(slot_offset(slot))
        return f.read(SLOT_BYTES)


def write_at(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def write_slot(ring_path, slot: int, data: bytes) -> None:
    assert len(data) == SLOT_BYTES
    write_at(ring_path, slot_offset(slot), data)


# ---- process / mapping accounting ---------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """This process's resident set (VmRSS), KiB: the leak checks' memory probe."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def maps_lines() -> List[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def mapped_paths_under(base) -> List[str]:
    base = os.path.realpath(str(base))
    return [line for line in maps_lines() if base in line]


# ---- POSIX message queues (leak checks) ---------------------------------------------

try:
    import posix_ipc  # type: ignore
except ImportError:  # pragma: no cover - the ctypes fallback
    posix_ipc = None

_librt = None


def _rt():
    global _librt
    if _librt is None:
        name = ctypes.util.find_library("rt") or "librt.so.1"
        _librt = ctypes.CDLL(name, use_errno=True)
        _librt.mq_open.restype = ctypes.c_int
        _librt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _librt.mq_close.argtypes = [ctypes.c_int]
        _librt.mq_unlink.argtypes = [ctypes.c_char_p]
    return _librt


def queue_exists_ctypes(name: str) -> bool:
    """mq_open(name, O_RDONLY) through librt: False when it fails with ENOENT."""
    rt = _rt()
    q = rt.mq_open(name.encode(), os.O_RDONLY)
    if q == -1:
        e = ctypes.get_errno()
        if e == errno.ENOENT:
            return False
        raise OSError(e, f"mq_open({name}): {os.strerror(e)}")
    rt.mq_close(q)
    return True


def queue_exists(name: str) -> bool:
    """True if the POSIX message queue `name` can be opened (it was not unlinked)."""
    if posix_ipc is None:
        return queue_exists_ctypes(name)
    try:
        q = posix_ipc.MessageQueue(name, flags=0, read=True, write=False)
    except posix_ipc.ExistentialError:
        return False
    q.close()
    return True


def create_queue(name: str) -> None:
    """mq_open(name, O_CREAT | O_EXCL) of an empty queue owned by us (closed again)."""
    rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
    q = rt.mq_open(name.encode(), os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600, None)
    if q == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"mq_open({name}): {os.strerror(e)}")
    rt.mq_close(q)


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, a process's
    identity (a pid alone is reused)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def unlink_queue(name: str) -> bool:
    """Removes a queue a test leaked on purpose (or a killed child left). True if it existed."""
    if posix_ipc is not None:
        try:
            posix_ipc.unlink_message_queue(name)
            return True
        except posix_ipc.ExistentialError:
            return False
    return _rt().mq_unlink(name.encode()) == 0


# ---- frames that carry their own seq and checksum ------------------------------------

FRAME_HDR = 16


def make_frame(seq: int, nbytes: int) -> np.ndarray:
    """uint8 frame: [seq u64][crc32 of payload u32][pad u32][payload]."""
    out = np.empty(nbytes, np.uint8)
    payload = (np.arange(nbytes - FRAME_HDR, dtype=np.uint32) * (seq % 251 + 1) + seq).astype(np.uint8)
    out[FRAME_HDR:] = payload
    out[:FRAME_HDR] = np.frombuffer(struct.pack("<QII", seq, zlib.crc32(payload.tobytes()), 0), np.uint8)
    return out


def frame_seq_ok(arr) -> Optional[int]:
    """The embedded seq if the checksum matches, else None."""
    b = np.asarray(arr).tobytes()
    seq, crc, _ = struct.unpack_from("<QII", b, 0)
    return seq if zlib.crc32(b[FRAME_HDR:]) == crc else None


# ---- polling -----------------------------------------------------------------------


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.01, what: str = "condition"):
    """Polls `pred` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def info_or_none(name: str):
    try:
        return frameshm.stream_info(name)
    except frameshm.StreamNotFound:
        return None


# ---- child processes -------------------------------------------------------------------

# Code every child runs first. say() prints a flushed line (the readiness protocol);
# stopped() turns True once the parent closes the child's stdin (Child.stop()).
CHILD_PRELUDE = r'''
import os, sys, time, json, signal, struct, threading, zlib
import numpy as np
import frameshm
sys.path.insert(0, %(tests_dir)r)
from fshm_helpers import make_frame, frame_seq_ok

def say(*parts):
    print(*parts, flush=True)

_stop = threading.Event()
def _watch_stdin():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    _stop.set()
threading.Thread(target=_watch_stdin, daemon=True).start()

def stopped():
    return _stop.is_set()

def announce_queue(reader):
    say("QUEUE", reader._r.queue_name)
''' % {"tests_dir": os.path.dirname(os.path.abspath(__file__))}


def child_env(extra=None) -> dict:
    env = dict(os.environ)
    assert "FRAMESHM_DIR" in env, "children must share the test's FRAMESHM_DIR"
    env.pop("FRAMESHM_NAMESPACE", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class Child:
    """A Python snippet running in a real subprocess. Lines it prints are read by a
    thread; expect() waits for one with a prefix, with a deadline."""

    _EOF = object()

    def __init__(self, code: str, env: Optional[dict] = None, label: str = "child"):
        self.label = label
        self.code = CHILD_PRELUDE + textwrap.dedent(code)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if env is not None else child_env(),
            text=True,
            bufsize=1,
        )
        self.queues: List[str] = []          # descriptor queues the child announced
        self.output: List[str] = []          # every stdout line
        self._lines: "queue.Queue" = queue.Queue()
        self._stderr: List[str] = []
        self._t_out = threading.Thread(target=self._pump_out, daemon=True)
        self._t_err = threading.Thread(target=self._pump_err, daemon=True)
        self._t_out.start()
        self._t_err.start()

    def _pump_out(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            if line.startswith("QUEUE "):
                self.queues.append(line.split(None, 1)[1])
            self._lines.put(line)
        self._lines.put(self._EOF)

    def _pump_err(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """Waits for a stdout line starting with `prefix`; returns the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.label}: no line starting with {prefix!r} within {timeout}s; "
                    f"stdout={self.output[-10:]!r} stderr={self.stderr[-3000:]}"
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is self._EOF:
                self._lines.put(self._EOF)
                rc = self.proc.wait(timeout=10)
                raise AssertionError(
                    f"{self.label} exited (rc={rc}) before printing {prefix!r}; "
                    f"stdout={self.output[-10:]!r} stderr={self.stderr[-3000:]}"
                )
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def expect_json(self, prefix: str = "RESULT", timeout: float = 20.0):
        import json

        return json.loads(self.expect(prefix, timeout))

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """Closes the child's stdin (stopped() turns True) and waits for it to exit."""
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        rc = self.proc.wait(timeout=timeout)
        self._t_out.join(timeout=5)
        self._t_err.join(timeout=5)
        return rc

    def kill(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=timeout)
        return rc

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._t_out.join(timeout=5)
        self._t_err.join(timeout=5)
        return rc

    def cleanup(self) -> None:
        """Teardown: SIGKILL if still running, reap, unlink the queues it announced."""
        try:
            self.kill(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck zombie
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except Exception:
                pass
        for q in self.queues:
            unlink_queue(q)


def run_snippet(code: str, timeout: float = 60.0, env: Optional[dict] = None):
    """Runs a snippet to completion in a subprocess; (returncode, stdout, stderr).
    The child is killed if it overruns `timeout`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else child_env(),
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=20)
        raise AssertionError(f"snippet overran {timeout}s; stdout={out[-2000:]!r} stderr={err[-3000:]}")
    for line in out.splitlines():
        if line.startswith("QUEUE "):
            unlink_queue(line.split(None, 1)[1])
    return proc.returncode, out, err


def describe_rc(rc: int) -> str:
    if rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def result_lines(out: str, prefix: str = "RESULT") -> List[str]:
    return [line[len(prefix):].strip() for line in out.splitlines() if line.startswith(prefix)]


# /fshm-<pid>-<start time>-<6 hex> (the owner in the name), or /fshm-<pid>-<8 hex> (a
# process without a readable start time; and every name frameshm 0.2 made).
_QUEUE_RE = re.compile(r"^/fshm-[0-9a-f]+-(?:[0-9a-f]+-[0-9a-f]{6}|[0-9a-f]{8})$")


def is_queue_name(name: str) -> bool:
    return bool(_QUEUE_RE.match(name))


def pipewire_harness_or_skip(harness, built_without: Optional[str] = None):
    """A private PipeWire + WirePlumber (tests/harness) to use in a ``with``; skips the test
    with the reason when the harness's packages are missing, or when ``built_without``
    (why this frameshm build cannot use it) is given."""
    import pytest

    missing = harness.missing_requirements()
    if missing:
        pytest.skip("PipeWire harness unavailable, missing: " + ", ".join(missing)
                    + " (bash scripts/setup.sh installs " + " ".join(harness.APT_PACKAGES) + ")")
    if built_without:
        pytest.skip(built_without)
    return harness.PipeWireHarness()
