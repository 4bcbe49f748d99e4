"""Writer, Reader and Frame: the numpy face of the C core."""

from __future__ import annotations

import operator
import time
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .errors import InvalidArgument, Overrun, Timeout

# numpy dtype <-> wire spec Dtype enum (the codes are the C library's).
_DTYPE_CODES = {
    np.dtype(np.uint8): _core.DTYPE_UINT8,
    np.dtype(np.int8): _core.DTYPE_INT8,
    np.dtype(np.uint16): _core.DTYPE_UINT16,
    np.dtype(np.int16): _core.DTYPE_INT16,
    np.dtype(np.uint32): _core.DTYPE_UINT32,
    np.dtype(np.int32): _core.DTYPE_INT32,
    np.dtype(np.uint64): _core.DTYPE_UINT64,
    np.dtype(np.int64): _core.DTYPE_INT64,
    np.dtype(np.float32): _core.DTYPE_FLOAT32,
    np.dtype(np.float64): _core.DTYPE_FLOAT64,
    np.dtype(np.bool_): _core.DTYPE_BOOLEAN,
}
_CODE_DTYPES = {code: dt for dt, code in _DTYPE_CODES.items()}
_CODE_DTYPES[_core.DTYPE_BYTES] = np.dtype(np.uint8)  # opaque bytes: read as uint8
# The Reader's table: a frame's dtype is _DTYPE_TABLE[its code], looked up in C.
_DTYPE_TABLE = tuple(_CODE_DTYPES.get(code) for code in range(max(_CODE_DTYPES) + 1))

DTypeLike = Union[str, type, np.dtype]


def _dtype(dtype: DTypeLike) -> Tuple[np.dtype, int]:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidArgument(f"not a dtype: {dtype!r}") from exc
    code = _DTYPE_CODES.get(dt.newbyteorder("=")) if dt.byteorder in "=|<" else None
    if code is None:
        names = ", ".join(sorted(str(d) for d in _DTYPE_CODES))
        raise InvalidArgument(f"dtype {dt} is not supported by the wire format; use one of {names}")
    return dt.newbyteorder("="), code


def _shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"shape must be a tuple of ints, not {shape!r}") from exc
    if not 1 <= len(out) <= _core.MAX_DIMS:
        raise InvalidArgument(f"shape {out} must have 1 to {_core.MAX_DIMS} dimensions")
    if any(s < 0 or s > 2**31 - 1 for s in out):
        raise InvalidArgument(f"shape {out} has a dimension outside 0..2^31-1")
    return out


def _fill_threads(n) -> int:
    try:
        value = operator.index(n) if not isinstance(n, bool) else None
    except TypeError:
        value = None
    if value is None or not 0 <= value <= _core.MAX_FILL_THREADS:
        raise InvalidArgument(f"fill_threads must be an integer from 0 to {_core.MAX_FILL_THREADS}, not {n!r}")
    return value


class Writer:
    """Producer of a stream: creates (or re-attaches to) the stream and publishes frames.

    ``Writer("cam0", shape=(1080, 1920, 3), dtype="uint8", nslots=4)`` creates a stream of
    fixed-shape frames. Without ``shape``, pass ``max_bytes`` (or ``pools``) and publish
    arrays of any shape and supported dtype that fit.

    With ``driver="/run/frameshm/driver.sock"`` (and a ``stream_id``) the stream's files
    belong to a ``frameshm driver``: the writer attaches a producer lease, maps the regions
    the driver created (its profile decides ``nslots`` and the pools; ``nslots``/``pools``/
    ``max_bytes``/``file_mode`` are then ignored), keeps the lease alive from a background
    thread and re-attaches by itself when the driver revokes it or restarts — raising
    :class:`LeaseLost` only if that fails. ``publish_mode="require_existing"`` refuses a
    stream the driver has not provisioned.

    ``fill_threads=N`` (2 to 8) lets ``publish()`` copy frames of 1 MiB and more with N
    threads: the caller and N - 1 helper threads the writer starts at its first such
    publish and ends at ``close()``. A 1080p RGB frame then takes ~140-150 us instead of
    ~220 on a 2-vCPU EPYC guest, for ~30 % more CPU; but where no CPU is spare for the
    helper (a consumer or another busy process on the other cores) it is slower. The default, 0,
    copies in the calling thread alone. ``loan()`` fills are the application's and never
    use the helpers.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        shape: Optional[Sequence[int]] = None,
        dtype: DTypeLike = "uint8",
        nslots: int = 4,
        *,
        stream_id: int = 0,
        max_bytes: Optional[int] = None,
        pools: Optional[Sequence[int]] = None,
        base_dir: Optional[str] = None,
        namespace: Optional[str] = None,
        file_mode: int = 0o600,
        unlink_on_close: bool = True,
        driver: Optional[str] = None,
        publish_mode: Optional[str] = None,
        client_id: int = 0,
        fill_threads: int = 0,
    ):
        self._dtype, self._code = _dtype(dtype)
        if shape is not None:
            self._shape = _shape(shape)
            self._nbytes = int(np.prod(self._shape, dtype=np.int64)) * self._dtype.itemsize
        elif max_bytes is None and not pools and driver is not None:
            self._shape = None  # variable tensors in whatever pools the driver gives
            self._nbytes = None
        elif max_bytes is None and not pools:
            raise InvalidArgument("Writer needs a frame shape, or max_bytes/pools for variable tensors")
        else:
            self._shape = None
            self._nbytes = None
        sizes = list(pools or [])
        if max_bytes is not None:
            sizes.append(int(max_bytes))
        if self._nbytes is not None and not any(s >= self._nbytes for s in sizes):
            sizes.append(max(self._nbytes, 1))
        if not sizes:  # driver mode: the driver's profile decides
            sizes = [1]
        if not isinstance(nslots, int) or nslots < 1 or nslots & (nslots - 1):
            raise InvalidArgument(f"nslots must be a power of two >= 1, not {nslots!r}")
        fill_threads = _fill_threads(fill_threads)
        self._w = _core.Writer(
            name,
            stream_id=stream_id,
            nslots=nslots,
            pools=sizes,
            base_dir=base_dir,
            namespace=namespace,
            file_mode=file_mode,
            driver=driver,
            publish_mode=publish_mode,
            client_id=client_id,
            fill_threads=fill_threads,
        )
        self.driver = driver
        self.name = name if name is not None else f"stream-{self._w.stream_id}"
        if driver is not None and self._nbytes is not None:
            largest = max(stride for _pid, stride in self._w.pool_info())
            if self._nbytes > largest:
                sid = self._w.stream_id
                self._w.close()
                raise InvalidArgument(
                    f"frames of {self._nbytes} bytes do not fit stream {sid}: the "
                    f"driver's profile has no pool larger than {largest} bytes"
                )
        self._maps = self._w.mappings
        self._gen = None
        self._unlink = unlink_on_close
        if self._shape is not None:
            # Also the current layout; loan() of it is one C call (_core.Writer.loan_array).
            self._w.set_layout(np.ndarray, self._code, self._shape, self._dtype)
        self._tensor_is_default = self._shape is not None

    # -- publishing -----------------------------------------------------------------

    def _set_layout(self, shape, dt, code):
        if self._shape is not None:
            if shape != self._shape or dt != self._dtype:
                raise InvalidArgument(
                    f"stream '{self.name}' carries {self._shape} {self._dtype} frames, "
                    f"got {shape} {dt}; create the Writer without shape= for variable tensors"
                )
            if not self._tensor_is_default:
                self._w.set_tensor(self._code, self._shape)
                self._tensor_is_default = True
            return
        self._w.set_tensor(code, shape)
        self._tensor_is_default = False

    def loan(self, shape: Optional[Sequence[int]] = None, dtype: Optional[DTypeLike] = None) -> np.ndarray:
        """A writable numpy view into the next slot (zero copy). Fill it, then commit().

        For a frame that already exists as an array, ``publish()`` is the faster copy: it
        writes around the caches (the slot was last written ``nslots`` frames ago), while
        ``view[:] = frame`` first reads every line of the slot in."""
        if shape is None and dtype is None and self._shape is not None:
            self._tensor_is_default = True   # loan_array() makes the fixed layout current
            return self._w.loan_array()
        if shape is None:
            raise InvalidArgument("loan() on a variable-tensor stream needs a shape")
        shp = _shape(shape)
        dt, code = _dtype(dtype if dtype is not None else self._dtype)
        self._set_layout(shp, dt, code)
        nbytes = int(np.prod(shp, dtype=np.int64)) * dt.itemsize
        pool, off, _seq, gen = self._w.loan(nbytes)
        if gen != self._gen:  # re-attached through the driver: the pools moved
            self._maps, self._gen = self._w.mappings, gen
        return np.ndarray(shp, dt, buffer=self._maps[pool], offset=off)

    def commit(self, timestamp_ns: Optional[int] = None, ref_seq: Optional[int] = None) -> int:
        """Commits the loaned slot and sends its descriptor to every consumer. Returns its seq.

        ``timestamp_ns``: capture time (CLOCK_MONOTONIC, as ``time.monotonic_ns()``);
        default: now. ``ref_seq``: seq of the frame (of another stream) this one was
        derived from, readable as ``Frame.ref_seq``."""
        return self._w.commit(timestamp_ns, ref_seq)

    def publish(self, frame, timestamp_ns: Optional[int] = None, ref_seq: Optional[int] = None, *,
                seq: Optional[int] = None) -> int:
        """Copies ``frame`` into the next slot and commits it (one copy). Returns its seq.

        ``seq``: number this frame ``seq`` instead of the next in line (forward only, else
        InvalidArgument): a relay such as :class:`frameshm.Bridge` keeps its source's
        numbering, and consumers count the gap as skipped frames."""
        if seq is None and type(frame) is np.ndarray:
            # An array of the layout set last goes straight through (the C side checks
            # dtype, shape and contiguity); anything else takes the checks below.
            done = self._w.publish_exact(frame, timestamp_ns, ref_seq)
            if done is not None:
                return done
        arr = np.asarray(frame)
        dt = arr.dtype
        if dt.byteorder == ">":
            raise InvalidArgument("big-endian arrays are not supported; use arr.astype(arr.dtype.newbyteorder('<'))")
        if self._shape is not None and arr.dtype == self._dtype and arr.shape == self._shape:
            if not self._tensor_is_default:
                self._w.set_tensor(self._code, self._shape)
                self._tensor_is_default = True
        else:
            if arr.ndim == 0:
                arr = arr.reshape(1)
            dt, code = _dtype(arr.dtype)
            self._set_layout(_shape(arr.shape), dt, code)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        if seq is not None:
            self._w.skip_to(seq)
        return self._w.publish(arr, timestamp_ns or 0, ref_seq)

    # -- state ------------------------------------------------------------------------

    def control(self, index: int) -> int:
        """Control byte ``index`` (0..7) of the stream: a few bytes the transport carries
        for the application without interpreting them, shared by the writer and every
        reader of the stream (e.g. a controller steering this producer's frame rate).
        Each starts at 0 and survives producer restarts."""
        return self._w.control(index)

    def set_control(self, index: int, value: int) -> None:
        """Sets control byte ``index`` (0..7) to ``value`` (0..255)."""
        self._w.set_control(index, value)

    @property
    def mode(self) -> int:
        """Control byte 0 (kept for compatibility: the pipeline keeps its Standby /
        Alarmed mode there, see :mod:`frameshm.roles.mode`)."""
        return self._w.control(0)

    @mode.setter
    def mode(self, value: int) -> None:
        self._w.set_control(0, value)

    @property
    def epoch(self) -> int:
        return self._w.epoch

    @property
    def stream_id(self) -> int:
        return self._w.stream_id

    @property
    def lease_id(self) -> int:
        """The driver's lease id (changes when the writer re-attached); 0 without a driver."""
        return self._w.lease_id

    @property
    def nslots(self) -> int:
        return self._w.nslots

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def pools(self):
        """[(pool_id, stride_bytes), ...] smallest first."""
        return self._w.pool_info()

    @property
    def closed(self) -> bool:
        return self._w.closed

    def heartbeat(self) -> None:
        """Refreshes the control region's activity time (``frameshm ls`` idle time). The
        spec's liveness field, the superblocks' ``activity_timestamp_ns``, is refreshed
        every 0.5 s by the library whether or not this is called."""
        self._w.heartbeat()

    def close(self, unlink: Optional[bool] = None) -> None:
        """Closes the stream. Loaned views stay valid memory until dropped."""
        self._maps = ()
        self._w.close(unlink=self._unlink if unlink is None else unlink)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"epoch={self.epoch}"
        return f"<frameshm.Writer {self.name!r} shape={self._shape} dtype={self._dtype} {state}>"


class Frame(_core.Frame):
    """One frame read from a stream: metadata plus a zero-copy, read-only numpy view.

    The view aliases shared memory that the producer will overwrite after ``nslots``
    newer frames; :meth:`valid` tells whether it still holds this frame. Use
    :meth:`copy` (or ``Reader.read_latest(copy=True)``) for data guaranteed untorn.

    Readers create frames (the metadata attributes, ``array`` and ``valid()`` are the C
    type's); a frame keeps the memory of its view mapped for as long as it or the view
    lives. ``array`` is a view of an array the Reader keeps per slot, so a frame builds
    no array of its own.

    A frame is also a read-only buffer over the same bytes (``memoryview(frame)``,
    ``struct.unpack_from(fmt, frame)``, ``bytes(frame)``, ``sock.send(frame)``): the
    cheapest way to read a small message, with no array at all.
    """

    __slots__ = ()

    def copy(self) -> np.ndarray:
        """A private copy, checked untorn; raises Overrun if the slot was overwritten."""
        out = np.array(self.array, copy=True)
        if not self.valid():
            raise Overrun(f"frame {self.seq} was overwritten while being copied")
        return out

    @property
    def latency_ns(self) -> int:
        """Now minus the frame's capture timestamp (CLOCK_MONOTONIC)."""
        return time.monotonic_ns() - self.timestamp_ns

    def __array__(self, dtype=None, copy=None):
        a = self.array
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        if copy:
            return a.copy()
        return a

    def _repr_png_(self):
        """Jupyter shows a uint8 image frame ((H, W), (H, W, 1|3|4)) as a lossless PNG of a
        checked copy; other frames (tensors) as their repr."""
        a = self.array
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
            return None
        try:
            data = self.copy()
        except Overrun:
            return None
        from .notebook import encode_png

        return encode_png(data)

    def __repr__(self) -> str:
        return f"<frameshm.Frame seq={self.seq} shape={self.shape} dtype={self.dtype} skipped={self.skipped}>"


class Reader:
    """Consumer of a stream. May be created before or after the stream's Writer.

    Each Reader registers its own descriptor queue with the producer (fan-out).
    With ``spin=True`` (default) a reader of a steady stream polls for a short window
    just before the next frame is due instead of sleeping through a wake-up: lower
    latency for a few percent of a core. A window that opens on the CPU the producer is
    filling the frame on first moves the reader's thread to another CPU it may run on
    (its affinity stays as it was); it does not spin while the stream's consumers and
    producer outnumber its CPUs. While the waiting thread is the interpreter's only
    one, each window first builds the previous frame's ``Frame`` and ``array`` again
    and drops them, so the path the new frame takes is warm (tens of microseconds on a
    shared host). On a fast stream (a message every 50 µs or less) a reader that has
    caught up polls for at most 20 µs before it sleeps: a sleep there costs it a futex
    wait and the producer a wake-up call per burst, or per reply when two processes
    exchange requests and replies. ``spin=False`` always sleeps.
    ``subscribe=False`` opens a passive handle: no queue and no consumer entry (so it
    costs the producer nothing and uses no system queue); it can ``read_latest()`` and
    get/set the control bytes but not wait.
    ``max_rate_hz`` asks the producer for at most that many frames per second for this
    consumer (e.g. a GUI preview); other consumers of the stream still get every frame.
    ``driver=<socket>`` attaches through a ``frameshm driver`` (consumer lease, kept alive
    in the background): when the lease ends or the driver restarts the reader stops using
    the old regions and re-attaches by itself; with ``lease_events=True`` it raises
    :class:`LeaseLost` once instead, then re-attaches on the next call.
    ``foreign=True`` reads a stream another implementation of the wire spec writes (no
    frameshm control region): the newest epoch is found from the directory layout and
    superblocks, frames by following the header ring (polling, at most ~2 ms behind), and
    ``producer`` comes from the superblock's activity time. No control bytes, no
    registration (docs/wire-format.md §9).
    Every reader takes its frames from the header ring by seq, with no system call per
    frame on either side while it keeps up; one that has caught up raises a doorbell in its
    consumer entry and sleeps on the newest seq's futex, and the producer wakes all such
    sleepers with one system call (on its message queue instead, with a descriptor, when
    the producer is an older frameshm). A reader with ``max_rate_hz`` gets a descriptor
    per frame of its share instead. ``queue=False`` registers without a descriptor queue:
    the same, and it uses none of the system's message queues. ``wait_next`` with the frame read as a buffer
    (``struct.unpack_from(fmt, frame)``) is the fastest way to take many small messages
    (docs/benchmarks.md §11).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        consumer: Optional[str] = None,
        *,
        stream_id: int = 0,
        base_dir: Optional[str] = None,
        namespace: Optional[str] = None,
        spin: bool = True,
        subscribe: bool = True,
        max_rate_hz: int = 0,
        driver: Optional[str] = None,
        publish_mode: Optional[str] = None,
        client_id: int = 0,
        lease_events: bool = False,
        foreign: bool = False,
        queue: bool = True,
    ):
        self._r = _core.Reader(
            name,
            stream_id=stream_id,
            consumer=consumer,
            base_dir=base_dir,
            namespace=namespace,
            spin=spin,
            subscribe=subscribe,
            max_rate_hz=max_rate_hz,
            driver=driver,
            publish_mode=publish_mode,
            client_id=client_id,
            lease_events=lease_events,
            frame_type=Frame,
            dtypes=_DTYPE_TABLE,
            foreign=foreign,
            array_type=np.ndarray,
            queue=queue,
        )
        self.driver = driver
        self.name = name if name is not None else f"stream-{self._r.stream_id}"
        self.consumer = consumer

    def wait_latest(self, timeout: Optional[float] = None) -> Frame:
        """Blocks for a frame newer than the last one returned and returns the newest
        committed one. ``frame.skipped`` counts frames passed over."""
        return self._r.wait_latest(timeout)

    def wait_next(self, timeout: Optional[float] = None) -> Frame:
        """Process-all: the next frame in order. ``frame.skipped`` counts frames lost
        (the producer lapped this consumer: the ring no longer held them)."""
        return self._r.wait_next(timeout)

    def read_latest(self, copy: bool = True):
        """The newest frame without waiting, or None if there is none yet.

        With ``copy=True`` (default) a private ndarray guaranteed untorn; with
        ``copy=False`` a :class:`Frame` view (check ``valid()`` after use)."""
        if not copy:
            return self._r.peek_latest()
        f = self._r.read_copy()  # a frame over its private, writable copy
        return None if f is None else f.array

    def frames(self, latest: bool = True, timeout: Optional[float] = None) -> Iterator[Frame]:
        """Iterates frames (drain-to-latest by default) until the timeout expires."""
        wait = self.wait_latest if latest else self.wait_next
        while True:
            try:
                yield wait(timeout)
            except Timeout:
                return

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    @property
    def producer(self) -> Tuple[str, int]:
        """("none" | "alive" | "dead" | "closed", pid)."""
        return self._r.producer()

    @property
    def producer_alive(self) -> bool:
        return self._r.producer()[0] == "alive"

    def control(self, index: int) -> int:
        """Control byte ``index`` (0..7) of the stream (see :meth:`Writer.control`), read
        from the stream's current control region."""
        return self._r.control(index)

    def set_control(self, index: int, value: int) -> None:
        """Sets control byte ``index`` (0..7) to ``value`` (0..255); a stream removed and
        created anew is followed first, so the write reaches its new control region. Under
        a driver's sealed transport (``transport = "memfd"``) the driver sets it for us, if
        its ``control_uids`` name our user (else :class:`DriverRejected`)."""
        self._r.set_control(index, value)

    @property
    def mode(self) -> int:
        """Control byte 0 (kept for compatibility, as :attr:`Writer.mode`)."""
        return self._r.control(0)

    @mode.setter
    def mode(self, value: int) -> None:
        self._r.set_control(0, value)

    @property
    def epoch(self) -> int:
        return self._r.epoch

    @property
    def stream_id(self) -> int:
        return self._r.stream_id

    @property
    def overruns(self) -> int:
        """Frames lost by wait_next() so far."""
        return self._r.overruns

    @property
    def drops(self) -> int:
        """Frames dropped because their header failed validation."""
        return self._r.drops

    @property
    def closed(self) -> bool:
        return self._r.closed

    def close(self) -> None:
        """Unregisters and removes this reader's queue. Frames' views stay usable memory."""
        self._r.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<frameshm.Reader {self.name!r} consumer={self.consumer!r}{' closed' if self.closed else ''}>"
