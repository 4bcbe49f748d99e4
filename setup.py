"""Builds frameshm's native parts: libframeshm (the C transport library, shipped inside the
package with its headers, pkg-config and CMake files) and the extension modules that are
its clients (_core: transport binding + V4L2; _gige: Aravis; _virtualcam: PipeWire).

How the C code is compiled is defined once, in build.mk (the Makefile reads it too). Only
a C compiler and the Python headers are needed: optional libraries are looked up with
pkg-config and a feature whose library is missing is built out; the build prints which
(and how to get them). When the set of features found changes (a library was installed),
everything is recompiled even in a reused build/ directory.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_build_mk(path=os.path.join(HERE, "build.mk")):
    """`NAME := value` lines of build.mk (with `\\` continuations) as a dict of strings."""
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_]+)\s*:=\s*(.*)$", line)
        if m:
            out[m.group(1)] = " ".join(m.group(2).split())
    return out


def header_version():
    text = open(os.path.join(HERE, "lib/include/frameshm/frameshm.h"), encoding="utf-8").read()
    return re.search(r'#define FSHM_VERSION_STRING "([^"]+)"', text).group(1)


MK = read_build_mk()
LIB_VERSION = header_version()
SOVERSION = MK["FSHM_SOVERSION"]
SONAME = f"libframeshm.so.{SOVERSION}"
# Test-only hooks (FRAMESHM_V4L2_BACKEND) are compiled in only when the build asks for them:
# the test command builds with FRAMESHM_TEST_BUILD=1; wheels and plain installs never do.
TEST_MACROS = [("FSHM_TEST_HOOKS", "1")] if os.environ.get("FRAMESHM_TEST_BUILD") == "1" else []


def pkg_config(modules):
    """(cflags, libs) of the pkg-config modules, or None when any is missing."""
    if not shutil.which("pkg-config"):
        return None
    try:
        args = ["pkg-config", *modules.split()]
        subprocess.run([*args[:1], "--exists", *args[1:]], check=True, capture_output=True)
        cflags = subprocess.run([*args[:1], "--cflags", *args[1:]], check=True, capture_output=True, text=True)
        libs = subprocess.run([*args[:1], "--libs", *args[1:]], check=True, capture_output=True, text=True)
        return shlex.split(cflags.stdout), shlex.split(libs.stdout)
    except (subprocess.CalledProcessError, OSError):
        return None


def probe_features():
    feats = {}
    for name in MK["FSHM_FEATURES"].split():
        pkg = MK[f"FSHM_FEATURE_{name}_PKG"]
        feats[name] = {
            "pkg": pkg,
            "macro": MK[f"FSHM_FEATURE_{name}_MACRO"],
            "apt": MK[f"FSHM_FEATURE_{name}_APT"],
            "what": MK[f"FSHM_FEATURE_{name}_WHAT"],
            "found": pkg_config(pkg),
        }
    return feats


def feature_summary(feats):
    lines = [f"frameshm {LIB_VERSION}: libframeshm ({SONAME}) and these optional features:"]
    for name, f in feats.items():
        if f["found"]:
            lines.append(f"  [x] {name:9} {f['what']} (pkg-config {f['pkg']})")
        else:
            lines.append(f"  [ ] {name:9} {f['what']}: BUILT OUT, pkg-config found no {f['pkg']}; "
                         f"to get it: apt-get install {f['apt']}, then reinstall frameshm")
    if TEST_MACROS:
        lines.append("  test hooks compiled in (FRAMESHM_TEST_BUILD=1): not a product build")
    return "\n".join(lines)


PC_WHEEL = """\
# libframeshm as shipped inside the frameshm Python package (frameshm.pkgconfig_dir()).
prefix=${{pcfiledir}}/../..
libdir=${{prefix}}/lib
includedir=${{prefix}}/include

Name: frameshm
Description: Shared-memory frame and tensor streams between processes (SHM Tensor Pool wire spec v1.2)
Version: {version}
Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -lframeshm
Libs.private: -lrt -pthread
Cflags: -I${{includedir}}
"""

def _newer(sources, target):
    """True when target is missing or older than any of sources."""
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(os.path.join(HERE, s)) > t for s in sources)


def _write_if_changed(path, text):
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


class BuildFrameshm(build_ext):
    """build_ext that first builds libframeshm into the package (frameshm/lib, include),
    then the extensions linked against it (rpath $ORIGIN/lib)."""

    def run(self):
        feats = probe_features()
        summary = feature_summary(feats)
        print(summary, flush=True)
        # A build/ left by an install without some library holds objects compiled with the
        # feature off and extensions newer than their sources: setuptools would reuse them.
        # Recompile everything when the set of features (or the compiler flags) changed.
        os.makedirs(self.build_temp, exist_ok=True)
        stamp = os.path.join(self.build_temp, "frameshm-features.txt")
        key = repr(sorted((n, f["found"]) for n, f in feats.items())) + repr(sorted(MK.items())) + repr(TEST_MACROS)
        if not os.path.exists(stamp) or open(stamp, encoding="utf-8").read() != key:
            self.force = True
        self._feats, self._summary = feats, summary
        super().run()
        _write_if_changed(stamp, key)


    def build_extensions(self):
        # Runs once the compiler is set up: the library first, then its clients.
        self._pkg_dir = pkg_dir = os.path.dirname(self.get_ext_fullpath("frameshm._core"))
        self._build_library(pkg_dir)
        _write_if_changed(os.path.join(pkg_dir, "_build_features.txt"), self._summary + "\n")
        for ext in self.extensions:
            self._configure(ext, self._feats, pkg_dir)
        super().build_extensions()

    def copy_extensions_to_source(self):
        # In-place (editable) builds: setuptools copies the extensions; the library too.
        super().copy_extensions_to_source()
        src = self.get_finalized_command("build_py").get_package_dir("frameshm")
        for sub in ("lib", "include"):
            shutil.copytree(os.path.join(self._pkg_dir, sub), os.path.join(src, sub), dirs_exist_ok=True)
        shutil.copyfile(os.path.join(self._pkg_dir, "_build_features.txt"), os.path.join(src, "_build_features.txt"))

    # -- libframeshm ---------------------------------------------------------------------

    def _build_library(self, pkg_dir):
        libdir = os.path.join(pkg_dir, "lib")
        incdir = os.path.join(pkg_dir, "include", "frameshm")
        os.makedirs(os.path.join(libdir, "pkgconfig"), exist_ok=True)
        os.makedirs(os.path.join(libdir, "cmake", "frameshm"), exist_ok=True)
        os.makedirs(incdir, exist_ok=True)
        for h in MK["FSHM_PUBLIC_HEADERS"].split():
            shutil.copyfile(os.path.join(HERE, h), os.path.join(incdir, os.path.basename(h)))
        sources = MK["FSHM_LIB_SOURCES"].split()
        target = os.path.join(libdir, SONAME)
        deps = sources + [os.path.join("lib/src", f) for f in os.listdir(os.path.join(HERE, "lib/src"))
                          if f.endswith(".h")] + MK["FSHM_PUBLIC_HEADERS"].split() + ["build.mk"]
        if self.force or _newer(deps, target):
            cflags = (MK["FSHM_CSTD"].split() + MK["FSHM_WARN"].split() + MK["FSHM_OPT"].split()
                      + MK["FSHM_LIB_CFLAGS"].split())
            objects = self.compiler.compile(
                sources, output_dir=os.path.join(self.build_temp, "libframeshm"),
                extra_postargs=cflags, debug=self.debug)
            self.compiler.link_shared_object(
                objects, target,
                extra_postargs=[f"-Wl,-soname,{SONAME}", "-Wl,--no-undefined"] + MK["FSHM_LIB_LIBS"].split())
        # Wheels cannot hold symlinks: libframeshm.so is a one-line linker script, so
        # `-lframeshm` links against the SONAME file.
        _write_if_changed(os.path.join(libdir, "libframeshm.so"), f"INPUT({SONAME})\n")
        _write_if_changed(os.path.join(libdir, "pkgconfig", "frameshm.pc"), PC_WHEEL.format(version=LIB_VERSION))
        subst = {"@SONAME@": SONAME, "@VERSION@": LIB_VERSION, "@MAJOR@": LIB_VERSION.split(".")[0]}
        for name in ("frameshmConfig.cmake", "frameshmConfigVersion.cmake"):
            text = open(os.path.join(HERE, "lib", "cmake", name + ".in"), encoding="utf-8").read()
            for k, v in subst.items():
                text = text.replace(k, v)
            _write_if_changed(os.path.join(libdir, "cmake", "frameshm", name), text)
        self._libdir = libdir

    # -- extensions ----------------------------------------------------------------------

    def _configure(self, ext, feats, pkg_dir):
        short = ext.name.rsplit(".", 1)[1]
        ext.sources = [MK["FSHM_BINDING_COMMON"], *MK[f"FSHM_EXT_{short}_SOURCES"].split()]
        ext.depends = ["binding/binding.h", "build.mk", *MK["FSHM_PUBLIC_HEADERS"].split()] + [
            os.path.join("devices", f) for f in os.listdir(os.path.join(HERE, "devices")) if f.endswith(".h")]
        ext.extra_compile_args = (MK["FSHM_CSTD"].split() + MK["FSHM_WARN"].split() + MK["FSHM_OPT"].split()
                                  + MK["FSHM_DEVICE_CFLAGS"].split() + ["-Ibinding"])
        ext.library_dirs = [self._libdir]
        ext.libraries = ["frameshm"]
        ext.runtime_library_dirs = []
        ext.extra_link_args = ["-Wl,-rpath,$ORIGIN/lib", "-lrt", "-pthread"]
        if any(m == "FSHM_TEST_HOOKS" for m, _ in ext.define_macros):
            ext.extra_link_args.append("-ldl")
        for name in MK.get(f"FSHM_EXT_{short}_FEATURES", "").split():
            f = feats[name]
            if f["found"]:
                ext.define_macros.append((f["macro"], "1"))
                ext.extra_compile_args += f["found"][0]
                ext.extra_link_args += f["found"][1]



setup(
    version=LIB_VERSION,
    ext_modules=[
        Extension("frameshm._core", sources=["binding/module.c"], define_macros=list(TEST_MACROS)),
        Extension("frameshm._gige", sources=["binding/gige_module.c"]),
        Extension("frameshm._virtualcam", sources=["binding/virtualcam_module.c"]),
    ],
    cmdclass={"build_ext": BuildFrameshm},
)
