"""Detectors: the HOG person detector on real photographs shipped in scikit-image (no
download), the motion detector, output normalisation and module:callable loading."""

import sys
import textwrap

import numpy as np
import pytest

from frameshm.detectors import (
    CLASS_MOTION,
    CLASS_PERSON,
    DetectorError,
    HOGPersonDetector,
    MotionDetector,
    as_detections,
    load_detector,
)

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")
from skimage.transform import resize  # noqa: E402


def astronaut(size):
    """The astronaut photograph (a real person, scikit-image's bundled file) at size px."""
    img = resize(skdata.astronaut(), (size, size), anti_aliasing=True, preserve_range=True)
    return np.rint(img).astype(np.uint8)


def scene(h, w, person=None, x0=0, y0=0, level=120):
    frame = np.full((h, w, 3), level, np.uint8)
    if person is not None:
        frame[y0:y0 + person.shape[0], x0:x0 + person.shape[1]] = person
    return frame


# ---- HOG person detector -------------------------------------------------------------


@pytest.mark.parametrize("x0", [0, 40, 64, 100, 128])
def test_hog_finds_the_person_in_a_real_photograph(x0):
    hog = HOGPersonDetector()
    person = astronaut(192)
    dets = hog(scene(240, 320, person, x0, 24))
    assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 6
    assert len(dets) >= 1
    x1, y1, x2, y2, score, cls = dets[np.argmax(dets[:, 4])]
    assert cls == CLASS_PERSON and score > 0
    assert x2 > x1 and y2 > y1
    cx = (x1 + x2) / 2
    # the box sits on the astronaut's body, which spans the middle of the photograph
    assert x0 + 0.2 * 192 <= cx <= x0 + 0.8 * 192, (x0, dets)
    assert y2 - y1 >= 100


@pytest.mark.parametrize("name", ["coffee", "chelsea", "coins", "moon"])
def test_hog_finds_nobody_in_photographs_without_people(name):
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    assert len(HOGPersonDetector()(np.ascontiguousarray(img))) == 0


def test_hog_finds_nobody_in_an_empty_scene_or_the_test_pattern_without_person():
    from frameshm.sources import open_source

    hog = HOGPersonDetector()
    assert len(hog(scene(240, 320))) == 0
    src = open_source("test:?width=320&height=240&fps=200")
    src.open()
    buf = np.empty(src.shape, np.uint8)
    for _ in range(5):
        src.read_into(buf, 1.0)
        assert len(hog(buf)) == 0


def test_hog_fires_on_the_test_pattern_person_at_every_position():
    from frameshm.sources.test_pattern import TestPatternSource, read_stamp

    src = TestPatternSource("", {"width": "320", "height": "240", "person": "on"})
    src.open()
    hog = HOGPersonDetector()
    buf = np.empty(src.shape, np.uint8)
    t0 = src._anchor_ns
    # the person drifts 90 px/s across the 128 px span: sample the whole sweep
    for i in range(0, 40):
        ts = t0 + int(i * 0.07e9)
        src.render(buf, i, ts)
        assert read_stamp(buf).person
        assert len(hog(buf)) >= 1, f"missed at t={i * 0.07:.2f}s"


def test_hog_scales_large_frames_down_and_boxes_back_up():
    person = astronaut(768)
    frame = scene(960, 1280, person, 200, 96)
    dets = HOGPersonDetector(max_width=640)(frame)
    assert len(dets) >= 1
    x1, y1, x2, y2 = dets[np.argmax(dets[:, 4]), :4]
    cx = (x1 + x2) / 2
    assert 200 + 0.2 * 768 <= cx <= 200 + 0.8 * 768
    assert y2 <= 960 + 1 and y2 - y1 >= 400  # in the original frame's coordinates


def test_hog_accepts_grey_and_readonly_views_and_rejects_bad_input():
    hog = HOGPersonDetector()
    grey = np.ascontiguousarray(scene(240, 320, astronaut(192), 64, 24).mean(axis=2).astype(np.uint8))
    grey.setflags(write=False)
    assert len(hog(grey)) >= 1
    with pytest.raises(DetectorError, match="uint8"):
        hog(np.zeros((240, 320, 3), np.float32))
    with pytest.raises(DetectorError, match="image"):
        hog(np.zeros((2, 240, 320, 3), np.uint8))
    for bad in ({"win_stride": 5}, {"scale": 0.9}, {"padding": -1}, {"threads": "two"}):
        with pytest.raises(DetectorError, match="hog detector: bad"):
            HOGPersonDetector(**bad)


# ---- motion detector --------------------------------------------------------------------


def test_motion_detector_boxes_what_moved():
    md = MotionDetector(threshold=25, min_area=0.005, downscale=4)
    base = scene(240, 320, level=60)
    assert len(md(base)) == 0, "the first frame has nothing to compare with"
    assert len(md(base.copy())) == 0, "nothing changed"
    moved = base.copy()
    moved[100:140, 200:260] = 220
    dets = md(moved)
    assert dets.shape == (1, 6)
    x1, y1, x2, y2, score, cls = dets[0]
    assert cls == CLASS_MOTION
    assert (x1, y1, x2, y2) == (200, 100, 260, 140)
    assert score == pytest.approx(40 * 60 / (240 * 320), rel=0.1)
    # a change smaller than min_area, or fainter than threshold, is ignored
    speck = moved.copy()
    speck[0:4, 0:4] = 0
    assert len(md(speck)) == 0
    faint = speck.copy()
    faint[:] = np.clip(faint.astype(int) + 10, 0, 255).astype(np.uint8)
    assert len(md(faint)) == 0


def test_motion_detector_grey_frames_size_change_and_params():
    md = MotionDetector()
    a = np.zeros((120, 160), np.uint8)
    b = a.copy()
    b[40:80, 40:80] = 200
    assert len(md(a)) == 0 and len(md(b)) == 1
    assert len(md(np.zeros((60, 80), np.uint8))) == 0, "a new frame size restarts the comparison"
    for bad in ({"threshold": 0}, {"min_area": 2}, {"downscale": 0}, {"downscale": 1.5}):
        with pytest.raises(DetectorError, match="motion detector"):
            MotionDetector(**bad)
    with pytest.raises(DetectorError, match="image"):
        md(np.zeros((4, 4, 4, 4), np.uint8))


def test_motion_detector_fires_on_the_test_pattern_person_only():
    from frameshm.sources.test_pattern import TestPatternSource, read_stamp

    src = TestPatternSource("", {"width": "320", "height": "240", "person": "cycle", "off_s": "1", "on_s": "1"})
    src.open()
    md = MotionDetector()
    buf = np.empty(src.shape, np.uint8)
    t0 = src._anchor_ns
    for i in range(60):  # 2 s at 30 fps: 1 s background only, then 1 s with the person
        src.render(buf, i, t0 + int(i * 1e9 / 30))
        n = len(md(buf))
        if i > 0:
            assert n == int(read_stamp(buf).person), i


# ---- output normalisation ------------------------------------------------------------------


def test_as_detections_normalises_and_validates():
    assert as_detections(None).shape == (0, 6)
    assert as_detections([]).shape == (0, 6)
    assert as_detections(np.zeros((0, 4))).shape == (0, 6)
    one = as_detections([1, 2, 3, 4, 0.5, 7])
    assert one.shape == (1, 6) and one.dtype == np.float32 and one.flags.c_contiguous
    four = as_detections([[1, 2, 3, 4]])
    assert four.tolist() == [[1, 2, 3, 4, 1, 0]]
    five = as_detections(np.array([[1, 2, 3, 4, 0.25]], np.float64))
    assert five.tolist() == [[1, 2, 3, 4, 0.25, 0]]
    rows = np.array([[0, 0, 1, 1, s, 0] for s in (0.1, 0.9, 0.5, 0.7)], np.float32)
    top = as_detections(rows, max_detections=2)
    assert top[:, 4].tolist() == pytest.approx([0.9, 0.7])  # best two, original order
    for bad, msg in (
        ([[1, 2, 3]], "shape"),
        (np.zeros((2, 7)), "shape"),
        (np.zeros((2, 2, 6)), "shape"),
        ([["a", "b", "c", "d"]], "not numeric"),
        ([[0, 0, 1, np.nan, 1, 0]], "NaN"),
    ):
        with pytest.raises(DetectorError, match=msg):
            as_detections(bad)


# ---- loading: built-ins and module:callable ---------------------------------------------------


PLUGIN = '''
import numpy as np

def detect(frame):
    return [[0, 0, frame.shape[1], frame.shape[0], 0.5, 3]]

def make(scale=1.0):
    return lambda frame: [[0, 0, 1, 1, scale, 0]]

class Model:
    def __init__(self, threshold=0.5):
        self.threshold = threshold
    def __call__(self, frame):
        return np.zeros((0, 6), np.float32)
    @classmethod
    def from_file(cls, path):
        return cls(0.9 if path == "model.onnx" else 0.1)

NOT_CALLABLE = 42
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "fshm_plugin_mod.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "fshm_broken_mod.py").write_text("raise RuntimeError('model file missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fshm_plugin_mod"
    for m in ("fshm_plugin_mod", "fshm_broken_mod"):
        sys.modules.pop(m, None)


def test_load_builtin_detectors_with_params():
    md = load_detector("motion", {"threshold": 10})
    assert isinstance(md, MotionDetector) and md.threshold == 10
    hog = load_detector("hog", {"hit_threshold": -0.2})
    assert isinstance(hog, HOGPersonDetector)
    with pytest.raises(DetectorError, match=r"detector 'hog': bad parameters .*bogus.*accepted: \(hit_threshold"):
        load_detector("hog", {"bogus": 1})


def test_load_module_callable(plugin_module):
    frame = np.zeros((10, 20, 3), np.uint8)
    fn = load_detector(f"{plugin_module}:detect")
    assert as_detections(fn(frame)).tolist() == [[0, 0, 20, 10, 0.5, 3]]
    factory = load_detector(f"{plugin_module}:make", {"scale": 0.25})
    assert as_detections(factory(frame))[0, 4] == 0.25
    model = load_detector(f"{plugin_module}:Model", {"threshold": 0.3})
    assert model.threshold == 0.3
    assert load_detector(f"{plugin_module}:Model").threshold == 0.5  # a class is instantiated
    # a dotted attribute, called as a factory because params are given
    assert load_detector(f"{plugin_module}:Model.from_file", {"path": "model.onnx"}).threshold == 0.9


@pytest.mark.parametrize(
    "spec, params, message",
    [
        ("yolo", {}, "unknown detector 'yolo': use one of auto, dnn, hog, motion or 'package.module:callable'"),
        ("fshm_plugin_mod:", {}, "is not of the form 'package.module:callable'"),
        ("fshm plugin:detect", {}, "is not of the form"),
        ("fshm_no_such_module:detect", {}, "cannot import module 'fshm_no_such_module'"),
        ("fshm_broken_mod:detect", {}, "importing 'fshm_broken_mod' failed: RuntimeError: model file missing"),
        ("fshm_plugin_mod:nothing", {}, "'fshm_plugin_mod' has no attribute 'nothing'"),
        ("fshm_plugin_mod:NOT_CALLABLE", {}, "'NOT_CALLABLE' is a int, not a callable"),
        ("fshm_plugin_mod:Model", {"treshold": 1}, "bad parameters {'treshold': 1}"),
        ("", {}, "detector must be"),
    ],
)
def test_load_errors_are_clear(plugin_module, spec, params, message):
    with pytest.raises(DetectorError) as exc:
        load_detector(spec, params)
    assert message in str(exc.value)
