"""Inference: drain-to-latest detection on the frames stream.

Each round blocks on the frames queue, drains every pending descriptor and runs the
detector on the newest frame only; the frames passed over are counted as skipped. So
however slow the model, its input is at most one inference time old: latency stays
bounded and the skipped count grows instead of a backlog.

Detections go out as a stream of their own (default ``<frames>.detections``): one
float32 ``(N, 6)`` tensor ``[x1, y1, x2, y2, score, class]`` per processed frame, N in
the tensor header (0 rows = nothing seen), carrying the source frame's capture
timestamp and its seq (``Frame.ref_seq``). The controller consumes it (process-all).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np

from .._signals import StopRequested, abandon_on_stop
from ..config import PipelineConfig
from ..detectors import DetectorError, as_detections, load_detector
from ..errors import LeaseLost, ProducerDead, Timeout
from ..stream import Reader, Writer
from . import Metrics

log = logging.getLogger("frameshm.inference")

WAIT_S = 0.25          # bounded waits: the stop flag is checked at least this often
ERROR_LOG_EVERY_S = 10.0


class _Stat:
    """Running mean / max over the metrics window, plus the last value (ms)."""

    __slots__ = ("n", "total", "peak", "last")

    def __init__(self):
        self.n = 0
        self.total = 0.0
        self.peak = 0.0
        self.last = 0.0

    def add(self, v: float) -> None:
        self.n += 1
        self.total += v
        self.last = v
        if v > self.peak:
            self.peak = v

    def snapshot(self) -> dict:
        out = {"last": round(self.last, 3), "mean": round(self.total / self.n, 3) if self.n else 0.0,
               "max": round(self.peak, 3)}
        self.n, self.total, self.peak = 0, 0.0, 0.0
        return out


class Inference:
    def __init__(self, cfg: PipelineConfig, stop: threading.Event, *, detector=None,
                 base_dir: Optional[str] = None, namespace: Optional[str] = None):
        self.cfg = cfg
        self.c = cfg.inference
        self.stop = stop
        self._addr = dict(base_dir=base_dir, namespace=namespace)
        # Loading first: a bad module:callable fails before any stream is touched.
        self.detector = detector if detector is not None else load_detector(self.c.detector, self.c.detector_params)
        # "auto" is reported with what it chose (the built-ins carry their config name)
        chosen = getattr(self.detector, "name", None)
        auto = self.c.detector == "auto" and isinstance(chosen, str)
        self.detector_label = f"auto:{chosen}" if auto else self.c.detector
        self.processed = 0
        self.lease_lost = 0
        self.skipped = 0
        self.torn = 0
        self.errors = 0
        self.truncated = 0
        self.infer_ms = _Stat()
        self.latency_ms = _Stat()
        self._window = (time.monotonic_ns(), 0, 0)
        self._buf: Optional[np.ndarray] = None

    def _input(self, f) -> Optional[np.ndarray]:
        """The frame the detector gets: a private copy (default), or the zero-copy view."""
        if not self.c.copy_input:
            return f.array
        src = f.array
        buf = self._buf
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self._buf = np.empty(src.shape, src.dtype)
        np.copyto(buf, src)
        if not f.valid():
            return None  # overwritten while copying: torn
        return buf

    def run(self) -> int:
        c = self.c
        reader = writer = metrics = None
        last_error_log = 0.0
        producer_gone = False
        try:
            metrics = Metrics(self.cfg.metrics_stream("inference"), **self._addr)
            writer = Writer(self.cfg.detections_stream, dtype="float32", max_bytes=c.max_detections * 24,
                            nslots=c.nslots, driver=self.cfg.driver, **self._addr)
            reader = Reader(self.cfg.frames_stream, consumer=c.consumer, spin=False, driver=self.cfg.driver,
                            **self._addr)
            log.info("detector %s: %r; %r -> %r", self.detector_label, self.detector, self.cfg.frames_stream,
                     self.cfg.detections_stream)
            debug = log.isEnabledFor(logging.DEBUG)
            abandonable = abandon_on_stop(self.stop)
            while not self.stop.is_set():
                try:
                    with abandonable:  # a stop ends the wait at once, not at its timeout
                        f = reader.wait_latest(WAIT_S)
                except StopRequested:
                    break
                except Timeout as exc:
                    if isinstance(exc, ProducerDead) and not producer_gone:
                        log.warning("%s", exc)
                        producer_gone = True
                    writer.heartbeat()
                    self._publish_metrics(metrics, time.monotonic_ns())
                    continue
                if producer_gone:
                    log.info("frames flowing again")
                    producer_gone = False
                self.skipped += f.skipped
                img = self._input(f)
                if img is None:
                    self.torn += 1
                    continue
                t0 = time.perf_counter_ns()
                try:
                    with abandonable:  # a stop does not wait for a slow model
                        raw = self.detector(img)
                except StopRequested:
                    break
                except DetectorError:
                    raise
                except Exception:  # noqa: BLE001 - a model failing on one frame must not stop the sentry
                    self.errors += 1
                    now = time.monotonic()
                    if now - last_error_log >= ERROR_LOG_EVERY_S:
                        last_error_log = now
                        log.exception("detector failed on frame %d (%d failures so far)", f.seq, self.errors)
                    continue
                t1 = time.perf_counter_ns()
                if not c.copy_input and not f.valid():
                    self.torn += 1  # the producer lapped the view during inference
                    continue
                dets = as_detections(raw)
                if dets.shape[0] > c.max_detections:
                    if not self.truncated:
                        log.warning("detector returned %d boxes; keeping the %d best (max_detections)",
                                    dets.shape[0], c.max_detections)
                    self.truncated += 1
                    dets = as_detections(dets, c.max_detections)
                try:
                    writer.publish(dets, timestamp_ns=f.timestamp_ns, ref_seq=f.seq)
                except LeaseLost as exc:
                    # The driver is away or gave the stream to someone else: drop these
                    # detections and try again with the next frame (the writer re-attaches).
                    self.lease_lost += 1
                    if self.lease_lost == 1 or self.lease_lost % 100 == 0:
                        log.warning("detections not published (%d so far): %s", self.lease_lost, exc)
                    continue
                now = time.monotonic_ns()
                self.processed += 1
                self.infer_ms.add((t1 - t0) / 1e6)
                self.latency_ms.add((now - f.timestamp_ns) / 1e6)
                if debug:
                    log.debug("frame %d: %d detection(s) in %.1f ms, skipped %d", f.seq, dets.shape[0],
                              (t1 - t0) / 1e6, f.skipped)
                self._publish_metrics(metrics, now)
        finally:
            closer = getattr(self.detector, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001
                    log.warning("detector close() failed: %s", exc)
            for obj in (reader, writer, metrics):
                if obj is not None:
                    obj.close()
            log.info("stopped: %d frames processed, %d skipped, %d torn, %d detector errors",
                     self.processed, self.skipped, self.torn, self.errors)
        return 0

    def _publish_metrics(self, metrics: Optional[Metrics], now: int) -> None:
        if metrics is None or not metrics.due(now):
            return
        t0, p0, s0 = self._window
        dt = max(1, now - t0) / 1e9
        self._window = (now, self.processed, self.skipped)
        metrics.publish({
            "role": "inference", "frames": self.cfg.frames_stream, "detections": self.cfg.detections_stream,
            "detector": self.detector_label, "processed": self.processed, "skipped": self.skipped,
            "torn": self.torn, "errors": self.errors, "truncated": self.truncated,
            "fps": round((self.processed - p0) / dt, 2), "skipped_per_s": round((self.skipped - s0) / dt, 2),
            "infer_ms": self.infer_ms.snapshot(), "latency_ms": self.latency_ms.snapshot(),
        }, now)


def run(cfg: PipelineConfig, stop: threading.Event, base_dir: Optional[str] = None,
        namespace: Optional[str] = None) -> int:
    try:
        with abandon_on_stop(stop):  # loading a model can take seconds: a stop does not wait for it
            inference = Inference(cfg, stop, base_dir=base_dir, namespace=namespace)
    except StopRequested:
        log.info("stopped while loading the detector")
        return 0
    return inference.run()
