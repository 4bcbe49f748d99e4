"""The build as a user meets it: `pip install .` of a source tree, the feature summary it
prints, and a reinstall after an optional library appeared that really enables the feature
(a build/ directory left by the first install must not hand back stale objects).

A missing library is simulated the way the build sees it: pkg-config cannot find it
(PKG_CONFIG_LIBDIR pointing at an empty directory), exactly as without its -dev package.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not shutil.which("pkg-config") or not shutil.which("git"),
                                reason="needs pkg-config and git")


def _have(pkg):
    return subprocess.run(["pkg-config", "--exists", pkg]).returncode == 0


def _source_copy(dst: pathlib.Path) -> pathlib.Path:
    """The tracked files of this checkout (as a fresh clone would have them, plus any
    uncommitted edits), without build products."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / os.fsdecode(f)
        if not src.is_file():
            continue
        out = dst / os.fsdecode(f)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    return dst


def _pip_install(src, target, env):
    # --no-build-isolation: setuptools is here already (and no index is needed); pip builds
    # in the source tree, so a second install sees the first one's build/ directory.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
                        "--disable-pip-version-check", "--upgrade", "--target", str(target), str(src)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _features(target):
    code = ("import frameshm._core as c, frameshm._gige as g, frameshm._virtualcam as v;"
            "print(c.HAVE_LIBV4L2, g.HAVE_ARAVIS, v.HAVE_PIPEWIRE)")
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=str(target), timeout=60)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.split()]


@pytest.mark.timeout(1200)
def test_missing_library_is_reported_then_enabled_by_a_reinstall(tmp_path):
    if not (_have("libv4l2") and _have("aravis-0.8") and _have("libpipewire-0.3")):
        pytest.skip("needs libv4l-dev, libaravis-dev and libpipewire-0.3-dev installed to enable them")
    src = _source_copy(tmp_path / "src")
    empty = tmp_path / "no-pkgconfig"
    empty.mkdir()
    hidden = dict(os.environ, PKG_CONFIG_LIBDIR=str(empty), PKG_CONFIG_PATH="")
    hidden.pop("FRAMESHM_TEST_BUILD", None)

    out = _pip_install(src, tmp_path / "site1", hidden)
    assert "BUILT OUT, pkg-config found no libv4l2 libv4lconvert; to get it: apt-get install libv4l-dev" in out
    assert "BUILT OUT, pkg-config found no aravis-0.8" in out
    assert "BUILT OUT, pkg-config found no libpipewire-0.3" in out
    assert _features(tmp_path / "site1") == [0, 0, 0]
    assert (src / "build").is_dir()   # what the next install finds and must not reuse blindly

    # The libraries "appear" (pkg-config finds them again); the same source tree, reinstalled.
    env = dict(os.environ)
    env.pop("FRAMESHM_TEST_BUILD", None)
    out = _pip_install(src, tmp_path / "site2", env)
    assert "[x] v4l2" in out and "[x] aravis" in out and "[x] pipewire" in out
    assert _features(tmp_path / "site2") == [1, 1, 1]

    # And the installed package says what it was built with.
    summary = (tmp_path / "site2" / "frameshm" / "_build_features.txt").read_text()
    assert "[x] v4l2" in summary and "BUILT OUT" not in summary
    # A product build (no FRAMESHM_TEST_BUILD) has no test-only hook in it.
    core = next((tmp_path / "site2" / "frameshm").glob("_core*.so"))
    assert b"FRAMESHM_V4L2_BACKEND" not in core.read_bytes()
    assert "test hooks" not in summary


def test_the_library_carries_no_test_hook():
    import frameshm

    data = (pathlib.Path(frameshm.get_library_dir()) / "libframeshm.so.0").read_bytes()
    assert b"FRAMESHM_DRIVER_FREE_BYTES" not in data
    assert b"FRAMESHM_V4L2_BACKEND" not in data
