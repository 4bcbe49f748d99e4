"""The exporter's send window: how many frames may be on the way to the importers.

Blocking puts alone do not bound the latency of latest-frame bridging: a put returns once
Zenoh has handed the frame to the kernel, and every buffer between the two processes (the
sender's TCP send buffer, autotuned to megabytes; a router's or a Wi-Fi link's queue; the
receiver's socket when it is starved of CPU) is filled before the put blocks. A link
slower than the stream then delivers every frame a full buffer late: seconds on a link of
a few MB/s, and the frames in those buffers were all taken as "the newest" when they were
not.

Importers acknowledge every frame they take off the link (``ACK``: importer id, exporter
instance, source epoch, seq). The exporter keeps, per importer, the frames sent and not
yet acknowledged and a window in frames, and takes the next frame only when every
importer has room: the frames in between are dropped at the sender, where the newest is
chosen, instead of queued in front of the link.

The window is delay-based (TCP Vegas' estimate, in frames): with ``W`` frames allowed, a
round trip ``rtt`` against the least seen, ``base``, means about ``W * (rtt - base) / rtt``
frames waited in a queue. One frame waiting (``BETA``) is the aim: it keeps the link busy
(the next frame is there when one finishes crossing) and adds at most one frame's
transmission to the latency. More than that and the window drops by the excess, at most
once per round trip; under half a frame, while the window was what held the exporter, it
grows by about a frame per round trip (a window that does not limit does not grow, so a
fast link that later slows has no stale large window). Round trips within
``TARGET_MIN_NS`` of the least are scheduling noise, not a queue, and a queue is judged by
the least of the last ``STANDING`` round trips: a frame that lost a packet comes a
retransmission late (a round trip or more) while the frames around it do not, and that is
not a queue to make room for (judged per frame, the losses of 1 % held the window at two
frames where three were needed: 40-49 ms median latency instead of 26-27 at 640x480
through 20 ms / 1 % with BBR).

The window never goes below two frames. With one, the link idles for a round trip after
every frame, and worse, the round trip of a lone frame is not its queue: TCP paces an
application-limited flow more slowly (BBR lowered its pacing when the bridge sent one
640x480 frame per round trip, the slower frames read as a queue and the window stayed at
one: 8.7 instead of 28 fps through 20 ms / 1 % loss, 1 run in 7). Two keep the link
busy at the cost of at most one frame's transmission in the latency.

An importer whose acknowledgement has not come for ``STALL_S`` (or four of its round
trips, whichever is longer) while frames are out stops holding the others (it is gone,
or its link stopped); it counts again from its next acknowledgement. An exporter without
acknowledging importers (none yet, or an older frameshm) sends as before: as fast as the
puts return.

Thread use: ``on_ack`` runs in Zenoh's callback thread, everything else in the exporter's.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from typing import Callable, Dict, Optional

# importer id, exporter instance, source epoch, seq (little-endian), importer -> exporter
ACK = struct.Struct("<QQQQ")

WINDOW_MIN = 2.0        # frames: one crossing and the next waiting, always (below)
WINDOW_START = 2.0
WINDOW_MAX = 64.0       # a fast link needs no more: a put returns at the link's pace anyway
TARGET_MIN_NS = 20_000_000   # a round trip this close to the least is not a queue (scheduling noise)
BETA = 1.0              # frames waiting in front of the link that the window aims at
ALPHA = 0.5             # below this many waiting, a limiting window grows
STANDING = 3            # round trips whose least tells a queue (that every frame meets) from a retransmission
STALL_S = 1.0
FORGET_S = 10.0         # an importer silent this long is dropped from the table
RTT_BUCKET_NS = 5_000_000_000   # the minimum round trip is the least of the last two 5 s spans
SENT_MAX = 256          # frames remembered for round-trip samples (>= WINDOW_MAX)


class _Peer:
    __slots__ = ("acked", "ack_ns", "window", "rtt_cur", "rtt_prev", "bucket_ns", "shrunk_ns", "rtt_last",
                 "limited", "recent", "out_ns")

    def __init__(self, now: int):
        self.acked = -1              # the newest seq acknowledged, in the current epoch
        self.ack_ns = now
        self.window = WINDOW_START
        self.rtt_cur = self.rtt_prev = None
        self.bucket_ns = now
        self.shrunk_ns = 0
        self.rtt_last = None
        self.limited = False         # the window held the exporter since the last growth
        self.recent: deque = deque(maxlen=STANDING)
        self.out_ns = None           # when the oldest frame it has not acknowledged was sent

    def rtt_min(self) -> Optional[int]:
        vals = [v for v in (self.rtt_cur, self.rtt_prev) if v is not None]
        return min(vals) if vals else None

    def sample(self, rtt: int, now: int) -> None:
        if now - self.bucket_ns >= RTT_BUCKET_NS:
            self.rtt_prev, self.rtt_cur, self.bucket_ns = self.rtt_cur, None, now
        if self.rtt_cur is None or rtt < self.rtt_cur:
            self.rtt_cur = rtt
        self.rtt_last = rtt
        self.recent.append(rtt)
        base = self.rtt_min()
        standing = min(self.recent)
        excess = standing - base
        queued = 0.0 if excess <= TARGET_MIN_NS else self.window * excess / standing
        if queued > BETA:
            if now - self.shrunk_ns >= base:
                self.window = max(WINDOW_MIN, self.window - (queued - BETA))
                self.shrunk_ns = now
        elif queued < ALPHA and self.limited:
            self.window = min(WINDOW_MAX, self.window + 1.0 / self.window)
            self.limited = False

    def stall_ns(self) -> int:
        base = self.rtt_min() or 0
        return max(int(STALL_S * 1e9), 4 * base)


class SendWindow:
    """One exported stream's window over all of its importers (module docstring)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns):
        self._clock = clock
        self._cv = threading.Condition()
        self._peers: Dict[int, _Peer] = {}
        self._sent: deque = deque(maxlen=SENT_MAX)   # (seq, send time), seq ascending
        self._instance = self._epoch = None

    def reset(self, instance: int, epoch: int) -> None:
        """A new exporter instance or source epoch: seqs start over, what was in flight
        no longer counts, the round trips measured still hold."""
        with self._cv:
            if (instance, epoch) == (self._instance, self._epoch):
                return
            self._instance, self._epoch = instance, epoch
            self._forget_in_flight()
            self._cv.notify_all()

    def _forget_in_flight(self) -> None:
        self._sent.clear()
        for p in self._peers.values():
            p.acked, p.out_ns = -1, None

    def sending(self, seq: int) -> None:
        """Called just before the put of frame ``seq`` (an acknowledgement can overtake
        the put's return on a fast link)."""
        with self._cv:
            if self._sent and seq <= self._sent[-1][0]:
                self._forget_in_flight()   # the numbering went back without a new epoch: start over
            now = self._clock()
            self._sent.append((seq, now))
            for p in self._peers.values():
                if p.out_ns is None:
                    p.out_ns = now

    def on_ack(self, raw: bytes) -> None:
        if len(raw) != ACK.size:
            return
        importer, instance, epoch, seq = ACK.unpack(raw)
        now = self._clock()
        with self._cv:
            if instance != self._instance or epoch != self._epoch:
                return
            p = self._peers.get(importer)
            if p is None:
                p = self._peers[importer] = _Peer(now)
            if seq <= p.acked:
                return
            p.acked, p.ack_ns = seq, now
            p.out_ns = None
            for s, t in reversed(self._sent):
                if s == seq:
                    p.sample(now - t, now)
                    break
                if s < seq:
                    break
                p.out_ns = t          # the oldest sent after the one acknowledged, so far
            self._cv.notify_all()

    def _in_flight(self, p: _Peer) -> int:
        n = 0
        for s, _t in reversed(self._sent):
            if s <= p.acked:
                break
            n += 1
        return n

    def _blocking(self, now: int) -> Optional[_Peer]:
        """The importer without room, if one has none (under self._cv)."""
        for key, p in list(self._peers.items()):
            if now - p.ack_ns > FORGET_S * 1e9:
                del self._peers[key]
                continue
            n = self._in_flight(p)
            if n == 0 or n < int(p.window):
                continue
            if now >= self._stall_at(p):
                continue          # stalled: it does not hold the others
            p.limited = True
            return p
        return None

    @staticmethod
    def _stall_at(p: _Peer) -> int:
        # Silent since its last acknowledgement and since the oldest frame it has not
        # acknowledged went out. Kept per importer, not looked up among the frames sent:
        # those roll over (SENT_MAX) while a stalled importer is left behind, and the
        # oldest remembered would make it look recent again.
        return max(p.ack_ns, p.out_ns if p.out_ns is not None else p.ack_ns) + p.stall_ns()

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s until every importer has room for one more frame;
        True when it has."""
        deadline = self._clock() + int(timeout * 1e9)
        with self._cv:
            while True:
                now = self._clock()
                p = self._blocking(now)
                if p is None:
                    return True
                left = deadline - now
                if left <= 0:
                    return False
                # Wake for the stall as well as for an acknowledgement.
                self._cv.wait(max(0.001, min(left, self._stall_at(p) - now + 1_000_000) / 1e9))

    def state(self) -> dict:
        """Per importer (hex id): frames in flight, window, round trip min/last (ms)."""
        with self._cv:
            return {f"{k:016x}": {"in_flight": self._in_flight(p), "window": round(p.window, 2),
                                  "rtt_min_ms": None if p.rtt_min() is None else round(p.rtt_min() / 1e6, 3),
                                  "rtt_ms": None if p.rtt_last is None else round(p.rtt_last / 1e6, 3)}
                    for k, p in self._peers.items()}
