"""The caption page (web/, served by captioner_server/request_guard.py at GET / on the service's own port),
in a real browser against the real `vllm serve` (CPU build, tiny model).

Headless Chromium from Debian (`chromium`, `chromium-driver`; .ci/run installs them) driven by
Selenium. Files are dropped as a person drops them (a DataTransfer in drag and drop events); the
microphone is Chromium's fake device. Proved here: a 5 s WAV and a 70 s MP3 dropped at once are
captioned, the MP3 in the 3 windows the client cuts; the downloads are test_client.py's shapes
(the SRT parses, and equals captioner/formats.py's rendering of the page's own record); the page
cuts windows with plan_windows's rule on the same samples, sends the client's request, renders
tricky captions byte for byte as the client does; a recording is captioned; a wrong key and a
stopped server each get their one line. Without a browser: the guard answers the page itself,
without the key, with its security headers, and no other origin gets in.
A screenshot of the captioned page is kept at logs/page-screenshot.png (docs/page.png in README).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import shutil
import threading
import time
import wave
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from captioner import api, audio
from captioner.audio import plan_windows, prepare
from captioner.formats import cue_text, escape_text, render, timestamp
from captioner.payload import chat_request
from captioner.records import Record, Segment
from captioner_server import caption_page
from captioner_server.caption_page import PAGE_CSP
from captioner_server.request_guard import CROSS_ORIGIN, RequestGuard, same_origin
from tests.asgi import Drive
from tests.service import ROOT, Service, free_port, server_fixture
from tests.test_client_support import SR, convert, parse_srt, parse_vtt, speech_wav, tone, write_wav

KEY = "page-key-42"
SCREENSHOT = ROOT / "logs" / "page-screenshot.png"
KEY_REFUSED = "The API key was refused (HTTP 401): enter the key the service was started with (API_KEY)."
WAIT = 240.0  # seconds for captions: the tiny model on 2 busy cores


def unreachable(base_url: str) -> str:
    port = base_url.rsplit(":", 1)[1]
    return (f"Cannot reach the captioning service at {base_url}: is it running? Check with "
            f"./status_service.sh on its host; from another machine, open the tunnel: "
            f"ssh -N -L {port}:127.0.0.1:{port} host")


# --- the guard serves the page (no server, no browser) ----------------------------------------


def guard_get(guard: RequestGuard, path: str, method: str = "GET",
              headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    done = Drive(guard, {"type": "http", "method": method, "path": path, "headers": headers or []})
    return done.status, done.headers, done.body


def test_guard_answers_the_page_itself_without_the_key_with_the_clients_constants(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MAX_AUDIO_DECODE_DURATION_S", "600")
    guard = RequestGuard(lambda *a: None, api_key="k-1")  # type: ignore[arg-type,return-value]
    status, headers, body = guard_get(guard, "/")
    assert status == 200 and headers[b"content-type"] == b"text/html; charset=utf-8"
    assert body == (ROOT / "web" / "index.html").read_bytes()
    assert headers[b"content-security-policy"] == PAGE_CSP
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert b"unsafe" not in PAGE_CSP and b"http" not in PAGE_CSP  # no inline code, no remote origin
    for name in ("app.js", "audio.js", "api.js", "formats.js", "style.css", "icon.svg"):
        status, headers, body = guard_get(guard, f"/page/{name}")
        assert status == 200 and body == (ROOT / "web" / name).read_bytes(), name
        assert headers[b"x-content-type-options"] == b"nosniff"
    assert guard_get(guard, "/page/app.js", "HEAD")[::2] == (200, b"")
    config = json.loads(guard_get(guard, "/page/config.json")[2])
    assert config == {
        "sample_rate": audio.SAMPLE_RATE, "frame_seconds": audio.FRAME_SECONDS,
        "quiet_floor": audio.QUIET_FLOOR, "quiet_ratio": audio.QUIET_RATIO,
        "cut_search_seconds": audio.CUT_SEARCH_SECONDS, "cut_search_divisor": audio.CUT_SEARCH_DIVISOR,
        "max_window_seconds": audio.MAX_WINDOW_SECONDS, "retry_statuses": [*api.RETRY_STATUSES, 429],
        "retry_pauses": [0, 1, 2, 4, 8, 16, 30], "key_required": True, "page_max_seconds": 3600}
    # The window maximum drops to the server's MAX_AUDIO_SECONDS as the client's does.
    monkeypatch.setenv("VLLM_MAX_AUDIO_DECODE_DURATION_S", "7")
    low = RequestGuard(lambda *a: None, api_key="")  # type: ignore[arg-type,return-value]
    assert json.loads(guard_get(low, "/page/config.json")[2])["max_window_seconds"] == 7.0
    # Only those files, GET and HEAD only; everything else is as before: the key, then the routes.
    assert guard_get(guard, "/", "POST")[0] == 405
    for path in ("/page/", "/page/../captioner_server/request_guard.py", "/page/index.html", "/index.html",
                 "/v1/models"):
        assert guard_get(guard, path)[0] == 401, path
    assert guard_get(low, "/page/nothing.js")[0] == 404
    assert guard_get(guard, "/", headers=[(b"origin", b"http://evil.example")])[0] == 403
    status, _, body = guard_get(guard, "/v1/models",
                                headers=[(b"origin", b"null"), (b"authorization", b"Bearer k-1")])
    assert status == 403 and json.loads(body)["error"]["message"] == CROSS_ORIGIN


def test_same_origin_means_no_origin_header_or_this_host() -> None:
    assert same_origin(None, b"127.0.0.1:8003")
    assert same_origin(b"http://127.0.0.1:8003", b"127.0.0.1:8003")
    assert same_origin(b"http://LOCALHOST:9000", b"localhost:9000")
    assert same_origin(b"http://localhost", b"localhost")
    for origin in (b"http://127.0.0.1:8004", b"http://evil.example", b"null", b"", b"127.0.0.1:8003",
                   b"file://", b"http://127.0.0.1:8003/", b"http://127.0.0.1:8003.evil.example"):
        assert not same_origin(origin, b"127.0.0.1:8003"), origin
    assert not same_origin(b"http://127.0.0.1:8003", None)


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the page tests need Debian's chromium and chromium-driver (see .ci/run)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=ChromeService(driver), options=options)
    chrome.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 5 s WAV, and a 70 s MP3 of a tone with two short pauses where the client cuts."""
    d = tmp_path_factory.mktemp("page-clips")
    long = tone(70, 330)
    long[round(27.0 * SR):round(27.5 * SR)] = 0
    long[round(55.0 * SR):round(55.5 * SR)] = 0
    return {"wav": write_wav(d / "five.wav", tone(5)),
            "mp3": convert(write_wav(d / "seventy.wav", long), d / "seventy.mp3")}


def wait_for(what: Callable[[], Any], timeout: float = 30, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {message or what}")
        time.sleep(0.2)


def click_in(browser: WebDriver, item_name: str, button: str) -> None:
    item = browser.find_element(By.XPATH, f"//article[.//h2[text()='{item_name}']]")
    item.find_element(By.CSS_SELECTOR, button).click()


def download_all(browser: WebDriver, downloads: Path, fmt: str, file_name: str) -> bytes:
    Select(browser.find_element(By.ID, "all-format")).select_by_value(fmt)
    target = downloads / file_name
    target.unlink(missing_ok=True)
    browser.find_element(By.ID, "download-all").click()
    wait_for(lambda: target.exists() and not list(downloads.glob("*.crdownload")), message=f"{file_name}")
    return target.read_bytes()


def open_page(browser: WebDriver, svc: Service) -> None:
    browser.get(svc.base_url + "/")
    wait_for(lambda: "model" in browser.find_element(By.ID, "server").text
             or browser.find_element(By.ID, "key-form").is_displayed(), message="the page connects")


def drop(browser: WebDriver, *paths: Path) -> None:
    """Drop files on the page as a person does: drag events carrying them in a DataTransfer."""
    browser.execute_script("""
        document.getElementById('drop-source')?.remove();
        const input = Object.assign(document.createElement('input'), {type: 'file', multiple: true,
                                                                       id: 'drop-source', hidden: true});
        document.body.append(input);""")
    browser.find_element(By.ID, "drop-source").send_keys("\n".join(str(p) for p in paths))
    browser.execute_script("""
        const files = new DataTransfer();
        for (const file of document.getElementById('drop-source').files) files.items.add(file);
        const zone = document.getElementById('drop');
        for (const type of ['dragenter', 'dragover', 'drop'])
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: files, bubbles: true, cancelable: true}));""")


ITEMS = """return [...document.querySelectorAll('.item')].map(item => ({
    name: item.querySelector('.name').textContent, state: item.dataset.state,
    error: item.querySelector('.error').hidden ? null : item.querySelector('.error').textContent,
    caption: item.querySelector('.whole .caption').textContent,
    windows: [...item.querySelectorAll('.window')].map(w => ({
        start: Number(w.dataset.start), end: Number(w.dataset.end), state: w.dataset.state,
        range: w.querySelector('.range').textContent, text: w.querySelector('.text').textContent}))}))"""


def finished_items(browser: WebDriver, count: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = browser.execute_script(ITEMS)
        ended = len(items) >= count and all(i["state"] in ("done", "failed") for i in items[-count:])
        return items[-count:] if ended else None

    return wait_for(done, WAIT, "the dropped files are captioned")  # type: ignore[no-any-return]


def message(browser: WebDriver) -> str:
    line = browser.find_element(By.ID, "message")
    return str(line.text) if line.is_displayed() else ""


def download(browser: WebDriver, downloads: Path, item_name: str, fmt: str, file_name: str) -> str:
    item = browser.find_element(By.XPATH, f"//article[.//h2[text()='{item_name}']]")
    Select(item.find_element(By.CSS_SELECTOR, ".format")).select_by_value(fmt)
    target = downloads / file_name
    target.unlink(missing_ok=True)
    item.find_element(By.CSS_SELECTOR, ".download").click()
    wait_for(lambda: target.exists() and not list(downloads.glob("*.crdownload")),
             message=f"{file_name} downloaded")
    return target.read_text(encoding="utf-8")


def in_page(browser: WebDriver, module: str, expression: str, *args: Any) -> Any:
    """Evaluate `expression` with `m` = the page's module /page/MODULE and `args` = the arguments."""
    result = browser.execute_async_script(f"""
        const done = arguments[arguments.length - 1], args = [...arguments].slice(0, -1);
        import('/page/{module}').then(m => done({{value: {expression}}}))
          .catch(e => done({{error: String(e)}}));
        """, *args)
    assert "error" not in result, result["error"]
    return result["value"]


def record_of(page_json: dict[str, Any]) -> Record:
    return Record(source=page_json["source"], duration=page_json["duration"],
                  segments=[Segment(**s) for s in page_json["segments"]], caption=page_json["caption"],
                  model=page_json["model"], usage=page_json["usage"], latency=page_json["latency"],
                  error=page_json["error"])


@pytest.mark.server
def test_page_cuts_requests_and_renders_exactly_as_the_client(
        server: Service, browser: WebDriver, tmp_path: Path) -> None:
    open_page(browser, server)
    # The window rule: plan_windows on the very same samples, at three window maxima.
    speech = speech_wav(tmp_path / "speech.wav", "The quick brown fox jumps over the lazy dog. " * 25)
    with wave.open(str(speech)) as w:
        said = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    gap = tone(75)
    gap[round(26.0 * SR):round(26.6 * SR)] = 0
    noise = (np.random.default_rng(0).standard_normal(SR * 100) * 0.1).astype(np.float32)
    noise[:: SR * 7] = 0
    for samples, seconds in ((tone(75), 30), (gap, 30), (noise, 30), (said, 30), (said, 7), (said, 2.5)):
        encoded = base64.b64encode(samples.astype("<f4").tobytes()).decode()
        config = json.loads(requests.get(f"{server.base_url}/page/config.json", timeout=10).text)
        page = in_page(browser, "audio.js", """m.planWindows(new Float32Array(
            Uint8Array.from(atob(args[0]), c => c.charCodeAt(0)).buffer), args[1], args[2])""",
                       encoded, seconds, config)
        assert page == [list(r) for r in plan_windows(samples, seconds)], (len(samples) / SR, seconds)
    # The request: the client's, streamed.
    url = "data:audio/wav;base64,UklGRg=="
    assert in_page(browser, "api.js", "m.chatRequest(args[0], args[1])", url, "tiny") == \
        json.loads(json.dumps(chat_request(url, "tiny", stream=True)))
    # The formats: captions that need every rule of captioner/formats.py, times that round on a half.
    record = Record(source="odd.wav", duration=3661.2345, model="tiny", latency=1.0005,
                    usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, segments=[
                        Segment(0.0005, 1.0025, "  first\r\n\r\n  second --> third \x07 "),
                        Segment(1.0025, 2.5, " \ufeff\x1c "), Segment(2.5, 59.9999, ""),
                        Segment(59.9999, 3661.2345, "last\u2028\u2028line\x85end ü")])
    record.caption = " ".join(s.caption.strip() for s in record.segments if s.caption.strip())
    page_record = {**record.to_json(), "duration": record.duration, "latency": record.latency,
                   "segments": [vars(s) for s in record.segments]}
    for fmt in ("text", "srt", "vtt"):
        assert in_page(browser, "formats.js", "m.render(args[0], args[1])", page_record, fmt) == \
            render([record], fmt, many=False), fmt
    page_json = in_page(browser, "formats.js", "m.render(args[0], 'json')", page_record)
    assert json.loads(page_json) == record.to_json()
    assert in_page(browser, "formats.js", "m.joinCaptions(args[0].segments)", page_record) == record.caption


@pytest.mark.server
def test_a_dropped_wav_and_mp3_are_captioned_window_by_window_and_download_as_the_clients(
        server: Service, browser: WebDriver, clips: dict[str, Path], downloads: Path) -> None:
    open_page(browser, server)
    assert message(browser) == "" and f"model {server.model}" in browser.find_element(By.ID, "server").text
    drop(browser, clips["wav"], clips["mp3"])
    short, long = finished_items(browser, 2)
    assert (short["name"], short["state"], long["name"], long["state"]) == \
        ("five.wav", "done", "seventy.mp3", "done"), (short, long)
    assert [(w["start"], w["end"], w["range"]) for w in short["windows"]] == [(0.0, 5.0, "0:00.0 – 0:05.0")]
    # The client's windows for the same file (FFmpeg there, the browser's decoder here).
    spans = prepare(clips["mp3"].read_bytes(), "seventy.mp3", 30).spans
    assert len(long["windows"]) == len(spans) == 3
    for window, (start, end) in zip(long["windows"], spans, strict=True):
        assert abs(window["start"] - start) < 0.05 and abs(window["end"] - end) < 0.05, (window, spans)
        assert window["state"] == "done"
    assert 27.0 <= long["windows"][1]["start"] <= 27.5 and 55.0 <= long["windows"][2]["start"] <= 55.5
    assert long["windows"][1]["range"].startswith("0:27.")
    # The downloads: test_client.py's shapes for this record.
    page = json.loads(download(browser, downloads, "seventy.mp3", "json", "seventy.json"))
    assert list(page) == list(Record(source="").to_json())
    assert (page["source"], page["model"], page["error"]) == ("seventy.mp3", server.model, None)
    assert [(s["start"], s["end"]) for s in page["segments"]] == \
        [(w["start"], w["end"]) for w in long["windows"]]
    assert [s["caption"] for s in page["segments"]] == [w["text"] for w in long["windows"]]
    assert page["caption"] == long["caption"] and page["usage"]["completion_tokens"] > 0
    record = record_of(page)
    srt = download(browser, downloads, "seventy.mp3", "srt", "seventy.srt")
    assert srt == render([record], "srt", many=False)
    cues = parse_srt(srt)
    spoken = [s for s in record.segments if cue_text(s.caption)]  # a random window may say nothing
    assert len(cues) == len(spoken) and cues
    assert (cues[0][0], cues[-1][1]) == (timestamp(spoken[0].start, ","), timestamp(spoken[-1].end, ","))
    vtt = download(browser, downloads, "seventy.mp3", "vtt", "seventy.vtt")
    assert vtt == render([record], "vtt", many=False) and len(parse_vtt(vtt)) == len(cues)
    text = download(browser, downloads, "seventy.mp3", "text", "seventy.txt")
    assert text == render([record], "text", many=False) == escape_text(long["caption"].strip()) + "\n"
    # Copy puts the same text on the clipboard.
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": server.base_url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    item = browser.find_element(By.XPATH, "//article[.//h2[text()='seventy.mp3']]")
    Select(item.find_element(By.CSS_SELECTOR, ".format")).select_by_value("srt")
    item.find_element(By.CSS_SELECTOR, ".copy").click()
    wait_for(lambda: item.find_element(By.CSS_SELECTOR, ".copied").text, message="copied")
    assert item.find_element(By.CSS_SELECTOR, ".copied").text == "srt copied"
    clipboard = browser.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done(String(e)))")
    assert clipboard == srt
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    save_screenshot(browser)


def save_screenshot(browser: WebDriver) -> None:
    """The whole page, not only the window: SCREENSHOT, which CI keeps with the logs."""
    width, height = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.server
def test_a_microphone_recording_is_captioned(server: Service, browser: WebDriver) -> None:
    """Chromium's fake microphone (a beep) through getUserMedia and MediaRecorder."""
    open_page(browser, server)
    browser.find_element(By.ID, "record").click()
    wait_for(lambda: browser.find_element(By.ID, "record").text == "Stop", message="recording starts")
    time.sleep(2.5)
    browser.find_element(By.ID, "record").click()
    (item,) = finished_items(browser, 1)
    assert item["name"].startswith("recording-") and item["name"].endswith(".webm"), item
    assert item["state"] == "done", item
    (window,) = item["windows"]
    assert window["start"] == 0.0 and 1.5 < window["end"] < 4.0 and window["state"] == "done", window
    assert message(browser) == ""


class StubApi:
    """vLLM's side of the API, scripted, behind the real guard: /v1/models names one model; each
    chat request takes the next of `replies` (status, headers, error message), or, when they have
    run out, gets a streamed caption."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], str]] = []
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0  # seconds before each chat answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/models":
            await self.answer(send, 200, {}, {"object": "list", "data": [{"id": "stub-model"}]})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.requests.append(json.loads(body))
        await asyncio.sleep(self.delay)
        if self.replies:
            status, headers, text = self.replies.pop(0)
            await self.answer(send, status, headers, {"error": {"message": text, "code": status}})
            return
        events = [{"model": "stub-model", "choices": [{"index": 0, "delta": {"content": piece}}]}
                  for piece in ("A stub ", "caption.")]
        events.append({"model": "stub-model", "choices": [],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": stream.encode()})

    @staticmethod
    async def answer(send: Any, status: int, headers: dict[str, str], payload: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in headers.items())]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` on a free loopback port (uvicorn, with the guard's HTTP parser), in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "uvicorn starts")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def stereo_wav(path: Path, seconds: float, rate: int = 44_100) -> Path:
    t = np.arange(round(seconds * rate)) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 660 * t)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes())
    return path


def test_the_page_resamples_retries_and_says_what_went_wrong_in_plain_words(
        browser: WebDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the guard in front of a scripted API (no vLLM): what the page sends, and the
    errors a real server gives only with effort (503 and 429 with Retry-After, 413)."""
    monkeypatch.setattr(caption_page, "PAGE_MAX_SECONDS", 8)
    stub = StubApi()
    guard = RequestGuard(stub, api_key="", max_bytes=150_000)  # type: ignore[arg-type]
    stereo = stereo_wav(tmp_path / "stereo.wav", 2)
    with serving(guard) as base_url:
        browser.get(base_url + "/")
        wait_for(lambda: "model stub-model" in browser.find_element(By.ID, "server").text, message="connects")
        # 44.1 kHz stereo goes out as the client's request with 16 kHz mono 16-bit WAV; two 503s are
        # retried after their Retry-After.
        stub.replies = [(503, {"Retry-After": "1"}, "draining")] * 2
        drop(browser, stereo)
        (item,) = finished_items(browser, 1)
        assert (item["state"], item["caption"]) == ("done", "A stub caption."), item
        assert len(stub.requests) == 3
        url = stub.requests[-1]["messages"][0]["content"][0]["audio_url"]["url"]
        assert stub.requests[-1] == chat_request(url, "stub-model", stream=True)
        assert url.startswith("data:audio/wav;base64,")
        with wave.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
            assert w.getnframes() == 2 * SR
        # 429 through every retry, then a body over MAX_REQUEST_BYTES, audio over the page's maximum,
        # and a file that is not audio: each one line under its file.
        stub.replies = [(429, {"Retry-After": "0.1"}, "slow down")] * 8
        drop(browser, stereo)
        busy = "The server is busy (HTTP 429) and stayed busy through every retry: try again in a minute."
        assert finished_items(browser, 1)[0]["error"] == f"{busy} slow down"
        assert len(stub.requests) == 3 + 8 and stub.replies == []
        drop(browser, write_wav(tmp_path / "five.wav", tone(5)))
        error = finished_items(browser, 1)[0]["error"]
        assert error.startswith("Too large for the server (HTTP 413): request body of "), error
        drop(browser, write_wav(tmp_path / "ten.wav", tone(10)))
        assert finished_items(browser, 1)[0]["error"] == \
            "Too long for the page: 0:10.0 (it takes up to 0:08.0); caption it with test_client.py."
        (tmp_path / "notes.txt").write_text("not audio at all\n" * 100)
        drop(browser, tmp_path / "notes.txt")
        assert finished_items(browser, 1)[0]["error"] == ("Not audio, or a format this browser cannot decode "
            "(EncodingError): pick an audio file (WAV, MP3, FLAC, Ogg, Opus, M4A, WebM).")
        assert len(stub.requests) == 11 and message(browser) == ""




# A server of this module's own, with an API key: the last test stops it.
page_service = server_fixture("page_service", scope="module", API_KEY=KEY)


@pytest.mark.server
@pytest.mark.slow
def test_the_page_is_public_the_api_is_not_and_no_other_origin_gets_in(page_service: Service) -> None:
    base, auth = page_service.base_url, {"Authorization": f"Bearer {KEY}"}
    r = requests.get(base + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == PAGE_CSP.decode()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert json.loads(requests.get(base + "/page/config.json", timeout=10).text)["key_required"] is True
    for path in ("/v1/models", "/metrics", "/page/nothing.js"):
        assert requests.get(base + path, timeout=10).status_code == 401, path
    assert requests.get(base + "/v1/models", headers=auth, timeout=10).status_code == 200
    # Another origin gets a 403 and no CORS header, on the page, the API and a preflight alike.
    foreign = {"Origin": "http://evil.example"}
    preflight = {"Access-Control-Request-Method": "POST"}
    for method, path, headers in (("GET", "/", {}), ("GET", "/v1/models", auth), ("GET", "/health", {}),
                                  ("POST", "/v1/chat/completions", auth),
                                  ("OPTIONS", "/v1/chat/completions", preflight)):
        r = requests.request(method, base + path, headers={**foreign, **headers}, timeout=10)
        assert r.status_code == 403, (method, path, r.status_code)
        assert not any(h.lower().startswith("access-control-") for h in r.headers), (method, path, r.headers)
    r = requests.get(base + "/v1/models", headers={"Origin": base, **auth}, timeout=10)  # the page's own
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # The Host allow-list still applies to the page (DNS rebinding).
    for path in ("/", "/page/app.js"):
        assert requests.get(base + path, headers={"Host": "rebound.example"}, timeout=10).status_code == 421
    assert page_service.caption((ROOT / "samples" / "sample.wav").read_bytes()).status_code == 200


@pytest.mark.server
@pytest.mark.slow
def test_a_wrong_key_and_a_stopped_server_each_get_one_line(
        page_service: Service, browser: WebDriver, clips: dict[str, Path]) -> None:
    open_page(browser, page_service)
    assert browser.find_element(By.ID, "key-form").is_displayed() and message(browser) == ""  # just asks
    for key in ("wrong-key", KEY):
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        if key != KEY:
            wait_for(lambda: message(browser) == KEY_REFUSED, message="the 401 line")
            assert browser.find_element(By.ID, "key-form").is_displayed()
    wait_for(lambda: "key set" in browser.find_element(By.ID, "server").text, message="the key is taken")
    assert message(browser) == "" and not browser.find_element(By.ID, "key-form").is_displayed()
    stored = browser.execute_script(
        "return [sessionStorage.getItem('captioner.apiKey'), localStorage.length]")
    assert stored == [KEY, 0]
    drop(browser, clips["wav"])
    (item,) = finished_items(browser, 1)
    assert item["state"] == "done" and item["error"] is None, item  # every request carried the key
    page_service.stop()
    drop(browser, clips["wav"])
    (item,) = finished_items(browser, 1)
    assert item["state"] == "failed" and item["error"] == unreachable(page_service.base_url), item
    assert message(browser) == unreachable(page_service.base_url)


def test_a_failed_file_retries_a_busy_one_cancels_all_download_at_once_and_a_phone_reads_it(
        browser: WebDriver, downloads: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20's page round, against the guard in front of a scripted API (no vLLM)."""
    monkeypatch.setattr(caption_page, "PAGE_MAX_SECONDS", 8)
    stub = StubApi()
    guard = RequestGuard(stub, api_key="", max_bytes=2_000_000)  # type: ignore[arg-type]
    first, second = write_wav(tmp_path / "first.wav", tone(2)), write_wav(tmp_path / "second.wav", tone(3))
    with serving(guard) as base_url:
        browser.get(base_url + "/")
        wait_for(lambda: "model stub-model" in browser.find_element(By.ID, "server").text, message="connects")
        # A file the server refused is captioned again with Retry, without picking it again.
        stub.replies = [(400, {}, "no such luck")]
        drop(browser, first)
        (item,) = finished_items(browser, 1)
        assert item["state"] == "failed" and "no such luck" in item["error"], item
        click_in(browser, "first.wav", ".retry")
        wait_for(lambda: finished_items(browser, 1)[0]["state"] == "done", message="retried")
        assert len(stub.requests) == 2
        # A file waiting on a slow server is cancelled at once, and can be retried.
        stub.delay = 20
        drop(browser, second)
        wait_for(lambda: len(stub.requests) == 3, message="the second file's request is sent")
        t0 = time.monotonic()
        click_in(browser, "second.wav", ".cancel")
        (item,) = finished_items(browser, 1)
        assert time.monotonic() - t0 < 5
        cancelled = "Cancelled: press Retry to caption it again."
        assert (item["state"], item["error"]) == ("failed", cancelled), item
        stub.delay = 0
        click_in(browser, "second.wav", ".retry")
        wait_for(lambda: finished_items(browser, 1)[0]["state"] == "done", message="retried after cancel")
        # Too long is known from the container before decoding: nothing is decoded.
        browser.execute_script("""
            window.decodes = 0;
            const decode = BaseAudioContext.prototype.decodeAudioData;
            BaseAudioContext.prototype.decodeAudioData = function (...a) {
              window.decodes++;
              return decode.apply(this, a);
            };""")
        drop(browser, write_wav(tmp_path / "ten.wav", tone(10)))
        assert finished_items(browser, 1)[0]["error"] == \
            "Too long for the page: 0:10.0 (it takes up to 0:08.0); caption it with test_client.py."
        assert browser.execute_script("return window.decodes") == 0
        # Download all: text and JSON as the client writes a batch, SRT and VTT one file each in a zip.
        singles = [json.loads(download(browser, downloads, f"{name}.wav", "json", f"{name}.json"))
                   for name in ("first", "second")]
        records = [record_of(single) for single in singles]
        text = download_all(browser, downloads, "text", "captions.txt").decode()
        assert text == render(records, "text", True)
        assert json.loads(download_all(browser, downloads, "json", "captions.json")) == singles
        for fmt in ("srt", "vtt"):
            zipped = download_all(browser, downloads, fmt, f"captions-{fmt}.zip")
            archive = zipfile.ZipFile(io.BytesIO(zipped))
            assert archive.testzip() is None
            expected = {f"{r.source.removesuffix('.wav')}.{fmt}": render([r], fmt, False) for r in records}
            assert {n: archive.read(n).decode() for n in archive.namelist()} == expected
        # On a 390 px phone the time range sits above its caption, which keeps the width.
        browser.set_window_size(390, 844)
        try:
            columns, width = browser.execute_script("""
                const w = document.querySelector('.window');
                return [getComputedStyle(w).gridTemplateColumns, w.querySelector('.text').offsetWidth];""")
            assert len(columns.split()) == 1 and width > 300, (columns, width)
        finally:
            browser.set_window_size(1100, 1000)
