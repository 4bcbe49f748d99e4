// frameshm gateway page: JPEG frames over a WebSocket, detection boxes and the controller's
// state drawn on top. Binary message = u32 LE header length | JSON header | JPEG; text
// message = status JSON.
//
// Detections come at the detector's pace, frames at the camera's: every header carries the
// newest detections with the seq of the frame they were computed from (det_seq) and how much
// older that frame is than this one (det_age_ms). The live view draws them solid when they
// are current (this frame, or at most CURRENT_MS older: a fast detector is always a frame or
// two behind) and dashed with their age when they are older (a slow detector); the
// "detector's view" below shows the very frame they were computed from, with them, while the
// page still holds that frame (a ring of the last frames received). Nothing is hidden
// because the detector is slow.
"use strict";
(function () {
  const canvas = document.getElementById("video");
  const ctx = canvas.getContext("2d");
  const detCanvas = document.getElementById("detview");
  const detCtx = detCanvas.getContext("2d");
  const $ = (id) => document.getElementById(id);
  const BOX_COLOR = "#39ff14";
  const CURRENT_MS = 100;
  const RING_FRAMES = 900, RING_BYTES = 24 << 20;   // 30 s at 30 fps, or ~15 s of 50 kB VGA JPEGs
  const DETVIEW_MIN_MS = 250;                        // decode the detector's frame at most 4x/s
  const MODE_OF_STATE = { Standby: "Standby", Validation: "Alarmed", Tracking: "Alarmed" };
  // Exposed for tests and debugging.
  const state = window.frameshm = {
    connected: false, frames: 0, drawn: 0, dropped: 0, lastSeq: null, header: null, status: null,
    mode: null, controllerState: null, badge: null, fps: 0, latencyMs: null,
    // the live view's boxes: how many, stale (dashed, with their age) or current, from which frame
    boxes: 0, boxesStale: false, boxesAgeMs: null, detSeq: null,
    boxesDrawn: 0, currentDrawn: 0, staleDrawn: 0, maxStaleAgeMs: 0,
    // the detector's view: the frame the newest detections were computed from, with them
    detView: { seq: null, boxes: 0, drawn: 0, missing: 0, ageMs: null },
  };
  let pending = null;   // newest message waiting for the decoder
  let decoding = false;
  let fpsCount = 0, fpsStart = performance.now();
  const latencies = [];
  const ring = new Map();   // seq -> {h, jpeg}, oldest first
  let ringBytes = 0;
  let detViewAt = -Infinity, detMissSeq = null;
  let transitions = null;

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}/ws${location.search}`;
  }

  function setConn(on, text) {
    const el = $("conn");
    el.textContent = text;
    el.className = "badge " + (on ? "on" : "off");
    el.dataset.state = on ? "open" : "closed";
    state.connected = on;
  }

  let backoff = 500;
  function connect() {
    const ws = new WebSocket(wsUrl());
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { backoff = 500; setConn(true, "live"); };
    ws.onclose = (ev) => {
      setConn(false, `disconnected (${ev.code}); retrying`);
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 5000);
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") { onStatus(JSON.parse(ev.data)); return; }
      state.frames++;
      let msg;
      try {
        msg = parse(ev.data);
      } catch (err) {
        console.error("frame", err);
        return;
      }
      remember(msg);
      if (pending !== null) state.dropped++;  // the page is slower than the stream: keep the newest
      pending = msg;
      if (!decoding) decodeNext();
    };
  }

  function parse(buf) {
    const hlen = new DataView(buf).getUint32(0, true);
    const h = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
    return { h, jpeg: new Uint8Array(buf, 4 + hlen) };
  }

  // Every frame received, decoded or not, so the detector's frame can be found when its
  // detections arrive (a detector's latency later).
  function remember(msg) {
    const old = ring.get(msg.h.seq);
    if (old) { ring.delete(msg.h.seq); ringBytes -= old.jpeg.byteLength; }  // a restarted stream
    ring.set(msg.h.seq, msg);
    ringBytes += msg.jpeg.byteLength;
    while (ring.size > RING_FRAMES || ringBytes > RING_BYTES) {
      const [seq, m] = ring.entries().next().value;
      ring.delete(seq);
      ringBytes -= m.jpeg.byteLength;
    }
  }

  async function decodeNext() {
    decoding = true;
    while (pending !== null) {
      const msg = pending;
      pending = null;
      try {
        const bitmap = await createImageBitmap(new Blob([msg.jpeg], { type: "image/jpeg" }));
        draw(msg.h, bitmap);
        bitmap.close();
        await drawDetectorView(msg.h);
      } catch (err) {
        console.error("frame", err);
      }
    }
    decoding = false;
  }

  function fmtAge(ms) {
    const a = Math.abs(ms);
    const t = a >= 1000 ? `${(a / 1000).toFixed(1)} s` : `${Math.round(a)} ms`;
    return ms >= 0 ? `${t} old` : `${t} newer`;
  }

  // Boxes in camera pixels onto a canvas showing a (possibly downscaled) picture.
  function drawBoxes(g, h, bitmap, boxes, ageLabel) {
    const sx = bitmap.width / h.width, sy = bitmap.height / h.height;
    g.lineWidth = Math.max(2, Math.round(bitmap.width / 240));
    g.strokeStyle = BOX_COLOR;
    g.fillStyle = BOX_COLOR;
    const px = Math.max(12, Math.round(bitmap.width / 40));
    g.font = `${px}px system-ui, sans-serif`;
    g.setLineDash(ageLabel ? [3 * g.lineWidth, 2 * g.lineWidth] : []);
    for (const [x1, y1, x2, y2, score, cls] of boxes) {
      g.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
      const text = `${cls} ${score.toFixed(2)}` + (ageLabel ? ` · ${ageLabel}` : "");
      // above the box, or inside it near the top edge (where the badge would cover it)
      const ty = y1 * sy - 4 >= 3 * px ? y1 * sy - 4 : y1 * sy + px + 2;
      g.fillText(text, x1 * sx + 3, ty);
    }
    g.setLineDash([]);
  }

  function draw(h, bitmap) {
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    ctx.drawImage(bitmap, 0, 0);
    const hasDet = h.det_seq !== null && h.det_seq !== undefined;
    const stale = hasDet && h.det_seq !== h.seq && Math.abs(h.det_age_ms) > CURRENT_MS;
    drawBoxes(ctx, h, bitmap, h.boxes, stale ? fmtAge(h.det_age_ms) : null);
    state.drawn++;
    state.boxes = h.boxes.length;
    state.boxesStale = stale;
    state.boxesAgeMs = hasDet ? h.det_age_ms : null;
    state.detSeq = hasDet ? h.det_seq : null;
    if (h.boxes.length) {
      state.boxesDrawn++;
      if (stale) {
        state.staleDrawn++;
        state.maxStaleAgeMs = Math.max(state.maxStaleAgeMs, h.det_age_ms);
      } else {
        state.currentDrawn++;
      }
    }
    state.lastSeq = h.seq;
    state.header = h;
    setBadge(h);
    const lat = Date.now() - h.capture_wall_ms;
    latencies.push(lat);
    if (latencies.length > 30) latencies.shift();
    state.latencyMs = latencies.reduce((a, b) => a + b, 0) / latencies.length;
    fpsCount++;
    const now = performance.now();
    if (now - fpsStart >= 1000) {
      state.fps = fpsCount * 1000 / (now - fpsStart);
      fpsCount = 0;
      fpsStart = now;
    }
    $("s-fps").textContent = state.fps.toFixed(1);
    $("s-latency").textContent = `${state.latencyMs.toFixed(0)} ms`;
    $("s-encode").textContent = `${h.encode_ms.toFixed(1)} ms`;
    $("s-seq").textContent = String(h.seq);
    $("s-size").textContent = `${h.width}×${h.height}` + (h.jpeg_width !== h.width ? ` → ${h.jpeg_width}×${h.jpeg_height}` : "");
    $("s-boxes").textContent = String(h.boxes.length);
    $("s-det").textContent = !hasDet ? "none"
      : h.det_seq === h.seq ? `frame ${h.det_seq} (this one)`
      : `frame ${h.det_seq} · ${fmtAge(h.det_age_ms)}` + (stale ? " (dashed)" : "");
    $("s-dropped").textContent = String(state.dropped);
  }

  // The frame the newest detections were computed from, with them, when the ring still has it.
  async function drawDetectorView(h) {
    const seq = h.det_seq;
    if (seq === null || seq === undefined || seq === state.detView.seq) return;
    const src = ring.get(seq);
    if (!src) {
      if (detMissSeq !== seq) { detMissSeq = seq; state.detView.missing++; }
      return;
    }
    const now = performance.now();
    if (now - detViewAt < DETVIEW_MIN_MS) return;
    detViewAt = now;
    const bitmap = await createImageBitmap(new Blob([src.jpeg], { type: "image/jpeg" }));
    if (detCanvas.width !== bitmap.width || detCanvas.height !== bitmap.height) {
      detCanvas.width = bitmap.width;
      detCanvas.height = bitmap.height;
    }
    detCtx.drawImage(bitmap, 0, 0);
    drawBoxes(detCtx, src.h, bitmap, h.boxes, null);
    bitmap.close();
    state.detView = { seq, boxes: h.boxes.length, drawn: state.detView.drawn + 1, missing: state.detView.missing,
                      ageMs: h.det_age_ms };
    detCanvas.dataset.seq = String(seq);
    $("detcap").textContent = `detector's view: frame ${seq}, ${h.boxes.length} box(es)` +
      (h.det_age_ms > 0 ? `, ${fmtAge(h.det_age_ms)} when the live frame ${h.seq} arrived` : "");
  }

  // One source for the badge: the controller's state that came with the frame (control
  // byte 1 of the frames stream, written just before the mode); the mode it shows is the one
  // that state means. Without a controller, the frames stream's mode alone.
  function setBadge(h) {
    const st = h.state || null;
    const mode = st ? MODE_OF_STATE[st] : h.mode;
    const label = st ? `${mode} · ${st}` : mode;
    const el = $("mode");
    if (el.textContent !== label) el.textContent = label;
    el.dataset.mode = mode;
    el.dataset.state = st || "";
    el.className = "mode " + (mode === "Alarmed" ? "alarmed" : "standby");
    state.mode = h.mode;
    state.controllerState = st;
    state.badge = label;
    $("s-mode").textContent = h.mode;
    renderState();
  }

  function renderState() {
    const st = state.controllerState;
    $("s-state").textContent = st ? (transitions === null ? st : `${st} (${transitions} transitions)`) : "not running";
  }

  function fmt(v, digits) { return typeof v === "number" ? v.toFixed(digits) : "–"; }

  function onStatus(s) {
    state.status = s;
    const g = s.gateway || {};
    $("stream").textContent = g.frames_stream || "live";
    transitions = s.controller ? s.controller.transitions : null;
    renderState();
    $("s-capture").textContent = s.capture ? `${fmt(s.capture.fps, 1)} (target ${s.capture.target_fps})` : "not running";
    $("s-inference").textContent = s.inference
      ? `${fmt(s.inference.fps, 1)} / ${fmt(s.inference.infer_ms && s.inference.infer_ms.mean, 1)} ms` : "not running";
    $("s-gateway").textContent = `${fmt(g.fps, 1)} / ${g.clients}`;
  }

  connect();
})();
