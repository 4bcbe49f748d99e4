"""The deterministic fake V4L2 device of the C tests (tests/c/fake_v4l2.c) as a shared
library for Python tests, and a ctypes handle on its controls.

    so = build()                               # compiled once per source version
    os.environ["FRAMESHM_V4L2_BACKEND"] = so   # test-only hook: cameras opened from now on
    fake = FakeV4L2(so)                        # the same library instance (dlopen dedups)
    fake.configure("path=/dev/video0 formats=GREY:64x48@100 gone_after=20 gone_ms=300")
    frameshm.Camera("/dev/video0", format="GRAY8")
    fake.unplug("/dev/video0"); fake.stats("/dev/video0")["dqbufs"]

In a child process, set FRAMESHM_V4L2_BACKEND and FSHM_FAKE_V4L2 (a device spec) in its
environment instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [os.path.join(ROOT, "tests", "c", "fake_v4l2.c"), os.path.join(ROOT, "tests", "c", "fake_v4l2.h"),
           os.path.join(ROOT, "devices", "fshm_v4l2.h"), os.path.join(ROOT, "lib", "include", "frameshm", "frameshm.h")]


def build() -> str:
    """Path of libfshm_fakev4l2.so, compiled into a per-user cache keyed by its sources."""
    h = hashlib.sha1()
    for p in SOURCES:
        with open(p, "rb") as f:
            h.update(f.read())
    d = os.path.join(os.environ.get("FRAMESHM_HARNESS_BUILD") or
                     os.path.join(tempfile.gettempdir(), f"frameshm-harness-{os.getuid()}"), "fake-" + h.hexdigest()[:12])
    out = os.path.join(d, "libfshm_fakev4l2.so")
    if not os.path.exists(out):
        os.makedirs(d, exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
        r = subprocess.run([cc, "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-fPIC", "-shared",
                            "-I", os.path.join(ROOT, "devices"), "-I", os.path.join(ROOT, "lib", "include"), SOURCES[0], "-o", tmp, "-pthread"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building the fake V4L2 backend failed:\n{r.stderr}")
        os.replace(tmp, out)
    return out


class _Stats(ctypes.Structure):
    _fields_ = [("exists", ctypes.c_int), ("open_fds", ctypes.c_int), ("mapped", ctypes.c_int),
                ("queued", ctypes.c_int), ("streaming", ctypes.c_int), ("gone", ctypes.c_int),
                ("nbuffers", ctypes.c_uint32), ("requested", ctypes.c_uint32), ("fps_num", ctypes.c_uint32),
                ("fps_den", ctypes.c_uint32), ("bytesperline", ctypes.c_uint32), ("frames_made", ctypes.c_uint64),
                ("frames_dropped", ctypes.c_uint64), ("dqbufs", ctypes.c_uint64), ("s_parm_calls", ctypes.c_uint64),
                ("streamons", ctypes.c_uint64)]


class FakeV4L2:
    """Controls of the fake device library loaded in this process."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.fake_v4l2_configure.argtypes = [ctypes.c_char_p]
        self.lib.fake_v4l2_unplug.argtypes = [ctypes.c_char_p]
        self.lib.fake_v4l2_replug.argtypes = [ctypes.c_char_p]
        self.lib.fake_v4l2_get_stats.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Stats)]

    def configure(self, spec: str) -> None:
        rc = self.lib.fake_v4l2_configure(spec.encode())
        if rc:
            raise ValueError(f"bad fake device spec {spec!r} ({rc})")

    def reset(self) -> None:
        self.lib.fake_v4l2_reset()

    def unplug(self, path: str = "/dev/video0") -> None:
        self.lib.fake_v4l2_unplug(path.encode())

    def replug(self, path: str = "/dev/video0") -> None:
        self.lib.fake_v4l2_replug(path.encode())

    def stats(self, path: str = "/dev/video0") -> dict:
        s = _Stats()
        self.lib.fake_v4l2_get_stats(path.encode(), ctypes.byref(s))
        return {name: getattr(s, name) for name, _ in _Stats._fields_}

    def live_mappings(self) -> int:
        return self.lib.fake_v4l2_live_mappings()
