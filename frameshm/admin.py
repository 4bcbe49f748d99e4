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


def gc(base_dir: Optional[str] = None, namespace: Optional[str] = None) -> List[int]:
    """Removes streams whose producer is dead or gone and that no live consumer uses;
    unlinks dead consumers' queues everywhere. Returns the stream ids removed."""
    removed = []
    for sid in _stream_ids(base_dir, namespace):
        try:
            if _core.stream_gc(stream_id=sid, base_dir=base_dir, namespace=namespace):
                removed.append(sid)
        except FrameshmError:
            continue
    return removed
