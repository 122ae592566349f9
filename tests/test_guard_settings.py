"""captioner_server/settings.py: the guard's settings from the environment start_service.sh exports,
each one an argument gives taking its place; and errors.answer_raised, the guard's answer to what
vLLM raises. No server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from captioner_server.errors import DECODE_HINT, MEDIA_FETCH_FAILED, SHUTTING_DOWN, answer_raised
from captioner_server.request_policy import Limits
from captioner_server.settings import DEFAULT_FETCH_BYTES, guard_settings, request_timeout


def test_the_environment_gives_every_setting_and_an_argument_wins(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"thinker_config": {"text_config": {"vocab_size": 77}}}))
    env = {"CAPTIONER_MAX_REQUEST_BYTES": "1000", "VLLM_API_KEY": "k", "CAPTIONER_EXTRA_ROUTES": "/a, /B",
           "CAPTIONER_ALLOWED_HOSTS": "Box.Example", "CAPTIONER_ALLOWED_MEDIA_DOMAINS": "cdn.example",
           "CAPTIONER_MODEL_PATH": str(tmp_path), "CAPTIONER_SERVED_MODEL_NAME": "cap",
           "CAPTIONER_MAX_TOKENS": "64", "CAPTIONER_MAX_MODEL_LEN": "4096",
           "VLLM_MAX_AUDIO_DECODE_DURATION_S": "600", "VLLM_MAX_AUDIO_DECODE_BYTES": "500"}
    got = guard_settings(env)
    assert got.max_bytes == 1000 and got.api_key == "k"
    assert got.extra_routes == ["/a", "/b"] and got.allowed_hosts == ["box.example"]
    assert got.media_domains == ["cdn.example"]
    assert got.limits == Limits(vocab_size=77, served_model="cap", max_tokens=64, max_model_len=4096,
                                max_audio_seconds=600)
    assert got.max_fetch_bytes == 500  # the lower of the body cap and vLLM's decode cap
    given = guard_settings(env, max_bytes=0, api_key="", extra_routes="all", limits=Limits())
    assert given.max_bytes is None and given.api_key == "" and given.extra_routes == ["all"]
    assert given.limits == Limits() and given.max_fetch_bytes == 500
    assert guard_settings({}).max_fetch_bytes == DEFAULT_FETCH_BYTES
    assert request_timeout({}) == 30.0 and request_timeout({"CAPTIONER_REQUEST_TIMEOUT": "3"}) == 3.0


def test_what_vllm_raises_is_answered_as_the_same_error_sent_would_be() -> None:
    def answered(exc: Exception, fetched: bool = False) -> tuple[bool, list[dict[str, Any]]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        return asyncio.run(answer_raised(send, exc, fetched)), sent

    done, sent = answered(RuntimeError("cannot schedule new futures after shutdown"))
    assert done and sent[0]["status"] == 503 and (b"retry-after", b"5") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["message"] == SHUTTING_DOWN
    done, sent = answered(ValueError("connection refused at 10.0.0.1"), fetched=True)
    assert done and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["message"] == MEDIA_FETCH_FAILED
    done, sent = answered(ValueError("Failed to apply X on data={[1, 2]}"))
    assert done and sent[0]["status"] == 400
    message = json.loads(sent[1]["body"])["error"]["message"]
    assert message == f"could not decode the audio: Failed to apply X. {DECODE_HINT}"
    assert answered(KeyError("something else")) == (False, [])
