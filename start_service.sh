#!/usr/bin/env bash
# start_service.sh — start the Qwen3-Omni Captioner behind vLLM's OpenAI-compatible server.
#
# Usage: ./start_service.sh [--config FILE] [--foreground] [-h|--help]
#
# Reads config.env (or FILE, or $CAPTIONER_CONFIG); variables set in the environment win.
# Validates every value, checks vLLM, GPUs, model folder and port, then launches `vllm serve` in
# its own process group, writes a PID file that identifies it and records what it serves (port,
# host, socket, log, model), appends to $LOG_DIR/service.log,
# and waits for /health (up to START_TIMEOUT s). Two starts at once give one server.
#   --foreground   run vLLM in this process instead (for systemd): the same checks, flags and
#                  warm-up (once /health answers); no PID file, no wait.
#
# A second start while one runs reads the PID file (the running service's record): with the same
# port, host, socket and model it says "already running" (exit 0); with others, or with its engine
# dead (/health 503), it says so (exit 1): ./stop_service.sh first. A PID_FILE that is not this
# account's, or not a PID file of this kit (a link, a folder, another file), is refused, left alone.
#
# Exit codes: 0 started (or already running as asked), 1 failed: bad config, preflight, a server
# already running with other settings or a dead engine, or the server died / never became healthy
# (its log tail is printed; no process and no PID file is left); 130 / 143 interrupted (Ctrl-C,
# SIGTERM): before /health answered nothing is left, in the warm-up the healthy server stays.
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=start_service
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service_lib.sh"

# vLLM's only allowed media host: vLLM fetches nothing (the request guard fetches what the operator
# allows), and it treats an empty allow-list as "allow every host", so it gets one host that can
# never resolve (.invalid is reserved, RFC 2606).
NO_REMOTE_MEDIA_HOST=no-remote-media.invalid
# Largest request head (request line + headers) the HTTP parser buffers; uvicorn answers 400 past
# it. Must match MAX_HEADER_BYTES in captioner_server/http_limits.py (tests/test_security.py checks
# that it does).
MAX_HEADER_BYTES=65536
# The oldest vLLM without the engine crashes that one ordinary audio request reached in 0.26
# (out-of-vocabulary stop_token_ids, the multimodal cache desync after a rejected request, a forged
# WAV sample rate, remote media read whole before the size caps: all fixed by 0.29).
MIN_VLLM_VERSION=0.29.0

FOREGROUND=""
own_option() { # start's own options (init_script hands it those it does not know)
  case $1 in
    --foreground) FOREGROUND=1 ;;
    *) return 1 ;;
  esac
}

# --- preflight -------------------------------------------------------------------------------

check_vllm() {
  command -v "$VLLM_PYTHON" >/dev/null 2>&1 || die "VLLM_PYTHON=$VLLM_PYTHON not found: run ./install.sh (or ./install.sh --cpu), or point VLLM_PYTHON at a Python that has vLLM"
  VLLM_VERSION=$("$VLLM_PYTHON" -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -n 1) ||
    die "vLLM is not importable by $VLLM_PYTHON ($(command -v "$VLLM_PYTHON")): run ./install.sh, or set VLLM_PYTHON"
  local base=${VLLM_VERSION%%+*} locked
  # The locked release: requirements/gpu.in names it (cpu.in the same; tests/test_install.py).
  locked=$(sed -nE 's/^vllm(\[[a-z,]+\])?==([0-9.]+).*/\2/p' "$KIT_ROOT/requirements/gpu.in")
  if [[ $(printf '%s\n%s\n' "$MIN_VLLM_VERSION" "$base" | sort -V | head -n 1) != "$MIN_VLLM_VERSION" ]]; then
    die "vLLM $VLLM_VERSION is too old: $MIN_VLLM_VERSION or newer is needed (older releases crash on ordinary audio requests); run ./install.sh for vLLM $locked"
  fi
  [[ $base == "$locked" ]] ||
    say "warning: vLLM $VLLM_VERSION is not the locked $locked that the tests ran; going on (./install.sh installs $locked)"
}

check_gpus() {
  [[ $DEVICE == cuda ]] || return 0
  local need=$((TENSOR_PARALLEL_SIZE * DATA_PARALLEL_SIZE)) have
  command -v nvidia-smi >/dev/null 2>&1 || die "DEVICE=cuda but no NVIDIA driver here (nvidia-smi not found); use DEVICE=cpu for development"
  have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    have=$(awk -F, -v h="$have" '{ n = ($0 == "") ? 0 : NF; print (n < h) ? n : h }' <<<"$CUDA_VISIBLE_DEVICES")
  fi
  ((have >= need)) || die "TENSOR_PARALLEL_SIZE=$TENSOR_PARALLEL_SIZE x DATA_PARALLEL_SIZE=$DATA_PARALLEL_SIZE needs $need GPUs, $have visible"
}

check_model() {
  [[ -d $MODEL_PATH_ABS ]] || die "MODEL_PATH=$MODEL_PATH: no such folder ($MODEL_PATH_ABS); run 'make model' to download the weights"
  [[ -f $MODEL_PATH_ABS/config.json ]] || die "MODEL_PATH=$MODEL_PATH has no config.json: not a model folder (incomplete download? run 'make model')"
  [[ -f $MODEL_PATH_ABS/tokenizer.json || -f $MODEL_PATH_ABS/vocab.json ]] || die "MODEL_PATH=$MODEL_PATH has no tokenizer (tokenizer.json or vocab.json)"
  [[ -f $MODEL_PATH_ABS/preprocessor_config.json || -f $MODEL_PATH_ABS/processor_config.json ]] ||
    die "MODEL_PATH=$MODEL_PATH has no preprocessor_config.json (the audio feature extractor)"
  if [[ $LOAD_FORMAT != dummy ]] && ! compgen -G "$MODEL_PATH_ABS/*.safetensors" >/dev/null; then
    die "MODEL_PATH=$MODEL_PATH has no *.safetensors weights (run 'make model', or LOAD_FORMAT=dummy to benchmark without weights)"
  fi
}

proc_desc() { # "pid 123 (sleep)"
  local comm
  comm=$(cat "/proc/$1/comm" 2>/dev/null) || comm=gone
  printf 'pid %s (%s)' "$1" "$comm"
}

# Who listens on PORT? Prints "pid 123 (python3)" or "an unknown process"; returns 1 if nobody.
port_holder() {
  local line pid
  line=$(ss -Hltnp "sport = :$1" 2>/dev/null | head -n 1)
  [[ -n $line ]] || return 1
  if [[ $line =~ pid=([0-9]+) ]]; then
    pid=${BASH_REMATCH[1]}
    proc_desc "$pid"
  else
    printf 'an unknown process'
  fi
}

check_port() {
  local holder
  if [[ -n $UNIX_SOCKET ]]; then
    [[ -e $UNIX_SOCKET_ABS ]] || return 0
    [[ -S $UNIX_SOCKET_ABS ]] || die "UNIX_SOCKET=$UNIX_SOCKET_ABS exists and is not a socket"
    # In use when anything accepts on it, answering or not (a busy or hung server): only a refused
    # connect (curl's exit 7) says it was left by a server that is gone.
    local rc=0
    curl -s -o /dev/null -m 2 --unix-socket "$UNIX_SOCKET_ABS" http://localhost/health 2>/dev/null || rc=$?
    ((rc == 7)) || die "UNIX_SOCKET=$UNIX_SOCKET_ABS is in use by a running server"
    rm -f "$UNIX_SOCKET_ABS" # vLLM cannot bind over a stale one
    return 0
  fi
  if holder=$(port_holder "$PORT"); then
    die "port $PORT is already in use by $holder; choose another PORT or stop that process"
  fi
}

check_log_dir() {
  local made=""
  [[ -d $LOG_DIR_ABS ]] || made=1
  mkdir -p "$LOG_DIR_ABS" 2>/dev/null || die "LOG_DIR=$LOG_DIR cannot be created ($LOG_DIR_ABS)"
  [[ -w $LOG_DIR_ABS ]] || die "LOG_DIR=$LOG_DIR is not writable ($LOG_DIR_ABS)"
  if ! mkdir -p "$(dirname "$PID_FILE_ABS")" 2>/dev/null || [[ ! -w $(dirname "$PID_FILE_ABS") ]]; then
    die "PID_FILE=$PID_FILE_ABS: its folder is not writable"
  fi
  close_logs "$made"
}

# service.log records requests (paths, clients, errors): other accounts get no access to it (issue
# #21). The folder is closed (0750) when it is the service's own: made by this start, or ours, not
# shared (shared_dir) and either the kit's logs/ or holding nothing but the service's files. Any
# other (LOG_DIR=/tmp, or a home folder) is left as it is; the logs in it are closed.
close_logs() { # close_logs MADE
  local mode f
  if [[ -n $1 ]]; then
    chmod 0750 "$LOG_DIR_ABS"
  elif [[ -O $LOG_DIR_ABS ]] && services_own_dir "$LOG_DIR_ABS"; then
    chmod o= "$LOG_DIR_ABS"
  else
    mode=$(stat -L -c %a "$LOG_DIR_ABS")
    if ((8#$mode & 5)); then
      say "warning: LOG_DIR=$LOG_DIR is open to other accounts (mode $mode, $LOG_DIR_ABS) and is shared, not ours or holds other files, so it is left as it is: give the service a folder of its own"
    fi
  fi
  for f in "$LOG_FILE" "$LOG_FILE"[.-]*; do
    if [[ -f $f && ! -L $f && -O $f ]]; then chmod o= "$f"; fi
  done
  new_log
}

new_log() { # service.log, made 0640 if it is missing
  [[ -e $LOG_FILE ]] || (umask 027 && : >>"$LOG_FILE")
}

# --- the launch ----------------------------------------------------------------------------------

build_args() {
  local gen
  gen=$(printf '{"temperature":%s,"top_p":%s,"top_k":%s,"max_new_tokens":%s}' "$TEMPERATURE" "$TOP_P" "$TOP_K" "$MAX_TOKENS")
  VLLM_ARGS=(-m vllm.entrypoints.cli.main serve "$MODEL_PATH_ABS"
    --host "$HOST" --port "$PORT" --served-model-name "$SERVED_MODEL_NAME"
    --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_NUM_SEQS"
    --load-format "$LOAD_FORMAT"
    --override-generation-config "$gen" --shutdown-timeout "$SHUTDOWN_DRAIN"
    --api-server-count "$API_SERVER_COUNT" --middleware captioner_server.request_guard.RequestGuard
    --h11-max-incomplete-event-size "$MAX_HEADER_BYTES"
    --limit-mm-per-prompt '{"audio":1,"image":0,"video":0}'
    --mm-processor-cache-gb 0 --media-io-kwargs '{"audio":{"audio_backend":"soundfile"}}')
  # audio_backend soundfile: vLLM decodes a request's audio with libsndfile alone. Its default
  # falls back to FFmpeg, whose concat, HLS and DASH demuxers open the files and URLs that the
  # bytes name: `ffconcat version 1.0 / file notes/x.wav` sent as audio was read from the
  # server's folder. libsndfile reads WAV, AIFF, FLAC, MP3 and Ogg; the client and the upload
  # route send anything else as WAV (captioner/audio.py).
  # --mm-processor-cache-gb 0: every clip is new, so vLLM's multimodal processor cache never hits;
  # it grows to 4 GiB and is state one request can leave out of step for the next
  # (bench/results/2026-12-06-cpu-mm-processor-cache).
  # vLLM fetches nothing: the request guard fetches ALLOWED_MEDIA_DOMAINS' URLs itself and hands
  # vLLM the bytes inline (captioner_server/media_fetch.py); vLLM is allowed only a host that never resolves.
  VLLM_ARGS+=(--allowed-media-domains "$NO_REMOTE_MEDIA_HOST")
  [[ -z $UNIX_SOCKET ]] || VLLM_ARGS+=(--uds "$UNIX_SOCKET_ABS")
  [[ -z $MAX_NUM_BATCHED_TOKENS ]] || VLLM_ARGS+=(--max-num-batched-tokens "$MAX_NUM_BATCHED_TOKENS")
  [[ -z $QUANTIZATION ]] || VLLM_ARGS+=(--quantization "$QUANTIZATION")
  if [[ $DEVICE == cuda ]]; then
    VLLM_ARGS+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE" --gpu-memory-utilization "$GPU_MEMORY_UTIL")
    ((DATA_PARALLEL_SIZE == 1)) || VLLM_ARGS+=(--data-parallel-size "$DATA_PARALLEL_SIZE")
  else
    # The worker runs inside the engine process, as vLLM does for one GPU: one vLLM import less
    # per start (~20 s of a ~65 s start on 2 cores).
    VLLM_ARGS+=(--enforce-eager --distributed-executor-backend uni)
  fi
  # Split on spaces (documented), no quoting and no globbing: `*` stays `*`, whatever the folder.
  local -a extra=()
  [[ -z $EXTRA_VLLM_ARGS ]] || read -r -d '' -a extra <<<"$EXTRA_VLLM_ARGS" || true
  VLLM_ARGS+=("${extra[@]}")
}

# The service's environment: secure defaults; the API key travels here, never in argv.
export_service_env() {
  export VLLM_API_KEY=$API_KEY
  [[ -n $API_KEY ]] || unset VLLM_API_KEY
  export VLLM_MEDIA_URL_ALLOW_REDIRECTS=0
  export VLLM_MAX_AUDIO_DECODE_DURATION_S=$MAX_AUDIO_SECONDS VLLM_MAX_AUDIO_DECODE_BYTES=$MAX_AUDIO_BYTES
  # captioner_server/request_guard.py (loaded by --middleware): routes, key, Host, body cap, audio
  # only, fetches, and request fields checked against the served model. It reads its settings as
  # CAPTIONER_<NAME> (captioner/config.py's GUARD_SETTINGS), and those vLLM reads too under vLLM's
  # names, above. The kit's root on the path: the captioner_server package, and the captioner
  # package its upload route cuts audio with.
  export PYTHONPATH=$KIT_ROOT${PYTHONPATH:+:$PYTHONPATH} "${GUARD_ENV[@]}"
  # uvicorn believes X-Forwarded-For from loopback by default: any local account could write
  # another client address into the access log. No proxy stands in front of the service.
  export FORWARDED_ALLOW_IPS=
  # A caption request has no use for thousands of samples (vLLM allows n up to 16384).
  export VLLM_MAX_N_SEQUENCES=16
  # Tuned Triton tiles for the experts' kernel of this card (bench/tune_moe.py); vLLM falls back
  # to its own table, then to its generic default, for a card or dtype the folder lacks.
  unset VLLM_TUNED_CONFIG_FOLDER
  [[ -z $MOE_CONFIG_DIR ]] || export VLLM_TUNED_CONFIG_FOLDER=$MOE_CONFIG_DIR_ABS
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  export VLLM_HOST_IP=${VLLM_HOST_IP:-127.0.0.1}
  export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$KIT_ROOT/.cache/vllm}
  export PYTHONUNBUFFERED=1
  # The socket vLLM creates: owner and group only (its group: the folder's, when setgid).
  [[ -z $UNIX_SOCKET ]] || umask 007
  if [[ $DEVICE == cpu ]]; then
    export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=$CPU_KVCACHE_GB
  fi
  # Never use NVLink multicast on a shared host: it can take every GPU of the host down.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
}

rotate_logs() {
  [[ -s $LOG_FILE ]] || return 0
  local i
  for ((i = LOG_KEEP; i >= 1; i--)); do
    if ((i == LOG_KEEP)); then rm -f "$LOG_FILE.$i"; elif [[ -f $LOG_FILE.$i ]]; then mv -f "$LOG_FILE.$i" "$LOG_FILE.$((i + 1))"; fi
  done
  if ((LOG_KEEP > 0)); then mv -f "$LOG_FILE" "$LOG_FILE.1"; else rm -f "$LOG_FILE"; fi
}

CHILD_PID=
cleanup_failed_start() {
  [[ -n $CHILD_PID ]] || return 0
  trap '' INT TERM # a second Ctrl-C must not cut the clean-up short (STOP_TIMEOUT=10 bounds it)
  STOP_TIMEOUT=10 terminate_service leader || say "could not stop every process of the failed start: $(service_pids | tr '\n' ' ')"
  rm -f "$PID_FILE_ABS"
  CHILD_PID=
}

on_signal() { # on_signal EXIT_CODE: 130 for SIGINT, 143 for SIGTERM, as a shell says
  trap '' INT TERM
  say "interrupted: stopping the server that was starting"
  cleanup_failed_start
  exit "$1"
}

on_signal_warming() { # the server is healthy and recorded: it stays
  say "interrupted during the warm-up: the server is up and stays (pid $PF_PID); ./stop_service.sh stops it"
  exit "$1"
}

fail_start() { # fail_start MESSAGE
  say "$1"
  if [[ -s $LOG_FILE ]]; then
    say "last lines of $LOG_FILE:"
    tail -n 25 "$LOG_FILE" | sed 's/^/    /' >&2
  fi
  cleanup_failed_start
  exit 1
}

launch() {
  build_args
  rotate_logs
  new_log
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) start_service: vLLM $VLLM_VERSION, $VLLM_PYTHON ${VLLM_ARGS[*]}" >>"$LOG_FILE"
  (
    export_service_env
    exec setsid "$VLLM_PYTHON" "${VLLM_ARGS[@]}" >>"$LOG_FILE" 2>&1 </dev/null 3>&- 9>&-
  ) &
  CHILD_PID=$!
  PF_PID=$CHILD_PID PF_LOG_ID=$(file_id "$LOG_FILE")
  trap 'on_signal 130' INT
  trap 'on_signal 143' TERM
  # setsid makes the child a session and group leader with its own pid; wait until it has.
  local i
  for ((i = 0; i < 50; i++)); do
    [[ $(proc_stat_field "$CHILD_PID" 6 || true) == "$CHILD_PID" ]] && break
    leader_alive || fail_start "vLLM exited during start-up (see the log lines below)"
    sleep 0.1
  done
  write_pid_file "$CHILD_PID"
}

write_pid_file() { # write_pid_file PID — atomically
  local pid=$1 tmp
  tmp=$(mktemp "$PID_FILE_ABS.XXXXXX")
  {
    echo "pid=$pid"
    echo "pgid=$(proc_stat_field "$pid" 5)"
    echo "start_time=$(proc_stat_field "$pid" 22)"
    echo "log_id=$(file_id "$LOG_FILE")"
    echo "started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # What the service serves, and where status, stop and a second start find it.
    echo "port=$PORT"
    echo "bind=$HOST"
    echo "host=$HEALTH_HOST"
    echo "socket=$UNIX_SOCKET_ABS"
    echo "url=$BASE_URL"
    echo "log=$LOG_FILE"
    echo "model=$MODEL_PATH_ABS"
    echo "served_model=$SERVED_MODEL_NAME"
  } >"$tmp"
  mv -f "$tmp" "$PID_FILE_ABS"
}


wait_healthy() {
  local deadline=$((SECONDS + START_TIMEOUT)) next_note=$((SECONDS + 15)) code
  say "waiting for $BASE_URL/health (up to ${START_TIMEOUT}s; log: $LOG_FILE)"
  while :; do
    if ! leader_alive; then
      fail_start "vLLM exited during start-up (see the log lines below)"
    fi
    code=$(http_status /health 2)
    [[ $code == 200 ]] && return 0
    ((SECONDS < deadline)) || fail_start "no healthy server after ${START_TIMEOUT}s (START_TIMEOUT)"
    if ((SECONDS >= next_note)); then
      say "still starting ($((SECONDS - deadline + START_TIMEOUT))s): $(tail -n 1 "$LOG_FILE" | cut -c1-120)"
      next_note=$((SECONDS + 15))
    fi
    sleep 1
  done
}

leader_alive() {
  [[ -d /proc/$CHILD_PID ]] && [[ $(proc_stat_field "$CHILD_PID" 3) != Z ]]
}

# The first requests after a start pay Triton's JIT compilation of the MoE and sampling kernels
# (measured up to 1.9x slower, docs/PERFORMANCE.md); take that cost before users come. CPU
# (eager) has nothing to compile.
wants_warm_up() { ((WARMUP_REQUESTS > 0)) && [[ $DEVICE == cuda ]]; }

warm_up() {
  wants_warm_up || return 0
  local -a args=(--base-url "$HTTP_URL" --requests "$WARMUP_REQUESTS")
  [[ -z $UNIX_SOCKET_ABS ]] || args+=(--unix-socket "$UNIX_SOCKET_ABS")
  say "warming up with $WARMUP_REQUESTS concurrent requests"
  CAPTIONER_API_KEY=$API_KEY "$VLLM_PYTHON" "$KIT_ROOT/tools/warm_up.py" "${args[@]}" >>"$LOG_FILE" 2>&1 ||
    say "warm-up failed (the service is up; see $LOG_FILE)"
}

# --foreground: vLLM takes this shell's pid (exec); a child of it waits for /health, then warms up.
warm_up_when_healthy() {
  wants_warm_up || return 0
  local server=$$ deadline=$((SECONDS + START_TIMEOUT))
  while kill -0 "$server" 2>/dev/null && ((SECONDS < deadline)); do
    if [[ $(http_status /health 2) == 200 ]]; then
      warm_up
      return 0
    fi
    sleep 1
  done
}

# A server of ours runs (the PID file's leader). With the settings that decide what this start
# would serve, that is success; with others, this start cannot give what was asked. The PID file
# is the record of what runs (an older one, without these keys, is taken to match).
already_running() {
  local changes="" running="pid $PF_PID, ${PF_URL:-$BASE_URL}, model ${PF_SERVED_MODEL:-$SERVED_MODEL_NAME}"
  if [[ -n $PF_URL ]]; then
    changes+=$(differs UNIX_SOCKET "$PF_SOCKET" "$UNIX_SOCKET_ABS")
    if [[ -z $PF_SOCKET && -z $UNIX_SOCKET_ABS ]]; then
      changes+=$(differs HOST "$PF_BIND" "$HOST")
      changes+=$(differs PORT "$PF_PORT" "$PORT")
    fi
    changes+=$(differs MODEL_PATH "$PF_MODEL" "$MODEL_PATH_ABS")
    changes+=$(differs SERVED_MODEL_NAME "$PF_SERVED_MODEL" "$SERVED_MODEL_NAME")
  fi
  [[ -z $changes ]] || die "already running with other settings ($running): ${changes%; }; run ./stop_service.sh first to start with these"
  [[ $(use_record && http_status /health 2) != 503 ]] ||
    die "already running ($running) but its engine is dead (/health 503): run ./stop_service.sh then ./start_service.sh"
  say "already running ($running)"
  exit 0
}

differs() { # differs SETTING RUNNING WANTED -> "SETTING is RUNNING there, WANTED here; " or nothing
  [[ $2 == "$3" ]] || printf '%s is %s there, %s here; ' "$1" "${2:-empty}" "${3:-empty}"
}

# On a shared host every account can read a file of mode 644: a key written there is everyone's.
check_key_file() {
  local mode
  [[ -n $API_KEY && -f $CONFIG_FILE ]] && grep -q '^API_KEY=.' "$CONFIG_FILE" || return 0
  mode=$(stat -L -c %a "$CONFIG_FILE")
  ((8#$mode & 4)) || return 0
  say "warning: $CONFIG_FILE holds API_KEY and every account on this host can read it (mode $mode): chmod o-r $CONFIG_FILE"
}

# --foreground: under the start lock, refuse to start beside a running service (a manual start's,
# or another foreground one), then name this process in the lock file: the vLLM it becomes keeps
# its pid and start time, so a manual start meanwhile says so at once rather than load the model a
# second time onto the same GPUs (foreground_holder). The lock itself is let go before vLLM runs
# (its children would inherit it).
claim_foreground() {
  local holder
  exec 9>>"$LOCK_FILE"
  flock -n 9 || die "another start of this service is running ($LOCK_FILE is held): stop it first, or wait for it"
  if holder=$(foreground_holder); then
    die "this service already runs in the foreground as pid $holder: stop that one first"
  fi
  if read_pid_file && leader_is_ours; then
    die "already running as pid $PF_PID (started by start_service.sh): run ./stop_service.sh first"
  fi
  printf 'foreground pid=%s start_time=%s\n' "$$" "$(proc_stat_field "$$" 22)" >"$LOCK_FILE"
  exec 9>&-
}

main() {
  init_script "$@"
  check_key_file
  check_log_dir
  check_model

  if [[ -n $FOREGROUND ]]; then
    claim_foreground
    check_vllm
    check_gpus
    check_port
    build_args
    export_service_env
    warm_up_when_healthy </dev/null &
    exec "$VLLM_PYTHON" "${VLLM_ARGS[@]}"
  fi

  # One start at a time: a second start waits here, then finds the first one's server; a service
  # in the foreground (systemd's unit), named in the lock file, is said at once.
  # shellcheck disable=SC2153 # LOCK_FILE is load_config's (captioner/config.py derives it)
  exec 9>>"$LOCK_FILE"
  flock -w "$((START_TIMEOUT + 60))" 9 || die "another start_service.sh holds $LOCK_FILE"
  local holder
  if holder=$(foreground_holder); then
    die "this service runs in the foreground as pid $holder (systemd's unit?): manage it with systemctl, or stop that one first"
  fi

  if read_pid_file; then
    if leader_is_ours; then
      already_running
    fi
    if [[ -n $(service_pids) ]]; then
      die "a previous server's processes are still running (API server gone): run ./stop_service.sh first"
    fi
    say "removing stale PID file $PID_FILE_ABS (pid $PF_PID is not our server)"
    rm -f "$PID_FILE_ABS"
  fi

  check_vllm
  check_gpus
  check_port
  launch
  wait_healthy
  trap 'on_signal_warming 130' INT
  trap 'on_signal_warming 143' TERM
  warm_up
  trap - INT TERM
  say "ready: $BASE_URL (pid $PF_PID, model $SERVED_MODEL_NAME, vLLM $VLLM_VERSION)"
}

main "$@"
