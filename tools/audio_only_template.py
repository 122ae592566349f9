#!/usr/bin/env python3
"""Write the model's own chat template with an audio-only guard in front of it.

Usage: audio_only_template.py MODEL_DIR OUT_FILE

Why: on vLLM < 0.27 the Qwen3-Omni thinker crashes at start when --limit-mm-per-prompt sets
image or video to 0, so there the limit cannot refuse them. start_service.sh then serves this
template instead (--chat-template): for a message with audio parts it renders exactly what the
model's template renders (the guard outputs nothing), and a request with an image or video part
fails with a 400 whose message says the service takes audio only.

The model's template is read from chat_template.jinja, chat_template.json or tokenizer_config.json,
the places transformers looks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GUARD = (
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'image_pil', 'image_embeds', 'video', 'video_url'] -%}"
    "{{- raise_exception('This service captions audio only: send one audio part, no image or video') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


def model_template(model_dir: Path) -> str:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = model_dir / name
        if f.is_file():
            template = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    raise SystemExit(f"audio_only_template: {model_dir} has no chat template "
                     "(chat_template.jinja, chat_template.json or tokenizer_config.json)")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    model_dir, out = Path(argv[0]), Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(GUARD + model_template(model_dir), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
