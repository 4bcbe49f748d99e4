"""Pins frameshm's one exception hierarchy: every error frameshm raises derives from
FrameshmError and from the builtin category users catch; each class is one object
wherever it is exported; every class pickles; a real EACCES is PermissionDenied.

Wrong argument *types* stay plain TypeError (the Python convention, like the builtins'):
they are programming errors, not conditions to handle. Bad values of the right type are
InvalidArgument (a ValueError). test_type_errors_stay_builtin pins that split.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import os
import pickle
import pkgutil
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import frameshm
from frameshm import _core

# "module.Class" -> (its frameshm parents, exactly the builtin categories it also is).
# The builtin tuples list every builtin exception class in the MRO between the class and
# Exception, so a class acquiring or losing a category fails here.
HIERARCHY = {
    # the transport (frameshm, frameshm.errors)
    "frameshm.FrameshmError": ((), ()),
    "frameshm.InvalidArgument": (("FrameshmError",), ("ValueError",)),
    "frameshm.StreamNotFound": (("FrameshmError",), ("FileNotFoundError", "OSError")),
    "frameshm.StreamBusy": (("FrameshmError",), ()),
    "frameshm.CorruptStream": (("FrameshmError",), ()),
    "frameshm.FrameTooLarge": (("FrameshmError",), ("ValueError",)),
    "frameshm.ResourceLimit": (("FrameshmError",), ("OSError",)),
    "frameshm.PermissionDenied": (("FrameshmError",), ("PermissionError", "OSError")),
    "frameshm.Timeout": (("FrameshmError",), ("TimeoutError", "OSError")),
    "frameshm.ProducerDead": (("Timeout",), ("TimeoutError", "OSError")),
    "frameshm.Overrun": (("FrameshmError",), ()),
    "frameshm.StreamClosed": (("FrameshmError",), ("ValueError",)),
    "frameshm.InvalidState": (("FrameshmError",), ("RuntimeError",)),
    "frameshm.DriverUnavailable": (("FrameshmError",), ("ConnectionError", "OSError")),
    "frameshm.DriverRejected": (("FrameshmError",), ()),
    "frameshm.LeaseLost": (("FrameshmError",), ()),
    # capture devices
    "frameshm.camera.CameraError": (("FrameshmError",), ()),
    "frameshm.camera.DeviceNotFound": (("CameraError",), ("FileNotFoundError", "OSError")),
    "frameshm.camera.DevicePermissionError": (("CameraError",), ("PermissionError", "OSError")),
    "frameshm.camera.DeviceBusy": (("CameraError",), ("OSError",)),
    "frameshm.camera.DeviceGone": (("CameraError",), ("OSError",)),
    "frameshm.camera.UnsupportedFormat": (("CameraError", "InvalidArgument"), ("ValueError",)),
    "frameshm.camera.NotACamera": (("CameraError",), ("ValueError",)),
    "frameshm.camera.V4L2Unavailable": (("CameraError",), ()),
    "frameshm.camera.BuffersExhausted": (("CameraError",), ()),
    "frameshm.gige.GigEUnavailable": (("CameraError",), ()),
    "frameshm.gige.AravisError": (("CameraError",), ()),
    # virtual camera
    "frameshm.virtualcam.PipeWireUnavailable": (("FrameshmError",), ()),
    "frameshm.virtualcam.PipeWireError": (("FrameshmError",), ("ConnectionError", "OSError")),
    "frameshm.virtualcam.UnsupportedStream": (("InvalidArgument",), ("ValueError",)),
    # pipeline level, defined in Python on top of the C classes
    "frameshm.config.ConfigError": (("InvalidArgument",), ("ValueError",)),
    "frameshm.detectors.DetectorError": (("InvalidArgument",), ("ValueError",)),
    "frameshm.driver.config.DriverConfigError": (("ConfigError",), ("ValueError",)),
    "frameshm.driver.server.DriverError": (("FrameshmError",), ("OSError",)),
    "frameshm.driver.protocol.DecodeError": (("FrameshmError",), ("ValueError",)),
    "frameshm.sources.SourceGone": (("FrameshmError",), ("OSError",)),
    "frameshm.recording.RecordingError": (("FrameshmError",), ()),
    "frameshm.bridge.BridgeError": (("FrameshmError",), ()),
}

# Where each class is exported besides its home (its __module__): all must be the same object.
EXPORTED_AS = {
    "frameshm.errors": [k.split(".")[1] for k in HIERARCHY if k.count(".") == 1],
    "frameshm._core": [k.rsplit(".", 1)[1] for k in HIERARCHY
                       if k.rsplit(".", 1)[0] in ("frameshm", "frameshm.camera", "frameshm.gige",
                                                  "frameshm.virtualcam")],
    "frameshm.driver": ["DriverConfigError", "DriverError"],
}

PUBLIC_MODULES = ["frameshm", "frameshm.errors", "frameshm.camera", "frameshm.gige", "frameshm.virtualcam"]


def _cls(dotted: str) -> type:
    mod, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


def _builtin_categories(cls: type) -> tuple:
    return tuple(b.__name__ for b in cls.__mro__[1:]
                 if getattr(builtins, b.__name__, None) is b and b not in (object, BaseException, Exception))


@pytest.mark.parametrize("dotted", sorted(HIERARCHY))
def test_class_is_in_the_hierarchy(dotted):
    cls = _cls(dotted)
    parents, categories = HIERARCHY[dotted]
    assert issubclass(cls, frameshm.FrameshmError)
    assert f"{cls.__module__}.{cls.__qualname__}" == dotted, "the class lives (and pickles) where it is documented"
    assert tuple(b.__name__ for b in cls.__bases__ if not getattr(builtins, b.__name__, None) is b) == parents
    assert _builtin_categories(cls) == categories
    assert cls.__doc__, f"{dotted} has no docstring"


def _exception_classes_in_package():
    """Every exception class defined by, or visible in, any frameshm module."""
    found = {}
    for info in pkgutil.walk_packages(frameshm.__path__, "frameshm."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__.startswith("frameshm"):
                found.setdefault(obj, []).append(f"{info.name}.{name}")
    return found


# Not errors: control flow that, like KeyboardInterrupt, derives from BaseException so that
# no `except Exception` in user code swallows a stop request. Private, never raised to users.
CONTROL_FLOW = {"frameshm._signals.StopRequested"}


def test_every_exception_class_in_the_package_is_pinned():
    found = {cls: where for cls, where in _exception_classes_in_package().items()
             if f"{cls.__module__}.{cls.__qualname__}" not in CONTROL_FLOW}
    homes = {f"{cls.__module__}.{cls.__qualname__}": where for cls, where in found.items()}
    assert sorted(homes) == sorted(HIERARCHY), "a new exception class needs a place in HIERARCHY"
    for cls, where in found.items():
        assert issubclass(cls, frameshm.FrameshmError), f"{where} is not a FrameshmError"


def test_public_modules_export_their_classes():
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(mod_name)
        mine = [k.rsplit(".", 1)[1] for k in HIERARCHY if k.rsplit(".", 1)[0] == mod_name]
        for name in mine:
            assert name in getattr(mod, "__all__", ()), f"{mod_name}.__all__ lacks {name}"
    errors = importlib.import_module("frameshm.errors")
    assert sorted(errors.__all__) == sorted(EXPORTED_AS["frameshm.errors"])


@pytest.mark.parametrize("where", sorted(EXPORTED_AS))
def test_classes_are_the_same_objects_everywhere(where):
    mod = importlib.import_module(where)
    homes = {k.rsplit(".", 1)[1]: k for k in HIERARCHY}
    for name in EXPORTED_AS[where]:
        assert getattr(mod, name) is _cls(homes[name]), f"{where}.{name} is another class"
    # the transport's classes, re-exported by the package
    for name in EXPORTED_AS["frameshm.errors"]:
        assert getattr(frameshm, name) is getattr(frameshm.errors, name) is getattr(_core, name)


def _instance(cls: type) -> BaseException:
    if cls.__name__ == "DecodeError":
        from frameshm.driver.protocol import Code

        return cls(Code.INVALID_PARAMS, "malformed AttachRequest: short", 77, 3)
    if issubclass(cls, OSError):
        return cls(13, "a message")
    return cls("a message")


@pytest.mark.parametrize("dotted", sorted(HIERARCHY))
def test_pickles(dotted):
    cls = _cls(dotted)
    exc = _instance(cls)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert back.args == exc.args and str(back) == str(exc)
    if isinstance(exc, OSError):
        assert (back.errno, back.strerror) == (exc.errno, exc.strerror)
    if cls.__name__ == "DecodeError":
        assert (back.code, back.message, back.correlation_id, back.template_id) == \
               (exc.code, exc.message, exc.correlation_id, exc.template_id)


def test_transport_errors_raised_by_c_keep_errno():
    with pytest.raises(frameshm.StreamNotFound) as ei:
        frameshm.stream_info("nobody_publishes_this")
    assert isinstance(ei.value, FileNotFoundError) and ei.value.errno == 2
    back = pickle.loads(pickle.dumps(ei.value))
    assert type(back) is frameshm.StreamNotFound and back.errno == 2 and str(back) == str(ei.value)


@pytest.fixture
def unwritable_base():
    """A base directory this process may not create its user directory in, reachable by
    every user (pytest's tmp_path is 0700 root's)."""
    d = tempfile.mkdtemp(prefix="frameshm-eacces-")
    os.chmod(d, 0o555)
    yield d
    os.chmod(d, 0o755)
    shutil.rmtree(d)


def _writer_error_in(base: str) -> BaseException:
    try:
        frameshm.Writer("eacces", shape=(4,), base_dir=base).close()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError("the writer was created in an unwritable directory")


def test_a_real_eacces_is_permission_denied(unwritable_base):
    if os.geteuid() != 0:
        exc = _writer_error_in(unwritable_base)
        got = (type(exc).__name__, isinstance(exc, PermissionError), isinstance(exc, frameshm.FrameshmError),
               exc.errno if isinstance(exc, OSError) else None, str(exc))
    else:
        # root ignores file modes: the kernel's EACCES needs another user, in a child
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                exc = _writer_error_in(unwritable_base)
                msg = repr((type(exc).__name__, isinstance(exc, PermissionError),
                            isinstance(exc, frameshm.FrameshmError),
                            exc.errno if isinstance(exc, OSError) else None, str(exc)))
                os.write(w, msg.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, data
        got = ast.literal_eval(data.decode())
    name, is_perm, is_fshm, errno_, msg = got
    assert (name, is_perm, is_fshm, errno_) == ("PermissionDenied", True, True, 13), got
    assert "Permission denied" in msg and unwritable_base in msg


def test_python_level_errors_are_raised_as_frameshm_errors(tmp_path):
    from frameshm import config
    from frameshm.driver import Driver, DriverError
    from frameshm.driver import protocol as P
    from frameshm.driver.config import DriverConfig
    from frameshm.sources import open_source

    with pytest.raises(frameshm.InvalidArgument, match="unknown role"):
        config.PipelineConfig().metrics_stream("painter")
    sock = tmp_path / "driver.sock"
    sock.write_text("")
    with pytest.raises(DriverError, match="not a socket") as ei:
        Driver(DriverConfig(socket=str(sock)))._check_socket_free()
    assert isinstance(ei.value, OSError)
    with pytest.raises(P.DecodeError) as ei:
        P.decode(b"\x00" * 4)
    assert isinstance(ei.value, ValueError) and ei.value.code == P.Code.INVALID_PARAMS
    # a source used before open() is a state error, not a bad argument
    src = open_source("v4l2:/dev/video-frameshm-none")
    with pytest.raises(frameshm.InvalidState, match="not open"):
        src.read_into(np.empty(4, np.uint8), 0.1)


def test_type_errors_stay_builtin():
    """Wrong argument types raise TypeError, deliberately not a FrameshmError."""
    for make in (lambda: frameshm.Reader(123),
                 lambda: frameshm.Reader("x", consumer=5),
                 lambda: frameshm.Writer("x", shape=(2,), base_dir=5)):
        with pytest.raises(TypeError) as ei:
            make()
        assert not isinstance(ei.value, frameshm.FrameshmError)
    from frameshm.driver import protocol as P

    with pytest.raises(TypeError):
        P.encode(object())
    # the right type with a bad value is InvalidArgument
    with pytest.raises(frameshm.InvalidArgument):
        frameshm.Reader("bad name!")


def _fresh_python(code: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(frameshm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_frameshm_loads_no_device_extension():
    loaded = _fresh_python("import sys, frameshm; print(sorted(m for m in sys.modules if m.startswith('frameshm')))")
    loaded = ast.literal_eval(loaded)
    assert "frameshm._core" in loaded
    for lazy in ("frameshm._gige", "frameshm._virtualcam", "frameshm.roles", "frameshm.driver", "frameshm.sources"):
        assert lazy not in loaded, f"import frameshm loaded {lazy}"


def test_import_frameshm_errors_alone():
    out = _fresh_python(
        "import sys, frameshm.errors as e\n"
        "assert issubclass(e.PermissionDenied, PermissionError)\n"
        "print(sorted(m for m in sys.modules if m.startswith('frameshm.')))\n"
    )
    loaded = ast.literal_eval(out)
    assert not [m for m in loaded if m.startswith(("frameshm.roles", "frameshm.driver", "frameshm.sources"))]
    assert "frameshm._gige" not in loaded and "frameshm._virtualcam" not in loaded


@pytest.mark.parametrize("make", [
    lambda: frameshm.Writer("cam\x00evil", shape=(4,)),
    lambda: frameshm.Reader("cam\x00evil"),
    lambda: frameshm.Reader("cam", consumer="a\x00b"),
    lambda: frameshm.stream_info("cam\x00evil"),
    lambda: frameshm.Writer("cam", shape=(4,), base_dir="/tmp\x00/x"),
])
def test_a_nul_in_a_name_is_refused_not_cut(make, shm_base):
    with pytest.raises(frameshm.InvalidArgument, match="NUL"):
        make()
    assert not (shm_base / "cam").exists()
    assert not list(shm_base.rglob("cam*")), "nothing was created under the cut name"


def test_frameshm_limits_carry_no_errno_zero(name):
    with frameshm.Writer(name, shape=(4,)) as w:
        readers = []
        try:
            with pytest.raises(frameshm.ResourceLimit) as ei:
                for _ in range(65):
                    readers.append(frameshm.Reader(name))
            assert "Errno 0" not in str(ei.value) and "64 consumers" in str(ei.value)
            assert len(readers) == 64
        finally:
            for r in readers:
                r.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_local_user_gets_permission_denied(name, shm_base):
    """A private stream (0600 files, 0700 directories) opened by another local user: the
    error is PermissionDenied (a FrameshmError and a PermissionError), for both roles."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    shm_base.chmod(0o755)  # the base itself is traversable, the user's directory is not
    with frameshm.Writer(name, shape=(4,)) as w:
        w.publish(np.zeros(4, np.uint8))
        code = (
            "import os, sys, frameshm\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            "for make in (lambda: frameshm.Reader(sys.argv[1], base_dir=sys.argv[2]),\n"
            "             lambda: frameshm.Writer(sys.argv[1], shape=(4,), base_dir=sys.argv[2])):\n"
            "    try:\n"
            "        make(); print('OPENED')\n"
            "    except frameshm.FrameshmError as e:\n"
            "        print(type(e).__name__, isinstance(e, PermissionError))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(frameshm.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        env.pop("FRAMESHM_DIR", None)
        out = subprocess.run([sys.executable, "-c", code, name, str(shm_base)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        assert lines[:2] == ["PermissionDenied True"] * 2, out.stdout + out.stderr
