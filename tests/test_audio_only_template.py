"""The audio-only guard served on vLLM < 0.27 (tools/audio_only_template.py): the model's own
rendering for audio, a clear refusal for images and videos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from captioner.payload import chat_request
from tests.service import ROOT, TINY_MODEL

AUDIO = chat_request("data:x", "model")["messages"]  # what the kit sends


@pytest.fixture
def tok() -> Any:
    """The tiny model's tokenizer. transformers is imported here, not at collection: the unit tier
    (-m "not server") neither needs the model nor pays the import's ~12 s."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def guarded(tmp_path: Path) -> str:
    out = tmp_path / "t.jinja"
    tool = ROOT / "tools" / "audio_only_template.py"
    subprocess.run([sys.executable, str(tool), str(TINY_MODEL), str(out)], check=True)
    return out.read_text()


@pytest.mark.server
def test_audio_renders_exactly_as_the_models_own_template(tmp_path: Path, tok: Any) -> None:
    own = tok.apply_chat_template(AUDIO, tokenize=False, add_generation_prompt=True)
    mine = tok.apply_chat_template(AUDIO, chat_template=guarded(tmp_path), tokenize=False,
                                   add_generation_prompt=True)
    assert mine == own
    assert "<|audio_start|><|audio_pad|><|audio_end|>" in mine


@pytest.mark.server
@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
])
def test_an_image_or_video_part_is_refused_with_the_reason(
        tmp_path: Path, tok: Any, part: dict[str, object]) -> None:
    messages = [{"role": "user", "content": [AUDIO[0]["content"][0], part]}]  # type: ignore[index]
    with pytest.raises(Exception, match="This service captions audio only"):
        tok.apply_chat_template(messages, chat_template=guarded(tmp_path), tokenize=False)


def test_a_model_without_a_template_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "audio_only_template.py"), str(tmp_path),
                        str(tmp_path / "t.jinja")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "has no chat template" in r.stderr
