"""The gateway's page in a real headless Chromium (Debian's `chromium`, driven by
Playwright with ``executable_path``), with real role processes:

* capture (test pattern with a person in view) -> inference (HOG) -> controller ->
  gateway: live, changing video, the detection boxes (current or marked stale with their
  age: whatever the detector's speed, they are on the page) and the controller's state.
  A screenshot is saved.
* a detector that takes 1.5 s a frame: its boxes still reach the page, dashed with their
  age over the live video and exactly on their own frame in the detector's view, and
  the camera is released seconds (not 50 frames) after the person left.
* the test playing the detector: the badge shows the controller's state at every step
  and never a mix of two sources.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import time

import numpy as np
import pytest

import frameshm
from fshm_helpers import wait_until
from test_gateway import free_port, metrics, start_role, wait_gateway

pytest.importorskip("cv2")
pytest.importorskip("skimage")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
HERE = os.path.dirname(os.path.abspath(__file__))

# Pixels of the box colour #39ff14 on a canvas: evaluated in the page together with the
# state, so both describe the same drawn frame.
GREEN_PX = """(id) => {
    const c = document.getElementById(id), g = c.getContext('2d');
    const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4)
        if (d[i] < 90 && d[i + 1] > 220 && d[i + 2] < 60) n++;
    return n; }"""

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


@contextlib.contextmanager
def open_page(url: str):
    """(page, problems): problems collects page errors, console errors and HTTP errors
    (a missing favicon would be one per page load)."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless=new", "--no-sandbox", "--disable-gpu",
                                           "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            problems = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
            page.goto(url, timeout=30_000)
            yield page, problems
        finally:
            browser.close()


def stop_roles(roles: dict) -> None:
    for child in roles.values():
        child.send_signal(signal.SIGTERM)
    for role, child in roles.items():
        assert child.wait(20) == 0, f"{role}: {child.stderr[-3000:]}"


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
        assert "?token=" in url  # the page passes its own token on to /ws (else no frame would come)
        with open_page(url) as (page, problems):
            # live frames, the person's boxes on the canvas (current or stale, whatever HOG's
            # speed on this machine), the controller tracking; state and pixels of one frame
            snap = page.wait_for_function(
                f"""() => {{
                    const s = window.frameshm;
                    if (!(s && s.drawn > 20 && s.boxes > 0 && s.badge === 'Alarmed · Tracking')) return null;
                    return {{header: s.header, boxes: s.boxes, stale: s.boxesStale, age: s.boxesAgeMs,
                             drawn: s.drawn, px: ({GREEN_PX})('video'),
                             det: document.getElementById('s-det').textContent}};
                }}""", timeout=90_000, polling=100).json_value()
            d1 = canvas_digest(page)
            page.wait_for_function(f"() => window.frameshm.drawn > {snap['drawn'] + 10}", timeout=30_000)
            d2 = canvas_digest(page)
            page.wait_for_function("() => window.frameshm.fps > 0 && window.frameshm.boxes > 0",
                                   timeout=30_000, polling=100)
            # the detector's own frame with its boxes (one the page received: a frame the
            # gateway dropped for a slow page is not there, the next detections' may be)
            page.wait_for_function("() => window.frameshm.detView.drawn > 0", timeout=60_000, polling=100)
            page.screenshot(path=str(shot))
            text = {k: page.inner_text(f"#{k}") for k in ("mode", "s-mode", "s-state", "s-fps", "s-latency",
                                                        "s-boxes", "s-det", "s-encode", "conn")}
            fs = page.evaluate("() => ({...window.frameshm, status: null, header: null})")
        print(f"\npage: {text}, boxes {snap['boxes']} ({'stale' if snap['stale'] else 'current'}, "
              f"{snap['age']} ms), box pixels {snap['px']}, drawn {fs['boxesDrawn']} frames with boxes "
              f"({fs['currentDrawn']} current, {fs['staleDrawn']} stale, oldest {fs['maxStaleAgeMs']} ms), "
              f"detector's view {fs['detView']}, screenshot {shot}")
        keep = os.environ.get("FRAMESHM_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
        assert not problems, problems
        assert d1 != d2, "the canvas did not change between frames"
        h = snap["header"]
        assert h["width"] == 640 and h["boxes"] and all(b[5] == 0 for b in h["boxes"])
        assert snap["px"] > 200, "no box drawn on the canvas"
        # the boxes name their frame and age, and are marked stale exactly when they are old
        assert isinstance(h["det_seq"], int) and h["det_age_ms"] == snap["age"]
        assert snap["stale"] == (h["det_seq"] != h["seq"] and abs(h["det_age_ms"]) > 100)
        assert f"frame {h['det_seq']}" in snap["det"]
        assert text["mode"] == "Alarmed · Tracking" and text["s-mode"] == "Alarmed"
        assert text["s-state"].startswith("Tracking") and text["conn"] == "live"
        assert float(text["s-fps"]) > 2 and int(text["s-boxes"]) >= 1
        assert 0 <= fs["latencyMs"] < 2000, fs["latencyMs"]
        assert shot.stat().st_size > 20_000
    finally:
        stop_roles(roles)


SLOW_CONFIG = """
[streams]
frames = "slow-web"
[capture]
source = "test:?width=640&height=480&fps=30&person=file&trigger={trigger}"
standby_fps = 10
alarmed_fps = 30
[inference]
detector = "slow_detector:SlowOracle"
[inference.detector_params]
delay_s = {delay}
[controller]
validation_frames = 2
tracking_exit_frames = 50     # 75 s at 1.5 s a frame: only the timed exit can be prompt
tracking_exit_s = 1.0
classes = [0]
"""


def test_a_detector_at_1_5_s_a_frame_still_puts_its_boxes_on_the_page(spawn, tmp_path):
    delay = 1.5
    trigger = tmp_path / "person"
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(SLOW_CONFIG.format(trigger=trigger, delay=delay))
    port = free_port()
    path_env = {"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    roles = {"gateway": start_role(spawn, "gateway", "--config", str(cfg), "--port", str(port)),
             "controller": start_role(spawn, "controller", "--config", str(cfg)),
             "inference": spawn("from frameshm.cli import main\n"
                                f"sys.exit(main({['inference', '--config', str(cfg)]!r}))\n",
                                label="inference", env_extra=path_env),
             "capture": start_role(spawn, "capture", "--config", str(cfg))}
    try:
        url = wait_gateway("slow-web.gateway")["url"]
        with open_page(url) as (page, problems):
            page.wait_for_function("() => window.frameshm && window.frameshm.badge === 'Standby · Standby'",
                                   timeout=60_000, polling=100)
            trigger.touch()  # the person walks in
            snap = page.wait_for_function(
                f"""() => {{
                    const s = window.frameshm;
                    if (!(s.boxes > 0 && s.boxesStale && s.boxesAgeMs >= 1000 && s.detView.boxes > 0)) return null;
                    return {{header: s.header, age: s.boxesAgeMs, px: ({GREEN_PX})('video'),
                             detView: s.detView, detPx: ({GREEN_PX})('detview'),
                             detSeq: document.getElementById('detview').dataset.seq,
                             det: document.getElementById('s-det').textContent,
                             caption: document.getElementById('detcap').textContent}};
                }}""", timeout=60_000, polling=100).json_value()
            page.wait_for_function("() => window.frameshm.badge === 'Alarmed · Tracking'", timeout=60_000,
                                   polling=100)
            trigger.unlink()  # the person leaves
            t_left = time.monotonic()
            page.wait_for_function("() => window.frameshm.badge === 'Standby · Standby'", timeout=90_000,
                                   polling=100)
            release_s = time.monotonic() - t_left
            fs = page.evaluate("() => ({...window.frameshm, status: null, header: null})")
        inf = metrics("slow-web.inference") or {}
        print(f"\nslow detector ({delay} s a frame, measured {inf.get('infer_ms')} ms): live view {snap['det']!r}, "
              f"box pixels {snap['px']}; detector's view {snap['caption']!r}, box pixels {snap['detPx']}; "
              f"{fs['staleDrawn']} frames drawn with stale boxes (oldest {fs['maxStaleAgeMs']} ms), "
              f"{fs['currentDrawn']} current; released {release_s:.1f} s after the person left")
        assert not problems, problems
        h = snap["header"]
        # live view: the detections of an older frame, drawn dashed with their age
        assert h["boxes"] == [[200.0, 60.0, 440.0, 420.0, 0.9, 0]] and h["det_seq"] < h["seq"]
        assert h["det_age_ms"] == snap["age"] >= 1000
        assert snap["px"] > 200, "the stale boxes are not on the live canvas"
        assert f"frame {h['det_seq']}" in snap["det"] and "s old (dashed)" in snap["det"]
        assert fs["maxStaleAgeMs"] >= delay * 1000 - 100, "the age shown is at least the inference time"
        # detector's view: the very frame the boxes were computed from, with them
        dv = snap["detView"]
        assert dv["boxes"] == 1 and snap["detSeq"] == str(dv["seq"]) and snap["detPx"] > 200
        assert f"frame {dv['seq']}" in snap["caption"]
        # released by seconds of capture time: tracking_exit_frames alone would take 50 x 1.5 s
        assert release_s < 20, release_s
        ctl = roles["controller"]
        wait_until(lambda: "Tracking -> Standby" in ctl.stderr, 10, what="the release in the controller's log")
        line = next(x for x in ctl.stderr.splitlines() if "Tracking -> Standby" in x)
        unseen = float(line.split(" after ")[1].split("s without")[0])
        assert 1.0 <= unseen < 10, line
    finally:
        with contextlib.suppress(FileNotFoundError):
            trigger.unlink()
        stop_roles(roles)


BADGE_CONFIG = """
[streams]
frames = "badge-cam"
[capture]
source = "test:?width=320&height=240&fps=30"
standby_fps = 10
alarmed_fps = 30
[controller]
validation_frames = 3
tracking_exit_frames = 2
tracking_exit_s = 0
classes = [0]
"""
CONSISTENT = {"Standby · Standby", "Alarmed · Validation", "Alarmed · Tracking", "Standby"}


def test_the_badge_shows_the_controllers_state(spawn, tmp_path):
    """The test is the detector: each step's detections put the controller in a known
    state; the page's badge must then name that state (and the mode it means), the
    controller's metrics too, and no badge ever shown may mix two states."""
    from frameshm.roles import mode as M
    from frameshm.roles import read_metrics

    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(BADGE_CONFIG)
    port = free_port()
    person = np.array([[10, 20, 50, 120, 0.9, 0]], np.float32)
    nobody = np.zeros((0, 6), np.float32)
    dets = frameshm.Writer("badge-cam.detections", dtype="float32", max_bytes=4096)
    roles = {"gateway": start_role(spawn, "gateway", "--config", str(cfg), "--port", str(port)),
             "controller": start_role(spawn, "controller", "--config", str(cfg)),
             "capture": start_role(spawn, "capture", "--config", str(cfg))}
    ctl = None
    try:
        url = wait_gateway("badge-cam.gateway")["url"]
        ctl = frameshm.Reader("badge-cam", subscribe=False)
        with open_page(url) as (page, problems):
            page.wait_for_function("() => window.frameshm && window.frameshm.badge === 'Standby · Standby'",
                                   timeout=60_000, polling=100)
            page.evaluate("""() => {
                const el = document.getElementById('mode');
                window.badgeLog = [el.textContent];
                new MutationObserver(() => window.badgeLog.push(el.textContent))
                    .observe(el, {childList: true, characterData: true, subtree: true}); }""")
            seen = []
            for rows, count, state in [(person, 1, "Validation"), (person, 2, "Tracking"), (nobody, 2, "Standby")]:
                for _ in range(count):
                    dets.publish(rows, timestamp_ns=time.monotonic_ns())
                wait_until(lambda: M.read_state(ctl) == state, 10, what=f"controller in {state}")
                label = f"{'Standby' if state == 'Standby' else 'Alarmed'} · {state}"
                page.wait_for_function(f"() => window.frameshm.badge === '{label}'", timeout=20_000, polling=50)
                m = wait_until(lambda: (read_metrics("badge-cam.controller") or {}).get("state") == state
                               and read_metrics("badge-cam.controller"), 10, what=f"metrics say {state}")
                row = f"{state} ({m['transitions']} transitions)"
                page.wait_for_function(f"() => document.getElementById('s-state').textContent === '{row}'",
                                       timeout=20_000, polling=50)
                assert page.inner_text("#mode") == label
                seen.append(label)
            # no controller: the badge shows the mode alone and says so
            roles["controller"].send_signal(signal.SIGTERM)
            assert roles["controller"].wait(20) == 0, roles["controller"].stderr[-3000:]
            page.wait_for_function("() => window.frameshm.badge === 'Standby'", timeout=20_000, polling=50)
            page.wait_for_function("() => document.getElementById('s-state').textContent === 'not running'",
                                   timeout=20_000, polling=50)
            log = page.evaluate("() => window.badgeLog")
        assert not problems, problems
        assert set(log) <= CONSISTENT, f"a badge mixing two sources: {log}"
        shown = [x for i, x in enumerate(log) if i == 0 or x != log[i - 1]]
        assert shown == ["Standby · Standby", "Alarmed · Validation", "Alarmed · Tracking", "Standby · Standby",
                         "Standby"], shown
    finally:
        if ctl is not None:
            ctl.close()
        dets.close()
        stop_roles(roles)
