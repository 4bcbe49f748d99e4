"""A V4L2 camera without kernel V4L2: private PipeWire + WirePlumber + a fake camera node,
reached through PipeWire's V4L2 emulation (``libpw-v4l2.so``, an LD_PRELOAD library).

Used by frameshm's tests and benchmarks; no dependency beyond the standard library.

    with PipeWireHarness() as pw:                 # pipewire + wireplumber, private runtime dir
        with pw.camera(["YUYV:640x480@30"]) as cam:   # a fresh fake camera (one per capture process)
            subprocess.run([...], env=cam.env())  # /dev/video0 is that camera under the preload

    python3 tests/harness/harness.py [--formats "YUYV:640x480@30 ..."] -- CMD ARGS...

Only processes started here are ever signalled (by pid), and each gets PR_SET_PDEATHSIG
(through util-linux's setpriv) so that a killed test run does not leave daemons behind. See README.md for what the emulation
does and does not do.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))

#: Debian packages the harness needs (scripts/setup.sh installs them).
APT_PACKAGES = ["pipewire", "pipewire-bin", "wireplumber", "pipewire-v4l2", "libpipewire-0.3-dev"]

DEFAULT_FORMATS = ["YUYV:640x480@30", "YUYV:320x240@15", "RGB3:640x480@30"]


class HarnessError(RuntimeError):
    """The harness could not start (the message carries the daemon's log)."""


def pw_v4l2_library() -> Optional[str]:
    found = sorted(glob.glob("/usr/lib/*/pipewire-0.3/v4l2/libpw-v4l2.so")) + sorted(
        glob.glob("/usr/lib/pipewire-0.3/v4l2/libpw-v4l2.so")
    )
    return found[0] if found else None


def missing_requirements() -> List[str]:
    """What is missing for the harness to run (empty list: everything is there)."""
    missing = []
    for exe in ("pipewire", "wireplumber", "pw-cli", "pkg-config"):
        if not shutil.which(exe):
            missing.append(exe)
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("cc")
    if pw_v4l2_library() is None:
        missing.append("libpw-v4l2.so (pipewire-v4l2)")
    if shutil.which("pkg-config") and subprocess.run(
        ["pkg-config", "--exists", "libpipewire-0.3"], capture_output=True
    ).returncode != 0:
        missing.append("libpipewire-0.3 development files (libpipewire-0.3-dev)")
    if not os.path.isdir("/usr/share/wireplumber"):
        missing.append("/usr/share/wireplumber")
    return missing


def _with_pdeathsig(argv: Sequence[str]) -> List[str]:
    """argv run so that the process gets SIGTERM when the one that started it dies (a
    killed test run leaves no daemons). util-linux's setpriv does the prctl between fork and
    exec; a preexec_fn would do it in Python, which is unsafe in a threaded test process."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def _cc() -> str:
    return os.environ.get("CC") or shutil.which("cc") or "gcc"


def build_dir() -> str:
    """Where the helpers are compiled: keyed by the sources' hash so that concurrent test
    runs share a build and a changed source rebuilds."""
    h = hashlib.sha1()
    for name in ("fakecam_pw.c", "pwv4l2_shim.c"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    root = os.environ.get("FRAMESHM_HARNESS_BUILD") or os.path.join(
        tempfile.gettempdir(), f"frameshm-harness-{os.getuid()}"
    )
    return os.path.join(root, h.hexdigest()[:12])


def _compile(out: str, args: Sequence[str]) -> None:
    if os.path.exists(out):
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    r = subprocess.run([_cc(), *args, "-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise HarnessError(f"building {os.path.basename(out)} failed:\n{r.stderr}")
    os.replace(tmp, out)  # atomic: a concurrent run sees the whole file or none


def build() -> Dict[str, str]:
    """Compiles the shim and the fake camera (once per source version). Paths by name."""
    b = build_dir()
    shim = os.path.join(b, "libpwv4l2_shim.so")
    fakecam = os.path.join(b, "fakecam_pw")
    _compile(shim, ["-O2", "-shared", "-fPIC", os.path.join(HERE, "pwv4l2_shim.c"), "-ldl"])
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "libpipewire-0.3"], capture_output=True, text=True, check=True
    ).stdout.split()
    _compile(fakecam, ["-O2", "-Wall", os.path.join(HERE, "fakecam_pw.c"), *flags])
    return {"shim": shim, "fakecam": fakecam}


def _wait_for(pred, timeout: float, what: str, log: Optional[str] = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            detail = ""
            if log and os.path.exists(log):
                with open(log, errors="replace") as f:
                    detail = "\n" + f.read()[-4000:]
            raise HarnessError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(0.02)


def _stop(proc: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class FakeCamera:
    """One fake camera node (a fakecam_pw process). ``env()`` is the environment under
    which ``/dev/video0`` opens this camera through pw-v4l2."""

    def __init__(self, harness: "PipeWireHarness", formats: Sequence[str], name: str):
        self.harness = harness
        self.formats = list(formats)
        self.name = name
        self.node_id: Optional[int] = None
        self.serial: Optional[str] = None
        self._err = os.path.join(harness.runtime_dir, f"{name}.err")
        self._lines: List[str] = []
        with open(self._err, "w") as err:
            self.proc = subprocess.Popen(
                _with_pdeathsig([harness.bins["fakecam"], name, *self.formats]),
                stdout=subprocess.PIPE,
                stderr=err,
                env=harness.daemon_env(),
                text=True,
            )
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            _wait_for(lambda: self._ready.is_set() or self.proc.poll() is not None, 10,
                      f"fake camera {name}", self._err)
            if not self._ready.is_set():
                raise HarnessError(f"fake camera {name} exited (rc={self.proc.returncode}): {self.log()}")
        except BaseException:
            self.stop()
            raise

    def _pump(self):
        for line in self.proc.stdout:
            self._lines.append(line)
            if line.startswith("ready "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                self.node_id = int(fields["node.id"])
                self.serial = fields["serial"]
                self._ready.set()

    def env(self, base: Optional[dict] = None, target: bool = True) -> dict:
        """Environment of a capture process: the preload, the private runtime dir and
        PIPEWIRE_V4L2_TARGET (this camera only, never a stale node of an earlier test)."""
        env = self.harness.client_env(base)
        if target:
            env["PIPEWIRE_V4L2_TARGET"] = self.serial
        return env

    def log(self) -> str:
        try:
            with open(self._err, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Removes the node (like unplugging the camera)."""
        _stop(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "FakeCamera":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PipeWireHarness:
    """A private headless PipeWire + WirePlumber (no D-Bus, no audio, no hardware)."""

    def __init__(self):
        missing = missing_requirements()
        if missing:
            raise HarnessError(
                "PipeWire V4L2 harness unavailable, missing: " + ", ".join(missing)
                + f" (apt-get install {' '.join(APT_PACKAGES)}; scripts/setup.sh does it)"
            )
        self.bins = build()
        self.pw_v4l2 = pw_v4l2_library()
        self.runtime_dir = tempfile.mkdtemp(prefix="frameshm-pw.")
        self._procs: List[subprocess.Popen] = []
        self._ncams = 0
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def daemon_env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PIPEWIRE_REMOTE", "PIPEWIRE_V4L2_TARGET", "LD_PRELOAD", "PIPEWIRE_CONFIG_DIR")}
        env.update(XDG_RUNTIME_DIR=self.runtime_dir, PIPEWIRE_RUNTIME_DIR=self.runtime_dir,
                   DBUS_SESSION_BUS_ADDRESS="disabled:")  # WirePlumber must not look for a bus
        return env

    def client_env(self, base: Optional[dict] = None) -> dict:
        env = dict(os.environ if base is None else base)
        for k in ("PIPEWIRE_REMOTE", "PIPEWIRE_V4L2_TARGET"):
            env.pop(k, None)
        env.update(XDG_RUNTIME_DIR=self.runtime_dir, PIPEWIRE_RUNTIME_DIR=self.runtime_dir,
                   DBUS_SESSION_BUS_ADDRESS="disabled:")
        # The shim MUST come first: it routes libv4l2's raw syscall()s through libc, where
        # pw-v4l2 interposes them.
        env["LD_PRELOAD"] = " ".join([self.bins["shim"], self.pw_v4l2] + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
        return env

    def _spawn(self, argv, log, env) -> subprocess.Popen:
        with open(log, "w") as out:
            p = subprocess.Popen(_with_pdeathsig(argv), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env)
        self._procs.append(p)
        return p

    def _start(self) -> None:
        rt = self.runtime_dir
        env = self.daemon_env()
        pw_log = os.path.join(rt, "pipewire.log")
        self._spawn(["pipewire", "-c", os.path.join(HERE, "pipewire-ci.conf")], pw_log, env)
        _wait_for(lambda: os.path.exists(os.path.join(rt, "pipewire-0")), 10, "pipewire socket", pw_log)
        # WirePlumber: Debian's config plus one file turning off hardware monitors and D-Bus users.
        wp = os.path.join(rt, "wpconf")
        shutil.copytree("/usr/share/wireplumber", wp)
        shutil.copy(os.path.join(HERE, "wireplumber-ci.lua"), os.path.join(wp, "main.lua.d", "51-ci.lua"))
        if os.path.isdir(os.path.join(wp, "bluetooth.lua.d")):
            with open(os.path.join(wp, "bluetooth.lua.d", "51-ci.lua"), "w") as f:
                f.write("bluez_monitor.enabled = false\n")
        wp_log = os.path.join(rt, "wireplumber.log")
        self._spawn(["wireplumber"], wp_log, dict(env, WIREPLUMBER_CONFIG_DIR=wp))
        _wait_for(self._wireplumber_ready, 20, "wireplumber", wp_log)

    def _wireplumber_ready(self) -> bool:
        for p in self._procs:
            if p.poll() is not None:
                raise HarnessError(f"{p.args[0]} exited with {p.returncode}")
        try:
            # pw-cli can hang after a client dies: always under a timeout.
            r = subprocess.run(["pw-cli", "ls", "Client"], env=self.daemon_env(), capture_output=True,
                               text=True, timeout=2)
        except subprocess.TimeoutExpired:
            return False
        return "WirePlumber [export]" in r.stdout

    def camera(self, formats: Optional[Sequence[str]] = None, name: Optional[str] = None) -> FakeCamera:
        """Starts a fresh fake camera. PipeWire 0.3.65's emulation serves one capture
        session per camera node, so start one per capture process."""
        self._ncams += 1
        return FakeCamera(self, formats or DEFAULT_FORMATS, name or f"fakecam{self._ncams}")

    def stop(self) -> None:
        for p in reversed(self._procs):
            _stop(p)
        self._procs.clear()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> "PipeWireHarness":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a command against a fresh fake V4L2 camera (/dev/video0).")
    ap.add_argument("--formats", default=" ".join(DEFAULT_FORMATS), help="space-separated FMT:WxH@FPS list")
    ap.add_argument("--no-target", action="store_true", help="do not set PIPEWIRE_V4L2_TARGET")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (use: harness.py -- CMD ARGS)")
    t0 = time.monotonic()
    with PipeWireHarness() as pw:
        print(f"[harness] pipewire + wireplumber up in {time.monotonic() - t0:.2f}s", file=sys.stderr)
        with pw.camera(args.formats.split()) as cam:
            print(f"[harness] camera serial={cam.serial} formats={cam.formats}", file=sys.stderr)
            rc = subprocess.call(cmd, env=cam.env(target=not args.no_target))
            if rc != 0:
                print(f"[harness] command failed (rc={rc}); camera log:\n{cam.log()}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
