"""DLPack export of frames (binding/dlpack.c): zero-copy and flagged read-only for DLPack
1.x consumers, a private copy checked untorn for older ones, and the capsule's lifetime.

Runs on any numpy: tests that need a DLPack 1.x numpy consumer (numpy >= 2.1) skip on older
ones, and the capsule's fields are read with ctypes, as a C consumer reads them. The torch
tests run where torch is installed (pip install torch)."""

import ctypes
import gc
import os
import sys
import textwrap

import numpy as np
import pytest

import frameshm
from frameshm import _core
from fshm_helpers import (SUPPORTED_DTYPES, describe_rc, epoch_dir, maps_lines, mapped_paths_under,
                          result_lines, rss_kib, run_snippet)


# numpy 1.22 has it as np._from_dlpack only (public from 1.23)
from_dlpack = getattr(np, "from_dlpack", None) or np._from_dlpack


def _numpy_asks_dlpack1() -> bool:
    """Whether np.from_dlpack asks for DLPack 1.x (max_version): numpy 2.x does, numpy 1.x
    is a DLPack 0.x consumer."""
    asked = {}

    class Probe:
        def __dlpack__(self, **kwargs):
            asked.update(kwargs)
            return np.zeros(1, np.uint8).__dlpack__()

        def __dlpack_device__(self):
            return (1, 0)

    from_dlpack(Probe())
    return tuple(asked.get("max_version") or (0, 0)) >= (1, 0)


NP_DLPACK1 = _numpy_asks_dlpack1()
needs_dlpack1_numpy = pytest.mark.skipif(not NP_DLPACK1, reason=f"numpy {np.__version__} is a DLPack 0.x consumer")

READ_ONLY = 1 << 0
IS_COPIED = 1 << 1
kDLInt, kDLUInt, kDLFloat, kDLBool = 0, 1, 2, 6
DL_DTYPES = {
    "uint8": (kDLUInt, 8), "int8": (kDLInt, 8), "uint16": (kDLUInt, 16), "int16": (kDLInt, 16),
    "uint32": (kDLUInt, 32), "int32": (kDLInt, 32), "uint64": (kDLUInt, 64), "int64": (kDLInt, 64),
    "float32": (kDLFloat, 32), "float64": (kDLFloat, 64), "bool": (kDLBool, 8),
}


# ---- a ctypes DLPack consumer --------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                            ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor)))]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))),
    ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]

_api = ctypes.pythonapi
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
# The capsule keeps the name's pointer: module-level bytes live as long as the process.
USED_VERSIONED = b"used_dltensor_versioned"


def capsule_struct(cap):
    """(name, the managed tensor struct) of a capsule, read as a C consumer would."""
    name = _api.PyCapsule_GetName(cap).decode()
    ptr = _api.PyCapsule_GetPointer(cap, name.encode())
    kind = DLManagedTensorVersioned if name == "dltensor_versioned" else DLManagedTensor
    return name, kind.from_address(ptr)


def describe(cap):
    name, m = capsule_struct(cap)
    t = m.dl_tensor
    out = {
        "name": name,
        "data": t.data,
        "device": (t.device.device_type, t.device.device_id),
        "dtype": (t.dtype.code, t.dtype.bits, t.dtype.lanes),
        "shape": tuple(t.shape[i] for i in range(t.ndim)),
        "strides": tuple(t.strides[i] for i in range(t.ndim)),
        "byte_offset": t.byte_offset,
    }
    if name == "dltensor_versioned":
        out["version"] = (m.version.major, m.version.minor)
        out["flags"] = m.flags
    return out


def read_capsule(cap, dtype):
    """The tensor's elements, read through the capsule's pointer, shape and strides."""
    d = describe(cap)
    dt = np.dtype(dtype)
    nbytes = (sum((n - 1) * s for n, s in zip(d["shape"], d["strides"])) + 1) * dt.itemsize
    if 0 in d["shape"]:
        return np.zeros(d["shape"], dt)
    buf = (ctypes.c_char * nbytes).from_address(d["data"])
    a = np.ndarray(d["shape"], dt, buf, 0, tuple(s * dt.itemsize for s in d["strides"]))
    return a.copy()


class Handover:
    """Hands a capsule made earlier to np.from_dlpack, which wants an exporting object."""

    def __init__(self, cap):
        self.cap = cap

    def __dlpack__(self, **kwargs):
        cap, self.cap = self.cap, None
        return cap

    def __dlpack_device__(self):
        return (1, 0)


def pattern(shape, dtype, seed=0):
    n = int(np.prod(shape))
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return ((np.arange(n) * 7 + seed) % 3 == 0).reshape(shape)
    if dt.kind == "f":
        return ((np.arange(n) - n / 2) * 0.25 + seed).astype(dt).reshape(shape)
    return ((np.arange(n) * 7 + seed) % 120).astype(dt).reshape(shape)


def shared_range(f):
    """Whether a pointer lies in the frame's pool mapping (vs a private copy)."""
    base = f.array.ctypes.data - f._offset
    return lambda p: base <= p < base + f._buffer.size


# ---- devices and arguments -----------------------------------------------------------


def test_device_is_cpu(name):
    with frameshm.Writer(name, shape=(4,), dtype="uint8") as w, frameshm.Reader(name) as r:
        w.publish(pattern((4,), "uint8"))
        f = r.wait_latest(timeout=5)
        assert f.__dlpack_device__() == (1, 0)
        for dev in (None, (1, 0)):
            assert describe(f.__dlpack__(max_version=(1, 0), dl_device=dev))["device"] == (1, 0)
        for dev in ((2, 0), (1, 1), (13, 0)):
            with pytest.raises(BufferError, match="CPU"):
                f.__dlpack__(max_version=(1, 0), dl_device=dev)


def test_arguments(name):
    with frameshm.Writer(name, shape=(4,), dtype="uint8") as w, frameshm.Reader(name) as r:
        w.publish(pattern((4,), "uint8"))
        f = r.wait_latest(timeout=5)
        for stream in (None, -1):  # -1: "no synchronisation", harmless on the CPU
            assert describe(f.__dlpack__(stream=stream, max_version=(1, 0)))["name"] == "dltensor_versioned"
        for stream in (0, 1, 2, 12345, "x"):
            with pytest.raises(frameshm.InvalidArgument, match="stream"):
                f.__dlpack__(stream=stream, max_version=(1, 0))
        with pytest.raises(TypeError):
            f.__dlpack__(None)  # keyword-only, as the spec says
        with pytest.raises(TypeError):
            f.__dlpack__(max_version=(1, 0), unknown=1)
        for bad in ("1.0", (1,), (1, 0, 0), (1.0, 0)):
            with pytest.raises(frameshm.InvalidArgument, match="max_version"):
                f.__dlpack__(max_version=bad)
        # A newer major version still reads 1.x capsules; 0.x gets the legacy capsule.
        assert describe(f.__dlpack__(max_version=(2, 3)))["version"] == (1, 0)
        assert describe(f.__dlpack__(max_version=(1, 5)))["version"] == (1, 0)
        assert describe(f.__dlpack__(max_version=(0, 8)))["name"] == "dltensor"
        assert describe(f.__dlpack__())["name"] == "dltensor"


# ---- DLPack 1.x: zero-copy, read-only ------------------------------------------------


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_versioned_capsule_is_the_shared_memory_flagged_read_only(name, dtype):
    shape = (3, 5, 2)
    data = pattern(shape, dtype)
    with frameshm.Writer(name, shape=shape, dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        cap = f.__dlpack__(max_version=(1, 0))
        d = describe(cap)
        assert d["name"] == "dltensor_versioned" and d["version"] == (1, 0)
        assert d["flags"] == READ_ONLY
        assert d["data"] == f.array.ctypes.data and d["byte_offset"] == 0
        assert d["dtype"] == DL_DTYPES[dtype] + (1,)
        assert d["shape"] == shape
        assert d["strides"] == tuple(s // f.array.itemsize for s in f.array.strides)
        np.testing.assert_array_equal(read_capsule(cap, dtype), data)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_copy_true_is_a_private_writable_copy(name, dtype):
    shape = (4, 3)
    data = pattern(shape, dtype, seed=1)
    with frameshm.Writer(name, shape=shape, dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        in_pool = shared_range(f)
        cap = f.__dlpack__(max_version=(1, 0), copy=True)
        d = describe(cap)
        assert d["flags"] == IS_COPIED  # and not READ_ONLY: the consumer owns it
        assert not in_pool(d["data"]) and d["data"] % 64 == 0
        assert d["strides"] == (3, 1)
        np.testing.assert_array_equal(read_capsule(cap, dtype), data)


@needs_dlpack1_numpy
@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_numpy_from_dlpack_is_zero_copy_and_read_only(name, dtype):
    data = pattern((6, 4), dtype)
    with frameshm.Writer(name, shape=data.shape, dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        x = from_dlpack(f)
        assert np.shares_memory(x, f.array)
        assert x.flags.writeable is False
        assert x.dtype == np.dtype(dtype) and x.shape == data.shape
        np.testing.assert_array_equal(x, data)
        with pytest.raises(ValueError, match="read-only"):
            x[0, 0] = 1
        assert np.shares_memory(from_dlpack(f, copy=False), f.array)
        assert np.shares_memory(from_dlpack(f, device="cpu"), f.array)


@needs_dlpack1_numpy
def test_numpy_copy_true_is_writable_and_private(name):
    data = pattern((6, 4), "int16")
    with frameshm.Writer(name, shape=data.shape, dtype="int16") as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        y = from_dlpack(f, copy=True)
        assert not np.shares_memory(y, f.array)
        assert y.flags.writeable
        y[:] = -1
        np.testing.assert_array_equal(f.array, data)
        np.testing.assert_array_equal(from_dlpack(f), data)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_numpy_from_dlpack_works_on_this_numpy(name, dtype):
    """from_dlpack(frame) on the installed numpy: zero-copy read-only on a DLPack 1.x
    numpy, a private copy on an older one (which cannot be told read-only)."""
    if dtype == "bool" and np.lib.NumpyVersion(np.__version__) < "1.25.0":
        pytest.skip(f"numpy {np.__version__} has no DLPack bool (kDLBool, DLPack 0.8)")
    data = pattern((5, 7), dtype)
    with frameshm.Writer(name, shape=data.shape, dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        x = from_dlpack(f)
        np.testing.assert_array_equal(x, data)
        assert x.dtype == np.dtype(dtype)
        assert np.shares_memory(x, f.array) is NP_DLPACK1
        if not NP_DLPACK1 and x.flags.writeable:
            x[:] = 0  # the copy is the consumer's own
            np.testing.assert_array_equal(f.array, data)


# ---- older consumers: a copy, checked untorn -----------------------------------------


@pytest.mark.parametrize("max_version", [None, (0, 8)])
def test_legacy_consumer_gets_a_copy(name, max_version):
    data = pattern((8, 3), "uint32", seed=2)
    with frameshm.Writer(name, shape=data.shape, dtype="uint32") as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        in_pool = shared_range(f)
        kw = {} if max_version is None else {"max_version": max_version}
        cap = f.__dlpack__(**kw)
        d = describe(cap)
        assert d["name"] == "dltensor"  # no flags field: never the shared memory
        assert not in_pool(d["data"])
        assert d["dtype"] == (kDLUInt, 32, 1) and d["shape"] == (8, 3) and d["strides"] == (3, 1)
        np.testing.assert_array_equal(read_capsule(cap, "uint32"), data)
        # consumed as numpy consumes a 0.x capsule
        x = from_dlpack(Handover(f.__dlpack__(**kw)))
        np.testing.assert_array_equal(x, data)
        assert not np.shares_memory(x, f.array)
        if x.flags.writeable:
            x[:] = 7
            np.testing.assert_array_equal(f.array, data)


def test_legacy_consumer_refused_without_copy(name):
    with frameshm.Writer(name, shape=(4,), dtype="uint8") as w, frameshm.Reader(name) as r:
        w.publish(pattern((4,), "uint8"))
        f = r.wait_latest(timeout=5)
        for kw in ({}, {"max_version": (0, 8)}):
            with pytest.raises(BufferError, match="no read-only flag.*max_version=\\(1, 0\\)"):
                f.__dlpack__(copy=False, **kw)
        # DLPack 1.x with copy=False is the zero-copy export
        assert describe(f.__dlpack__(max_version=(1, 0), copy=False))["flags"] == READ_ONLY


def test_copies_are_checked_untorn(name):
    with frameshm.Writer(name, shape=(16,), dtype="uint8", nslots=2) as w, frameshm.Reader(name) as r:
        w.publish(pattern((16,), "uint8"))
        f = r.wait_latest(timeout=5)
        for seed in (1, 2):  # nslots newer frames: f's slot now holds another frame
            w.publish(pattern((16,), "uint8", seed=seed))
        assert not f.valid()
        with pytest.raises(frameshm.Overrun, match="overwritten"):
            f.__dlpack__()
        with pytest.raises(frameshm.Overrun):
            f.__dlpack__(max_version=(1, 0), copy=True)
        # the zero-copy export is not a copy: what it shows is the consumer's to check
        # (frame.valid() after use), as for frame.array
        cap = f.__dlpack__(max_version=(1, 0))
        np.testing.assert_array_equal(read_capsule(cap, "uint8"), f.array)


def test_copy_after_reader_close_is_checked_in_the_frames_own_ring(name):
    """The checked copy a DLPack 0.x consumer gets needs no Reader: it re-checks the slot in
    the ring mapping the frame holds, so it works after close and refuses a torn copy."""
    data = pattern((16,), "uint8")
    with frameshm.Writer(name, shape=(16,), dtype="uint8", nslots=2) as w:
        r = frameshm.Reader(name)
        w.publish(data)
        f = r.wait_latest(timeout=5)
        r.close()
        np.testing.assert_array_equal(read_capsule(f.__dlpack__(), "uint8"), data)
        cap = f.__dlpack__(max_version=(1, 0))
        np.testing.assert_array_equal(read_capsule(cap, "uint8"), data)
        for i in range(2):
            w.publish(pattern((16,), "uint8", seed=i + 1))
        with pytest.raises(frameshm.Overrun, match="overwritten"):
            f.__dlpack__()
        del f, cap


# ---- layouts -------------------------------------------------------------------------


def _publish_layout(w, dtype, shape, strides, order, nbytes):
    """Publishes raw bytes with an explicit layout (what a C producer can send)."""
    raw = (np.arange(nbytes) % 251).astype(np.uint8)
    w._w.set_tensor(frameshm.stream._DTYPE_CODES[np.dtype(dtype)], shape, strides=strides,
                    major_order=order)
    w._w.publish(raw, 0, None)


@pytest.mark.parametrize("dtype,shape,strides,order,elem_strides", [
    ("uint16", (3, 4), (16, 2), 1, (8, 1)),    # padded rows
    ("uint16", (3, 4), (2, 6), 2, (1, 3)),     # column-major
    ("float32", (2, 3, 2), (40, 12, 4), 1, (10, 3, 1)),
    ("float64", (3, 1, 2), (16, 8, 8), 1, (2, 1, 1)),
])
def test_strided_frames_export_in_place(name, dtype, shape, strides, order, elem_strides):
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        _publish_layout(w, dtype, shape, strides, order, 128)
        f = r.wait_latest(timeout=5)
        assert f.strides == strides
        cap = f.__dlpack__(max_version=(1, 0))
        d = describe(cap)
        assert d["flags"] == READ_ONLY and d["data"] == f.array.ctypes.data
        assert d["strides"] == elem_strides
        np.testing.assert_array_equal(read_capsule(cap, dtype), f.array)
        # the copies are compact, row-major
        for c in (f.__dlpack__(), f.__dlpack__(max_version=(1, 0), copy=True)):
            dc = describe(c)
            assert dc["strides"] == tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            np.testing.assert_array_equal(read_capsule(c, dtype), f.array)
        if NP_DLPACK1:
            x = from_dlpack(f)
            assert np.shares_memory(x, f.array)
            np.testing.assert_array_equal(x, f.array)


def test_strides_dlpack_cannot_express_are_copied(name):
    """DLPack strides count elements: a row pitch of 9 bytes for uint16 is not one."""
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        _publish_layout(w, "uint16", (3, 4), (9, 2), 1, 64)
        f = r.wait_latest(timeout=5)
        in_pool = shared_range(f)
        cap = f.__dlpack__(max_version=(1, 0))
        d = describe(cap)
        assert d["flags"] == IS_COPIED and not in_pool(d["data"])
        assert d["strides"] == (4, 1)
        np.testing.assert_array_equal(read_capsule(cap, "uint16"), f.array)
        with pytest.raises(BufferError, match="multiple of the element size"):
            f.__dlpack__(max_version=(1, 0), copy=False)


def test_empty_frames(name):
    with frameshm.Writer(name, max_bytes=4096) as w, frameshm.Reader(name) as r:
        w.publish(np.zeros((0, 3), np.float32))
        f = r.wait_latest(timeout=5)
        for kw in ({"max_version": (1, 0)}, {}, {"max_version": (1, 0), "copy": True}):
            d = describe(f.__dlpack__(**kw))
            assert d["shape"] == (0, 3) and d["data"]
        if NP_DLPACK1:
            assert from_dlpack(f).shape == (0, 3)


def test_private_buffer_frames_are_copied(name):
    """A frame over a private copy (Reader.read_copy) is not shared memory: its export is a
    copy (nothing to check: nobody else writes it), and copy=False cannot be honoured."""
    data = pattern((4, 4), "int32")
    with frameshm.Writer(name, shape=data.shape, dtype="int32") as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r._r.read_copy()
        assert not isinstance(f._buffer, _core.Mapping)
        d = describe(f.__dlpack__(max_version=(1, 0)))
        assert d["flags"] == IS_COPIED and d["data"] != f.array.ctypes.data
        np.testing.assert_array_equal(read_capsule(f.__dlpack__(), "int32"), data)
        with pytest.raises(BufferError, match="private copy"):
            f.__dlpack__(max_version=(1, 0), copy=False)


# ---- lifetime ------------------------------------------------------------------------


def _pool_path(name, w):
    return os.path.realpath(epoch_dir(name, w.epoch) / "1.pool")


def test_capsule_outlives_frame_reader_and_writer(name, shm_base):
    data = pattern((32, 32), "uint8", seed=4)
    w = frameshm.Writer(name, shape=data.shape)
    r = frameshm.Reader(name)
    pool = _pool_path(name, w)
    w.publish(data)
    f = r.wait_latest(timeout=5)
    cap = f.__dlpack__(max_version=(1, 0))
    del f
    r.close()
    w.close()
    del r, w
    gc.collect()
    held = [line for line in maps_lines() if pool in line]
    assert held and all(line.endswith("(deleted)") for line in held), "the capsule holds the pool"
    np.testing.assert_array_equal(read_capsule(cap, "uint8"), data)
    if NP_DLPACK1:
        x = from_dlpack(Handover(cap))  # numpy takes ownership: the deleter is its call
        del cap
        gc.collect()
        assert any(pool in line for line in maps_lines()), "the array holds the pool"
        np.testing.assert_array_equal(x, data)
        del x
    else:
        del cap
    gc.collect()
    assert mapped_paths_under(shm_base) == []


def test_unconsumed_capsule_releases_the_mapping(name, shm_base):
    with frameshm.Writer(name, shape=(64,)) as w, frameshm.Reader(name) as r:
        w.publish(pattern((64,), "uint8"))
        f = r.wait_latest(timeout=5)
        caps = [f.__dlpack__(max_version=(1, 0)) for _ in range(3)]
        del f
    gc.collect()
    assert mapped_paths_under(shm_base) != []
    del caps
    gc.collect()
    assert mapped_paths_under(shm_base) == []


def test_consumer_deleter_releases_the_mapping(name, shm_base):
    """As a C consumer does: take the capsule (rename it used_...), read, call the deleter
    (here without the GIL: ctypes releases it); the capsule's destructor then leaves it be."""
    data = pattern((64,), "uint8", seed=9)
    with frameshm.Writer(name, shape=(64,)) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        cap = f.__dlpack__(max_version=(1, 0))
        del f
    gc.collect()
    _, m = capsule_struct(cap)
    assert _api.PyCapsule_SetName(cap, USED_VERSIONED) == 0
    t = m.dl_tensor
    assert t.ndim == 1 and t.shape[0] == 64
    np.testing.assert_array_equal(np.frombuffer((ctypes.c_char * 64).from_address(t.data), np.uint8), data)
    assert mapped_paths_under(shm_base) != []
    m.deleter(ctypes.pointer(m))
    assert mapped_paths_under(shm_base) == []
    del cap, m  # no second release (that would be a double free)
    gc.collect()


def test_exports_do_not_leak(name, shm_base):
    with frameshm.Writer(name, shape=(64, 64), dtype="uint8") as w, frameshm.Reader(name) as r:
        w.publish(pattern((64, 64), "uint8"))
        f = r.wait_latest(timeout=5)
        kinds = [{"max_version": (1, 0)}, {}, {"max_version": (1, 0), "copy": True}]

        def churn(n):
            for i in range(n):
                f.__dlpack__(**kinds[i % 3])
            if NP_DLPACK1:
                for _ in range(n // 10):
                    from_dlpack(f)

        churn(10_000)  # warm up allocator and caches
        gc.collect()
        refs = (sys.getrefcount(f), sys.getrefcount(f._buffer), sys.getrefcount(r._r))
        rss = rss_kib()
        churn(100_000)
        gc.collect()
        assert (sys.getrefcount(f), sys.getrefcount(f._buffer), sys.getrefcount(r._r)) == refs
        # 100,000 leaked exports would be >= 20 MB (a 4 KiB copy or a 200-byte header each)
        assert rss_kib() - rss < 4096, f"RSS grew {rss_kib() - rss} KiB over 100k exports"
        del f
    gc.collect()
    assert mapped_paths_under(shm_base) == [], "an export still holds a mapping reference"


# ---- torch ---------------------------------------------------------------------------

TORCH_DTYPES = ["uint8", "int8", "int16", "int32", "int64", "float32", "float64", "bool"]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_from_dlpack_gets_a_copy(name, dtype):
    """torch ignores the read-only flag (it has no read-only tensors): it gets a copy."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    data = pattern((5, 3), dtype, seed=3)
    with frameshm.Writer(name, shape=data.shape, dtype=dtype) as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        t = torch.from_dlpack(f)
        assert t.data_ptr() != f.array.ctypes.data
        np.testing.assert_array_equal(t.numpy(), data)
        for t2 in (torch.from_dlpack(f, copy=True), torch.as_tensor(f), torch.asarray(f)):
            assert t2.data_ptr() != f.array.ctypes.data
            np.testing.assert_array_equal(t2.numpy(), data)


def test_torch_copy_false_is_zero_copy(name):
    """An explicit copy=False is honoured: the tensor aliases the read-only shared memory
    (the capsule says so; torch cannot enforce it, see README)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    data = pattern((5, 3), "float32")
    with frameshm.Writer(name, shape=data.shape, dtype="float32") as w, frameshm.Reader(name) as r:
        w.publish(data)
        f = r.wait_latest(timeout=5)
        t = torch.from_dlpack(f, copy=False)
        assert t.data_ptr() == f.array.ctypes.data
        np.testing.assert_array_equal(t.numpy(), data)
        del t


def test_torch_in_place_op_neither_crashes_nor_touches_the_stream(name):
    """The crash of issue 14: torch.from_dlpack(frame) then t.sub_(1) killed the process
    (SIGSEGV) writing the read-only mapping. In a child process: it must exit 0, and the
    frame (seen by the child and by this process) must be unchanged."""
    pytest.importorskip("torch", reason="torch is not installed (pip install torch)")
    data = pattern((64, 48, 3), "uint8", seed=5)
    with frameshm.Writer(name, shape=data.shape, dtype="uint8", nslots=4) as w, frameshm.Reader(name) as mine:
        w.publish(data)
        rc, out, err = run_snippet(textwrap.dedent(f"""
            import numpy as np, torch, frameshm
            r = frameshm.Reader({name!r})
            f = r.read_latest(copy=False)
            before = f.array.copy()
            t = torch.from_dlpack(f)
            t.sub_(1)
            for make in (torch.from_dlpack, torch.as_tensor, torch.asarray):
                make(f).add_(5)
            print("RESULT", int((f.array == before).all()), int(f.valid()),
                  int((t.numpy() == (before - 1)).all()))
            r.close()
        """), timeout=120)
        assert rc == 0, f"child: {describe_rc(rc)}\n{err[-3000:]}"
        assert result_lines(out) == ["1 1 1"], out
        f = mine.read_latest(copy=False)
        np.testing.assert_array_equal(f.array, data)
