// frameshm gateway page: JPEG frames over a WebSocket, detection boxes and the mode drawn on
// top. Binary message = u32 LE header length | JSON header | JPEG; text message = status JSON.
"use strict";
(function () {
  const canvas = document.getElementById("video");
  const ctx = canvas.getContext("2d");
  const $ = (id) => document.getElementById(id);
  const BOX_COLOR = "#39ff14";
  // Exposed for tests and debugging.
  const state = window.frameshm = {
    connected: false, frames: 0, drawn: 0, dropped: 0, lastSeq: null, boxes: 0, boxesDrawn: 0,
    mode: null, controllerState: null, fps: 0, latencyMs: null, status: null, header: null,
  };
  let pending = null;   // newest message waiting for the decoder
  let decoding = false;
  let fpsCount = 0, fpsStart = performance.now();
  const latencies = [];

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
      if (pending !== null) state.dropped++;  // the page is slower than the stream: keep the newest
      pending = ev.data;
      if (!decoding) decodeNext();
    };
  }

  async function decodeNext() {
    decoding = true;
    while (pending !== null) {
      const buf = pending;
      pending = null;
      try {
        const view = new DataView(buf);
        const hlen = view.getUint32(0, true);
        const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
        const blob = new Blob([new Uint8Array(buf, 4 + hlen)], { type: "image/jpeg" });
        const bitmap = await createImageBitmap(blob);
        draw(header, bitmap);
        bitmap.close();
      } catch (err) {
        console.error("frame", err);
      }
    }
    decoding = false;
  }

  function draw(h, bitmap) {
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    ctx.drawImage(bitmap, 0, 0);
    const sx = bitmap.width / h.width, sy = bitmap.height / h.height;
    ctx.lineWidth = Math.max(2, Math.round(bitmap.width / 240));
    ctx.strokeStyle = BOX_COLOR;
    ctx.fillStyle = BOX_COLOR;
    ctx.font = `${Math.max(12, Math.round(bitmap.width / 40))}px system-ui, sans-serif`;
    for (const [x1, y1, x2, y2, score, cls] of h.boxes) {
      ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
      ctx.fillText(`${cls} ${score.toFixed(2)}`, x1 * sx + 3, Math.max(12, y1 * sy - 4));
    }
    state.drawn++;
    state.boxes = h.boxes.length;
    if (h.boxes.length) state.boxesDrawn++;
    state.lastSeq = h.seq;
    state.header = h;
    setMode(h.mode);
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
    $("s-dropped").textContent = String(state.dropped);
  }

  function setMode(mode) {
    state.mode = mode;
    const el = $("mode");
    const label = state.controllerState ? `${mode} · ${state.controllerState}` : mode;
    if (el.textContent !== label) el.textContent = label;
    el.dataset.mode = mode;
    el.className = "mode " + (mode === "Alarmed" ? "alarmed" : "standby");
    $("s-mode").textContent = mode;
  }

  function fmt(v, digits) { return typeof v === "number" ? v.toFixed(digits) : "–"; }

  function onStatus(s) {
    state.status = s;
    const g = s.gateway || {};
    $("stream").textContent = g.frames_stream || "live";
    if (s.controller) {
      state.controllerState = s.controller.state;
      $("s-state").textContent = `${s.controller.state} (${s.controller.transitions} transitions)`;
    } else {
      state.controllerState = null;
      $("s-state").textContent = "not running";
    }
    if (state.mode) setMode(state.mode);
    $("s-capture").textContent = s.capture ? `${fmt(s.capture.fps, 1)} (target ${s.capture.target_fps})` : "not running";
    $("s-inference").textContent = s.inference
      ? `${fmt(s.inference.fps, 1)} / ${fmt(s.inference.infer_ms && s.inference.infer_ms.mean, 1)} ms` : "not running";
    $("s-gateway").textContent = `${fmt(g.fps, 1)} / ${g.clients}`;
  }

  connect();
})();
