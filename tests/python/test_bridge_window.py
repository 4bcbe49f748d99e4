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


class Link:
    """Drives the window as the exporter does: sends while there is room, then one round
    trip later every frame out is acknowledged (the newest covers the rest)."""

    def __init__(self, win, clock):
        self.win, self.clock, self.seq = win, clock, 1
        win.sending(0)                # until its first acknowledgement the importer is unknown
        clock.advance(40)
        ack(win, 0)

    def window(self) -> float:
        return self.win.state()["0000000000000001"]["window"]

    def round(self, rtt_ms: float, full: bool = True) -> float:
        sent = 0
        while room(self.win) and (full or sent == 0):
            self.win.sending(self.seq)
            self.seq += 1
            sent += 1
        self.clock.advance(rtt_ms)
        ack(self.win, self.seq - 1)
        return self.window()


def test_a_window_that_limits_grows_while_the_round_trip_stays_at_its_least(win, clock):
    link = Link(win, clock)
    grown = [link.round(40) for _ in range(30)]
    assert grown[-1] > 6, grown
    assert grown == sorted(grown), grown
    for _ in range(3000):
        w = link.round(40)
    assert w == WINDOW_MAX


def test_a_window_that_does_not_limit_does_not_grow(win, clock):
    """One frame at a time (a fast link, or a slow producer): no larger window is ever
    earned, so none is left over when the link later slows."""
    link = Link(win, clock)
    assert [link.round(40, full=False) for _ in range(100)][-1] == 2.0


def test_a_round_trip_that_grows_shrinks_the_window_to_two_frames(win, clock):
    """40 ms round trips, then 240 ms (a queue filling in front of the link): the window
    drops by the frames estimated queued, at most once per round trip, to its floor of two
    (one crossing, one waiting); when the round trip is back at its least it grows again."""
    link = Link(win, clock)
    for _ in range(40):
        w = link.round(40)
    assert w > 8, w
    shrinking = [link.round(240) for _ in range(8)]
    assert shrinking[-1] == 2.0, shrinking
    # The first two could be retransmissions; on the third it is a queue every frame meets.
    assert shrinking[2] < w / 2, (w, shrinking)
    assert all(b <= a for a, b in zip(shrinking[2:], shrinking[3:])), shrinking
    win.sending(link.seq)
    win.sending(link.seq + 1)
    link.seq += 2
    assert not room(win), "two frames out is the whole window now"
    clock.advance(40)
    ack(win, link.seq - 1)
    grown = [link.round(40) for _ in range(30)]
    assert grown[-1] > 6, grown


def test_a_frame_late_by_a_retransmission_now_and_then_is_not_a_queue(win, clock):
    """1 % loss: now and then one frame comes a retransmission (a round trip or more) late
    while the frames around it do not; the window keeps growing."""
    link = Link(win, clock)
    for i in range(60):
        w = link.round(140 if i % 5 == 4 else 40)
    assert w > 8, w


def test_scheduling_noise_below_the_target_does_not_shrink_it(win, clock):
    link = Link(win, clock)
    for i in range(200):
        w = link.round(40 + (i * 7) % 19)     # 40-58 ms: within the 20 ms that are not a queue
    assert w > 10, w


def test_one_frame_waiting_is_the_aim(win, clock):
    """A link whose round trip is mostly a frame's own transmission: with three out, the
    third waits two frames (240 ms more than a lone frame's 120): the window comes down to
    where about one waits, not lower."""
    link = Link(win, clock)
    for _ in range(4):
        link.round(120)
    for _ in range(20):
        out = max(1, int(link.window()))
        w = link.round(120 * out)
    assert 2.0 <= w < 3.0, w


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


def test_a_stalled_importer_stays_released_however_many_frames_go_out(win, clock):
    """More frames than the window remembers go out while one importer is silent: it must
    not look recent again when the oldest frames remembered roll over."""
    ack(win, 0, importer=2)                    # a second importer, keeping up
    win.sending(0)
    clock.advance(40)
    ack(win, 0)
    ack(win, 0, importer=2)
    win.sending(1)
    win.sending(2)
    clock.advance(STALL_S * 1000 + 10)
    for seq in range(3, 2000):
        assert room(win), seq
        win.sending(seq)
        clock.advance(1)
        ack(win, seq, importer=2)


def test_numbering_that_goes_back_within_an_epoch_starts_over(win, clock):
    win.sending(500)
    clock.advance(40)
    ack(win, 500)
    win.sending(10)                             # back, same epoch
    win.sending(11)
    assert not room(win)
    clock.advance(40)
    ack(win, 11)
    assert room(win), "its acknowledgements count again"


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
