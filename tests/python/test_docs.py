"""The documentation runs: every ```python block of README.md and docs/*.md is executed,
each in its own subprocess with a private FRAMESHM_DIR and a timeout, and every ```toml
block that is a driver or a pipeline configuration is loaded by its parser. So the docs
cannot drift from the code unnoticed.

A block that cannot run on its own says so on the line just before it:

    <!-- not-run: why -->               only compiled (its syntax is checked)
    <!-- run-with: WHAT[, WHAT...] --> runs with these running beside it:
        driver CONFIG     `frameshm driver --config CONFIG` with a private socket and base
                          directory; the block's socket path (CONFIG's, or the default
                          /run/frameshm/driver.sock) is rewritten to the private one
        camera ID         a producer of 1080x1920 uint16 frames on stream ID (through the
                          driver when there is one)
        detections NAME   a producer of (N, 6) float32 detections on stream NAME
        metrics NAME      a role's metrics document on stream NAME

An unmarked block that fails fails its test, as does a marker this file does not know.
Like every test, each block must leave no stream behind (conftest).
"""

from __future__ import annotations

import pathlib
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest

from frameshm.config import _toml
from fshm_helpers import child_env, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_SOCKET = "/run/frameshm/driver.sock"
BLOCK_TIMEOUT = 90  # seconds per block: each takes well under one

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*([a-z-]+)\s*:\s*(.*?)\s*-->$")


@dataclass
class Block:
    path: pathlib.Path
    line: int
    lang: str
    code: str
    marker: Optional[str]  # "not-run", "run-with" or None
    arg: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(lang: str) -> List[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) != lang:
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            mk = MARKER.match(before)
            out.append(Block(path, text.count("\n", 0, m.start()) + 1, lang, m.group(2),
                             mk.group(1) if mk else None, mk.group(2) if mk else ""))
    return out


PY_BLOCKS = _blocks("python")
TOML_BLOCKS = _blocks("toml")


def test_the_docs_have_python_blocks_and_the_readme_snippet_runs_unmarked():
    readme = [b for b in PY_BLOCKS if b.path.name == "README.md"]
    assert readme and readme[0].marker is None, "the README's first snippet runs as written"
    assert len(PY_BLOCKS) >= 10
    for b in PY_BLOCKS:
        assert b.marker in (None, "not-run", "run-with"), f"{b.id}: unknown marker <!-- {b.marker}: -->"
        if b.marker == "not-run":
            assert b.arg, f"{b.id}: <!-- not-run: --> needs a reason"


# ---- what runs beside a block ----------------------------------------------------------------


class DocDriver:
    """`frameshm driver` on a docs config, its socket and base directory made private."""

    def __init__(self, config: pathlib.Path, tmp_path: pathlib.Path, base: pathlib.Path):
        text = config.read_text()
        self.documented = _toml().loads(text)["driver"].get("socket", DEFAULT_SOCKET)
        self.sock = str(tmp_path / "driver.sock")
        text = re.sub(r'(?m)^socket\s*=.*$', f'socket = "{self.sock}"', text)
        text = re.sub(r'(?m)^base_dir\s*=.*$', f'base_dir = "{base}"', text)
        self.config = tmp_path / "driver.toml"
        self.config.write_text(text)
        self.log = tmp_path / "driver.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "frameshm", "driver", "--config", str(self.config)],
                                         stdout=logf, stderr=subprocess.STDOUT)
        wait_until(lambda: self._listening() or self.proc.poll() is not None, 30, what="driver socket")
        assert self.proc.poll() is None, self.log.read_text()

    def _listening(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def rewrite(self, code: str) -> str:
        for path in {self.documented, DEFAULT_SOCKET}:
            code = code.replace(f'"{path}"', repr(self.sock))
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0, self.log.read_text()


def _camera(stream_id: int, driver: Optional[DocDriver]) -> str:
    via = f", driver={driver.sock!r}" if driver else ""
    return f"""
with frameshm.Writer(stream_id={stream_id}, shape=(1080, 1920), dtype="uint16"{via}) as w:
    frame = np.zeros((1080, 1920), np.uint16)
    w.publish(frame)
    say("READY")
    while not stopped():
        frame[0, 0] += 1
        w.publish(frame)
        time.sleep(1 / 30)
"""


def _detections(name: str) -> str:
    return f"""
with frameshm.Writer({name!r}, dtype="float32", max_bytes=256 * 24) as w:
    boxes = np.array([[10, 20, 110, 220, 0.9, 0], [300, 40, 380, 200, 0.6, 0]], np.float32)
    seq = 0
    w.publish(boxes, ref_seq=seq)
    say("READY")
    while not stopped():
        seq += 1
        w.publish(boxes[: seq % 3], ref_seq=seq)
        time.sleep(1 / 30)
"""


def _metrics(name: str) -> str:
    return f"""
from frameshm.roles import Metrics
m = Metrics({name!r})
doc = {{"role": {name.rsplit('.', 1)[-1]!r}, "processed": 0, "fps": 10.0}}
m.publish(doc)
say("READY")
while not stopped():
    doc["processed"] += 1
    m.publish(doc)
    time.sleep(0.1)
m.close()
"""


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.id for b in PY_BLOCKS])
def test_python_block_runs(block, tmp_path, shm_base, spawn):
    compile(block.code, block.id, "exec")  # every block, marked or not, is valid Python
    if block.marker == "not-run":
        pytest.skip(f"not-run: {block.arg}")
    code = block.code
    driver: Optional[DocDriver] = None
    helpers = []
    try:
        for part in filter(None, (p.strip() for p in block.arg.split(",") if block.marker == "run-with")):
            what, _, arg = part.partition(" ")
            arg = arg.strip()
            if what == "driver":
                driver = DocDriver(ROOT / arg, tmp_path, shm_base)
                code = driver.rewrite(code)
            elif what == "camera":
                helpers.append(spawn(_camera(int(arg), driver), label=f"camera {arg}"))
            elif what == "detections":
                helpers.append(spawn(_detections(arg), label=f"detections {arg}"))
            elif what == "metrics":
                helpers.append(spawn(_metrics(arg), label=f"metrics {arg}"))
            else:
                pytest.fail(f"{block.id}: unknown run-with item {part!r}")
        for h in helpers:
            h.expect("READY", timeout=60)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT, env=child_env())
        assert run.returncode == 0, f"{block.id} failed:\n{code}\n--- stderr:\n{run.stderr}"
    finally:
        for h in helpers:
            assert h.stop() == 0, h.stderr
        if driver:
            driver.stop()


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[b.id for b in TOML_BLOCKS])
def test_toml_block_is_a_valid_config(block):
    """A driver configuration loads as one, anything else as a pipeline configuration."""
    from frameshm import config as pipeline_config
    from frameshm.driver import config as driver_config

    data = _toml().loads(block.code)
    if "driver" in data or "profiles" in data or "streams" in data and isinstance(data["streams"], list):
        driver_config.from_dict(data, where=block.id)
    else:
        pipeline_config.from_dict(data, where=block.id)
