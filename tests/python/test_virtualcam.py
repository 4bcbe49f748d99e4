"""The virtual camera (``frameshm virtualcam``): a stream published as a PipeWire
Video/Source node, read by third-party clients - GStreamer's ``pipewiresrc`` and
``v4l2-ctl`` under PipeWire's V4L2 layer (pw-v4l2, through tests/harness) - against a
private PipeWire + WirePlumber.

The frames are the test-pattern source's (frameshm/sources/test_pattern.py), published by a
Writer in this process: each carries its frame number, capture time and a CRC32 of the rest
of the frame, so every frame a client wrote to its file is checked whole (no torn frame),
in order and fresh.

Skipped, with the reason, when PipeWire (the harness's apt packages or libpipewire-0.3-dev
at build time) or the client programs (gstreamer1.0-tools gstreamer1.0-pipewire, v4l-utils)
are missing; scripts/setup.sh installs them all."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import List

import numpy as np
import pytest

import frameshm
from frameshm import virtualcam
from frameshm.sources.test_pattern import TestPatternSource, read_stamp

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness")
sys.path.insert(0, HARNESS)
import harness  # noqa: E402

from fshm_helpers import child_env, pipewire_harness_or_skip, run_snippet, wait_until  # noqa: E402

W, H, FPS = 320, 240, 30
CLIENT_TIMEOUT = 30


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pw():
    with pipewire_harness_or_skip(harness, None if virtualcam.HAVE_PIPEWIRE else
                                  "frameshm was built without PipeWire (apt-get install libpipewire-0.3-dev, "
                                  "then pip install -e .)") as h:
        yield h


@pytest.fixture
def pw_env(pw, monkeypatch):
    """This process (the virtual camera runs in it) talks to the private PipeWire."""
    env = pw.client_env()
    for k in ("XDG_RUNTIME_DIR", "PIPEWIRE_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("PIPEWIRE_REMOTE", raising=False)
    return pw


def need(exe: str, package: str) -> None:
    if not shutil.which(exe):
        pytest.skip(f"{exe} not installed (apt-get install {package}; scripts/setup.sh does it)")


class Producer:
    """Test-pattern frames published by a Writer from a thread at the source's rate."""

    def __init__(self, name: str, channels: int = 3, fps: float = FPS, first_frame: int = 0):
        self.src = TestPatternSource("", {"width": str(W), "height": str(H), "channels": str(channels),
                                          "fps": str(fps)})
        self.src.open()
        self.src._frame_no = first_frame  # a returning producer numbers its frames apart
        self.writer = frameshm.Writer(name, shape=self.src.shape, dtype="uint8")
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        buf = np.empty(self.src.shape, np.uint8)
        while not self._stop.is_set():
            ts = self.src.read_into(buf, 1.0)
            self.writer.publish(buf, timestamp_ns=ts)
            self.published += 1

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.writer.close()


@pytest.fixture
def producer(name):
    made = []

    def start(**kw) -> Producer:
        p = Producer(name, **kw)
        made.append(p)
        return p

    yield start
    for p in made:
        p.close()


@pytest.fixture
def vcam(pw_env, name):
    made = []

    def start(**kw) -> virtualcam.VirtualCamera:
        kw.setdefault("fps", FPS)
        vc = virtualcam.VirtualCamera(name, **kw)
        made.append(vc)
        return vc

    yield start
    for vc in made:
        vc.close()


def frames_of(path: str, frame_bytes: int) -> List[np.ndarray]:
    data = np.fromfile(path, np.uint8) if os.path.exists(path) else np.zeros(0, np.uint8)
    assert len(data) % frame_bytes == 0, f"{path}: {len(data)} bytes is no whole number of frames"
    return [data[i:i + frame_bytes] for i in range(0, len(data), frame_bytes)]


def check_stamps(frames: List[np.ndarray], what: str):
    """Every frame whole (stamp CRC), frame numbers strictly increasing; the stamps."""
    stamps = [read_stamp(f) for f in frames]
    assert all(s is not None for s in stamps), f"{what}: a frame without the test pattern's stamp"
    bad = [s.frame_no for s in stamps if not s.crc_ok]
    assert not bad, f"{what}: torn/corrupt frames {bad}"
    nos = [s.frame_no for s in stamps]
    assert all(b > a for a, b in zip(nos, nos[1:])), f"{what}: frames out of order {nos}"
    return stamps


class Client:
    """A third-party client process writing the frames it gets to a file."""

    def __init__(self, argv, env, out: str, frame_bytes: int):
        self.out, self.frame_bytes = out, frame_bytes
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def frames(self, what: str) -> List[np.ndarray]:
        try:
            out, err = self.proc.communicate(timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{what}: no end within {CLIENT_TIMEOUT}s: {err[-2000:]}")
        assert self.proc.returncode == 0, f"{what} failed (rc={self.proc.returncode}): {out[-1000:]} {err[-2000:]}"
        return frames_of(self.out, self.frame_bytes)


def gst(pw, target, tmp_path, n: int, fmt: str = "RGB", tag: str = "gst") -> Client:
    """gst-launch-1.0 pipewiresrc -> caps (the format must negotiate exactly) -> file."""
    need("gst-launch-1.0", "gstreamer1.0-tools gstreamer1.0-pipewire")
    env = pw.client_env()
    env.pop("LD_PRELOAD", None)
    out = str(tmp_path / f"{tag}.raw")
    bpp = {"GRAY8": 1, "RGB": 3}[fmt]
    return Client(["gst-launch-1.0", "-q", "pipewiresrc", f"target-object={target}", f"num-buffers={n}", "!",
                   f"video/x-raw,format={fmt},width={W},height={H}", "!", "filesink", f"location={out}"],
                  env, out, W * H * bpp)


def v4l2_env(pw, serial) -> dict:
    """pw-v4l2 (and the harness's shim) preloaded; /dev/video0 is the virtual camera."""
    need("v4l2-ctl", "v4l-utils")
    return dict(pw.client_env(), PIPEWIRE_V4L2_TARGET=str(serial))


def v4l2_ctl(pw, serial, tmp_path, n: int, fourcc: str = "RGB3", tag: str = "v4l2") -> Client:
    """v4l2-ctl streaming n mmap'ed frames to a file (S_FMT first: pw-v4l2 needs it)."""
    out = str(tmp_path / f"{tag}.raw")
    bpp = {"GREY": 1, "RGB3": 3}[fourcc]
    return Client(["v4l2-ctl", "-d", "/dev/video0", f"--set-fmt-video=width={W},height={H},pixelformat={fourcc}",
                   "--stream-mmap=4", f"--stream-count={n}", f"--stream-to={out}"],
                  v4l2_env(pw, serial), out, W * H * bpp)


def drain_events(vc, seconds: float = 0.3) -> List[virtualcam.Event]:
    return list(vc.events(seconds))


def wait_event(vc, kind: str, timeout: float = 10.0) -> virtualcam.Event:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ev = vc.next_event(max(0.0, deadline - time.monotonic()))
        if ev is None:
            break
        seen.append(ev)
        if ev.kind == kind:
            return ev
    raise AssertionError(f"no {kind} event within {timeout}s; saw {[e.message for e in seen]}")


def consumers(name: str) -> List[str]:
    return [c["name"] for c in frameshm.stream_info(name)["consumers"] if c["alive"]]


# ---- third-party clients read the frames ----------------------------------------------------


@pytest.mark.parametrize("fmt,channels", [("GRAY8", 1), ("RGB", 3)])
def test_pipewiresrc_reads_whole_frames_in_order(pw, producer, vcam, tmp_path, fmt, channels):
    prod = producer(channels=channels)
    vc = vcam()
    info = vc.info()
    assert info["ready"] and info["format"] == fmt and (info["width"], info["height"]) == (W, H)
    assert (info["fps_num"], info["fps_den"]) == (FPS, 1)
    assert info["node_name"] == f"frameshm-{vc.stream}" and info["serial"] and info["node_id"] is not None
    stamps = check_stamps(gst(pw, vc.serial, tmp_path, 20, fmt).frames("pipewiresrc"), "pipewiresrc")
    assert len(stamps) == 20
    assert stamps[-1].frame_no < prod.published + 1
    # One graph cycle per new frame: the client gets the producer's frames back to back.
    gaps = sum(b.frame_no - a.frame_no - 1 for a, b in zip(stamps, stamps[1:]))
    assert gaps <= 4, [s.frame_no for s in stamps]
    events = drain_events(vc)
    connected = [e for e in events if e.kind == "client_connected"]
    assert connected and connected[0].peer == "gst-launch-1.0" and connected[0].clients == 1
    assert any(e.kind == "client_disconnected" for e in events)
    assert vc.info()["served"] >= 20 and vc.info()["torn"] == 0


@pytest.mark.parametrize("fourcc,channels", [("GREY", 1), ("RGB3", 3)])
def test_v4l2_program_reads_whole_frames_in_order(pw, producer, vcam, tmp_path, fourcc, channels):
    producer(channels=channels)
    vc = vcam(node_name="frameshm-test-v4l2", description="frameshm test camera")
    env = v4l2_env(pw, vc.serial)
    r = subprocess.run(["v4l2-ctl", "-d", "/dev/video0", "--info", "--list-formats-ext", "--get-parm"],
                       env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "frameshm test camera" in r.stdout                        # card = node.description
    assert re.search(rf"'{fourcc}'.*\n\s+Size: Discrete {W}x{H}", r.stdout), r.stdout
    assert f"Frames per second: {FPS:.3f} ({FPS}/1)" in r.stdout, r.stdout
    # Two sessions back to back: the node takes its buffers back between clients.
    for i in range(2):
        stamps = check_stamps(v4l2_ctl(pw, vc.serial, tmp_path, 15, fourcc, tag=f"v{i}").frames("v4l2-ctl"),
                              f"v4l2-ctl session {i}")
        assert len(stamps) == 15


def test_two_clients_at_once(pw, producer, vcam, tmp_path):
    producer(channels=3)
    vc = vcam()
    a = v4l2_ctl(pw, vc.serial, tmp_path, 45, "RGB3", tag="v4l2")
    b = gst(pw, vc.node_name, tmp_path, 45, "RGB", tag="gst")   # by node.name this time
    sa = check_stamps(a.frames("v4l2-ctl"), "v4l2-ctl")
    sb = check_stamps(b.frames("pipewiresrc"), "pipewiresrc")
    assert len(sa) == len(sb) == 45
    common = {s.frame_no for s in sa} & {s.frame_no for s in sb}
    assert len(common) >= 10, "the clients were not served at the same time"
    assert max(e.clients for e in drain_events(vc)) == 2


def test_frameshm_v4l2_capture_reads_it_back(pw, producer, vcam):
    """frameshm's own V4L2 capture (libv4l2 under pw-v4l2) as the client: every frame whole,
    none lost, and the capture -> V4L2 application latency of a fresh frame."""
    from frameshm import camera as fcam

    if not fcam.HAVE_LIBV4L2:
        pytest.skip("frameshm was built without libv4l2")
    producer(channels=3)
    vc = vcam()
    rc, out, err = run_snippet(f"""
        from frameshm.sources.test_pattern import read_stamp
        lat, nos = [], []
        with frameshm.Camera("/dev/video0", width={W}, height={H}, fps={FPS}, format="RGB3") as cam:
            for i, f in enumerate(cam.frames(timeout=10)):
                now = time.monotonic_ns()
                s = read_stamp(f.array)
                assert s is not None and s.crc_ok, (i, s)
                lat.append(now - s.timestamp_ns)
                nos.append(s.frame_no)
                f.release()
                if len(nos) == 45:
                    break
        say("RESULT", json.dumps({{"nos": nos, "lat": lat}}))
    """, timeout=60, env=v4l2_env(pw, vc.serial))
    assert rc == 0, err[-3000:]
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    nos = res["nos"]
    # Steady state: in order, each once, and no frame lost beyond what a starved machine
    # loses (a live camera drops when its client is not scheduled for several frames:
    # once at load 11 on 2 cores). A path that drops frames by itself loses many more.
    steady = list(zip(nos[5:], nos[6:]))
    assert all(b > a for a, b in steady), nos
    assert sum(b - a - 1 for a, b in steady) <= 2, nos
    assert sorted(res["lat"])[len(res["lat"]) // 2] < 50e6, res["lat"]   # median: fresh frames


def test_reads_only_while_a_client_streams_and_late_client_gets_fresh_frames(pw, producer, vcam, tmp_path, name):
    producer(channels=1)
    vc = vcam()
    time.sleep(1.0)   # the stream goes on without any client: nothing of it may be kept
    assert "virtualcam" not in consumers(name)
    assert vc.info()["served"] == 0 and not vc.info()["streaming"]
    t0 = time.monotonic_ns()
    client = gst(pw, vc.serial, tmp_path, 60, "GRAY8")
    wait_until(lambda: "virtualcam" in consumers(name), 10, what="the virtual camera reading the stream")
    stamps = check_stamps(client.frames("pipewiresrc"), "pipewiresrc")
    # The first frame was captured about when the client connected (a frame period of
    # slack for the one in flight), never one from before.
    assert stamps[0].timestamp_ns >= t0 - 2 * 1e9 / FPS, (stamps[0].timestamp_ns - t0) / 1e9
    wait_until(lambda: "virtualcam" not in consumers(name), 10, what="the reader closed after the client left")
    kinds = [e.kind for e in drain_events(vc)]
    assert kinds.index("streaming") < kinds.index("idle")


def test_producer_goes_away_and_comes_back(pw, producer, vcam, tmp_path, name):
    first = producer(channels=1)
    vc = vcam()
    client = gst(pw, vc.serial, tmp_path, 40, "GRAY8")
    wait_event(vc, "streaming")
    wait_until(lambda: vc.info()["served"] >= 10, 10, what="frames served")
    first.close()
    gone = wait_event(vc, "producer_gone")
    assert "resumes when it returns" in gone.message
    assert vc.info()["ready"] and not vc.info()["failed"]        # the node stays up
    producer(channels=1, first_frame=100000)
    wait_event(vc, "producer_back")
    stamps = check_stamps(client.frames("pipewiresrc"), "pipewiresrc")
    assert stamps[0].frame_no < 100000 <= stamps[-1].frame_no, [s.frame_no for s in stamps]


def test_measured_rate_is_announced(pw, producer, pw_env, name, tmp_path):
    producer(channels=1, fps=20)
    with virtualcam.VirtualCamera(name) as vc:   # no fps: measured from the producer
        i = vc.info()
        assert (i["fps_num"], i["fps_den"], i["fps_measured"]) == (20, 1, True)
        r = subprocess.run(["v4l2-ctl", "-d", "/dev/video0", "--get-parm"], env=v4l2_env(pw, vc.serial),
                           capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
        assert "Frames per second: 20.000 (20/1)" in r.stdout, r.stdout + r.stderr


# ---- the command line: node up line, clean stop ------------------------------------------


def pw_nodes(pw) -> str:
    r = subprocess.run(["pw-cli", "ls", "Node"], env=pw.daemon_env(), capture_output=True, text=True, timeout=5)
    return r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_and_stops_cleanly(pw, producer, name, tmp_path, sig):
    producer(channels=3)
    env = child_env(pw.client_env())
    env.pop("LD_PRELOAD", None)
    node = f"frameshm-cli-{sig.name.lower()}"
    proc = subprocess.Popen([sys.executable, "-m", "frameshm", "virtualcam", "--stream", name, "--node-name", node,
                             "--fps", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.match(r"virtualcam: node\.id=(\d+) object\.serial=(\d+) node\.name=(\S+) stream=(\S+) "
                     r"format=RGB 320x240@30/1$", line.strip())
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert (m.group(3), m.group(4)) == (node, name)
        assert f'node.name = "{node}"' in pw_nodes(pw)
        stamps = check_stamps(gst(pw, m.group(2), tmp_path, 10).frames("pipewiresrc"), "pipewiresrc")
        assert len(stamps) == 10
        wait_until(lambda: "virtualcam" not in consumers(name), 10, what="idle again")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "client connected: gst-launch-1.0" in err and "client disconnected" in err
    assert f"{sig.name} received" in err and "served" in err
    wait_until(lambda: f'node.name = "{node}"' not in pw_nodes(pw), 10, what="the node gone")
    assert "virtualcam" not in consumers(name)   # and the stream dir is checked by conftest


# ---- bad input -------------------------------------------------------------------------------

built_with_pipewire = pytest.mark.skipif(not virtualcam.HAVE_PIPEWIRE, reason="built without PipeWire")


def test_build_has_pipewire_exactly_when_pkg_config_finds_it(name):
    """The feature is in the build iff libpipewire-0.3 was there to build it with; without
    it the virtual camera says how to get it (the C side of that: tests/c/test_pwcam.c)."""
    found = shutil.which("pkg-config") is not None and subprocess.run(
        ["pkg-config", "--exists", "libpipewire-0.3"]).returncode == 0
    assert bool(virtualcam.HAVE_PIPEWIRE) == found
    if not found:
        with pytest.raises(virtualcam.PipeWireUnavailable, match="install libpipewire-0.3-dev and reinstall"):
            virtualcam.VirtualCamera(name)


@built_with_pipewire
def test_missing_stream_is_a_clear_error(name):
    with pytest.raises(frameshm.StreamNotFound, match=f"stream '{name}' not found: start its producer first"):
        virtualcam.VirtualCamera(name)
    r = subprocess.run([sys.executable, "-m", "frameshm", "virtualcam", "--stream", name], env=child_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and f"stream '{name}' not found" in r.stderr, r.stderr


@built_with_pipewire
def test_unsupported_frames_are_a_clear_error(name):
    with frameshm.Writer(name, shape=(H, W), dtype="float32") as w:
        w.publish(np.zeros((H, W), np.float32))
        with pytest.raises(virtualcam.UnsupportedStream, match=r"float32 \(240, 320\) cannot be served as video"):
            virtualcam.VirtualCamera(name, timeout=5)
    with frameshm.Writer(name, shape=(H, W, 3), dtype="uint8") as w:
        w.publish(np.zeros((H, W, 3), np.uint8))
        with pytest.raises(virtualcam.UnsupportedStream, match="format GRAY8 does not fit"):
            virtualcam.VirtualCamera(name, format="GRAY8", timeout=5)
        with pytest.raises(frameshm.InvalidArgument, match="not the 640x480 asked for"):
            virtualcam.VirtualCamera(name, width=640, height=480, timeout=5)


@built_with_pipewire
def test_bad_arguments(name):
    with pytest.raises(frameshm.InvalidArgument, match="unknown virtual-camera format 'MJPG'"):
        virtualcam.VirtualCamera(name, format="MJPG")
    with pytest.raises(frameshm.InvalidArgument, match="width and height together"):
        virtualcam.VirtualCamera(name, width=640)
    with pytest.raises(frameshm.InvalidArgument, match="fps"):
        virtualcam.VirtualCamera(name, fps=-1)
    with pytest.raises(frameshm.InvalidArgument, match="buffers"):
        virtualcam.VirtualCamera(name, buffers=1, format="RGB", width=W, height=H, fps=30)


@built_with_pipewire
def test_no_frame_to_learn_from_times_out(name):
    with frameshm.Writer(name, shape=(H, W), dtype="uint8"):   # exists, never publishes
        t0 = time.monotonic()
        with pytest.raises(frameshm.Timeout, match="no frame to learn the format from within 0.5 s"):
            virtualcam.VirtualCamera(name, timeout=0.5)
        assert time.monotonic() - t0 < 5


@built_with_pipewire
def test_no_pipewire_daemon_is_a_clear_error(name, tmp_path, monkeypatch):
    empty = tmp_path / "no-pipewire-here"
    empty.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(empty))
    monkeypatch.setenv("PIPEWIRE_RUNTIME_DIR", str(empty))
    monkeypatch.delenv("PIPEWIRE_REMOTE", raising=False)
    with pytest.raises(virtualcam.PipeWireError, match="cannot connect to PipeWire"):
        virtualcam.VirtualCamera(name, format="RGB", width=W, height=H, fps=30)


def test_layout_for():
    assert virtualcam.layout_for((480, 640)) == {"format": "GRAY8", "width": 640, "height": 480, "stride": 640,
                                                 "frame_bytes": 640 * 480}
    assert virtualcam.layout_for((480, 640, 3))["format"] == "RGB"
    assert virtualcam.layout_for((480, 640, 3), format="bgr")["format"] == "BGR"
    assert virtualcam.layout_for((480, 640, 2))["format"] == "YUYV"
    assert virtualcam.layout_for((480, 640), "uint16")["format"] == "GRAY16"
    assert virtualcam.layout_for((720, 640), format="NV12")["height"] == 480
    with pytest.raises(virtualcam.UnsupportedStream, match="float64"):
        virtualcam.layout_for((480, 640), "float64")


def test_exported():
    assert frameshm.VirtualCamera is virtualcam.VirtualCamera
    assert issubclass(virtualcam.PipeWireError, frameshm.FrameshmError)
    assert issubclass(virtualcam.UnsupportedStream, frameshm.InvalidArgument)


def test_driver_managed_stream(pw, pw_env, tmp_path, shm_base):
    """A stream whose files a `frameshm driver` owns, served through a consumer lease."""
    from test_driver_clients import Driver

    drv = Driver(tmp_path, shm_base).start()
    try:
        src = TestPatternSource("", {"width": str(W), "height": str(H), "channels": "3", "fps": str(FPS)})
        src.open()
        stop = threading.Event()
        with frameshm.Writer(stream_id=1001, driver=drv.sock, shape=src.shape, dtype="uint8") as w:
            def run():
                buf = np.empty(src.shape, np.uint8)
                while not stop.is_set():
                    w.publish(buf, timestamp_ns=src.read_into(buf, 1.0))

            t = threading.Thread(target=run, daemon=True)
            t.start()
            try:
                with virtualcam.VirtualCamera(1001, driver=drv.sock, fps=FPS) as vc:
                    assert vc.info()["node_name"] == "frameshm-stream-1001"
                    stamps = check_stamps(gst(pw, vc.serial, tmp_path, 10, "RGB").frames("pipewiresrc"),
                                          "pipewiresrc (driver stream)")
                    assert len(stamps) == 10
            finally:
                stop.set()
                t.join(5)
    finally:
        assert drv.stop() == 0, drv.text()
