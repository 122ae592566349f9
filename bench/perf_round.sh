#!/usr/bin/env bash
# perf_round.sh — one measurement run: each named setting started by the kit's scripts and swept,
# one after another on this machine, so their figures compare side by side.
#
# Usage: bench/perf_round.sh OUT_DIR SETTING...
#   e.g. bench/perf_round.sh bench/results/2026-12-07-h100 pred fp8 fp8-untuned bf16 bf16-untuned
#
# Settings (on top of config.env and the environment, as for start_service.sh):
#   pred          the predecessor's: MAX_NUM_SEQS=8, bf16, vLLM's own MoE table (MOE_CONFIG_DIR=),
#                 one API server
#   bf16, fp8     the shipped settings, bf16 or QUANTIZATION=fp8, with the kit's tuned MoE configs
#                 (and the shipped API_SERVER_COUNT=4)
#   bf16-untuned, fp8-untuned   the same with vLLM's own MoE table only (MOE_CONFIG_DIR=)
#   levers, each fp8 with one vLLM flag (EXTRA_VLLM_ARGS) against fp8:
#   fp8-sync      --no-async-scheduling          fp8-kvfp8     --kv-cache-dtype fp8
#   fp8-noprefix  --no-enable-prefix-caching     fp8-graphs128 --max-cudagraph-capture-size 128
#   fp8-api1, fp8-api2   API_SERVER_COUNT=1 or 2 (the processes that share the requests' parsing,
#                 audio decoding and streaming; 1 was the default until the 2026-12-07 levers run)
# Each is swept closed-loop at LEVELS (pred: PRED_LEVELS) with REQUESTS_PER_SLOT requests per
# slot, then open-loop at RATES (pred: PRED_RATES) if set, by bench/serve_and_sweep.sh and
# bench/loadgen.py. OUT_DIR gets NAME.json (closed), NAME.rates.json (open), NAME.service.log.gz
# (that start's service log: start_service.sh begins a fresh one at each start) and NAME.gpu.txt
# (GPU memory used after the sweep).
# The service is stopped at the end.
# Defaults: LEVELS=64,128 PRED_LEVELS=8,16 REQUESTS_PER_SLOT=2 RATES= PRED_RATES=
# Exit codes: 0 all swept, 1 a setting failed (the others still ran), 2 usage.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

settings_of() { # settings_of NAME -> VAR=VALUE lines
  case $1 in
    pred) printf '%s\n' MAX_NUM_SEQS=8 QUANTIZATION= MOE_CONFIG_DIR= API_SERVER_COUNT=1 ;;
    bf16) echo "QUANTIZATION=" ;;
    bf16-untuned) printf '%s\n' QUANTIZATION= MOE_CONFIG_DIR= ;;
    fp8) echo "QUANTIZATION=fp8" ;;
    fp8-untuned) printf '%s\n' QUANTIZATION=fp8 MOE_CONFIG_DIR= ;;
    fp8-sync) printf '%s\n' QUANTIZATION=fp8 "EXTRA_VLLM_ARGS=--no-async-scheduling" ;;
    fp8-kvfp8) printf '%s\n' QUANTIZATION=fp8 "EXTRA_VLLM_ARGS=--kv-cache-dtype fp8" ;;
    fp8-noprefix) printf '%s\n' QUANTIZATION=fp8 "EXTRA_VLLM_ARGS=--no-enable-prefix-caching" ;;
    fp8-graphs128) printf '%s\n' QUANTIZATION=fp8 "EXTRA_VLLM_ARGS=--max-cudagraph-capture-size 128" ;;
    fp8-api1) printf '%s\n' QUANTIZATION=fp8 API_SERVER_COUNT=1 ;;
    fp8-api2) printf '%s\n' QUANTIZATION=fp8 API_SERVER_COUNT=2 ;;
    *) return 1 ;;
  esac
}

run_one() { # run_one OUT_DIR NAME
  local out=$1 name=$2 log levels rates py
  local -a env
  mapfile -t env < <(settings_of "$name")
  levels=${LEVELS:-64,128} rates=${RATES:-}
  [[ $name != pred ]] || levels=${PRED_LEVELS:-8,16} rates=${PRED_RATES:-}
  log=${LOG_DIR:-logs}
  [[ $log == /* ]] || log=$ROOT/$log
  log=$log/service.log
  echo "perf_round: $name (${env[*]}) at $levels${rates:+, rates $rates}" >&2
  env "${env[@]}" BENCH_LABEL="$name" "$ROOT/bench/serve_and_sweep.sh" "$out/$name.json" "$levels" \
    --requests-per-slot "${REQUESTS_PER_SLOT:-2}" --meta "setting=$name" || return 1
  if [[ -n $rates ]]; then
    py=${BENCH_PYTHON:-}
    [[ -n $py ]] || { [[ -x $ROOT/.venv/bin/python ]] && py=$ROOT/.venv/bin/python; } || py=python3
    "$py" "$ROOT/bench/loadgen.py" --base-url "http://127.0.0.1:${PORT:-8003}" --rate "$rates" \
      --max-seconds "${RATE_SECONDS:-30}" --requests-per-slot 1000 --label "$name" --meta "setting=$name" \
      --output "$out/$name.rates.json" || return 1
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$out/$name.gpu.txt" 2>&1 || true
  gzip <"$log" >"$out/$name.service.log.gz"
}

main() {
  case ${1:-} in -h | --help) usage; exit 0 ;; esac
  (($# >= 2)) || { usage >&2; exit 2; }
  local out=$1 name rc=0
  shift
  for name in "$@"; do
    settings_of "$name" >/dev/null || { echo "perf_round: unknown setting '$name' (see --help for the names)" >&2; exit 2; }
  done
  mkdir -p "$out"
  for name in "$@"; do
    run_one "$out" "$name" || { echo "perf_round: $name failed" >&2; rc=1; }
  done
  "$ROOT/stop_service.sh" >&2 || true
  exit "$rc"
}

main "$@"
