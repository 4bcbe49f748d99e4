"""frameshm.Processor without a driver: outputs in the output's pools, traceable to inputs."""

import threading

import numpy as np
import pytest

import frameshm


def _frame(i, shape=(48, 64)):
    a = np.full(shape, i % 251, np.uint16)
    a[0, 0] = i
    return a


def test_iteration_writes_into_the_output_pools_and_tags_inputs():
    with frameshm.Writer("src", shape=(48, 64), dtype="uint16", nslots=8) as w, \
         frameshm.Processor("src", "dst", out_shape=(24, 32), out_dtype="uint16", latest=False,
                            nslots=8) as p, \
         frameshm.Reader("dst", consumer="check") as check:
        sent = {}
        for i in range(5):
            ts = 1_000_000 + i
            sent[w.publish(_frame(i), timestamp_ns=ts)] = (i, ts)
        it = iter(p)
        for _ in range(5):
            frame, out = next(it)
            assert out.shape == (24, 32) and out.dtype == np.uint16
            # out is a view into the output stream's pool, not a private array
            assert not out.flags.owndata
            out[...] = frame.array[::2, ::2] + 1
        p.commit()
        for _ in range(5):
            r = check.wait_next(timeout=2)
            i, ts = sent[r.ref_seq]
            assert r.timestamp_ns == ts
            assert r.array[0, 0] == i + 1
            assert (r.array[1:, :] == (i % 251) + 1).all()
        assert p.stats() == {"processed": 5, "torn": 0, "skipped": 0}


def test_run_with_variable_outputs_and_skips():
    with frameshm.Writer("src", shape=(4,), dtype="int32", nslots=8) as w, \
         frameshm.Processor("src", "dst", max_bytes=1024, latest=False) as p, \
         frameshm.Reader("dst") as check:
        seqs = [w.publish(np.arange(4, dtype=np.int32) + i) for i in range(6)]

        def fn(a, out):
            assert out is None
            if a[0] % 2:
                return False  # odd inputs produce nothing
            return a.astype(np.float32).sum(keepdims=True)

        stats = p.run(fn, max_frames=3)
        assert stats["processed"] == 3
        got = [check.wait_next(timeout=2) for _ in range(3)]
        assert [g.ref_seq for g in got] == [seqs[0], seqs[2], seqs[4]]
        assert [float(g.array[0]) for g in got] == [6.0, 14.0, 22.0]
        assert got[0].dtype == np.float32


def test_an_input_overwritten_during_processing_is_not_committed():
    with frameshm.Writer("src", shape=(8,), dtype="uint8", nslots=2) as w, \
         frameshm.Processor("src", "dst", out_shape=(8,), out_dtype="uint8", latest=False) as p, \
         frameshm.Reader("dst") as check:
        w.publish(np.zeros(8, np.uint8))
        frame, out = p.next(timeout=2)
        out[...] = frame.array
        # The producer laps the 2-slot ring while we "process": the input slot is reused.
        for i in range(1, 4):
            w.publish(np.full(8, i, np.uint8))
        assert not frame.valid()
        frame2, out2 = p.next(timeout=2)   # finishes (drops) the first output
        out2[...] = frame2.array
        p.commit()
        assert p.stats()["torn"] == 1 and p.stats()["processed"] == 1
        only = check.wait_next(timeout=2)
        assert only.ref_seq == frame2.seq
        with pytest.raises(frameshm.Timeout):
            check.wait_next(timeout=0.2)


def test_latest_mode_skips_to_the_newest_input():
    with frameshm.Writer("src", shape=(2,), dtype="uint8", nslots=16) as w, \
         frameshm.Processor("src", "dst", out_shape=(2,), latest=True) as p:
        seqs = [w.publish(np.full(2, i, np.uint8)) for i in range(10)]
        frame, out = p.next(timeout=2)
        assert frame.seq == seqs[-1]
        p.skip()
        assert p.stats()["skipped"] >= 9


def test_bad_arguments():
    with pytest.raises(frameshm.InvalidArgument, match="source must be"):
        frameshm.Processor(3.5, "dst", out_shape=(2,))
    with pytest.raises(frameshm.InvalidArgument, match="out_shape"):
        frameshm.Processor("src", "dst")
    with frameshm.Writer("src", shape=(2,)) as _w, \
         frameshm.Processor("src", "dst", max_bytes=64) as p:
        with pytest.raises(frameshm.InvalidArgument, match="out_shape"):
            p.next(timeout=0.1)


def test_processing_in_a_thread_while_the_producer_runs():
    stop = threading.Event()
    with frameshm.Writer("src", shape=(32, 32), dtype="uint16", nslots=8) as w, \
         frameshm.Processor("src", "dst", out_shape=(32, 32), out_dtype="uint16") as p, \
         frameshm.Reader("dst", consumer="check") as check:

        def produce():
            i = 0
            while not stop.is_set():
                w.publish(_frame(i, (32, 32)))
                i += 1
                stop.wait(0.002)

        refs, bad = [], []

        def check_outputs():
            while not stop.is_set() or len(refs) < 1:
                try:
                    f = check.wait_next(timeout=0.3)
                except frameshm.Timeout:
                    if stop.is_set():
                        return
                    continue
                # a whole, consistent input frame (index in pixel 0,0, index % 251 elsewhere)
                if not (f.array[1:] == f.array[0, 0] % 251).all():
                    bad.append(f.seq)
                refs.append(f.ref_seq)

        threads = [threading.Thread(target=produce), threading.Thread(target=check_outputs)]
        for t in threads:
            t.start()
        try:
            stats = p.run(lambda a, out: np.copyto(out, a), max_frames=50, timeout=2)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert stats["processed"] == 50
        assert not bad
        assert len(refs) >= 25
        assert refs == sorted(set(refs))  # each output from a newer input than the last
