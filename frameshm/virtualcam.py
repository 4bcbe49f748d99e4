"""frameshm.VirtualCamera: a frameshm stream published as a PipeWire camera.

    with frameshm.VirtualCamera("cam0") as vc:    # returns once the node is up
        print(vc.node_id, vc.serial, vc.node_name)
        vc.run()                                  # serve until Ctrl-C / SIGTERM / stop()

The node is a PipeWire ``Video/Source`` (``media.role=Camera``), so applications that
open cameras through PipeWire (GStreamer's ``pipewiresrc``, browsers, OBS) and V4L2
applications under PipeWire's V4L2 layer (``pw-v4l2``) see it as a camera. Serving runs on
the C core's threads: each new frame of the stream is copied once (seqlock-checked, never
torn) into a PipeWire buffer shared by all clients, at the producer's rate, and only while
a client streams. The format is fixed, from the stream's frames: uint8 ``(H, W)`` GRAY8,
``(H, W, 2)`` YUYV, ``(H, W, 3)`` RGB (``format="BGR"`` if the channels are BGR),
``(H, W, 4)`` RGBA, uint16 ``(H, W)`` GRAY16; ``(H*3/2, W)`` NV12/I420 when asked for. The
announced rate is the producer's, measured at start, unless ``fps`` is given. See
docs/virtualcam.md.

Errors: :class:`frameshm.StreamNotFound` (no such stream), :class:`UnsupportedStream`
(frames that are no video format), :class:`PipeWireError` (no PipeWire daemon, connection
lost), :class:`PipeWireUnavailable` (built without libpipewire-0.3),
:class:`frameshm.Timeout` (no frame to learn the format from in time).
"""

from __future__ import annotations

import logging
import time
from fractions import Fraction
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Union

from ._core import PipeWireError, PipeWireUnavailable, UnsupportedStream  # noqa: F401  (created in C)
from .errors import InvalidArgument, Timeout
from .stream import _dtype

__all__ = ["VirtualCamera", "Event", "PipeWireError", "PipeWireUnavailable", "UnsupportedStream",
           "HAVE_PIPEWIRE", "layout_for"]

log = logging.getLogger("frameshm.virtualcam")

def _ext():
    """frameshm._virtualcam, imported on first use: it loads libpipewire, which a process
    that only moves frames never needs."""
    from . import _virtualcam

    return _virtualcam


def __getattr__(name: str):
    if name == "HAVE_PIPEWIRE":
        #: True when frameshm was built with libpipewire-0.3.
        return bool(_ext().HAVE_PIPEWIRE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Event(NamedTuple):
    """Something that happened to the node. ``kind``: ready, client_connected,
    client_disconnected, streaming, idle, producer_gone, producer_back or warning."""

    kind: str
    message: str
    clients: int
    peer: str = ""
    peer_node_id: int = 0
    link_id: int = 0


def layout_for(shape, dtype="uint8", format: Optional[str] = None) -> Dict:
    """How frames of this shape and dtype would be served: format, width, height, stride,
    frame_bytes. Raises :class:`UnsupportedStream` if they cannot be."""
    _, code = _dtype(dtype)
    return _ext().virtualcam_layout(tuple(int(d) for d in shape), code, format)


def _fps_fraction(fps) -> tuple:
    if fps is None:
        return 0, 0
    try:
        f = Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError):
        raise InvalidArgument(f"fps must be a number, not {fps!r}") from None
    if not 0 < f <= 1000:
        raise InvalidArgument(f"fps must be in (0, 1000], not {fps!r}")
    return f.numerator, f.denominator


class VirtualCamera:
    """Serves stream ``stream`` as a PipeWire camera node until closed.

    ``node_name`` (default ``frameshm-<stream>``) and ``description`` name the node;
    ``format``/``width``/``height`` check (or, with ``fps`` too, give) the served format;
    ``fps`` is announced instead of the producer's measured rate; ``timeout`` bounds the
    wait for the frames the format and rate are learned from (None: forever) and then for
    the node to come up; ``buffers``: PipeWire buffers shared by the clients (default 8);
    ``remote``: PipeWire remote name (default ``$PIPEWIRE_REMOTE`` / ``pipewire-0``).
    ``wait=False`` returns at once; :meth:`wait_ready` then waits for the node.
    ``driver=<socket>`` reads a driver-managed stream (``stream`` then usually a stream id)
    through a consumer lease, like ``Reader(driver=...)``; the format must then be learned
    from frames or given in full.
    """

    def __init__(self, stream: Union[str, int], *, node_name: Optional[str] = None, description: Optional[str] = None,
                 format: Optional[str] = None, width: Optional[int] = None, height: Optional[int] = None,
                 fps: Optional[float] = None, timeout: Optional[float] = 10.0, buffers: int = 0,
                 consumer: Optional[str] = None, remote: Optional[str] = None, base_dir: Optional[str] = None,
                 namespace: Optional[str] = None, wait: bool = True, driver: Optional[str] = None):
        if (width is None) != (height is None):
            raise InvalidArgument("give width and height together")
        if width is not None and not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise InvalidArgument(f"width and height must be positive ints, not {width!r}x{height!r}")
        num, den = _fps_fraction(fps)
        self._pending = []
        if isinstance(stream, bool) or not isinstance(stream, (str, int)):
            raise InvalidArgument(f"stream must be a name (str) or stream id (int), not {stream!r}")
        by_id = isinstance(stream, int)
        self._core = _ext().VirtualCamera(
            None if by_id else stream, stream_id=stream if by_id else 0, driver=driver, node_name=node_name, description=description, format=format,
            width=int(width or 0), height=int(height or 0), fps_num=num, fps_den=den,
            learn_timeout=timeout, buffers=int(buffers), consumer=consumer, remote=remote,
            base_dir=base_dir, namespace=namespace)
        try:
            if wait:
                self.wait_ready(None if timeout is None else timeout + 10.0)
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------

    def wait_ready(self, timeout: Optional[float] = 20.0) -> Dict:
        """Waits until the node is published; returns :meth:`info`. Events seen meanwhile
        are kept for :meth:`next_event`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._core.info()["ready"]:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ev = self._core.next_event(left)   # raises the node's failure
            if ev is None:
                raise Timeout(f"virtual camera for '{self.stream}': node not up within {timeout:g} s")
            self._pending.append(Event(**ev))
        return self.info()

    def close(self) -> None:
        """Removes the node (clients see the camera go away) and stops reading."""
        self._core.close()

    @property
    def closed(self) -> bool:
        return self._core.closed

    def __enter__(self) -> "VirtualCamera":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        core = getattr(self, "_core", None)
        if core is not None:
            core.close()

    # -- state ------------------------------------------------------------------------

    def info(self) -> Dict:
        """Node id/serial/name, served format and rate, clients and counters (served,
        no_buffer: dropped because clients held every buffer, torn: copies discarded
        because the producer overwrote the slot, mismatched: frames of another shape)."""
        return self._core.info()

    @property
    def stream(self) -> str:
        return self._core.info()["stream"]

    @property
    def node_id(self) -> Optional[int]:
        return self._core.info()["node_id"]

    @property
    def serial(self) -> Optional[int]:
        """The node's ``object.serial`` (``PIPEWIRE_V4L2_TARGET``, pipewiresrc's
        ``target-object``)."""
        return self._core.info()["serial"]

    @property
    def node_name(self) -> str:
        return self._core.info()["node_name"]

    @property
    def clients(self) -> int:
        return self._core.info()["clients"]

    # -- events -----------------------------------------------------------------------

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event (None when none came within ``timeout``); raises the node's
        failure (e.g. :class:`PipeWireError` when the daemon went away)."""
        if self._pending:
            return self._pending.pop(0)
        ev = self._core.next_event(timeout)
        return None if ev is None else Event(**ev)

    def events(self, timeout: Optional[float] = None) -> Iterator[Event]:
        """Events until ``timeout`` passes without one (None: forever)."""
        while True:
            ev = self.next_event(timeout)
            if ev is None:
                return
            yield ev

    def run(self, duration: Optional[float] = None,
            on_event: Optional[Callable[[Event], None]] = None) -> None:
        """Serves for ``duration`` seconds (None: until interrupted), passing each event to
        ``on_event`` (default: the ``frameshm.virtualcam`` logger). Ctrl-C propagates."""
        handler = on_event or (lambda ev: log.log(logging.WARNING if ev.kind == "warning" else logging.INFO,
                                                  "%s", ev.message))
        deadline = None if duration is None else time.monotonic() + duration
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            ev = self.next_event(left)
            if ev is not None:
                handler(ev)

    def __repr__(self) -> str:
        if self.closed:
            return "<VirtualCamera closed>"
        i = self.info()
        return (f"<VirtualCamera {i['stream']!r} node {i['node_name']} id={i['node_id']} serial={i['serial']} "
                f"{i['format']} {i['width']}x{i['height']}@{i['fps_num']}/{i['fps_den']} clients={i['clients']}>")


# ---- command line: `frameshm virtualcam` ---------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser("virtualcam", help="publish a stream as a PipeWire camera (V4L2 apps: through pw-v4l2)")
    p.add_argument("--stream", required=True, help="the frameshm stream to serve (with --driver: its stream id)")
    p.add_argument("--driver", help="the frameshm driver's socket, for a driver-managed stream (docs/driver.md)")
    p.add_argument("--node-name", help="PipeWire node.name (default frameshm-<stream>)")
    p.add_argument("--description", help="node.description shown by applications (default 'frameshm <stream>')")
    p.add_argument("--fps", type=float, help="frame rate to announce (default: the producer's, measured)")
    p.add_argument("--format", help="GRAY8 GRAY16 RGB BGR RGBA BGRA RGBX BGRX YUYV UYVY NV12 I420 "
                                    "(default: from the stream's frames)")
    p.add_argument("--width", type=int, help="frame width (with --height, --format and --fps: start "
                                             "without waiting for the stream)")
    p.add_argument("--height", type=int)
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for frames to learn the format and rate from (default 10)")
    p.add_argument("--buffers", type=int, default=0, help="PipeWire buffers shared by the clients (default 8)")
    p.add_argument("--remote", help="PipeWire remote name (default $PIPEWIRE_REMOTE or pipewire-0)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import threading

    from .roles import setup_logging, stop_on_signals

    setup_logging(args.log_level)
    stop = threading.Event()
    with stop_on_signals(stop):
        stream = int(args.stream) if args.driver and args.stream.isdigit() else args.stream
        vc = VirtualCamera(stream, driver=args.driver, node_name=args.node_name, description=args.description,
                           format=args.format, width=args.width, height=args.height, fps=args.fps,
                           timeout=args.timeout, buffers=args.buffers, remote=args.remote,
                           base_dir=args.base_dir, namespace=args.namespace, wait=False)
        with vc:
            while not stop.is_set():   # Ctrl-C before the node is up is a clean stop too
                ev = vc.next_event(0.25)
                if ev is None:
                    continue
                if ev.kind == "ready":
                    i = vc.info()
                    print(f"virtualcam: node.id={i['node_id']} object.serial={i['serial']} "
                          f"node.name={i['node_name']} stream={i['stream']} format={i['format']} "
                          f"{i['width']}x{i['height']}@{i['fps_num']}/{i['fps_den']}", flush=True)
                log.log(logging.WARNING if ev.kind == "warning" else logging.INFO, "%s", ev.message)
            i = vc.info()
            log.info("stopping: served %d frames (%d dropped with no free buffer, %d torn copies "
                     "discarded)", i["served"], i["no_buffer"], i["torn"])
    return 0
