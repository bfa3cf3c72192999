// Live demo: webcam frames -> WebSocket /v1/stream -> boxes, labels and probability bars.
// Plain browser JavaScript, no dependencies. State the tests read is mirrored on
// #status as data-* attributes (answered, dropped, errors, faces, boxes-drawn, state).
"use strict";

const CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"];
const COLORS = {
  angry: "#e5484d", disgust: "#8e4ec6", fear: "#6e56cf", happy: "#30a46c",
  sad: "#3e63dd", surprise: "#f5a623", neutral: "#8b8d98",
};
const MAX_SIDE = 640;     // frames are downscaled to this longest side before sending
const JPEG_QUALITY = 0.8;

const $ = (id) => document.getElementById(id);
const video = $("video");
const view = $("view");
const ctx = view.getContext("2d");
const capture = document.createElement("canvas");
const panel = $("status");

const state = {
  socket: null, stream: null, sending: false, sent: 0, sentAt: new Map(),
  lastSend: 0, answered: 0, dropped: 0, errors: 0, boxesDrawn: 0,
  result: null, answeredTimes: [], timer: null,
};

function setStatus(key, value) {
  panel.dataset[key] = String(value);
}

function show(id, text) {
  $(id).textContent = text;
}

function message(text) {
  show("message", text || "");
}

function setState(name) {
  setStatus("state", name);
  show("state", name);
  $("start").disabled = name === "streaming" || name === "connecting";
  $("stop").disabled = !(name === "streaming" || name === "connecting");
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(`GET /v1/models: ${response.status}`);
    const body = await response.json();
    const select = $("model");
    select.options[0].textContent = `default (${body.default_model})`;
    for (const model of body.models) {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = `${model.name} v${model.latest_version}`;
      select.appendChild(option);
    }
  } catch (error) {
    message(`could not list the models: ${error.message}`);
  }
}

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams();
  if ($("model").value) params.set("model", $("model").value);
  params.set("detect", $("detect").checked ? "true" : "false");
  // A server with FER_API_KEYS wants a key: open the page as /?api_key=<key> to pass one.
  const key = new URLSearchParams(location.search).get("api_key");
  if (key) params.set("api_key", key);
  return `${scheme}//${location.host}/v1/stream?${params}`;
}

async function start() {
  message("");
  setState("connecting");
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (error) {
    setState("idle");
    message(`no camera: ${error.message}`);
    return;
  }
  video.srcObject = state.stream;
  await video.play();
  if (!video.videoWidth) await new Promise((resolve) => video.addEventListener("loadedmetadata", resolve, { once: true }));
  const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
  capture.width = view.width = Math.round(video.videoWidth * scale);
  capture.height = view.height = Math.round(video.videoHeight * scale);

  Object.assign(state, { sent: 0, sentAt: new Map(), sending: false, result: null });
  const socket = new WebSocket(streamUrl());
  state.socket = socket;
  socket.onopen = () => {
    setState("streaming");
    sendNext();
  };
  socket.onmessage = (event) => onReply(JSON.parse(event.data));
  socket.onclose = (event) => {
    if (state.socket === socket) {
      stopCamera();
      setState("closed");
      if (event.code !== 1000 || event.reason) {
        message(`stream closed: ${event.code} ${event.reason}`);
      }
    }
  };
  requestAnimationFrame(render);
}

function stopCamera() {
  clearTimeout(state.timer);
  if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
  state.stream = null;
}

function stop() {
  const socket = state.socket;
  state.socket = null;
  stopCamera();
  if (socket) socket.close(1000, "stopped by the user");
  setState("idle");
}

// One frame in flight at a time (the server would drop the rest anyway), optionally
// capped to a fixed rate.
function sendNext() {
  const socket = state.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN || state.sending) return;
  const rate = Number($("rate").value);
  const wait = rate ? state.lastSend + 1000 / rate - performance.now() : 0;
  if (wait > 0) {
    clearTimeout(state.timer);
    state.timer = setTimeout(sendNext, wait);
    return;
  }
  state.sending = true;
  capture.getContext("2d").drawImage(video, 0, 0, capture.width, capture.height);
  capture.toBlob((blob) => {
    if (!blob || state.socket !== socket || socket.readyState !== WebSocket.OPEN) {
      state.sending = false;
      return;
    }
    state.lastSend = performance.now();
    state.sentAt.set(state.sent, state.lastSend);
    state.sent += 1;
    socket.send(blob);
  }, "image/jpeg", JPEG_QUALITY);
}

function onReply(reply) {
  if (reply.command !== undefined) {  // a control command's answer
    if (reply.error) message(`${reply.command}: ${reply.detail}`);
    return;
  }
  if (reply.frame === undefined) {  // refused at connect; the close follows
    message(`${reply.error}: ${reply.detail}`);
    return;
  }
  const now = performance.now();
  const sentAt = state.sentAt.get(reply.frame);
  for (const index of state.sentAt.keys()) if (index <= reply.frame) state.sentAt.delete(index);
  state.dropped += reply.dropped || 0;
  if (reply.error) {
    state.errors += 1;
    message(`frame ${reply.frame}: ${reply.detail}`);
  } else {
    state.answered += 1;
    state.result = reply;
    state.answeredTimes.push(now);
    while (state.answeredTimes.length && now - state.answeredTimes[0] > 2000) state.answeredTimes.shift();
    const span = (now - state.answeredTimes[0]) / 1000;
    if (state.answeredTimes.length > 1 && span > 0) {
      show("fps", ((state.answeredTimes.length - 1) / span).toFixed(1));
    }
    if (sentAt !== undefined) show("latency", `${Math.round(now - sentAt)} ms`);
    show("server", `${Math.round(reply.timings.latency_ms)} ms`);
    show("serving", `${reply.model} v${reply.version}`);
    setStatus("faces", reply.faces.length);
    setStatus("label", reply.faces.length ? reply.faces[0].label : "");
  }
  setStatus("answered", state.answered);
  setStatus("dropped", state.dropped);
  setStatus("errors", state.errors);
  show("answered", state.answered);
  show("dropped", state.dropped);
  state.sending = false;
  sendNext();
}

function render() {
  if (!state.stream) return;
  ctx.drawImage(video, 0, 0, view.width, view.height);
  const result = state.result;
  if (result) {
    const scale = view.width / result.image.width;
    for (const face of result.faces) drawFace(face, scale);
    if (result.faces.length) {
      state.boxesDrawn += result.faces.length;
      setStatus("boxesDrawn", state.boxesDrawn);
    }
  }
  requestAnimationFrame(render);
}

function drawFace(face, scale) {
  const probabilities = $("smoothed").checked && face.smoothed ? face.smoothed : face.probabilities;
  const label = CLASSES.reduce((a, b) => (probabilities[a] >= probabilities[b] ? a : b));
  const color = COLORS[label];
  const x = face.box.x * scale, y = face.box.y * scale;
  const w = face.box.width * scale, h = face.box.height * scale;
  ctx.lineWidth = 3;
  ctx.strokeStyle = color;
  ctx.strokeRect(x, y, w, h);

  const title = `${label} ${Math.round(probabilities[label] * 100)}%` +
    (face.track_id !== undefined ? `  #${face.track_id}` : "");
  ctx.font = "bold 15px system-ui, sans-serif";
  const titleWidth = ctx.measureText(title).width + 10;
  const titleY = y >= 22 ? y - 22 : y;  // above the box, or inside its top when no room
  ctx.fillStyle = color;
  ctx.fillRect(x, titleY, titleWidth, 22);
  ctx.fillStyle = "white";
  ctx.fillText(title, x + 5, titleY + 16);

  // Probability bars right of the box, else left of it, else inside its bottom-left corner.
  const rowHeight = 14, barWidth = 70, labelWidth = 58, panelWidth = labelWidth + barWidth + 8;
  const panelHeight = rowHeight * CLASSES.length + 4;
  let panelX = x + w + 6, panelY = y;
  if (panelX + panelWidth > view.width) panelX = x - panelWidth - 6;
  if (panelX < 0) {
    panelX = x + 4;
    panelY = y + h - panelHeight - 4;
  }
  panelY = Math.min(Math.max(0, panelY), Math.max(0, view.height - panelHeight));
  ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
  ctx.fillRect(panelX, panelY, panelWidth, panelHeight);
  ctx.font = "11px system-ui, sans-serif";
  CLASSES.forEach((name, row) => {
    const rowY = panelY + 2 + row * rowHeight;
    ctx.fillStyle = "white";
    ctx.fillText(name, panelX + 4, rowY + 10);
    ctx.fillStyle = COLORS[name];
    ctx.fillRect(panelX + labelWidth, rowY + 2, Math.max(1, barWidth * probabilities[name]), rowHeight - 4);
  });
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("model").addEventListener("change", () => {
  const socket = state.socket;
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ command: "set_model", model: $("model").value || null, version: null }));
  }
});
$("detect").addEventListener("change", () => {
  const socket = state.socket;
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ command: "set_detect", detect: $("detect").checked }));
  }
});
setState("idle");
loadModels();
