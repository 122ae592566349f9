# Shared setup for the script tests: a throwaway folder per test, an empty config, a fake model
# folder, a stub VLLM_PYTHON, and a decoy standing in for the video service on port 8002.
# The stub answers the version probe; launched, it serves the files of $STUB_ROOT over HTTP on
# its --port, or on its --uds socket (an empty $STUB_ROOT/health is a healthy server;
# $STUB_ROOT/health.status holding 503 makes /health answer 503; a POST reads its body and answers
# as a GET would) and forks an "engine" child, like vLLM's API server does. The real vLLM runs in
# the pytest suite. Assertions: bats-support and bats-assert (Debian packages of the same names).

bats_load_library bats-support
bats_load_library bats-assert

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
port=0 uds=""
while (($#)); do
  [[ $1 == --port ]] && port=$2
  [[ $1 == --uds ]] && uds=$2
  shift
done
[[ -z ${STUB_SLOW:-} ]] || sleep "$STUB_SLOW"
( exec -a "VLLM::EngineCore $STUB_ROOT" sleep 1000 ) &
exec python3 "${0%/*}/stub_server.py" "$STUB_ROOT" "$port" $uds # the server beside this stub
STUB
  chmod +x "$T/vllm-python"
  # python3 -m http.server, plus a status of our choosing: ROOT/PATH.status holds the code that
  # PATH answers (GET, HEAD and POST), with an empty body. Given a third argument, it listens on
  # that UNIX socket instead of the port, as vLLM does with --uds.
  cat >"$T/stub_server.py" <<'SERVER'
import http.server
import os
import pathlib
import socketserver
import sys
from functools import partial

ROOT, PORT = sys.argv[1], int(sys.argv[2])


class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        status = pathlib.Path(ROOT, self.path.split("?")[0].lstrip("/") + ".status")
        if not status.is_file():
            return super().send_head()
        self.send_response(int(status.read_text()))
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def address_string(self):
        return str(self.client_address[0]) if self.client_address else "unix"


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


handler = partial(Handler, directory=ROOT)
if len(sys.argv) > 3:
    os.umask(0o007)
    UnixServer(sys.argv[3], handler).serve_forever()
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), handler).serve_forever()
SERVER
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

# run_unprivileged CMD...: CMD as the user nobody when we run as root (as CI does), so that a
# permission check applies (root writes anywhere); as ourselves otherwise. The environment is kept.
run_unprivileged() {
  if ((EUID == 0)); then
    setpriv --reuid="$(id -u nobody)" --regid="$(id -g nobody)" --clear-groups -- "$@"
  else
    "$@"
  fi
}

# unprivileged_kit: sets UKIT to a kit folder whose scripts the user nobody can run, when we run
# as root ($KIT otherwise). bats keeps $T inside a folder only its owner may enter, so $T and the
# folders above it up to bats' own are opened to others (search only: none can be listed). The kit
# is used in place when status_service.sh runs from it as nobody, else a copy of the files a start
# reads before it launches anything; if neither runs, the test skips and says why.
unprivileged_kit() {
  UKIT=$KIT
  ((EUID == 0)) || return 0
  local dir=$T
  while [[ $dir == "$BATS_RUN_TMPDIR"* ]]; do
    chmod o+x "$dir"
    dir=${dir%/*}
  done
  chmod o+r "$CAPTIONER_CONFIG"
  [[ $(run_unprivileged "$UKIT/status_service.sh" 2>&1) != stopped ]] || return 0
  UKIT=$T/kit
  mkdir "$UKIT"
  cp -R "$KIT/start_service.sh" "$KIT/status_service.sh" "$KIT/stop_service.sh" "$KIT/lib" "$KIT/captioner" "$KIT/config.env.example" "$UKIT/"
  chmod -R o+rX "$UKIT"
  local probe
  probe=$(run_unprivileged "$UKIT/status_service.sh" 2>&1) || true
  [[ $probe == stopped ]] || skip "the user nobody cannot run status_service.sh from $KIT or from a copy in $UKIT (both need folders above them that others may enter): $probe"
}
