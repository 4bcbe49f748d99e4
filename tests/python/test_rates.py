"""Per-consumer rates: a consumer may ask for at most N frames/s (the wire spec's
max_rate_hz idea); the producer throttles its descriptors while others get every frame."""

import threading
import time

import pytest

import frameshm
from frameshm.errors import InvalidArgument, Timeout

PRODUCER = r"""
name = %r
# 64 slots, 640 ms of frames: "full" must get every frame, and a test thread starved for
# 90 ms (seen under stress-ng beside the other xdist workers) outran an 8-slot ring.
w = frameshm.Writer(name, shape=(64,), dtype="uint8", nslots=64)
say("READY")
i = 0
t0 = time.monotonic()
while not stopped():
    w.publish(np.full(64, i %% 256, np.uint8))
    i += 1
    time.sleep(max(0.0, t0 + i * 0.01 - time.monotonic()))   # 100 fps
w.close()
"""


def _count(reader, wait, seconds, out, key):
    seqs = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            f = getattr(reader, wait)(timeout=0.5)
        except Timeout:
            continue
        seqs.append(f.seq)
    out[key] = seqs


def test_two_consumers_at_different_rates(name, spawn):
    producer = spawn(PRODUCER % name, label="producer")
    producer.expect("READY")
    full = frameshm.Reader(name, consumer="full")
    slow = frameshm.Reader(name, consumer="preview", max_rate_hz=10)
    slow_all = frameshm.Reader(name, consumer="slow-all", max_rate_hz=5)
    try:
        info = {c["name"]: c for c in frameshm.stream_info(name)["consumers"]}
        assert info["preview"]["max_rate_hz"] == 10 and info["full"]["max_rate_hz"] == 0
        res = {}
        threads = [threading.Thread(target=_count, args=(full, "wait_next", 3.0, res, "full")),
                   threading.Thread(target=_count, args=(slow, "wait_latest", 3.0, res, "slow")),
                   threading.Thread(target=_count, args=(slow_all, "wait_next", 3.0, res, "slow_all"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # ~300 frames in 3 s at 100 fps; generous bands for a noisy 2-core VM
        assert len(res["full"]) >= 150, len(res["full"])
        assert res["full"] == list(range(res["full"][0], res["full"][0] + len(res["full"])))
        assert 15 <= len(res["slow"]) <= 40, len(res["slow"])     # ~30 at 10 Hz
        assert 7 <= len(res["slow_all"]) <= 21, len(res["slow_all"])  # ~15 at 5 Hz
        # the throttled readers still get the newest frames, in order
        assert res["slow"] == sorted(res["slow"]) and res["slow"][-1] >= res["full"][-1] - 20
        info = {c["name"]: c for c in frameshm.stream_info(name)["consumers"]}
        # the producer paces the preview's descriptors (~30 in 3 s); the full reader takes
        # its frames from the ring and is woken by a FUTEX_WAKE when it sleeps, never by one
        assert 15 <= info["preview"]["delivered"] <= 45, info["preview"]["delivered"]
        assert info["full"]["delivered"] == 0, info["full"]["delivered"]
        assert info["preview"]["queue_full"] == 0
    finally:
        for r in (full, slow, slow_all):
            r.close()
        assert producer.stop() == 0


def test_max_rate_out_of_range(name):
    with pytest.raises(InvalidArgument):
        frameshm.Reader(name, max_rate_hz=10**7)
    with pytest.raises(InvalidArgument):
        frameshm.Reader(name, max_rate_hz=-1)
