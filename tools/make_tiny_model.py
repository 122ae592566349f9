#!/usr/bin/env python3
"""Build a tiny, randomly initialised model with the Captioner's exact architecture.

Usage: make_tiny_model.py [--full-size] [OUT_DIR]    (default: models/tiny-captioner)

  --full-size   the real 30B-A3B sizes (thinker: hidden 2048, 48 layers, 128 experts top-8;
                audio encoder: 1280 wide, 32 layers) with the same tokenizer and processor and
                no weights, for `LOAD_FORMAT=dummy` on a GPU: true speed and memory, gibberish
                text (docs/GPU.md, docs/PERFORMANCE.md). Default OUT_DIR: models/full-size-dummy.

What it writes, deterministically (same bytes on every run):
  - config.json: Qwen3OmniMoeForConditionalGeneration, thinker only (enable_audio_output: false),
    the real model's layer *types* at toy sizes; token ids that match the tokenizer below.
  - tokenizer: byte-level BPE over the 256 byte symbols plus the Qwen special tokens
    (<|im_start|>, <|audio_pad|>, ...), and the chat template (an audio part renders as
    <|audio_start|><|audio_pad|><|audio_end|>).
  - processor: WhisperFeatureExtractor (128 mel bins, 16 kHz) + the Qwen2-VL image/video
    processors that the Qwen3-Omni processor class insists on.
  - model.safetensors: random weights (seed 0), about a megabyte.

Why: no machine here reaches Hugging Face. vLLM serves this model through the same code path
as the real Captioner (audio decoding, feature extraction, audio encoder, MoE thinker, the
OpenAI server); only the captions are gibberish.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
]
EXTRA_SPECIAL = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}

# The Qwen3-Omni chat layout. The Captioner takes a single user turn holding one audio part.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ('audio', 'audio_url', 'input_audio') -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] in ('image', 'image_url') -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ('video', 'video_url') -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

HIDDEN = 64

# Qwen3-Omni-30B-A3B's layer sizes (its config.json): what --full-size writes over the toy ones.
FULL_SIZE = {
    "text_config": dict(
        vocab_size=152064, hidden_size=2048, intermediate_size=768 * 8, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8),
    "audio_config": dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
        output_dim=2048, downsample_hidden_size=480),
    "vision_config": dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
        deepstack_visual_indexes=[8, 16, 24]),
}
FULL_MROPE_SECTION = [24, 20, 20]  # head_dim 128: 64 rotary pairs


def build_tokenizer(out: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(byte_symbols)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = Qwen2TokenizerFast(
        tokenizer_object=core,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens=EXTRA_SPECIAL,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_config(tok):
    from transformers import Qwen3OmniMoeConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    for word in ("system", "user", "assistant"):
        ids[word] = tok.convert_tokens_to_ids(tok.tokenize(word))[0]
    vocab_size = len(tok)
    text = dict(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=65536, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [6, 5, 5], "interleaved": True, "mrope_interleaved": True},
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    audio = dict(
        num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        d_model=HIDDEN, output_dim=HIDDEN, max_source_positions=1500, n_window=50,
        n_window_infer=800, conv_chunksize=500, downsample_hidden_size=32,
    )
    vision = dict(
        depth=2, hidden_size=HIDDEN, intermediate_size=128, num_heads=4, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN,
        num_position_embeddings=2304, deepstack_visual_indexes=[0, 1],
        # vLLM reads these two from the vision config (AttributeError when missing).
        image_size=768, apply_vit_abs_pos_embed=True,
    )
    thinker = dict(
        text_config=text, audio_config=audio, vision_config=vision,
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], audio_start_token_id=ids["<|audio_start|>"],
        audio_end_token_id=ids["<|audio_end|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], user_token_id=ids["user"],
        position_id_per_seconds=13, seconds_per_chunk=2, tie_word_embeddings=False,
    )
    cfg = Qwen3OmniMoeConfig(
        thinker_config=thinker, enable_audio_output=False,
        im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"],
        tts_pad_token_id=ids["<tts_pad>"], tts_bos_token_id=ids["<tts_text_bos>"],
        tts_eos_token_id=ids["<tts_text_eod>"], system_token_id=ids["system"],
        user_token_id=ids["user"], assistant_token_id=ids["assistant"],
    )
    cfg.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    return cfg


def build_processor(tok):
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3OmniMoeProcessor,
        WhisperFeatureExtractor,
    )

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                 chunk_length=300, n_fft=400, padding_value=0.0,
                                 return_attention_mask=True)
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16),
        video_processor=Qwen2VLVideoProcessor(patch_size=16),
        feature_extractor=fe, tokenizer=tok, chat_template=CHAT_TEMPLATE,
    )


def full_size(config: dict) -> dict:
    """The tiny config.json with the real model's layer sizes (token ids stay the tokenizer's)."""
    thinker = config["thinker_config"]
    for part, sizes in FULL_SIZE.items():
        thinker[part].update(sizes)
    thinker["text_config"]["rope_parameters"]["mrope_section"] = FULL_MROPE_SECTION
    return config


def build(out: str, full: bool = False) -> None:
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(0)
    tok = build_tokenizer(out)
    cfg = build_config(tok)
    # The full size is never instantiated (30B parameters): only its config is written.
    model = None if full else Qwen3OmniMoeForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    proc = build_processor(tok)

    # Write into a temporary sibling and rename: an interrupted build never leaves a
    # directory that looks complete.
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            cfg.dtype = torch.bfloat16
            cfg.save_pretrained(tmp)
            path = os.path.join(tmp, "config.json")
            with open(path) as f:
                config = full_size(json.load(f))
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
        proc.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": cfg.thinker_config.text_config.eos_token_id,
                       "pad_token_id": cfg.thinker_config.text_config.pad_token_id}, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    full = "--full-size" in argv
    args = [a for a in argv if a != "--full-size"]
    if any(a.startswith("-") for a in args) or len(args) > 1:
        print("make_tiny_model: usage: make_tiny_model.py [--full-size] [OUT_DIR] (see --help)",
              file=sys.stderr)
        return 2
    out = args[0] if args else ("models/full-size-dummy" if full else "models/tiny-captioner")
    build(out, full)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"make_tiny_model: wrote {out} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
