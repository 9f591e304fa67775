// The megaedge web page: microphone -> AudioWorklet (ScriptProcessor where there is none) -> pcm16 at 16 or 24 kHz
// -> the realtime WebSocket (OpenAI's transcription events) -> partials and finals on the page. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let ws = null, context = null, media = null, node = null, source = null;
let partialText = "", stopping = false;

function status(text) { $("status").textContent = text; }
function logError(text) { $("log").textContent += text + "\n"; }

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sendPcm(buffer) {
  send({ type: "input_audio_buffer.append", audio: toBase64(new Int16Array(buffer)) });
}

// A final's text with each token in a span carrying its log-probability: tokens the model gave less than even odds
// are marked, so a reader sees which word to doubt. Plain text when the tokens do not spell the transcript.
const UNSURE_LOGPROB = Math.log(0.5);

function transcriptOf(event) {
  const text = document.createElement("span");
  const tokens = event.logprobs || [];
  const decoder = new TextDecoder();  // streaming: a character split across tokens belongs to the one completing it
  const pieces = tokens.map((t) => decoder.decode(new Uint8Array(t.bytes), { stream: true }));
  if (pieces.length) pieces[pieces.length - 1] += decoder.decode();
  if (!tokens.length || pieces.join("").trim() !== event.transcript) {
    text.textContent = event.transcript;
    return text;
  }
  pieces[0] = pieces[0].trimStart();
  let pending = 0;  // the lowest log-probability of the tokens holding the start of the next character
  tokens.forEach((t, i) => {
    const logprob = Math.min(pending, t.logprob);
    if (!pieces[i]) { pending = logprob; return; }
    pending = 0;
    const span = document.createElement("span");
    span.textContent = pieces[i];
    span.dataset.logprob = String(logprob);
    span.title = `p = ${Math.exp(logprob).toFixed(2)}`;
    if (logprob < UNSURE_LOGPROB) span.className = "unsure";
    text.appendChild(span);
  });
  return text;
}

function onEvent(event) {
  switch (event.type) {
    case "transcription_session.created":
      status("connected");
      break;
    case "transcription_session.updated":
      status("listening");
      break;
    case "input_audio_buffer.speech_started":
      status("hearing speech");
      break;
    case "input_audio_buffer.speech_stopped":
      status("listening");
      break;
    case "conversation.item.input_audio_transcription.delta":
      // `partial`: the whole current hypothesis (megaedge extension); `delta`: newly committed text only.
      partialText = event.partial !== undefined ? event.partial : partialText + (event.delta || "");
      $("partial").textContent = partialText;
      break;
    case "conversation.item.input_audio_transcription.completed": {
      partialText = "";
      $("partial").textContent = "";
      if (!event.transcript) { if (stopping) close(); break; }
      const li = document.createElement("li");
      li.className = "final";
      li.appendChild(transcriptOf(event));
      const extra = document.createElement("small");
      const logp = event.min_logprob === null || event.min_logprob === undefined ? "" :
        ` min logp ${event.min_logprob.toFixed(2)}`;
      extra.textContent = ` [${event.start.toFixed(2)}-${event.end.toFixed(2)} s, ${event.route}${logp}]`;
      li.appendChild(extra);
      $("finals").appendChild(li);
      if (stopping) close();
      break;
    }
    case "error":
      if (stopping && event.error.code === "input_audio_buffer_commit_empty") { close(); break; }
      logError(`${event.error.code}: ${event.error.message}`);
      break;
  }
}

async function startCapture(rate) {
  media = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  try {
    context = new AudioContext({ sampleRate: rate });  // the browser resamples the microphone for us
  } catch (e) {
    context = new AudioContext();  // this browser cannot: the worklet downsamples
  }
  await context.resume();
  source = context.createMediaStreamSource(media);
  if (context.audioWorklet) {
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    node = new AudioWorkletNode(context, "pcm-capture", { processorOptions: { targetRate: rate } });
    node.port.onmessage = (e) => sendPcm(e.data);
    source.connect(node);
  } else {
    // ScriptProcessor fallback: the same box-filter downsampling on the main thread.
    node = context.createScriptProcessor(4096, 1, 1);
    const ratio = context.sampleRate / rate;
    let phase = 0, sum = 0, count = 0, out = [];
    node.onaudioprocess = (e) => {
      const data = e.inputBuffer.getChannelData(0);
      for (let i = 0; i < data.length; i++) {
        sum += data[i]; count += 1; phase += 1;
        if (phase >= ratio) {
          phase -= ratio;
          const v = Math.max(-1, Math.min(1, sum / count));
          out.push(v < 0 ? Math.round(v * 32768) : Math.round(v * 32767));
          sum = 0; count = 0;
        }
      }
      if (out.length >= rate / 10) { sendPcm(Int16Array.from(out).buffer); out = []; }
    };
    source.connect(node);
    node.connect(context.destination);
  }
}

function stopCapture() {
  if (source) source.disconnect();
  if (node) node.disconnect();
  if (media) media.getTracks().forEach((t) => t.stop());
  if (context) context.close();
  source = node = media = context = null;
}

function close() {
  stopCapture();
  if (ws) ws.close();
  ws = null;
  stopping = false;
  $("start").disabled = false;
  $("stop").disabled = true;
  status("idle");
}

async function start() {
  $("start").disabled = true;
  $("stop").disabled = false;
  $("log").textContent = "";
  const rate = parseInt(params.get("rate") || $("rate").value, 10);
  const key = params.get("api_key") || $("key").value;
  const language = params.get("language") || $("language").value;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let url = `${scheme}//${location.host}/v1/realtime?intent=transcription`;
  if (key) url += `&api_key=${encodeURIComponent(key)}`;  // browsers cannot set headers on a WebSocket
  ws = new WebSocket(url);
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = (e) => {
    if (e.code !== 1000 && e.code !== 1005) logError(`connection closed (${e.code} ${e.reason})`);
    if (ws) close();
  };
  ws.onerror = () => logError("connection error");
  await new Promise((resolve, reject) => { ws.onopen = resolve; setTimeout(() => reject(new Error("timeout")), 10000); });
  send({
    type: "transcription_session.update",
    session: {
      input_audio_format: "pcm16",
      input_audio_rate: rate,
      input_audio_transcription: language ? { language } : {},
      turn_detection: { type: "server_vad" },
      include: ["item.input_audio_transcription.logprobs"],
    },
  });
  try {
    await startCapture(rate);
  } catch (e) {
    logError(`microphone: ${e.message}`);
    close();
  }
}

function stop() {
  // Finish the open utterance: commit what was said; the page closes on its transcript (or when there was none).
  stopping = true;
  stopCapture();
  send({ type: "input_audio_buffer.commit" });
  setTimeout(() => { if (stopping) close(); }, 5000);
}

$("start").onclick = () => start().catch((e) => { logError(e.message); close(); });
$("stop").onclick = stop;
if (params.get("rate")) $("rate").value = params.get("rate");
if (params.get("autostart")) start().catch((e) => { logError(e.message); close(); });
