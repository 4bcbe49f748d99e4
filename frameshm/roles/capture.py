"""Capture producer: a :class:`~frameshm.sources.Source` into the frames stream.

It streams from the moment the source is open, whether or not anyone consumes, writing
each frame straight into a loaned slot (``loan → source.read_into(view) → commit``).
Before every frame it reads the stream's mode (control byte 0, :mod:`.mode`), written by
the controller:

* Standby → ``standby_fps`` (default 3), Alarmed → ``alarmed_fps`` (default 30). The
  source paces itself when ``set_rate()`` says it can; otherwise frames are dropped to
  the target rate (and between kept frames the loop sleeps, so a slow standby rate also
  costs little CPU).
* On Standby → Alarmed the source's buffered frames older than ``flush_max_age_ms`` are
  discarded, so the first alarmed frames are fresh, not what sat in the driver's queue.

A source that disappears (``SourceGone``) is closed and reopened every
``reconnect_interval_s``; the stream stays up meanwhile (same epoch if the frame shape
is unchanged), so consumers just see a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from .._signals import StopRequested, abandon_on_stop
from ..config import PipelineConfig
from ..errors import InvalidArgument, LeaseLost, Timeout
from ..sources import Source, SourceGone, open_source
from ..stream import Writer
from . import Metrics
from .mode import MODE_ALARMED, MODE_NAMES, MODE_STANDBY, read_mode

log = logging.getLogger("frameshm.capture")


class Capture:
    """One capture producer. ``run()`` returns when ``stop`` is set."""

    def __init__(self, cfg: PipelineConfig, stop: threading.Event, *, source: Optional[Source] = None,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None):
        self.cfg = cfg
        self.c = cfg.capture
        self.stop = stop
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        if source is None:
            try:
                source = open_source(self.c.source)
            except ImportError as exc:
                raise InvalidArgument(f"source {self.c.source!r} is not available: {exc}") from None
        self.source = source
        self.writer: Optional[Writer] = None
        self.metrics: Optional[Metrics] = None
        # counters (the metrics document)
        self.frames = 0          # committed
        self.lease_lost = 0      # loans refused: driver away or stream taken (driver model)
        self.paced_drops = 0     # read but dropped to hold the target rate
        self.flushed = 0         # stale frames discarded on Standby -> Alarmed
        self.timeouts = 0
        self.reconnects = 0
        self.transitions = 0
        self.mode = MODE_STANDBY
        self.target_fps = self.c.standby_fps
        self.device_paced = False
        self._window = (time.monotonic_ns(), 0)
        self.fps = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.metrics = Metrics(self.cfg.metrics_stream("capture"), **self._addr)
            while not self.stop.is_set():
                if not self._connect():
                    break
                try:
                    self._ensure_writer()
                    self._stream()
                except SourceGone as exc:
                    self.reconnects += 1
                    log.warning("source gone (%s); reconnecting every %gs", exc, self.c.reconnect_interval_s)
                    self._close_source()
                    self.stop.wait(self.c.reconnect_interval_s)
        finally:
            self._close_source()
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if self.metrics is not None:
                self.metrics.close()
            log.info("stopped: %d frames written, %d dropped for pacing, %d flushed, %d reconnects",
                     self.frames, self.paced_drops, self.flushed, self.reconnects)
        return 0

    def _connect(self) -> bool:
        """Opens the source, retrying until it works or we are stopped."""
        first = True
        while not self.stop.is_set():
            try:
                with abandon_on_stop(self.stop):  # a slow open (a camera, a test photo to scale) is cut short
                    self.source.open()
                log.info("source %s open: %s %s", self.c.source, tuple(self.source.shape), self.source.dtype)
                return True
            except StopRequested:
                return False
            except (SourceGone, OSError) as exc:
                if first:
                    log.warning("cannot open source %s (%s); retrying every %gs",
                                self.c.source, exc, self.c.reconnect_interval_s)
                    first = False
                self._publish_metrics(time.monotonic_ns(), force=True)
                self.stop.wait(self.c.reconnect_interval_s)
        return False

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as exc:  # noqa: BLE001 - a failing close must not mask the shutdown
            log.warning("closing the source failed: %s", exc)

    def _ensure_writer(self) -> None:
        shape, dtype = tuple(self.source.shape), self.source.dtype
        w = self.writer
        if w is not None and w.shape == shape and w.dtype == dtype:
            return
        if w is not None:
            log.info("source frame format changed to %s %s: recreating the stream", shape, dtype)
            w.close()
            self.writer = None
        self.writer = Writer(self.cfg.frames_stream, shape=shape, dtype=dtype, nslots=self.c.nslots,
                             driver=self.cfg.driver, **self._addr)
        log.info("writing stream %r: %s %s, %d slots", self.cfg.frames_stream, shape, dtype, self.c.nslots)

    # -- the frame loop -----------------------------------------------------------------

    def _apply_mode(self, mode: int, first: bool) -> None:
        fps = self.c.alarmed_fps if mode == MODE_ALARMED else self.c.standby_fps
        self.device_paced = bool(self.source.set_rate(fps))
        flushed = 0
        if mode == MODE_ALARMED and not first:
            flushed = self.source.flush(int(self.c.flush_max_age_ms * 1e6))
            self.flushed += flushed
        self.target_fps = fps
        if not first:
            self.transitions += 1
        log.info(
            "mode %s%s: %g fps (%s)%s",
            "" if first else f"{MODE_NAMES[self.mode]} -> ", MODE_NAMES[mode], fps,
            "source-paced" if self.device_paced else "paced by dropping",
            f", flushed {flushed} stale frame(s)" if mode == MODE_ALARMED and not first else "",
        )
        self.mode = mode

    def _stream(self) -> None:
        w, src, stop = self.writer, self.source, self.stop
        timeout = self.c.read_timeout_s
        debug = log.isEnabledFor(logging.DEBUG)
        self._apply_mode(self._read_mode(), first=True)
        next_due = 0
        stalled = False
        view = None
        while not stop.is_set():
            m = self._read_mode()
            if m != self.mode:
                self._apply_mode(m, first=False)
                next_due = 0  # the next fresh frame goes out at once
            try:
                if view is None:  # a slot kept from a read cut short by a mode flip is reused
                    view = w.loan()
            except LeaseLost as exc:
                # Driver model: the driver is away (restarting) or refused us the stream.
                # Keep the camera, retry; the writer re-attaches as soon as it can.
                self.lease_lost += 1
                if self.lease_lost == 1 or self.lease_lost % 100 == 0:
                    log.warning("cannot publish (%d tries so far): %s", self.lease_lost, exc)
                stop.wait(self.c.reconnect_interval_s)
                continue
            try:
                ts = self._read(view, timeout)
                if ts is None:
                    continue  # the mode flipped while we waited: apply it first
            except Timeout:
                self.timeouts += 1
                if not stalled:
                    log.warning("no frame from the source for %gs", timeout)
                    stalled = True
                w.heartbeat()
                self._publish_metrics(time.monotonic_ns())
                continue
            stalled = False
            if not self.device_paced:
                # Keep one frame per period on a fixed grid (long-run rate = target); a
                # tolerance of a tenth of a period absorbs the source's timestamp jitter.
                period = int(1e9 / self.target_fps)
                if ts < next_due - period // 10:
                    self.paced_drops += 1
                    continue
                next_due = next_due + period if ts - next_due < period else ts + period
            seq = w.commit(ts)
            view = None
            self.frames += 1
            if debug:
                log.debug("frame seq %d ts %d", seq, ts)
            now = time.monotonic_ns()
            self._publish_metrics(now)
            if not self.device_paced:
                # Sleep through the frames we would drop anyway; wake a little early so the
                # next due frame is read fresh rather than from a full driver queue.
                nap = (next_due - period // 10 - now) / 1e9 - 0.02
                if nap > 0:
                    self._nap(nap)

    # A waiting capture looks at the mode byte this often, so a Standby -> Alarmed flip takes
    # effect within it instead of after a whole standby period (up to 1/standby_fps).
    MODE_POLL_S = 0.02

    def _read_mode(self) -> int:
        """The mode the controller asks for. A driver-model writer between leases holds no
        control region: it keeps the mode it has until it is attached again."""
        try:
            return read_mode(self.writer)
        except LeaseLost:
            return self.mode

    def _mode_flipped(self) -> bool:
        return self._read_mode() != self.mode

    def _read(self, view, timeout: float) -> Optional[int]:
        """source.read_into in short slices: the frame's timestamp, or None when the mode
        flipped first (the view stays loaned for the next read). Timeout after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return self.source.read_into(view, max(0.001, min(left, self.MODE_POLL_S)))
            except Timeout:
                if self._mode_flipped() or self.stop.is_set():
                    return None
                if time.monotonic() >= deadline:
                    raise

    def _nap(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop.is_set() and not self._mode_flipped():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, self.MODE_POLL_S))

    def _publish_metrics(self, now: int, force: bool = False) -> None:
        m = self.metrics
        if m is None or not (force or m.due(now)):
            return
        t0, n0 = self._window
        if now - t0 >= 1_000_000_000 or force:
            self.fps = (self.frames - n0) * 1e9 / max(1, now - t0)
            self._window = (now, self.frames)
        doc = {
            "role": "capture", "stream": self.cfg.frames_stream, "source": self.c.source,
            "mode": MODE_NAMES[self.mode], "target_fps": self.target_fps, "fps": round(self.fps, 2),
            "source_paced": self.device_paced, "frames": self.frames, "paced_drops": self.paced_drops,
            "flushed": self.flushed, "timeouts": self.timeouts, "reconnects": self.reconnects,
            "transitions": self.transitions,
        }
        # Device-side counters (e.g. a GigE camera's lost frames) travel with the metrics
        # so `frameshm ls` shows them.
        stats = self.source.stats() if self.source is not None else {}
        if stats:
            doc["source_stats"] = stats
            if "lost" in stats:
                doc["lost"] = stats["lost"]
        m.publish(doc, now)


def run(cfg: PipelineConfig, stop: threading.Event, base_dir: Optional[str] = None,
        namespace: Optional[str] = None) -> int:
    return Capture(cfg, stop, base_dir=base_dir, namespace=namespace).run()
