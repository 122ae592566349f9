#!/usr/bin/env bats
# start_service.sh against a stub vLLM (argv, secure defaults, lock, failure clean-up).
# The same paths run against the real vLLM in tests/test_service_lifecycle.py.

load test_helper

setup() { common_setup; }
teardown() { common_teardown; }

@test "argv: loopback bind, audio only, no local files, no remote media, libsndfile decodes, server-side sampling" {
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_success
  run cat "$T/args"
  assert_output --partial -- $'--host\n127.0.0.1\n'
  assert_output --partial -- $'--limit-mm-per-prompt\n{"audio":1,"image":0,"video":0}\n--mm-processor-cache-gb\n0\n'
  assert_output --partial -- $'--media-io-kwargs\n{"audio":{"audio_backend":"soundfile"}}\n'
  assert_output --partial -- $'--allowed-media-domains\nno-remote-media.invalid\n'
  assert_output --partial -- $'--override-generation-config\n{"temperature":0.6,"top_p":0.95,"top_k":20,"max_new_tokens":16384}\n'
  refute_output --partial allowed-local-media-path
  refute_output --partial enable-log-requests
  # DEVICE=cpu (these tests): eager, and the worker inside the engine process (one import less).
  assert_output --partial -- $'--enforce-eager\n--distributed-executor-backend\nuni'
  grep -qx 'VLLM_MEDIA_URL_ALLOW_REDIRECTS=0' "$T/env"
  grep -qx 'HF_HUB_OFFLINE=1' "$T/env"
  grep -qx 'VLLM_NO_USAGE_STATS=1' "$T/env"
  grep -qx 'VLLM_HOST_IP=127.0.0.1' "$T/env"
  grep -qx 'VLLM_MAX_AUDIO_DECODE_DURATION_S=600' "$T/env"
  # The request guard, and the header cap of the HTTP parser it selects (h11).
  assert_output --partial -- $'--middleware\ncaptioner_server.request_guard.RequestGuard\n--h11-max-incomplete-event-size\n65536\n'
  grep -qx 'CAPTIONER_MAX_REQUEST_BYTES=268435456' "$T/env"
  grep -qx 'CAPTIONER_REQUEST_TIMEOUT=30' "$T/env"
  grep -qx 'CAPTIONER_ALLOWED_HOSTS=' "$T/env"
  grep -qx 'CAPTIONER_EXTRA_ROUTES=' "$T/env"
  grep -qx 'CAPTIONER_ALLOWED_MEDIA_DOMAINS=' "$T/env"
  # What the guard checks fields against; uvicorn believes no X-Forwarded-For.
  grep -qx "CAPTIONER_MODEL_PATH=$T/model" "$T/env"
  grep -qx "CAPTIONER_MAX_MODEL_LEN=32768" "$T/env"
  grep -qx 'CAPTIONER_MAX_TOKENS=16384' "$T/env"
  grep -qx 'FORWARDED_ALLOW_IPS=' "$T/env"
}

@test "MOE_CONFIG_DIR reaches vLLM as VLLM_TUNED_CONFIG_FOLDER (absolute); empty leaves vLLM its own table" {
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_success
  grep -qx "VLLM_TUNED_CONFIG_FOLDER=$KIT/moe_configs" "$T/env"
  mkdir "$T/moe"
  STUB_EXIT=0 MOE_CONFIG_DIR=$T/moe run "$KIT/start_service.sh" --foreground
  grep -qx "VLLM_TUNED_CONFIG_FOLDER=$T/moe" "$T/env"
  STUB_EXIT=0 MOE_CONFIG_DIR= VLLM_TUNED_CONFIG_FOLDER=/elsewhere run "$KIT/start_service.sh" --foreground
  assert_success
  run grep -c '^VLLM_TUNED_CONFIG_FOLDER=' "$T/env"
  assert_output 0
}

@test "a MOE_CONFIG_DIR that is not a folder is refused before anything starts" {
  MOE_CONFIG_DIR=$T/moe-typo run "$KIT/start_service.sh" --foreground
  assert_failure 1
  assert_output "start_service: MOE_CONFIG_DIR=\"$T/moe-typo\" is invalid: no such folder ($T/moe-typo): name the folder bench/tune_moe.py wrote, or leave it empty"
  [[ ! -e $T/args ]]
}

@test "argv: UNIX_SOCKET makes vLLM listen on that socket (--uds)" {
  STUB_EXIT=0 UNIX_SOCKET=$T/api.sock run "$KIT/start_service.sh" --foreground
  assert_success
  run cat "$T/args"
  assert_output --partial -- $'--uds\n'"$T/api.sock"$'\n'
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  run cat "$T/args"
  refute_output --partial -- --uds
}

@test "argv: the API key travels in the environment, never on the command line" {
  STUB_EXIT=0 API_KEY=s3cret-key run "$KIT/start_service.sh" --foreground
  assert_success
  refute grep -q s3cret-key "$T/args"
  grep -qx 'VLLM_API_KEY=s3cret-key' "$T/env"
}

@test "argv: allowed media domains go to the guard (vLLM fetches nothing), TP on cuda, extra args split on spaces" {
  mkdir -p "$T/bin"
  printf '#!/bin/sh\necho "GPU 0: x"\necho "GPU 1: y"\n' >"$T/bin/nvidia-smi"
  chmod +x "$T/bin/nvidia-smi"
  STUB_EXIT=0 DEVICE=cuda PATH="$T/bin:$PATH" ALLOWED_MEDIA_DOMAINS=a.example.com,b.example.com \
    EXTRA_VLLM_ARGS="--max-log-len 100 --seed 1" run "$KIT/start_service.sh" --foreground
  assert_success
  grep -qx 'CAPTIONER_ALLOWED_MEDIA_DOMAINS=a.example.com,b.example.com' "$T/env"
  run cat "$T/args"
  assert_output --partial -- $'--allowed-media-domains\nno-remote-media.invalid\n'
  refute_output --partial a.example.com
  assert_output --partial -- $'--tensor-parallel-size\n2\n--gpu-memory-utilization\n0.95\n'
  assert_equal "$(tail -n 4 "$T/args")" $'--max-log-len\n100\n--seed\n1'
  refute_output --partial enforce-eager
  refute_output --partial distributed-executor-backend
}

@test "argv: QUANTIZATION=fp8 loads FP8 weights; empty passes no --quantization" {
  STUB_EXIT=0 QUANTIZATION=fp8 run "$KIT/start_service.sh" --foreground
  assert_success
  grep -A1 -x -- --quantization "$T/args" | tail -n 1 | grep -qx fp8
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  refute grep -qx -- --quantization "$T/args"
}

@test "--foreground warms up once /health answers, as a scripted start does" {
  mkdir -p "$T/bin"
  printf '#!/bin/sh\necho "GPU 0: x"\necho "GPU 1: y"\n' >"$T/bin/nvidia-smi"
  chmod +x "$T/bin/nvidia-smi"
  DEVICE=cuda WARMUP_REQUESTS=2 PATH="$T/bin:$PATH" "$KIT/start_service.sh" --foreground 2>"$T/err" 3>&- &
  server=$!
  for _ in $(seq 1 150); do grep -q 'warm-up failed' "$T/err" && break; sleep 0.1; done
  kill "$server"
  pkill -f "VLLM::EngineCore $STUB_ROOT" || true
  cat "$T/err"
  grep -qx 'start_service: warming up with 2 concurrent requests' "$T/err"
  # The stub serves /health but no chat route: warm_up.py reached it, and the failure is one line.
  grep -q 'warm_up: ' "$T/logs/service.log"
  grep -qx "start_service: warm-up failed (the service is up; see $T/logs/service.log)" "$T/err"
}

@test "UNIX_SOCKET: a socket a server accepts on but does not answer is in use and stays; a stale one is removed" {
  # A hung server: it accepts connections and never answers.
  python3 -c "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); time.sleep(60)" "$T/hung.sock" &
  hung=$!
  for _ in $(seq 50); do [[ -S $T/hung.sock ]] && break; sleep 0.1; done
  UNIX_SOCKET=$T/hung.sock run "$KIT/start_service.sh"
  kill "$hung"
  assert_failure 1
  assert_output "start_service: UNIX_SOCKET=$T/hung.sock is in use by a running server"
  [ -S "$T/hung.sock" ]
  # A stale one: bound, then its server gone (no one accepts: connect is refused).
  python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])" "$T/stale.sock"
  STUB_EXIT=0 UNIX_SOCKET=$T/stale.sock run "$KIT/start_service.sh" --foreground
  assert_success
  [ ! -e "$T/stale.sock" ]
}

@test "UNIX_SOCKET: the start warms up through the socket; status and stop find it there" {
  mkdir -p "$T/bin" "$T/stubroot/v1/chat"
  printf '#!/bin/sh\necho "GPU 0: x"\necho "GPU 1: y"\n' >"$T/bin/nvidia-smi"
  chmod +x "$T/bin/nvidia-smi"
  echo '{"data": [{"id": "stub-model"}]}' >"$T/stubroot/v1/models"
  echo '{"object": "chat.completion"}' >"$T/stubroot/v1/chat/completions"
  export DEVICE=cuda WARMUP_REQUESTS=2 PATH="$T/bin:$PATH" UNIX_SOCKET=$T/api.sock
  run "$KIT/start_service.sh"
  assert_success
  assert_line "start_service: warming up with 2 concurrent requests"
  assert_line --index -1 --regexp "^start_service: ready: unix:$T/api\.sock \(pid "
  refute_output --partial "warm-up skipped"
  # Both waves answered through the socket (the stub listens on nothing else).
  grep -q '^warm_up: 1 concurrent request(s) of 30 s audio, 32 tokens: .* 0 failed$' "$T/logs/service.log"
  grep -q '^warm_up: 2 concurrent request(s) of 30 s audio, 32 tokens: .* 0 failed$' "$T/logs/service.log"
  assert_equal "$(pid_field socket)" "$T/api.sock"
  assert_equal "$(ss -Hltn "sport = :$PORT")" ""
  unset UNIX_SOCKET
  run "$KIT/status_service.sh"
  assert_success
  assert_line "url:      unix:$T/api.sock"
  assert_line "health:   ok"
  pid=$(pid_field pid)
  run "$KIT/stop_service.sh"
  assert_success
  assert_line --index 0 "stop_service: stopping pid $pid (unix:$T/api.sock; draining up to 1s)"
  assert_equal "$(session_of "$pid")" ""
}

@test "start, status 0, stop, status 3: nothing of the session is left" {
  run "$KIT/start_service.sh"
  assert_success
  assert_line --index -1 --regexp "^start_service: ready: http://127\.0\.0\.1:$PORT \(pid "
  pid=$(pid_field pid)
  assert_equal "$(pid_field pgid)" "$pid"
  assert_not_equal "$(pid_field start_time)" ""
  assert_not_equal "$(pid_field log_id)" ""
  run "$KIT/status_service.sh"
  assert_success
  assert_output --partial "health:   ok"
  run "$KIT/stop_service.sh"
  assert_success
  assert_line --index -1 "stop_service: stopped"
  assert_equal "$(session_of "$pid")" ""
  [ ! -e "$T/logs/service.pid" ]
  run "$KIT/status_service.sh"
  assert_failure 3
  assert_output "stopped"
}

@test "a second start finds the running server and exits 0" {
  "$KIT/start_service.sh" 2>/dev/null
  run "$KIT/start_service.sh"
  assert_success
  assert_output "start_service: already running (pid $(pid_field pid), http://127.0.0.1:$PORT, model Qwen3-Omni-30B-A3B-Captioner)"
}

@test "the PID file records what runs: port, host, socket, log, URL, model" {
  "$KIT/start_service.sh" 2>/dev/null
  assert_equal "$(pid_field port)" "$PORT"
  assert_equal "$(pid_field bind)" 127.0.0.1
  assert_equal "$(pid_field host)" 127.0.0.1
  assert_equal "$(pid_field socket)" ""
  assert_equal "$(pid_field url)" "http://127.0.0.1:$PORT"
  assert_equal "$(pid_field log)" "$T/logs/service.log"
  assert_equal "$(pid_field model)" "$T/model"
  assert_equal "$(pid_field served_model)" Qwen3-Omni-30B-A3B-Captioner
}

@test "a second start with other settings says what runs and what differs, and exits 1" {
  "$KIT/start_service.sh" 2>/dev/null
  pid=$(pid_field pid)
  running="pid $pid, http://127.0.0.1:$PORT, model Qwen3-Omni-30B-A3B-Captioner"
  other=$(free_port)
  PORT=$other run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: already running with other settings ($running): PORT is $PORT there, $other here; run ./stop_service.sh first to start with these"
  HOST=0.0.0.0 SERVED_MODEL_NAME=other run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: already running with other settings ($running): HOST is 127.0.0.1 there, 0.0.0.0 here; SERVED_MODEL_NAME is Qwen3-Omni-30B-A3B-Captioner there, other here; run ./stop_service.sh first to start with these"
  UNIX_SOCKET=$T/api.sock run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: already running with other settings ($running): UNIX_SOCKET is empty there, $T/api.sock here; run ./stop_service.sh first to start with these"
  # Nothing was launched or changed: the one server runs on, on its port.
  assert_equal "$(pid_field pid)" "$pid"
  assert_equal "$(grep -c '^=== ' "$T/logs/service.log")" 1
  run "$KIT/status_service.sh"
  assert_success
}

@test "two starts at the same moment give one server" {
  STUB_SLOW=2 "$KIT/start_service.sh" >"$T/a.out" 2>&1 3>&- &
  a=$!
  STUB_SLOW=2 "$KIT/start_service.sh" >"$T/b.out" 2>&1 3>&- &
  b=$!
  wait "$a"
  wait "$b"
  assert_equal "$(grep -c 'ready:' "$T/a.out" "$T/b.out" | awk -F: '{ s += $2 } END { print s }')" 1
  assert_equal "$(grep -c 'already running' "$T/a.out" "$T/b.out" | awk -F: '{ s += $2 } END { print s }')" 1
  assert_equal "$(grep -c '^=== ' "$T/logs/service.log")" 1
}

@test "a port held by a foreign listener fails fast, naming it, and the listener lives" {
  python3 -m http.server --bind 127.0.0.1 "$PORT" >/dev/null 2>&1 3>&- &
  holder=$!
  for _ in $(seq 50); do ss -Hltn "sport = :$PORT" | grep -q . && break; sleep 0.1; done
  run "$KIT/start_service.sh"
  kill -0 "$holder"
  kill "$holder"
  assert_failure 1
  assert_output "start_service: port $PORT is already in use by pid $holder (python3); choose another PORT or stop that process"
  [ ! -e "$T/args" ]
}

@test "a server that dies during start-up leaves no process and no PID file, and shows its log" {
  STUB_EXIT=3 run "$KIT/start_service.sh"
  assert_failure 1
  assert_output --partial "start_service: vLLM exited during start-up (see the log lines below)"
  assert_output --partial "stub: failing on purpose"
  [ ! -e "$T/logs/service.pid" ]
  assert_equal "$(stub_processes)" ""
}

@test "a server that never gets healthy is stopped at START_TIMEOUT, group and all" {
  rm "$T/stubroot/health"
  START_TIMEOUT=3 run "$KIT/start_service.sh"
  assert_failure 1
  assert_output --partial "start_service: no healthy server after 3s (START_TIMEOUT)"
  [ ! -e "$T/logs/service.pid" ]
  assert_equal "$(stub_processes)" ""
}

@test "a PID file naming an unrelated process is removed and that process is never signalled" {
  sleep 300 3>&- &
  victim=$!
  mkdir -p "$T/logs"
  printf 'pid=%s\npgid=%s\nstart_time=1\nlog_id=1:1\nport=%s\n' "$victim" "$victim" "$PORT" >"$T/logs/service.pid"
  run "$KIT/start_service.sh"
  assert_success
  assert_line --index 0 "start_service: removing stale PID file $T/logs/service.pid (pid $victim is not our server)"
  kill -0 "$victim"
  kill "$victim"
}

@test "log files are rotated at start and at most LOG_KEEP are kept" {
  mkdir -p "$T/logs"
  for i in 1 2 3; do
    echo "old $i" >"$T/logs/service.log"
    LOG_KEEP=2 "$KIT/start_service.sh" 2>/dev/null
    "$KIT/stop_service.sh" 2>/dev/null
  done
  [ -f "$T/logs/service.log.1" ]
  [ -f "$T/logs/service.log.2" ]
  [ ! -e "$T/logs/service.log.3" ]
}

@test "the log folder and service.log are closed to other accounts: 0750 and 0640, rotated copies too" {
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_success
  assert_equal "$(stat -c %a "$T/logs" "$T/logs/service.log")" $'750\n640'
  # Left open by an older kit: closed at the next start, and the logs it rotates stay closed.
  chmod 0755 "$T/logs"
  echo old >"$T/logs/service.log"
  echo older >"$T/logs/service.log.1"
  chmod 0644 "$T/logs/service.log" "$T/logs/service.log.1"
  run "$KIT/start_service.sh"
  assert_success
  refute_output --partial warning
  assert_equal "$(stat -c '%n %a' "$T/logs" "$T/logs"/service.log*)" "$T/logs 750
$T/logs/service.log 640
$T/logs/service.log.1 640
$T/logs/service.log.2 640"
  assert_equal "$(cat "$T/logs/service.log.1")" old
}

@test "a LOG_DIR holding other files (a home folder) is left open, with a warning; the service's files in it are closed" {
  mkdir -m 0755 "$T/home"
  echo mine >"$T/home/notes.txt" # ours, but not the service's: others may read this folder as before
  STUB_EXIT=0 LOG_DIR=$T/home run "$KIT/start_service.sh" --foreground
  assert_success
  assert_line "start_service: warning: LOG_DIR=$T/home is open to other accounts (mode 755, $T/home) and is shared, not ours or holds other files, so it is left as it is: give the service a folder of its own"
  assert_equal "$(stat -c %a "$T/home" "$T/home/service.log")" $'755\n640'
  # A folder holding only the service's files is the service's own: closed.
  mkdir -m 0755 "$T/old-logs"
  echo old >"$T/old-logs/service.log.1"
  STUB_EXIT=0 LOG_DIR=$T/old-logs run "$KIT/start_service.sh" --foreground
  assert_success
  refute_output --partial warning
  assert_equal "$(stat -c %a "$T/old-logs")" 750
}

@test "a shared LOG_DIR (like /tmp) is left as it is, with a warning; the service's log in it is closed" {
  mkdir -m 1777 "$T/shared"
  echo old >"$T/shared/service.log"
  chmod 0644 "$T/shared/service.log"
  STUB_EXIT=0 LOG_DIR=$T/shared run "$KIT/start_service.sh" --foreground
  assert_success
  assert_line "start_service: warning: LOG_DIR=$T/shared is open to other accounts (mode 1777, $T/shared) and is shared, not ours or holds other files, so it is left as it is: give the service a folder of its own"
  assert_equal "$(stat -c %a "$T/shared" "$T/shared/service.log")" $'1777\n640'
  ((EUID == 0)) || return 0
  # Ours and writable by us alone, but holding another account's file: shared too.
  mkdir -m 0755 "$T/team"
  touch "$T/team/notes"
  chown nobody "$T/team/notes"
  STUB_EXIT=0 LOG_DIR=$T/team run "$KIT/start_service.sh" --foreground
  assert_success
  assert_line --partial "start_service: warning: LOG_DIR=$T/team is open to other accounts (mode 755, "
  assert_equal "$(stat -c %a "$T/team" "$T/team/service.log")" $'755\n640'
}

@test "an unwritable log folder is refused before launching" {
  unprivileged_kit # root writes anywhere: as root (as in CI), the start runs as the user nobody
  mkdir "$T/ro"
  chmod 500 "$T/ro"
  LOG_DIR=$T/ro/logs run run_unprivileged "$UKIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: LOG_DIR=$T/ro/logs cannot be created ($T/ro/logs)"
}

@test "PID_FILE naming a folder is refused before anything starts, the folder untouched" {
  mkdir "$T/run"
  PID_FILE=$T/run run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: PID_FILE $T/run is not a regular file, not a PID file of this kit; left alone"
  [ ! -e "$T/args" ]
  assert_equal "$(ls -A "$T/run")" ""
}

@test "a vllm.py in the caller's folder is never imported, by the vLLM probe or by vLLM" {
  real=$(python3 -c 'import sys; print(sys.executable)')
  # -c (the probe) runs a real Python in the caller's folder; the launch goes to the stub.
  printf '#!/usr/bin/env bash\nif [[ $1 == -c ]]; then exec %q "$@"; fi\nexec %q "$@"\n' "$real" "$T/vllm-python" >"$T/probe-python"
  chmod +x "$T/probe-python"
  mkdir "$T/cwd"
  printf 'import pathlib\npathlib.Path("%s").touch()\n__version__ = "0.32.0"\n' "$T/planted-ran" >"$T/cwd/vllm.py"
  cd "$T/cwd"
  STUB_EXIT=0 VLLM_PYTHON=$T/probe-python run "$KIT/start_service.sh" --foreground
  [ ! -e "$T/planted-ran" ]
  # Whatever the probe found, vLLM itself starts with the caller's folder off its path too.
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_success
  grep -qx 'PYTHONSAFEPATH=1' "$T/env"
}

@test "EXTRA_VLLM_ARGS is split on spaces but never glob-expanded in the caller's folder" {
  mkdir "$T/cwd"
  touch "$T/cwd/a.json" "$T/cwd/b.json"
  cd "$T/cwd"
  STUB_EXIT=0 EXTRA_VLLM_ARGS='--hf-overrides * --seed 1' run "$KIT/start_service.sh" --foreground
  assert_success
  assert_equal "$(tail -n 4 "$T/args")" $'--hf-overrides\n*\n--seed\n1'
}

@test "a second start finds the running server's engine dead (/health 503): says so, exits 1" {
  "$KIT/start_service.sh" 2>/dev/null
  echo 503 >"$T/stubroot/health.status"
  run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: already running (pid $(pid_field pid), http://127.0.0.1:$PORT, model Qwen3-Omni-30B-A3B-Captioner) but its engine is dead (/health 503): run ./stop_service.sh then ./start_service.sh"
}

# interrupt_start SIGNAL...: start in the background with the default signal actions (a
# non-interactive shell starts background jobs with SIGINT ignored, and bash cannot trap what it
# was started ignoring), wait until vLLM is launched and recorded, send each SIGNAL (a second one
# half a second later lands in the clean-up), wait for the end; $status and $output as `run` sets.
interrupt_start() {
  STUB_SLOW=60 python3 -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$KIT/start_service.sh" >"$T/start.out" 2>&1 3>&- &
  local start=$! sig
  for _ in $(seq 100); do [[ -s $T/logs/service.pid ]] && break; sleep 0.1; done
  [[ -s $T/logs/service.pid ]]
  for sig in "$@"; do kill "-$sig" "$start"; sleep 0.5; done
  status=0
  wait "$start" || status=$?
  output=$(cat "$T/start.out")
  mapfile -t lines <<<"$output"
}

@test "Ctrl-C while waiting for health: exit 130, the server that was starting is gone, no PID file" {
  interrupt_start INT
  assert_equal "$status" 130
  assert_line "start_service: interrupted: stopping the server that was starting"
  assert_equal "$(stub_processes)" ""
  [ ! -e "$T/logs/service.pid" ]
}

@test "a second Ctrl-C during the clean-up does not cut it short; SIGTERM exits 143" {
  interrupt_start INT INT
  assert_equal "$status" 130
  assert_equal "$(stub_processes)" ""
  [ ! -e "$T/logs/service.pid" ]
  interrupt_start TERM
  assert_equal "$status" 143
  assert_equal "$(stub_processes)" ""
  [ ! -e "$T/logs/service.pid" ]
}

@test "a config file holding API_KEY that every account can read is named in a warning; closed, it is not" {
  echo "API_KEY=s3cret-key" >"$T/keyed.env"
  chmod 644 "$T/keyed.env"
  CAPTIONER_CONFIG=$T/keyed.env STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_line "start_service: warning: $T/keyed.env holds API_KEY and every account on this host can read it (mode 644): chmod o-r $T/keyed.env"
  refute_output --partial "s3cret-key"
  chmod 640 "$T/keyed.env"
  CAPTIONER_CONFIG=$T/keyed.env STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  refute_output --partial "every account on this host can read it"
}
