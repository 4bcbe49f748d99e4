"""Typed stubs of the frameshm._virtualcam C extension (a stream as a PipeWire camera;
low-level: use frameshm.VirtualCamera). Its errors are frameshm._core's
(frameshm.virtualcam re-exports them)."""

from typing import Any, Dict, Optional, Sequence

from typing_extensions import disjoint_base

HAVE_PIPEWIRE: int

@disjoint_base
class VirtualCamera:
    """Low-level PipeWire virtual camera; use frameshm.VirtualCamera."""
    def __init__(self, stream: Optional[str], *, node_name: Optional[str] = ..., description: Optional[str] = ...,
                 format: Optional[str] = ..., width: int = ..., height: int = ..., fps_num: int = ...,
                 fps_den: int = ..., learn_timeout: Optional[float] = ..., buffers: int = ...,
                 consumer: Optional[str] = ..., remote: Optional[str] = ..., base_dir: Optional[str] = ...,
                 namespace: Optional[str] = ..., stream_id: int = ..., driver: Optional[str] = ...) -> None: ...
    # {kind, message, clients, link_id, peer_node_id, peer}; None on timeout
    def next_event(self, timeout: Optional[float] = ...) -> Optional[Dict[str, Any]]: ...
    def info(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

# {format, width, height, stride, frame_bytes}; needs no PipeWire
def virtualcam_layout(shape: Sequence[int], dtype: int, format: Optional[str] = ..., width: int = ...,
                      height: int = ...) -> Dict[str, Any]: ...
