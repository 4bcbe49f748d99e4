"""A recording as a capture source (``replay:`` URIs): the pipeline runs on a recording
made by ``frameshm record`` as it would on the camera.

    replay:/data/run1?stream=cam0&speed=1&loop=1&from=5&to=65

``stream`` (required when the recording holds several fixed-shape streams) must hold
frames of one shape and dtype. Frames come out byte for byte as recorded, paced at
``speed`` (1: real time; ``max``: as fast as the capture producer asks) with timestamps
that keep the recorded spacing (see :mod:`frameshm.replay`); ``from``/``to`` select a span
in seconds after the recording's first frame; ``loop=1`` starts again at the end, otherwise
the source runs dry (``read_into`` raises Timeout, ``finished`` is True).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np

from ..errors import InvalidArgument, InvalidState, Timeout
from . import Source, check_params, register
from .media import _flag, _number

_KNOWN = ("stream", "speed", "loop", "from", "to")


class ReplaySource(Source):
    def __init__(self, path: str, params: Dict[str, str]):
        check_params("replay", params, _KNOWN)
        if not path:
            raise InvalidArgument("replay source needs the recording directory, e.g. 'replay:/data/run1'")
        self.path = path
        self.stream = params.get("stream") or None
        raw = params.get("speed") or "1"
        self.speed: Optional[float] = None if raw == "max" else _number("replay", {"speed": raw}, "speed", 1.0)
        self.loop = _flag("replay", params, "loop", False)
        self.start_s = _number("replay", params, "from", None) if params.get("from") not in (None, "", "0") else None
        self.end_s = _number("replay", params, "to", None)
        self.rec = None
        self.finished = False
        self.dtype = np.dtype(np.uint8)
        self.shape = ()

    def open(self) -> None:
        from ..recording import Recording

        if self.rec is not None:
            return
        rec = Recording(self.path)
        fixed = [n for n, s in rec.streams.items() if s.fixed is not None]
        name = self.stream
        if name is None:
            if len(fixed) != 1:
                rec.close()
                raise InvalidArgument(f"replay source: say which stream=, {self.path} holds {', '.join(rec.streams)}")
            name = fixed[0]
        s = rec.streams.get(name)
        if s is None or s.fixed is None:
            rec.close()
            raise InvalidArgument(f"replay source: {self.path} has no fixed-shape stream {name!r}")
        self.records = rec.records([name], self.start_s, self.end_s)
        if not self.records:
            rec.close()
            raise InvalidArgument(f"replay source: no frames of {name!r} in that span")
        self.rec = rec
        self.shape, self.dtype = s.fixed
        self._first = self.records[0].timestamp_ns
        gaps = np.diff([r.timestamp_ns for r in self.records[:64]])
        self._step = int(np.median(gaps)) if len(gaps) else 33_000_000
        self._origin = time.monotonic_ns()
        self._i = 0
        self.finished = False

    def read_into(self, out: np.ndarray, timeout: float) -> int:
        if self.rec is None:
            raise InvalidState("replay source is not open")
        if out.shape != tuple(self.shape) or out.dtype != self.dtype:
            raise InvalidArgument(f"replay source fills {self.shape} {self.dtype} buffers, got {out.shape} {out.dtype}")
        if self._i >= len(self.records):
            if not self.loop:
                self.finished = True
                time.sleep(min(timeout, 0.05))
                raise Timeout(f"replay source: {self.path} has ended")
            span = self.records[-1].timestamp_ns - self._first + self._step
            self._origin += int(span / self.speed) if self.speed else span
            self._i = 0
        r = self.records[self._i]
        offset = r.timestamp_ns - self._first
        if self.speed is not None:
            wait = (self._origin + int(offset / self.speed) - time.monotonic_ns()) / 1e9
            if wait > timeout:
                time.sleep(timeout)
                raise Timeout(f"replay source: next frame due in {wait:.3f}s")
            if wait > 0:
                time.sleep(wait)
        self.rec.read_into(r, out)
        self._i += 1
        return self._origin + offset

    def stats(self) -> Dict[str, int]:
        return {"position": self._i if self.rec is not None else 0}

    def close(self) -> None:
        rec, self.rec = self.rec, None
        if rec is not None:
            rec.close()


register("replay", ReplaySource)
