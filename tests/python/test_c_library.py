"""libframeshm as a C user meets it (docs/c-api.md): real builds, real processes.

* ``make install PREFIX=/usr/local DESTDIR=<tmp>`` of this checkout, and docs/examples/c
  built against that tree with pkg-config (``PKG_CONFIG_SYSROOT_DIR``) and CMake, run with
  ``LD_LIBRARY_PATH``;
* the same example against the package's own copy (``frameshm.pkgconfig_dir()``, whose
  ``.pc`` carries an rpath: no ``LD_LIBRARY_PATH``) and through ``frameshm.cmake_dir()``;
* C producer -> Python ``Reader`` and Python ``Writer`` -> C consumer, every byte checked,
  and C -> C through the example's ``make run``;
* what the library exports (only ``FSHM_API`` symbols of the header), its SONAME, version
  agreement, the contract of tests/python/c_user_contract.c (versions, struct_size,
  per-thread errors, mappings outliving their reader under concurrent ref/unref);
* the Python package keeps Aravis, GLib and PipeWire out of a process until asked for.

Tools: make, a C compiler, pkg-config, nm, readelf; cmake for the CMake cases (each test
skips, saying which tool is missing, only when one is absent).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import frameshm
from frameshm import _core

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADER = REPO / "lib" / "include" / "frameshm" / "frameshm.h"
EXAMPLE = REPO / "docs" / "examples" / "c"
CONTRACT_C = pathlib.Path(__file__).resolve().parent / "c_user_contract.c"
PREFIX = "/usr/local"

# docs/examples/c/example.h
HEIGHT, WIDTH = 48, 64


def pattern(k: int) -> np.ndarray:
    """Frame k as producer.c fills it (example_byte())."""
    i = np.arange(HEIGHT * WIDTH, dtype=np.int64)
    return ((k * 7 + i * 13 + (i >> 8)) & 0xFF).astype(np.uint8).reshape(HEIGHT, WIDTH)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (needed to build and inspect C programs)")


def run(cmd, *, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs a command; on failure the assertion shows its output."""
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def header_text() -> str:
    return HEADER.read_text(encoding="utf-8")


def header_version() -> str:
    return re.search(r'#define FSHM_VERSION_STRING "([^"]+)"', header_text()).group(1)


def soversion() -> str:
    mk = (REPO / "build.mk").read_text(encoding="utf-8")
    return re.search(r"^FSHM_SOVERSION\s*:=\s*(\S+)", mk, re.M).group(1)


def env_without(*names: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


# ---- the two copies of the library --------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`make install PREFIX=/usr/local DESTDIR=<tmp>` of this checkout: the staged tree."""
    need("make", "cc")
    dest = tmp_path_factory.mktemp("destdir")
    run(["make", "-s", "install", f"PREFIX={PREFIX}", f"DESTDIR={dest}"], cwd=REPO)
    return dest


def installed_libdir(dest: pathlib.Path) -> pathlib.Path:
    return dest / PREFIX.lstrip("/") / "lib"


def package_libdir() -> pathlib.Path:
    return pathlib.Path(frameshm.get_library_dir())


def copy_example(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "example"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("producer", "consumer", "build"))
    return src


class Built:
    """The example's two programs, how to run them, and which libframeshm they must load."""

    def __init__(self, bindir: pathlib.Path, env: dict, libdir: pathlib.Path):
        self.producer = bindir / "producer"
        self.consumer = bindir / "consumer"
        self.env = env
        self.libdir = libdir


def build_example(flavour: str, tmp_path: pathlib.Path, request) -> Built:
    src = copy_example(tmp_path)
    if flavour.endswith("cmake"):
        need("cmake", "cc")
        if flavour.startswith("installed"):
            dest = request.getfixturevalue("installed")
            cmake_dir, libdir = installed_libdir(dest) / "cmake" / "frameshm", installed_libdir(dest)
        else:
            cmake_dir, libdir = pathlib.Path(frameshm.cmake_dir()), package_libdir()
        bindir = src / "build"
        run(["cmake", "-S", str(src), "-B", str(bindir), f"-Dframeshm_DIR={cmake_dir}"], timeout=300)
        run(["cmake", "--build", str(bindir)], timeout=300)
        # CMake links with the imported library's directory as the build tree's rpath.
        return Built(bindir, env_without("LD_LIBRARY_PATH"), libdir)
    need("make", "cc", "pkg-config")
    if flavour == "installed-pkgconfig":
        dest = request.getfixturevalue("installed")
        libdir = installed_libdir(dest)
        # The staged frameshm.pc says prefix=/usr/local: the sysroot puts -I/-L inside DESTDIR.
        env = env_without("PKG_CONFIG_PATH", "LD_LIBRARY_PATH", PKG_CONFIG_PATH=str(libdir / "pkgconfig"),
                          PKG_CONFIG_SYSROOT_DIR=str(dest))
        run(["make", "-C", str(src)], env=env)
        return Built(src, env_without("LD_LIBRARY_PATH", LD_LIBRARY_PATH=str(libdir)), libdir)
    env = env_without("PKG_CONFIG_PATH", "PKG_CONFIG_SYSROOT_DIR", "LD_LIBRARY_PATH",
                      PKG_CONFIG_PATH=frameshm.pkgconfig_dir())
    run(["make", "-C", str(src)], env=env)
    return Built(src, env_without("LD_LIBRARY_PATH"), package_libdir())


FLAVOURS = ["installed-pkgconfig", "installed-cmake", "package-pkgconfig", "package-cmake"]


@pytest.fixture(params=FLAVOURS)
def built(request, tmp_path):
    return build_example(request.param, tmp_path, request)


def loaded_libframeshm(pid: int, timeout: float = 10.0) -> str:
    """Path of the libframeshm the process mapped (once the loader has mapped it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "libframeshm.so" in line:
                        return line.split(None, 5)[5].strip()
        except FileNotFoundError:
            break
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never mapped libframeshm")


def assert_loads_from(proc: subprocess.Popen, libdir: pathlib.Path) -> None:
    path = loaded_libframeshm(proc.pid)
    assert os.path.realpath(os.path.dirname(path)) == os.path.realpath(libdir), (
        f"the program loaded {path}, not the libframeshm in {libdir}")


def finish(proc: subprocess.Popen, what: str, timeout: float = 30.0) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{what} did not finish: {out}\n{err}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out


# ---- frames between C and Python -----------------------------------------------------


def wait_registered(name: str, timeout: float = 10.0) -> None:
    """Until a live consumer is registered on the stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(c["alive"] for c in frameshm.stream_info(name)["consumers"]):
                return
        except frameshm.StreamNotFound:
            pass
        assert time.monotonic() < deadline, "the C consumer never registered"
        time.sleep(0.01)


N = 120


def taken(name: str) -> int:
    """How many frames the stream's consumer has taken (its newest seq + 1)."""
    return max((c["last_seq_plus1"] for c in frameshm.stream_info(name)["consumers"]), default=0)


def test_c_producer_to_python_reader(built, name):
    producer = subprocess.Popen([str(built.producer), name, str(N)], env=built.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert_loads_from(producer, built.libdir)   # it waits for a consumer meanwhile
        with frameshm.Reader(name, consumer="py-check") as r:
            for k in range(N):
                f = r.wait_next(timeout=10)
                assert f.skipped == 0, f"frame {k}: {f.skipped} lost"
                assert f.shape == (HEIGHT, WIDTH) and f.dtype == np.uint8
                assert np.array_equal(f.array, pattern(k)), f"frame {k} differs"
                assert f.valid()
            out = finish(producer, "C producer")
        assert f"{N} frames published" in out
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()


def test_python_writer_to_c_consumer(built, name):
    consumer = subprocess.Popen([str(built.consumer), name, str(N)], env=built.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert_loads_from(consumer, built.libdir)
        wait_registered(name)   # a frame published before that would not be its to take
        # The producer never blocks: a consumer that falls more than its descriptor queue
        # behind loses frames (as it should). The test stays a few frames ahead of what the
        # consumer has taken, so that every frame is its to check however loaded the machine.
        with frameshm.Writer(name, shape=(HEIGHT, WIDTH), dtype="uint8", nslots=16) as w:
            for k in range(N):
                deadline = time.monotonic() + 30
                while k - taken(name) >= 4:
                    assert time.monotonic() < deadline, f"the C consumer stopped taking frames at {taken(name)}"
                    assert consumer.poll() is None, consumer.communicate()
                    time.sleep(0.0005)
                w.publish(pattern(k))
            out = finish(consumer, "C consumer")
        assert f"{N} frames checked" in out
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()


def test_c_consumer_detects_a_wrong_frame(name, tmp_path, request):
    """The consumer's check can fail: frames that are not the pattern make it exit 1."""
    b = build_example("package-pkgconfig", tmp_path, request)
    consumer = subprocess.Popen([str(b.consumer), name, "3"], env=b.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_registered(name)
        with frameshm.Writer(name, shape=(HEIGHT, WIDTH), dtype="uint8", nslots=8) as w:
            w.publish(pattern(0))
            bad = pattern(1)
            bad[20, 30] ^= 1
            w.publish(bad)
            out, err = consumer.communicate(timeout=30)
        assert consumer.returncode == 1, (out, err)
        assert "frame 1" in err and "byte 1310" in err
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()


@pytest.mark.parametrize("where", ["installed", "package"])
def test_example_make_run(where, tmp_path, request):
    """C producer -> C consumer through the example's own `make run` (what `make example`
    runs): it exits 0 only if every frame arrived intact."""
    need("make", "cc", "pkg-config")
    src = copy_example(tmp_path)
    if where == "installed":
        dest = request.getfixturevalue("installed")
        # As the top-level `make example PREFIX=/usr/local DESTDIR=<dest>` calls it.
        args = [f"DESTDIR={dest}", f"PKG_CONFIG_PATH={installed_libdir(dest) / 'pkgconfig'}"]
    else:
        args = [f"PKG_CONFIG_PATH={frameshm.pkgconfig_dir()}"]
    p = run(["make", "-s", "-C", str(src), "run", "N=150", f"STREAM=mk-{where}", *args],
            env=env_without("PKG_CONFIG_PATH", "PKG_CONFIG_SYSROOT_DIR", "LD_LIBRARY_PATH"), timeout=300)
    assert "consumer: 150 frames checked" in p.stdout and "example OK" in p.stdout


def test_package_pkgconfig_links_with_an_rpath(tmp_path, request):
    b = build_example("package-pkgconfig", tmp_path, request)
    need("readelf")
    dyn = run(["readelf", "-d", str(b.producer)]).stdout
    assert "libframeshm.so." + soversion() in dyn
    paths = re.search(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dyn)
    assert paths, dyn
    assert any(os.path.realpath(p) == os.path.realpath(package_libdir()) for p in paths.group(1).split(":"))


# ---- what the library promises a C program --------------------------------------------


@pytest.mark.parametrize("where", ["installed", "package"])
def test_c_user_contract(where, tmp_path, request, name):
    """tests/python/c_user_contract.c: versions, struct_size rules, per-thread errors,
    mappings that outlive their reader under concurrent ref/unref."""
    need("cc", "pkg-config")
    if where == "installed":
        dest = request.getfixturevalue("installed")
        libdir = installed_libdir(dest)
        pc_env = env_without("LD_LIBRARY_PATH", PKG_CONFIG_PATH=str(libdir / "pkgconfig"),
                             PKG_CONFIG_SYSROOT_DIR=str(dest))
        run_env = env_without("LD_LIBRARY_PATH", LD_LIBRARY_PATH=str(libdir))
    else:
        pc_env = env_without("PKG_CONFIG_SYSROOT_DIR", PKG_CONFIG_PATH=frameshm.pkgconfig_dir())
        run_env = env_without("LD_LIBRARY_PATH")
    flags = run(["pkg-config", "--cflags", "--libs", "frameshm"], env=pc_env).stdout.split()
    exe = tmp_path / "c_user_contract"
    run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", str(CONTRACT_C),
         "-o", str(exe), *flags], env=pc_env)
    p = subprocess.run([str(exe), name], env=run_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.split("\n")[:4] == [f"ok version {header_version()}", "ok struct_size", "ok errors",
                                        "ok mappings"]


def exported_symbols(lib: pathlib.Path) -> set:
    out = run(["nm", "-D", "--defined-only", str(lib)]).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def declared_api() -> set:
    text = re.sub(r"/\*.*?\*/", "", header_text(), flags=re.S)
    names = set(re.findall(r"^\s*FSHM_API\b[^;(]*?\b(fshm_\w+)\s*\(", text, re.M))
    assert len(names) > 40, "the header parse found too few FSHM_API functions"
    return names


@pytest.mark.parametrize("where", ["installed", "package"])
def test_exports_only_the_public_api(where, request):
    need("nm", "readelf")
    if where == "installed":
        libdir = installed_libdir(request.getfixturevalue("installed"))
        lib = libdir / f"libframeshm.so.{header_version()}"
        assert os.readlink(libdir / f"libframeshm.so.{soversion()}") == lib.name
        assert os.readlink(libdir / "libframeshm.so") == f"libframeshm.so.{soversion()}"
    else:
        lib = package_libdir() / f"libframeshm.so.{soversion()}"
    assert exported_symbols(lib) == declared_api()
    dyn = run(["readelf", "-d", str(lib)]).stdout
    assert re.search(r"\(SONAME\).*\[libframeshm\.so\.0\]", dyn), dyn
    # The SONAME carries the header's major version.
    assert soversion() == header_version().split(".")[0]


def test_versions_agree(installed):
    need("pkg-config")
    v = header_version()
    assert _core.VERSION_STRING == v   # fshm_version_string() of the loaded library
    major, minor, patch = (int(x) for x in v.split("."))
    assert _core.VERSION == _core.HEADER_VERSION == major * 10000 + minor * 100 + patch
    assert frameshm.clib.library_version() == v
    for pcdir, extra in ((pathlib.Path(frameshm.pkgconfig_dir()), {}),
                         (installed_libdir(installed) / "pkgconfig", {"PKG_CONFIG_SYSROOT_DIR": str(installed)})):
        pc = (pcdir / "frameshm.pc").read_text(encoding="utf-8")
        assert re.search(r"^Version: (\S+)$", pc, re.M).group(1) == v
        env = env_without("PKG_CONFIG_PATH", PKG_CONFIG_PATH=str(pcdir), **extra)
        assert run(["pkg-config", "--modversion", "frameshm"], env=env).stdout.strip() == v
        cmake_version = (pcdir.parent / "cmake" / "frameshm" / "frameshmConfigVersion.cmake").read_text()
        assert f'set(PACKAGE_VERSION "{v}")' in cmake_version
    assert (installed_libdir(installed) / f"libframeshm.so.{v}").is_file()
    assert (installed / PREFIX.lstrip("/") / "include" / "frameshm" / "frameshm.h").read_bytes() == HEADER.read_bytes()


# ---- optional libraries stay out of a process until asked for ---------------------------

OPTIONAL_LIBS = ("libaravis", "libglib-2.0", "libgobject-2.0", "libgio-2.0", "libpipewire", "libspa")

PROBE = textwrap.dedent(
    """
    import json, sys
    def mapped():
        with open("/proc/self/maps") as f:
            paths = {l.split(None, 5)[5].strip() for l in f if len(l.split(None, 5)) == 6}
        return sorted(p for p in paths if any(k in p for k in %r) or "/_gige." in p or "/_virtualcam." in p)
    steps = {}
    import frameshm, numpy as np
    w = frameshm.Writer(sys.argv[1], shape=(4, 4), dtype="uint8", nslots=2)
    w.publish(np.zeros((4, 4), np.uint8))
    r = frameshm.Reader(sys.argv[1], subscribe=False)
    r.read_latest(copy=True)
    r.close(); w.close()
    steps["writer"] = mapped()
    import frameshm.gige, frameshm.virtualcam
    steps["import"] = mapped()
    if sys.argv[2] == "have":
        steps["have_aravis"] = bool(frameshm.gige.HAVE_ARAVIS)
        steps["gige"] = mapped()
        steps["have_pipewire"] = bool(frameshm.virtualcam.HAVE_PIPEWIRE)
        steps["virtualcam"] = mapped()
    else:
        try:
            frameshm.GigECamera("Fake_1", start=False).close()
        except frameshm.gige.GigEUnavailable:
            pass
        steps["have_aravis"] = bool(frameshm.gige.HAVE_ARAVIS)
        steps["gige"] = mapped()
    print(json.dumps(steps))
    """ % (OPTIONAL_LIBS,)
)


@pytest.mark.parametrize("how", ["have", "construct"])
def test_optional_libraries_load_only_when_used(how, name):
    import json

    p = subprocess.run([sys.executable, "-c", PROBE, name, how], capture_output=True, text=True, timeout=60,
                       env=os.environ.copy())
    assert p.returncode == 0, p.stdout + p.stderr
    steps = json.loads(p.stdout.strip().splitlines()[-1])
    assert steps["writer"] == [], f"moving frames mapped {steps['writer']}"
    assert steps["import"] == [], f"importing frameshm.gige/.virtualcam mapped {steps['import']}"

    gige = steps["gige"]
    assert any("/_gige." in m for m in gige), gige
    if steps["have_aravis"]:
        assert any("libaravis" in m for m in gige) and any("libglib-2.0" in m for m in gige), gige
    assert not any("libpipewire" in m or "/_virtualcam." in m for m in gige), gige
    if how == "have":
        vc = steps["virtualcam"]
        assert any("/_virtualcam." in m for m in vc), vc
        if steps["have_pipewire"]:
            assert any("libpipewire" in m for m in vc), vc
