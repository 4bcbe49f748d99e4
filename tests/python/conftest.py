"""Shared fixtures of the frameshm Python suite.

* Every test gets a private, empty ``FRAMESHM_DIR`` (under ``tmp_path``) and must leave no
  stream directory behind in it, nor the emptied ``tensorpool-<user>/<namespace>``
  directories above; a test that leaves streams on purpose (a SIGKILLed
  producer, ...) says so with ``@pytest.mark.leaves_streams`` and the fixture then
  cleans up with ``frameshm.gc``.
* ``spawn(code)`` runs a snippet in a real ``python -c`` subprocess sharing that
  directory; readiness comes as stdout lines (``child.expect("READY")``); every child is
  SIGKILLed and reaped at teardown, and any descriptor queue it announced is unlinked.
* Every test has a timeout (pytest-timeout when installed) and every wait in the suite
  has its own deadline, so nothing can hang.
"""

from __future__ import annotations

import fcntl
import gc
import os
import re
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import frameshm  # noqa: E402
from fshm_helpers import Child, child_env, stream_dirs, tree  # noqa: E402

DEFAULT_TIMEOUT = 90  # seconds per test; every test is far quicker


def pytest_configure(config):
    # A run started in the background by a non-interactive shell (`cmd &`, as CI harnesses
    # and nohup do) inherits SIGINT ignored, and so would every child: a Python child then
    # never installs its KeyboardInterrupt handler and the Ctrl-C tests wait forever. Tests
    # must see programs as a terminal starts them.
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "leaves_streams: the test may leave stream directories behind")
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")


# The files that take longest, longest first. Under pytest-xdist with `--dist loadfile
# --no-loadscope-reorder` (what scripts/test.sh runs) files are handed to workers in
# collection order, so starting these first keeps one of them from being the run's tail
# (xdist's own order, most tests first, left test_wheel.py's builds to the end); serially
# the order does not matter.
SLOW_FILES_FIRST = (
    "test_wheel.py", "test_build.py", "test_shutdown.py", "test_bridge_link.py", "test_bridge.py",
    "test_gateway_browser.py", "test_notebook_view.py", "test_record_replay.py", "test_fuzz.py",
    "test_roles_e2e.py", "test_gige.py", "test_c_library.py", "test_driver_clients.py",
    "test_detectors_dnn.py", "test_gateway.py", "test_crash_lifecycle.py", "test_v4l2_pipewire.py",
    "test_virtualcam.py", "test_sources_media.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files stay whole
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture(autouse=True)
def shm_base(tmp_path, monkeypatch, request):
    """A fresh FRAMESHM_DIR per test; asserts at teardown that no stream is left."""
    base = tmp_path / "shm"
    base.mkdir()
    monkeypatch.setenv("FRAMESHM_DIR", str(base))
    monkeypatch.delenv("FRAMESHM_NAMESPACE", raising=False)
    yield base
    gc.collect()  # frames/views the test dropped release their mappings
    left = stream_dirs(base)
    allowed = request.node.get_closest_marker("leaves_streams") is not None
    try:
        if not allowed:
            assert not left, f"test left streams behind: { {str(p): tree(p) for p in left} }"
            # The last stream out takes its namespace and user directories with it.
            dirs = sorted(str(p.relative_to(base)) for p in base.glob("tensorpool-*"))
            assert not dirs, f"test left empty directories behind: {dirs}"
    finally:
        if left:
            # Unlinks dead consumers' queues and removes abandoned streams.
            for ns in {p.parent for p in left}:
                try:
                    frameshm.gc(str(base), ns.name)
                except Exception:
                    pass


@pytest.fixture
def queue_sweep():
    """Held by each test that sweeps this user's message queues (`frameshm gc` unlinks the
    queue of every dead process on the machine, not only its namespace's) or that needs a
    dead consumer's queue to stay until it looks: one such test at a time, across xdist
    workers and test runs sharing the machine."""
    path = os.path.join(tempfile.gettempdir(), f"frameshm-tests-queue-sweep-{os.getuid()}.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture
def spawn(shm_base):
    """spawn(code, label=...) -> Child: a snippet in a real subprocess (see fshm_helpers)."""
    children = []

    def _spawn(code: str, label: str = "child", env_extra=None) -> Child:
        child = Child(code, env=child_env(env_extra), label=label)
        children.append(child)
        return child

    yield _spawn
    for child in children:
        child.cleanup()


@pytest.fixture
def name(request):
    """A stream name unique to the test (readable in `frameshm ls` output)."""
    return "t-" + re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
