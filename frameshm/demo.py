"""`frameshm demo`: a live stream from a moving test pattern, read by two consumers in
separate processes (one drain-to-latest, one process-all), with live statistics."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import time

import numpy as np

STAMP = struct.Struct("<QQ")  # seq, capture ns: in the first 16 bytes of every frame


def pattern(seq: int, height: int, width: int) -> np.ndarray:
    """A moving diagonal gradient with the frame number and timestamp stamped in row 0."""
    y = np.arange(height, dtype=np.uint16)[:, None]
    x = np.arange(width, dtype=np.uint16)[None, :]
    base = ((x + y + 4 * seq) & 0xFF).astype(np.uint8)
    frame = np.stack([base, np.roll(base, seq % width, axis=1), 255 - base], axis=-1)
    return frame


def _producer(name, fps, height, width, stop):
    from . import Writer

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Writer(name, shape=(height, width, 3), dtype="uint8", nslots=8) as w:
        period = 1.0 / fps
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            view = w.loan()
            view[:] = pattern(i, height, width)
            ts = time.monotonic_ns()
            view.reshape(-1)[: STAMP.size] = np.frombuffer(STAMP.pack(i, ts), np.uint8)
            w.commit(timestamp_ns=ts)
            i += 1
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _consumer(name, latest, stats, stop):
    from . import Reader, Timeout

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Reader(name, consumer="demo-latest" if latest else "demo-all") as r:
        lat = []
        frames = skipped = bad = 0
        while not stop.is_set():
            try:
                f = r.wait_latest(0.5) if latest else r.wait_next(0.5)
            except Timeout:
                continue
            seq, ts = STAMP.unpack(f.array.reshape(-1)[: STAMP.size].tobytes())
            if not f.valid() or ts != f.timestamp_ns:
                bad += 1
                continue
            lat.append(time.monotonic_ns() - ts)
            frames += 1
            skipped += f.skipped
            if len(lat) >= 30:
                stats.put((latest, frames, skipped, bad, float(np.median(lat)) / 1e3))
                lat.clear()


def main(seconds: float = 0.0, fps: float = 30.0, width: int = 640, height: int = 480, name: str = "demo") -> int:
    from .admin import gc, list_streams

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    stats = ctx.Queue()
    procs = [ctx.Process(target=_producer, args=(name, fps, height, width, stop), daemon=True)]
    procs += [ctx.Process(target=_consumer, args=(name, latest, stats, stop), daemon=True) for latest in (True, False)]
    for p in procs:
        p.start()
    print(f"frameshm demo: stream '{name}' {width}x{height} RGB at {fps:g} fps; Ctrl-C to stop", flush=True)
    last = {}
    deadline = time.monotonic() + seconds if seconds > 0 else None
    try:
        next_ls = time.monotonic() + 2.0
        while deadline is None or time.monotonic() < deadline:
            try:
                latest, frames, skipped, bad, med_us = stats.get(timeout=0.25)
                last[latest] = (frames, skipped, bad, med_us)
            except Exception:  # queue.Empty
                pass
            if time.monotonic() >= next_ls:
                next_ls += 2.0
                for s in list_streams(sample_s=0.0):
                    if s.get("name") == name:
                        print(f"  stream {name}: producer {s['producer']}, frames {s['frames']}, "
                              f"consumers {len(s['consumers'])}", flush=True)
                for latest, (frames, skipped, bad, med_us) in sorted(last.items()):
                    kind = "latest" if latest else "all   "
                    print(f"  consumer {kind}: {frames} frames, skipped {skipped}, bad {bad}, "
                          f"median publish->view latency {med_us:.1f} us", flush=True)
            if not all(p.is_alive() for p in procs):
                print("a demo process exited unexpectedly", flush=True)
                return 1
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
        gc()
    return 0 if all(v[2] == 0 for v in last.values()) and len(last) == 2 else 1
