"""Property tests (Hypothesis): exact round trips of random layouts, and random slot
headers checked against an independent model of the wire format's validation rules
(docs/wire-format.md §3)."""

import struct

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import frameshm  # noqa: E402
from fshm_helpers import ITEMSIZE, SUPPORTED_DTYPES, epoch_dir, write_at  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(0, 4), min_size=1, max_size=8).map(tuple)
dtypes = st.sampled_from(SUPPORTED_DTYPES)
nslots_st = st.sampled_from([1, 2, 4, 8, 16])


def payload(shape, dtype, seed):
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)  # any bit pattern: NaNs, infs, ...
    return raw.view(dt).reshape(shape)


@settings(max_examples=60, **SETTINGS)
@given(shape=shapes, dtype=dtypes, nslots=nslots_st, nframes=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_fixed_stream_roundtrip(name, shape, dtype, nslots, nframes, seed):
    nframes = min(nframes, nslots)  # never lapped: process-all sees every frame
    frames = [payload(shape, dtype, seed + i) for i in range(nframes)]
    with frameshm.Writer(name, shape=shape, dtype=dtype, nslots=nslots) as w, \
            frameshm.Reader(name) as every, frameshm.Reader(name) as latest:
        for i, data in enumerate(frames):
            assert w.publish(data) == i
        for i, data in enumerate(frames):
            f = every.wait_next(timeout=5)
            assert (f.seq, f.skipped, f.shape, f.dtype) == (i, 0, shape, np.dtype(dtype))
            assert f.array.tobytes() == data.tobytes()
            assert f.valid()
        f = latest.wait_latest(timeout=5)
        # registered before frame 0: it passed over every frame but the newest
        assert (f.seq, f.skipped) == (nframes - 1, nframes - 1)
        assert f.array.tobytes() == frames[-1].tobytes()
        assert np.from_dlpack(f).tobytes() == frames[-1].tobytes()
        copy = latest.read_latest(copy=True)
        assert copy.shape == shape and copy.tobytes() == frames[-1].tobytes()
        del f


@settings(max_examples=40, **SETTINGS)
@given(layouts=st.lists(st.tuples(shapes, dtypes, st.integers(0, 2**32 - 1)), min_size=1, max_size=6),
       nslots=st.sampled_from([8, 16]))
def test_variable_stream_roundtrip(name, layouts, nslots):
    with frameshm.Writer(name, max_bytes=8 * 4**8, nslots=nslots) as w, frameshm.Reader(name) as r:
        for shape, dtype, seed in layouts:
            data = payload(shape, dtype, seed)
            w.publish(data)
            f = r.wait_next(timeout=5)
            assert (f.shape, f.dtype) == (shape, np.dtype(dtype))
            assert f.array.tobytes() == data.tobytes()
            del f


# ---- random slot headers -------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)


def _mostly(valid, anything):
    return st.one_of(st.just(valid), anything)


@st.composite
def headers(draw, slot, good_len):
    """Slot header bytes 8..256 (seq_commit untouched): mostly plausible, sometimes wild."""
    if draw(st.integers(0, 9)) == 0:
        return {"raw": draw(st.binary(min_size=248, max_size=248))}
    ndims = draw(st.one_of(st.integers(1, 4), st.integers(1, 8), st.integers(0, 255)))
    h = {
        "values_len": draw(st.one_of(st.just(good_len), st.integers(0, 300), u32)),
        "payload_slot": draw(_mostly(slot, u32)),
        "pool_id": draw(st.sampled_from([1, 1, 2, 0, 3, 65535])),
        "payload_offset": draw(_mostly(0, u32)),
        "timestamp": draw(st.integers(0, 2**64 - 1)),
        "meta_version": draw(u32),
        "pad": draw(st.binary(min_size=26, max_size=26)),
        "header_len": draw(_mostly(192, u32)),
        "msg": draw(_mostly((184, 52, 900, 1), st.tuples(u16, u16, u16, u16))),
        "dtype": draw(st.one_of(st.sampled_from(sorted(ITEMSIZE)), st.integers(-(2**15), 2**15 - 1))),
        "major": draw(st.sampled_from([1, 1, 2, 0, 3, -1])),
        "ndims": ndims,
        "pad_align": draw(st.integers(0, 255)),
        "progress_unit": draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 255))),
        "progress_stride": draw(st.one_of(st.integers(0, 256), u32)),
        "dims": draw(st.lists(st.one_of(st.integers(0, 5), st.integers(0, 70), i32), min_size=8, max_size=8)),
        "strides": draw(st.lists(st.one_of(st.just(0), st.integers(0, 80), i32), min_size=8, max_size=8)),
        "ref": draw(st.integers(0, 2**64 - 1)),
        "tail": draw(st.binary(min_size=101, max_size=101)),
    }
    return h


def encode(h):
    if "raw" in h:
        return h["raw"]
    a = struct.pack("<IIHIQI26sI4H", h["values_len"], h["payload_slot"], h["pool_id"], h["payload_offset"],
                    h["timestamp"], h["meta_version"], h["pad"], h["header_len"], *h["msg"])
    b = struct.pack("<hhBBBI8i8iQ101s", h["dtype"], h["major"], h["ndims"], h["pad_align"], h["progress_unit"],
                    h["progress_stride"], *h["dims"], *h["strides"], h["ref"], h["tail"])
    assert len(a) == 64 and len(b) == 184
    return a + b


def decode(raw):
    a = struct.unpack("<IIHIQI26sI4H", raw[:64])
    b = struct.unpack("<hhBBBI8i8iQ101s", raw[64:])
    return {
        "values_len": a[0], "payload_slot": a[1], "pool_id": a[2], "payload_offset": a[3], "timestamp": a[4],
        "header_len": a[7], "msg": tuple(a[8:12]), "dtype": b[0], "major": b[1], "ndims": b[2],
        "progress_unit": b[4], "progress_stride": b[5], "dims": list(b[6:14]), "strides": list(b[14:22]),
        "ref": b[22],
    }


def model(h, slot, pools):
    """The wire format's acceptance rules. Returns (shape, strides) or None (rejected)."""
    if h["header_len"] != 192 or tuple(h["msg"]) != (184, 52, 900, 1) or h["payload_offset"] != 0:
        return None
    if h["payload_slot"] != slot or h["pool_id"] not in pools or h["values_len"] > pools[h["pool_id"]]:
        return None
    n, item = h["ndims"], ITEMSIZE.get(h["dtype"])
    if not 1 <= n <= 8 or h["major"] not in (1, 2) or not item:
        return None
    dims, strides = list(h["dims"][:n]), list(h["strides"][:n])
    order = list(range(n - 1, -1, -1)) if h["major"] == 1 else list(range(n))
    contiguous = item
    for i in order:
        if dims[i] < 0 or strides[i] < 0:
            return None
        if strides[i] == 0:
            if contiguous > 2**31 - 1:
                return None
            strides[i] = contiguous
        contiguous = strides[i] * (dims[i] or 1)
    extent = span = item
    for i in order:
        if dims[i] <= 1:
            continue
        if strides[i] < span:
            return None  # overlapping or against the major order
        extent += (dims[i] - 1) * strides[i]
        span = extent
    if 0 in dims:
        extent = 0
    if extent > h["values_len"]:
        return None
    unit, pstride = h["progress_unit"], h["progress_stride"]
    if unit > 2 or (unit == 1 and pstride != strides[0]) or (unit == 2 and pstride != strides[n - 1]):
        return None
    return tuple(dims), tuple(strides), extent


def test_random_slot_headers_never_crash_the_reader(name):
    """Every example publishes a frame and overwrites its slot header (keeping seq_commit
    committed). The reader returns the frame exactly when the model accepts the header, and
    then its view lies inside the slot of the announced pool; otherwise it drops the frame,
    counts it and raises CorruptStream."""
    nslots = 4
    with frameshm.Writer(name, pools=[64, 256], nslots=nslots) as w, frameshm.Reader(name) as r:
        pools = dict(w.pools)  # pool_id -> stride
        ring = epoch_dir(name, w.epoch) / "header.ring"
        stats = {"accepted": 0, "rejected": 0}

        @settings(max_examples=800, **SETTINGS)
        @given(data=st.data())
        def check(data):
            seq = w.publish(np.arange(16, dtype=np.uint8).reshape(4, 4))
            slot = seq % nslots
            raw = encode(data.draw(headers(slot, 16)))
            write_at(ring, 64 + 256 * slot + 8, raw)
            h = decode(raw)
            expect = model(h, slot, pools)
            drops = r.drops
            try:
                f = r.wait_latest(timeout=0)
            except (frameshm.CorruptStream, frameshm.Timeout) as e:
                assert expect is None, f"a valid header was rejected: {e} {h}"
                assert isinstance(e, frameshm.CorruptStream)
                assert r.drops == drops + 1
                stats["rejected"] += 1
                return
            assert expect is not None, f"an invalid header was accepted: {h}"
            shape, strides, extent = expect
            assert (f.seq, f.slot) == (seq, slot)
            assert f.shape == shape and f.strides == strides
            assert f.dtype == np.dtype(frameshm.stream._CODE_DTYPES[h["dtype"]])
            assert f.nbytes == h["values_len"] <= pools[h["pool_id"]]
            stride = pools[h["pool_id"]]
            assert f._offset == 64 + slot * stride
            assert extent <= f.nbytes, "the view fits in the payload"
            assert f.timestamp_ns == h["timestamp"]
            assert f.ref_seq == (h["ref"] - 1 if h["ref"] else None)
            a = f.array  # numpy checks the view against the mapping as well
            assert a.shape == shape
            a.sum()
            stats["accepted"] += 1
            del f, a

        check()
        assert stats["rejected"] > 0
        assert stats["accepted"] > 0, "the strategy should reach the accepting paths too"


@settings(max_examples=30, **SETTINGS)
@given(nslots=nslots_st, ahead=st.integers(0, 40))
def test_valid_tracks_overwrites(name, nslots, ahead):
    """Frame.valid() is True exactly while fewer than nslots newer frames were published."""
    with frameshm.Writer(name, shape=(2,), nslots=nslots) as w, frameshm.Reader(name) as r:
        w.publish(np.array([1, 2], np.uint8))
        f = r.wait_latest(timeout=5)
        for i in range(ahead):
            w.publish(np.array([i % 256, 0], np.uint8))
        assert f.valid() is (ahead < nslots)
        g = r.wait_latest(timeout=5) if ahead else f
        assert g.seq == ahead and (ahead == 0 or g.skipped == ahead - 1)
        del f, g
