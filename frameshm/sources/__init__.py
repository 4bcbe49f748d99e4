"""Frame sources for the capture producer, addressed by URI.

    test:?width=640&height=480          built-in deterministic test pattern
    v4l2:/dev/video0?width=640&...      V4L2 camera through libv4l2      (capture issue)
    gige:<id>?pixel_format=Mono8&...    GigE Vision camera through Aravis (GigE issue)
    file:/data/run.mp4?loop=1           video file / image folder or glob through PyAV (media)
    rtsp://host/cam, http(s)://...      network streams through PyAV, newest frame only (media)
    replay:/data/run1?stream=cam0       a recording made by `frameshm record` (recording)

A source writes each frame straight into a stream slot the capture producer loaned, so
there is no intermediate copy. Sources register their scheme with :func:`register`.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from ..errors import FrameshmError, InvalidArgument


class Source(abc.ABC):
    """One camera-like producer of fixed-shape frames."""

    #: frame shape and dtype, known after open()
    shape: Tuple[int, ...]
    dtype: np.dtype

    @abc.abstractmethod
    def open(self) -> None:
        """Opens the device and starts streaming (the producer starts at once)."""

    @abc.abstractmethod
    def read_into(self, out: np.ndarray, timeout: float) -> int:
        """Blocks for the next frame, writes it into ``out`` (shape/dtype as above) and
        returns its capture timestamp (CLOCK_MONOTONIC ns). Raises ``frameshm.Timeout``
        if no frame came in ``timeout`` seconds; raises ``SourceGone`` when the device
        disappeared (the producer then reconnects)."""

    def set_rate(self, fps: float) -> bool:
        """Asks the device for ``fps``. Returns True if the device now paces frames itself,
        False if the caller must pace (drop/sleep)."""
        return False

    def flush(self, max_age_ns: int) -> int:
        """Discards buffered frames older than ``max_age_ns``; returns how many."""
        return 0

    def stats(self) -> Dict[str, int]:
        """Device-side counters (``lost``, ...) published with the capture metrics."""
        return {}

    def close(self) -> None:
        """Stops streaming and releases the device."""

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SourceGone(FrameshmError, OSError):
    """The device went away mid-stream (unplugged, camera rebooted). An OSError like the
    camera's DeviceGone behind it: the capture producer closes the source and reopens it."""


_REGISTRY: Dict[str, Callable[[str, Dict[str, str]], Source]] = {}
# Built-in schemes and the module that registers each, imported on first use.
_BUILTIN = {"test": "test_pattern", "v4l2": "v4l2", "gige": "gige", "file": "media", "rtsp": "media",
            "rtsps": "media", "http": "media", "https": "media", "replay": "replay"}


def register(scheme: str, factory: Callable[[str, Dict[str, str]], Source]) -> None:
    """Makes ``scheme:`` URIs open with ``factory(path, params)``."""
    _REGISTRY[scheme] = factory


def check_params(scheme: str, params: Dict[str, str], known: Tuple[str, ...]) -> None:
    """Refuses URI parameters a source does not know, naming the ones it does."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidArgument(f"{scheme} source: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")


def int_param(scheme: str, params: Dict[str, str], key: str, minimum: int = 1) -> Optional[int]:
    """An integer URI parameter >= minimum, None when absent or empty."""
    raw = params.get(key)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise InvalidArgument(f"{scheme} source: {key}={raw!r} is not an integer") from None
    if v < minimum:
        raise InvalidArgument(f"{scheme} source: {key}={raw!r} must be " +
                              ("positive" if minimum == 1 else f">= {minimum}"))
    return v


def size_params(scheme: str, params: Dict[str, str]) -> Tuple[Optional[int], Optional[int]]:
    """The ``width``/``height`` URI parameters: both positive integers, or both None."""
    width = int_param(scheme, params, "width")
    height = int_param(scheme, params, "height")
    if (width is None) != (height is None):
        raise InvalidArgument(f"{scheme} source: give both width and height, or neither")
    return width, height


def fps_param(scheme: str, params: Dict[str, str]) -> Optional[float]:
    """The ``fps`` URI parameter: a positive number, None when absent or empty."""
    raw = params.get("fps")
    if raw in (None, ""):
        return None
    try:
        fps = float(raw)
    except ValueError:
        raise InvalidArgument(f"{scheme} source: fps={raw!r} is not a number") from None
    if not fps > 0:
        raise InvalidArgument(f"{scheme} source: fps={raw!r} must be positive")
    return fps


def parse_uri(uri: str) -> Tuple[str, str, Dict[str, str]]:
    """``"v4l2:/dev/video0?width=640"`` → ``("v4l2", "/dev/video0", {"width": "640"})``."""
    if ":" not in uri:
        raise InvalidArgument(f"source URI {uri!r} has no scheme (e.g. 'test:' or 'v4l2:/dev/video0')")
    parts = urlsplit(uri)
    params = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    return parts.scheme, parts.netloc + parts.path, params


def open_source(uri: Optional[str]) -> Source:
    """Creates (not yet opened) the source for ``uri``; None means the test pattern."""
    if not uri:
        uri = "test:"
    scheme, path, params = parse_uri(uri)
    if scheme not in _REGISTRY and scheme in _BUILTIN:
        import importlib

        importlib.import_module(f"{__name__}.{_BUILTIN[scheme]}")
    factory = _REGISTRY.get(scheme)
    if factory is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise InvalidArgument(f"unknown source scheme {scheme!r} in {uri!r}; known: {known}")
    return factory(path, params)
