// One input's record as text, SRT, VTT or JSON: the shapes captioner/formats.py gives test_client.py
// for one input (tests/test_page.py renders the page's record with both and compares).

import { roundHalfEven } from "./audio.js";

export const FORMATS = {
  text: { extension: ".txt", mime: "text/plain" },
  srt: { extension: ".srt", mime: "application/x-subrip" },
  vtt: { extension: ".vtt", mime: "text/vtt" },
  json: { extension: ".json", mime: "application/json" },
};

// Python's round(x, 3): toFixed rounds the double's exact decimal value, as Python does (a double
// is never exactly halfway between two thousandths, so the tie rules never differ).
const round3 = (x) => Number(x.toFixed(3));

// Python's whitespace (str.isspace, and \s in its patterns), which is not JavaScript's: Python's
// includes \x1c-\x1f and \x85, JavaScript's \ufeff.
const SPACE = "[\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const EDGES = new RegExp(`^${SPACE}+|${SPACE}+$`, "g");
const BLANK_LINES = new RegExp(`\\n${SPACE}*\\n+`, "g");

// Python's str.strip().
export const strip = (text) => text.replace(EDGES, "");

// captioner.formats.escape_text: C0 controls but \t and \n, DEL, C1, U+2028 and U+2029 shown as
// Python's unicode_escape writes them, so text output cannot drive a terminal.
const TERMINAL_CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]/g;
export const escapeText = (text) => text.replace(TERMINAL_CONTROL, (c) => {
  const code = c.charCodeAt(0);
  if (c === "\r") return "\\r";
  return code > 0xff ? `\\u${code.toString(16).padStart(4, "0")}` : `\\x${code.toString(16).padStart(2, "0")}`;
});

// The segments' captions, trimmed, joined by a space: captioner.records.join_captions.
export function joinCaptions(segments) {
  return segments.map((s) => strip(s.caption)).filter((c) => c).join(" ");
}

// captioner.records.Record.to_json.
export function recordJson(record) {
  return {
    source: record.source,
    path: record.path ?? null,  // a file's real path: a browser has none
    sha256: record.sha256 ?? null,  // stdin's hash: the page reads no stdin
    duration: record.duration === null ? null : round3(record.duration),
    segments: record.segments.map((s) => ({ start: round3(s.start), end: round3(s.end), caption: s.caption })),
    caption: record.caption,
    model: record.model,
    usage: record.usage,
    latency: round3(record.latency),
    error: record.error,
  };
}

function timestamp(seconds, decimal) {
  const totalMs = Math.max(0, roundHalfEven(seconds * 1000));
  const pad = (n, width) => String(n).padStart(width, "0");
  const hours = Math.floor(totalMs / 3600000);
  const minutes = Math.floor((totalMs % 3600000) / 60000);
  const secs = Math.floor((totalMs % 60000) / 1000);
  return `${pad(hours, 2)}:${pad(minutes, 2)}:${pad(secs, 2)}${decimal}${pad(totalMs % 1000, 3)}`;
}

// Caption text safe inside a cue: no blank lines (they end a cue), no control characters, no arrow.
function cueText(caption) {
  let text = caption.replace(/\r\n?|[\x85\u2028\u2029]/g, "\n");
  text = text.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
  text = strip(text).replace(BLANK_LINES, "\n");
  return text.replaceAll("-->", "\u2192");
}

// A window that got an empty caption has nothing to show: no cue for it.
function cues(record) {
  return record.segments.map((s) => [s.start, s.end, cueText(s.caption)]).filter((c) => c[2]);
}

// Several inputs in one file, as test_client.py writes a batch: text with a `# source` header per
// input, JSON as an array (captioner.formats.render_text / render_json with many inputs).
export function renderAll(records, format) {
  if (format === "text") {
    return records.filter((r) => r.error === null)
      .map((r) => `# ${escapeText(r.source)}\n${escapeText(strip(r.caption))}\n`).join("\n");
  }
  if (format === "json") return JSON.stringify(records.map(recordJson), null, 2) + "\n";
  throw new Error(`${format} is one file per input`);
}

export function render(record, format) {
  if (format === "text") return record.error === null ? escapeText(strip(record.caption)) + "\n" : "";
  if (format === "json") return JSON.stringify(recordJson(record), null, 2) + "\n";
  if (format === "srt") {
    return cues(record).map(([start, end, text], i) =>
      `${i + 1}\n${timestamp(start, ",")} --> ${timestamp(end, ",")}\n${text}\n`).join("\n");
  }
  if (format === "vtt") {
    return "WEBVTT\n\n" + cues(record).map(([start, end, text]) =>
      `${timestamp(start, ".")} --> ${timestamp(end, ".")}\n${text}\n`).join("\n");
  }
  throw new Error(`unknown format ${format}`);
}
