"""Real processes: producers and consumers in separate interpreters, SIGKILLs, restarts,
signals. Every frame carries its own seq and a checksum (fshm_helpers.make_frame)."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import frame_seq_ok, info_or_none, queue_exists, stream_dir, unlink_queue, wait_until

# A producer that publishes until its stdin closes. Frames embed their seq (taken from the
# writer before the loan) and a checksum. PERIOD 0 = full rate.
PRODUCER = r"""
name, NB, NSLOTS, PERIOD, LIMIT = %(name)r, %(nbytes)d, %(nslots)d, %(period)r, %(limit)d
time.sleep(%(delay)r)
w = frameshm.Writer(name, shape=(NB,), dtype="uint8", nslots=NSLOTS)
say("READY", w.epoch, os.getpid())
n = 0
next_t = time.monotonic()
while not stopped() and (LIMIT < 0 or n < LIMIT):
    s = w._w.next_seq
    v = w.loan()
    v[:] = make_frame(s, NB)
    assert w.commit() == s
    n += 1
    if PERIOD:
        next_t += PERIOD
        d = next_t - time.monotonic()
        if d > 0:
            time.sleep(d)
        else:
            next_t = time.monotonic()
say("DONE", n)
while not stopped():
    time.sleep(0.01)
w.close()
say("CLOSED")
"""


def producer_code(name, nbytes=256, nslots=8, period=0.005, limit=-1, delay=0.0):
    return PRODUCER % dict(name=name, nbytes=nbytes, nslots=nslots, period=period, limit=limit, delay=delay)


def check_frame(f):
    """(seq embedded in the frame, frame still valid after the check)."""
    emb = frame_seq_ok(f.array)
    return emb, f.valid()


def test_writer_and_two_consumer_processes(name, spawn):
    n, nbytes = 300, 4096
    consumer = r"""
name, MODE, N = %r, %r, %d
r = frameshm.Reader(name, consumer=MODE)
announce_queue(r)
say("READY")
wait = r.wait_next if MODE == "all" else r.wait_latest
seqs, skipped, bad, torn = [], 0, [], 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        f = wait(timeout=1.0)
    except frameshm.Timeout:
        continue
    emb = frame_seq_ok(f.array)
    if not f.valid():
        torn += 1          # overwritten while we checked it: not a verdict on the data
    elif emb != f.seq:
        bad.append((f.seq, emb))
    seqs.append(f.seq)
    skipped += f.skipped
    if f.seq == N - 1:
        break
say("RESULT", json.dumps(dict(seqs=seqs, skipped=skipped, bad=bad, torn=torn, overruns=r.overruns)))
r.close()
"""
    every = spawn(consumer % (name, "all", n), label="process-all")
    drain = spawn(consumer % (name, "drain", n), label="drain")
    every.expect("READY")
    drain.expect("READY")
    # The producer keeps the process-all consumer within 4 frames (never lapped, its queue
    # never full); it does not wait for the drain consumer at all.
    producer = spawn(f"""
name, N, NB = {name!r}, {n}, {nbytes}
w = frameshm.Writer(name, shape=(NB,), dtype="uint8", nslots=16)
say("READY")
for i in range(N):
    deadline = time.monotonic() + 30
    while True:
        c = [c for c in frameshm.stream_info(name)["consumers"] if c["name"] == "all"]
        if c and i - c[0]["last_seq_plus1"] <= 4:
            break
        assert time.monotonic() < deadline, "process-all consumer stopped reading"
        time.sleep(0.0002)
    assert w.publish(make_frame(i, NB)) == i
say("DONE")
while not stopped():
    time.sleep(0.01)
w.close()
""", label="producer")
    producer.expect("READY")
    producer.expect("DONE", timeout=60)
    res_all = every.expect_json("RESULT", timeout=60)
    res_drain = drain.expect_json("RESULT", timeout=60)
    assert every.wait() == 0 and drain.wait() == 0
    assert producer.stop() == 0

    # process-all: every frame, in order, intact, nothing lost
    assert res_all["seqs"] == list(range(n))
    assert res_all["bad"] == [] and res_all["torn"] == 0
    assert res_all["skipped"] == 0 and res_all["overruns"] == 0
    # drain-to-latest: increasing seqs, intact data, skipped accounts for every gap
    s = res_drain["seqs"]
    assert s[-1] == n - 1
    assert all(b > a for a, b in zip(s, s[1:]))
    assert res_drain["bad"] == []
    # registered before the first frame: every frame since is either returned or skipped
    assert len(s) + res_drain["skipped"] == s[-1] + 1
    assert not stream_dir(name).exists()


def test_late_consumer_gets_only_newer_frames(name, spawn):
    producer = spawn(producer_code(name, period=0.002), label="producer")
    producer.expect("READY")
    wait_until(lambda: (info_or_none(name) or {}).get("latest_seq_plus1", 0) >= 50, 20, what="50 frames")
    before = frameshm.stream_info(name)["latest_seq_plus1"]
    with frameshm.Reader(name, consumer="late-latest") as r:
        f = r.wait_latest(timeout=5)
        assert f.seq >= before - 1, "the newest frame at most, never history"
        emb, ok = check_frame(f)
        assert not ok or emb == f.seq
        prev = f.seq
        for _ in range(5):
            f = r.wait_latest(timeout=5)
            assert f.seq > prev
            prev = f.seq
        del f
    assert producer.stop() == 0


def test_late_consumer_of_an_idle_stream(name, spawn):
    """50 frames, then the producer idles: a late drain consumer gets the newest one and
    nothing older; a late process-all consumer has nothing to process."""
    producer = spawn(producer_code(name, period=0, limit=50), label="producer")
    producer.expect("READY")
    producer.expect("DONE")
    with frameshm.Reader(name, consumer="late-latest") as r:
        f = r.wait_latest(timeout=5)
        assert f.seq == 49 and frame_seq_ok(f.array) == 49
        with pytest.raises(frameshm.Timeout):
            r.wait_latest(timeout=0.2)
        del f
    assert producer.stop() == 0


def test_late_process_all_consumer_gets_no_history(name, spawn):
    producer = spawn(producer_code(name, period=0, limit=50), label="producer")
    producer.expect("READY")
    producer.expect("DONE")
    try:
        with frameshm.Reader(name, consumer="late-all") as r:
            try:
                f = r.wait_next(timeout=0.2)
            except frameshm.Timeout:
                f = None
            assert f is None, f"frame {f.seq} was committed before this consumer registered"
    finally:
        assert producer.stop() == 0


def test_killed_consumer_is_pruned_and_producer_never_blocks(name, spawn):
    producer = spawn(producer_code(name, nbytes=64, period=0), label="producer")
    producer.expect("READY")
    # Rate-capped (above the producer's rate): a descriptor per frame, so its queue fills;
    # a default reader that stops reading is sent nothing at all.
    victim = spawn(f"""
r = frameshm.Reader({name!r}, consumer="victim", max_rate_hz=1_000_000)
announce_queue(r)
for _ in range(3):
    r.wait_latest(timeout=10)
say("READY")
time.sleep(600)   # registered, never reads again: its queue fills up
""", label="victim")
    victim.expect("READY")
    [queue] = victim.queues
    info = frameshm.stream_info(name)
    [entry] = [c for c in info["consumers"] if c["name"] == "victim"]
    assert entry["queue"] == queue and entry["pid"] == victim.pid and entry["alive"]
    assert queue_exists(queue)

    # A stalled consumer: the queue is full, the producer goes on at full rate.
    wait_until(lambda: frameshm.stream_info(name)["descriptors_dropped"] > 0, 10, what="a full queue")
    f0 = frameshm.stream_info(name)["frames"]
    time.sleep(0.5)
    assert frameshm.stream_info(name)["frames"] - f0 >= 500

    victim.kill()
    t_kill = time.monotonic()
    info = wait_until(
        lambda: (lambda i: i if not any(c["name"] == "victim" for c in i["consumers"]) else None)(
            frameshm.stream_info(name)),
        2.5, interval=0.02, what="the dead consumer to be pruned")
    pruned_after = time.monotonic() - t_kill
    assert pruned_after < 2.5
    assert info["consumers_pruned"] >= 1
    assert not queue_exists(queue), "the pruned consumer's queue is unlinked"

    f0 = frameshm.stream_info(name)["frames"]
    time.sleep(0.5)
    assert frameshm.stream_info(name)["frames"] - f0 >= 500, "the producer kept publishing"
    assert producer.proc.poll() is None
    assert producer.stop() == 0
    assert not stream_dir(name).exists()


def test_killed_producer_then_restart_same_reader(name, spawn):
    first = spawn(producer_code(name, period=0.005), label="producer-1")
    epoch1 = int(first.expect("READY").split()[0])
    with frameshm.Reader(name, consumer="survivor") as r:
        last = -1
        for _ in range(5):
            f = r.wait_latest(timeout=10)
            assert f.seq > last and f.epoch == epoch1
            emb, ok = check_frame(f)
            assert not ok or emb == f.seq
            last = f.seq
        first.kill()
        # Drain whatever was committed before the kill; then the wait ends with ProducerDead.
        for _ in range(50):
            try:
                f = r.wait_latest(timeout=0.3)
                last = f.seq
            except frameshm.ProducerDead as e:
                assert "dead" in str(e) and str(first.pid) in str(e)
                assert isinstance(e, frameshm.Timeout) and isinstance(e, TimeoutError)
                break
        else:
            pytest.fail("no ProducerDead after the producer was killed")
        info = frameshm.stream_info(name)
        assert info["producer"] == "dead" and info["producer_pid"] == first.pid
        assert r.producer == ("dead", first.pid)
        assert not r.producer_alive
        with pytest.raises(frameshm.ProducerDead):
            r.wait_next(timeout=0.1)

        second = spawn(producer_code(name, period=0.005), label="producer-2")
        epoch2 = int(second.expect("READY").split()[0])
        assert epoch2 == epoch1 + 1
        seqs = []
        for _ in range(5):
            f = r.wait_latest(timeout=10)
            assert f.epoch == epoch2
            emb, ok = check_frame(f)
            assert not ok or emb == f.seq
            seqs.append(f.seq)
        assert seqs[0] > last, "seqs continue across producer restarts"
        assert all(b > a for a, b in zip(seqs, seqs[1:]))
        assert r.epoch == epoch2 and r.producer == ("alive", second.pid)
        assert sorted(p.name for p in stream_dir(name).iterdir()) == [str(epoch2), "frameshm.ctl"], \
            "the dead producer's epoch directory was removed"
        assert second.stop() == 0
        del f
    assert not stream_dir(name).exists()


def test_forked_child_does_not_keep_a_dead_producer_busy(name, spawn):
    """A producer forks (multiprocessing's default) and is SIGKILLed; while its child
    lives on, a new producer must still be able to take the stream over."""
    producer = spawn(f"""
w = frameshm.Writer({name!r}, shape=(1,))
w.publish(np.ones(1, np.uint8))
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
say("READY", pid)
time.sleep(600)
""", label="forking producer")
    grandchild = int(producer.expect("READY"))
    try:
        producer.kill()
        assert frameshm.stream_info(name)["producer"] == "dead"
        with frameshm.Writer(name, shape=(1,)) as w:
            assert w.epoch == 2
            assert w.publish(np.ones(1, np.uint8)) == 1
    finally:
        os.kill(grandchild, signal.SIGKILL)
    assert not stream_dir(name).exists()


def test_reader_before_any_writer(name, spawn):
    with frameshm.Reader(name, consumer="early") as r, frameshm.Reader(name, consumer="early-all") as r2:
        assert r.producer == ("none", 0)
        assert frameshm.stream_info(name)["producer"] == "none"
        producer = spawn(producer_code(name, nslots=64, period=0.01, delay=0.5), label="producer")
        t0 = time.monotonic()
        f = r.wait_latest(timeout=20)  # blocks until the producer appears and publishes
        assert time.monotonic() - t0 > 0.2
        emb, ok = check_frame(f)
        assert not ok or emb == f.seq
        assert f.epoch == 1 and r.producer == ("alive", producer.pid)
        f2 = r2.wait_next(timeout=10)
        assert f2.seq == 0, "registered before the first frame: process-all gets frame 0"
        assert [r2.wait_next(timeout=10).seq for _ in range(3)] == [1, 2, 3]
        assert producer.stop() == 0
        del f, f2
    assert not stream_dir(name).exists()


def test_writer_close_with_live_readers(name, spawn):
    r1 = frameshm.Reader(name, consumer="one")
    r2 = frameshm.Reader(name, consumer="two")
    try:
        producer = spawn(producer_code(name, limit=3, period=0), label="producer")
        producer.expect("READY")
        producer.expect("DONE")
        assert r1.wait_latest(timeout=10).seq == 2
        assert r2.wait_next(timeout=10).seq == 0
        assert producer.stop() == 0
        producer.expect("CLOSED", timeout=1)
        # The control region stays for the registered readers; the epoch's files are gone.
        assert sorted(p.name for p in stream_dir(name).iterdir()) == ["frameshm.ctl"]
        assert r1.producer == ("closed", producer.pid)  # exited after closing: closed, not dead
        assert frameshm.stream_info(name)["producer"] == "closed"
        with pytest.raises(frameshm.Timeout) as ei:
            r1.wait_latest(timeout=0.2)
        assert not isinstance(ei.value, frameshm.ProducerDead) and "closed" in str(ei.value)
        r1.close()
        assert stream_dir(name).exists(), "one reader is left"
        assert [c["name"] for c in frameshm.stream_info(name)["consumers"]] == ["two"]
    finally:
        r1.close()
        r2.close()
    assert not stream_dir(name).exists(), "the last reader out removes the stream"


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_gil_released_while_waiting(name, method):
    with frameshm.Reader(name) as r:
        entered = threading.Event()
        result = {}

        def waiter():
            entered.set()
            try:
                getattr(r, method)(timeout=2)
            except frameshm.Timeout as e:
                result["exc"] = e
            result["end"] = time.monotonic()

        t = threading.Thread(target=waiter)
        t.start()
        assert entered.wait(5)
        time.sleep(0.2)  # let it block inside the C wait
        count = 0
        stop = time.monotonic() + 0.5
        while time.monotonic() < stop:
            count += 1
        counted_until = time.monotonic()
        t.join(10)
        assert not t.is_alive()
        assert isinstance(result.get("exc"), frameshm.Timeout)
        assert counted_until < result["end"], "the counting ran while the other thread waited"
        assert count > 10_000


def test_ctrl_c_interrupts_a_blocking_wait(name, spawn):
    child = spawn(f"""
r = frameshm.Reader({name!r})
announce_queue(r)
say("READY")
try:
    r.wait_latest(timeout=None)
    say("RETURNED")
except KeyboardInterrupt:
    say("KBI")
finally:
    r.close()
    say("CLOSED")
""", label="waiter")
    child.expect("READY")
    [queue] = child.queues
    time.sleep(0.3)  # inside the blocking wait by now
    t0 = time.monotonic()
    child.send_signal(signal.SIGINT)
    child.expect("KBI", timeout=5)
    assert time.monotonic() - t0 < 2.0, "Ctrl-C must end the wait promptly"
    child.expect("CLOSED", timeout=5)
    assert child.wait() == 0
    assert not queue_exists(queue)
    assert not stream_dir(name).exists()


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_other_signals_do_not_end_a_wait(name, spawn, method):
    """A signal whose handler returns (SIGUSR1) resumes the wait; its timeout still holds."""
    child = spawn(f"""
signal.signal(signal.SIGUSR1, lambda *a: say("USR1"))
r = frameshm.Reader({name!r})
announce_queue(r)
say("READY")
t0 = time.monotonic()
try:
    r.{method}(timeout=1.5)
    say("RETURNED")
except frameshm.Timeout:
    say("TIMEOUT", time.monotonic() - t0)
r.close()
""", label="waiter")
    child.expect("READY")
    time.sleep(0.3)
    child.send_signal(signal.SIGUSR1)
    child.expect("USR1", timeout=5)
    elapsed = float(child.expect("TIMEOUT", timeout=10))
    assert 1.4 <= elapsed < 6
    assert child.wait() == 0


def test_last_reader_out_unlinks_dead_consumers_queues(name, spawn):
    r = frameshm.Reader(name, consumer="survivor")
    try:
        victim = spawn(f"""
r = frameshm.Reader({name!r}, consumer="victim")
announce_queue(r)
say("READY")
time.sleep(600)
""", label="victim")
        victim.expect("READY")
        [queue] = victim.queues
        victim.kill()
    finally:
        r.close()  # no producer, no live consumer left: removes the stream
    assert not stream_dir(name).exists()
    leaked = queue_exists(queue)
    unlink_queue(queue)
    assert not leaked, f"queue {queue} of the dead consumer leaked"


def test_single_slot_under_an_unthrottled_producer(name, spawn, tmp_path):
    """Issue 14, item 9: one slot rewritten back to back by another process (the seed's
    latest-frame buffer). read_latest(copy=True) returns only untorn frames and, when it
    loses every race, raises Overrun (one documented error): with no pause between two
    writes longer than a copy, no reader can get an untorn copy of the only slot. As soon
    as the producer leaves gaps, copies come through; wait_latest keeps delivering."""
    gaps, stop = tmp_path / "gaps", tmp_path / "stop"
    producer = spawn(f"""
import os, time, numpy as np, frameshm
w = frameshm.Writer({name!r}, shape=(480, 640, 3), nslots=1)
bufs = [np.full((480, 640, 3), k, np.uint8) for k in range(4)]
print("READY", flush=True)
i, end, pause = 0, time.monotonic() + 60, False
while time.monotonic() < end:
    w.publish(bufs[i % 4]); i += 1
    if i % 16 == 0:
        if os.path.exists({str(stop)!r}):
            break
        pause = os.path.exists({str(gaps)!r})
        if pause:
            time.sleep(0.005)   # a gap: 16 frames back to back, then 5 ms
w.close()
print("DONE", i, flush=True)
""", label="unthrottled")
    producer.expect("READY")

    def copies(seconds):
        got = overruns = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            try:
                a = r.read_latest(copy=True)
            except frameshm.Overrun as e:
                assert "starved" in str(e) or "overwrit" in str(e)
                overruns += 1
                continue
            if a is not None:
                assert a.shape == (480, 640, 3) and a.min() == a.max(), "a torn copy was returned"
                got += 1
        return got, overruns

    try:
        with frameshm.Reader(name) as r:
            copies(1.0)   # back to back: frames or Overrun, never torn, never another error
            gaps.touch()
            got, overruns = copies(2.0)
            assert got > 0, f"no frame in 2 s although the producer pauses 5 ms every 16 frames ({overruns} Overrun)"
            for _ in range(5):
                f = r.wait_latest(timeout=10)
                b = np.array(f.array)
                assert (b.min() == b.max()) or not f.valid()
    finally:
        stop.touch()
        producer.expect("DONE")


def test_queueless_process_all_consumer_that_keeps_up_loses_nothing(name, spawn):
    """Reader(queue=False): frames come from the header ring by seq, the futex wakes it; a
    consumer that keeps up (256 slots of slack at 500 frames/s) gets every frame in order,
    and no descriptor is sent to it."""
    n = 200
    with frameshm.Reader(name, consumer="ringer", queue=False) as r:
        assert r._r.queue_name == ""
        producer = spawn(producer_code(name, nslots=256, period=0.002, limit=n), label="producer")
        producer.expect("READY")
        for want in range(n):
            f = r.wait_next(timeout=10)
            assert (f.seq, f.skipped) == (want, 0)
            assert frame_seq_ok(f.array) == want
            del f
        assert r.overruns == 0
        (entry,) = frameshm.stream_info(name)["consumers"]
        assert entry["queue"] == "" and entry["delivered"] == 0 and entry["last_seq_plus1"] == n
        producer.expect("DONE")
        with pytest.raises(frameshm.Timeout):
            r.wait_next(timeout=0.2)
    assert producer.stop() == 0


def test_queued_consumer_takes_frames_from_the_ring_and_is_woken_without_a_descriptor(name, spawn):
    """The default Reader has a queue, yet takes its frames from the header ring by seq: 300
    frames another process publishes while the reader does not wait cost no descriptor
    (none delivered, none dropped on a full queue), reach it in order with their commit
    time, and once it waits with nothing there, the next commit wakes it: a FUTEX_WAKE on
    the control region, still no descriptor (the queue is for producers that do not
    answer a bell that way, and for rate-capped readers)."""
    n = 300
    with frameshm.Reader(name, consumer="queued") as r:
        assert r._r.queue_name != ""
        producer = spawn(f"""
name, N = {name!r}, {n}
w = frameshm.Writer(name, shape=(64,), dtype="uint8", nslots=512)
say("READY")
for i in range(N):
    assert w.publish(make_frame(i, 64)) == i
say("DONE")
deadline = time.monotonic() + 30
while [c for c in frameshm.stream_info(name)["consumers"] if c["last_seq_plus1"] < N]:
    assert time.monotonic() < deadline, "the consumer stopped reading"
    time.sleep(0.005)
time.sleep(0.2)   # the consumer is asleep in its wait by now
assert w.publish(make_frame(N, 64)) == N
say("MORE")
while not stopped():
    time.sleep(0.01)
w.close()
""", label="producer")
        producer.expect("READY")
        producer.expect("DONE", timeout=30)
        (entry,) = frameshm.stream_info(name)["consumers"]
        assert (entry["delivered"], entry["queue_full"]) == (0, 0)
        for want in range(n):
            f = r.wait_next(timeout=10)
            assert (f.seq, f.skipped) == (want, 0)
            assert frame_seq_ok(f.array) == want
            assert f.publish_ns >= f.timestamp_ns > 0
            del f
        assert r.overruns == 0 and r.drops == 0
        f = r.wait_next(timeout=10)
        assert (f.seq, f.skipped) == (n, 0)
        producer.expect("MORE")
        (entry,) = frameshm.stream_info(name)["consumers"]
        assert (entry["delivered"], entry["queue_full"]) == (0, 0)
        del f
    assert producer.stop() == 0


def test_queueless_process_all_consumer_that_falls_behind_counts_what_it_lost(name, spawn):
    """50 frames into 8 slots while the queue-less consumer is away: it resumes at the
    oldest frame the ring still holds, the 42 before it counted as skipped and overruns,
    then takes the rest in order."""
    with frameshm.Reader(name, consumer="ringer", queue=False) as r:
        producer = spawn(producer_code(name, nslots=8, period=0, limit=50), label="producer")
        producer.expect("READY")
        producer.expect("DONE")
        f = r.wait_next(timeout=10)
        assert (f.seq, f.skipped) == (42, 42) and frame_seq_ok(f.array) == 42
        for want in range(43, 50):
            f = r.wait_next(timeout=10)
            assert (f.seq, f.skipped) == (want, 0)
        assert r.overruns == 42
        del f
        with pytest.raises(frameshm.Timeout):
            r.wait_next(timeout=0.2)
    assert producer.stop() == 0
