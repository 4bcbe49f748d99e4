"""GigE Vision capture (frameshm.GigECamera, gige: sources) against Aravis' fake cameras.

* In-process ``Fake_1`` (no network): formats, region, pattern, rate, flush, lost-frame
  counting, the Source, capture into a stream.
* The real GigE Vision protocol on loopback: ``arv-fake-gv-camera-0.8 -i 127.0.0.1`` started
  by the fixture (readiness polled with ``arv-tool-0.8 -a 127.0.0.1``, which exits 0 even
  when it cannot connect, so its output is checked; stopped with SIGINT). Cameras are only
  ever opened by IP: no discovery broadcast. Then the camera is killed and restarted
  under a real ``frameshm capture`` process, which must recover.

Both fake cameras draw Mono8 pixel(x, y) = (x + y + frame_id) % 255 (region-relative).
Skipped, with the reason, only when frameshm was built without Aravis or its tools are
missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import frameshm
from frameshm.camera import DeviceGone, DeviceNotFound, UnsupportedFormat
from frameshm.gige import HAVE_ARAVIS
from frameshm.sources import SourceGone, open_source
from fshm_helpers import wait_until

pytestmark = pytest.mark.skipif(
    not HAVE_ARAVIS,
    reason="frameshm was built without Aravis (apt-get install libaravis-dev libusb-1.0-0-dev; pip install -e .)",
)

FAKE_GV = shutil.which("arv-fake-gv-camera-0.8")
ARV_TOOL = shutil.which("arv-tool-0.8")
needs_gv = pytest.mark.skipif(
    not (FAKE_GV and ARV_TOOL), reason="Aravis tools not installed (apt-get install aravis-tools aravis-tools-cli)"
)
IP = "127.0.0.1"


def expected(h, w, frame_id, dtype=np.uint8):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + yy + frame_id) % 255).astype(dtype)


def id_span(first, last):
    """Frames from id first to id last inclusive; GigE block ids wrap 65535 -> 1."""
    return last - first + 1 if last >= first else (65535 - first + 1) + last


# ---- in-process Fake_1 -----------------------------------------------------------------


def test_fake_mono8_pattern_ids_and_counters():
    with frameshm.GigECamera("Fake_1", "Mono8", 640, 480, 100) as cam:
        assert cam.shape == (480, 640) and cam.dtype == np.uint8 and cam.frame_bytes == 640 * 480
        assert cam.pixel_format == "Mono8" and cam.format["frame_rate_available"]
        info = cam.info()
        assert info["protocol"] == "Fake" and info["serial"] == "1" and info["address"] == ""
        out = np.empty(cam.shape, cam.dtype)
        ids = []
        for _ in range(20):
            fr = cam.read_frame(out, timeout=2.0)
            assert fr["nbytes"] == 640 * 480
            assert abs(frameshm._core.now_ns() - fr["timestamp_ns"]) < 2e9  # CLOCK_MONOTONIC
            np.testing.assert_array_equal(out, expected(480, 640, fr["frame_id"]))
            ids.append(fr["frame_id"])
        assert ids == list(range(ids[0], ids[0] + 20))
        s = cam.stats()
        assert s["delivered"] == 20 and s["id_gaps"] == 0 and s["incomplete"] == 0


@pytest.mark.parametrize("fmt,shape,dtype", [
    ("Mono16", (48, 64), np.uint16), ("RGB8", (48, 64, 3), np.uint8), ("BayerRG8", (48, 64), np.uint8),
])
def test_fake_pixel_formats(fmt, shape, dtype):
    with frameshm.GigECamera("Fake_1", fmt, 64, 48, 100) as cam:
        assert cam.pixel_format == fmt and cam.shape == shape and cam.dtype == dtype
        a = cam.read(timeout=2.0)
        assert a.shape == shape and a.dtype == dtype and a.max() > a.min()


def test_fake_region_offset_and_errors():
    with frameshm.GigECamera("Fake_1", "Mono8", 64, 48, 100, x=10, y=5) as cam:
        f = cam.format
        assert (f["x"], f["y"], f["width"], f["height"]) == (10, 5, 64, 48)
        out = np.empty(cam.shape, cam.dtype)
        fr = cam.read_frame(out, 2.0)
        np.testing.assert_array_equal(out, expected(48, 64, fr["frame_id"]))
    with pytest.raises(UnsupportedFormat, match="offers: .*Mono8"):
        frameshm.GigECamera("Fake_1", "YUV422Packed", 64, 48)
    with pytest.raises(UnsupportedFormat, match="region"):
        frameshm.GigECamera("Fake_1", "Mono8", 64, 40000)
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.GigECamera("Fake_1", "Mono8", 64, None)
    # (no lookup by name here: that is Aravis' discovery, which broadcasts; DeviceNotFound is
    # checked by IP against the stopped loopback camera below)
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.GigECamera("")


def test_fake_rate_control():
    with frameshm.GigECamera("Fake_1", "Mono8", 64, 48, 20) as cam:
        out = np.empty(cam.shape, cam.dtype)
        cam.read_into(out, 2.0)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            cam.read_into(out, 2.0)
            n += 1
        assert 10 <= n <= 30, n  # 20 fps, generous band for a noisy VM
        assert cam.set_rate(100) is True and cam.fps == pytest.approx(100)
        cam.flush(0)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            cam.read_into(out, 2.0)
            n += 1
        assert n >= 50, n


def test_fake_flush_discards_stale_frames_and_underruns_count_as_lost():
    with frameshm.GigECamera("Fake_1", "Mono8", 64, 48, 100, buffers=4) as cam:
        out = np.empty(cam.shape, cam.dtype)
        cam.read_into(out, 2.0)
        time.sleep(0.5)  # the pool fills with frames, then the camera has no free buffer
        flushed = cam.flush(0.1)
        assert flushed >= 1
        fr = cam.read_frame(out, 2.0)
        assert frameshm._core.now_ns() - fr["timestamp_ns"] < 0.5e9
        s = cam.stats()
        assert s["flushed"] == flushed and s["underruns"] >= 10
        assert s["lost"] == s["incomplete"] + max(s["id_gaps"], s["underruns"])


def test_fake_capture_to_stream(name):
    with frameshm.GigECamera("Fake_1", "Mono8", 320, 240, 100) as cam, \
            frameshm.Writer(name, shape=cam.shape, dtype=cam.dtype, nslots=4) as w, \
            frameshm.Reader(name, consumer="probe") as r:
        seqs = [cam.capture_to(w, timeout=2.0) for _ in range(5)]
        assert seqs == list(range(seqs[0], seqs[0] + 5))
        f = r.wait_latest(timeout=2.0)
        a = f.array.copy()
        assert f.valid()
        # the frame id is not in the stream: find it from the first pixel and check all
        fid = int(a[0, 0])
        np.testing.assert_array_equal(a, expected(240, 320, fid))
        del f


def test_gige_source_uri_and_parameters():
    src = open_source("gige:Fake_1?pixel_format=Mono8&width=160&height=120&fps=50&buffers=4")
    with src:
        assert src.shape == (120, 160) and src.dtype == np.uint8
        assert src.set_rate(25) is True
        out = np.empty(src.shape, src.dtype)
        ts = src.read_into(out, 2.0)
        assert ts > 0 and out.max() > out.min()
        assert src.stats()["delivered"] == 1
    assert src.stats()["delivered"] == 1  # kept across close
    with pytest.raises(frameshm.InvalidArgument, match="unknown parameter"):
        open_source("gige:Fake_1?format=Mono8")
    with pytest.raises(frameshm.InvalidArgument, match="camera id"):
        open_source("gige:")
    with pytest.raises(frameshm.InvalidArgument, match="both width and height"):
        open_source("gige:Fake_1?width=10")
    with pytest.raises(frameshm.InvalidArgument, match="fps"):
        open_source("gige:Fake_1?fps=0")


# ---- the real GigE Vision protocol on loopback ------------------------------------------


class FakeGvCamera:
    """arv-fake-gv-camera-0.8 on 127.0.0.1 (only processes started here are signalled)."""

    def __init__(self, serial: str):
        self.serial = serial
        self.proc = None

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen([FAKE_GV, "-i", IP, "-s", self.serial], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"arv-fake-gv-camera-0.8 exited with {self.proc.returncode}"
            out = subprocess.run([ARV_TOOL, "-a", IP, "control", "DeviceID"], capture_output=True, text=True,
                                 timeout=10).stdout
            if self.serial in out:
                return
            time.sleep(0.2)
        raise AssertionError(f"fake GigE camera not ready within {timeout}s")

    def stop(self, sig=signal.SIGINT) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture
def gv_camera():
    cam = FakeGvCamera(f"FSHM{os.getpid() % 10000}")
    cam.start()
    yield cam
    cam.stop()


@needs_gv
def test_gv_stream_pattern_packet_size_and_no_miscounted_loss(gv_camera):
    with frameshm.GigECamera(IP, "Mono8", 640, 480, 100, packet_size=1400) as cam:
        info = cam.info()
        assert info["protocol"] == "GigEVision" and info["address"] == IP and info["serial"] == gv_camera.serial
        assert cam.format["packet_size"] == 1400
        out = np.empty(cam.shape, cam.dtype)
        first = last = None
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # ~200 frames: the 16-bit ids wrap (they start at 65400)
            fr = cam.read_frame(out, 2.0)
            np.testing.assert_array_equal(out, expected(480, 640, fr["frame_id"]))
            first = fr["frame_id"] if first is None else first
            last = fr["frame_id"]
            n += 1
        s = cam.stats()
        assert n >= 50
        assert s["delivered"] == n
        # every frame between the first and the last was delivered or counted as lost
        assert s["delivered"] + s["id_gaps"] == id_span(first, last), (first, last, s)
        assert s["lost"] <= n // 10  # loopback: no loss expected; generous on a noisy VM
    with frameshm.GigECamera(IP, "Mono8", 320, 240, 50, packet_size=8000) as cam:
        assert cam.format["packet_size"] == 8000
        out = np.empty(cam.shape, cam.dtype)
        fr = cam.read_frame(out, 2.0)
        np.testing.assert_array_equal(out, expected(240, 320, fr["frame_id"]))


@needs_gv
def test_gv_lost_frames_are_counted_as_id_gaps(gv_camera):
    # Two buffers and a reader that sleeps: Aravis has no buffer for most frames, the
    # camera numbers them anyway, so they show as id gaps and as lost_before.
    with frameshm.GigECamera(IP, "Mono8", 64, 48, 100, buffers=2) as cam:
        out = np.empty(cam.shape, cam.dtype)
        frames = []
        for _ in range(4):
            frames.append(cam.read_frame(out, 2.0))
            time.sleep(0.2)
        s = cam.stats()
        assert s["id_gaps"] >= 10 and s["lost"] >= s["id_gaps"]
        assert sum(f["lost_before"] for f in frames) >= 10
        assert s["delivered"] + s["id_gaps"] == id_span(frames[0]["frame_id"], frames[-1]["frame_id"])


@needs_gv
def test_gv_camera_killed_raises_device_gone_then_reopens(gv_camera):
    cam = frameshm.GigECamera(IP, "Mono8", 64, 48, 50)
    out = np.empty(cam.shape, cam.dtype)
    cam.read_into(out, 2.0)
    gv_camera.stop(signal.SIGKILL)
    with pytest.raises(DeviceGone):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            try:
                cam.read_into(out, 1.0)
            except frameshm.Timeout:
                pass
    assert cam.gone
    t0 = time.monotonic()
    cam.close()
    assert time.monotonic() - t0 < 1.0  # a gone camera is released in the background
    with pytest.raises(DeviceNotFound):
        frameshm.GigECamera(IP)
    gv_camera.start()
    with frameshm.GigECamera(IP, "Mono8", 64, 48, 50) as cam2:
        fr = cam2.read_frame(out, 2.0)
        np.testing.assert_array_equal(out, expected(48, 64, fr["frame_id"]))


def _frames_after(r, t_ns, want, timeout):
    """Reads frames newer than t_ns from r until `want` pass the pattern check."""
    ok = 0
    deadline = time.monotonic() + timeout
    while ok < want and time.monotonic() < deadline:
        try:
            f = r.wait_next(0.5)
        except frameshm.Timeout:
            continue
        except frameshm.Overrun:
            continue
        if f.timestamp_ns <= t_ns:
            continue
        a = f.array.copy()
        if not f.valid():
            continue
        np.testing.assert_array_equal(a, expected(a.shape[0], a.shape[1], int(a[0, 0])))
        ok += 1
    return ok


@needs_gv
@pytest.mark.timeout(90)
def test_gv_capture_process_recovers_after_camera_restart(gv_camera, spawn):
    from frameshm.roles import read_metrics

    uri = f"gige:{IP}?pixel_format=Mono8&width=320&height=240&fps=30&packet_size=1400"
    cap = spawn(
        "from frameshm.cli import main\n"
        f"sys.exit(main(['capture', '--frames', 'gige-cam', '--source', {uri!r}, "
        "'--standby-fps', '30', '--set', 'capture.reconnect_interval_s=0.5', "
        "'--set', 'capture.read_timeout_s=1.0']))\n",
        label="capture",
    )
    wait_until(lambda: _exists("gige-cam"), 20, what="the capture stream")
    with frameshm.Reader("gige-cam", consumer="probe", spin=False) as r:
        assert r.wait_latest(5).array.shape == (240, 320)
        assert _frames_after(r, 0, 10, 10) == 10
        epoch = r.epoch
        gv_camera.stop(signal.SIGKILL)
        killed = frameshm._core.now_ns()
        time.sleep(1.0)
        # nothing new while the camera is down
        assert _frames_after(r, killed + int(0.2e9), 1, 4) == 0
        gv_camera.start()
        restarted = frameshm._core.now_ns()
        assert _frames_after(r, restarted, 10, 30) == 10, "capture did not recover after the camera came back"
        assert r.epoch == epoch  # same stream: consumers only saw a gap
    m = read_metrics("gige-cam.capture")
    assert m["reconnects"] >= 1 and m["source"] == uri
    # the camera's own counters ride along with the capture metrics (shown by `frameshm ls`)
    assert m["source_stats"]["delivered"] > 0 and m["lost"] == m["source_stats"]["lost"]
    cap.send_signal(signal.SIGINT)
    assert cap.wait(20) == 0  # a clean stop: the stream is closed and removed


def _exists(name):
    try:
        frameshm.stream_info(name)
        return True
    except frameshm.StreamNotFound:
        return False


def test_ctrl_c_is_prompt_while_the_camera_is_silent(gv_camera, spawn):
    """A camera that stopped answering (paused, unplugged, not yet declared gone) must not
    hold up Ctrl-C while its connection is released."""
    uri = f"gige:{IP}?pixel_format=Mono8&width=320&height=240&fps=30&packet_size=1400"
    cap = spawn(
        "from frameshm.cli import main\n"
        f"sys.exit(main(['capture', '--frames', 'silent-cam', '--source', {uri!r}, '--standby-fps', '30']))\n",
        label="capture",
    )
    wait_until(lambda: _exists("silent-cam"), 20, what="the capture stream")
    with frameshm.Reader("silent-cam", consumer="probe", spin=False) as r:
        assert r.wait_latest(5).array.shape == (240, 320)
    gv_camera.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        cap.send_signal(signal.SIGINT)
        rc = cap.wait(20)
        took = time.monotonic() - t0
    finally:
        gv_camera.proc.send_signal(signal.SIGCONT)
    print(f"capture stopped {took:.2f} s after Ctrl-C with the camera silent")
    assert rc == 0, cap.stderr[-2000:]
    assert took < 1.5, (took, cap.stderr[-3000:])
