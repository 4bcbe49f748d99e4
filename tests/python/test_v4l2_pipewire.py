"""The real V4L2 path - open/ioctl/mmap/poll through libv4l2, conversions through
libv4lconvert - against PipeWire's V4L2 emulation (tests/harness: a private PipeWire +
WirePlumber and a fresh fake camera node per capture process, reached as /dev/video0
through the pw-v4l2 LD_PRELOAD library).

Every frame is checked byte for byte against the fake camera's pattern for the counter
it carries (tests/harness/pattern.py): raw YUYV, libv4l2-converted RGB24/BGR24, GRAY8, both
delivery paths (zero-copy views and one copy into a stream slot), and the capture producer
reading a v4l2: source. Each capture runs in its own child process (PipeWire 0.3.65's
emulation serves one capture session per camera node and process), so the test process
itself is never preloaded.

Skipped, with the reason, only when the harness's apt packages (scripts/setup.sh) or
libv4l-dev at build time are missing."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

import frameshm
from frameshm import camera as fcam

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness")
sys.path.insert(0, HARNESS)
import harness  # noqa: E402
from pattern import check_delivered, distinct_unless_rewritten  # noqa: E402

from fshm_helpers import child_env, pipewire_harness_or_skip, run_snippet, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def pw():
    with pipewire_harness_or_skip(harness, None if fcam.HAVE_LIBV4L2 else
                                  "frameshm was built without libv4l2 (apt-get install libv4l-dev, then "
                                  "pip install -e .)") as h:
        yield h


@pytest.fixture
def camera(pw):
    """camera(formats) -> a fresh fake camera node, removed at teardown."""
    cams = []

    def start(formats):
        cam = pw.camera(formats)
        cams.append(cam)
        return cam

    yield start
    for cam in cams:
        cam.stop()


PRELUDE = f"""
sys.path.insert(0, {os.path.abspath(HARNESS)!r})
from pattern import check_frame, check_delivered, decode
import atexit, pattern
from frameshm import camera as fcam
# The emulation rewrites buffers the application holds (see pattern.py): a starved child
# may see such an overwrite; it is accepted only when it is one, and reported.
pattern.EMULATION_OVERWRITES = True
atexit.register(lambda: pattern.OVERWRITTEN and print("frames overwritten by the emulation while held:",
                                                      pattern.OVERWRITTEN, file=sys.stderr))
def now_us():
    return time.monotonic_ns() // 1000
def age_us(ts_us):
    # capture time (us mod 2^32) -> microseconds before now
    return (now_us() - ts_us) % (1 << 32)
def seen(frame, fmt, native, timestamp_ns, tolerance=0):
    # [counter, rewritten after its dequeue] (distinct_unless_rewritten in the test)
    n, _, rewritten = check_delivered(frame, fmt, native, timestamp_ns, tolerance)
    return [n, rewritten]
"""


def run_capture(cam, code: str, timeout: float = 60):
    """Runs `code` in a child under the preload against `cam`; returns its RESULT json."""
    rc, out, err = run_snippet(PRELUDE + code, timeout=timeout, env=cam.env(child_env()))
    if rc != 0:
        raise AssertionError(f"capture child failed (rc={rc}):\n{err[-4000:]}\ncamera log:\n{cam.log()}")
    lines = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line; stdout={out[-2000:]!r} stderr={err[-2000:]}"
    return json.loads(lines[-1])


def test_raw_yuyv_zero_copy_one_copy_and_into_a_stream(camera):
    cam = camera(["YUYV:640x480@30", "YUYV:320x240@30", "RGB3:640x480@30"])
    res = run_capture(cam, """
cam = frameshm.Camera("/dev/video0", 640, 480, 30, "YUYV", buffers=4)
res = {"info": cam.info, "formats": cam.formats(), "shape": cam.shape, "bpl": cam.bytesperline,
       "fps": cam.fps, "buffers": cam.buffers}
zc = []
for f in cam.frames(timeout=5):
    n, ts_us, rewritten = check_delivered(f.array, "YUYV", "YUYV", f.timestamp_ns)   # zero-copy view of the driver buffer
    zc.append([n, f.sequence, f.timestamp_ns, f.driver_timestamp, age_us(ts_us) - (time.monotonic_ns() - f.timestamp_ns) // 1000,
               rewritten])
    if len(zc) == 10:
        break
out = np.empty(cam.shape, cam.dtype)
rd = []
for _ in range(5):
    ts = cam.read_into(out, 5)                               # one copy
    rd.append(seen(out, "YUYV", "YUYV", ts))
w = frameshm.Writer("pw-yuyv", shape=cam.shape, dtype=cam.dtype)
r = frameshm.Reader("pw-yuyv")
st = []
for _ in range(5):
    seq = cam.capture_to(w, 5)                               # straight into a slot
    f = r.wait_next(5)
    st.append([seq, f.seq] + seen(f.array, "YUYV", "YUYV", f.timestamp_ns))
res.update(zc=zc, rd=rd, st=st, held=cam.stats["held"])
r.close(); w.close(); cam.close()
say("RESULT", json.dumps(res, default=str))
""")
    assert res["info"]["driver"] == "PipeWire" and res["info"]["backend"] == "libv4l2"
    fmts = {f["format"]: f for f in res["formats"]}
    assert fmts["YUYV"]["native"] and [(s["width"], s["height"]) for s in fmts["YUYV"]["sizes"]] == [(640, 480), (320, 240)]
    assert fmts["YUYV"]["sizes"][0]["fps"] == [], "the emulation has no VIDIOC_ENUM_FRAMEINTERVALS"
    assert fmts["RGB3"]["native"] and not fmts["GREY"]["native"] and fmts["GREY"]["source"] == "YUYV"
    assert tuple(res["shape"]) == (480, 640, 2) and res["bpl"] == 1280 and res["fps"] == 30.0
    assert res["buffers"] == 4
    # PipeWire's emulation may write a later frame into a buffer it has handed out
    # (tests/harness/pattern.py): such a copy is told by its capture time and left out.
    zc, rd, st = [[z[0], z[5]] for z in res["zc"]], res["rd"], [s[2:] for s in res["st"]]
    distinct_unless_rewritten(zc + rd + st)
    zc, rd, st = (distinct_unless_rewritten(x) for x in (zc, rd, st))
    assert max(rd) > max(zc) and max(st) > max(rd)
    seqs = [z[1] for z in res["zc"]]
    assert seqs == sorted(seqs)
    stamps = [z[2] for z in res["zc"]]
    assert all(z[3] for z in res["zc"]), "the driver's CLOCK_MONOTONIC timestamps are used"
    assert stamps == sorted(stamps)
    # the driver timestamp is not before the fake camera captured the frame (1 ms slack
    # for the barcode's microsecond rounding), nor seconds later
    assert all(-1000 <= z[4] < 5_000_000 for z in res["zc"] if not z[5]), [z[4] for z in res["zc"]]
    assert [s[0] for s in res["st"]] == [s[1] for s in res["st"]] == list(range(5))


def test_rgb24_converted_by_libv4l2_both_paths(camera):
    cam = camera(["YUYV:640x480@30"])
    res = run_capture(cam, """
cam = frameshm.Camera("/dev/video0", 640, 480, format="RGB24")
res = {"format": cam.format, "native": cam.native_format, "converted": cam.converted, "shape": cam.shape}
zc = []
for f in cam.frames(timeout=5):
    zc.append(seen(f.array, "RGB3", "YUYV", f.timestamp_ns, tolerance=1))
    if len(zc) == 8:
        break
w = frameshm.Writer("pw-rgb", shape=cam.shape, dtype=cam.dtype)
r = frameshm.Reader("pw-rgb")
st = []
for _ in range(8):
    cam.capture_to(w, 5)
    f = r.wait_next(5)
    st.append(seen(f.array, "RGB3", "YUYV", f.timestamp_ns, tolerance=1))
res.update(zc=zc, st=st)
r.close(); w.close(); cam.close()
say("RESULT", json.dumps(res))
""")
    assert (res["format"], res["native"], res["converted"], tuple(res["shape"])) == ("RGB3", "YUYV", True, (480, 640, 3))
    distinct_unless_rewritten(res["zc"] + res["st"])


@pytest.mark.parametrize("fmt,check", [("BGR24", "BGR3"), ("GRAY8", "GREY")])
def test_bgr24_and_gray8_from_yuyv(camera, fmt, check):
    cam = camera(["YUYV:320x240@30"])
    res = run_capture(cam, f"""
cam = frameshm.Camera("/dev/video0", format={fmt!r})
out = np.empty(cam.shape, cam.dtype)
got = []
for _ in range(6):
    ts = cam.read_into(out, 5)
    got.append(seen(out, {check!r}, "YUYV", ts, tolerance=1))
say("RESULT", json.dumps({{"shape": cam.shape, "got": got}}))
cam.close()
""")
    assert tuple(res["shape"]) == ((240, 320, 3) if fmt == "BGR24" else (240, 320))
    distinct_unless_rewritten(res["got"])


def test_native_rgb24_with_the_emulations_wrong_bytesperline(camera):
    """PipeWire's emulation reports 4 bytes per pixel for RGB3 while its buffers hold 3:
    frameshm must take the buffers' word for it (or every view would be garbage)."""
    cam = camera(["RGB3:640x480@30"])
    res = run_capture(cam, """
cam = frameshm.Camera("/dev/video0", format="RGB24")
got = []
for f in cam.frames(timeout=5):
    got.append(seen(f.array, "RGB3", "RGB3", f.timestamp_ns))
    strides = f.array.strides
    if len(got) == 5:
        break
say("RESULT", json.dumps({"converted": cam.converted, "bpl": cam.bytesperline, "strides": strides, "got": got}))
cam.close()
""")
    assert res["converted"] is False and res["bpl"] == 1920 and tuple(res["strides"]) == (1920, 3, 1)
    distinct_unless_rewritten(res["got"])


def test_busy_size_and_rate_on_the_real_path(camera):
    cam = camera(["YUYV:640x480@30", "YUYV:320x240@30"])
    res = run_capture(cam, """
res = {}
try:
    frameshm.Camera("/dev/video0", 800, 600)
except fcam.UnsupportedFormat as exc:
    res["size"] = str(exc)
cam = frameshm.Camera("/dev/video0", 320, 240, format="YUYV")
try:
    frameshm.Camera("/dev/video0", 320, 240)
except fcam.DeviceBusy as exc:
    res["busy"] = [exc.errno, str(exc)]
check_frame(cam.read(timeout=5).array, "YUYV", "YUYV")   # the owner carries on
# The emulation accepts VIDIOC_S_PARM but keeps 30 fps: frameshm limits the rate itself.
res["paced"] = cam.set_rate(10)
res["limit"] = cam.rate_limit
t0 = time.monotonic()
n = 0
while time.monotonic() - t0 < 2.0:
    with cam.read(timeout=5) as f:
        check_frame(f.array, "YUYV", "YUYV")
    n += 1
res["n"] = n
res["dropped"] = cam.stats["rate_dropped"]
cam.close()
say("RESULT", json.dumps(res))
""")
    assert "640x480, 320x240" in res["size"]
    assert res["busy"][0] == 16 and "busy" in res["busy"][1]
    assert res["paced"] is False and res["limit"] == 10.0
    assert 5 <= res["n"] <= 24, res  # ~20 of the camera's ~60 frames in 2 s
    assert res["dropped"] >= 2 * res["n"] - 4, res


def test_camera_node_removed_midstream_then_a_new_one(camera, tmp_path):
    """PipeWire's emulation never says ENODEV: when the camera node goes away, VIDIOC_DQBUF
    fails with EINVAL on the running queue, which frameshm reports as DeviceGone too. After
    reopening, the capture goes on from the next camera node."""
    from fshm_helpers import Child

    first = camera(["YUYV:320x240@30"])
    nxt = tmp_path / "next-serial"
    code = PRELUDE + f"NEXT = {str(nxt)!r}\n" + """
cam = frameshm.Camera("/dev/video0", format="YUYV")
out = np.empty(cam.shape, cam.dtype)
cam.read_into(out, 5)
say("STREAMING", check_frame(out, "YUYV", "YUYV")[0])
try:
    while True:
        cam.read_into(out, 5.0)
except fcam.DeviceGone as exc:
    gone = str(exc)
cam.close()
say("GONE")
while not os.path.exists(NEXT):   # the next node's serial (stdin is the prelude's)
    time.sleep(0.01)
os.environ["PIPEWIRE_V4L2_TARGET"] = open(NEXT).read().strip()
cam = frameshm.Camera("/dev/video0", format="YUYV")
got = []
for _ in range(5):
    ts = cam.read_into(out, 5)
    got.append(seen(out, "YUYV", "YUYV", ts))
cam.close()
say("RESULT", json.dumps({"gone": gone, "got": got}))
"""
    child = Child(code, env=first.env(child_env()), label="capture")
    try:
        child.expect("STREAMING", timeout=30)
        first.stop()
        child.expect("GONE", timeout=30)
        second = camera(["YUYV:320x240@30"])
        tmp = tmp_path / "tmp"
        tmp.write_text(second.serial)
        tmp.rename(nxt)
        res = json.loads(child.expect("RESULT", timeout=30))
        assert child.wait(30) == 0, child.stderr
    finally:
        child.cleanup()
    assert "stopped streaming by itself" in res["gone"]
    distinct_unless_rewritten(res["got"])


def test_capture_producer_on_a_v4l2_source_reconnects_to_a_new_node(camera, spawn):
    """frameshm capture with a v4l2: source (read_into = one conversion into the loaned
    slot): every frame in the stream is the camera's, converted to RGB24. The camera node
    then goes away (like an unplug: without PIPEWIRE_V4L2_TARGET, /dev/video0 is absent
    until a node exists) and a new one appears: the producer reconnects, the stream stays."""
    from frameshm.roles import read_metrics

    first = camera(["YUYV:320x240@30"])
    env = first.env(child_env(), target=False)
    extra = {k: env[k] for k in ("LD_PRELOAD", "XDG_RUNTIME_DIR", "PIPEWIRE_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    name = "v4l2-pw"
    cap = spawn("from frameshm.cli import main\nsys.exit(main(%r))\n" % ([
        "capture", "--frames", name, "--source", "v4l2:/dev/video0?format=RGB24&width=320&height=240",
        "--standby-fps", "30", "--set", "capture.reconnect_interval_s=0.2"],), label="capture", env_extra=extra)
    r = wait_until(lambda: _reader(name), 20, what="the frames stream")
    got = []

    def collect(n):
        def enough():
            try:
                f = r.wait_next(timeout=0.5)
            except frameshm.Timeout:
                assert cap.proc.poll() is None, cap.stderr
                return False
            got.append((f.timestamp_ns, f.array.copy()))
            return len(got) >= n
        wait_until(enough, 30, interval=0, what=f"{n} frames from the producer")

    try:
        collect(10)
        first.stop()
        wait_until(lambda: "source gone" in cap.stderr, 20, what="the producer to see the camera go")
        camera(["YUYV:320x240@30"])
        collect(25)
        m = read_metrics(name + ".capture")
        epoch = frameshm.stream_info(name)["epoch"]
        cap.send_signal(signal.SIGTERM)
        assert cap.wait(20) == 0, cap.stderr
    finally:
        r.close()
    assert m["reconnects"] >= 1 and epoch == 1, (m, epoch)
    checked = [check_delivered(a, "RGB3", "YUYV", ts, tolerance=1) for ts, a in got]
    counters = [n for n, _, _ in checked]
    seen = [[n, rewritten] for n, _, rewritten in checked]
    # two cameras, each counting from its start: increasing within each, a restart between
    restarts = sum(1 for a, b in zip(counters, counters[1:]) if b < a - 5)
    assert restarts == 1, counters
    distinct_unless_rewritten(seen[:10])
    distinct_unless_rewritten(seen[10:])
    stamps = [ts for ts, _ in got]
    assert stamps == sorted(stamps)


def _reader(name):
    try:
        return frameshm.Reader(name, consumer="probe", spin=False)
    except frameshm.StreamNotFound:
        return None


def test_pattern_accepts_only_what_an_overwrite_leaves(monkeypatch):
    """The harness's allowance for the emulation's overwrites (pattern.py) must not hide a
    wrong conversion: another frame's rows are accepted, garbage is not."""
    import pattern
    monkeypatch.setattr(pattern, "EMULATION_OVERWRITES", True)
    monkeypatch.setattr(pattern, "OVERWRITTEN", [])
    frame = pattern.expected("RGB3", "YUYV", 640, 480, 7, 1234).copy()
    later = pattern.expected("RGB3", "YUYV", 640, 480, 11, 5678)
    frame[425:] = later[425:]
    frame[424, 341:] = later[424, 341:]   # the overwrite began mid-row
    assert pattern.check_frame(frame, "RGB3", "YUYV", tolerance=1)[0] == 7
    assert pattern.OVERWRITTEN and pattern.OVERWRITTEN[0][0] == 7
    # an overwrite that began inside the counter barcode: its middle row mixes two counters
    torn = pattern.expected("RGB3", "YUYV", 640, 480, 7, 1234).copy()
    torn[13:] = later[13:]
    torn[12, 30:] = later[12, 30:]          # bit 2 from frame 7, bit 3 from 11: reads 15
    assert pattern.decode(torn, "RGB3")[0] not in (7, 11)
    assert pattern.check_frame(torn, "RGB3", "YUYV", tolerance=1)[0] == 7
    torn[13:, :, 0] = 255 - torn[13:, :, 0]   # ... but not when the rest is not a frame
    with pytest.raises(AssertionError, match="bytes differ"):
        pattern.check_frame(torn, "RGB3", "YUYV", tolerance=1)
    for spoil in (lambda f: f.__setitem__((slice(424, None),), 0),             # zeros
                  lambda f: f.__setitem__((slice(424, None),), f[424:, ::-1]),  # mirrored rows
                  lambda f: f.__setitem__((slice(300, 301), slice(0, 20)), 1)):  # a few bytes
        bad = pattern.expected("RGB3", "YUYV", 640, 480, 7, 1234).copy()
        spoil(bad)
        with pytest.raises(AssertionError, match="bytes differ"):
            pattern.check_frame(bad, "RGB3", "YUYV", tolerance=1)


def test_a_frame_twice_passes_only_as_a_rewritten_copy(monkeypatch):
    """The emulation may write a later frame into a buffer it has handed out, so that frame
    is delivered twice (pattern.py): the copy is told by its capture time, after the
    dequeue, or by an overwrite check_frame accepted. Any other repeat still fails."""
    import pattern
    monkeypatch.setattr(pattern, "EMULATION_OVERWRITES", True)
    monkeypatch.setattr(pattern, "OVERWRITTEN", [])
    cap_us = (1 << 32) + 5_000_000          # capture times wrap at 2^32 us
    frame = pattern.expected("RGB3", "YUYV", 640, 480, 21, cap_us % (1 << 32))
    dequeued_before, dequeued_after = (cap_us - 5000) * 1000, (cap_us + 40_000) * 1000
    assert pattern.check_delivered(frame, "RGB3", "YUYV", dequeued_after, tolerance=1) == [21, 5_000_000, False]
    assert pattern.check_delivered(frame, "RGB3", "YUYV", dequeued_before, tolerance=1) == [21, 5_000_000, True]
    assert pattern.check_delivered(frame, "RGB3", "YUYV", cap_us * 1000 - 900_000, tolerance=1)[2] is False  # 1 ms slack
    torn = pattern.expected("RGB3", "YUYV", 640, 480, 7, 1234).copy()
    torn[425:] = frame[425:]
    assert pattern.check_delivered(torn, "RGB3", "YUYV", 1234 * 1000 + 10**6, tolerance=1) == [7, 1234, True]

    assert pattern.distinct_unless_rewritten([[16, False], [21, True], [21, False], [22, False]]) == [16, 21, 22]
    with pytest.raises(AssertionError, match="delivered twice"):
        pattern.distinct_unless_rewritten([[16, False], [21, False], [21, False], [22, False]])
    with pytest.raises(AssertionError, match="most frames were rewritten"):
        pattern.distinct_unless_rewritten([[16, True], [21, True], [21, False]])
