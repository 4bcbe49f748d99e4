"""The gateway's page in a real headless Chromium (Debian's `chromium`, driven by
Playwright with ``executable_path``): capture (test pattern with a person in view) ->
inference (HOG) -> controller -> gateway, all real processes; the page must show live,
changing video, the detection boxes and the controller's mode. A screenshot is saved."""

import hashlib
import os
import shutil
import signal

import pytest

from test_gateway import free_port, start_role, wait_gateway

pytest.importorskip("cv2")
pytest.importorskip("skimage")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

CONFIG = """
[streams]
frames = "web-cam"
[capture]
source = "test:?width=640&height=480&fps=30&person=on"
standby_fps = 10
alarmed_fps = 30
[inference]
detector = "hog"
[controller]
validation_frames = 2
classes = [0]
"""


def canvas_digest(page) -> str:
    return hashlib.sha1(page.evaluate("document.getElementById('video').toDataURL('image/png')").encode()).hexdigest()


def test_page_shows_live_video_boxes_and_mode(spawn, tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(CONFIG)
    port = free_port()
    roles = {"gateway": start_role(spawn, "gateway", "--config", str(cfg), "--port", str(port)),
             "controller": start_role(spawn, "controller", "--config", str(cfg)),
             "inference": start_role(spawn, "inference", "--config", str(cfg)),
             "capture": start_role(spawn, "capture", "--config", str(cfg))}
    shot = tmp_path / "gateway-page.png"
    try:
        url = wait_gateway("web-cam.gateway")["url"]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--headless=new", "--no-sandbox", "--disable-gpu",
                                               "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 620})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url, timeout=30_000)
                # live frames, the person detected (boxes drawn), the controller alarmed
                page.wait_for_function(
                    "() => window.frameshm && window.frameshm.drawn > 20 && window.frameshm.boxes > 0"
                    " && window.frameshm.mode === 'Alarmed' && window.frameshm.controllerState === 'Tracking'",
                    timeout=45_000, polling=100)
                st = page.evaluate("() => ({...window.frameshm, status: null, header: window.frameshm.header})")
                d1 = canvas_digest(page)
                page.wait_for_function(f"() => window.frameshm.drawn > {st['drawn'] + 10}", timeout=20_000)
                d2 = canvas_digest(page)
                page.wait_for_function("() => window.frameshm.fps > 0 && window.frameshm.boxes > 0",
                                       timeout=20_000, polling=100)
                page.screenshot(path=str(shot))
                text = {k: page.inner_text(f"#{k}") for k in ("mode", "s-mode", "s-state", "s-fps", "s-latency",
                                                            "s-boxes", "s-encode", "conn")}
                box_px = page.evaluate("""() => {
                    const c = document.getElementById('video'), g = c.getContext('2d');
                    const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
                    for (let i = 0; i < d.length; i += 4)
                        if (d[i] < 90 && d[i + 1] > 220 && d[i + 2] < 60) n++;   // the box colour #39ff14
                    return n; }""")
                latency = page.evaluate("() => window.frameshm.latencyMs")
            finally:
                browser.close()
        print(f"\npage: {text}, box pixels {box_px}, screenshot {shot}")
        keep = os.environ.get("FRAMESHM_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
        assert not errors, errors
        assert d1 != d2, "the canvas did not change between frames"
        h = st["header"]
        assert h["width"] == 640 and h["boxes"] and all(b[5] == 0 for b in h["boxes"])
        assert box_px > 200, "no box drawn on the canvas"
        assert text["mode"].startswith("Alarmed") and "Tracking" in text["mode"] and text["s-mode"] == "Alarmed"
        assert text["s-state"].startswith("Tracking") and text["conn"] == "live"
        assert float(text["s-fps"]) > 3 and int(text["s-boxes"]) >= 1
        assert 0 <= latency < 2000, latency
        assert shot.stat().st_size > 20_000
    finally:
        for child in roles.values():
            child.send_signal(signal.SIGTERM)
        for role, child in roles.items():
            assert child.wait(20) == 0, f"{role}: {child.stderr[-3000:]}"
