"""The exporter's send window (frameshm/_bridge_window.py) on its own, with a clock the test
moves; the real thing through a slow emulated link is in test_bridge_link.py."""

from __future__ import annotations

import threading
import time

import pytest

from frameshm._bridge_window import ACK, STALL_S, WINDOW_MAX, SendWindow

MS = 1_000_000
INSTANCE, EPOCH = 0x1234_5678_9ABC_DEF1, 7


class Clock:
    def __init__(self):
        self.t = 1_000 * MS

    def __call__(self) -> int:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += int(ms * MS)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def win(clock):
    w = SendWindow(clock)
    w.reset(INSTANCE, EPOCH)
    return w


def ack(w, seq, importer=1, instance=INSTANCE, epoch=EPOCH):
    w.on_ack(ACK.pack(importer, instance, epoch, seq))


def room(w) -> bool:
    return w.wait(0)


def test_without_acknowledging_importers_it_never_holds(win):
    """No importer has acknowledged anything (none yet, or an older frameshm): every frame
    goes, as before the window existed."""
    for seq in range(1000):
        assert room(win)
        win.sending(seq)
    assert win.state() == {}


def test_two_frames_may_be_out_at_first_and_an_acknowledgement_frees_room(win, clock):
    win.sending(0)
    clock.advance(40)
    ack(win, 0)                      # the importer is known now
    win.sending(1)
    assert room(win)
    win.sending(2)
    assert not room(win), "two frames out, window 2"
    clock.advance(40)
    ack(win, 1)
    assert room(win)
    assert win.state()["0000000000000001"]["in_flight"] == 1


def test_a_round_trip_that_grows_shrinks_the_window_to_one_frame_and_a_steady_one_grows_it(win, clock):
    """40 ms round trips at first; then every frame takes 200 ms more (a queue filling in
    front of the link): the window halves, once per round trip, down to one frame; when
    the round trip is back at its minimum it grows again, by about a frame per round trip."""
    seq = 0

    def roundtrip(ms):
        nonlocal seq
        win.sending(seq)
        clock.advance(ms)
        ack(win, seq)
        seq += 1
        return win.state()["0000000000000001"]["window"]

    for _ in range(20):
        w = roundtrip(40)
    assert w > 4, w
    shrinking = [roundtrip(240) for _ in range(12)]
    assert shrinking[-1] == 1.0, shrinking
    assert all(b <= a for a, b in zip(shrinking, shrinking[1:])), shrinking
    win.sending(seq)
    assert not room(win), "one frame out is the whole window now"
    clock.advance(40)
    ack(win, seq)
    seq += 1
    grown = [roundtrip(40) for _ in range(30)]
    assert grown[-1] > 4, grown
    for _ in range(5000):
        w = roundtrip(40)
    assert w == WINDOW_MAX


def test_scheduling_noise_below_the_target_does_not_shrink_it(win, clock):
    seq = 0
    for i in range(200):
        win.sending(seq)
        clock.advance(40 + (i * 7) % 19)     # 40-58 ms: within the 20 ms tolerated
        ack(win, seq)
        seq += 1
    assert win.state()["0000000000000001"]["window"] > 10


def test_an_importer_that_stops_acknowledging_stops_holding_the_others(win, clock):
    """Gone, or its link stopped: after STALL_S without an acknowledgement while frames are
    out, the exporter sends again; the importer's next acknowledgement counts again."""
    win.sending(0)
    ack(win, 0)
    win.sending(1)
    win.sending(2)
    assert not room(win)
    clock.advance(STALL_S * 1000 - 10)
    assert not room(win)
    clock.advance(20)
    assert room(win), "stalled: no longer holds the exporter"
    for seq in range(3, 10):
        win.sending(seq)
    clock.advance(40)
    ack(win, 8)                            # back: it holds again, with frame 9 out
    st = win.state()["0000000000000001"]
    assert st["in_flight"] == 1
    win.sending(10)
    assert room(win) == (st["window"] >= 3)


def test_the_slowest_importer_sets_the_pace(win, clock):
    win.sending(0)
    ack(win, 0, importer=1)
    ack(win, 0, importer=2)
    win.sending(1)
    win.sending(2)
    ack(win, 2, importer=1)
    assert not room(win), "importer 2 has two frames out"
    ack(win, 1, importer=2)
    assert room(win)


def test_a_new_epoch_or_exporter_forgets_what_was_in_flight(win, clock):
    """The source restarted (its seqs start over) or the exporter re-announced itself:
    frames of before do not count, and acknowledgements of them are ignored."""
    win.sending(100)
    ack(win, 100)
    win.sending(101)
    win.sending(102)
    assert not room(win)
    win.reset(INSTANCE, EPOCH + 1)
    assert room(win)
    win.sending(0)
    ack(win, 102)                          # the old epoch's, late
    win.sending(1)
    assert not room(win), "the late acknowledgement freed nothing"
    ack(win, 0, epoch=EPOCH + 1)
    assert room(win)
    win.reset(INSTANCE + 2, EPOCH + 1)
    assert room(win)


def test_malformed_and_foreign_acknowledgements_are_ignored(win):
    win.sending(0)
    ack(win, 0)
    win.sending(1)
    win.sending(2)
    for raw in (b"", b"x" * 31, b"x" * 33, ACK.pack(1, INSTANCE ^ 1, EPOCH, 2), ACK.pack(1, INSTANCE, EPOCH, 0)):
        win.on_ack(raw)
        assert not room(win), raw


def test_wait_wakes_for_an_acknowledgement_from_another_thread():
    """Zenoh's thread acknowledges while the exporter's thread waits (real clock)."""
    w = SendWindow()
    w.reset(INSTANCE, EPOCH)
    w.sending(0)
    ack(w, 0)
    w.sending(1)
    w.sending(2)
    assert not w.wait(0)
    t = threading.Timer(0.05, ack, args=(w, 2))   # nothing left out, whatever the window
    t.start()
    t0 = time.monotonic()
    assert w.wait(STALL_S / 2), "the acknowledgement came well within the wait"
    t.join()
    assert time.monotonic() - t0 < STALL_S / 2
