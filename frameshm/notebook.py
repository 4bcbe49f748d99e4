"""Streams in Jupyter: ``frameshm.show("cam0")`` and ``Frame._repr_png_``.

``show(name)`` returns a live widget (anywidget: a kept, small widget library that renders
in JupyterLab, Notebook 7, VS Code and Colab) showing the stream's newest frame at most
``max_fps`` times a second as a JPEG (simplejpeg, the gateway's encoder), with the boxes of
the newest detections when a ``<name>.detections`` stream exists (float32 ``(N, 6)``:
``x1, y1, x2, y2, score, class``), and a line with seq, rate and age.

It costs the producer nothing, looked at or not: the widget reads with a passive handle
(``Reader(subscribe=False)``: no consumer entry, no queue, no wake-ups), and it encodes
only while a front end says it is looking: each rendered view sends a heartbeat while it
is on screen (in the viewport of a visible tab); two seconds without one and the kernel
thread stops encoding and only sleeps. The thread is a daemon and holds nothing in the
stream, so a kernel shut down or restarted leaves nothing behind; ``view.close()`` (or
``view.stop()``) ends it earlier.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from typing import Optional

import numpy as np

from .errors import InvalidArgument, StreamNotFound

_HEARTBEAT_S = 2.0  # a view not heard from for this long is not looking any more

_ESM = r"""
function render({ model, el }) {
  const wrap = document.createElement("div");
  wrap.className = "fshm-live";
  const stage = document.createElement("div");
  stage.className = "fshm-stage";
  const img = document.createElement("img");
  img.alt = model.get("stream");
  const canvas = document.createElement("canvas");
  const info = document.createElement("div");
  info.className = "fshm-info";
  stage.append(img, canvas);
  wrap.append(stage, info);
  el.append(wrap);
  let url = null;
  let shown = 0;

  function drawBoxes() {
    const w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h) return;
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    ctx.lineWidth = Math.max(2, Math.round(w / 320));
    ctx.font = `${Math.max(12, Math.round(w / 50))}px sans-serif`;
    let n = 0;
    for (const [x1, y1, x2, y2, score, cls] of model.get("boxes")) {
      ctx.strokeStyle = "#ff3b30"; ctx.fillStyle = "#ff3b30";
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillText(`${cls} ${score.toFixed(2)}`, x1 + 3, Math.max(y1 - 4, 12));
      n++;
    }
    wrap.dataset.boxes = String(n);
  }
  function showFrame() {
    const buf = model.get("jpeg");
    if (!buf || buf.byteLength === 0) return;
    const next = URL.createObjectURL(new Blob([buf], { type: "image/jpeg" }));
    img.onload = () => {
      if (url) URL.revokeObjectURL(url);
      url = next;
      shown++;
      wrap.dataset.shown = String(shown);
      drawBoxes();
    };
    img.src = next;
  }
  function showInfo() { info.textContent = model.get("info"); }

  model.on("change:jpeg", showFrame);
  model.on("change:boxes", drawBoxes);
  model.on("change:info", showInfo);
  showFrame(); showInfo();

  let onScreen = true;
  const io = new IntersectionObserver((es) => { onScreen = es[es.length - 1].isIntersecting; beat(); });
  io.observe(wrap);
  function beat() {
    if (onScreen && document.visibilityState === "visible") model.send({ type: "looking" });
  }
  beat();
  const timer = setInterval(beat, 1000);
  document.addEventListener("visibilitychange", beat);
  return () => {
    clearInterval(timer);
    io.disconnect();
    document.removeEventListener("visibilitychange", beat);
    if (url) URL.revokeObjectURL(url);
  };
}
export default { render };
"""

_CSS = """
.fshm-live { display: inline-block; font: 12px monospace; }
.fshm-stage { position: relative; display: inline-block; line-height: 0; }
.fshm-stage img { max-width: 100%; display: block; background: #222; min-width: 64px; min-height: 48px; }
.fshm-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
.fshm-info { color: #666; padding-top: 2px; }
"""


def _widget_base():
    try:
        import anywidget
        import traitlets
    except ImportError:
        raise InvalidArgument("frameshm.show needs anywidget: pip install 'frameshm[notebook]'") from None
    return anywidget, traitlets


def _make_class():
    anywidget, traitlets = _widget_base()

    class LiveView(anywidget.AnyWidget):
        """The widget :func:`show` returns (see the module docstring)."""

        _esm = _ESM
        _css = _CSS
        stream = traitlets.Unicode("").tag(sync=True)
        jpeg = traitlets.Bytes(b"").tag(sync=True)
        boxes = traitlets.List([]).tag(sync=True)
        info = traitlets.Unicode("").tag(sync=True)

        def __init__(self, name: str, *, detections: Optional[str], max_fps: float, quality: int,
                     base_dir: Optional[str], namespace: Optional[str]):
            super().__init__(stream=name, info=f"{name}: waiting for a viewer")
            self._name, self._dets_name = name, detections
            self._period = 1.0 / max_fps
            self._quality = quality
            self._addr = dict(base_dir=base_dir, namespace=namespace)
            self._last_look = 0.0
            self._halt = threading.Event()
            self.encoded = 0        # frames encoded and sent
            self.looks = 0          # heartbeats received from front ends
            self.on_msg(self._on_front_end)
            self._thread = threading.Thread(target=self._pump, name=f"frameshm-show-{name}", daemon=True)
            self._thread.start()

        def _on_front_end(self, _widget, content, _buffers) -> None:
            if isinstance(content, dict) and content.get("type") == "looking":
                self.looks += 1
                self._last_look = time.monotonic()

        @property
        def looking(self) -> bool:
            """A front end has said it shows this widget within the last two seconds."""
            return time.monotonic() - self._last_look < _HEARTBEAT_S

        def _open(self, name: str):
            from .stream import Reader

            try:
                return Reader(name, subscribe=False, **self._addr)
            except StreamNotFound:
                return None

        def _pump(self) -> None:
            import simplejpeg

            from .roles.gateway import colorspace_of

            frames = dets = None
            last_seq, sent_at = -1, []
            while not self._halt.wait(self._period):
                if not self.looking:
                    continue  # nobody looks: no reads, no encoding
                try:
                    if frames is None:
                        frames = self._open(self._name)
                        if frames is None:
                            self.info = f"{self._name}: no such stream (yet)"
                            continue
                    if dets is None and self._dets_name:
                        dets = self._open(self._dets_name)
                    f = frames.read_latest(copy=False)
                    if f is None or f.seq == last_seq:
                        continue
                    arr = f.array
                    if arr.dtype != np.uint8:
                        self.info = f"{self._name}: {arr.dtype} frames are not an image"
                        continue
                    cs = colorspace_of(arr.shape)
                    img = arr if arr.ndim == 3 else arr[:, :, None]
                    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=self._quality, colorspace=cs)
                    if not f.valid():
                        continue  # overwritten while encoding: the next one
                    boxes = []
                    if dets is not None:
                        d = dets.read_latest(copy=True)
                        if d is not None and d.ndim == 2 and d.shape[1] >= 6:
                            boxes = [[round(float(v), 1) for v in row[:6]] for row in d]
                    now = time.monotonic()
                    sent_at = [t for t in sent_at if now - t < 1.0] + [now]
                    age_ms = (time.monotonic_ns() - f.timestamp_ns) / 1e6
                    with self.hold_sync():
                        self.jpeg = jpeg
                        self.boxes = boxes
                        self.info = (f"{self._name} seq {f.seq} {arr.shape[1]}x{arr.shape[0]} "
                                     f"{len(sent_at)} fps age {age_ms:.0f} ms" + (f" boxes {len(boxes)}" if dets else ""))
                    self.encoded += 1
                    last_seq = f.seq
                except Exception as exc:  # noqa: BLE001 - shown in the view; the readers start over
                    self.info = f"{self._name}: {exc}"
                    for r in (frames, dets):
                        if r is not None:
                            r.close()
                    frames = dets = None
            for r in (frames, dets):
                if r is not None:
                    r.close()

        def stop(self) -> None:
            """Ends the kernel-side thread (the widget then shows its last frame)."""
            self._halt.set()
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._thread.join(5)

        def close(self) -> None:
            self.stop()
            super().close()

    return LiveView


_LiveView = None


def show(name: str, *, detections: Optional[str] = "auto", max_fps: float = 10.0, quality: int = 80,
         base_dir: Optional[str] = None, namespace: Optional[str] = None):
    """A live view of stream ``name`` for Jupyter (see the module docstring).

    ``detections``: the stream whose boxes to draw (``"auto"``: ``<name>.detections``;
    None: no boxes). ``max_fps`` caps the frames sent to the browser."""
    global _LiveView
    if not max_fps > 0:
        raise InvalidArgument(f"max_fps must be > 0, not {max_fps!r}")
    if not 1 <= quality <= 100:
        raise InvalidArgument(f"quality must be 1..100, not {quality!r}")
    if _LiveView is None:
        _LiveView = _make_class()
    dets = f"{name}.detections" if detections == "auto" else detections
    return _LiveView(name, detections=dets, max_fps=max_fps, quality=quality, base_dir=base_dir,
                     namespace=namespace)


# -- PNG for Frame._repr_png_ -----------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(arr: np.ndarray) -> bytes:
    """A lossless PNG of a uint8 (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA image."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise InvalidArgument(f"no PNG for a {a.shape} {a.dtype} array: uint8 (H, W[, 1|3|4]) only")
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    color = {1: 0, 3: 2, 4: 6}[c]
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 0  # filter "none" per row
    rows[:, 1:] = a.reshape(h, w * c)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 3)) + _chunk(b"IEND", b""))
