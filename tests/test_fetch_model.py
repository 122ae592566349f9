"""make model (tools/fetch_model.py): the completeness check, and a clear offline failure that
leaves nothing looking complete. No machine here reaches the hub, so the download itself is
exercised against a closed local port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.service import ROOT, TINY_MODEL

FETCH = [sys.executable, str(ROOT / "tools" / "fetch_model.py")]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FETCH, *args], capture_output=True, text=True, timeout=120, env=env)


def copy_model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY_MODEL, d)
    return d


def test_the_tiny_model_is_complete() -> None:
    r = run("--check", str(TINY_MODEL))
    assert r.returncode == 0
    assert r.stderr == f"fetch_model: {TINY_MODEL} is complete (1 weight file(s))\n"


def test_a_truncated_shard_is_caught(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run("--check", str(d))
    assert r.returncode == 1
    assert "model.safetensors is truncated" in r.stderr


def test_a_missing_config_is_caught(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "config.json").unlink()
    r = run("--check", str(d))
    assert (r.returncode, r.stderr) == (1, f"fetch_model: {d} has no config.json\n")


def test_a_shard_named_by_the_index_but_missing_is_caught(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run("--check", str(d))
    assert r.returncode == 1
    assert "lacks model-00001-of-00002.safetensors" in r.stderr


def test_offline_download_fails_in_one_line_and_leaves_no_model_folder(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    dest = tmp_path / "Captioner"
    r = run("--dest", str(dest), env=env)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "fetch_model: cannot download Qwen/Qwen3-Omni-30B-A3B-Captioner: the hub is unreachable")
    assert "rerun to resume" in last
    assert not dest.exists()


REPO = "fetch_model: Qwen/Qwen3-Omni-30B-A3B-Captioner"


@pytest.mark.parametrize(("code", "said"), [
    ("RepoNotFound", f"{REPO} not found on the hub, or it needs HF_TOKEN"),
    ("GatedRepo", f"{REPO} is gated: accept its terms on the hub, then set HF_TOKEN and rerun"),
    ("RevisionNotFound", f"{REPO} has no revision 'v9': check --revision"),
])
def test_what_the_hub_answers_is_said_not_taken_for_an_unreachable_hub(
        tmp_path: Path, code: str, said: str) -> None:
    # Every HfHubHTTPError is an OSError: these once all read "the hub is unreachable ... check the network".
    class Hub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404 if code != "GatedRepo" else 401)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
               "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_ETAG_TIMEOUT": "5"}
        r = run("--dest", str(tmp_path / "Captioner"), "--revision", "v9", env=env)
    finally:
        hub.shutdown()
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == said
    assert not (tmp_path / "Captioner").exists()
