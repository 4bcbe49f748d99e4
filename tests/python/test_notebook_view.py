"""frameshm.show() rendered for real: a JupyterLab server started here runs a notebook
whose one cell shows a live stream, in Debian's headless Chromium (driven by Playwright).
The frames (and a detections stream) come from this process; the widget in the page must
show them as they change, with the box drawn, while the kernel's view holds no consumer
entry in the stream; shutting the kernel down leaves the producer untouched."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from playwright import sync_api

import frameshm
from fshm_helpers import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = pathlib.Path(__file__).resolve().parents[2]
NAME = "nbv-cam"

# Red box pixels (#ff3b30) on the widget's canvas.
RED_PX = """() => {
    const c = document.querySelector('.fshm-live canvas'), g = c.getContext('2d');
    const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 230 && d[i + 1] < 90 && d[i + 2] < 80 && d[i + 3] > 0) n++;
    return n; }"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Camera(threading.Thread):
    """240x320 frames whose brightness steps with the frame number, and one box each."""

    def __init__(self):
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.w = frameshm.Writer(NAME, shape=(240, 320, 3), nslots=4)
        self.d = frameshm.Writer(NAME + ".detections", max_bytes=1024)

    def run(self):
        i = 0
        while not self.halt.wait(0.05):
            view = self.w.loan()
            view[:] = (i * 5) % 200
            seq = self.w.commit()
            self.d.publish(np.array([[40, 30, 200, 180, 0.9, 0]], np.float32), ref_seq=seq)
            i += 1

    def stop(self):
        self.halt.set()
        self.join(10)
        self.w.close()
        self.d.close()


def api(port, token, method, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


# A JupyterLab server, a kernel and Chromium start here: about 20 s on an idle 2-core VM,
# over 90 s (the suite's default limit) when it is loaded several times over (seen in CI).
@pytest.mark.timeout(240)
def test_show_streams_into_jupyterlab_in_chromium(shm_base, tmp_path):
    assert CHROMIUM, "needs Debian's chromium (apt-get install chromium)"
    nb = new_notebook(cells=[new_code_cell(f"import frameshm\nview = frameshm.show({NAME!r}, max_fps=10)\nview")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "view.ipynb")
    cam = Camera()
    cam.start()
    port, token = free_port(), "fshm-test-token"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "jrun"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "jws"), IPYTHONDIR=str(tmp_path / "ipy"))
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--ServerApp.port_retries=0", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def up():
            try:
                return api(port, token, "GET", "/api/status")
            except OSError:
                return None

        wait_until(up, 60, interval=0.2, what="the Jupyter server")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/lab/tree/view.ipynb?token={token}", timeout=60_000)
                page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                                       timeout=60_000)
                # Run the cell once the kernel is up (the command is refused before).
                deadline = time.monotonic() + 60
                while not page.query_selector(".fshm-live"):
                    assert time.monotonic() < deadline, "the widget never rendered"
                    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
                    page.wait_for_timeout(2000)
                page.wait_for_function("() => Number(document.querySelector('.fshm-live').dataset.shown || 0) >= 3",
                                       timeout=30_000)
                shown0 = page.evaluate("() => Number(document.querySelector('.fshm-live').dataset.shown)")
                t0 = time.monotonic()
                page.wait_for_timeout(2000)
                shown1 = page.evaluate("() => Number(document.querySelector('.fshm-live').dataset.shown)")
                rate = (shown1 - shown0) / (time.monotonic() - t0)
                assert 2 <= rate <= 13, f"{rate:.1f} frames/s shown, capped at max_fps=10"
                # A frame's image is decoded after its src is set, and reads 0 x 0 until then
                # (a loaded run sampled it there): the size of the first decoded one.
                size = page.wait_for_function(
                    "() => { const i = document.querySelector('.fshm-live img');"
                    " return i && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null; }",
                    timeout=10_000).json_value()
                assert size == [320, 240]
                page.wait_for_function("() => document.querySelector('.fshm-live').dataset.boxes === '1'", timeout=10_000)
                assert page.evaluate(RED_PX) > 300, "the detection box is drawn"
                info = page.inner_text(".fshm-live .fshm-info")
                assert info.startswith(f"{NAME} seq ") and "320x240" in info and "boxes 1" in info
                # Passive: the view is nobody the producer delivers to or waits for.
                assert frameshm.stream_info(NAME)["consumers"] == []
                page.screenshot(path=os.environ.get("FSHM_SHOT", str(tmp_path / "notebook-view.png")))
                assert not errors, errors
            finally:
                browser.close()
        kernels = api(port, token, "GET", "/api/kernels")
        assert len(kernels) == 1
        api(port, token, "DELETE", f"/api/kernels/{kernels[0]['id']}")
        wait_until(lambda: api(port, token, "GET", "/api/kernels") == [], 30, what="the kernel gone")
        seq = frameshm.stream_info(NAME)["frames"]
        wait_until(lambda: frameshm.stream_info(NAME)["frames"] > seq + 5, 10, what="the producer going on")
        assert frameshm.stream_info(NAME)["consumers"] == []
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        cam.stop()
