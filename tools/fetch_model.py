#!/usr/bin/env python3
"""Download the Captioner's weights into MODEL_PATH, resumably, and check they are complete.

Usage: fetch_model.py [--repo REPO] [--revision REV] [--dest DIR] [--check DIR] [-h]

  (default)    download REPO (Qwen/Qwen3-Omni-30B-A3B-Captioner, ~63 GB in 16 shards) into
               MODEL_PATH from config.env (or --dest). The files land in DIR.partial/ first; a
               rerun resumes there. Only a download that passes the check below is renamed to
               DIR, so a folder named DIR is always complete.
  --check DIR  only check DIR: config.json, tokenizer, preprocessor config, and every safetensors
               shard the index names present and whole (each file's header and size agree).

Exit codes: 0 complete, 1 incomplete or failed download (one line says what), 2 usage.
HF_TOKEN, HF_ENDPOINT and the proxy variables are honoured by huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from captioner.config import REPO_ROOT, ConfigError, Settings

DEFAULT_REPO = "Qwen/Qwen3-Omni-30B-A3B-Captioner"
REQUIRED = ["config.json"]
ONE_OF = [("tokenizer.json", "vocab.json"), ("preprocessor_config.json", "processor_config.json")]


class Incomplete(Exception):
    pass


def check_safetensors(path: Path) -> None:
    """A shard is whole when its header parses and its data ends exactly at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise Incomplete(f"{path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise Incomplete(f"{path.name} is truncated (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise Incomplete(f"{path.name} has a corrupt header ({e})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise Incomplete(f"{path.name} is truncated ({size} of {8 + n + end} bytes)")


def check_model_dir(d: Path) -> list[str]:
    """Raise Incomplete naming the first problem; return the shard names checked."""
    if not d.is_dir():
        raise Incomplete(f"{d} does not exist")
    for name in REQUIRED:
        if not (d / name).is_file():
            raise Incomplete(f"{d} has no {name}")
    for options in ONE_OF:
        if not any((d / o).is_file() for o in options):
            raise Incomplete(f"{d} has none of {', '.join(options)}")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in d.glob("*.safetensors"))
    if not shards:
        raise Incomplete(f"{d} has no *.safetensors weights")
    for s in shards:
        if not (d / s).is_file():
            raise Incomplete(f"{d} lacks {s}, named in model.safetensors.index.json")
        check_safetensors(d / s)
    return shards


def download(repo: str, revision: str | None, dest: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    partial = dest.with_name(dest.name + ".partial")
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=partial,
                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"])
    # The hub's answers first: each HfHubHTTPError is an OSError too, and was once worded as
    # "the hub is unreachable".
    except GatedRepoError:
        raise Incomplete(f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN and rerun") \
            from None
    except RepositoryNotFoundError:
        raise Incomplete(f"{repo} not found on the hub, or it needs HF_TOKEN") from None
    except RevisionNotFoundError:
        raise Incomplete(f"{repo} has no revision {revision!r}: check --revision") from None
    except HfHubHTTPError as e:
        raise Incomplete(f"cannot download {repo}: {str(e).splitlines()[0]}") from None
    except (LocalEntryNotFoundError, OSError) as e:
        kept = f" (partial files kept in {partial})" if partial.exists() else ""
        raise Incomplete(f"cannot download {repo}: the hub is unreachable ({type(e).__name__}); "
                         f"check the network, HF_ENDPOINT or the proxy, then rerun to resume{kept}") from None
    check_model_dir(partial)
    if dest.exists():
        raise Incomplete(f"{dest} already exists; remove it, or check it with --check {dest}")
    os.replace(partial, dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fetch_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=DEFAULT_REPO)
    p.add_argument("--revision", default=None)
    p.add_argument("--dest", type=Path, default=None, help="default: MODEL_PATH from config.env")
    p.add_argument("--check", type=Path, metavar="DIR", help="only check DIR")
    a = p.parse_args(argv)
    try:
        if a.check:
            shards = check_model_dir(a.check)
            print(f"fetch_model: {a.check} is complete ({len(shards)} weight file(s))", file=sys.stderr)
            return 0
        dest = a.dest or Path(Settings().get("MODEL_PATH") or "")
        if not str(dest).strip(". "):
            raise Incomplete("MODEL_PATH is empty: set it in config.env, or pass --dest DIR")
        if not dest.is_absolute():
            dest = REPO_ROOT / dest
        if dest.exists():
            shards = check_model_dir(dest)
            print(f"fetch_model: {dest} is already complete ({len(shards)} weight file(s))", file=sys.stderr)
            return 0
        print(f"fetch_model: downloading {a.repo} into {dest} (resumable; ~63 GB)", file=sys.stderr)
        download(a.repo, a.revision, dest)
        print(f"fetch_model: {dest} is complete", file=sys.stderr)
        return 0
    except (Incomplete, ConfigError) as e:
        print(f"fetch_model: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_model: interrupted; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
