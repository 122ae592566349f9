// Decode in the browser, cut into windows, encode each window as WAV: what captioner/audio.py does
// for test_client.py, with its constants. `config` is /page/config.json, which the request guard
// builds from captioner/audio.py, so the numbers have one home; the rule is plan_windows's, line
// for line (tests/test_page.py runs both on the same samples).

// Mono float32 samples at `sampleRate`: the browser decodes and resamples, the channels are averaged.
export async function decodeToMono(arrayBuffer, sampleRate) {
  const context = new OfflineAudioContext(1, 1, sampleRate);
  const buffer = await context.decodeAudioData(arrayBuffer);
  if (buffer.numberOfChannels === 1) return buffer.getChannelData(0);
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  return mono;
}

// Python's round(): halves go to the even neighbour.
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function median(values) {
  const sorted = Float64Array.from(values).sort();
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

// Sample ranges [start, end) of at most `maxSeconds` covering `samples`, cut at quiet points:
// captioner.audio.plan_windows. Each cut is searched for in the window's last stretch; the
// latest of its quietest frames is used when that frame is quiet, else the cut lands at the limit.
export function planWindows(samples, maxSeconds, config) {
  const rate = config.sample_rate;
  const total = samples.length;
  const limit = roundHalfEven(maxSeconds * rate);
  if (limit <= 0) throw new RangeError("maxSeconds must be positive");
  if (total <= limit) return [[0, total]];
  const frame = Math.trunc(config.frame_seconds * rate);
  const frames = Math.floor(total / frame);
  const rms = new Float64Array(frames);
  for (let f = 0; f < frames; f++) {
    let sum = 0;
    for (let i = f * frame; i < (f + 1) * frame; i++) sum += samples[i] * samples[i];
    rms[f] = Math.sqrt(sum / frame);
  }
  const threshold = Math.max(config.quiet_floor, config.quiet_ratio * median(rms));
  const search = Math.max(roundHalfEven(config.cut_search_seconds * rate),
    Math.floor(limit / config.cut_search_divisor));

  const ranges = [];
  let start = 0;
  while (total - start > limit) {
    let cut = start + limit;
    // Frames [first, last) lie within the search span that ends at the cut.
    const first = Math.max(0, Math.ceil((cut - search) / frame));
    const last = Math.floor(cut / frame);
    if (last > first) {
      let quietest = Infinity;
      let index = first;
      for (let f = first; f < last; f++) {
        if (rms[f] <= quietest) {  // <=: the latest of the quietest frames keeps windows long
          quietest = rms[f];
          index = f;
        }
      }
      if (quietest <= threshold) cut = Math.min(index * frame + Math.floor(frame / 2), start + limit);
    }
    if (cut <= start) cut = start + limit;
    ranges.push([start, cut]);
    start = cut;
  }
  ranges.push([start, total]);
  return ranges;
}

// 16-bit PCM mono WAV: captioner.audio.pcm_wav of to_pcm16.
export function wavBytes(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF");
  view.setUint32(4, 36 + 2 * samples.length, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);  // PCM
  view.setUint16(22, 1, true);  // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, Math.trunc(s * 32767), true);
  }
  return view.buffer;
}

// A data: URL of the bytes, as captioner.api.audio_data_url makes it.
export function dataUrl(bytes, mime) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(new Blob([bytes], { type: mime }));
  });
}
