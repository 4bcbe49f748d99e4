"""The pipeline TOML: defaults, the shipped example, and clear errors for unknown keys and
bad values — through the library and through the role subcommands."""

import ast
import pathlib
import subprocess
import sys

import pytest

import frameshm
from frameshm import config
from frameshm.cli import build_parser
from frameshm.config import ConfigError, PipelineConfig
from frameshm.roles import config_from_args

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples" / "pipeline.toml"


def write(tmp_path, text):
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    cfg = PipelineConfig()
    assert cfg.frames_stream == "cam0"
    assert cfg.detections_stream == "cam0.detections"
    assert (cfg.capture.standby_fps, cfg.capture.alarmed_fps, cfg.capture.flush_max_age_ms) == (3.0, 30.0, 50.0)
    assert (cfg.controller.validation_frames, cfg.controller.tracking_exit_frames) == (3, 10)
    assert cfg.metrics_stream("inference") == "cam0.inference"
    assert PipelineConfig().inference.detector_params is not cfg.inference.detector_params


def test_the_documented_example_loads():
    cfg = config.load(str(EXAMPLE))
    assert cfg.frames_stream == "cam0"
    assert cfg.detections_stream == "cam0.detections"
    assert cfg.capture.source.startswith("test:?")
    assert cfg.inference.detector == "hog"
    assert cfg.inference.detector_params["win_stride"] == 8
    assert cfg.controller.classes == [0.0]
    # the source URI in it really opens
    from frameshm.sources import open_source

    assert open_source(cfg.capture.source).shape == (480, 640, 3)


def test_every_documented_key_is_in_docs():
    doc = (EXAMPLE.parents[1] / "pipeline.md").read_text()
    for section, key, _default, _ in config.describe():
        assert f"`{key}`" in doc, f"[{section}] {key} is not documented in docs/pipeline.md"


def test_values_are_normalised(tmp_path):
    cfg = config.load(write(tmp_path, """
[streams]
frames = "lab.cam"
[capture]
standby_fps = 2          # an integer is a fine number
[controller]
classes = [0, 15]
[inference]
detector = "mypkg.models:Yolo"
detector_params = { weights = "yolo.onnx", conf = 0.4 }
"""))
    assert cfg.capture.standby_fps == 2.0 and isinstance(cfg.capture.standby_fps, float)
    assert cfg.controller.classes == [0.0, 15.0]
    assert cfg.inference.detector_params == {"weights": "yolo.onnx", "conf": 0.4}
    assert cfg.detections_stream == "lab.cam.detections"
    assert cfg.metrics_stream("controller") == "lab.cam.controller"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[captur]\nsource = 'test:'", "unknown table [captur] (did you mean 'capture'?)"),
        ("[capture]\nstandy_fps = 3", "unknown key 'standy_fps' in [capture] (did you mean 'standby_fps'?)"),
        ("[controller]\nvalidation = 3", "unknown key 'validation' in [controller]"),
        ("frames = 'cam0'", "key 'frames' outside any table (it belongs in [streams])"),
        ("capture = 'test:'", "capture must be a table ([capture])"),
        ("[capture]\nstandby_fps = 'fast'", "[capture] standby_fps: expected a number, got 'fast'"),
        ("[capture]\nstandby_fps = 0", "[capture] standby_fps: expected a number > 0"),
        ("[capture]\nalarmed_fps = -30", "[capture] alarmed_fps: expected a number > 0"),
        ("[capture]\nalarmed_fps = nan", "[capture] alarmed_fps: expected a number, got nan"),
        ("[capture]\nnslots = 6", "[capture] nslots: expected a power of two, got 6"),
        ("[capture]\nnslots = 4.0", "[capture] nslots: expected an integer, got 4.0"),
        ("[capture]\nmetrics = 1", "[capture] metrics: expected true or false, got 1"),
        ("[capture]\nsource = 'nocolon'", "[capture] source: source URI 'nocolon' has no scheme"),
        ("[controller]\nvalidation_frames = 0", "[controller] validation_frames: expected an integer in 1..100000"),
        ("[controller]\ntracking_exit_frames = true", "[controller] tracking_exit_frames: expected an integer, got True"),
        ("[controller]\nclasses = 0", "[controller] classes: expected a list of class ids"),
        ("[controller]\nclasses = ['person']", "expected a list of class ids (numbers), got element 'person'"),
        ("[inference]\ndetector = 'yolo'", "[inference] detector: expected auto, dnn, hog, motion or 'package.module:callable'"),
        ("[inference]\ndetector_params = 3", "[inference] detector_params: expected a table"),
        ("[inference]\nconsumer = 'a b'", "[inference] consumer: 'a b' is not a valid name"),
        ("[streams]\nframes = '-cam'", "[streams] frames: '-cam' is not a valid name"),
        ("[streams]\nframes = '" + "x" * 60 + "'", "is not a valid name: 1-52 characters"),
        ("[streams]\nframes = 'a'\ndetections = 'a'", "detections must differ from frames"),
        ("[streams]\nframes = 'a'\ndetections = 'a.capture'", "collides with a metrics stream name"),
        ("[capture\nsource = 1", "invalid TOML"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert message in str(exc.value)
    assert str(exc.value).startswith(path) or "invalid TOML" in str(exc.value)
    assert isinstance(exc.value, frameshm.InvalidArgument)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(str(tmp_path))


def test_set_validates_like_the_file():
    cfg = PipelineConfig()
    cfg.set("capture.standby_fps", 5)
    assert cfg.capture.standby_fps == 5.0
    with pytest.raises(ConfigError, match=r"\[capture\] standby_fps: expected a number > 0"):
        cfg.set("capture.standby_fps", -1)
    with pytest.raises(ConfigError, match="unknown key 'fps' in \\[capture\\]"):
        cfg.set("capture.fps", 5)
    with pytest.raises(ConfigError, match="unknown table \\[camera\\]"):
        cfg.set("camera.fps", 5)
    assert cfg.capture.standby_fps == 5.0


def test_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, "[capture]\nstandby_fps = 2\n[streams]\nframes = 'filecam'\n")
    args = build_parser().parse_args(
        ["capture", "--config", path, "--standby-fps", "4", "--set", "capture.nslots=16", "--frames", "clicam"]
    )
    cfg = config_from_args(args)
    assert cfg.capture.standby_fps == 4.0 and cfg.capture.nslots == 16 and cfg.frames_stream == "clicam"
    args = build_parser().parse_args(
        ["inference", "--config", path, "--detector", "hog", "--param", "hit_threshold=-0.5", "--param", "win_stride=16"]
    )
    cfg = config_from_args(args)
    assert cfg.inference.detector == "hog"
    assert cfg.inference.detector_params == {"hit_threshold": -0.5, "win_stride": 16}
    args = build_parser().parse_args(["controller", "--validation-frames", "5", "--tracking-exit-frames", "7"])
    cfg = config_from_args(args)
    assert (cfg.controller.validation_frames, cfg.controller.tracking_exit_frames) == (5, 7)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["capture", "--config", "/nonexistent/p.toml"], "config file not found: /nonexistent/p.toml"),
        (["capture", "--standby-fps", "-3"], "command line: [capture] standby_fps: expected a number > 0"),
        (["capture", "--set", "capture.nslots=3"], "[capture] nslots: expected a power of two, got 3"),
        (["controller", "--set", "controller.hysteresis=3"], "unknown key 'hysteresis' in [controller]"),
        (["inference", "--detector", "nosuchmodule:detect"], "cannot import module 'nosuchmodule'"),
        (["capture", "--source", "bogus:thing"], "unknown source scheme 'bogus'"),
    ],
)
def test_role_commands_report_config_errors_without_traceback(argv, message):
    proc = subprocess.run([sys.executable, "-m", "frameshm", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bridge_choices_are_the_bridges_own():
    """[bridge] mode and jpeg_subsampling accept exactly what frameshm.Bridge accepts: one
    tuple each (frameshm/_choices.py), not copies that can drift apart."""
    from dataclasses import fields

    from frameshm import _choices, bridge

    checks = {f.name: f.metadata["check"] for f in fields(config.BridgeConfig)}
    assert checks["mode"].options is bridge.MODES
    assert checks["jpeg_subsampling"].options is bridge.JPEG_SUBSAMPLING
    defaults = PipelineConfig().bridge
    assert defaults.mode in bridge.MODES and defaults.jpeg_subsampling in bridge.JPEG_SUBSAMPLING
    for mode in bridge.MODES:
        PipelineConfig().set("bridge.mode", mode)
    with pytest.raises(ConfigError, match=r"\[bridge\] jpeg_subsampling: expected one of '420', '422', '444'"):
        PipelineConfig().set("bridge.jpeg_subsampling", "411")
    # the exports' help names every encoding the bridge knows
    assert bridge.ENCODINGS is _choices.BRIDGE_ENCODINGS
    exports_help = next(f for f in fields(config.BridgeConfig) if f.name == "exports").metadata["doc"]
    assert all(enc in exports_help for enc in bridge.ENCODINGS), exports_help


def test_config_alone_loads_neither_the_bridge_nor_numpy():
    """config.py is read early by every role: by itself (without frameshm/__init__.py, which
    loads the whole transport) it imports no frameshm.bridge, Zenoh or numpy."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('frameshm'); pkg.__path__ = [{str(pathlib.Path(config.__file__).parent)!r}]\n"
        "sys.modules['frameshm'] = pkg\n"
        "import frameshm.config\n"
        "print(sorted(m for m in sys.modules if m.startswith(('frameshm', 'zenoh', 'numpy', 'simplejpeg'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = ast.literal_eval(out.stdout)
    assert not [m for m in loaded if m in ("frameshm.bridge", "frameshm.stream") or m.startswith(("zenoh", "numpy"))], loaded
