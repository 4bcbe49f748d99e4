"""frameshm.Camera and the v4l2 source against the deterministic fake V4L2 device
(tests/c/fake_v4l2.c) selected through the test-only FRAMESHM_V4L2_BACKEND hook: what
PipeWire's emulation cannot show - zero-copy buffer lifetime, ENODEV mid-stream and
reconnection (also through the capture producer), EBUSY, permission denied, padded rows,
rate control, flush, signals. The real ioctl/mmap/libv4l2 path is test_v4l2_pipewire.py.

Fake frames: row y, byte x = (x + y + 4n) & 0xff, padding 0xEE, bytes 0..3 = n (the
driver sequence number); timestamps are the frames' exact capture instants."""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
import time

import numpy as np
import pytest

import frameshm
from frameshm import camera as fcam
from frameshm.sources import SourceGone, open_source

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"))
from fake_backend import FakeV4L2, build  # noqa: E402
from pattern import yuyv_to_rgb24  # noqa: E402

from fshm_helpers import child_env, run_snippet, wait_until  # noqa: E402

DEV = "/dev/video0"


@pytest.fixture(scope="module")
def fake_so():
    return build()


@pytest.fixture
def fake(fake_so, monkeypatch):
    """The fake backend for every camera this test opens; checks nothing stays mapped."""
    monkeypatch.setenv("FRAMESHM_V4L2_BACKEND", fake_so)
    f = FakeV4L2(fake_so)
    f.reset()
    yield f
    gc.collect()
    leaked = f.live_mappings()
    f.reset()
    assert leaked == 0, f"{leaked} buffer mapping(s) left behind"


def fake_raw(n: int, w: int, h: int, bpp: int) -> np.ndarray:
    """The fake's packed frame n: (h, w*bpp) uint8."""
    row = w * bpp
    a = ((np.arange(row)[None, :] + np.arange(h)[:, None] + 4 * n) & 0xFF).astype(np.uint8)
    a.reshape(-1)[:4] = np.frombuffer((n & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    return a


def check_fake(arr, n: int, bpp: int):
    a = np.asarray(arr)
    h, w = a.shape[0], a.shape[1]
    np.testing.assert_array_equal(a.reshape(h, w * bpp), fake_raw(n, w, h, bpp))


# ---- zero-copy frames ----------------------------------------------------------------------


def test_zero_copy_view_is_the_driver_buffer_and_outlives_release(fake):
    fake.configure(f"path={DEV} formats=YUYV:64x48@200 pad=24")
    with frameshm.Camera(DEV, 64, 48, format="YUYV", buffers=2) as cam:
        assert (cam.format, cam.shape, cam.dtype, cam.buffers, cam.bytesperline) == ("YUYV", (48, 64, 2), np.uint8, 2, 152)
        assert cam.info["backend"] == "fake" and cam.info["driver"] == "fshm-fake"
        f = cam.read(timeout=2)
        a = f.array
        assert a.shape == (48, 64, 2) and a.strides == (152, 2, 1), "a strided view of the padded driver rows"
        assert not a.flags.writeable and not a.flags.owndata
        with pytest.raises(ValueError):
            a[0, 0, 0] = 1
        check_fake(a, f.sequence, 2)
        assert f.driver_timestamp and f.timestamp_ns <= f.dequeue_ns
        tail = a[40:]
        assert f.release() is False, "views alive: the buffer must not go back yet"
        assert fake.stats(DEV)["queued"] == 1, "only the other buffer is with the driver"
        g = cam.read(timeout=2)
        with pytest.raises(fcam.BuffersExhausted, match="all 2 buffers"):
            cam.read(timeout=0.5)
        # the held buffer keeps its frame although the device keeps capturing
        time.sleep(0.03)
        check_fake(a, f.sequence, 2)
        del a
        assert fake.stats(DEV)["queued"] == 0, "a slice of the view is still alive"
        del tail
        assert fake.stats(DEV)["queued"] == 1, "last view gone: requeued"
        with pytest.raises(BufferError):
            memoryview(f._buf)
        g.release()
        h = cam.read(timeout=2)
        assert h.sequence > g.sequence
        h.release()
        assert cam.stats["held"] == 0


def test_frames_iterator_releases_each_frame(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@500")
    with frameshm.Camera(DEV, format="GRAY8", buffers=2) as cam:
        seqs = []
        for f in cam.frames(timeout=2):
            check_fake(f.array, f.sequence, 1)
            seqs.append(f.sequence)
            assert cam.stats["held"] == 1
            if len(seqs) == 20:
                break
        assert seqs == sorted(seqs) and len(set(seqs)) == 20
    # a frame garbage collected without release goes back too
    fake.configure(f"path={DEV} formats=GREY:32x16@500")
    with frameshm.Camera(DEV, buffers=2) as cam:
        for _ in range(10):
            cam.read(timeout=2)  # dropped at once
        assert cam.stats["held"] == 0


def test_frames_iterator_ends_when_no_frame_comes_in_time(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@2")
    with frameshm.Camera(DEV, format="GRAY8", buffers=2) as cam:
        got = [f.sequence for f in cam.frames(timeout=0.05)]   # ends at the first gap
        assert len(got) <= 1 and cam.stats["held"] == 0


def test_close_with_views_alive_keeps_their_memory(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@200")
    cam = frameshm.Camera(DEV, buffers=3)
    f = cam.read(timeout=2)
    a = f.array
    cam.close()
    assert cam.closed and fake.stats(DEV)["streaming"] == 0, "closing stops the capture at once"
    assert fake.stats(DEV)["open_fds"] == 1, "the device stays open while a view is alive"
    check_fake(a, f.sequence, 1)
    with pytest.raises(frameshm.StreamClosed):
        cam.read(timeout=1)
    del a, f
    gc.collect()
    assert fake.stats(DEV)["open_fds"] == 0 and fake.live_mappings() == 0


# ---- errors ---------------------------------------------------------------------------------


def test_error_classes_and_messages(fake):
    fake.configure(f"path={DEV} formats=YUYV:64x48@30,YUYV:32x24@30")
    with pytest.raises(fcam.DeviceNotFound, match="/dev/video5") as ei:
        frameshm.Camera("/dev/video5")
    assert isinstance(ei.value, FileNotFoundError) and ei.value.errno == errno.ENOENT
    fake.configure("path=/dev/video1 eacces=1")
    with pytest.raises(fcam.DevicePermissionError, match="video' group") as ei:
        frameshm.Camera("/dev/video1")
    assert isinstance(ei.value, PermissionError)
    with pytest.raises(fcam.UnsupportedFormat, match=r"64x48, 32x24") as ei:
        frameshm.Camera(DEV, 640, 480)
    assert isinstance(ei.value, frameshm.InvalidArgument) and isinstance(ei.value, ValueError)
    with pytest.raises(fcam.UnsupportedFormat, match="H264.*offers: YUYV"):
        frameshm.Camera(DEV, format="H264")
    with pytest.raises(frameshm.InvalidArgument, match="width and height"):
        frameshm.Camera(DEV, width=64)
    with pytest.raises(frameshm.InvalidArgument, match="fourcc"):
        frameshm.Camera(DEV, format="RGB888")
    with pytest.raises(frameshm.InvalidArgument, match="fps"):
        frameshm.Camera(DEV, fps=-5)
    # busy: the second capture of the same device
    with frameshm.Camera(DEV, 64, 48) as first:
        with pytest.raises(fcam.DeviceBusy, match="another process is capturing") as ei:
            frameshm.Camera(DEV, 64, 48)
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.EBUSY
        first.read(timeout=2).release()
    assert fake.stats(DEV)["open_fds"] == 0


@pytest.mark.skipif(not fcam.HAVE_LIBV4L2, reason="needs libv4l2 (the real backend)")
def test_not_a_camera_through_libv4l2(monkeypatch):
    monkeypatch.delenv("FRAMESHM_V4L2_BACKEND", raising=False)
    with pytest.raises(fcam.NotACamera, match="not a V4L2 device"):
        frameshm.Camera("/dev/null")


SIGNAL_CHILD = """
import os, signal, sys, threading, time
import numpy as np
import frameshm
sys.path.insert(0, {harness!r})
from fake_backend import FakeV4L2
fake = FakeV4L2({fake_so!r})
fake.reset()
fake.configure("path={dev} formats=GREY:32x16@1")

def check_fake(a, n):
    a = np.asarray(a)
    h, w = a.shape
    want = ((np.arange(w)[None, :] + np.arange(h)[:, None] + 4 * n) & 0xFF).astype(np.uint8)
    want.reshape(-1)[:4] = np.frombuffer((n & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    assert (a == want).all(), "frame content"

class Alarm(Exception):
    pass

def on_alarm(signum, frame):
    raise Alarm()

with frameshm.Camera({dev!r}) as cam:
    cam.read(timeout=3).release()  # the next frame is a second away
    t0 = time.monotonic()
    try:
        cam.read(timeout=0.05)
        raise AssertionError("no Timeout")
    except frameshm.Timeout as exc:
        assert "within 0.050" in str(exc), exc
    assert time.monotonic() - t0 < 0.5
    signal.signal(signal.SIGALRM, on_alarm)
    timers = []
    for to_main_thread in (True, False):
        # pthread_kill interrupts this thread's wait (EINTR); a signal another thread
        # takes does not, and is still handled within a wait slice.
        main = threading.main_thread().ident
        sent = []

        def fire():
            sent.append(time.monotonic())
            if to_main_thread:
                signal.pthread_kill(main, signal.SIGALRM)
            else:
                os.kill(os.getpid(), signal.SIGALRM)

        # On a loaded machine the timer thread may run late, after the 1 fps frame came:
        # then take the frame, absorb the late alarm, and try again.
        for _attempt in range(10):
            timer = threading.Timer(0.1, fire)
            timers.append(timer)
            timer.start()
            try:
                cam.read(timeout=10).release()
            except Alarm:
                caught = time.monotonic()
                timer.join()
                break
            try:
                timer.join()
                time.sleep(0.5)   # the late alarm's handler runs here
            except Alarm:
                pass
            sent.clear()
        else:
            raise AssertionError("the alarm never came during a wait in 10 tries")
        assert caught - sent[0] < 1.0, "the handler runs while the wait releases the GIL"
    for t in timers:
        t.join()
    f = cam.read(timeout=3)  # still usable afterwards
    check_fake(f.array, f.sequence)
    f.release()
print("OK", fake.live_mappings(), flush=True)
"""


def test_timeout_and_signal_during_a_wait(fake_so):
    """Camera.read() times out on time, and a signal whose Python handler raises ends a
    wait promptly (delivered to the waiting thread or to another one).

    It runs in a fresh interpreter: in the full suite, after other test files had loaded
    large native libraries into the pytest process, the kernel sometimes could not deliver
    SIGALRM to the main thread at all (a core dump showed SIGSEGV with si_code SI_KERNEL -
    a signal frame that could not be set up - while the thread slept in the fake device's
    nanosleep; frameshm sets no alternate signal stack or protection key). This checks
    frameshm's behaviour, not that process state."""
    code = SIGNAL_CHILD.format(harness=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"),
                               fake_so=fake_so, dev=DEV)
    env = dict(child_env(), FRAMESHM_V4L2_BACKEND=fake_so)
    rc, out, err = run_snippet(code, timeout=120, env=env)
    assert rc == 0, f"rc={rc}: {err[-3000:]}"
    assert "OK 0" in out, (out, err[-2000:])


def test_device_gone_midstream_then_back(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@200 gone_after=4 gone_ms=300")
    cam = frameshm.Camera(DEV)
    out = np.empty(cam.shape, cam.dtype)
    for _ in range(4):
        cam.read_into(out, timeout=2)
    with pytest.raises(fcam.DeviceGone, match="disappeared") as ei:
        cam.read_into(out, timeout=2)
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENODEV
    assert cam.gone
    cam.close()
    with pytest.raises(fcam.DeviceNotFound):
        frameshm.Camera(DEV)
    again = wait_until(lambda: _try_open(DEV), 5, what="the device to come back")
    with again:
        ts = again.read_into(out, timeout=2)
        assert ts > 0 and int.from_bytes(out.reshape(-1)[:4].tobytes(), "little") >= 0


def _try_open(path):
    try:
        return frameshm.Camera(path)
    except fcam.DeviceNotFound:
        return None


# ---- rate, flush, one-copy paths ---------------------------------------------------------


def test_frame_rate_by_the_device_and_in_software(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@100")
    with frameshm.Camera(DEV, fps=25, buffers=8) as cam:
        assert cam.fps == 25 and cam.rate_limit is None
        ts = [cam.read(timeout=2) for _ in range(5)]
        gaps = np.diff([f.timestamp_ns for f in ts])
        # the device paces: capture instants 40 ms apart (80 if a stalled test lost one)
        assert np.all(gaps % 40_000_000 == 0) and (gaps == 40_000_000).sum() >= 3, gaps
        for f in ts:
            f.release()
        assert cam.set_rate(50) is True and cam.fps == 50
        assert cam.set_rate(None) is True and cam.fps == 25
    fake.configure(f"path={DEV} formats=GREY:32x16@100 timeperframe=0")
    with frameshm.Camera(DEV, fps=20, buffers=8) as cam:
        assert cam.fps == 100 and cam.rate_limit == 20, "no rate control: frameshm drops frames"
        stamps = []
        for f in cam.frames(timeout=2):
            stamps.append(f.timestamp_ns)
            if len(stamps) == 6:
                break
        gaps = np.diff(stamps)
        assert gaps.min() >= 50_000_000 - 12_500_000 and (gaps == 50_000_000).sum() >= 3
        assert cam.stats["rate_dropped"] >= 12
        assert cam.set_rate(None) is False and cam.rate_limit == 20


def test_flush_discards_frames_older_than_the_age(fake):
    fake.configure(f"path={DEV} formats=GREY:32x16@100")
    with frameshm.Camera(DEV, buffers=4) as cam:
        time.sleep(0.15)  # the four buffers hold the stream's first frames
        assert cam.flush(max_age=10.0) == 0
        n = cam.flush(max_age=0.05)
        assert n == 4
        f = cam.read(timeout=2)
        assert f.sequence >= 10 and f.latency_ns < 2_000_000_000
        f.release()
        assert cam.stats["flushed"] == 4
        with pytest.raises(frameshm.InvalidArgument):
            cam.flush(-1)


def test_read_into_and_capture_to_a_stream(fake, name):
    fake.configure(f"path={DEV} formats=YUYV:64x48@200 pad=8")
    with frameshm.Camera(DEV, format="YUYV") as cam, \
            frameshm.Writer(name, shape=cam.shape, dtype=cam.dtype) as w, frameshm.Reader(name) as r:
        out = np.empty(cam.shape, cam.dtype)
        ts = cam.read_into(out, timeout=2)
        check_fake(out, int.from_bytes(out.reshape(-1)[:4].tobytes(), "little"), 2)
        assert ts <= time.monotonic_ns()
        with pytest.raises(frameshm.InvalidArgument, match="frames are 6144 bytes"):
            cam.read_into(np.empty(100, np.uint8), timeout=1)
        with pytest.raises((BufferError, TypeError, ValueError)):
            cam.read_into(out[:, ::2], timeout=1)  # not contiguous
        for _ in range(3):
            seq = cam.capture_to(w, timeout=2)
            f = r.wait_next(timeout=2)
            assert f.seq == seq and f.shape == (48, 64, 2)
            n = int.from_bytes(f.array.reshape(-1)[:4].tobytes(), "little")
            check_fake(f.array, n, 2)
            assert f.timestamp_ns < f.publish_ns, "the slot carries the driver's capture time"
        assert cam.stats["held"] == 0


def test_gray8_and_rgb24_conversions(fake):
    fake.configure(f"path={DEV} formats=YUYV:64x48@200 pad=4")
    with frameshm.Camera(DEV, format="GRAY8") as cam:
        assert (cam.format, cam.native_format, cam.converted, cam.shape) == ("GREY", "YUYV", True, (48, 64))
        with cam.read(timeout=2) as f:
            assert f.array.strides == (64, 1)
            np.testing.assert_array_equal(f.array, fake_raw(f.sequence, 64, 48, 2)[:, 0::2])
    if not fcam.HAVE_LIBV4L2:
        with pytest.raises(fcam.UnsupportedFormat, match="needs libv4l2"):
            frameshm.Camera(DEV, format="RGB24")
        return
    for fmt in ("RGB24", "BGR24"):
        with frameshm.Camera(DEV, format=fmt) as cam:
            assert cam.shape == (48, 64, 3) and cam.converted
            out = np.empty(cam.shape, np.uint8)
            for _ in range(2):
                cam.read_into(out, timeout=2)
                with cam.read(timeout=2) as f:
                    want = yuyv_to_rgb24(fake_raw(f.sequence, 64, 48, 2), 64, 48)
                    if fmt == "BGR24":
                        want = want[..., ::-1]
                    assert np.abs(f.array.astype(int) - want).max() <= 1


def test_formats_listing(fake):
    fake.configure(f"path={DEV} formats=YUYV:64x48@30,YUYV:32x24@60,GREY:16x8@10")
    cam = frameshm.Camera(DEV, start=False)
    try:
        fmts = {f["format"]: f for f in cam.formats()}
        assert fmts["YUYV"]["native"] and fmts["YUYV"]["sizes"] == [
            {"width": 64, "height": 48, "fps": [30.0, 15.0, 10.0, 5.0]},
            {"width": 32, "height": 24, "fps": [60.0, 30.0, 20.0, 10.0]}]
        assert fmts["GREY"]["native"] and [(s["width"], s["height"]) for s in fmts["GREY"]["sizes"]] == [(16, 8)]
        if fcam.HAVE_LIBV4L2:
            assert not fmts["RGB3"]["native"] and fmts["RGB3"]["source"] == "YUYV"
        with pytest.raises(frameshm.InvalidArgument, match="not started"):
            cam.shape
        cam.start()
        assert cam.shape == (48, 64, 2)
        assert "YUYV 64x48" in repr(cam)
    finally:
        cam.close()


# ---- the v4l2 source --------------------------------------------------------------------------


def test_v4l2_source_reads_into_loaned_slots_and_reconnects(fake, name):
    fake.configure(f"path={DEV} formats=GREY:64x48@200,GREY:32x16@200")
    src = open_source("v4l2:/dev/video0?width=64&height=48&format=GRAY8&fps=100&buffers=4")
    src.open()
    assert tuple(src.shape) == (48, 64) and src.dtype == np.uint8
    assert src.set_rate(50) is True
    with frameshm.Writer(name, shape=src.shape, dtype=src.dtype) as w, frameshm.Reader(name) as r:
        for _ in range(3):
            view = w.loan()
            ts = src.read_into(view, 2.0)
            w.commit(ts)
            f = r.wait_next(timeout=2)
            check_fake(f.array, int.from_bytes(f.array.reshape(-1)[:4].tobytes(), "little"), 1)
            assert f.timestamp_ns == ts
        fake.unplug(DEV)
        with pytest.raises(SourceGone, match="disappeared"):
            src.read_into(w.loan(), 2.0)
        src.close()
        with pytest.raises(OSError):  # what the capture producer retries on
            src.open()
        fake.replug(DEV)
        src.open()
        assert src.cam.rate_limit is None and src.cam.fps == 50, "the last rate is applied again"
        view = w.loan()
        w.commit(src.read_into(view, 2.0))
        assert src.flush(0) >= 0
    src.close()
    src.close()  # idempotent


def test_v4l2_source_parameters(fake):
    from frameshm.errors import InvalidArgument

    for uri, msg in [("v4l2:/dev/video0?widht=64", "unknown parameter"), ("v4l2:/dev/video0?width=64", "both"),
                     ("v4l2:/dev/video0?fps=fast", "not a number"), ("v4l2:/dev/video0?buffers=0", "positive")]:
        with pytest.raises(InvalidArgument, match=msg):
            open_source(uri)
    fake.configure(f"path={DEV} formats=GREY:16x8@100")
    src = open_source("v4l2:")
    assert src.path == "/dev/video0"
    src.open()
    assert tuple(src.shape) == (8, 16)
    src.close()


# ---- through the capture producer ------------------------------------------------------------


def test_capture_producer_reconnects_to_a_camera_that_comes_back(spawn, fake_so):
    """The real capture role (frameshm capture) on a v4l2: source whose device vanishes
    (ENODEV) after 30 frames and is back 0.5 s later: the stream stays up (same epoch),
    frames resume, every frame holds the fake's pattern."""
    from frameshm.roles import read_metrics

    name = "v4l2-gone"  # short: the producer adds ".capture" for its metrics stream
    env = {"FRAMESHM_V4L2_BACKEND": fake_so,
           "FSHM_FAKE_V4L2": f"path={DEV} formats=GREY:64x48@50 gone_after=30 gone_ms=500"}
    cap = spawn("from frameshm.cli import main\nsys.exit(main(%r))\n" % ([
        "capture", "--frames", name, "--source", "v4l2:/dev/video0?format=GRAY8&width=64&height=48",
        "--standby-fps", "50", "--set", "capture.reconnect_interval_s=0.2"],), label="capture", env_extra=env)
    r = wait_until(lambda: _reader(name), 20, what="the frames stream")
    got = []
    try:
        def enough():
            try:
                f = r.wait_next(timeout=0.5)
            except frameshm.Timeout:
                return False
            got.append((f.seq, f.timestamp_ns, f.array.copy()))
            return len(got) >= 60

        try:
            wait_until(enough, 30, interval=0, what="60 frames across the outage")
        except AssertionError:
            raise AssertionError(f"{len(got)} frames; producer rc={cap.proc.poll()} out={cap.output} log:\n{cap.stderr}")
        m = read_metrics(name + ".capture")
        epoch = frameshm.stream_info(name)["epoch"]
        cap.send_signal(signal.SIGTERM)
        assert cap.wait(20) == 0, cap.stderr
    finally:
        r.close()
    assert m["reconnects"] >= 1, m
    assert epoch == 1, "the stream stays up across the reconnect"
    assert "source gone" in cap.stderr and "disappeared" in cap.stderr
    for _seq, _ts, a in got:
        check_fake(a, int.from_bytes(a.reshape(-1)[:4].tobytes(), "little"), 1)
    gaps = np.diff([ts for _, ts, _ in got])
    assert gaps.max() >= 400_000_000, "the outage shows as a gap in capture time"


def _reader(name):
    try:
        return frameshm.Reader(name, consumer="probe", spin=False)
    except frameshm.StreamNotFound:
        return None
