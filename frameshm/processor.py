"""Processor: consume one stream, produce another, writing straight into the output pools.

    with frameshm.Processor(1001, 2001, out_shape=(540, 960), out_dtype="uint16",
                            driver="/run/frameshm/driver.sock") as p:
        for frame, out in p:            # out: a writable view into the output's next slot
            out[...] = frame.array[::2, ::2]
        # each output is committed when the loop asks for the next input (p.commit() to
        # keep the last one before a ``break``)

or ``p.run(fn)`` with ``fn(in_array, out_array)``. Every output frame carries the input
frame's capture timestamp and its seq as ``ref_seq``, so a consumer of the output can
trace each result to the frame it came from. An input frame the producer overwrote while
it was being processed (its slot reused: the seqlock check fails afterwards) is never
committed: the output slot is abandoned and counted in ``stats()["torn"]``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InvalidArgument, Timeout
from .stream import Frame, Reader, Writer

StreamRef = Union[str, int]


def _addr(ref: StreamRef, what: str) -> dict:
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise InvalidArgument(f"{what} must be a stream name (str) or stream id (int), not {ref!r}")
    return {"stream_id": ref} if isinstance(ref, int) else {"name": ref}


class Processor:
    """One input stream → one output stream (see the module docstring).

    ``latest=True`` (default) drains to the newest input frame (lossy: a slow processor
    skips frames, never falls behind); ``latest=False`` processes every frame in order
    (overruns counted in ``stats()["skipped"]``). ``out_shape``/``out_dtype`` fix the output
    layout, which makes ``out`` a zero-copy view; without them, ``run(fn)``'s ``fn`` returns
    an array that is published with one copy. Other keyword arguments go to the output
    :class:`Writer` (``nslots``, ``pools``, ``max_bytes``, ... when there is no driver).
    """

    def __init__(
        self,
        source: StreamRef,
        output: StreamRef,
        *,
        out_shape: Optional[Sequence[int]] = None,
        out_dtype="uint8",
        latest: bool = True,
        consumer: Optional[str] = None,
        driver: Optional[str] = None,
        base_dir: Optional[str] = None,
        namespace: Optional[str] = None,
        **writer_kwargs,
    ):
        src, dst = _addr(source, "source"), _addr(output, "output")
        common = {"base_dir": base_dir, "namespace": namespace, "driver": driver}
        if out_shape is None and driver is None and not ({"max_bytes", "pools"} & writer_kwargs.keys()):
            raise InvalidArgument("Processor needs out_shape, or max_bytes/pools for variable outputs "
                                  "(or a driver whose profile sets the pools)")
        self._writer = Writer(dst.pop("name", None), out_shape, out_dtype, **dst, **common, **writer_kwargs)
        try:
            self._reader = Reader(src.pop("name", None), consumer, **src, **common)
        except BaseException:
            self._writer.close()
            raise
        self._latest = latest
        self._fixed = out_shape is not None
        self._pending: Optional[Frame] = None
        self._processed = self._torn = self._skipped = 0

    # -- the loop -------------------------------------------------------------------

    def _next_input(self, timeout: Optional[float]) -> Frame:
        f = self._reader.wait_latest(timeout) if self._latest else self._reader.wait_next(timeout)
        self._skipped += f.skipped
        return f

    def _finish(self) -> None:
        """Commits the outstanding output unless its input was overwritten meanwhile."""
        f, self._pending = self._pending, None
        if f is None:
            return
        if not f.valid():
            self._torn += 1
            return  # the loaned slot stays in progress: readers never see it
        self._writer.commit(timestamp_ns=f.timestamp_ns, ref_seq=f.seq)
        self._processed += 1

    def next(self, timeout: Optional[float] = None) -> Tuple[Frame, np.ndarray]:
        """Commits the previous output, waits for the next input and loans its output slot."""
        if not self._fixed:
            raise InvalidArgument("next()/iteration needs out_shape; use run(fn) for variable outputs")
        self._finish()
        f = self._next_input(timeout)
        out = self._writer.loan()
        self._pending = f
        return f, out

    def __iter__(self) -> Iterator[Tuple[Frame, np.ndarray]]:
        while True:
            yield self.next()

    def commit(self) -> None:
        """Commits the current output now (iteration does it when it asks for the next
        input; call this before leaving a loop with ``break`` to keep the last one)."""
        self._finish()

    def skip(self) -> None:
        """Drops the current output (nothing is committed for this input)."""
        self._pending = None

    def run(
        self,
        fn: Callable[[np.ndarray, Optional[np.ndarray]], Optional[np.ndarray]],
        *,
        max_frames: Optional[int] = None,
        timeout: Optional[float] = None,
        idle_timeout: Optional[float] = None,
    ) -> dict:
        """Calls ``fn(in_array, out_array)`` per input frame (``out_array`` is None without
        out_shape: ``fn`` then returns the output array). ``fn`` returning ``False`` skips the
        frame. Stops after ``max_frames`` outputs, or when no input came for ``idle_timeout``
        seconds (``timeout`` is the per-frame wait; a Timeout ends the run only with
        ``idle_timeout`` set). Returns ``stats()``."""
        while max_frames is None or self._processed < max_frames:
            try:
                f = self._next_input(idle_timeout if idle_timeout is not None else timeout)
            except Timeout:
                if idle_timeout is not None:
                    break
                raise
            if self._fixed:
                out = self._writer.loan()
                self._pending = f
                if fn(f.array, out) is False:
                    self._pending = None
                    continue
                self._finish()
            else:
                res = fn(f.array, None)
                if res is False or res is None:
                    continue
                if not f.valid():
                    self._torn += 1
                    continue
                self._writer.publish(res, timestamp_ns=f.timestamp_ns, ref_seq=f.seq)
                self._processed += 1
        return self.stats()

    # -- state ----------------------------------------------------------------------

    def stats(self) -> dict:
        """processed (outputs committed), torn (inputs overwritten while processed, not
        committed), skipped (input frames never seen: lossy draining or overruns)."""
        return {"processed": self._processed, "torn": self._torn, "skipped": self._skipped}

    @property
    def reader(self) -> Reader:
        return self._reader

    @property
    def writer(self) -> Writer:
        return self._writer

    def close(self) -> None:
        """Closes both ends. An output still pending (loop left with ``break`` and no
        ``commit()``) is dropped: it may be half-written."""
        self._pending = None
        try:
            self._reader.close()
        finally:
            self._writer.close()

    def __enter__(self) -> "Processor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<frameshm.Processor {self._reader.name!r} -> {self._writer.name!r} {self.stats()}>"
