"""Corrupted shared memory: damaged region files, slot headers, control region and
descriptor queues. Each gives a clear CorruptStream (or the frame is dropped and counted
and the wait ends with CorruptStream / Timeout), never a crash or a hang.

Every scenario that touches shared memory runs in its own subprocess, so a crash shows
up as a signal exit code (asserted against) instead of killing the test run."""

import json
import os
import pathlib
import struct

import numpy as np
import pytest

import frameshm
from fshm_helpers import (CTL_HEADER_URI, CTL_POOL0_URI, SH_HEADER_LEN, SH_MSG_HEADER, SH_PAYLOAD_OFFSET,
                          SH_PAYLOAD_SLOT, SH_POOL_ID, SH_VALUES_LEN, TH_DIMS, TH_DTYPE, TH_MAJOR, TH_NDIMS,
                          TH_PROGRESS_UNIT, TH_STRIDES, describe_rc, epoch_dir, result_lines,
                          run_snippet, stream_dir, write_at)

# A live producer (4x4 uint8 frames, 4 slots, one 64-byte pool) and two readers that have
# already mapped the stream and taken frame 0: "attached" (drain) and "all" (process-all).
SETUP = r"""
import pathlib, shutil
name = %(name)r
w = frameshm.Writer(name, shape=(4, 4), dtype="uint8", nslots=4)
r0 = frameshm.Reader(name, consumer="attached")
r1 = frameshm.Reader(name, consumer="all")
w.publish(np.full((4, 4), 1, np.uint8))
assert r0.wait_latest(timeout=5).seq == 0
assert r1.wait_next(timeout=5).seq == 0
sdir = pathlib.Path(frameshm._core.namespace_dir()) / str(w.stream_id)
edir = sdir / str(w.epoch)
ring, pool, ctl = edir / "header.ring", edir / "1.pool", sdir / "frameshm.ctl"
outside = pathlib.Path(%(outside)r)
CTL_SIZE, RING_SIZE, POOL_SIZE = ctl.stat().st_size, ring.stat().st_size, pool.stat().st_size

def poke(path, off, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
    finally:
        os.close(fd)

def attempt(fn):
    try:
        return {"exc": None, "value": fn()}
    except frameshm.FrameshmError as e:
        return {"exc": type(e).__name__, "msg": str(e)}

def open_reader(timeout=0.3):
    r = frameshm.Reader(name, consumer="late")
    try:
        return r.wait_latest(timeout=timeout).seq
    finally:
        r.close()

results = {}
"""

TEARDOWN = r"""
say("RESULT", json.dumps(results))
r0.close()
r1.close()
w.close()
say("CLEAN")
"""


def run_case(name, tmp_path, body, timeout=30):
    outside = tmp_path / "outside.region"
    code = SETUP % dict(name=name, outside=str(outside)) + body + TEARDOWN
    rc, out, err = run_snippet(code, timeout=timeout)
    assert rc >= 0, f"the process crashed: {describe_rc(rc)}\nstderr: {err[-3000:]}"
    assert rc == 0, f"{describe_rc(rc)}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "CLEAN" in out
    [res] = result_lines(out)
    return json.loads(res)


def assert_corrupt(res, fragment):
    assert res["exc"] == "CorruptStream", res
    assert fragment.lower() in res["msg"].lower(), res


# ---- region files ---------------------------------------------------------------------

REGION_CASES = {
    "ring-magic": ("poke(ring, 0, b'\\0' * 8)", "bad magic"),
    "pool-magic": ("poke(pool, 0, b'NOTMAGIC')", "bad magic"),
    "ring-layout-version": ("poke(ring, 8, struct.pack('<I', 2))", "layout_version"),
    "ring-epoch": ("poke(ring, 12, struct.pack('<Q', 99))", "epoch"),
    "ring-stream-id": ("poke(ring, 20, struct.pack('<I', 5))", "stream_id"),
    "ring-region-type": ("poke(ring, 24, struct.pack('<h', 2))", "region_type"),
    "ring-nslots": ("poke(ring, 28, struct.pack('<I', 8))", "nslots"),
    "pool-id": ("poke(pool, 26, struct.pack('<H', 2))", "pool_id"),
    "pool-stride": ("poke(pool, 36, struct.pack('<I', 128))", "stride_bytes"),
    "pool-truncated": ("os.truncate(pool, 64 + 10)", "needs"),
    "pool-truncated-to-nothing": ("os.truncate(pool, 10)", "smaller than its superblock"),
    "ring-truncated": ("os.truncate(ring, 64 + 256)", "needs"),
    "ring-symlink-outside": ("shutil.copy(ring, outside); os.unlink(ring); os.symlink(outside, ring)",
                             "outside the base directory"),
    "pool-symlink-outside": ("shutil.copy(pool, outside); os.unlink(pool); os.symlink(outside, pool)",
                             "outside the base directory"),
    "ring-symlink-etc-passwd": ("os.unlink(ring); os.symlink('/etc/passwd', ring)", "outside the base directory"),
    "ring-is-a-directory": ("os.unlink(ring); os.mkdir(ring)", "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(REGION_CASES))
def test_corrupt_region_file(name, tmp_path, case):
    corrupt, fragment = REGION_CASES[case]
    truncated = "truncated" in case
    body = f"""
{corrupt}
results["open"] = attempt(open_reader)
results["info"] = attempt(lambda: frameshm.stream_info(name)["producer"])
if {truncated!r}:
    # Never touch a truncated mapping (SIGBUS is how mmap reports it); restore the sizes.
    os.truncate(ring, RING_SIZE)
    os.truncate(pool, POOL_SIZE)
else:
    # Readers that mapped the stream before the damage are unaffected.
    w.publish(np.full((4, 4), 2, np.uint8))
    results["attached"] = attempt(lambda: r0.wait_latest(timeout=5).seq)
"""
    res = run_case(name, tmp_path, body)
    assert_corrupt(res["open"], fragment)
    assert res["info"] == {"exc": None, "value": "alive"}
    if not truncated:
        assert res["attached"] == {"exc": None, "value": 1}


@pytest.mark.leaves_streams  # when the child hangs it is killed, leaving its stream to gc
@pytest.mark.parametrize("case", ["ring-fifo", "pool-fifo"])
def test_region_replaced_by_fifo_does_not_hang(name, tmp_path, case):
    target = "ring" if case == "ring-fifo" else "pool"
    body = f"""
os.unlink({target}); os.mkfifo({target})
results["open"] = attempt(open_reader)
"""
    res = run_case(name, tmp_path, body, timeout=4)
    assert_corrupt(res["open"], "regular file")


def test_missing_region_file_times_out(name, tmp_path):
    res = run_case(name, tmp_path, """
os.unlink(ring)
results["open"] = attempt(open_reader)
""")
    assert res["open"]["exc"] in ("Timeout", "CorruptStream"), res


# ---- control region -------------------------------------------------------------------------


def _uri(s):
    return repr(s.encode() if isinstance(s, str) else s)


CTL_CASES = {
    "ctl-magic": ("poke(ctl, 0, b'garbage!')", "bad magic"),
    "ctl-version": ("poke(ctl, 8, struct.pack('<I', 7))", "version"),
    "ctl-stream-id": ("poke(ctl, 12, struct.pack('<I', 5))", "stream id"),
    "ctl-name-unterminated": ("poke(ctl, 128, b'n' * 64)", "not terminated"),
    "ctl-truncated": ("os.truncate(ctl, 100)", "bytes, expected"),
    "ctl-extended": ("os.truncate(ctl, CTL_SIZE + 4096)", "bytes, expected"),
    "announce-nslots": ("poke(ctl, 200, struct.pack('<I', 3))", "power of two"),
    "announce-npools-0": ("poke(ctl, 204, struct.pack('<I', 0))", "payload pools"),
    "announce-npools-5": ("poke(ctl, 204, struct.pack('<I', 5))", "payload pools"),
    "announce-pool-stride": ("poke(ctl, 720 + 4, struct.pack('<I', 100))", "stride"),
    "announce-pool-id-0": ("poke(ctl, 720, struct.pack('<H', 0))", "pool id 0"),
    "uri-scheme": (f"poke(ctl, {CTL_HEADER_URI}, b'http://example.com/ring\\0')", "unsupported region URI"),
    "uri-relative": (f"poke(ctl, {CTL_HEADER_URI}, b'shm:file?path=relative/ring\\0')", "absolute path"),
    "uri-empty-path": (f"poke(ctl, {CTL_HEADER_URI}, b'shm:file?path=\\0')", "absolute path"),
    "uri-etc-passwd": (f"poke(ctl, {CTL_HEADER_URI}, b'shm:file?path=/etc/passwd\\0')", "outside the base"),
    "uri-dotdot-escape": (
        f"shutil.copy(ring, outside); poke(ctl, {CTL_HEADER_URI}, "
        f"('shm:file?path=' + str(sdir) + '/../../../../' + outside.name + '\\0').encode())",
        "outside the base"),
    "uri-space": (f"poke(ctl, {CTL_HEADER_URI}, b'shm:file?path=/a b\\0')", "bad path"),
    "uri-unterminated": (f"poke(ctl, {CTL_HEADER_URI}, b'A' * 512)", "not terminated"),
    "uri-unknown-param": (f"poke(ctl, {CTL_HEADER_URI}, ('shm:file?path=' + str(ring) + '|evil=1\\0').encode())",
                          "unknown parameter"),
    "uri-hugepages": (f"poke(ctl, {CTL_HEADER_URI}, ('shm:file?path=' + str(ring) + '|require_hugepages=true\\0').encode())",
                      "hugepages"),
    "uri-pool-as-ring": (f"poke(ctl, {CTL_HEADER_URI}, ('shm:file?path=' + str(pool) + '\\0').encode())",
                         "region_type"),
    "uri-binary-garbage": (f"poke(ctl, {CTL_HEADER_URI}, bytes(range(1, 256)) + b'\\0')", "unsupported region URI"),
    "pool-uri-garbage": (f"poke(ctl, {CTL_POOL0_URI}, b'shm:file?path=/proc/self/mem\\0')", "outside the base"),
}


@pytest.mark.parametrize("case", sorted(CTL_CASES))
def test_corrupt_control_region(name, tmp_path, case):
    corrupt, fragment = CTL_CASES[case]
    body = f"""
orig = ctl.read_bytes()
{corrupt}
results["open"] = attempt(open_reader)
results["info"] = attempt(lambda: sorted(frameshm.stream_info(name)))
results["ls"] = attempt(lambda: frameshm.list_streams())
# restore, so the producer and the attached readers close normally
os.truncate(ctl, CTL_SIZE)
poke(ctl, 0, orig[:4096])
"""
    res = run_case(name, tmp_path, body)
    assert_corrupt(res["open"], fragment)
    if case.startswith("ctl-"):
        # The control region itself is unreadable: inspection says so instead of crashing.
        assert res["info"]["exc"] == "CorruptStream", res
        [entry] = res["ls"]["value"]
        assert "error" in entry and entry["name"] == "?"
    else:
        assert res["info"]["exc"] is None  # the header block is sound; only the announce is bad


# ---- slot headers ----------------------------------------------------------------------------

SLOT_CASES = {
    # name: (slot-relative offset, bytes, message fragment or None = dropped silently)
    "ndims-0": (TH_NDIMS, b"\x00", "ndims 0"),
    "ndims-9": (TH_NDIMS, b"\x09", "ndims 9"),
    "ndims-255": (TH_NDIMS, b"\xff", "ndims 255"),
    "values-len-beyond-stride": (SH_VALUES_LEN, struct.pack("<I", 65), "exceeds pool stride"),
    "values-len-huge": (SH_VALUES_LEN, struct.pack("<I", 0xFFFFFFFF), "exceeds pool stride"),
    "values-len-too-small": (SH_VALUES_LEN, struct.pack("<I", 15), "spans"),
    "dim-huge": (TH_DIMS, struct.pack("<i", 2**31 - 1), "spans"),
    "dim-negative": (TH_DIMS, struct.pack("<i", -1), "negative"),
    "stride-negative": (TH_STRIDES, struct.pack("<i", -4), "negative"),
    "strides-overlap": (TH_STRIDES, struct.pack("<i", 1), "overlap"),
    "stride-out-of-slot": (TH_STRIDES, struct.pack("<i", 1 << 20), "spans"),
    "dtype-unknown": (TH_DTYPE, struct.pack("<h", 99), "dtype"),
    "dtype-gap-12": (TH_DTYPE, struct.pack("<h", 12), "dtype"),
    "dtype-0": (TH_DTYPE, struct.pack("<h", 0), "dtype"),
    "major-order": (TH_MAJOR, struct.pack("<h", 3), "major_order"),
    "payload-slot": (SH_PAYLOAD_SLOT, struct.pack("<I", 3), "payload_slot"),
    "payload-slot-huge": (SH_PAYLOAD_SLOT, struct.pack("<I", 0xFFFFFFFF), "payload_slot"),
    "pool-id-unknown": (SH_POOL_ID, struct.pack("<H", 9), "never announced"),
    "payload-offset": (SH_PAYLOAD_OFFSET, struct.pack("<I", 8), "payload_offset"),
    "header-len": (SH_HEADER_LEN, struct.pack("<I", 100), "headerBytes"),
    "schema-id": (SH_MSG_HEADER + 4, struct.pack("<H", 901), "embedded header"),
    "template-id": (SH_MSG_HEADER + 2, struct.pack("<H", 53), "embedded header"),
    "progress-unit": (TH_PROGRESS_UNIT, b"\x03", "progress_unit"),
    "progress-stride": (TH_PROGRESS_UNIT, b"\x01" + struct.pack("<I", 7), "progress_stride"),
    "in-progress": (0, struct.pack("<Q", 1 << 1), None),  # seq 1 being written: not corrupt
}


# Tensor-layout failures: their message wraps an inner reason (once garbled by an
# overlapping vsnprintf in fshm_set_error; regression test below).
GARBLED = {"dim-huge", "dtype-0", "dtype-gap-12", "dtype-unknown", "stride-negative", "stride-out-of-slot",
           "strides-overlap", "values-len-too-small"}


def _slot_case(name, tmp_path, case):
    off, data, fragment = SLOT_CASES[case]
    body = f"""
w.publish(np.full((4, 4), 7, np.uint8))     # frame 1, slot 1
poke(ring, 64 + 256 * 1 + {off}, {data!r})
results["latest"] = attempt(lambda: r0.wait_latest(timeout=0).seq)
results["drops"] = r0.drops
results["next"] = attempt(lambda: r1.wait_next(timeout=0).seq)
results["next_drops"] = r1.drops
results["copy"] = attempt(lambda: r0.read_latest(copy=True).tolist())
results["peek"] = attempt(lambda: r0.read_latest(copy=False).seq)
results["late"] = attempt(lambda: open_reader(timeout=0))
# a good frame afterwards is read normally: one bad slot does not poison the stream
w.publish(np.full((4, 4), 9, np.uint8))     # frame 2, slot 2
f = r0.wait_latest(timeout=5)
results["recover"] = [f.seq, int(f.array.sum())]
results["recover_next"] = attempt(lambda: r1.wait_next(timeout=5).seq)
"""
    return run_case(name, tmp_path, body)


@pytest.mark.parametrize("case", sorted(SLOT_CASES))
def test_corrupt_slot_header(name, tmp_path, case):
    fragment = SLOT_CASES[case][2]
    res = _slot_case(name, tmp_path, case)
    if fragment is None:
        # A slot marked in progress is skipped, not reported as corruption.
        assert res["latest"]["exc"] == "Timeout", res
        assert res["drops"] == 0 and res["next_drops"] == 0
        assert res["next"]["exc"] == "Timeout", res
    else:
        assert_corrupt(res["latest"], fragment)
        assert res["drops"] >= 1
        assert_corrupt(res["next"], fragment)
        assert res["next_drops"] >= 1
        assert_corrupt(res["copy"], fragment)
        assert_corrupt(res["peek"], fragment)
        assert_corrupt(res["late"], fragment)
    assert res["recover"] == [2, 9 * 16]
    assert res["recover_next"] == {"exc": None, "value": 2}


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_slot_header_messages_are_intact(name, tmp_path, case):
    fragment = SLOT_CASES[case][2]
    res = _slot_case(name, tmp_path, case)
    assert_corrupt(res["latest"], fragment)
    assert "slot header: slot header" not in res["latest"]["msg"]


def test_random_slot_headers_never_crash(name, tmp_path):
    """A few hundred random 248-byte headers (seq_commit kept committed) in one process."""
    body = r"""
rng = np.random.default_rng(7)
outcomes = {"ok": 0, "CorruptStream": 0, "Timeout": 0, "other": []}
for i in range(300):
    seq = w.publish(np.full((4, 4), i % 256, np.uint8))
    slot = seq % 4
    junk = rng.integers(0, 256, 248, dtype=np.uint8).tobytes()
    if i % 2:  # keep a plausible prefix so that later checks are reached too
        good = open(ring, "rb").read()[64 + 256 * slot + 8: 64 + 256 * slot + 256]
        cut = int(rng.integers(0, 248))
        junk = good[:cut] + junk[cut:]
    poke(ring, 64 + 256 * slot + 8, junk)
    try:
        f = r0.wait_latest(timeout=0)
        a = f.array
        assert f.nbytes <= 64
        a.sum()
        outcomes["ok"] += 1
    except (frameshm.CorruptStream, frameshm.Timeout) as e:
        outcomes[type(e).__name__] += 1
    except Exception as e:
        outcomes["other"].append(repr(e))
results["outcomes"] = outcomes
"""
    res = run_case(name, tmp_path, body, timeout=60)
    o = res["outcomes"]
    assert o["other"] == []
    assert o["CorruptStream"] > 0
    assert o["ok"] + o["CorruptStream"] + o["Timeout"] == 300


# ---- descriptor queues --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["futex", "queue", "rate-capped"])
def test_garbage_in_the_descriptor_queue_is_dropped(name, kind):
    """Messages in a reader's queue that are not descriptors of this stream's epoch are
    counted as drops by a reader that reads its queue: a rate-capped one (a descriptor
    per frame), or one that sleeps there because the producer has not said it answers by
    futex (control region bells_epoch, offset 2776, zeroed here). One that sleeps on the
    futex never reads them; either way they are never taken for a frame."""
    posix_ipc = pytest.importorskip("posix_ipc")
    kw = {"max_rate_hz": 1000} if kind == "rate-capped" else {}
    with frameshm.Writer(name, shape=(2,), nslots=4) as w, frameshm.Reader(name, **kw) as r:
        if kind == "queue":
            ctl = pathlib.Path(frameshm._core.namespace_dir()) / str(w.stream_id) / "frameshm.ctl"
            fd = os.open(ctl, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\0" * 8, 2776)
            finally:
                os.close(fd)
        qname = frameshm.stream_info(name)["consumers"][0]["queue"]
        q = posix_ipc.MessageQueue(qname, read=False, write=True)
        try:
            q.send(b"garbage")
            q.send(b"\0" * 48)
            # a well-formed descriptor of another stream
            hdr = struct.pack("<HHHH", 40, 4, 900, 1)
            q.send(hdr + struct.pack("<IQQQIQ", w.stream_id ^ 1, 1, 0, 0, 0xFFFFFFFF, 0))
            # ...and one of this stream's past epoch
            q.send(hdr + struct.pack("<IQQQIQ", w.stream_id, 0, 0, 0, 0xFFFFFFFF, 0))
        finally:
            q.close()
        with pytest.raises(frameshm.Timeout):
            r.wait_next(timeout=0.2)
        assert r.drops == (0 if kind == "futex" else 4)
        w.publish(np.array([1, 2], np.uint8))
        f = r.wait_next(timeout=5)
        assert f.seq == 0 and list(f.array) == [1, 2]
        del f
        assert r.drops == (0 if kind == "futex" else 4)


def test_forged_descriptor_for_an_unwritten_seq(name):
    """A descriptor naming a seq the producer never wrote is not a frame."""
    posix_ipc = pytest.importorskip("posix_ipc")
    with frameshm.Writer(name, shape=(2,), nslots=4) as w, frameshm.Reader(name) as r:
        w.publish(np.array([1, 1], np.uint8))
        assert r.wait_latest(timeout=5).seq == 0
        qname = frameshm.stream_info(name)["consumers"][0]["queue"]
        q = posix_ipc.MessageQueue(qname, read=False, write=True)
        try:
            hdr = struct.pack("<HHHH", 40, 4, 900, 1)
            q.send(hdr + struct.pack("<IQQQIQ", w.stream_id, w.epoch, 5, 0, 0xFFFFFFFF, 0))
        finally:
            q.close()
        with pytest.raises(frameshm.Timeout):
            r.wait_latest(timeout=0.2)
        w.publish(np.array([2, 2], np.uint8))
        f = r.wait_latest(timeout=5)
        assert (f.seq, list(f.array)) == (1, [2, 2])
        del f


def test_stream_directory_is_a_symlink(name, tmp_path, shm_base):
    """A stream directory replaced by a symlink (to an attacker's directory) is refused."""
    with frameshm.Writer(name, shape=(1,)):
        pass
    sdir = stream_dir(name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    sdir.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, sdir)
    try:
        with pytest.raises(frameshm.FrameshmError):
            frameshm.Writer(name, shape=(1,))
        with pytest.raises(frameshm.FrameshmError):
            frameshm.Reader(name)
        assert os.listdir(elsewhere) == []
    finally:
        os.unlink(sdir)
        sdir.parent.rmdir()  # made above: the writer's close had removed them
        sdir.parent.parent.rmdir()


def test_a_corrupt_newest_frame_is_counted_once(name):
    """wait_latest drops a newest frame whose slot header is corrupt and counts it once: a
    second poll and a wait of 1 s (five of the binding's slices, each a call into the
    library) raise CorruptStream again without counting it again (one wait counted it 20
    times); the next good frame comes through."""
    with frameshm.Writer(name, pools=[64], nslots=4) as w, frameshm.Reader(name) as r:
        seq = w.publish(np.arange(16, dtype=np.uint8))
        ring = epoch_dir(name, w.epoch) / "header.ring"
        write_at(ring, 64 + 256 * (seq % 4) + 8, b"\0" * 200)   # the slot header, zeroed
        for timeout in (0, 0, 1.0):
            with pytest.raises(frameshm.CorruptStream):
                r.wait_latest(timeout=timeout)
            assert r.drops == 1
        w.publish(np.full(16, 7, np.uint8))
        f = r.wait_latest(timeout=5)
        assert f.seq == seq + 1 and int(f.array.sum()) == 7 * 16 and r.drops == 1
        del f
