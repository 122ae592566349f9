#!/usr/bin/env bash
# serve_and_sweep.sh — restart the service with the current settings, then sweep it with loadgen.
#
# Usage: bench/serve_and_sweep.sh OUT.json CONCURRENCIES [loadgen options...]
#   e.g. MAX_NUM_SEQS=128 bench/serve_and_sweep.sh bench/results/mns128.json 8,32,64,128
#
# Settings come from config.env and the environment exactly as for start_service.sh (env wins):
# MAX_NUM_SEQS, QUANTIZATION, MOE_CONFIG_DIR, WARMUP_REQUESTS, ... (BENCH_LABEL names the run). The running service
# (if any) is stopped with stop_service.sh, started with start_service.sh (timed), and swept with
# bench/loadgen.py (closed loop; defaults: 30 s clips, 400-token captions, 3 requests per slot).
# The settings, start time and GPUs go into the JSON's meta. The service is left running:
# ./stop_service.sh stops it. BENCH_PYTHON runs loadgen (default: .venv/bin/python, else python3).
# Exit codes: 0 swept without errors, 1 the service did not start or requests failed, 2 usage.
set -euo pipefail
# shellcheck disable=SC2034 # read by service_lib.sh's messages
PROG=serve_and_sweep
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/service_lib.sh
source "$ROOT/lib/service_lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

main() {
  case ${1:-} in -h | --help) usage; exit 0 ;; esac
  (($# >= 2)) || { usage >&2; exit 2; }
  local out=$1 levels=$2 py gpus started seconds
  shift 2
  debug_setup
  load_config "" ALL
  py=${BENCH_PYTHON:-}
  if [[ -z $py ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then py=$ROOT/.venv/bin/python; else py=python3; fi
  fi
  gpus=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' || true)

  "$ROOT/stop_service.sh" >&2 || true
  started=$SECONDS
  "$ROOT/start_service.sh" >&2 || die "the service did not start (see $LOG_FILE)"
  seconds=$((SECONDS - started))
  say "started in ${seconds}s; sweeping concurrency $levels"

  "$py" "$ROOT/bench/loadgen.py" --base-url "$BASE_URL" --sweep "$levels" --output "$out" \
    --label "${BENCH_LABEL:-max-num-seqs $MAX_NUM_SEQS}" \
    --meta "max_num_seqs=$MAX_NUM_SEQS" --meta "max_num_batched_tokens=${MAX_NUM_BATCHED_TOKENS:-default}" \
    --meta "api_server_count=$API_SERVER_COUNT" --meta "tensor_parallel_size=$TENSOR_PARALLEL_SIZE" \
    --meta "data_parallel_size=$DATA_PARALLEL_SIZE" --meta "gpu_memory_util=$GPU_MEMORY_UTIL" \
    --meta "warmup_requests=$WARMUP_REQUESTS" --meta "load_format=$LOAD_FORMAT" --meta "device=$DEVICE" \
    --meta "quantization=${QUANTIZATION:-none}" --meta "moe_config_dir=${MOE_CONFIG_DIR:-none}" \
    --meta "extra_vllm_args=$EXTRA_VLLM_ARGS" --meta "start_seconds=$seconds" --meta "gpus=$gpus" \
    --meta "server_sampling=temperature $TEMPERATURE top_p $TOP_P top_k $TOP_K" "$@"
}

main "$@"
