"""Stream inspection and cleanup behind `frameshm ls` and `frameshm gc`."""

from __future__ import annotations

import os
import time
from typing import List, Optional

from . import _core
from .errors import CorruptStream, FrameshmError, StreamNotFound


def stream_info(name: Optional[str] = None, *, stream_id: int = 0, base_dir: Optional[str] = None,
                namespace: Optional[str] = None) -> dict:
    """A snapshot of a stream's control region (producer, counters, consumers)."""
    return _core.stream_info(name, stream_id=stream_id, base_dir=base_dir, namespace=namespace)


def _stream_ids(base_dir: Optional[str], namespace: Optional[str]) -> List[int]:
    try:
        ns_dir = _core.namespace_dir(base_dir, namespace)
    except StreamNotFound:  # no base directory yet: no streams either
        return []
    try:
        entries = os.listdir(ns_dir)
    except FileNotFoundError:
        return []
    return sorted(int(e) for e in entries if e.isdigit() and 0 < int(e) < 2**32)


def list_streams(base_dir: Optional[str] = None, namespace: Optional[str] = None,
                 sample_s: float = 0.0) -> List[dict]:
    """Every stream in the namespace. With sample_s > 0, also measures fps over that time.

    A stream whose control region fails validation is listed with an ``error`` key."""
    out = []
    for sid in _stream_ids(base_dir, namespace):
        try:
            out.append(stream_info(stream_id=sid, base_dir=base_dir, namespace=namespace))
        except StreamNotFound:
            continue
        except (CorruptStream, FrameshmError) as exc:
            out.append({"stream_id": sid, "name": "?", "error": str(exc)})
    if sample_s > 0 and out:
        t0 = time.monotonic()
        time.sleep(sample_s)
        for info in out:
            if "error" in info:
                continue
            try:
                later = stream_info(stream_id=info["stream_id"], base_dir=base_dir, namespace=namespace)
            except FrameshmError:
                continue
            dt = time.monotonic() - t0
            info["fps"] = (later["frames"] - info["frames"]) / dt if dt > 0 else 0.0
    return out


def gc_report(base_dir: Optional[str] = None, namespace: Optional[str] = None, *,
              dry_run: bool = False) -> dict:
    """What `frameshm gc` does, as a report: every stream of the namespace is removed if
    its producer is dead, closed or never came and no live consumer uses it (a driver's
    streams also need their driver gone); dead consumers are taken out of every stream's
    consumer table with their message queues; then the queues of dead consumers that no
    table names any more (their stream was removed, or they were left by a crash) are
    unlinked, for this user, system-wide. ``dry_run``: the same report, nothing removed.

    Returns ``{"streams": [...], "queues": [...], "queues_not_listed": n,
    "queue_error": None or why queues could not be listed, "dry_run": bool}``: one entry
    per stream (``stream_id``, ``name``, ``removed``, ``reason``, ``producer``,
    ``producer_pid``, ``live_consumers``, ``queues``: the dead consumers pruned from its
    table, each ``{"queue", "pid", "stream_id", "consumer"}``), and the queues of no
    table."""
    streams = []
    for sid in _stream_ids(base_dir, namespace):
        try:
            r = _core.stream_gc_report(stream_id=sid, base_dir=base_dir, namespace=namespace, dry_run=dry_run)
        except FrameshmError as exc:
            streams.append({"stream_id": sid, "name": "", "removed": False, "reason": "error",
                            "error": exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc),
                            "queues": []})
            continue
        if r["reason"] != "no stream":  # removed meanwhile by its own processes
            streams.append(r)
    report = {"dry_run": dry_run, "streams": streams, "queues": [], "queues_not_listed": 0,
              "queue_error": None}
    try:
        queues, total = _core.queue_gc(dry_run=dry_run)
    except FrameshmError as exc:
        report["queue_error"] = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    else:
        # A dry run lists the queues that the stream pass would have unlinked too: they
        # belong under their stream.
        pruned = {q["queue"] for s in streams for q in s["queues"]}
        report["queues"] = [q for q in queues if q["queue"] not in pruned]
        report["queues_not_listed"] = total - len(queues)
    return report


def gc(base_dir: Optional[str] = None, namespace: Optional[str] = None, *, dry_run: bool = False) -> List[int]:
    """Removes streams whose producer is dead or gone and that no live consumer uses;
    unlinks dead consumers' queues everywhere (see :func:`gc_report`). Returns the stream
    ids removed (``dry_run``: that would be, removing nothing)."""
    return [s["stream_id"] for s in gc_report(base_dir, namespace, dry_run=dry_run)["streams"] if s["removed"]]
