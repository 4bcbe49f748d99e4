"""Pins the public API: names, methods, properties, signatures and the exception tree.

A change here is an API change: update the test and the changelog together."""

import builtins
import inspect

import numpy as np
import pytest

import frameshm
from frameshm import errors

EXPECTED_ALL = [
    "Bridge",
    "BridgeError",
    "Camera",
    "CorruptStream",
    "DriverRejected",
    "DriverUnavailable",
    "Frame",
    "FrameTooLarge",
    "FrameshmError",
    "GigECamera",
    "InvalidArgument",
    "InvalidState",
    "LeaseLost",
    "MODE_ALARMED",
    "MODE_STANDBY",
    "Overrun",
    "PermissionDenied",
    "Processor",
    "ProducerDead",
    "Reader",
    "ResourceLimit",
    "StreamBusy",
    "StreamClosed",
    "StreamNotFound",
    "Timeout",
    "VirtualCamera",
    "Writer",
    "__version__",
    "cmake_dir",
    "gc",
    "get_include",
    "get_library_dir",
    "list_streams",
    "pkgconfig_dir",
    "show",
    "stream_info",
]

WRITER_PUBLIC = {
    "methods": ["close", "commit", "control", "heartbeat", "loan", "publish", "set_control"],
    "properties": ["closed", "dtype", "epoch", "lease_id", "mode", "nslots", "pools", "shape", "stream_id"],
}
READER_PUBLIC = {
    "methods": ["close", "control", "frames", "read_latest", "set_control", "wait_latest", "wait_next"],
    "properties": ["closed", "drops", "epoch", "mode", "overruns", "producer", "producer_alive", "stream_id"],
}
FRAME_PUBLIC = {
    "methods": ["copy", "valid"],
    "properties": ["array", "latency_ns"],
    "slots": ["dtype", "epoch", "nbytes", "publish_ns", "ref_seq", "seq", "shape", "skipped", "slot",
              "strides", "timestamp_ns"],
}

# exception -> (its frameshm base, the builtin category it must also be)
EXCEPTIONS = {
    "FrameshmError": (Exception, None),
    "InvalidArgument": (frameshm.FrameshmError, ValueError),
    "StreamNotFound": (frameshm.FrameshmError, FileNotFoundError),
    "StreamBusy": (frameshm.FrameshmError, None),
    "CorruptStream": (frameshm.FrameshmError, None),
    "FrameTooLarge": (frameshm.FrameshmError, ValueError),
    "ResourceLimit": (frameshm.FrameshmError, OSError),
    "PermissionDenied": (frameshm.FrameshmError, PermissionError),
    "Timeout": (frameshm.FrameshmError, TimeoutError),
    "ProducerDead": (frameshm.Timeout, TimeoutError),
    "Overrun": (frameshm.FrameshmError, None),
    "StreamClosed": (frameshm.FrameshmError, ValueError),
    "InvalidState": (frameshm.FrameshmError, RuntimeError),
    "DriverUnavailable": (frameshm.FrameshmError, ConnectionError),
    "DriverRejected": (frameshm.FrameshmError, None),
    "LeaseLost": (frameshm.FrameshmError, None),
}


def _public(cls):
    methods, props, slots = [], [], []
    for n in dir(cls):
        if n.startswith("_"):
            continue
        attr = inspect.getattr_static(cls, n)
        if isinstance(attr, property) or inspect.isgetsetdescriptor(attr):   # Python or C
            props.append(n)
        elif inspect.ismemberdescriptor(attr):
            slots.append(n)
        elif callable(attr):
            methods.append(n)
        else:  # pragma: no cover - a new kind of public attribute: pin it too
            raise AssertionError(f"unclassified public attribute {cls.__name__}.{n}")
    return sorted(methods), sorted(props), sorted(slots)


def test_all_is_pinned():
    assert sorted(frameshm.__all__) == EXPECTED_ALL
    assert len(set(frameshm.__all__)) == len(frameshm.__all__)
    for n in frameshm.__all__:
        assert hasattr(frameshm, n), n


def test_version_is_a_string():
    assert isinstance(frameshm.__version__, str)
    assert frameshm.__version__.count(".") >= 1


def test_mode_constants():
    assert frameshm.MODE_STANDBY == 0
    assert frameshm.MODE_ALARMED == 1


def test_writer_public_surface():
    methods, props, slots = _public(frameshm.Writer)
    assert methods == WRITER_PUBLIC["methods"]
    assert props == WRITER_PUBLIC["properties"]
    assert slots == []
    assert hasattr(frameshm.Writer, "__enter__") and hasattr(frameshm.Writer, "__exit__")


def test_reader_public_surface():
    methods, props, slots = _public(frameshm.Reader)
    assert methods == READER_PUBLIC["methods"]
    assert props == READER_PUBLIC["properties"]
    assert slots == []
    for dunder in ("__enter__", "__exit__", "__iter__"):
        assert hasattr(frameshm.Reader, dunder), dunder


def test_frame_public_surface():
    methods, props, slots = _public(frameshm.Frame)
    assert methods == FRAME_PUBLIC["methods"]
    assert props == FRAME_PUBLIC["properties"]
    assert slots == FRAME_PUBLIC["slots"]
    for dunder in ("__array__", "__dlpack__", "__dlpack_device__"):
        assert hasattr(frameshm.Frame, dunder), dunder
    # Frames are small: no per-instance __dict__.
    assert "__dict__" not in vars(frameshm.Frame)


def test_writer_signature():
    sig = inspect.signature(frameshm.Writer.__init__)
    params = list(sig.parameters.values())[1:]
    assert [p.name for p in params] == [
        "name", "shape", "dtype", "nslots", "stream_id", "max_bytes", "pools", "base_dir",
        "namespace", "file_mode", "unlink_on_close", "driver", "publish_mode", "client_id", "fill_threads",
    ]
    kinds = {p.name: p.kind for p in params}
    for positional in ("name", "shape", "dtype", "nslots"):
        assert kinds[positional] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for kw in ("stream_id", "max_bytes", "pools", "base_dir", "namespace", "file_mode", "unlink_on_close",
               "driver", "publish_mode", "client_id", "fill_threads"):
        assert kinds[kw] is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["fill_threads"].default == 0
    assert sig.parameters["dtype"].default == "uint8"
    assert sig.parameters["nslots"].default == 4
    assert sig.parameters["file_mode"].default == 0o600
    assert sig.parameters["unlink_on_close"].default is True


def test_reader_signature():
    sig = inspect.signature(frameshm.Reader.__init__)
    params = list(sig.parameters.values())[1:]
    assert [p.name for p in params] == ["name", "consumer", "stream_id", "base_dir", "namespace", "spin", "subscribe",
                                        "max_rate_hz", "driver", "publish_mode", "client_id", "lease_events",
                                        "foreign", "queue"]
    assert sig.parameters["foreign"].default is False
    assert sig.parameters["queue"].default is True
    assert sig.parameters["foreign"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["spin"].default is True
    assert sig.parameters["subscribe"].default is True
    assert sig.parameters["max_rate_hz"].default == 0
    assert sig.parameters["driver"].default is None
    assert sig.parameters["lease_events"].default is False
    for kw in ("stream_id", "base_dir", "namespace", "spin", "subscribe", "max_rate_hz", "driver",
               "publish_mode", "client_id", "lease_events", "queue"):
        assert sig.parameters[kw].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("method", ["wait_latest", "wait_next"])
def test_wait_signatures(method):
    sig = inspect.signature(getattr(frameshm.Reader, method))
    assert list(sig.parameters) == ["self", "timeout"]
    assert sig.parameters["timeout"].default is None


def test_read_latest_signature():
    sig = inspect.signature(frameshm.Reader.read_latest)
    assert list(sig.parameters) == ["self", "copy"]
    assert sig.parameters["copy"].default is True


def test_publish_and_commit_signatures():
    assert list(inspect.signature(frameshm.Writer.publish).parameters) == ["self", "frame", "timestamp_ns", "ref_seq", "seq"]
    assert list(inspect.signature(frameshm.Writer.commit).parameters) == ["self", "timestamp_ns", "ref_seq"]
    assert list(inspect.signature(frameshm.Writer.loan).parameters) == ["self", "shape", "dtype"]
    assert list(inspect.signature(frameshm.Writer.close).parameters) == ["self", "unlink"]


def test_processor_surface():
    methods, props, slots = _public(frameshm.Processor)
    assert methods == ["close", "commit", "next", "run", "skip", "stats"]
    assert props == ["reader", "writer"]
    sig = inspect.signature(frameshm.Processor.__init__)
    assert list(sig.parameters)[1:] == ["source", "output", "out_shape", "out_dtype", "latest", "consumer",
                                        "driver", "base_dir", "namespace", "writer_kwargs"]


def test_admin_signatures():
    assert list(inspect.signature(frameshm.stream_info).parameters) == ["name", "stream_id", "base_dir", "namespace"]
    assert list(inspect.signature(frameshm.list_streams).parameters) == ["base_dir", "namespace", "sample_s"]
    assert list(inspect.signature(frameshm.gc).parameters) == ["base_dir", "namespace", "dry_run"]
    assert list(inspect.signature(frameshm.admin.gc_report).parameters) == ["base_dir", "namespace", "dry_run"]


@pytest.mark.parametrize("exc_name", sorted(EXCEPTIONS))
def test_exception_hierarchy(exc_name):
    exc = getattr(frameshm, exc_name)
    assert exc is getattr(errors, exc_name), "frameshm re-exports frameshm.errors' classes"
    parent, builtin = EXCEPTIONS[exc_name]
    assert issubclass(exc, parent)
    assert issubclass(exc, frameshm.FrameshmError)
    assert issubclass(exc, Exception)
    if builtin is not None:
        assert issubclass(exc, builtin), f"{exc_name} must also be a {builtin.__name__}"
    # No frameshm error is an accidental member of an unrelated builtin category.
    unrelated = {ValueError, FileNotFoundError, TimeoutError, OSError, RuntimeError, KeyError, LookupError}
    expected_builtins = {b for b in inspect.getmro(exc) if b.__module__ == "builtins"}
    for b in unrelated - expected_builtins:
        assert not issubclass(exc, b), f"{exc_name} must not be a {b.__name__}"


def test_exception_builtin_bases_exactly():
    bases = {
        name: sorted(b.__name__ for b in inspect.getmro(getattr(frameshm, name))
                     if getattr(builtins, b.__name__, None) is b and b not in (object, BaseException, Exception))
        for name in EXCEPTIONS
    }
    assert bases == {
        "FrameshmError": [],
        "InvalidArgument": ["ValueError"],
        "StreamNotFound": ["FileNotFoundError", "OSError"],
        "StreamBusy": [],
        "CorruptStream": [],
        "FrameTooLarge": ["ValueError"],
        "ResourceLimit": ["OSError"],
        "PermissionDenied": ["OSError", "PermissionError"],
        "Timeout": ["OSError", "TimeoutError"],
        "ProducerDead": ["OSError", "TimeoutError"],
        "Overrun": [],
        "StreamClosed": ["ValueError"],
        "InvalidState": ["RuntimeError"],
        "DriverUnavailable": ["ConnectionError", "OSError"],
        "DriverRejected": [],
        "LeaseLost": [],
    }


def test_errors_module_all():
    assert sorted(errors.__all__) == sorted(EXCEPTIONS)


def test_frame_is_a_numpy_array_like(name):
    with frameshm.Writer(name, shape=(2, 3), dtype="int16") as w, frameshm.Reader(name) as r:
        w.publish(np.arange(6, dtype=np.int16).reshape(2, 3))
        f = r.wait_latest(timeout=5)
        assert isinstance(f, frameshm.Frame)
        np.testing.assert_array_equal(np.asarray(f), np.arange(6).reshape(2, 3))
        assert np.asarray(f, dtype=np.float64).dtype == np.float64
        assert "seq=0" in repr(f)
        assert name in repr(w) and name in repr(r)
        del f


CAMERA_PUBLIC = {
    "methods": ["capture_to", "close", "flush", "formats", "frames", "read", "read_into", "set_rate", "start", "wait"],
    "properties": ["buffers", "bytesperline", "closed", "compressed", "converted", "dtype", "format", "fps",
                   "frame_bytes", "gone", "height", "info", "native_format", "rate_limit", "shape", "stats", "width"],
}
CAMERA_FRAME_PUBLIC = {
    "methods": ["copy", "release"],
    "properties": ["array", "latency_ns", "released"],
    "slots": ["dequeue_ns", "driver_timestamp", "index", "nbytes", "sequence", "timestamp_ns"],
}
# camera exception -> the builtin categories it must also be
CAMERA_EXCEPTIONS = {
    "CameraError": (),
    "DeviceNotFound": (FileNotFoundError,),
    "DevicePermissionError": (PermissionError,),
    "DeviceBusy": (OSError,),
    "DeviceGone": (OSError,),
    "UnsupportedFormat": (ValueError, frameshm.InvalidArgument),
    "NotACamera": (ValueError,),
    "V4L2Unavailable": (),
    "BuffersExhausted": (),
}


def test_camera_public_surface():
    methods, props, slots = _public(frameshm.Camera)
    assert methods == CAMERA_PUBLIC["methods"]
    assert props == CAMERA_PUBLIC["properties"]
    assert slots == []
    for dunder in ("__enter__", "__exit__", "__iter__"):
        assert hasattr(frameshm.Camera, dunder), dunder
    from frameshm.camera import CameraFrame

    methods, props, slots = _public(CameraFrame)
    assert (methods, props, slots) == (CAMERA_FRAME_PUBLIC["methods"], CAMERA_FRAME_PUBLIC["properties"],
                                       CAMERA_FRAME_PUBLIC["slots"])
    for dunder in ("__enter__", "__exit__", "__array__"):
        assert hasattr(CameraFrame, dunder), dunder


def test_camera_signature():
    sig = inspect.signature(frameshm.Camera.__init__)
    params = list(sig.parameters.values())[1:]
    assert [p.name for p in params] == ["device", "width", "height", "fps", "format", "buffers", "start"]
    assert sig.parameters["device"].default == "/dev/video0"
    assert sig.parameters["buffers"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["buffers"].default == 4
    assert sig.parameters["start"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["start"].default is True
    assert list(inspect.signature(frameshm.Camera.read).parameters) == ["self", "timeout"]
    assert list(inspect.signature(frameshm.Camera.read_into).parameters) == ["self", "out", "timeout"]
    assert list(inspect.signature(frameshm.Camera.capture_to).parameters) == ["self", "writer", "timeout"]
    assert list(inspect.signature(frameshm.Camera.flush).parameters) == ["self", "max_age"]


@pytest.mark.parametrize("exc_name", sorted(CAMERA_EXCEPTIONS))
def test_camera_exception_hierarchy(exc_name):
    from frameshm import camera

    exc = getattr(camera, exc_name)
    assert issubclass(exc, camera.CameraError) and issubclass(exc, frameshm.FrameshmError)
    for builtin in CAMERA_EXCEPTIONS[exc_name]:
        assert issubclass(exc, builtin), f"{exc_name} must also be a {builtin.__name__}"
    assert exc_name in camera.__all__
