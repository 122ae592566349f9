// The service's API as test_client.py uses it (captioner/api.py): GET /v1/models for the model,
// one streamed chat request per window, retries on the statuses and with the pauses it uses.

export class ApiError extends Error {
  // kind: "network" (no answer), "key" (401), "http" (any other refusal or failure)
  constructor(kind, message, status = null) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

// The client's words for a server it cannot reach (captioner.api), for a person at a browser.
export function unreachable() {
  const port = location.port || "80";
  return new ApiError("network", `Cannot reach the captioning service at ${location.origin}: is it running? ` +
    `Check with ./status_service.sh on its host; from another machine, open the tunnel: ` +
    `ssh -N -L ${port}:127.0.0.1:${port} host`);
}

export const KEY_REFUSED = "The API key was refused (HTTP 401): enter the key the service was started with (API_KEY).";

// The chat request: one user message holding one audio part and no text, streamed
// (captioner.api.build_chat_request with stream=True).
export function chatRequest(audioUrl, model) {
  return {
    model,
    messages: [{ role: "user", content: [{ type: "audio_url", audio_url: { url: audioUrl } }] }],
    stream: true,
    stream_options: { include_usage: true },
  };
}

function headers(key, json = false) {
  const h = {};
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function send(path, init) {
  try {
    return await fetch(path, { ...init, cache: "no-store", credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw unreachable();
  }
}

// The server's own words for a refusal, on one line.
async function refusal(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.message || JSON.stringify(body);
  } catch {
    message = response.statusText;
  }
  message = String(message).replace(/\s+/g, " ").trim();
  const status = response.status;
  if (status === 401) return new ApiError("key", KEY_REFUSED, status);
  if (status === 413) return new ApiError("http", `Too large for the server (HTTP 413): ${message}`, status);
  if (status === 429 || status === 503) {
    return new ApiError("http", `The server is busy (HTTP ${status}) and stayed busy through every retry: ` +
      `try again in a minute. ${message}`, status);
  }
  if (status < 500) return new ApiError("http", `The server refused it (HTTP ${status}): ${message}`, status);
  return new ApiError("http", `Server error (HTTP ${status}): ${message}`, status);
}

export async function firstModel(key) {
  const response = await send("/v1/models", { headers: headers(key) });
  if (!response.ok) throw await refusal(response);
  const data = await response.json();
  const ids = (data.data || []).map((m) => m.id).filter(Boolean);
  if (!ids.length) throw new ApiError("http", "The server lists no model (GET /v1/models).");
  return ids[0];
}

const sleep = (seconds, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, seconds * 1000);
  signal?.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
});

// POST with the client's retries: a status in config.retry_statuses is sent again after the
// server's Retry-After, else the client's pause for that retry (config.retry_pauses).
async function postWithRetries(body, key, config, onRetry, signal) {
  for (let attempt = 0; ; attempt++) {
    const response = await send("/v1/chat/completions",
      { method: "POST", headers: headers(key, true), body, signal });
    if (response.ok || !config.retry_statuses.includes(response.status) || attempt >= config.retry_pauses.length) {
      return response;
    }
    const after = Number(response.headers.get("Retry-After"));
    const pause = Number.isFinite(after) && after > 0 ? after : config.retry_pauses[attempt];
    await response.body?.cancel();
    onRetry(response.status, pause, attempt + 1, config.retry_pauses.length);
    await sleep(pause, signal);
  }
}

// One window's caption, streamed: `onText` gets each piece as it arrives.
export async function streamCaption({ audioUrl, model, key, config, onText, onRetry, signal }) {
  const started = performance.now();
  const response = await postWithRetries(JSON.stringify(chatRequest(audioUrl, model)), key, config,
    onRetry, signal);
  if (!response.ok) throw await refusal(response);
  const pieces = [];
  let usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };
  let answered = model;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        const event = JSON.parse(payload);
        if (event.error) throw new ApiError("http", `Server error: ${event.error.message || event.error}`);
        answered = event.model || answered;
        if (event.usage) {
          usage = { prompt_tokens: event.usage.prompt_tokens || 0,
            completion_tokens: event.usage.completion_tokens || 0, total_tokens: event.usage.total_tokens || 0 };
        }
        for (const choice of event.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            pieces.push(piece);
            onText(piece);
          }
        }
      }
    }
  } catch (error) {
    if (error instanceof ApiError || error.name === "AbortError") throw error;
    throw unreachable();  // the stream broke off: the server went away under the request
  }
  return { text: pieces.join(""), model: answered, usage, latency: (performance.now() - started) / 1000 };
}
