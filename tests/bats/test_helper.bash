# Shared setup for the script tests: a throwaway folder per test, an empty config, a fake model
# folder, a stub VLLM_PYTHON, and a decoy standing in for the video service on port 8002.
# The stub answers the version probe; launched, it serves /health with python's http.server and
# forks an "engine" child, like vLLM's API server does. The real vLLM runs in the pytest suite.

KIT=$(cd "$BATS_TEST_DIRNAME/../.." && pwd)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

common_setup() {
  T=$BATS_TEST_TMPDIR
  mkdir -p "$T/model" "$T/stubroot"
  echo '{}' >"$T/model/config.json"
  echo '{}' >"$T/model/tokenizer.json"
  echo '{}' >"$T/model/preprocessor_config.json"
  : >"$T/model/model.safetensors"
  : >"$T/empty.env"
  touch "$T/stubroot/health"
  cat >"$T/vllm-python" <<'STUB'
#!/usr/bin/env bash
if [[ $1 == -c ]]; then
  [[ -z ${STUB_NO_VLLM:-} ]] || { echo "ModuleNotFoundError: No module named 'vllm'" >&2; exit 1; }
  echo "${STUB_VLLM_VERSION:-0.32.0}"; exit 0
fi
[[ $1 != *.py ]] || exec python3 "$@"
printf '%s\n' "$@" >"$STUB_ARGS"
env >"$STUB_ENV"
[[ -z ${STUB_EXIT:-} ]] || { echo "stub: failing on purpose"; exit "$STUB_EXIT"; }
port=0
while (($#)); do [[ $1 == --port ]] && port=$2; shift; done
[[ -z ${STUB_SLOW:-} ]] || sleep "$STUB_SLOW"
( exec -a "VLLM::EngineCore $STUB_ROOT" sleep 1000 ) &
exec python3 -m http.server --bind 127.0.0.1 --directory "$STUB_ROOT" "$port"
STUB
  chmod +x "$T/vllm-python"
  export CAPTIONER_CONFIG=$T/empty.env DEVICE=cpu MODEL_PATH=$T/model LOG_DIR=$T/logs
  export VLLM_PYTHON=$T/vllm-python STUB_ARGS=$T/args STUB_ENV=$T/env STUB_ROOT=$T/stubroot
  export START_TIMEOUT=20 STOP_TIMEOUT=5 SHUTDOWN_DRAIN=1
  PORT=$(free_port)
  export PORT
  unset API_KEY HOST ALLOWED_MEDIA_DOMAINS EXTRA_VLLM_ARGS TENSOR_PARALLEL_SIZE PID_FILE
  # The decoy: a process with the video service's name and port in its command line.
  (exec -a "python3 -m vllm.entrypoints.cli.main serve video-model --port 8002" sleep 600) 3>&- &
  DECOY=$!
}

common_teardown() {
  local alive=0
  kill -0 "$DECOY" 2>/dev/null && alive=1
  "$KIT/stop_service.sh" >/dev/null 2>&1 || true
  kill "$DECOY" 2>/dev/null || true
  [[ $alive == 1 ]] || { echo "the decoy 8002 service was signalled" >&2; return 1; }
}

# Live processes of this test's stub server (API server or engine), wherever they are.
stub_processes() { # shellcheck disable=SC2009 # args, not names: pgrep -f would be matching by name
  ps -e -o stat=,args= | grep -F "$STUB_ROOT" | grep -v -e grep -e '^Z' || true
}

# Pids in the session of the PID file's leader (what a stop must leave empty).
session_of() {
  ps -e -o pid= -o sid= -o stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

pid_field() {
  sed -n "s/^$1=//p" "$T/logs/service.pid"
}
