"""The built-in test-pattern source (test: URIs): parameters, stamps, pacing, driver
buffering and flush, the person schedule and trigger, simulated disconnects."""

import os
import time

import numpy as np
import pytest

import frameshm
from frameshm.sources import Source, SourceGone, open_source
from frameshm.sources.test_pattern import STAMP_BYTES, TestPatternSource, read_stamp

pytest.importorskip("skimage")


def opened(uri):
    src = open_source(uri)
    src.open()
    return src


def read(src, n, timeout=2.0):
    out = []
    for _ in range(n):
        buf = np.empty(src.shape, src.dtype)
        ts = src.read_into(buf, timeout)
        out.append((ts, buf))
    return out


@pytest.mark.parametrize(
    "uri, message",
    [
        ("test:?widht=320", "unknown parameter(s) widht"),
        ("test:?width=abc", "width='abc' is not an integer"),
        ("test:?width=4", "width='4' must be an integer 16..16384"),
        ("test:?fps=0", "fps='0' must be a number in (0, 1000]"),
        ("test:?channels=2", "channels='2' must be 1 or 3"),
        ("test:?person=maybe", "person='maybe' must be one of off, on, cycle, file"),
        ("test:?person=file", "person=file needs trigger=<path>"),
        ("test:?trigger=/tmp/x", "trigger= is only used with person=file"),
        ("test:?ratecontrol=perhaps", "ratecontrol='perhaps' is not a boolean"),
        ("test:?on_s=-1&person=cycle", "on_s='-1' must be a number > 0"),
        ("test:/dev/video0", "test source takes no path"),
    ],
)
def test_bad_parameters_are_clear_errors(uri, message):
    with pytest.raises(frameshm.InvalidArgument) as exc:
        open_source(uri)
    assert message in str(exc.value)


def test_is_a_registered_source_with_shape_and_dtype():
    src = open_source("test:?width=64&height=48")
    assert isinstance(src, Source) and isinstance(src, TestPatternSource)
    assert src.shape == (48, 64, 3) and src.dtype == np.uint8
    assert open_source("test:?width=64&height=48&channels=1").shape == (48, 64)
    assert open_source(None).shape == (480, 640, 3)  # None means the test pattern


def test_stamps_carry_order_timestamp_and_integrity():
    src = opened("test:?width=64&height=48&fps=200")
    frames = read(src, 12)
    stamps = [read_stamp(buf) for _, buf in frames]
    assert all(s is not None and s.crc_ok for s in stamps)
    assert [s.timestamp_ns for s in stamps] == [ts for ts, _ in frames]
    nos = [s.frame_no for s in stamps]
    assert nos == sorted(nos) and len(set(nos)) == len(nos)
    assert all(not s.person for s in stamps)
    # one flipped bit anywhere after the stamp breaks the CRC
    buf = frames[-1][1]
    buf.reshape(-1)[STAMP_BYTES + 1000] ^= 1
    assert read_stamp(buf).crc_ok is False
    assert read_stamp(np.zeros((48, 64, 3), np.uint8)) is None
    assert read_stamp(np.zeros(10, np.float32)) is None
    # the picture moves: consecutive frames differ beyond the stamp
    a, b = frames[0][1].reshape(-1)[STAMP_BYTES:], frames[-2][1].reshape(-1)[STAMP_BYTES:]
    assert not np.array_equal(a, b)


def test_render_is_a_pure_function_of_frame_number_and_time():
    src = opened("test:?width=80&height=60&person=cycle&off_s=1&on_s=1")
    ts, buf = read(src, 1)[0]
    again = np.empty_like(buf)
    src.render(again, read_stamp(buf).frame_no, ts)
    assert np.array_equal(buf, again)
    with pytest.raises(frameshm.InvalidArgument):
        TestPatternSource("", {}).render(again, 0, 0)


def test_set_rate_paces_the_source_and_ratecontrol_0_refuses():
    src = opened("test:?width=32&height=32&fps=100")
    assert src.set_rate(20) is True
    read(src, 2)
    t0 = time.monotonic()
    frames = read(src, 10)
    dt = time.monotonic() - t0
    span = (frames[-1][0] - frames[0][0]) / 1e9
    assert 9 * 0.05 * 0.9 <= span <= 9 * 0.05 * 1.1  # capture timestamps are on the 20 fps grid
    assert dt >= 0.4, "reads must wait for the paced sensor"
    with pytest.raises(frameshm.InvalidArgument):
        src.set_rate(0)
    fixed = opened("test:?width=32&height=32&fps=100&ratecontrol=0")
    assert fixed.set_rate(5) is False
    frames = read(fixed, 6)
    assert (frames[-1][0] - frames[0][0]) / 1e9 < 0.2  # still 100 fps: the caller must pace


def test_late_reader_gets_stale_buffered_frames_until_flushed():
    src = opened("test:?width=32&height=32&fps=100&buffers=4")
    time.sleep(0.3)
    ts, _ = read(src, 1)[0]
    assert time.monotonic_ns() - ts > 200e6, "a late read returns the oldest buffered frame"
    assert src.driver_dropped > 0, "frames beyond the 4 buffers are lost, like V4L2"
    time.sleep(0.3)
    flushed = src.flush(int(50e6))
    assert flushed == 4
    ts, _ = read(src, 1)[0]
    assert time.monotonic_ns() - ts < 50e6, "after a flush the next frame is fresh"
    assert src.flush(int(50e6)) == 0
    assert src.flushed == 4


def test_read_times_out_and_checks_the_buffer():
    src = opened("test:?width=32&height=32&fps=1")
    read(src, 1)
    t0 = time.monotonic()
    with pytest.raises(frameshm.Timeout):
        src.read_into(np.empty(src.shape, np.uint8), 0.1)
    assert 0.08 <= time.monotonic() - t0 < 0.6
    with pytest.raises(frameshm.InvalidArgument):
        src.read_into(np.empty((32, 32), np.uint8), 1.0)


def test_person_cycle_schedule():
    src = opened("test:?width=320&height=240&fps=50&person=cycle&off_s=0.3&on_s=0.3")
    stamps = [read_stamp(buf) for _, buf in read(src, 60)]
    flags = [st.person for st in stamps]
    # off for 15 frames, on for 15, off, on (50 fps): at least three changes in order. The
    # runs are counted in the source's frame numbers, not in frames read: a loaded machine
    # makes the realtime source skip frames (runs of 11 and 9 frames read were seen at load 10).
    changes = [stamps[i].frame_no for i in range(1, len(flags)) if flags[i] != flags[i - 1]]
    assert flags[0] is False and len(changes) >= 3
    runs = np.diff(changes)
    assert all(12 <= r <= 18 for r in runs), (runs, [(st.frame_no, st.person) for st in stamps])


def test_person_appears_on_command(tmp_path):
    trigger = tmp_path / "person"
    src = opened(f"test:?width=320&height=240&fps=100&person=file&trigger={trigger}")
    off = read(src, 1)[0][1]
    assert read_stamp(off).person is False
    trigger.touch()
    on = read(src, 1)[0][1]
    assert read_stamp(on).person is True
    # the photograph is really there: a large part of the frame changed
    assert np.mean(np.abs(on.astype(int) - off.astype(int)) > 30) > 0.2
    os.unlink(trigger)
    assert read_stamp(read(src, 1)[0][1]).person is False
    src.set_person(True)
    assert read_stamp(read(src, 1)[0][1]).person is True
    src.set_person(None)
    assert read_stamp(read(src, 1)[0][1]).person is False


def test_fail_after_raises_source_gone_and_reopen_continues():
    src = opened("test:?width=32&height=32&fps=200&fail_after=5")
    first = [read_stamp(b).frame_no for _, b in read(src, 5)]
    with pytest.raises(SourceGone):
        read(src, 1)
    with pytest.raises(SourceGone):  # stays gone until reopened
        read(src, 1)
    src.close()
    src.open()
    second = [read_stamp(b).frame_no for _, b in read(src, 5)]
    assert second[0] > first[-1]


def test_person_photo_ships_with_scikit_image():
    """The astronaut is a file inside the scikit-image wheel (no download, no pooch cache)."""
    import skimage.data

    path = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")
    assert os.path.isfile(path)
    assert skimage.data.astronaut().shape == (512, 512, 3)
