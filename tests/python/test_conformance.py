"""Conformance with the SHM Tensor Pool Wire Spec v1.2 as its other implementations use it.

The regions here are laid out with ``struct`` from the spec's field lists (§7.1, §8.2),
the way the reference C and Julia producers write them -- independently of frameshm's
encoder -- and frameshm must read them; the other way round, what frameshm writes is
decoded here as a reference consumer would. The readings frameshm chooses where the spec
is silent are listed in docs/wire-format.md ("Readings").
"""

from __future__ import annotations

import os
import shutil
import struct
import time

import numpy as np
import pytest

import frameshm

MAGIC = 0x544F504C53484D31
SB = struct.Struct("<QIQIhHIIIQQQ")  # ShmRegionSuperblock: 64 bytes, packed
SLOT = struct.Struct("<QIIHIQI26xI")  # SlotHeader block (60) + headerBytes length
MSGHDR = struct.Struct("<HHHH")
TENSOR = struct.Struct("<hhBBBI8i8i")  # TensorHeader fields, 75 of its 184 bytes
assert SB.size == 64 and SLOT.size == 64 and TENSOR.size == 75

NSLOTS = 4
STRIDE = 1024
STREAM_ID = 4242
EPOCH = 5


def _proc_start(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _slot(seq: int, idx: int, arr: np.ndarray) -> bytes:
    dims = list(arr.shape) + [0] * (8 - arr.ndim)
    strides = list(arr.strides) + [0] * (8 - arr.ndim)
    body = SLOT.pack((seq << 1) | 1, arr.nbytes, idx, 1, 0, 1000 + seq, 0, 192)
    body += MSGHDR.pack(184, 52, 900, 1)
    body += TENSOR.pack(1, 1, arr.ndim, 0, 0, 0, *dims, *strides).ljust(184, b"\0")
    assert len(body) == 256
    return body


def _control_region(header_uri: str, pool_uri: str, latest: int) -> bytes:
    """frameshm's own control region (docs/wire-format.md §5), announcing regions
    another implementation created; this process stands in as their live producer."""
    c = bytearray(4096 + 64 * 128)
    now = time.monotonic_ns()
    struct.pack_into("<QIIQQQQQQ", c, 0, 0x314C54434D485346, 2, STREAM_ID, EPOCH, latest,
                     os.getpid(), _proc_start(os.getpid()), now, now)
    c[65] = 1  # state: live
    struct.pack_into("<Q", c, 112, 2)  # announce seqlock, even: complete
    struct.pack_into("<QII", c, 192, EPOCH, NSLOTS, 1)
    c[208:208 + len(header_uri)] = header_uri.encode()
    struct.pack_into("<HHII", c, 720, 1, 0, STRIDE, NSLOTS)
    c[736:736 + len(pool_uri)] = pool_uri.encode()
    return bytes(c)


def _write_reference_stream(base, pool_slot_bytes: int, frames):
    from fshm_helpers import ns_dir

    sdir = ns_dir(None, None) / str(STREAM_ID)
    edir = sdir / str(EPOCH)
    edir.mkdir(parents=True, mode=0o700)
    for d in (edir, sdir, sdir.parent, sdir.parent.parent):
        os.chmod(d, 0o700)
    ring = bytearray(64 + NSLOTS * 256)
    pool = bytearray(64 + NSLOTS * STRIDE)
    now = time.monotonic_ns()
    # Both references: a header ring has slot_bytes 256 and stride_bytes 0.
    SB.pack_into(ring, 0, MAGIC, 1, EPOCH, STREAM_ID, 1, 0, NSLOTS, 256, 0, 1, now, now)
    SB.pack_into(pool, 0, MAGIC, 1, EPOCH, STREAM_ID, 2, 1, NSLOTS, pool_slot_bytes, STRIDE, 1, now, now)
    for seq, arr in enumerate(frames):
        idx = seq & (NSLOTS - 1)
        ring[64 + idx * 256:64 + (idx + 1) * 256] = _slot(seq, idx, arr)
        pool[64 + idx * STRIDE:64 + idx * STRIDE + arr.nbytes] = arr.tobytes()
    (edir / "header.ring").write_bytes(ring)
    (edir / "1.pool").write_bytes(pool)
    for f in ("header.ring", "1.pool"):
        os.chmod(edir / f, 0o600)
    ctl = _control_region(f"shm:file?path={edir / 'header.ring'}", f"shm:file?path={edir / '1.pool'}",
                          len(frames))
    (sdir / "frameshm.ctl").write_bytes(ctl)
    os.chmod(sdir / "frameshm.ctl", 0o600)
    return sdir


@pytest.mark.parametrize("pool_slot_bytes", [STRIDE, 0xFFFFFFFF], ids=["julia", "c"])
def test_reads_regions_laid_out_as_the_references_write_them(shm_base, pool_slot_bytes):
    frames = [np.arange(32, dtype=np.uint8).reshape(4, 8) + 10 * i for i in range(3)]
    sdir = _write_reference_stream(shm_base, pool_slot_bytes, frames)
    try:
        with frameshm.Reader(stream_id=STREAM_ID, subscribe=False) as r:
            f = r.read_latest(copy=False)
            assert f is not None and f.seq == 2 and f.epoch == EPOCH
            np.testing.assert_array_equal(f.array, frames[2])
            np.testing.assert_array_equal(r.read_latest(), frames[2])
        with frameshm.Reader(stream_id=STREAM_ID) as r:
            f = r.wait_latest(timeout=5)
            assert f.seq == 2 and f.timestamp_ns == 1002
            np.testing.assert_array_equal(f.array, frames[2])
    finally:
        shutil.rmtree(sdir.parent.parent)


@pytest.mark.parametrize("field,value,what", [
    (36, 64, "stride_bytes"),       # ring stride neither 0 nor 256
    (32, 0, "slot_bytes"),          # ring slot_bytes must be 256
])
def test_other_ring_readings_are_refused(shm_base, field, value, what):
    frames = [np.zeros((4, 8), np.uint8)]
    sdir = _write_reference_stream(shm_base, STRIDE, frames)
    ring = sdir / str(EPOCH) / "header.ring"
    with open(ring, "r+b") as fh:
        fh.seek(field)
        fh.write(struct.pack("<I", value))
    try:
        with pytest.raises(frameshm.CorruptStream, match=what):
            frameshm.Reader(stream_id=STREAM_ID, subscribe=False)
    finally:
        shutil.rmtree(sdir.parent.parent)


@pytest.mark.parametrize("value", [0, 512, 0xFFFFFFFE])
def test_other_pool_slot_bytes_are_refused(shm_base, value):
    sdir = _write_reference_stream(shm_base, value, [np.zeros((4, 8), np.uint8)])
    try:
        with pytest.raises(frameshm.CorruptStream, match="slot_bytes"):
            frameshm.Reader(stream_id=STREAM_ID, subscribe=False)
    finally:
        shutil.rmtree(sdir.parent.parent)


def test_frameshm_regions_decode_as_a_reference_consumer_reads_them(name):
    """The other direction: a frame frameshm writes, decoded from its files with the
    spec's layout alone."""
    from fshm_helpers import stream_dir

    img = (np.arange(6 * 10 * 3) % 251).astype(np.uint8).reshape(6, 10, 3)
    with frameshm.Writer(name, shape=img.shape, dtype=img.dtype, nslots=4) as w:
        seq = w.publish(img)
        sdir = stream_dir(name)
        ring = (sdir / str(w.epoch) / "header.ring").read_bytes()
        sb = SB.unpack_from(ring, 0)
        assert sb[0] == MAGIC and sb[1] == 1 and sb[2] == w.epoch and sb[3] == w.stream_id
        assert sb[4] == 1 and sb[5] == 0 and sb[6] == 4 and sb[7] == 256
        assert sb[9] == os.getpid()
        idx = seq & 3
        s = SLOT.unpack_from(ring, 64 + idx * 256)
        commit, length, pslot, pool_id, poff, _ts, _meta, hlen = s
        assert commit == (seq << 1) | 1 and length == img.nbytes and pslot == idx
        assert poff == 0 and hlen == 192
        assert MSGHDR.unpack_from(ring, 64 + idx * 256 + 64) == (184, 52, 900, 1)
        t = TENSOR.unpack_from(ring, 64 + idx * 256 + 72)
        dtype, order, ndims, _pad, unit, pstride = t[:6]
        assert (dtype, order, ndims, unit, pstride) == (1, 1, 3, 0, 0)
        assert t[6:9] == img.shape and t[14:17] == img.strides
        pool = (sdir / str(w.epoch) / f"{pool_id}.pool").read_bytes()
        psb = SB.unpack_from(pool, 0)
        stride = psb[8]
        assert psb[4] == 2 and psb[5] == pool_id and psb[6] == 4
        assert stride >= 64 and stride & (stride - 1) == 0 and psb[7] in (stride, 0xFFFFFFFF)
        data = pool[64 + idx * stride:64 + idx * stride + length]
        np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(img.shape), img)


# ---- epochs across producer restarts (§15.2, §10.1.1) --------------------------------

_PRODUCE = r"""
import frameshm, numpy as np
with frameshm.Writer(%(name)r, shape=(2,), dtype="uint8") as w:
    w.publish(np.zeros(2, np.uint8))
    say("RESULT", w.epoch)
"""


@pytest.mark.parametrize("with_reader", [False, True], ids=["alone", "reader"])
def test_epochs_strictly_increase_over_restarts(name, with_reader):
    """Five producers in turn, each its own process closing cleanly: the epochs they get
    never repeat or go back, whether or not a reader keeps the control region alive."""
    from fshm_helpers import describe_rc, result_lines, run_snippet, stream_dir

    reader = frameshm.Reader(name) if with_reader else None
    try:
        epochs = []
        for _ in range(5):
            rc, out, err = run_snippet(_PRODUCE % dict(name=name), timeout=60)
            assert rc == 0, f"{describe_rc(rc)}: {err[-2000:]}"
            epochs.append(int(result_lines(out)[0]))
            if not with_reader:
                assert not stream_dir(name).exists(), "a clean close removes the stream"
        assert all(b > a for a, b in zip(epochs, epochs[1:])), epochs
        if with_reader:
            assert stream_dir(name).exists(), "the reader's registration keeps the stream"
    finally:
        if reader is not None:
            reader.close()


# ---- foreign mode: a stream with no frameshm control region (docs/wire-format.md §9) ----

# A producer as the references write one, in its own process: canonical layout, ring
# stride 0, pool slot_bytes null, seqlock commits, activity refreshed, no frameshm.ctl.
_REFERENCE_PRODUCER = r"""
import ctypes, mmap, os, struct, time
import numpy as np
import frameshm
SB = struct.Struct("<QIQIhHIIIQQQ")
SLOT = struct.Struct("<QIIHIQI26xI")
epoch, stream_id, nslots, stride, count, period = %(epoch)d, %(sid)d, 64, 256, %(count)d, %(period)r
edir = os.path.join(frameshm._core.namespace_dir(), str(stream_id), str(epoch))
os.makedirs(edir, mode=0o700)
def region(name, size):
    fd = os.open(os.path.join(edir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    os.close(fd)
    return m
ring, pool = region("header.ring", 64 + nslots * 256), region("1.pool", 64 + nslots * stride)
now = time.monotonic_ns()
pool[0:64] = SB.pack(0x544F504C53484D31, 1, epoch, stream_id, 2, 1, nslots, 0xFFFFFFFF, stride, os.getpid(), now, now)
ring[0:64] = SB.pack(0x544F504C53484D31, 1, epoch, stream_id, 1, 0, nslots, 256, 0, os.getpid(), now, now)
def word(m, off):
    return ctypes.c_uint64.from_buffer(m, off)
say("READY")
go = os.path.join(os.environ["FRAMESHM_DIR"], "..", "go%%d" %% epoch)
while not os.path.exists(go):
    time.sleep(0.01)
for seq in range(count):
    i = seq & (nslots - 1)
    arr = np.full((4, 4), (seq + 7 * epoch) & 0xFF, np.uint8)
    word(ring, 64 + i * 256).value = seq << 1
    pool[64 + i * stride:64 + i * stride + 16] = arr.tobytes()
    hdr = SLOT.pack(0, 16, i, 1, 0, 5000 + seq, 0, 192)[8:]
    hdr += struct.pack("<HHHHhhBBBI8i8i", 184, 52, 900, 1, 1, 1, 2, 0, 0, 0, 4, 4, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0, 0).ljust(192, b"\0")
    ring[64 + i * 256 + 8:64 + (i + 1) * 256] = hdr
    word(ring, 64 + i * 256).value = (seq << 1) | 1
    t = time.monotonic_ns()
    word(ring, 56).value = t
    word(pool, 56).value = t
    time.sleep(period)
say("DONE")
"""


def _cleanup_namespace():
    from fshm_helpers import ns_dir

    shutil.rmtree(ns_dir().parent, ignore_errors=True)


def test_foreign_reader_follows_a_reference_producer_across_a_restart(spawn, shm_base):
    sid = 5150
    go = shm_base.parent / "go3"
    try:
        first = spawn(_REFERENCE_PRODUCER % dict(epoch=3, sid=sid, count=40, period=0.02))
        first.expect("READY")
        with frameshm.Reader(stream_id=sid, foreign=True) as r:
            go.touch()  # frames start only now: the reader joined before the first one
            got = []
            while len(got) < 40:
                f = r.wait_next(timeout=10)
                assert f.epoch == 3 and f.shape == (4, 4) and f.publish_ns == 0
                assert int(f.array[0, 0]) == (f.seq + 21) & 0xFF and f.timestamp_ns == 5000 + f.seq
                got.append(f.seq)
                del f
            assert got == list(range(40)) and r.overruns == 0, got
            assert r.producer == ("alive", first.proc.pid)
            first.expect("DONE")
            with pytest.raises(frameshm.Timeout):
                r.wait_latest(timeout=0.3)
            # A restart (§15.2): a new process, a higher epoch, seqs from 0 again.
            second = spawn(_REFERENCE_PRODUCER % dict(epoch=4, sid=sid, count=20, period=0.02))
            second.expect("READY")
            (shm_base.parent / "go4").touch()
            f = r.wait_latest(timeout=10)
            assert f.epoch == 4 and int(f.array[0, 0]) == (f.seq + 28) & 0xFF
            second.expect("DONE")
            while f.seq != 19:  # the newest of the second producer's frames, in the end
                f = r.wait_latest(timeout=10)
            assert r.epoch == 4 and r.producer == ("alive", second.proc.pid)
            with pytest.raises(frameshm.FrameshmError, match="foreign"):
                r.control(0)
    finally:
        _cleanup_namespace()


def test_foreign_liveness_comes_from_activity_timestamp(shm_base):
    """No control region: the producer counts as alive while its superblock's
    activity_timestamp_ns is fresh, dead once it is stale (§7.1, §15.14)."""
    sdir = _write_reference_stream(shm_base, 0xFFFFFFFF, [np.zeros((4, 8), np.uint8)])
    (sdir / "frameshm.ctl").unlink()
    ring = sdir / str(EPOCH) / "header.ring"
    try:
        with open(ring, "r+b") as fh:
            fh.seek(56)
            fh.write(struct.pack("<Q", time.monotonic_ns()))
        with frameshm.Reader(stream_id=STREAM_ID, foreign=True) as r:
            assert r.producer == ("alive", 1)
            np.testing.assert_array_equal(r.read_latest(), np.zeros((4, 8), np.uint8))
            with open(ring, "r+b") as fh:
                fh.seek(56)
                fh.write(struct.pack("<Q", time.monotonic_ns() - 30 * 10**9))
            assert r.producer == ("dead", 1)
            assert r.wait_latest(timeout=1).seq == 0  # what the ring holds is still read
            with pytest.raises(frameshm.ProducerDead):
                r.wait_latest(timeout=0.2)
        assert (sdir / str(EPOCH) / "header.ring").exists(), "a foreign stream is never removed"
    finally:
        shutil.rmtree(sdir.parent.parent)


@pytest.mark.parametrize("damage", ["nslots", "pool-id", "epoch"])
def test_foreign_regions_are_validated(shm_base, damage):
    sdir = _write_reference_stream(shm_base, STRIDE, [np.zeros((4, 8), np.uint8)])
    (sdir / "frameshm.ctl").unlink()
    edir = sdir / str(EPOCH)
    if damage == "nslots":
        with open(edir / "header.ring", "r+b") as fh:
            fh.seek(28)
            fh.write(struct.pack("<I", 3))
    elif damage == "pool-id":
        (edir / "1.pool").rename(edir / "2.pool")  # its superblock still says pool 1
    else:
        edir.rename(sdir / str(EPOCH + 1))  # superblocks name another epoch than the directory
    try:
        with pytest.raises(frameshm.CorruptStream):
            frameshm.Reader(stream_id=STREAM_ID, foreign=True)
    finally:
        shutil.rmtree(sdir.parent.parent)
