// mimo-voice page: one RTCPeerConnection (microphone up, agent audio down) plus a data channel
// that speaks pipecat's RTVI protocol (events: speaking, words, metrics; our server-messages:
// per-turn latency and tool calls). window.mimo exposes connect/disconnect/stats for scripts.
"use strict";

const RTVI = { label: "rtvi-ai", version: "2.2.0" };
const $ = (id) => document.getElementById(id);

const state = {
  info: null, pc: null, channel: null, mic: null, pcId: null, sessionSecret: null, sentOffer: false, pendingCandidates: [],
  status: "idle", botReady: false, mode: "non_thinking",
  userTurns: 0, botTurns: 0, latencies: [], toolCalls: [], errors: [],
  userItem: null, agentItem: null, toolItems: new Map(), statsTimer: null,
};

function setStatus(text) {
  state.status = text;
  $("status").textContent = text;
}

function addItem(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.append(document.createTextNode(text));
  $("transcript").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function setMeta(item, text) {
  let meta = item.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    item.append(meta);
  }
  meta.textContent = text;
}

function setText(item, text) {
  item.firstChild.textContent = text;
}

function rtviSend(type, data) {
  if (state.channel?.readyState !== "open") return;
  state.channel.send(JSON.stringify({ label: RTVI.label, type, id: crypto.randomUUID(), data }));
}

function sendMode(mode) {
  state.mode = mode;
  if (state.botReady) rtviSend("client-message", { t: "set-mode", d: { mode } });
}

// --- what the server tells us -------------------------------------------------------------

const handlers = {
  "bot-ready": () => {
    state.botReady = true;
    setStatus("connected: speak when you like");
    if (state.mode !== state.info.mode) sendMode(state.mode);
  },
  "user-started-speaking": () => {
    state.userItem = addItem("user", "…");
    state.userItem.dataset.started = performance.now();
  },
  "user-stopped-speaking": () => {
    state.userTurns += 1;
    const item = state.userItem || addItem("user", "…");
    const secs = (performance.now() - Number(item.dataset.started || performance.now())) / 1000;
    if (item.firstChild.textContent === "…") setText(item, "(speech)");
    setMeta(item, `${secs.toFixed(1)} s`);
    state.userItem = null;
    state.agentItem = null;
  },
  "user-transcription": ({ text }) => {
    if (state.userItem) setText(state.userItem, text);
  },
  "bot-started-speaking": () => {
    state.botTurns += 1;
    state.agentItem = state.agentItem || addItem("agent", "");
  },
  "bot-tts-text": ({ text }) => {
    // The agent's words carry their own spacing (pieces of its text stream), so they join as they come.
    const item = state.agentItem || (state.agentItem = addItem("agent", ""));
    setText(item, (item.firstChild.textContent + text).trimStart());
  },
  "bot-stopped-speaking": () => {
    if (state.agentItem && !state.agentItem.firstChild.textContent) setText(state.agentItem, "(audio)");
  },
  "bot-interrupted": () => state.agentItem?.classList.add("interrupted"),
  "server-message": (data) => serverMessage(data),
  "server-response": ({ t, d }) => {
    if (t === "set-mode") addItem("system", `mode: ${d?.mode ?? state.mode}`);
  },
  "error-response": ({ error }) => showError(error),
  "error": ({ error }) => showError(error),
};

function serverMessage(data) {
  if (data.type === "turn-latency") {
    state.latencies.push(data.latency_ms);
    $("latency").textContent = `${data.latency_ms} ms`;
    const item = state.agentItem || (state.agentItem = addItem("agent", ""));
    setMeta(item, `${data.latency_ms} ms after you stopped`);
  } else if (data.type === "tool-call") {
    state.toolCalls.push({ name: data.name, arguments: data.arguments });
    state.toolItems.set(data.id, addItem("tool", `⚙ ${data.name}(${JSON.stringify(data.arguments)})`));
  } else if (data.type === "tool-result") {
    const item = state.toolItems.get(data.id) || addItem("tool", `⚙ ${data.name}`);
    setMeta(item, `→ ${JSON.stringify(data.result)}${data.duration_ms == null ? "" : ` (${data.duration_ms} ms)`}`);
  } else if (data.type === "call-ended") {
    addItem("system", `call ended: ${data.reason}`);
  }
}

function showError(text) {
  state.errors.push(text);
  addItem("system", `error: ${text}`);
}

function onChannelMessage(event) {
  let message;
  try {
    message = JSON.parse(event.data);
  } catch {
    return;
  }
  if (message.type === "signalling" && message.message?.type === "peerLeft") {
    disconnect("the server ended the session");
  } else if (message.label === RTVI.label) {
    handlers[message.type]?.(message.data ?? {});
  }
}

// --- signalling ---------------------------------------------------------------------------

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function signal(method, body) {
  const response = await fetch("/api/offer", {
    method, body: JSON.stringify(body), headers: { "Content-Type": "application/json", ...authHeaders() },
  });
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(reply.detail || `${method} /api/offer: HTTP ${response.status}`);
  return reply;
}

function gatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function sendCandidates() {
  if (!state.pcId || !state.pendingCandidates.length) return;
  const candidates = state.pendingCandidates.splice(0);
  const body = { pc_id: state.pcId, session_secret: state.sessionSecret, candidates };
  await signal("PATCH", body).catch((error) => showError(error.message));
}

async function connect() {
  if (state.pc) return;
  setStatus("asking for the microphone…");
  $("talk").disabled = true;
  try {
    state.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const iceServers = state.info.ice_servers.map((urls) => ({ urls }));
    const pc = (state.pc = new RTCPeerConnection({ iceServers }));
    pc.addTransceiver(state.mic.getAudioTracks()[0], { direction: "sendrecv" });
    pc.ontrack = (event) => { $("agent-audio").srcObject = event.streams[0] || new MediaStream([event.track]); };
    pc.onicecandidate = ({ candidate }) => {
      if (!candidate || !pc.localDescription || !state.sentOffer) return;
      state.pendingCandidates.push({
        candidate: candidate.candidate, sdp_mid: candidate.sdpMid, sdp_mline_index: candidate.sdpMLineIndex,
      });
      sendCandidates();
    };
    pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(pc.connectionState)) disconnect(`connection ${pc.connectionState}`);
    };
    state.channel = pc.createDataChannel("chat", { ordered: true });
    state.channel.onopen = () => rtviSend("client-ready", { version: RTVI.version, about: { library: "mimo-voice-page" } });
    state.channel.onmessage = onChannelMessage;

    setStatus("connecting…");
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 2000);
    state.sentOffer = true;
    const answer = await signal("POST", { sdp: pc.localDescription.sdp, type: "offer" });
    state.pcId = answer.pc_id;
    state.sessionSecret = answer.session_secret; // renegotiation and trickled ICE must prove the call is ours
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    await sendCandidates();
    state.statsTimer = setInterval(updateMeters, 250);
    $("talk").textContent = "Stop";
    $("talk").classList.add("live");
  } catch (error) {
    showError(error.message || String(error));
    disconnect(`could not connect: ${error.message || error}`);
  } finally {
    $("talk").disabled = false;
  }
}

function disconnect(reason = "idle") {
  clearInterval(state.statsTimer);
  state.pc?.close();
  state.mic?.getTracks().forEach((track) => track.stop());
  Object.assign(state, {
    pc: null, channel: null, mic: null, pcId: null, sessionSecret: null, sentOffer: false, botReady: false,
  });
  state.pendingCandidates = [];
  $("talk").textContent = "Start talking";
  $("talk").classList.remove("live");
  setStatus(reason);
}

// --- meters and stats ---------------------------------------------------------------------

async function readStats() {
  const result = { mic: {}, inbound: {} };
  if (!state.pc) return result;
  (await state.pc.getStats()).forEach((report) => {
    if (report.type === "inbound-rtp" && report.kind === "audio") result.inbound = report;
    if (report.type === "media-source" && report.kind === "audio") result.mic = report;
  });
  return result;
}

async function updateMeters() {
  const { mic, inbound } = await readStats();
  $("mic-level").value = mic.audioLevel || 0;
  $("agent-level").value = inbound.audioLevel || 0;
}

async function stats() {
  const { inbound } = await readStats();
  return {
    status: state.status, connected: state.pc?.connectionState === "connected", botReady: state.botReady,
    mode: state.mode, userTurns: state.userTurns, botTurns: state.botTurns, latencies: state.latencies,
    toolCalls: state.toolCalls, errors: state.errors,
    transcript: [...$("transcript").children].map((li) => ({ kind: li.className, text: li.textContent })),
    inbound: {
      packetsReceived: inbound.packetsReceived || 0,
      totalAudioEnergy: inbound.totalAudioEnergy || 0,
      totalSamplesDuration: inbound.totalSamplesDuration || 0,
    },
  };
}

// --- start-up -----------------------------------------------------------------------------

async function loadInfo() {
  // With a token, /api/info needs it too: /health says whether one is required.
  const health = await (await fetch("/health")).json();
  $("token-field").hidden = !health.auth_required;
  if (health.auth_required && !$("token").value.trim()) {
    setStatus("enter the access token");
    return null;
  }
  const response = await fetch("/api/info", { headers: authHeaders() });
  if (!response.ok) {
    setStatus(response.status === 401 ? "wrong access token" : `server error ${response.status}`);
    return null;
  }
  const info = (state.info = await response.json());
  $("model").textContent = info.tiny ? "tiny model" : info.model;
  $("model").classList.toggle("tiny", info.tiny);
  $("notice").hidden = !info.notice;
  $("notice").textContent = info.notice || "";
  state.mode = info.mode;
  document.querySelector(`input[name=mode][value=${info.mode}]`).checked = true;
  $("talk").disabled = false;
  return info;
}

$("token").addEventListener("change", () => loadInfo().catch((error) => showError(error.message)));
$("talk").addEventListener("click", () => (state.pc ? disconnect() : connect()));
$("mode").addEventListener("change", (event) => sendMode(event.target.value));
window.mimo = { connect, disconnect, stats, ready: loadInfo().catch((error) => showError(error.message)) };
