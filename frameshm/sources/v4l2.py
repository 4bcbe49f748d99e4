"""V4L2 cameras as a capture source (``v4l2:`` URIs).

    v4l2:/dev/video0?width=640&height=480&fps=30&format=RGB24&buffers=4

``read_into(out)`` is the one-copy path: the dequeued driver buffer is converted (libv4l2's
libv4lconvert, or frameshm's GRAY8 extraction) or copied once, straight into ``out`` (the
slot the capture producer loaned), and requeued at once. ``set_rate`` always paces: with
the device's rate control when it has one, else by dropping frames by driver timestamp
(PipeWire's V4L2 emulation accepts VIDIOC_S_PARM but ignores it). ``flush`` discards frames
older than the given age by driver timestamp.

A device that disappears mid-stream (ENODEV) raises :class:`~frameshm.sources.SourceGone`
from ``read_into``/``set_rate``/``flush``; the producer then calls ``close()`` and
``open()`` again until it works: ``open()`` raises OSError subclasses
(:class:`~frameshm.camera.DeviceNotFound` while the node is absent,
:class:`~frameshm.camera.DeviceBusy`, :class:`~frameshm.camera.DevicePermissionError`) that
the producer retries, and ValueError subclasses (bad format/size) that it does not. The rate
asked last is applied again on every open.

Parameters: ``width``/``height`` (exact; default the device's), ``fps`` (default: the
device's), ``format`` (fourcc or RGB24/BGR24/GRAY8; default the device's), ``buffers``
(driver buffers, default 4). Compressed formats (MJPEG) need ``format=RGB24`` or similar:
a stream slot holds fixed-shape frames.
"""

from __future__ import annotations

from typing import Dict, Optional

from ..camera import Camera
from ..errors import InvalidArgument
from . import check_params, fps_param, int_param, register, size_params
from ._camera import CameraSource

_KNOWN = ("width", "height", "fps", "format", "buffers")


class V4L2Source(CameraSource):
    """A V4L2 camera (see the module docstring)."""

    _SCHEME = "v4l2"
    cam: Optional[Camera]

    def __init__(self, path: str, params: Dict[str, str]):
        check_params("v4l2", params, _KNOWN)
        super().__init__()
        self.path = path or "/dev/video0"
        self.width, self.height = size_params("v4l2", params)
        self.fps = fps_param("v4l2", params)
        self.format = params.get("format") or None
        self.buffers = int_param("v4l2", params, "buffers") or 4

    def _new_camera(self) -> Camera:
        return Camera(self.path, self.width, self.height, self.fps, self.format, buffers=self.buffers)

    def _setup(self, cam: Camera) -> None:
        if cam.compressed:
            raise InvalidArgument(
                f"v4l2 source: {self.path} delivers {cam.format} (compressed, variable size); "
                "ask for format=RGB24, BGR24 or GRAY8"
            )

    def set_rate(self, fps: float) -> bool:
        """Always True: the device paces itself, or frameshm drops frames by driver
        timestamp (Camera.rate_limit tells which)."""
        self._set_camera_rate(fps)
        return True

    def __repr__(self) -> str:
        return f"<V4L2Source {self.path} {self.cam!r}>"


register("v4l2", V4L2Source)
