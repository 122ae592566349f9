"""Several --base-url: least-busy routing and failover (stub servers; the real-server
case is in test_client_server.py, the router in test_router.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.errors import ExitCode, ServerConnectionError
from captioner.servers import ServerPool
from tests.service import free_port
from tests.test_client_support import HungServer, StubServer, folder_of

pytestmark = pytest.mark.usefixtures("client_env_cleared")


def sources(path: Path) -> list[str]:
    return [json.loads(x)["source"] for x in path.read_text().splitlines()]


def test_a_dead_server_among_two_is_left_out_with_a_warning_and_the_batch_finishes_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 6)
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    with StubServer() as live:
        code = main([str(folder), "--base-url", dead, "--base-url", live.base_url, "-o", str(out)])
    assert code == ExitCode.OK and time.monotonic() - started < 20  # no minute-long wait
    assert len(live.requests) == 6 and sorted(sources(out)) == sorted(str(p) for p in folder.iterdir())
    warnings = [x for x in capsys.readouterr().err.splitlines() if "left the rotation" in x]
    assert warnings == [f"captioner: warning: {dead} left the rotation (connection refused); "
                        "probing it again in 5 s; 1 of 2 servers in use"]


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_server_answering_a_server_error_again_and_again_leaves_the_rotation_and_the_other_does_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    folder = folder_of(tmp_path, 8)
    busy = (status, {"error": {"message": "draining"}})  # answered at once: the least busy, always
    out = tmp_path / "out.jsonl"
    with StubServer(replies=[busy] * 100) as draining, StubServer() as live:
        code = main([str(folder), "--base-url", draining.base_url, "--base-url", live.base_url,
                     "-o", str(out), "-c", "2"])  # fmt: skip
    assert code == ExitCode.OK
    assert len(live.requests) == 8 and len(draining.requests) <= 4  # one request, retried once, ...
    assert sorted(sources(out)) == sorted(str(p) for p in folder.iterdir())
    assert f"{draining.base_url} left the rotation (HTTP {status}: draining)" in capsys.readouterr().err


def test_a_500_that_is_vllms_word_for_unusable_audio_keeps_the_server_in_and_fails_that_input_alone(
    tmp_path: Path,
) -> None:
    folder = folder_of(tmp_path, 4)
    unusable = (500, {"error": {"message": "Invalid data found when processing input"}})
    out = tmp_path / "out.jsonl"
    with StubServer(replies=[unusable]) as first, StubServer(delay=0.3) as second:
        code = main([str(folder), "--base-url", first.base_url, "--base-url", second.base_url,
                     "-o", str(out), "-c", "1"])  # fmt: skip
    assert code == ExitCode.FAILURES
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(r["error"] is not None for r in records) == 1
    assert len(first.requests) + len(second.requests) == 4  # the failed input was not sent again


def test_a_server_that_stops_mid_batch_gets_no_more_requests_and_every_input_is_captioned_once(
    tmp_path: Path,
) -> None:
    folder = folder_of(tmp_path, 12)
    out = tmp_path / "out.jsonl"
    with StubServer(delay=0.1) as stopping, StubServer(delay=0.1) as live:
        def stop_after_three(body: object) -> None:
            if len(stopping.requests) == 3:
                threading.Thread(target=stopping.__exit__, args=(None, None, None)).start()

        stopping.on_request = stop_after_three
        code = main([str(folder), "--base-url", stopping.base_url, "--base-url", live.base_url,
                     "-o", str(out), "-c", "2"])  # fmt: skip
    assert code == ExitCode.OK
    assert sorted(sources(out)) == sorted(str(p) for p in folder.iterdir())  # each once
    assert len(live.requests) >= 9


def test_requests_go_to_the_least_busy_server() -> None:
    class Slow:
        def __init__(self, name: str, seconds: float) -> None:
            self.base_url, self.seconds, self.calls = name, seconds, 0

        def work(self) -> str:
            self.calls += 1
            time.sleep(self.seconds)
            return self.base_url

    slow, fast = Slow("slow", 0.5), Slow("fast", 0.05)
    pool = ServerPool([slow, fast])
    threads = [threading.Thread(target=lambda: pool.call(lambda c: c.work())) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.1)  # arrivals spread over 0.4 s: the slow one is still busy with its first
    for t in threads:
        t.join()
    assert (slow.calls, fast.calls) == (1, 3)


def test_when_every_server_is_down_a_request_fails_after_the_retries_wait() -> None:
    class Down:
        def __init__(self, name: str) -> None:
            self.base_url, self.calls = name, 0

        def work(self) -> str:
            self.calls += 1
            raise ServerConnectionError(f"cannot connect to {self.base_url}: connection refused. Is ...")

    a, b = Down("a"), Down("b")
    pool = ServerPool([a, b], wait=0.3)
    started = time.monotonic()
    with pytest.raises(ServerConnectionError):
        pool.call(lambda c: c.work())
    assert 0.3 <= time.monotonic() - started < 3 and (a.calls, b.calls) == (1, 1)


def test_a_server_out_of_the_rotation_is_probed_later_and_comes_back_when_it_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import captioner.servers

    monkeypatch.setattr(captioner.servers, "PROBE_AFTER", 0.3)

    class Flaky:
        def __init__(self, name: str, failures: int) -> None:
            self.base_url, self.failures, self.calls = name, failures, 0

        def work(self) -> str:
            self.calls += 1
            if self.failures:
                self.failures -= 1
                raise ServerConnectionError(f"cannot connect to {self.base_url}: connection refused. Is ...")
            return self.base_url

    flaky, steady = Flaky("flaky", 1), Flaky("steady", 0)
    pool = ServerPool([flaky, steady])
    caplog.set_level("WARNING", logger="captioner")
    assert pool.call(lambda c: c.work()) == "steady"  # flaky failed: the request moved on at once
    assert [pool.call(lambda c: c.work()) for _ in range(3)] == ["steady"] * 3  # flaky is out
    assert flaky.calls == 1
    time.sleep(0.35)
    assert pool.call(lambda c: c.work()) == "flaky"  # the probe, and it answers
    assert "flaky answers again: back in the rotation" in caplog.text
    assert "flaky left the rotation (connection refused); probing it again in 0.3 s" in caplog.text


# --- a server that accepts connections and never answers (issue #20, item 3) ---------------------


def checks_finish(deadline: float) -> None:
    """Wait for the start-up checks still running (on a hung server, until --timeout)."""
    while any(t.name == "captioner-check" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a start-up check outlived its --timeout"
        time.sleep(0.05)


def test_a_hung_server_holds_up_neither_the_start_nor_the_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    with HungServer() as hung, StubServer() as live:
        started = time.monotonic()
        code = main([str(folder), "--base-url", hung.base_url, "--base-url", live.base_url,
                     "-o", str(out), "--timeout", "6"])  # fmt: skip
        took = time.monotonic() - started
        checks_finish(started + 30)  # its check times out after the run, and says nothing then
    assert code == ExitCode.OK and took < 5  # the model check took the first answer: no wait
    assert len(live.requests) == 3 and hung.connections == 1  # the hung one got its check, no caption
    assert sorted(sources(out)) == sorted(str(p) for p in folder.iterdir())
    err = capsys.readouterr().err
    assert err.startswith("captioner: 3 files: 3 captioned, 0 failed;") and err.count("\n") == 1


def test_with_model_given_nothing_is_asked_and_a_hung_servers_request_goes_elsewhere_after_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    with HungServer() as hung, StubServer() as live:
        started = time.monotonic()
        code = main([str(folder), "--base-url", hung.base_url, "--base-url", live.base_url,
                     "--model", "stub-model", "-o", str(out), "--timeout", "1", "-c", "2"])  # fmt: skip
        took = time.monotonic() - started
    assert code == ExitCode.OK and took < 15
    assert len(live.requests) == 3 and sorted(sources(out)) == sorted(str(p) for p in folder.iterdir())
    assert hung.connections >= 1  # a caption request went there first (no model check before it)
    err = capsys.readouterr().err
    assert f"captioner: warning: {hung.base_url} left the rotation (no answer within 1 s)" in err
    assert "error" not in err


def test_a_server_refusing_the_key_at_the_start_is_left_out_and_the_batch_runs_on_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_of(tmp_path, 2)
    with StubServer(api_key="other") as refusing, StubServer(delay=0.3) as live:
        code = main([str(folder), "--base-url", live.base_url, "--base-url", refusing.base_url,
                     "-f", "jsonl"])  # fmt: skip
    assert code == ExitCode.OK and len(live.requests) == 2 and refusing.requests == []
    assert f"{refusing.base_url} is left out (HTTP 401: Unauthorized" in capsys.readouterr().err


def test_when_every_server_is_out_one_line_says_a_request_waits() -> None:
    class Down:
        def __init__(self, name: str) -> None:
            self.base_url = name

        def work(self) -> str:
            raise ServerConnectionError(f"cannot connect to {self.base_url}: connection refused. Is ...")

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("captioner")
    logger.addHandler(handler)
    try:
        pool = ServerPool([Down("a"), Down("b")], wait=0.3)
        with pytest.raises(ServerConnectionError):
            pool.call(lambda c: c.work())
    finally:
        logger.removeHandler(handler)
    waiting = [r for r in records if r.startswith("every server is out")]
    assert waiting == ["every server is out of the rotation; waiting (next probe of a in 5 s; "
                       "giving up in 0 s)"]  # fmt: skip


def test_a_server_whose_model_list_cannot_be_read_is_left_out_and_nothing_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from captioner.api import CaptionClient

    folder = folder_of(tmp_path, 2)
    real = CaptionClient.list_models
    with StubServer() as odd, StubServer(delay=0.2) as live:

        def list_models(self: CaptionClient) -> list[str]:
            if self.base_url == odd.base_url:
                raise TypeError("'int' object is not iterable")  # {"data": 5}
            return real(self)

        monkeypatch.setattr(CaptionClient, "list_models", list_models)
        code = main([str(folder), "--base-url", odd.base_url, "--base-url", live.base_url, "-f", "jsonl"])
    assert code == ExitCode.OK and len(live.requests) == 2 and odd.requests == []
    assert f"{odd.base_url} is left out ({odd.base_url}: unexpected TypeError" in capsys.readouterr().err
