"""Builds frameshm._core: the pure-C core (csrc/) plus the CPython binding (csrc/python/).

Only a C compiler and the Python headers are needed. Optional native libraries
(libv4l2, Aravis, libjpeg-turbo, PipeWire) are looked up with pkg-config; a feature
whose library is missing is built out and says so when used.
"""

import glob
import shutil
import subprocess

from setuptools import Extension, setup

# feature macro -> pkg-config module. Capture, GigE, JPEG and virtual-camera features
# add their entry here as they land (libv4l2, aravis-0.8, libturbojpeg, libpipewire-0.3).
# libv4l2's conversions are libv4lconvert's: frameshm calls it directly so that converted
# frames are written straight into the destination, hence both modules.
OPTIONAL = {"FSHM_HAVE_LIBV4L2": "libv4l2 libv4lconvert", "FSHM_HAVE_ARAVIS": "aravis-0.8",
            "FSHM_HAVE_PIPEWIRE": "libpipewire-0.3"}


def pkg_config(module):
    if not shutil.which("pkg-config"):
        return None
    try:
        subprocess.run(["pkg-config", "--exists", module], check=True, capture_output=True)
        cflags = subprocess.run(["pkg-config", "--cflags", module], check=True, capture_output=True, text=True).stdout.split()
        libs = subprocess.run(["pkg-config", "--libs", module], check=True, capture_output=True, text=True).stdout.split()
        return cflags, libs
    except (subprocess.CalledProcessError, OSError):
        return None


sources = sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("csrc/python/*.c"))
define_macros = [("_GNU_SOURCE", "1")]
extra_compile_args = ["-std=c11", "-O2", "-Wall", "-Wno-format-truncation", "-Wno-missing-field-initializers"]
extra_link_args = ["-lrt", "-ldl", "-pthread"]  # -ldl: the V4L2 test-backend hook (dlopen)
features = {}
for macro, module in OPTIONAL.items():
    found = pkg_config(module)
    features[macro] = found is not None
    if found:
        define_macros.append((macro, "1"))
        extra_compile_args += found[0]
        extra_link_args += found[1]

setup(
    ext_modules=[
        Extension(
            "frameshm._core",
            sources=sources,
            include_dirs=["csrc"],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ],
)
