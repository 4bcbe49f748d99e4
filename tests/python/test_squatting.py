"""Issue 14, item 4: another local user pre-creating ``<base>/tensorpool-<user>`` (or a
tree of ours left writable by everyone) is refused with an error that names the directory
and the way out, by every role (producer, consumer, ls, gc) rather than used or silently
seen as empty; the way out, a base of one's own (``FRAMESHM_DIR=$XDG_RUNTIME_DIR``), then
works for producer and consumer alike. The squatter is a real other user (nobody).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import frameshm
from frameshm import admin


@pytest.fixture
def shared_base():
    """A base like /dev/shm: every user may create entries (mode 1777)."""
    d = tempfile.mkdtemp(prefix="frameshm-squat-")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _user_dir(base: str) -> str:
    return os.path.join(base, "tensorpool-" + pwd.getpwuid(os.geteuid()).pw_name)


def _errors_of_every_role(base: str) -> list:
    out = []
    for make in (lambda: frameshm.Writer("squatted", shape=(4,), base_dir=base),
                 lambda: frameshm.Reader("squatted", base_dir=base),
                 lambda: admin.list_streams(base_dir=base),
                 lambda: admin.gc_report(base_dir=base)):
        try:
            made = make()
        except frameshm.FrameshmError as exc:
            out.append(exc)
        else:
            raise AssertionError(f"a squatted tree was used: {made!r}")
    return out


def test_directory_made_by_another_user_is_refused_naming_the_way_out(shared_base, tmp_path, monkeypatch):
    nobody = pwd.getpwnam("nobody")
    squat = _user_dir(shared_base)
    code = f"import os; os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); os.mkdir({squat!r}, 0o755)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert os.stat(squat).st_uid == nobody.pw_uid
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    for exc in _errors_of_every_role(shared_base):
        assert isinstance(exc, frameshm.PermissionDenied), exc
        msg = str(exc)
        assert squat in msg and f"uid {nobody.pw_uid}" in msg, msg
        assert f"FRAMESHM_DIR={runtime}" in msg and "docs/security.md" in msg, msg
    assert os.listdir(squat) == []   # nothing of ours went into it
    # The way out: every process of the stream on the per-user base.
    monkeypatch.setenv("FRAMESHM_DIR", str(runtime))
    with frameshm.Writer("squatted", shape=(4,), dtype="uint8") as w, frameshm.Reader("squatted") as r:
        w.publish(np.arange(4, dtype=np.uint8))
        assert r.wait_latest(timeout=10).copy().tolist() == [0, 1, 2, 3]
    assert not list(runtime.glob("tensorpool-*"))   # cleaned up there as anywhere


def test_our_tree_writable_by_everyone_is_refused(shared_base):
    mine = _user_dir(shared_base)
    os.mkdir(mine)
    os.chmod(mine, 0o777)
    for exc in _errors_of_every_role(shared_base):
        assert isinstance(exc, frameshm.PermissionDenied), exc
        assert mine in str(exc) and "0777" in str(exc) and "chmod o-w" in str(exc), str(exc)
    os.chmod(mine, 0o700)
    with frameshm.Writer("squatted", shape=(4,), dtype="uint8", base_dir=shared_base) as w:
        w.publish(np.zeros(4, np.uint8))
