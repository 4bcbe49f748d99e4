"""Where the C library shipped inside this package lives, for C programs and other
extensions that use libframeshm (the way numpy.get_include() and pybind11 expose theirs).

    cc prog.c $(PKG_CONFIG_PATH=$(python3 -c 'import frameshm; print(frameshm.pkgconfig_dir())') \\
                pkg-config --cflags --libs frameshm)

The package's ``frameshm.pc`` links with an rpath to the package's ``lib/`` so that the
program finds ``libframeshm.so.<major>`` at run time. A system-wide install for C users who
never touch Python is ``make install PREFIX=...`` (docs/c-api.md).
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """Directory to put on the include path: ``#include <frameshm/frameshm.h>``."""
    return os.path.join(_HERE, "include")


def get_library_dir() -> str:
    """Directory holding ``libframeshm.so.<major>`` (and the ``libframeshm.so`` to link with)."""
    return os.path.join(_HERE, "lib")


def pkgconfig_dir() -> str:
    """Directory holding ``frameshm.pc`` (for ``PKG_CONFIG_PATH``)."""
    return os.path.join(_HERE, "lib", "pkgconfig")


def cmake_dir() -> str:
    """Directory holding ``frameshmConfig.cmake`` (for ``-Dframeshm_DIR=`` / ``PATHS``)."""
    return os.path.join(_HERE, "lib", "cmake", "frameshm")


def build_features() -> str:
    """The build's feature summary: which optional libraries were found and what is built out."""
    try:
        with open(os.path.join(_HERE, "_build_features.txt"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return "no feature summary (this copy of frameshm was not built by its setup.py)\n"


def library_version() -> str:
    """Version of the libframeshm this package loaded (fshm_version_string())."""
    from . import _core

    return _core.VERSION_STRING


__all__ = ["get_include", "get_library_dir", "pkgconfig_dir", "cmake_dir", "build_features", "library_version"]
