// The caption page: drop, pick or record audio; each window's caption streams in under its time
// range, then the whole caption; copy or download it as test_client.py would write it.

import { ApiError, firstModel, streamCaption } from "./api.js";
import { dataUrl, decodeToMono, planWindows, wavBytes } from "./audio.js";
import { FORMATS, joinCaptions, render, renderAll, strip } from "./formats.js";
import { zipFiles } from "./zip.js";

const CONCURRENCY = 4;  // windows in flight at once, over every file of the page
const KEY_ITEM = "captioner.apiKey";

const $ = (selector, root = document) => root.querySelector(selector);
let config = null;
let model = null;

// --- the one-line message, the server line, the key -------------------------------------------

function say(text) {
  $("#message").textContent = text;
  $("#message").hidden = !text;
}

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function askForKey() {
  $("#key-form").hidden = false;
  $("#key").focus();
}

// Errors that concern the whole page (the server is gone, the key is wrong) go to the message line.
function pageError(error) {
  if (error instanceof ApiError && error.kind === "key") {
    sessionStorage.removeItem(KEY_ITEM);
    model = null;
    askForKey();
  }
  if (error instanceof ApiError && (error.kind === "key" || error.kind === "network")) say(error.message);
}

function showServer() {
  const line = $("#server");
  line.replaceChildren(`${location.host} · model ${model}`);
  if (config.key_required) {
    const forget = document.createElement("button");
    forget.type = "button";
    forget.className = "link";
    forget.textContent = "forget key";
    forget.addEventListener("click", () => {
      sessionStorage.removeItem(KEY_ITEM);
      model = null;
      line.textContent = "key forgotten";
      askForKey();
    });
    line.append(" · key set · ", forget);
  }
}

async function ensureModel() {
  if (model) return model;
  if (config.key_required && !storedKey()) {
    askForKey();
    throw new ApiError("key", "This service needs its API key: enter it below.");
  }
  model = await firstModel(storedKey());
  $("#key-form").hidden = true;
  say("");
  showServer();
  return model;
}

async function connect() {
  if (config.key_required && !storedKey()) {  // nothing went wrong yet: just ask
    $("#server").textContent = location.host;
    askForKey();
    return;
  }
  try {
    await ensureModel();
  } catch (error) {
    $("#server").textContent = location.host;
    pageError(error);
    if (!(error instanceof ApiError)) say(`Cannot start: ${error.message}`);
  }
}

// --- a slot limiter: CONCURRENCY windows in flight --------------------------------------------

function limiter(slots) {
  const queue = [];
  const acquire = () => (slots > 0 ? (slots--, Promise.resolve()) : new Promise((resolve) => queue.push(resolve)));
  const release = () => { const next = queue.shift(); if (next) next(); else slots++; };
  return async (task) => {
    await acquire();
    try {
      return await task();
    } finally {
      release();
    }
  };
}
const inFlight = limiter(CONCURRENCY);

// --- one input --------------------------------------------------------------------------------

const clock = (seconds) => {
  const m = Math.floor(seconds / 60);
  return `${m}:${(seconds - 60 * m).toFixed(1).padStart(4, "0")}`;
};

const baseName = (name) => name.replace(/\.[^.]*$/, "") || "caption";

const CANCELLED = "Cancelled: press Retry to caption it again.";
const items = [];

function saveAs(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

class Item {
  constructor(file) {
    this.file = file;
    this.node = $("#item-template").content.firstElementChild.cloneNode(true);
    $(".name", this.node).textContent = file.name;
    $(".player", this.node).src = URL.createObjectURL(file);
    $(".copy", this.node).addEventListener("click", () => this.copy());
    $(".download", this.node).addEventListener("click", () => this.download());
    $(".cancel", this.node).addEventListener("click", () => {
      this.abort?.abort(new DOMException(CANCELLED, "AbortError"));
    });
    $(".retry", this.node).addEventListener("click", () => run(this));
    this.rows = [];
    this.record = null;
    this.abort = null;
    items.push(this);
    $("#results").append(this.node);
  }

  // Back to a fresh start: for Retry.
  reset() {
    this.record = null;
    this.rows = [];
    $(".windows", this.node).replaceChildren();
    $(".error", this.node).hidden = true;
    $(".whole", this.node).hidden = true;
    $(".exports", this.node).hidden = true;
    $(".retry", this.node).hidden = true;
  }

  status(text, state = "") {
    $(".status", this.node).textContent = text;
    this.node.dataset.state = state;
    $(".cancel", this.node).hidden = state !== "busy" && state !== "retrying";
  }

  fail(message) {
    const line = $(".error", this.node);
    line.textContent = message;
    line.hidden = false;
    this.status("failed", "failed");
    $(".retry", this.node).hidden = false;
  }

  showWindows(spans) {
    const list = $(".windows", this.node);
    this.rows = spans.map(([start, end]) => {
      const row = $("#window-template").content.firstElementChild.cloneNode(true);
      $(".range", row).textContent = `${clock(start)} – ${clock(end)}`;
      row.dataset.start = start.toFixed(3);
      row.dataset.end = end.toFixed(3);
      row.dataset.state = "waiting";
      list.append(row);
      return row;
    });
  }

  finish(record) {
    this.record = record;
    $(".caption", this.node).textContent = record.caption;
    $(".whole", this.node).hidden = false;
    $(".exports", this.node).hidden = false;
    this.status(`done in ${record.latency.toFixed(1)} s`, "done");
    $("#all").hidden = false;
  }

  exported() {
    const format = $(".format", this.node).value;
    return [format, render(this.record, format)];
  }

  async copy() {
    const [format, text] = this.exported();
    const note = $(".copied", this.node);
    try {
      await navigator.clipboard.writeText(text);
      note.textContent = `${format} copied`;
    } catch {
      note.textContent = "the browser refused the clipboard: use Download";
    }
  }

  download() {
    const [format, text] = this.exported();
    saveAs(new Blob([text], { type: FORMATS[format].mime }), baseName(this.file.name) + FORMATS[format].extension);
  }
}

// Every finished caption in one download: text and JSON as test_client.py writes a batch, SRT and
// VTT (one file per input) in a .zip, each named after its input (a repeated name gets " (2)").
function downloadAll() {
  const format = $("#all-format").value;
  const records = items.filter((item) => item.record).map((item) => item.record);
  if (!records.length) return;
  if (format === "text" || format === "json") {
    saveAs(new Blob([renderAll(records, format)], { type: FORMATS[format].mime }), `captions${FORMATS[format].extension}`);
    return;
  }
  const seen = new Map();
  const files = records.map((record) => {
    const base = baseName(record.source);
    const n = (seen.get(base) || 0) + 1;
    seen.set(base, n);
    return [`${base}${n > 1 ? ` (${n})` : ""}${FORMATS[format].extension}`, render(record, format)];
  });
  saveAs(zipFiles(files), `captions-${format}.zip`);
}

// The duration the container states, read by the browser without decoding (Infinity or NaN when it
// states none, as a recording's WebM): a one-hour file is refused before it is decoded whole.
function statedDuration(file) {
  return new Promise((resolve) => {
    const probe = new Audio();
    const url = URL.createObjectURL(file);
    const done = (value) => { clearTimeout(timer); URL.revokeObjectURL(url); probe.removeAttribute("src"); resolve(value); };
    const timer = setTimeout(() => done(NaN), 5000);
    probe.preload = "metadata";
    probe.addEventListener("loadedmetadata", () => done(probe.duration), { once: true });
    probe.addEventListener("error", () => done(NaN), { once: true });
    probe.src = url;
  });
}

const tooLong = (duration) => `Too long for the page: ${clock(duration)} (it takes up to ` +
  `${clock(config.page_max_seconds)}); caption it with test_client.py.`;

async function captionWindow(item, index, samples, abort) {
  const row = item.rows[index];
  return inFlight(async () => {
    abort.signal.throwIfAborted();
    row.dataset.state = "streaming";
    const text = $(".text", row);
    const audioUrl = await dataUrl(wavBytes(samples, config.sample_rate), "audio/wav");
    const caption = await streamCaption({
      audioUrl, model, key: storedKey(), config, signal: abort.signal,
      onText: (piece) => { text.textContent += piece; },
      onRetry: (status, pause, n, of) => {
        item.status(`server busy (HTTP ${status}): retry ${n} of ${of} in ${pause} s`, "retrying");
      },
    });
    text.textContent = strip(caption.text);
    row.dataset.state = "done";
    item.status(`captioning: ${item.rows.filter((r) => r.dataset.state === "done").length} of ${item.rows.length} windows`, "busy");
    return caption;
  });
}

async function caption(item) {
  const started = performance.now();
  const rate = config.sample_rate;
  const abort = item.abort;
  item.status("reading", "busy");
  const stated = await statedDuration(item.file);
  if (Number.isFinite(stated) && stated > config.page_max_seconds) {
    item.fail(tooLong(stated));
    return;
  }
  if (abort.signal.aborted) throw abort.signal.reason;
  item.status("decoding", "busy");
  let samples;
  try {
    samples = await decodeToMono(await item.file.arrayBuffer(), rate);
  } catch (error) {
    item.fail(`Not audio, or a format this browser cannot decode (${error.name || error}): ` +
      "pick an audio file (WAV, MP3, FLAC, Ogg, Opus, M4A, WebM).");
    return;
  }
  if (!samples.length) {
    item.fail("No audio in this file: it decodes to zero samples (empty or truncated).");
    return;
  }
  const duration = samples.length / rate;
  if (duration > config.page_max_seconds) {
    item.fail(tooLong(duration));
    return;
  }
  if (abort.signal.aborted) throw abort.signal.reason;
  const ranges = planWindows(samples, config.max_window_seconds, config);
  const spans = ranges.map(([a, b]) => [a / rate, b / rate]);
  item.showWindows(spans);
  try {
    await ensureModel();
    item.status(`captioning: 0 of ${spans.length} windows`, "busy");
    const captions = await Promise.all(ranges.map(([a, b], i) => captionWindow(
      item, i, samples.subarray(a, b), abort).catch((error) => {
      abort.abort(error);
      throw error;
    })));
    const segments = spans.map(([start, end], i) => ({ start, end, caption: strip(captions[i].text) }));
    const usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
    for (const c of captions) for (const k of Object.keys(usage)) usage[k] += c.usage[k];
    item.finish({ source: item.file.name, duration, segments, caption: joinCaptions(segments),
      model: captions[0].model, usage, latency: (performance.now() - started) / 1000, error: null });
  } catch (error) {
    for (const row of item.rows) if (row.dataset.state !== "done") row.dataset.state = "failed";
    throw error;
  }
}

// Caption one input (again, for Retry); Cancel aborts its decoding wait and its requests.
function run(item) {
  item.reset();
  item.abort = new AbortController();
  caption(item).catch((error) => {
    if (item.abort.signal.aborted && item.abort.signal.reason?.message === CANCELLED) {
      item.fail(CANCELLED);
      return;
    }
    const expected = error instanceof ApiError || error.name === "AbortError";
    item.fail(expected ? error.message : `Unexpected ${error.name}: ${error.message}`);
    pageError(error);
  });
}

function addFiles(files) {
  for (const file of files) run(new Item(file));
}

// --- drop, pick, record -----------------------------------------------------------------------

function setUpInputs() {
  const zone = $("#drop");
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();  // a file dropped anywhere is captioned, never opened by the browser
    zone.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles([...event.dataTransfer.files]);
  });
  $("#files").addEventListener("change", (event) => {
    addFiles([...event.target.files]);
    event.target.value = "";
  });
  $("#record").addEventListener("click", toggleRecording);
  $("#download-all").addEventListener("click", downloadAll);
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("#key").value.trim());
    $("#key").value = "";
    model = null;
    connect();
  });
}

let recording = null;

async function toggleRecording() {
  const button = $("#record");
  if (recording) {
    recording.recorder.stop();
    return;
  }
  if (!window.isSecureContext || !navigator.mediaDevices) {
    say("Recording needs the page opened as http://127.0.0.1:PORT/ or http://localhost:PORT/ " +
      "(a browser allows the microphone only there or over HTTPS).");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    say(error.name === "NotAllowedError"
      ? "The browser was refused the microphone: allow it in this site's settings, then press Record again."
      : `No microphone to record from (${error.name}).`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const started = Date.now();
  const timer = setInterval(() => {
    $("#record-time").textContent = `recording ${clock((Date.now() - started) / 1000)}`;
  }, 200);
  recording = { recorder };
  recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
  recorder.addEventListener("stop", () => {
    clearInterval(timer);
    for (const track of stream.getTracks()) track.stop();
    recording = null;
    button.textContent = "Record";
    $("#record-time").textContent = "";
    const type = recorder.mimeType || "audio/webm";
    const extension = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    const stamp = new Date(started).toISOString().slice(0, 19).replaceAll(":", "-");
    addFiles([new File(chunks, `recording-${stamp}.${extension}`, { type })]);
  });
  recorder.start();
  button.textContent = "Stop";
}

async function main() {
  try {
    const response = await fetch("/page/config.json", { cache: "no-store" });
    config = await response.json();
  } catch {
    say("Cannot reach the captioning service: reload the page once it runs (./status_service.sh on its host).");
    return;
  }
  $("#window-max").textContent = config.max_window_seconds;
  setUpInputs();
  await connect();
}

main();
