"""Single-process behaviour of Writer, Reader and Frame (real shared memory and queues)."""

import errno
import gc
import os
import stat
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import SUPPORTED_DTYPES, SUPERBLOCK, epoch_dir, mapped_paths_under, stream_dir, tree

RNG = np.random.default_rng(1234)


def _msg_max():
    try:
        with open("/proc/sys/fs/mqueue/msg_max") as f:
            return min(64, int(f.read()))
    except OSError:  # pragma: no cover
        return 10


def random_array(shape, dtype):
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return RNG.integers(0, 2, size=shape).astype(np.bool_)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return RNG.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return RNG.standard_normal(size=shape).astype(dt)


# ---- loan / commit / publish ---------------------------------------------------------


def test_loan_commit_is_zero_copy(name):
    with frameshm.Writer(name, shape=(8, 16), dtype="uint8", nslots=4) as w, frameshm.Reader(name) as r:
        view = w.loan()
        assert view.shape == (8, 16) and view.dtype == np.uint8
        assert view.flags.writeable
        view[:] = np.arange(128, dtype=np.uint8).reshape(8, 16)
        seq = w.commit()
        assert seq == 0
        f = r.wait_latest(timeout=5)
        assert f.seq == 0 and f.skipped == 0
        np.testing.assert_array_equal(f.array, np.arange(128).reshape(8, 16))
        assert not f.array.flags.writeable, "readers get read-only views"
        # The reader's view *is* the slot the writer filled: no copy anywhere.
        view[0, 0] = 201
        assert f.array[0, 0] == 201
        # ...and it is the bytes of the pool file itself.
        stride = w.pools[0][1]
        pool_file = epoch_dir(name, w.epoch) / "1.pool"
        with open(pool_file, "rb") as fh:
            fh.seek(SUPERBLOCK + f.slot * stride)
            assert fh.read(128) == f.array.tobytes()
        # Successive loans hand out different slots.
        v2 = w.loan()
        assert not np.shares_memory(v2, view)
        v2[:] = 3
        assert w.commit() == 1
        f2 = r.wait_latest(timeout=5)
        assert f2.seq == 1 and int(f2.array.sum()) == 3 * 128
        del f, f2, view, v2


def test_loan_hands_back_each_slots_array(name):
    """A fixed-shape Writer's loan() is one C call that returns the slot's cached array:
    the same object every lap of the ring, one per slot, and what is written through it
    is what readers get, in the stream's layout even after a publish of another layout
    was refused."""
    with frameshm.Writer(name, shape=(4, 6), dtype="uint16", nslots=4) as w, frameshm.Reader(name) as r:
        first = []
        for lap in range(3):
            for k in range(4):
                v = w.loan()
                assert v.shape == (4, 6) and v.dtype == np.uint16 and v.flags.writeable
                if lap == 0:
                    first.append(v)
                else:
                    assert v is first[k], "a slot's array is built once"
                v[:] = lap * 10 + k
                seq = w.commit()
                f = r.wait_latest(timeout=5)
                assert f.seq == seq == lap * 4 + k
                assert f.array.shape == (4, 6) and f.array.dtype == np.uint16
                assert int(f.array.min()) == int(f.array.max()) == lap * 10 + k
                del f
        assert len({id(v) for v in first}) == 4
        assert all(not np.shares_memory(a, b) for i, a in enumerate(first) for b in first[i + 1:])
        with pytest.raises(frameshm.InvalidArgument):
            w.publish(np.zeros((2, 3), np.uint16))
        w.loan()[:] = 7
        w.commit()
        f = r.wait_latest(timeout=5)
        assert f.array.shape == (4, 6) and int(f.array.sum()) == 7 * 24
        del f, v, first


def test_core_loan_array_restores_the_layout_and_needs_one(name):
    """_core level: loan_array() lends in the fixed layout even after set_tensor() chose
    another, and without set_layout() it is refused, not guessed."""
    from frameshm import _core

    w = _core.Writer(name, nslots=2, pools=[64])
    r = frameshm.Reader(name)
    try:
        with pytest.raises(frameshm.InvalidArgument, match="fixed layout"):
            w.loan_array()
        w.set_layout(np.ndarray, 9, (2, 4), np.dtype("float32"))   # 9: float32 on the wire
        w.set_tensor(1, (3,))
        a = w.loan_array()
        assert a.shape == (2, 4) and a.dtype == np.float32
        a[:] = 1.5
        w.commit()
        f = r.wait_latest(timeout=5)
        assert f.array.shape == (2, 4) and f.array.dtype == np.float32
        assert float(f.array.sum()) == 12.0
        with pytest.raises(TypeError):
            w.set_layout(42, 9, (2, 4), np.dtype("float32"))
        del f, a
    finally:
        r.close()
        w.close()


def test_writer_close_lets_go_of_lent_arrays(name, shm_base):
    """The Writer's cache of slot arrays goes with close(): once the caller drops the
    arrays it was lent, nothing of the stream stays mapped."""
    w = frameshm.Writer(name, shape=(1000,), nslots=4)
    lent = []
    for i in range(6):
        lent.append(w.loan())
        lent[-1][:] = i
        w.commit()
    w.close()
    assert lent[0] is lent[4]
    assert int(lent[5][0]) == 5   # still memory the caller may use
    assert mapped_paths_under(shm_base), "the lent arrays keep their pool mapped"
    del lent
    gc.collect()
    assert mapped_paths_under(shm_base) == []


@pytest.mark.parametrize(
    "shape",
    [(1,), (7,), (3, 5), (2, 3, 4), (120, 160, 3), (1,) * 8, (2, 1, 3, 1, 2, 1, 2, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_publish_roundtrip_shapes(name, shape):
    data = random_array(shape, "uint16")
    with frameshm.Writer(name, shape=shape, dtype="uint16") as w, frameshm.Reader(name) as r:
        assert w.shape == shape and w.dtype == np.uint16
        seq = w.publish(data)
        f = r.wait_latest(timeout=5)
        assert f.seq == seq
        assert f.shape == shape and f.array.shape == shape
        assert f.dtype == np.uint16
        assert f.nbytes == data.nbytes
        np.testing.assert_array_equal(f.array, data)
        del f


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_every_dtype_roundtrip(name, dtype):
    data = random_array((5, 7), dtype)
    with frameshm.Writer(name, shape=(5, 7), dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        assert f.dtype == np.dtype(dtype)
        assert f.array.tobytes() == data.tobytes()
        copy = r.read_latest(copy=True)
        assert copy.dtype == np.dtype(dtype) and copy.tobytes() == data.tobytes()
        del f


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_publish_of_the_exact_layout_skips_the_python_checks(name, dtype):
    """Writer.publish hands an array of exactly the stream's layout to the C side, which
    checks dtype, shape and contiguity itself; anything else publishes nothing there and
    takes the full path (converted or rejected as before)."""
    data = random_array((5, 7), dtype)
    with frameshm.Writer(name, shape=(5, 7), dtype=dtype) as w, frameshm.Reader(name) as r:
        assert w._w.publish_exact(data) == 0
        assert w._w.publish_exact(data, 123, 9) == 1
        f = r.wait_next(timeout=5)
        assert f.seq == 0 and f.dtype == np.dtype(dtype) and f.array.tobytes() == data.tobytes()
        f = r.wait_next(timeout=5)
        assert (f.seq, f.timestamp_ns, f.ref_seq) == (1, 123, 9)
        other = np.int16 if np.dtype(dtype) != np.int16 else np.uint16
        wrongs = [data[:4], data.reshape(35), data.reshape(1, 5, 7), data.astype(other),
                  np.asfortranarray(data), data.tolist(), data.tobytes()]
        if np.dtype(dtype).itemsize > 1:   # one byte has no byte order
            wrongs.append(data.astype(np.dtype(dtype).newbyteorder(">")))
        for wrong in wrongs:
            assert w._w.publish_exact(wrong) is None, wrong
        assert w._w.publish_exact(data, "now") is None, "a timestamp it cannot take: the full path decides"
        assert w.publish(np.asfortranarray(data)) == 2, "the full path publishes what it always did"
        f = r.wait_next(timeout=5)
        assert f.seq == 2 and f.array.tobytes() == data.tobytes()
        del f


def test_frames_of_a_slot_share_its_array_on_a_long_ring(name):
    """Frame.array is a view of one array per ring slot, built on the slot's first frame:
    also on a ring longer than a small cache, read in order (the 32-entry round-robin
    cache this replaced built an array for every frame of a 64-slot ring)."""
    built = []

    def array_type(*args):   # what the Reader calls to build a slot's array
        built.append(np.ndarray(*args))
        return built[-1]

    with frameshm.Writer(name, shape=(4,), dtype="uint32", nslots=128) as w:
        r = frameshm._core.Reader(name, queue=False, dtypes=frameshm.stream._DTYPE_TABLE,
                                  array_type=array_type)
        try:
            for lap in range(3):
                for i in range(128):
                    w.publish(np.full(4, lap * 128 + i, np.uint32))
                    f = r.wait_next(5.0)
                    a = f.array
                    assert f.slot == i and a[0] == lap * 128 + i and not a.flags.writeable
                    assert a is not built[i] and f.array is a, "each frame gets its own view"
            assert len(built) == 128, "one array per slot"
            del f, a
        finally:
            r.close()


def test_large_frame_roundtrip(name):
    data = random_array((1080, 1920, 3), "uint8")
    with frameshm.Writer(name, shape=data.shape, nslots=2) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        assert np.array_equal(f.array, data)
        del f


def test_non_contiguous_input_is_published_correctly(name):
    base = random_array((8, 10), "int32")
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        for arr in (base[::2, ::3], base.T, np.asfortranarray(base)):
            w.publish(arr)
            f = r.wait_latest(timeout=5)
            assert f.shape == arr.shape
            np.testing.assert_array_equal(f.array, arr)
            del f


def test_variable_tensor_stream(name):
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        assert w.shape is None
        samples = [
            random_array((3, 5), "float64"),
            random_array((2,), "int16"),
            random_array((4, 4, 4), "uint8"),
            random_array((512,), "float64"),  # exactly 4096 bytes
            random_array((1, 2, 3, 4), "bool"),
        ]
        for data in samples:
            w.publish(data)
            f = r.wait_latest(timeout=5)
            assert (f.shape, f.dtype) == (data.shape, data.dtype)
            assert f.array.tobytes() == data.tobytes()
            del f
        # loan() with an explicit layout
        view = w.loan((2, 3), "int32")
        view[:] = [[1, 2, 3], [4, 5, 6]]
        w.commit()
        f = r.wait_latest(timeout=5)
        assert f.dtype == np.int32
        np.testing.assert_array_equal(f.array, [[1, 2, 3], [4, 5, 6]])
        with pytest.raises(frameshm.InvalidArgument):
            w.loan()  # a variable stream needs a shape
        del f, view


def test_several_pools_pick_the_smallest_that_fits(name):
    with frameshm.Writer(name, pools=[64, 1024, 65536], nslots=2) as w, frameshm.Reader(name) as r:
        assert w.pools == [(1, 64), (2, 1024), (3, 65536)]
        assert frameshm.stream_info(name)["pool_strides"] == [64, 1024, 65536]
        for n in (10, 64, 65, 1000, 1025, 65536):
            data = random_array((n,), "uint8")
            w.publish(data)
            f = r.wait_latest(timeout=5)
            assert f.array.tobytes() == data.tobytes()
            del f
        with pytest.raises(frameshm.FrameTooLarge):
            w.publish(np.zeros(65537, np.uint8))


def test_fixed_stream_adapts_and_restores_layout(name):
    """A fixed-shape stream rejects other layouts but keeps working after the error."""
    with frameshm.Writer(name, shape=(4, 4), dtype="float32") as w, frameshm.Reader(name) as r:
        ok = np.ones((4, 4), np.float32)
        assert w.publish(ok) == 0
        with pytest.raises(frameshm.InvalidArgument, match=r"\(4, 4\)"):
            w.publish(np.ones((4, 5), np.float32))
        with pytest.raises(frameshm.InvalidArgument):
            w.publish(np.ones((4, 4), np.float64))
        with pytest.raises(frameshm.InvalidArgument):
            w.publish(np.ones((16,), np.float32))
        with pytest.raises(frameshm.InvalidArgument):
            w.loan((4, 5))
        with pytest.raises(frameshm.InvalidArgument):
            w.loan((4, 4), "int32")
        assert w.publish(ok * 2) == 1, "rejected frames consume no seq"
        f = r.wait_latest(timeout=5)
        assert f.seq == 1 and f.shape == (4, 4) and f.dtype == np.float32
        np.testing.assert_array_equal(f.array, ok * 2)
        del f


# ---- argument validation ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["complex64", "float16", "complex128", "object", "U4", ">u2", ">f8", "V8"])
def test_unsupported_dtype_rejected_by_writer(name, dtype, shm_base):
    with pytest.raises(frameshm.InvalidArgument, match="dtype"):
        frameshm.Writer(name, shape=(2, 2), dtype=dtype)
    assert tree(shm_base) == [] or not stream_dir(name).exists()


@pytest.mark.parametrize("dtype", ["complex64", "float16"])
def test_unsupported_dtype_rejected_by_publish_and_loan(name, dtype):
    with frameshm.Writer(name, max_bytes=1024) as w:
        with pytest.raises(frameshm.InvalidArgument):
            w.publish(np.zeros((2, 2), dtype))
        with pytest.raises(frameshm.InvalidArgument):
            w.loan((2, 2), dtype)
        big_endian = np.zeros(3, ">u4")
        with pytest.raises(frameshm.InvalidArgument, match="big-endian"):
            w.publish(big_endian)
        assert w.publish(np.zeros(3, "<u4")) == 0


def test_not_a_dtype(name):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name, shape=(2,), dtype="no-such-dtype")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "-dash", "a b", "x" * 64, "caf\u00e9", "a\\b", "/abs"])
def test_bad_stream_names(bad, shm_base, tmp_path):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(bad, shape=(2,))
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader(bad)
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.stream_info(bad)
    # Nothing escaped into (or next to) the base directory.
    assert sorted(os.listdir(tmp_path)) == ["shm"]
    assert all(p.name != "x" for p in shm_base.rglob("*"))


@pytest.mark.parametrize("bad", ["../ns", "a/b", "..", ".ns", "n" * 64])
def test_bad_namespace(name, bad, tmp_path):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name, shape=(2,), namespace=bad)
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader(name, namespace=bad)
    assert sorted(os.listdir(tmp_path)) == ["shm"]


def test_relative_base_dir_rejected(name, tmp_path):
    with pytest.raises(frameshm.InvalidArgument, match="absolute"):
        frameshm.Writer(name, shape=(2,), base_dir="relative/dir")
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader(name, base_dir="relative/dir")
    assert not os.path.exists("relative")


@pytest.mark.parametrize("bad", ["a/b", "../c", "", "y" * 32, "sp ace"])
def test_bad_consumer_names(name, bad):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader(name, consumer=bad)


def test_longest_valid_names(shm_base):
    stream = "s" * 63
    with frameshm.Writer(stream, shape=(1,)) as w, frameshm.Reader(stream, consumer="c" * 31) as r:
        w.publish(np.ones(1, np.uint8))
        assert r.wait_latest(timeout=5).seq == 0
        assert frameshm.stream_info(stream)["consumers"][0]["name"] == "c" * 31


@pytest.mark.parametrize("nslots", [3, 0, -1, 6, 12, 2**25, "4", 4.0, None])
def test_bad_nslots(name, nslots):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name, shape=(2,), nslots=nslots)
    assert not stream_dir(name).exists()


@pytest.mark.parametrize("shape", [(), (0, -1), (-3,), tuple([2] * 9), 3.5, (object(),), (2**31,)])
def test_bad_shapes(name, shape):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name, shape=shape)


def test_non_numeric_shape_is_invalid_argument(name):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name, shape="abc")


def test_writer_needs_shape_or_size(name):
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Writer(name)


@pytest.mark.parametrize("timeout", [-1, -0.001, float("nan"), "1", [1]])
def test_bad_timeouts(name, timeout):
    with frameshm.Reader(name) as r:
        with pytest.raises(frameshm.InvalidArgument):
            r.wait_latest(timeout=timeout)
        with pytest.raises(frameshm.InvalidArgument):
            r.wait_next(timeout=timeout)
        # ...also when a frame is already there (taken without waiting): refused before
        # anything is read, so the frame is still there afterwards.
        with frameshm.Writer(name, shape=(2,)) as w:
            w.publish(np.array([1, 2], np.uint8))
            for wait in (r.wait_latest, r.wait_next):
                with pytest.raises(frameshm.InvalidArgument):
                    wait(timeout=timeout)
            f = r.wait_next(timeout=5)
            assert f.seq == 0 and list(f.array) == [1, 2]
            del f


def test_frame_too_large(name):
    with frameshm.Writer(name, max_bytes=100) as w, frameshm.Reader(name) as r:
        stride = w.pools[-1][1]
        assert stride == 128, "pools are rounded up to a power-of-two multiple of 64"
        with pytest.raises(frameshm.FrameTooLarge, match="larger than"):
            w.publish(np.zeros(stride + 1, np.uint8))
        with pytest.raises(frameshm.FrameTooLarge):
            w.loan((stride // 8 + 1,), "float64")
        info = frameshm.stream_info(name)
        assert info["drops_nopool"] == 2
        assert info["frames"] == 0
        with pytest.raises(ValueError):  # FrameTooLarge is a ValueError too
            w.publish(np.zeros(10_000, np.uint8))
        # The stream carries on, and the seq of dropped frames was not spent.
        assert w.publish(np.full(stride, 9, np.uint8)) == 0
        f = r.wait_latest(timeout=5)
        assert f.seq == 0 and f.nbytes == stride and int(f.array[-1]) == 9
        del f


def test_second_writer_is_busy(name):
    w = frameshm.Writer(name, shape=(2,))
    try:
        with pytest.raises(frameshm.StreamBusy, match="live producer"):
            frameshm.Writer(name, shape=(2,))
        with pytest.raises(frameshm.StreamBusy):
            frameshm.Writer(stream_id=w.stream_id, shape=(2,))
        with frameshm.Reader(name) as r:
            w.publish(np.array([1, 2], np.uint8))  # the first one is unaffected
            assert r.wait_latest(timeout=5).seq == 0
    finally:
        w.close()
    with frameshm.Writer(name, shape=(2,)) as w2:
        # The stream was removed on close: a fresh one, whose epochs go on from the old
        # one's (spec §15.2: a consumer ignores an epoch below one it saw).
        assert w2.epoch == 2
    assert not stream_dir(name).exists()


def test_stream_id_collision(shm_base):
    with frameshm.Writer("first", shape=(1,), stream_id=77) as w:
        with pytest.raises(frameshm.InvalidArgument, match="first"):
            frameshm.Writer("second", shape=(1,), stream_id=77)
        with pytest.raises(frameshm.InvalidArgument):
            frameshm.Reader("second", stream_id=77)
        assert w.publish(np.ones(1, np.uint8)) == 0
        assert frameshm.stream_info(stream_id=77)["name"] == "first"


def test_explicit_stream_id_without_name():
    with frameshm.Writer(stream_id=1001, shape=(3,)) as w, frameshm.Reader(stream_id=1001) as r:
        assert w.stream_id == r.stream_id == 1001
        w.publish(np.arange(3, dtype=np.uint8))
        assert list(r.wait_latest(timeout=5).array) == [0, 1, 2]
        assert frameshm.stream_info(stream_id=1001)["stream_id"] == 1001


def test_named_stream_id_is_stable(name):
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name) as r:
        assert w.stream_id == r.stream_id == frameshm._core.stream_id_for_name(name)
        assert w.stream_id & 0x80000000
        assert stream_dir(name).is_dir()


def test_namespaces_are_isolated(name):
    with frameshm.Writer(name, shape=(1,), namespace="a") as wa, \
            frameshm.Writer(name, shape=(1,), namespace="b") as wb, \
            frameshm.Reader(name, namespace="a") as ra, frameshm.Reader(name, namespace="b") as rb:
        wa.publish(np.array([1], np.uint8))
        wb.publish(np.array([2], np.uint8))
        wb.publish(np.array([3], np.uint8))
        fa, fb = ra.wait_latest(timeout=5), rb.wait_latest(timeout=5)
        assert (fa.seq, int(fa.array[0])) == (0, 1)
        assert (fb.seq, int(fb.array[0])) == (1, 3)
        assert [s["name"] for s in frameshm.list_streams(namespace="a")] == [name]
        del fa, fb


def test_base_dir_argument_overrides_environment(name, tmp_path, shm_base):
    other = tmp_path / "other"
    other.mkdir()
    with frameshm.Writer(name, shape=(1,), base_dir=str(other)) as w, \
            frameshm.Reader(name, base_dir=str(other)) as r:
        w.publish(np.array([5], np.uint8))
        assert int(r.wait_latest(timeout=5).array[0]) == 5
        assert list(other.glob("tensorpool-*/default/*/frameshm.ctl"))
        assert not list(shm_base.glob("tensorpool-*/default/*"))
    assert not list(other.glob("tensorpool-*/default/*"))


def test_file_mode(name):
    with frameshm.Writer(name, shape=(1,), file_mode=0o640) as w:
        for f in epoch_dir(name, w.epoch).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    with frameshm.Writer(name, shape=(1,)) as w:
        for f in epoch_dir(name, w.epoch).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert stat.S_IMODE(stream_dir(name).stat().st_mode) == 0o700


# ---- reading: latest, next, copies, validity ------------------------------------------------


def test_wait_latest_counts_skipped_frames(name):
    with frameshm.Writer(name, shape=(4,), dtype="int64", nslots=8) as w, frameshm.Reader(name) as r:
        w.publish(np.full(4, 0, np.int64))
        f = r.wait_latest(timeout=5)
        assert (f.seq, f.skipped) == (0, 0)
        for i in range(1, 6):
            w.publish(np.full(4, i, np.int64))
        f = r.wait_latest(timeout=5)
        assert (f.seq, f.skipped) == (5, 4)
        assert int(f.array[0]) == 5
        with pytest.raises(frameshm.Timeout):
            r.wait_latest(timeout=0.05)
        w.publish(np.full(4, 6, np.int64))
        f = r.wait_latest(timeout=5)
        assert (f.seq, f.skipped) == (6, 0)
        del f


@pytest.mark.parametrize("max_rate_hz", [0, 1_000_000])
def test_wait_latest_survives_a_full_queue(name, max_rate_hz):
    """More frames than the descriptor queue holds: the newest is still found. A rate-capped
    reader is sent a descriptor per frame (above the rate here, so every frame), and its
    queue overflows; a default reader that does not wait is sent none at all."""
    n = _msg_max() * 3
    with frameshm.Writer(name, shape=(1,), dtype="uint32", nslots=4) as w, \
            frameshm.Reader(name, max_rate_hz=max_rate_hz) as r:
        w.publish(np.array([0], np.uint32))
        assert r.wait_latest(timeout=5).seq == 0
        for i in range(1, n + 1):
            w.publish(np.array([i], np.uint32))
        f = r.wait_latest(timeout=5)
        assert (f.seq, int(f.array[0]), f.skipped) == (n, n, n - 1)
        info = frameshm.stream_info(name)
        if max_rate_hz:
            assert info["descriptors_dropped"] > 0
            assert info["consumers"][0]["queue_full"] > 0
        else:
            assert info["descriptors_dropped"] == info["consumers"][0]["queue_full"] == 0
            assert info["consumers"][0]["delivered"] <= 1   # the first wait may have slept
        with pytest.raises(frameshm.Timeout):
            r.wait_latest(timeout=0.05)
        del f


def test_wait_next_in_order_when_not_lapped(name):
    with frameshm.Writer(name, shape=(1,), dtype="uint16", nslots=16) as w, frameshm.Reader(name) as r:
        for i in range(8):
            w.publish(np.array([i], np.uint16))
        got = []
        for _ in range(8):
            f = r.wait_next(timeout=5)
            got.append((f.seq, f.skipped, int(f.array[0])))
        assert got == [(i, 0, i) for i in range(8)]
        assert r.overruns == 0
        with pytest.raises(frameshm.Timeout):
            r.wait_next(timeout=0.05)
        assert frameshm.stream_info(name)["consumers"][0]["process_all"] is True
        del f


def test_wait_next_counts_overruns_when_lapped(name):
    if _msg_max() < 10:
        pytest.skip("needs message queues of at least 10 messages")
    with frameshm.Writer(name, shape=(1,), dtype="uint16", nslots=2) as w, frameshm.Reader(name) as r:
        w.publish(np.array([0], np.uint16))
        assert r.wait_next(timeout=5).seq == 0
        for i in range(1, 11):  # 10 more frames into 2 slots: frames 1..8 are overwritten
            w.publish(np.array([i], np.uint16))
        f = r.wait_next(timeout=5)
        assert (f.seq, f.skipped, int(f.array[0])) == (9, 8, 9)
        f = r.wait_next(timeout=5)
        assert (f.seq, f.skipped, int(f.array[0])) == (10, 0, 10)
        assert r.overruns == 8
        with pytest.raises(frameshm.Timeout):
            r.wait_next(timeout=0.05)
        del f


def test_wait_next_counts_overruns_from_registration(name):
    if _msg_max() < 10:
        pytest.skip("needs message queues of at least 10 messages")
    with frameshm.Writer(name, shape=(1,), dtype="uint16", nslots=2) as w, frameshm.Reader(name) as r:
        for i in range(10):  # registered before frame 0: all ten are this consumer's
            w.publish(np.array([i], np.uint16))
        # it never waited: no descriptor, its frames are found in the ring by seq
        assert frameshm.stream_info(name)["consumers"][0]["delivered"] == 0
        f = r.wait_next(timeout=5)
        assert f.seq == 8
        assert f.skipped == 8, "frames 0..7 were lost by this consumer"
        assert r.overruns == 8


def test_read_latest_copy_is_private(name):
    with frameshm.Writer(name, shape=(3, 3), dtype="float32", nslots=2) as w, frameshm.Reader(name) as r:
        assert r.read_latest() is None
        assert r.read_latest(copy=False) is None
        data = random_array((3, 3), "float32")
        w.publish(data)
        c = r.read_latest(copy=True)
        assert isinstance(c, np.ndarray) and not isinstance(c, frameshm.Frame)
        np.testing.assert_array_equal(c, data)
        assert c.flags.writeable
        view = r.read_latest(copy=False)
        assert not np.shares_memory(c, view.array)
        for _ in range(4):  # overwrite every slot
            w.publish(np.zeros((3, 3), np.float32))
        np.testing.assert_array_equal(c, data)
        assert not view.valid()
        c[0, 0] = 42  # writable, private
        assert r.read_latest()[0, 0] == 0
        del view


def test_read_latest_view_is_a_frame(name):
    with frameshm.Writer(name, shape=(2,), dtype="int8") as w, frameshm.Reader(name) as r:
        for i in range(3):
            w.publish(np.array([i, -i], np.int8))
        f = r.read_latest(copy=False)
        assert isinstance(f, frameshm.Frame)
        assert f.seq == 2 and f.valid()
        np.testing.assert_array_equal(f.array, [2, -2])
        np.testing.assert_array_equal(f.copy(), [2, -2])
        del f


@pytest.mark.parametrize("nslots", [1, 2, 4, 8])
def test_frame_valid_until_overwritten(name, nslots):
    with frameshm.Writer(name, shape=(2,), dtype="uint8", nslots=nslots) as w, frameshm.Reader(name) as r:
        w.publish(np.array([7, 7], np.uint8))
        f = r.wait_latest(timeout=5)
        assert f.valid()
        for i in range(nslots - 1):
            w.publish(np.array([i, i], np.uint8))
            assert f.valid(), f"still valid after {i + 1} newer frames"
        np.testing.assert_array_equal(f.copy(), [7, 7])
        w.publish(np.array([9, 9], np.uint8))  # the nslots-th newer frame reuses the slot
        assert not f.valid()
        with pytest.raises(frameshm.Overrun):
            f.copy()
        del f


def test_dlpack_is_zero_copy(name):
    with frameshm.Writer(name, shape=(4, 6), dtype="float32") as w, frameshm.Reader(name) as r:
        data = random_array((4, 6), "float32")
        w.publish(data)
        f = r.wait_latest(timeout=5)
        x = np.from_dlpack(f)
        # numpy >= 2.1 asks for DLPack 1.x, which carries the read-only flag: zero copy.
        # Older numpy asks the legacy protocol, which cannot say read-only: a checked copy.
        dlpack1 = np.lib.NumpyVersion(np.__version__) >= "2.1.0"
        assert np.shares_memory(x, f.array) == dlpack1
        assert x.shape == (4, 6) and x.dtype == np.float32
        np.testing.assert_array_equal(x, data)
        assert f.__dlpack_device__() == (1, 0)  # kDLCPU, device 0
        peek = r.read_latest(copy=False)
        assert np.shares_memory(np.from_dlpack(peek), f.array) == dlpack1
        del f, x, peek


def test_frame_metadata(name):
    with frameshm.Writer(name, shape=(2,), dtype="uint8") as w, frameshm.Reader(name) as r:
        w.publish(np.array([1, 2], np.uint8), timestamp_ns=123456789, ref_seq=42)
        f = r.wait_latest(timeout=5)
        assert (f.timestamp_ns, f.ref_seq) == (123456789, 42)
        assert f.epoch == w.epoch == r.epoch == 1
        assert f.strides == (1,)
        before = time.monotonic_ns()
        w.publish(np.array([3, 4], np.uint8))
        after = time.monotonic_ns()
        f = r.wait_latest(timeout=5)
        assert f.ref_seq is None
        assert before <= f.timestamp_ns <= after, "default timestamp: commit time, CLOCK_MONOTONIC"
        assert f.latency_ns >= 0
        assert f.publish_ns == 0 or before <= f.publish_ns <= after
        view = w.loan()
        view[:] = 5
        w.commit(timestamp_ns=99, ref_seq=7)
        f = r.wait_latest(timeout=5)
        assert (f.timestamp_ns, f.ref_seq, int(f.array[0])) == (99, 7, 5)
        del f, view


def test_frames_are_the_binding_type(name):
    """Readers hand out frameshm.Frame objects made in C (a subclass of _core.Frame), with
    shape/strides tuples shared by frames of the same layout."""
    with frameshm.Writer(name, max_bytes=256) as w, frameshm.Reader(name) as r:
        w.publish(np.arange(6, dtype=np.int16).reshape(2, 3), ref_seq=5)
        latest = r.wait_latest(timeout=5)
        w.publish(np.arange(4, dtype=np.float32))
        nxt = r.wait_next(timeout=5)
        peek = r.read_latest(copy=False)
        for f in (latest, nxt, peek):
            assert type(f) is frameshm.Frame and isinstance(f, frameshm._core.Frame)
        assert (latest.shape, latest.strides, latest.dtype, latest.ref_seq, latest.nbytes) == (
            (2, 3), (6, 2), np.dtype(np.int16), 5, 12)
        assert latest._dtype_code == frameshm._core.DTYPE_INT16
        assert (nxt.shape, nxt.strides, nxt.dtype, nxt.ref_seq, nxt.seq) == ((4,), (4,), np.dtype(np.float32), None, 1)
        assert (peek.seq, peek.slot, peek._pool_id, peek._offset) == (nxt.seq, nxt.slot, nxt._pool_id, nxt._offset)
        assert peek.shape is nxt.shape and peek.strides is nxt.strides, "same layout: shared tuples"
        # A new layout gets new tuples; frames already handed out keep theirs.
        w.publish(np.ones((2, 3), np.int16))
        again = r.wait_latest(timeout=5)
        assert (again.shape, again.strides, nxt.shape, latest.shape) == ((2, 3), (6, 2), (4,), (2, 3))
        np.testing.assert_array_equal(latest.array, np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(nxt.array, np.arange(4))
        assert repr(latest) == "<frameshm.Frame seq=0 shape=(2, 3) dtype=int16 skipped=0>"
        for attr in ("seq", "epoch", "shape", "dtype", "ref_seq", "nbytes", "slot", "_buffer", "_offset"):
            with pytest.raises(AttributeError):
                setattr(latest, attr, 1)
        with pytest.raises(AttributeError):
            latest.extra = 1  # no per-frame __dict__
        with pytest.raises(TypeError):
            frameshm.Frame()  # only Readers make frames
        del latest, nxt, peek, again


def test_core_reader_frames(name):
    """_core.Reader on its own: _core.Frame objects whose dtype is the wire code; read_copy()
    gives a frame over a private bytearray; frame_type and dtypes are checked."""
    with frameshm.Writer(name, shape=(3,), dtype="uint16") as w:
        r = frameshm._core.Reader(name)
        try:
            w.publish(np.array([1, 2, 3], np.uint16))
            f = r.wait_latest(1.0)
            assert type(f) is frameshm._core.Frame
            assert (f.dtype, f.shape, f.seq) == (frameshm._core.DTYPE_UINT16, (3,), 0)
            assert f.valid() and isinstance(f._buffer, frameshm._core.Mapping)
            assert bytes(memoryview(f._buffer)[f._offset:f._offset + f.nbytes]) == np.array([1, 2, 3], np.uint16).tobytes()
            c = r.read_copy()
            assert type(c) is frameshm._core.Frame and type(c._buffer) is bytearray
            assert (c._offset, c.seq, bytes(c._buffer)) == (0, 0, np.array([1, 2, 3], np.uint16).tobytes())
            assert repr(f) == "<frameshm._core.Frame seq=0 shape=(3,) dtype=3 skipped=0>"
            with pytest.raises(TypeError):
                frameshm._core.Frame()
            del f, c
        finally:
            r.close()
        with pytest.raises(TypeError):
            frameshm._core.Reader(name, frame_type=tuple)
        short = frameshm._core.Reader(name, dtypes=("zero", "one"))  # no entry for uint16
        try:
            w.publish(np.array([4, 5, 6], np.uint16))
            with pytest.raises(frameshm.InvalidState, match="no entry for dtype code 3"):
                short.wait_latest(1.0)
        finally:
            short.close()


def test_ref_seq_of_a_failed_call_does_not_leak(name):
    with frameshm.Writer(name, max_bytes=64) as w, frameshm.Reader(name) as r:
        with pytest.raises(frameshm.FrameTooLarge):
            w.publish(np.zeros(1000, np.uint8), ref_seq=7)
        w.publish(np.zeros(4, np.uint8))
        assert r.wait_latest(timeout=5).ref_seq is None
        with pytest.raises(Exception):
            w.commit(ref_seq=9)  # no loan: nothing to commit
        w.publish(np.zeros(4, np.uint8))
        assert r.wait_latest(timeout=5).ref_seq is None


def test_out_of_range_arguments_raise_invalid_argument(name):
    with frameshm.Writer(name, shape=(2,)) as w, frameshm.Reader(name) as r:
        with pytest.raises(frameshm.InvalidArgument):
            w.mode = 256
        with pytest.raises(frameshm.InvalidArgument):
            r.mode = -1
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader(stream_id=2**32)


def test_commit_without_loan_raises_a_frameshm_error(name):
    with frameshm.Writer(name, shape=(2,)) as w:
        with pytest.raises(frameshm.FrameshmError):
            w.commit()


# ---- timeouts and producer states ------------------------------------------------------------


def _timeout_error(r, timeout=0.2, method="wait_latest"):
    t0 = time.monotonic()
    with pytest.raises(frameshm.Timeout) as ei:
        getattr(r, method)(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed >= timeout * 0.95, "a wait must not end before its timeout"
    assert elapsed < timeout + 5
    return ei.value


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_timeout_before_any_producer(name, method):
    with frameshm.Reader(name) as r:
        assert r.producer == ("none", 0)
        assert not r.producer_alive
        e = _timeout_error(r, method=method)
        assert not isinstance(e, frameshm.ProducerDead)
        assert isinstance(e, TimeoutError) and e.errno == errno.ETIMEDOUT
        assert "no producer" in str(e)


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_timeout_with_live_producer(name, method):
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name) as r:
        w.publish(np.ones(1, np.uint8))
        getattr(r, method)(timeout=5)
        assert r.producer == ("alive", os.getpid()) and r.producer_alive
        e = _timeout_error(r, method=method)
        assert not isinstance(e, frameshm.ProducerDead)
        assert "alive" in str(e) and str(os.getpid()) in str(e)


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_timeout_after_producer_closed(name, method):
    with frameshm.Reader(name) as r:
        with frameshm.Writer(name, shape=(1,)) as w:
            w.publish(np.ones(1, np.uint8))
            assert getattr(r, method)(timeout=5).seq == 0  # maps the producer's regions
            w.publish(np.full(1, 2, np.uint8))
        # A frame published just before close stays readable by a reader that mapped the epoch.
        f = getattr(r, method)(timeout=5)
        assert (f.seq, int(f.array[0])) == (1, 2)
        del f
        assert r.producer[0] == "closed"
        e = _timeout_error(r, method=method)
        assert not isinstance(e, frameshm.ProducerDead)
        assert "closed" in str(e)


def test_timeout_zero_is_a_poll(name):
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name) as r:
        with pytest.raises(frameshm.Timeout):
            r.wait_latest(timeout=0)
        w.publish(np.ones(1, np.uint8))
        assert r.wait_latest(timeout=0).seq == 0
        w.publish(np.ones(1, np.uint8))
        assert r.wait_next(timeout=0).seq == 1


def test_single_slot_stream(name):
    with frameshm.Writer(name, shape=(3,), dtype="int32", nslots=1) as w, frameshm.Reader(name) as r:
        assert w.nslots == 1 and frameshm.stream_info(name)["nslots"] == 1
        w.publish(np.array([1, 2, 3], np.int32))
        f = r.wait_latest(timeout=5)
        assert f.seq == 0 and f.slot == 0 and list(f.array) == [1, 2, 3]
        for i in range(1, 4):
            w.publish(np.full(3, i * 10, np.int32))
        assert not f.valid()
        f = r.wait_latest(timeout=5)
        assert (f.seq, f.skipped, int(f.array[0])) == (3, 2, 30)
        w.publish(np.full(3, 40, np.int32))
        f = r.wait_next(timeout=5)
        assert (f.seq, f.skipped, int(f.array[0])) == (4, 0, 40)
        assert r.read_latest()[0] == 40
        del f


# ---- state, lifecycle ----------------------------------------------------------------------


def test_closed_objects_raise_stream_closed(name):
    w = frameshm.Writer(name, shape=(2,))
    r = frameshm.Reader(name)
    w.close()
    w.close()  # idempotent
    assert w.closed
    for call in (lambda: w.publish(np.zeros(2, np.uint8)), lambda: w.loan(), w.commit,
                 lambda: w.epoch, w.heartbeat, lambda: w.pools):
        with pytest.raises(frameshm.StreamClosed):
            call()
    r.close()
    r.close()
    assert r.closed
    for call in (r.wait_latest, r.wait_next, r.read_latest, lambda: r.read_latest(copy=False),
                 lambda: r.producer, lambda: r.epoch, lambda: r.overruns):
        with pytest.raises(frameshm.StreamClosed):
            call()
    with pytest.raises(ValueError):  # StreamClosed is a ValueError, like a closed file
        r.wait_latest(timeout=0)
    assert "closed" in repr(w) and "closed" in repr(r)


def test_control_bytes_are_shared_and_uninterpreted(name):
    n = frameshm._core.CONTROL_BYTES
    assert n == 8
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name) as r, \
            frameshm.Reader(name, subscribe=False) as p:
        assert [w.control(i) for i in range(n)] == [r.control(i) for i in range(n)] == [0] * n
        for i in range(n):
            w.set_control(i, 255 - 31 * i)
        assert [p.control(i) for i in range(n)] == [255 - 31 * i for i in range(n)]
        r.set_control(3, 77)  # any value: the transport gives them no meaning
        p.set_control(7, 0)
        want = [77 if i == 3 else 0 if i == 7 else 255 - 31 * i for i in range(n)]
        assert [w.control(i) for i in range(n)] == [r.control(i) for i in range(n)] == want
        assert list(frameshm.stream_info(name)["control"]) == want
        for bad in (n, -1):
            for call in (lambda: w.control(bad), lambda: r.control(bad), lambda: w.set_control(bad, 1),
                         lambda: p.set_control(bad, 1)):
                with pytest.raises(frameshm.InvalidArgument, match="control byte"):
                    call()
        for bad in (256, -1):
            with pytest.raises(frameshm.InvalidArgument, match="0..255"):
                w.set_control(0, bad)
    with pytest.raises(frameshm.StreamClosed):
        w.control(0)
    with pytest.raises(frameshm.StreamClosed):
        r.set_control(0, 1)


def test_mode_is_control_byte_0(name):
    with frameshm.Writer(name, shape=(1,)) as w, frameshm.Reader(name) as r:
        assert w.mode == r.mode == frameshm.MODE_STANDBY
        w.mode = frameshm.MODE_ALARMED
        assert r.mode == frameshm.MODE_ALARMED == r.control(0)
        r.mode = frameshm.MODE_STANDBY
        assert w.mode == frameshm.MODE_STANDBY
        w.set_control(0, 77)  # a plain alias: the Standby reading of strangers is the pipeline's
        assert r.mode == 77 and frameshm.stream_info(name)["control"][0] == 77


def test_heartbeat_refreshes_activity(name):
    with frameshm.Writer(name, shape=(1,)) as w:
        a0 = frameshm.stream_info(name)["activity_ns"]
        time.sleep(0.01)
        w.heartbeat()
        assert frameshm.stream_info(name)["activity_ns"] > a0


def test_frames_iterator_ends_on_timeout(name):
    with frameshm.Writer(name, shape=(1,), nslots=16) as w, frameshm.Reader(name) as r:
        for i in range(5):
            w.publish(np.array([i], np.uint8))
        assert [f.seq for f in r.frames(latest=False, timeout=0.05)] == [0, 1, 2, 3, 4]
        for i in range(5):
            w.publish(np.array([i], np.uint8))
        assert [f.seq for f in r.frames(timeout=0.05)] == [9]


def test_stream_info_counters(name):
    with frameshm.Writer(name, shape=(2, 2), dtype="float64", nslots=8) as w, \
            frameshm.Reader(name, consumer="viewer") as r1, \
            frameshm.Reader(name, consumer="logger", max_rate_hz=1_000_000) as r2:
        for _ in range(3):
            w.publish(np.zeros((2, 2)))
        r1.wait_latest(timeout=5)
        r2.wait_next(timeout=5)
        info = frameshm.stream_info(name)
        assert info["name"] == name and info["stream_id"] == w.stream_id
        assert info["producer"] == "alive" and info["producer_pid"] == os.getpid()
        assert (info["epoch"], info["frames"], info["latest_seq_plus1"], info["nslots"]) == (1, 3, 3, 8)
        assert info["pool_strides"] == [64]
        # The viewer takes its frames from the ring (it never slept: no descriptor); the
        # rate-capped logger is sent one per frame (above the rate here, so every frame).
        assert info["descriptors_sent"] == 3 and info["descriptors_dropped"] == 0
        cons = {c["name"]: c for c in info["consumers"]}
        assert set(cons) == {"viewer", "logger"}
        assert cons["viewer"]["last_seq_plus1"] == 3 and not cons["viewer"]["process_all"]
        assert cons["logger"]["last_seq_plus1"] == 1 and cons["logger"]["process_all"]
        assert all(c["alive"] and c["pid"] == os.getpid() for c in cons.values())
        assert (cons["viewer"]["delivered"], cons["logger"]["delivered"]) == (0, 3)
        assert cons["logger"]["max_rate_hz"] == 1_000_000
        assert [s["name"] for s in frameshm.list_streams()] == [name]


def test_stream_info_of_missing_stream(name):
    with pytest.raises(frameshm.StreamNotFound):
        frameshm.stream_info(name)
    with pytest.raises(FileNotFoundError):
        frameshm.stream_info(name)
    assert frameshm.list_streams() == []


def test_writer_restart_in_process_bumps_epoch(name):
    with frameshm.Reader(name) as r:
        with frameshm.Writer(name, shape=(1,), dtype="uint32") as w:
            assert w.epoch == 1
            w.publish(np.array([1], np.uint32))
            assert r.wait_latest(timeout=5).seq == 0
        with frameshm.Writer(name, shape=(1,), dtype="uint32") as w:
            assert w.epoch == 2
            assert sorted(p.name for p in stream_dir(name).iterdir()) == ["2", "frameshm.ctl"]
            w.publish(np.array([2], np.uint32))
            f = r.wait_latest(timeout=5)
            assert (f.seq, f.epoch, int(f.array[0])) == (1, 2, 2), "seqs continue across producers"
            assert r.epoch == 2
            del f


def test_writer_close_without_unlink_leaves_files_for_gc(name):
    w = frameshm.Writer(name, shape=(1,), unlink_on_close=False)
    w.publish(np.ones(1, np.uint8))
    w.close()
    assert sorted(p.name for p in stream_dir(name).iterdir()) == ["1", "frameshm.ctl"]
    assert frameshm.stream_info(name)["producer"] == "closed"
    with frameshm.Reader(name) as r:
        assert r.wait_latest(timeout=5).seq == 0  # still readable
    assert frameshm.gc() == [] or not stream_dir(name).exists()
    assert not stream_dir(name).exists()


def test_reader_calls_from_a_second_thread_are_serialised(name):
    """While one thread waits on a Reader (GIL released), another thread's calls on it
    wait for the current wait slice instead of racing inside the library; close() from
    the other thread ends the wait with StreamClosed."""
    r = frameshm.Reader(name)
    started = threading.Event()
    outcome = []

    def waiter():
        started.set()
        try:
            r.wait_latest(timeout=30)
            outcome.append("frame")
        except frameshm.StreamClosed:
            outcome.append("closed")
        except Exception as e:  # pragma: no cover
            outcome.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    started.wait(5)
    time.sleep(0.2)  # the waiter is inside its wait
    t0 = time.monotonic()
    with pytest.raises(frameshm.Timeout):
        r.wait_latest(timeout=0)
    assert r.producer[0] == "none"
    assert r.read_latest() is None
    assert isinstance(r.epoch, int)
    r.close()
    took = time.monotonic() - t0
    t.join(10)
    assert not t.is_alive() and outcome == ["closed"], outcome
    assert took < 5, f"calls behind a wait took {took:.2f} s"  # a few 50 ms slices; generous for load


def test_reader_follows_a_replaced_stream(name):
    """The stream directory is removed under a registered Reader (an admin's rm -rf) and
    created anew by a new producer: the Reader re-registers and reads the new stream."""
    import shutil

    with frameshm.Reader(name, consumer="stayer") as r:
        with frameshm.Writer(name, shape=(1,)) as w:
            for i in range(5):
                w.publish(np.full(1, i, np.uint8))
            assert r.wait_latest(timeout=5).seq == 4
        shutil.rmtree(stream_dir(name))
        with frameshm.Writer(name, shape=(1,)) as w2:
            assert w2.epoch == 2, "epochs go on across the removal (the epoch ledger)"
            w2.publish(np.full(1, 42, np.uint8))
            f = r.wait_latest(timeout=5)
            assert (f.seq, int(f.array[0]), f.epoch) == (0, 42, 2), "seqs start over in a new stream"
            assert [c["name"] for c in frameshm.stream_info(name)["consumers"]] == ["stayer"]
            w2.publish(np.full(1, 43, np.uint8))
            assert r.wait_next(timeout=5).seq == 1
            del f
    assert not stream_dir(name).exists()


# ---- passive readers (subscribe=False) --------------------------------------------------------


def test_passive_reader_peeks_without_registering(name):
    with frameshm.Writer(name, shape=(3,), dtype="int16") as w, \
            frameshm.Reader(name, subscribe=False) as p, frameshm.Reader(name, consumer="real") as r:
        assert [c["name"] for c in frameshm.stream_info(name)["consumers"]] == ["real"]
        assert p._r.queue_name == ""
        assert p.read_latest() is None
        w.publish(np.array([1, 2, 3], np.int16))
        np.testing.assert_array_equal(p.read_latest(), [1, 2, 3])
        f = p.read_latest(copy=False)
        assert f.seq == 0 and f.valid()
        for method in (p.wait_latest, p.wait_next):
            with pytest.raises(frameshm.InvalidArgument, match="passive"):
                method(timeout=0)
        p.mode = frameshm.MODE_ALARMED
        assert w.mode == r.mode == frameshm.MODE_ALARMED
        assert p.producer == ("alive", os.getpid())
        w.publish(np.array([4, 5, 6], np.int16))
        assert r.wait_latest(timeout=5).seq == 1  # the real consumer is unaffected
        info = frameshm.stream_info(name)
        # the real consumer found both frames in the ring: it never slept, was sent nothing
        assert info["descriptors_sent"] == 0 and info["descriptors_dropped"] == 0
        del f
    assert not stream_dir(name).exists()


def test_passive_reader_of_a_missing_stream_leaves_nothing(name):
    with frameshm.Reader(name, subscribe=False) as p:
        assert p.read_latest() is None
        assert p.mode == frameshm.MODE_STANDBY
    assert not stream_dir(name).exists()


def test_passive_reader_keeps_steering_a_replaced_stream(name):
    import shutil

    with frameshm.Reader(name, subscribe=False) as p:
        with frameshm.Writer(name, shape=(1,)) as w:
            p.mode = frameshm.MODE_ALARMED
            assert w.mode == frameshm.MODE_ALARMED
        if stream_dir(name).exists():
            shutil.rmtree(stream_dir(name))
        with frameshm.Writer(name, shape=(1,)) as w2:
            assert w2.mode == frameshm.MODE_STANDBY  # a new control region
            time.sleep(0.25)  # past the reader's 100 ms re-check interval (see the xfail below)
            p.mode = frameshm.MODE_ALARMED
            assert w2.mode == frameshm.MODE_ALARMED
            w2.publish(np.ones(1, np.uint8))
            assert p.read_latest()[0] == 1
    assert not stream_dir(name).exists()


def test_mode_write_right_after_replacement_is_not_lost(name):
    import shutil

    t_check = time.monotonic()  # a new reader next re-checks its control region 100 ms after opening
    with frameshm.Reader(name, subscribe=False) as p:
        with frameshm.Writer(name, shape=(1,)):
            assert p.mode == frameshm.MODE_STANDBY
        if stream_dir(name).exists():
            shutil.rmtree(stream_dir(name))
        with frameshm.Writer(name, shape=(1,)) as w2:
            p.mode = frameshm.MODE_ALARMED
            if time.monotonic() - t_check > 0.09:
                pytest.skip("too slow to land inside the 100 ms window on this run")
            assert w2.mode == frameshm.MODE_ALARMED, "the alarm went to the old control region"


def _fill_helpers():
    """Threads of this process named like a writer's fill helpers (native threads: not in
    threading.enumerate)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read() == "fshm-fill\n"
        except FileNotFoundError:
            pass  # ended since listdir
    return n


@pytest.mark.parametrize("fill_threads", [2, 4])
def test_fill_threads_publish_the_same_bytes(name, fill_threads):
    """publish() with helper threads hands readers exactly the array published, for frames
    of every size around the 1 MiB the helpers start at, contiguous or not; the helpers
    start with the first big publish and end with close()."""
    rng = np.random.default_rng(fill_threads)
    frames = [rng.integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8),
              rng.integers(0, 2**31, size=(512, 513), dtype=np.int32),      # 1 MiB + 2 KiB
              rng.integers(0, 256, size=(1 << 20,), dtype=np.uint8),         # exactly 1 MiB
              rng.random((1000, 1000))[:, ::2],                              # strided, 4 MB
              rng.integers(0, 256, size=(1000,), dtype=np.uint8)]            # small: no helpers
    assert _fill_helpers() == 0
    with frameshm.Writer(name, max_bytes=8 << 20, fill_threads=fill_threads) as w, \
            frameshm.Reader(name) as r:
        w.publish(frames[-1])
        assert r.wait_next(timeout=5).shape == frames[-1].shape
        assert _fill_helpers() == 0
        for _ in range(3):
            for a in frames:
                w.publish(a)
                f = r.wait_next(timeout=5)
                assert f.shape == a.shape and f.dtype == a.dtype
                np.testing.assert_array_equal(f.array, a)
                del f
        assert _fill_helpers() == fill_threads - 1
    assert _fill_helpers() == 0


def test_fill_threads_default_and_one_start_no_thread(name):
    data = np.zeros((1080, 1920, 3), np.uint8)
    for kwargs in ({}, {"fill_threads": 0}, {"fill_threads": 1}):
        with frameshm.Writer(name, shape=data.shape, **kwargs) as w:
            w.publish(data)
            assert _fill_helpers() == 0


def test_fill_threads_across_processes(name, spawn):
    """A producer process filling with a helper thread; this process checks every frame
    (as many as the ring holds, so that none is overwritten before it is checked)."""
    child = spawn(f"""
with frameshm.Writer({name!r}, shape=(1080, 1920, 3), nslots=8, fill_threads=2) as w:
    say("READY")
    deadline = time.monotonic() + 20
    while not frameshm.stream_info({name!r})["consumers"] and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(8):
        w.publish(np.random.default_rng(i).integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8))
    say("SENT")
    while not stopped():   # until the test has read them: close() would end the stream
        time.sleep(0.01)
""")
    child.expect("READY")
    with frameshm.Reader(name) as r:
        for i in range(8):
            f = r.wait_next(timeout=10)
            assert f.skipped == 0
            want = np.random.default_rng(i).integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
            np.testing.assert_array_equal(f.array, want)
            del f
        child.expect("SENT")
    assert child.stop(20) == 0


@pytest.mark.parametrize("bad", [-1, 9, 2**40, "2", 2.0, None, True])
def test_bad_fill_threads(name, bad):
    with pytest.raises(frameshm.InvalidArgument, match="fill_threads"):
        frameshm.Writer(name, shape=(2,), fill_threads=bad)
    assert not stream_dir(name).exists()
    if bad is True:
        return   # the extension module takes a bool for an int, as Python does
    with pytest.raises((frameshm.InvalidArgument, TypeError, OverflowError)):
        frameshm._core.Writer(name, pools=[64], fill_threads=bad)
    assert not stream_dir(name).exists()
