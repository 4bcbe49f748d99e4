"""Controller: the sentry state machine that turns detections into the capture mode.

    Standby ──person──▶ Validation ──validation_frames in a row──▶ Tracking
       ▲                    │                                         │
       └──── no person ─────┘◀── tracking_exit_s or tracking_exit_frames without ──┘

Validation and Tracking map to mode Alarmed, Standby to mode Standby. The mode is
control byte 0 of the frames stream (:mod:`.mode`; an atomic release store); the capture
producer reads it before every frame. The state itself goes to control byte 1 just before
it (what the gateway's page shows). Every transition is logged with the frame that caused it.

Entry is debounced in detection frames; the exit from Tracking is timed in seconds as
well: a detector running at 1 fps would otherwise hold the camera Alarmed for
``tracking_exit_frames`` seconds after the person left. The seconds are the detections'
capture timestamps (CLOCK_MONOTONIC), so the rule needs evidence — a frame without a
person captured ``tracking_exit_s`` after the last one with — and a stalled detector
never releases the camera on its own.

The controller consumes the detections stream process-all: debouncing counts
consecutive detection frames, so none may be silently skipped (one lost to an overrun
is counted, not guessed).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Optional, Sequence, Tuple

import numpy as np

from ..config import PipelineConfig
from ..errors import FrameshmError, InvalidArgument, Overrun, Timeout
from ..stream import Reader
from . import Metrics
from .mode import MODE_ALARMED, MODE_NAMES, MODE_STANDBY, read_mode, read_state, write_mode, write_state

log = logging.getLogger("frameshm.controller")

WAIT_S = 0.1  # also paces the drain of the frames-stream queue (see Controller.run)


class State(enum.Enum):
    STANDBY = "Standby"
    VALIDATION = "Validation"
    TRACKING = "Tracking"

    def __str__(self) -> str:
        return self.value


MODE_OF_STATE = {State.STANDBY: MODE_STANDBY, State.VALIDATION: MODE_ALARMED, State.TRACKING: MODE_ALARMED}


class Sentry:
    """The pure state machine: feed it one boolean per detection frame, with the frame's
    capture timestamp for the timed exit.

    * Standby + person → Validation (1 sighting); with ``validation_frames == 1`` straight
      to Tracking.
    * Validation + person → Tracking once ``validation_frames`` consecutive frames had one;
      Validation + no person → Standby (not confirmed).
    * Tracking + person resets the miss count; Tracking + no person → Standby after
      ``tracking_exit_frames`` consecutive frames without one, or as soon as a frame without
      one was captured ``tracking_exit_s`` or more after the last frame with one (0: frames
      only; a step without a timestamp is counted, not timed) — whichever comes first.
    """

    def __init__(self, validation_frames: int = 3, tracking_exit_frames: int = 10, tracking_exit_s: float = 0.0):
        for key, v in (("validation_frames", validation_frames), ("tracking_exit_frames", tracking_exit_frames)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"{key} must be an integer >= 1, got {v!r}")
        if (isinstance(tracking_exit_s, bool) or not isinstance(tracking_exit_s, (int, float))
                or not 0 <= tracking_exit_s < 1e9):
            raise InvalidArgument(f"tracking_exit_s must be a number of seconds >= 0, got {tracking_exit_s!r}")
        self.validation_frames = validation_frames
        self.tracking_exit_frames = tracking_exit_frames
        self.tracking_exit_ns = int(tracking_exit_s * 1e9)
        self.state = State.STANDBY
        self.hits = 0    # consecutive frames with a person (Validation)
        self.misses = 0  # consecutive frames without one (Tracking)
        self.last_hit_ns: Optional[int] = None  # capture time of the newest frame with a person
        self.unseen_ns = 0  # at the last step: capture time since last_hit_ns (0 if unknown)

    @property
    def mode(self) -> int:
        return MODE_OF_STATE[self.state]

    def step(self, person: bool, timestamp_ns: Optional[int] = None) -> State:
        """Advances one detection frame (captured at ``timestamp_ns``, CLOCK_MONOTONIC);
        returns the (possibly unchanged) state."""
        s = self.state
        if person:
            self.last_hit_ns = timestamp_ns
            self.unseen_ns = 0
        elif timestamp_ns is not None and self.last_hit_ns is not None:
            self.unseen_ns = max(0, timestamp_ns - self.last_hit_ns)  # a clock going back: no time passed
        else:
            self.unseen_ns = 0
        if s is State.STANDBY:
            if person:
                self.hits = 1
                s = State.TRACKING if self.hits >= self.validation_frames else State.VALIDATION
                self.misses = 0
        elif s is State.VALIDATION:
            if person:
                self.hits += 1
                if self.hits >= self.validation_frames:
                    s = State.TRACKING
                    self.misses = 0
            else:
                s = State.STANDBY
                self.hits = 0
        else:
            if person:
                self.misses = 0
            else:
                self.misses += 1
                timed_out = 0 < self.tracking_exit_ns <= self.unseen_ns
                if self.misses >= self.tracking_exit_frames or timed_out:
                    s = State.STANDBY
                    self.hits = self.misses = 0
        self.state = s
        return s


def person_in(dets: np.ndarray, min_score: float = 0.0, classes: Sequence[float] = ()) -> Tuple[bool, int, float]:
    """(any person?, how many, best score) among ``(N, 6)`` detections: rows scoring at
    least ``min_score`` whose class is in ``classes`` (empty: any class)."""
    if dets.shape[0] == 0:
        return False, 0, 0.0
    mask = dets[:, 4] >= min_score
    if classes:
        mask &= np.isin(dets[:, 5], np.asarray(classes, np.float32))
    n = int(np.count_nonzero(mask))
    return n > 0, n, float(dets[mask, 4].max()) if n else 0.0


class Controller:
    def __init__(self, cfg: PipelineConfig, stop: threading.Event, *,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None):
        self.cfg = cfg
        self.c = cfg.controller
        self.stop = stop
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        self.sentry = Sentry(self.c.validation_frames, self.c.tracking_exit_frames, self.c.tracking_exit_s)
        self.frames = 0
        self.person_frames = 0
        self.lost = 0
        self.transitions = 0
        self.last_transition: Optional[dict] = None

    def run(self) -> int:
        c = self.c
        det = ctl = metrics = None
        stalled = False
        last_frame = time.monotonic()
        try:
            metrics = Metrics(self.cfg.metrics_stream("controller"), **self._addr)
            det = Reader(self.cfg.detections_stream, consumer=c.consumer, spin=False, driver=self.cfg.driver,
                         **self._addr)
            # The mode lives in the frames stream's control bytes: a passive handle reaches
            # them without becoming a consumer of the frames.
            ctl = Reader(self.cfg.frames_stream, subscribe=False, driver=self.cfg.driver, **self._addr)
            self._write(ctl)
            log.info("%s; mode %s written to %r; validation_frames=%d tracking_exit_frames=%d tracking_exit_s=%g",
                     self.sentry.state, "Standby", self.cfg.frames_stream, c.validation_frames,
                     c.tracking_exit_frames, c.tracking_exit_s)
            while not self.stop.is_set():
                try:
                    f = det.wait_next(WAIT_S)
                except Timeout:
                    now = time.monotonic()
                    if not stalled and now - last_frame >= c.stall_warning_s:
                        stalled = True
                        log.warning("no detections from %r for %.0fs; holding %s", self.cfg.detections_stream,
                                    now - last_frame, self.sentry.state)
                    self._enforce(ctl)
                    self._publish_metrics(metrics, time.monotonic_ns())
                    continue
                last_frame = time.monotonic()
                if stalled:
                    stalled = False
                    log.info("detections flowing again")
                self.lost += f.skipped
                try:
                    dets = f.copy()
                except Overrun:
                    self.lost += 1
                    continue
                self.frames += 1
                person, n, best = person_in(dets, c.min_score, c.classes)
                self.person_frames += person
                old = self.sentry.state
                new = self.sentry.step(person, f.timestamp_ns)
                changed = new is not old
                if changed:
                    self.transitions += 1
                    self.last_transition = {"from": str(old), "to": str(new), "frame_seq": f.ref_seq,
                                            "timestamp_ns": f.timestamp_ns}
                    why = ""
                    if old is State.TRACKING:
                        why = f" after {self.sentry.unseen_ns / 1e9:.1f}s without a person"
                    log.info("%s -> %s: frame seq %s (ts %d ns), %d person(s), best score %.2f%s; mode %s",
                             old, new, f.ref_seq, f.timestamp_ns, n, best, why,
                             MODE_NAMES[MODE_OF_STATE[new]])
                self._enforce(ctl)
                # a transition is published at once: the page's status must not lag the mode
                self._publish_metrics(metrics, time.monotonic_ns(), force=changed)
        finally:
            if ctl is not None:
                # No controller, no alarm: the capture falls back to its standby rate. A
                # capture that stopped first has removed the stream: nothing to reset.
                try:
                    write_state(ctl, None)
                    write_mode(ctl, MODE_STANDBY)
                except FrameshmError as exc:
                    log.debug("mode not reset: %s", exc)
                ctl.close()
            for obj in (det, metrics):
                if obj is not None:
                    obj.close()
            log.info("stopped in %s after %d detection frames (%d with a person), %d transitions; mode reset "
                     "to Standby", self.sentry.state, self.frames, self.person_frames, self.transitions)
        return 0

    def _write(self, ctl: Reader) -> None:
        # state first: a reader that sees the new mode sees the state that chose it
        write_state(ctl, str(self.sentry.state))
        write_mode(ctl, self.sentry.mode)

    def _enforce(self, ctl: Reader) -> None:
        """Writes the state and mode when they differ — also re-asserting them if the control
        region was recreated (a restarted stream starts in Standby)."""
        if read_state(ctl) != str(self.sentry.state) or read_mode(ctl) != self.sentry.mode:
            self._write(ctl)

    def _publish_metrics(self, metrics: Optional[Metrics], now: int, force: bool = False) -> None:
        if metrics is None or not (force or metrics.due(now)):
            return
        metrics.publish({
            "role": "controller", "frames": self.cfg.frames_stream, "detections": self.cfg.detections_stream,
            "state": str(self.sentry.state), "mode": MODE_NAMES[self.sentry.mode],
            "detection_frames": self.frames, "person_frames": self.person_frames, "lost": self.lost,
            "transitions": self.transitions, "last_transition": self.last_transition,
            "unseen_s": round(self.sentry.unseen_ns / 1e9, 3),
        }, now)


def run(cfg: PipelineConfig, stop: threading.Event, base_dir: Optional[str] = None,
        namespace: Optional[str] = None) -> int:
    return Controller(cfg, stop, base_dir=base_dir, namespace=namespace).run()
