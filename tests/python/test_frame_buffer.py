"""A frame's buffer protocol (binding/frame_buffer.c): memoryview(frame), struct, bytes(),
np.frombuffer and sockets read the frame's bytes in shared memory, read-only, typed and
shaped like frame.array, and the mapping stays while an export lives."""

import gc
import socket
import struct
import sys

import numpy as np
import pytest

import frameshm
from fshm_helpers import SUPPORTED_DTYPES, rss_kib


def _publish_layout(w, dtype, shape, strides, order, nbytes):
    """Raw bytes with an explicit layout, as a C producer can send them."""
    raw = (np.arange(nbytes) % 251).astype(np.uint8)
    w._w.set_tensor(frameshm.stream._DTYPE_CODES[np.dtype(dtype)], shape, strides=strides,
                    major_order=order)
    w._w.publish(raw, 0, None)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_memoryview_is_the_frame_in_place_for_every_dtype(name, dtype):
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    with frameshm.Writer(name, shape=a.shape, dtype=dtype, nslots=2) as w, \
            frameshm.Reader(name) as r:
        w.publish(a)
        f = r.wait_next(timeout=5)
        m = memoryview(f)
        assert m.readonly
        assert m.shape == f.shape == a.shape and m.strides == f.strides
        assert m.itemsize == a.itemsize and m.nbytes == a.nbytes
        assert m.c_contiguous
        assert np.dtype(m.format) == np.dtype(dtype)
        assert m.tolist() == a.tolist()
        x = np.asarray(m)
        assert np.shares_memory(x, f.array) and not x.flags.writeable
        np.testing.assert_array_equal(x, a)
        assert bytes(f) == a.tobytes()
        np.testing.assert_array_equal(np.frombuffer(f, dtype), a.ravel())


def test_struct_reads_a_small_message_without_an_array(name):
    P = struct.Struct("<qqqq")
    with frameshm.Writer(name, shape=(64,), dtype="uint8", nslots=8) as w, \
            frameshm.Reader(name, queue=False) as r:
        for i in range(3):
            P.pack_into(w.loan(), 0, i, i * 2, -i, 1 << 40)
            w.commit()
        for i in range(3):
            f = r.wait_next(timeout=5)
            assert P.unpack_from(f, 0) == (i, i * 2, -i, 1 << 40)
            assert f._array is None   # no ndarray was made for it


def test_a_frame_cannot_be_written_through_its_buffer(name):
    with frameshm.Writer(name, shape=(16,), dtype="uint8", nslots=2) as w, \
            frameshm.Reader(name) as r:
        w.publish(np.arange(16, dtype=np.uint8))
        f = r.wait_next(timeout=5)
        with pytest.raises((BufferError, TypeError)):
            struct.pack_into("B", f, 0, 99)
        with pytest.raises(TypeError):
            memoryview(f)[0] = 99
        with pytest.raises((BufferError, TypeError)):
            socket.socket().recv_into(f)
        assert bytes(f) == bytes(range(16))
        assert f._buffer.exports == 0


@pytest.mark.parametrize("dtype,shape,strides,order,c,fortran", [
    ("uint16", (3, 4), (16, 2), 1, False, False),   # padded rows
    ("uint16", (3, 4), (2, 6), 2, False, True),     # column-major
    ("float64", (3, 1, 2), (16, 8, 8), 1, True, False),
])
def test_strided_frames_export_their_strides(name, dtype, shape, strides, order, c, fortran):
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        _publish_layout(w, dtype, shape, strides, order, 128)
        f = r.wait_latest(timeout=5)
        m = memoryview(f)
        assert m.shape == shape and m.strides == strides
        assert m.c_contiguous == c and m.f_contiguous == fortran
        x = np.asarray(m)
        assert np.shares_memory(x, f.array)
        np.testing.assert_array_equal(x, f.array)
        assert bytes(f) == f.array.tobytes()   # bytes() gathers a strided export in C order
        if not c:
            # A consumer that takes plain bytes cannot read a strided frame as one run.
            with pytest.raises(BufferError, match="not C-contiguous"):
                struct.unpack_from("<H", f, 0)


def test_an_export_keeps_the_pool_mapped_after_everything_else_is_gone(name):
    a = np.arange(4096, dtype=np.uint32)
    w = frameshm.Writer(name, shape=a.shape, dtype=a.dtype, nslots=2)
    r = frameshm.Reader(name)
    w.publish(a)
    f = r.wait_next(timeout=5)
    mapping = f._buffer
    m = memoryview(f)
    assert mapping.exports == 1
    del f
    r.close()
    w.close()
    gc.collect()
    assert m.tolist() == a.tolist()
    assert mapping.exports == 1
    m.release()
    assert mapping.exports == 0


def test_a_private_copy_stays_put_while_exported(name):
    with frameshm.Writer(name, shape=(8,), dtype="int16", nslots=2) as w, \
            frameshm.Reader(name) as r:
        w.publish(np.arange(8, dtype=np.int16) - 4)
        r.wait_next(timeout=5)
        f = r._r.read_copy()   # a frame over its own bytearray
        assert isinstance(f._buffer, bytearray)
        with memoryview(f) as m:
            assert m.format == "h" and m.tolist() == list(range(-4, 4))
            with pytest.raises(BufferError):
                f._buffer.extend(b"xx")   # would move the bytes the export points at
        f._buffer.extend(b"xx")   # released: the copy is the frame's own again


def test_exports_leak_nothing(name):
    with frameshm.Writer(name, shape=(64,), dtype="uint8", nslots=4) as w, \
            frameshm.Reader(name) as r:
        w.publish(np.zeros(64, np.uint8))
        f = r.wait_next(timeout=5)
        mapping = f._buffer
        refs = sys.getrefcount(mapping)
        frefs = sys.getrefcount(f)
        unpack = struct.Struct("<8q").unpack_from

        def round_(n):
            for _ in range(n):
                unpack(f, 0)
                memoryview(f).release()
                bytes(f)

        round_(20_000)
        gc.collect()
        before = rss_kib()
        round_(100_000)
        gc.collect()
        assert sys.getrefcount(mapping) == refs and sys.getrefcount(f) == frefs
        assert mapping.exports == 0
        assert rss_kib() - before < 1024, "100k exports grew the process"
