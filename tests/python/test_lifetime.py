"""Lifetimes: views outliving their Reader/Writer, unmapping, and leaks of fds, mappings,
files and message queues."""

import gc
import os
import warnings

import numpy as np
import pytest

import frameshm
from fshm_helpers import (epoch_dir, fd_count, maps_lines, mapped_paths_under, queue_exists, rss_kib,
                          stream_dir, tree, unlink_queue)


def _pattern(shape=(32, 32), seed=0):
    return ((np.arange(np.prod(shape)) * 7 + seed) % 251).astype(np.uint8).reshape(shape)


def test_views_survive_reader_close(name):
    data = _pattern()
    with frameshm.Writer(name, shape=data.shape, nslots=4) as w:
        r = frameshm.Reader(name)
        w.publish(data)
        f = r.wait_latest(timeout=5)
        a = f.array
        peek = r.read_latest(copy=False)
        dl = np.from_dlpack(f)
        mv = memoryview(a)
        r.close()
        # Everything handed out before close still reads the right bytes.
        np.testing.assert_array_equal(a, data)
        np.testing.assert_array_equal(peek.array, data)
        np.testing.assert_array_equal(dl, data)
        assert mv.tobytes() == data.tobytes()
        np.testing.assert_array_equal(f.array, data)
        # valid() re-checks the slot in the frame's own ring mapping: still true after
        # close, and false once the producer overwrites the slot.
        assert f.valid() is True
        del r
        gc.collect()
        np.testing.assert_array_equal(a, data)
        assert int(a.sum()) == int(data.sum())
        for i in range(4):
            w.publish(_pattern(seed=i + 1))
        assert f.valid() is False and peek.valid() is False
        mv.release()
        del f, a, peek, dl


def test_views_survive_writer_close(name):
    data = _pattern(seed=3)
    r = frameshm.Reader(name)
    try:
        w = frameshm.Writer(name, shape=data.shape, nslots=2)
        loaned = w.loan()
        loaned[:] = data
        w.commit()
        f = r.wait_latest(timeout=5)
        spare = w.loan()  # an outstanding loan at close time
        spare[:] = 1
        w.close()  # unlinks the epoch's files: the mappings stay
        assert not epoch_dir(name, 1).exists()
        np.testing.assert_array_equal(f.array, data)
        np.testing.assert_array_equal(loaned, data)
        loaned[0, 0] = 99  # still writable memory, no crash
        assert f.array[0, 0] == 99
        spare[:] = 2
        assert int(spare.sum()) == 2 * spare.size
        del w
        gc.collect()
        np.testing.assert_array_equal(f.array[1:], data[1:])
        del loaned, spare, f
    finally:
        r.close()


def test_memory_unmapped_when_last_view_goes(name, shm_base):
    data = _pattern()
    w = frameshm.Writer(name, shape=data.shape)
    r = frameshm.Reader(name)
    pool = os.path.realpath(epoch_dir(name, w.epoch) / "1.pool")
    ring = os.path.realpath(epoch_dir(name, w.epoch) / "header.ring")
    w.publish(data)
    f = r.wait_latest(timeout=5)
    views = [f.array, f.array[3:9], np.from_dlpack(f), r.read_latest(copy=False)]
    assert any(pool in line for line in maps_lines())
    w.close()
    r.close()
    del w, r
    gc.collect()
    # The views hold the pool mapped (the file itself is gone already)...
    held = [line for line in maps_lines() if pool in line]
    assert held and all(line.endswith("(deleted)") for line in held)
    # ...and the frame holds its header ring (small), where valid() re-checks its slot.
    assert any(ring in line for line in maps_lines()), "the frame holds its header ring"
    np.testing.assert_array_equal(views[1], data[3:9])
    # ...and the last one to go unmaps it.
    del f, views
    gc.collect()
    assert mapped_paths_under(shm_base) == []


def test_a_frame_alone_keeps_its_memory_mapped(name, shm_base):
    """The C frame holds its pool's mapping: a view made after the Reader closed and went
    away reads the frame, and keeps the memory once the frame is gone too."""
    data = _pattern(seed=5)
    w = frameshm.Writer(name, shape=data.shape)
    r = frameshm.Reader(name)
    pool = os.path.realpath(epoch_dir(name, w.epoch) / "1.pool")
    w.publish(data)
    f = r.wait_latest(timeout=5)
    assert isinstance(f, frameshm._core.Frame)
    r.close()
    w.close()
    del r, w
    gc.collect()
    assert any(pool in line for line in maps_lines()), "the frame alone holds the pool"
    assert f.valid() is True  # nobody rewrites the slot of a stream that is gone
    a = f.array  # made after everything else closed
    del f
    gc.collect()
    assert any(pool in line for line in maps_lines()), "the view holds the pool"
    np.testing.assert_array_equal(a, data)
    del a
    gc.collect()
    assert mapped_paths_under(shm_base) == []


def test_slot_arrays_are_reused_but_each_frame_has_its_own_view(name, shm_base):
    """The Reader keeps one array per slot: later frames of the slot view it (no array of
    their own), a caller's reshape stays on its own view, and close() lets go of the slot
    arrays while the Reader object lives on."""
    w = frameshm.Writer(name, shape=(4, 6), nslots=2)
    r = frameshm.Reader(name)
    arrays = []
    for i in range(5):
        w.publish(_pattern((4, 6), seed=i))
        f = r.wait_next(timeout=5)
        a = f.array
        assert f.array is a  # one view per frame
        np.testing.assert_array_equal(a, _pattern((4, 6), seed=i))
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a.flags.writeable = True
        arrays.append((f.slot, a))
        del f
    (s0, a0), (s2, a2) = arrays[0], arrays[2]
    assert s0 == s2 and a0 is not a2
    assert a0.__array_interface__["data"][0] == a2.__array_interface__["data"][0]
    with warnings.catch_warnings():
        # NumPy 2.5 deprecates setting .shape; whoever still does it must change only their view
        warnings.simplefilter("ignore", DeprecationWarning)
        a2.shape = (24,)
    w.publish(_pattern((4, 6), seed=9))
    w.publish(_pattern((4, 6), seed=10))
    assert r.wait_next(timeout=5).seq == 5
    f = r.wait_next(timeout=5)
    assert f.seq == 6 and f.slot == s0 and f.array.shape == (4, 6)
    np.testing.assert_array_equal(f.array, _pattern((4, 6), seed=10))
    del arrays, a0, a2, a, f
    w.close()
    del w
    gc.collect()
    r.close()  # still referenced: close() alone must drop what maps the regions
    gc.collect()
    assert mapped_paths_under(shm_base) == []
    del r


def test_frame_in_a_reference_cycle_is_collected(name, shm_base):
    with frameshm.Writer(name, shape=(8,)) as w, frameshm.Reader(name) as r:
        w.publish(np.arange(8, dtype=np.uint8))
        f = r.wait_latest(timeout=5)
        f._array = [f]  # the array cache pointing back at its frame
        del f
    gc.collect()
    assert mapped_paths_under(shm_base) == [], "the cycle kept the pool mapped"


def test_closed_writer_object_does_not_pin_memory(name, shm_base):
    w = frameshm.Writer(name, shape=(1024,))
    r = frameshm.Reader(name)
    w.publish(np.zeros(1024, np.uint8))
    f = r.wait_latest(timeout=5)
    w.close()
    r.close()
    del f
    gc.collect()
    # w and r are closed but still referenced (an attribute of some object, say).
    assert mapped_paths_under(shm_base) == []


def test_frames_from_many_epochs_stay_valid_memory(name):
    """Each producer restart remaps the Reader; frames handed out earlier keep theirs."""
    kept = []
    with frameshm.Reader(name) as r:
        for epoch in range(1, 13):  # more epochs than the Reader's mapping cache holds
            with frameshm.Writer(name, shape=(64,), dtype="uint32") as w:
                assert w.epoch == epoch
                w.publish(np.full(64, epoch, np.uint32))
                f = r.wait_latest(timeout=5)
                assert f.epoch == epoch
                kept.append(f)
        for epoch, f in enumerate(kept, start=1):
            assert f.array.shape == (64,)
            assert int(f.array.min()) == int(f.array.max()) == epoch
            # A finished epoch's ring and pool are never written again: each frame is intact.
            assert f.valid() is True
        assert [f.seq for f in kept] == list(range(12))
    del kept, f


def test_dropping_objects_closes_them(name):
    w = frameshm.Writer(name, shape=(1,))
    r = frameshm.Reader(name)
    q = frameshm.stream_info(name)["consumers"][0]["queue"]
    assert queue_exists(q)
    del r
    gc.collect()
    assert not queue_exists(q), "a garbage-collected Reader unlinks its queue"
    assert frameshm.stream_info(name)["consumers"] == []
    del w
    gc.collect()
    assert not stream_dir(name).exists(), "a garbage-collected Writer removes its stream"


def test_queue_probe_agrees_with_the_library(name):
    """The leak checks' probe: posix_ipc when installed, else mq_open through ctypes."""
    from fshm_helpers import posix_ipc, queue_exists_ctypes

    r = frameshm.Reader(name)
    q = frameshm.stream_info(name)["consumers"][0]["queue"]
    assert queue_exists(q) and queue_exists_ctypes(q)
    r.close()
    assert not queue_exists(q) and not queue_exists_ctypes(q)
    if posix_ipc is None:
        pytest.skip("posix_ipc not installed: only the ctypes probe was checked")


def _cycle(name, i, queues):
    if i % 2:
        r = frameshm.Reader(name, consumer="leak")
        w = frameshm.Writer(name, shape=(16,), nslots=2)
    else:
        w = frameshm.Writer(name, shape=(16,), nslots=2)
        r = frameshm.Reader(name, consumer="leak")
    w.publish(np.full(16, i % 256, np.uint8))
    f = r.wait_latest(timeout=5)
    assert int(f.array[0]) == i % 256
    c = r.read_latest()
    assert int(c[0]) == i % 256
    queues.append(frameshm.stream_info(name)["consumers"][0]["queue"])
    del f
    if i % 3 == 0:
        r.close()
        w.close()
    else:
        w.close()
        r.close()


def test_open_close_300_times_leaks_nothing(name, shm_base):
    queues = []
    for i in range(10):  # warm up caches, allocator arenas, lazy imports
        _cycle(name, i, queues)
    gc.collect()
    fds0, maps0, files0 = fd_count(), maps_lines(), tree(shm_base)
    for i in range(300):
        _cycle(name, i, queues)
    gc.collect()
    assert fd_count() == fds0, "file descriptors leaked"
    assert mapped_paths_under(shm_base) == [], "stream regions still mapped"
    maps1 = maps_lines()
    cycles = 310
    if len(maps1) != len(maps0):
        # An allocator arena more (1 MiB of anonymous memory: this xdist worker's other
        # threads allocate too, a loaded run saw one) is no leak; a leak grows with the
        # cycles, so 300 more must add nothing, and what came must be anonymous.
        grown = sorted(set(maps1) - set(maps0))
        assert all(len(line.split()) == 5 for line in grown), f"new file mappings: {grown[:10]}"
        for i in range(300):
            _cycle(name, cycles + i, queues)
        cycles += 300
        gc.collect()
        maps0, maps1 = maps1, maps_lines()
    assert len(maps1) == len(maps0), (
        f"mappings went from {len(maps0)} to {len(maps1)}: "
        f"new {sorted(set(maps1) - set(maps0))[:10]} gone {sorted(set(maps0) - set(maps1))[:10]}")
    assert tree(shm_base) == files0, "files left in the base directory"
    assert not stream_dir(name).exists()
    assert len(set(queues)) == len(queues) == cycles
    leaked = [q for q in queues if queue_exists(q)]
    for q in leaked:
        unlink_queue(q)
    assert leaked == [], f"{len(leaked)} message queues leaked"


def test_loans_100k_times_leak_nothing(name, shm_base):
    """The Writer lends each slot's cached array (loan_array): 100,000 loans and commits
    add no reference to the arrays or to the pool's mapping, and no memory."""
    import sys

    with frameshm.Writer(name, shape=(16,), nslots=4) as w, frameshm.Reader(name) as r:
        pool = w._w.mappings[0]
        lent = []
        for _ in range(4):
            lent.append(w.loan())
            w.commit()

        def churn(n):
            for i in range(n):
                v = w.loan()
                v[0] = i & 255
                w.commit()

        churn(10_000)   # warm up allocator and caches
        gc.collect()
        refs = [sys.getrefcount(a) for a in lent] + [sys.getrefcount(pool)]
        rss0 = rss_kib()
        churn(100_000)
        gc.collect()
        assert [sys.getrefcount(a) for a in lent] + [sys.getrefcount(pool)] == refs
        assert rss_kib() - rss0 < 4096, f"RSS grew {rss_kib() - rss0} KiB over 100k loans"
        assert int(r.wait_latest(timeout=5).array[0]) == (100_000 - 1) & 255
        del lent, pool
    gc.collect()
    assert mapped_paths_under(shm_base) == []


def test_failed_opens_leak_nothing(name, shm_base):
    def attempt():
        with pytest.raises(frameshm.StreamBusy):
            frameshm.Writer(name, shape=(2,))
        with pytest.raises(frameshm.InvalidArgument):
            frameshm.Writer("other", shape=(2,), stream_id=w.stream_id)  # id collision
        with pytest.raises(frameshm.InvalidArgument):
            frameshm.Reader("other", stream_id=w.stream_id)
        with pytest.raises(frameshm.InvalidArgument):
            frameshm.Reader(name, consumer="bad/name")

    with frameshm.Writer(name, shape=(2,)) as w:
        for _ in range(5):
            attempt()
        gc.collect()
        fds0, maps0, files0 = fd_count(), len(maps_lines()), tree(shm_base)
        for _ in range(100):
            attempt()
        gc.collect()
        assert fd_count() == fds0
        assert len(maps_lines()) == maps0
        assert tree(shm_base) == files0
        assert frameshm.stream_info(name)["consumers"] == []


# ---- system limits ---------------------------------------------------------------------------

# RLIMIT_MSGQUEUE = 0 in a child: its first mq_open fails, nothing system-wide is touched.
# Issue 14: a Reader no longer fails there (ResourceLimit) but goes on without a queue
# (frames arrive through the control region: test_crash_lifecycle.py).
_NO_QUEUES = r"""
import resource, errno as errno_mod
resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]))
out = {}
try:
    r = frameshm.Reader(%(name)r)
    out.update(exc=None, queue=r._r.queue_name)
    r.close()
except frameshm.FrameshmError as e:
    out.update(exc=type(e).__name__, msg=str(e))
out["left"] = sorted(os.listdir(frameshm._core.namespace_dir())) if os.path.isdir(frameshm._core.namespace_dir()) else []
say("RESULT", json.dumps(out))
"""


def _no_queue_reader(name):
    from fshm_helpers import describe_rc, result_lines, run_snippet
    import json

    rc, out, err = run_snippet(_NO_QUEUES % dict(name=name), timeout=30)
    assert rc == 0, f"{describe_rc(rc)}: {err[-2000:]}"
    return json.loads(result_lines(out)[0])


def test_queue_limit_opens_a_reader_without_queue(name):
    res = _no_queue_reader(name)
    assert res["exc"] is None and res["queue"] == "", res


def test_reader_without_queue_leaves_no_directory(name):
    res = _no_queue_reader(name)
    assert res["left"] == [], f"left behind: {res['left']}"
