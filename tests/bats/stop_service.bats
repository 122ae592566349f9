#!/usr/bin/env bats
# stop_service.sh and status_service.sh: only what we started, every process of it, LSB codes.

load test_helper

setup() { common_setup; }
teardown() { common_teardown; }

@test "nothing running: stop says so and exits 0, status exits 3" {
  run "$KIT/stop_service.sh"
  assert_success
  assert_output "stop_service: not running (no PID file at $T/logs/service.pid)"
  run "$KIT/status_service.sh"
  assert_failure 3
}

@test "a PID file whose pid is now an unrelated sleep: reported, removed, the sleep untouched" {
  sleep 300 3>&- &
  victim=$!
  mkdir -p "$T/logs"
  printf 'pid=%s\npgid=%s\nstart_time=%s\nlog_id=1:1\n' "$victim" "$victim" "$(awk '{print $22}' /proc/$victim/stat)" >"$T/logs/service.pid"
  run "$KIT/status_service.sh"
  assert_failure 1
  run "$KIT/stop_service.sh"
  assert_success
  assert_output "stop_service: stale PID file: pid $victim now belongs to another process (sleep); not signalling it; removed $T/logs/service.pid"
  [ ! -e "$T/logs/service.pid" ]
  kill -0 "$victim"
  kill "$victim"
}

@test "a PID file whose pid is gone is removed" {
  mkdir -p "$T/logs"
  printf 'pid=999999\npgid=999999\nstart_time=1\nlog_id=1:1\n' >"$T/logs/service.pid"
  run "$KIT/stop_service.sh"
  assert_success
  assert_output "stop_service: stale PID file: pid 999999 is gone; removed $T/logs/service.pid"
}

@test "kill -9 of the API server: status 1, stop ends the orphaned engine, the next start works" {
  "$KIT/start_service.sh" 2>/dev/null
  pid=$(pid_field pid)
  kill -9 "$pid"
  for _ in $(seq 50); do [ -d /proc/$pid ] || break; sleep 0.1; done
  assert_not_equal "$(session_of "$pid")" ""
  run "$KIT/status_service.sh"
  assert_failure 1
  assert_output "dead: API server pid $pid is gone but $T/logs/service.pid remains; 1 orphaned process(es); run ./stop_service.sh"
  run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: a previous server's processes are still running (API server gone): run ./stop_service.sh first"
  run "$KIT/stop_service.sh"
  assert_success
  assert_line --index 0 "stop_service: API server pid $pid is gone; stopping 1 orphaned process(es) of the service"
  assert_equal "$(session_of "$pid")" ""
  run "$KIT/start_service.sh"
  assert_success
}

@test "a server that ignores SIGTERM is killed after STOP_TIMEOUT" {
  "$KIT/start_service.sh" 2>/dev/null
  pid=$(pid_field pid)
  # Make the leader deaf to SIGTERM: stop must escalate to SIGKILL.
  kill -STOP "$pid"
  STOP_TIMEOUT=2 run "$KIT/stop_service.sh"
  assert_success
  assert_output --partial "sending SIGKILL"
  assert_equal "$(session_of "$pid")" ""
}

@test "status shows pid, url, health and the request counters" {
  "$KIT/start_service.sh" 2>/dev/null
  echo 'vllm:num_requests_running{model_name="m"} 2.0' >"$T/stubroot/metrics"
  echo 'vllm:num_requests_waiting{model_name="m"} 5.0' >>"$T/stubroot/metrics"
  run "$KIT/status_service.sh"
  assert_success
  assert_line --index 0 "pid:      $(pid_field pid) (group $(pid_field pid))"
  assert_output --partial "url:      http://127.0.0.1:$PORT"
  assert_output --partial "requests: 2 running, 5 waiting"
}

@test "status counts PyTorch's allocator OOM warnings in the log, not the same words a request put mid-line" {
  "$KIT/start_service.sh" 2>/dev/null
  run "$KIT/status_service.sh"
  refute_line --partial "memory:"
  log=$(pid_field log)
  warning='[W1207 09:28:28.173750100 CUDACachingAllocator.cpp:3933] memory allocation failed with OOM on device 0 while trying to allocate 1272971264 bytes'
  echo "[rank0]:$warning" >>"$log"
  echo "$warning" >>"$log"
  echo "INFO:     127.0.0.1 - \"GET /[rank0]:$warning HTTP/1.1\" 404" >>"$log"
  run "$KIT/status_service.sh"
  assert_success
  assert_line --index -1 "memory:   2 GPU allocation(s) failed with OOM since the start: the margin is thin; set GPU_MEMORY_UTIL=0.93 and restart"
}

@test "status: a live server whose engine died (/health 503) is reported dead" {
  "$KIT/start_service.sh" 2>/dev/null
  echo 503 >"$T/stubroot/health.status"
  run "$KIT/status_service.sh"
  assert_failure 1
  assert_line --index 0 "pid:      $(pid_field pid) (group $(pid_field pid))"
  assert_line --index -1 "health:   503 — the engine is dead; run ./stop_service.sh then ./start_service.sh"
}

@test "status: any other /health answer (404) is printed as is and exits 1" {
  "$KIT/start_service.sh" 2>/dev/null
  rm "$T/stubroot/health"
  run "$KIT/status_service.sh"
  assert_failure 1
  assert_line --index -1 "health:   HTTP 404"
}

@test "status and stop read the PID file, not today's port, host or log folder" {
  mkdir -p "$T/run"
  PID_FILE=$T/run/service.pid "$KIT/start_service.sh" 2>/dev/null
  pid=$(sed -n 's/^pid=//p' "$T/run/service.pid")
  port=$PORT
  # The PID file is found as before (PID_FILE); everything else differs from the start's.
  export PID_FILE=$T/run/service.pid PORT=8003 HOST=localhost LOG_DIR=$T/elsewhere
  run "$KIT/status_service.sh"
  assert_success
  assert_line "url:      http://127.0.0.1:$port"
  assert_line "log:      $T/logs/service.log"
  assert_line "health:   ok"
  run "$KIT/stop_service.sh"
  assert_success
  assert_line --index 0 "stop_service: stopping pid $pid (http://127.0.0.1:$port; draining up to 1s)"
  assert_equal "$(session_of "$pid")" ""
}

@test "a bad value of a setting they do not use blocks neither stop nor status; start still refuses it" {
  "$KIT/start_service.sh" 2>/dev/null
  pid=$(pid_field pid)
  TEMPERATURE=abc run "$KIT/start_service.sh"
  assert_failure 1
  assert_output 'start_service: TEMPERATURE="abc" is invalid: a number from 0 to 2'
  export TEMPERATURE=abc PORT=abc MODEL_PATH=
  run "$KIT/status_service.sh"
  assert_success
  assert_line "health:   ok"
  # What stop uses is still checked.
  STOP_TIMEOUT=1 run "$KIT/stop_service.sh"
  assert_failure 1
  assert_output 'stop_service: STOP_TIMEOUT="1" is invalid: must exceed SHUTDOWN_DRAIN (1 s), or in-flight requests are killed mid-drain'
  API_KEY='a b' run "$KIT/status_service.sh"
  assert_failure 4
  assert_output 'status_service: API_KEY="a b" is invalid: printable characters without spaces'
  # Nor a config file's mistakes in lines they do not use: a comment after a value, a misspelt
  # name, a ~ in a path. In a line they use, the same mistake is refused.
  printf 'TEMPERATURE=0.7 # warmer\nTEMPRATURE=0.7\nMODEL_PATH=~/models/x\n' >"$T/typos.env"
  CAPTIONER_CONFIG=$T/typos.env run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "start_service: $T/typos.env:1: TEMPERATURE: a comment after the value would be part of it: put it on a line of its own (the file is read, not run by a shell)"
  CAPTIONER_CONFIG=$T/typos.env run "$KIT/status_service.sh"
  assert_success
  printf 'STOP_TIMEOUT=30 # longer\n' >>"$T/typos.env"
  CAPTIONER_CONFIG=$T/typos.env run "$KIT/stop_service.sh"
  assert_failure 1
  assert_output --partial "stop_service: $T/typos.env:4: STOP_TIMEOUT: a comment after the value"
  sed -i '$d' "$T/typos.env"
  CAPTIONER_CONFIG=$T/typos.env run "$KIT/stop_service.sh"
  assert_success
  assert_line --index -1 "stop_service: stopped"
  assert_equal "$(session_of "$pid")" ""
}

@test "status without the key the service requires: requests unknown, exit 0 all the same" {
  "$KIT/start_service.sh" 2>/dev/null
  echo 401 >"$T/stubroot/metrics.status" # what the guard answers without the key
  run "$KIT/status_service.sh"
  assert_success
  assert_line "health:   ok"
  assert_line --index -1 "requests: unknown (the API key is required to read /metrics)"
  API_KEY=wrong-key run "$KIT/status_service.sh"
  assert_success
  assert_line --index -1 "requests: unknown (/metrics refused the API key given: give status the service's API_KEY)"
  echo 500 >"$T/stubroot/metrics.status"
  run "$KIT/status_service.sh"
  assert_success
  assert_line --index -1 "requests: unknown (/metrics answered HTTP 500)"
}

@test "a PID file of another account is refused by stop, status and start: nothing signalled, nothing removed" {
  ((EUID == 0)) || skip "needs root to give the PID file to the user nobody"
  mkdir -p "$T/logs"
  # What a forger writes: the decoy's pid, and a log_id that matches any process whose fd 1 we cannot read.
  printf 'pid=%s\npgid=%s\nstart_time=%s\nlog_id=1:1\nurl=http://127.0.0.1:8002\n' "$DECOY" "$DECOY" "$(awk '{print $22}' /proc/$DECOY/stat)" >"$T/logs/service.pid"
  chown nobody "$T/logs/service.pid"
  refused="PID_FILE $T/logs/service.pid belongs to another account (uid $(id -u nobody)), not to this one (uid 0); left alone"
  run "$KIT/stop_service.sh"
  assert_failure 1
  assert_output "stop_service: $refused"
  API_KEY=s3cret-key run "$KIT/status_service.sh"
  assert_failure 4
  assert_output "status_service: $refused"
  run "$KIT/start_service.sh" # after a warning: the folder holds another account's file
  assert_failure 1
  assert_line --index -1 "start_service: $refused"
  [ -f "$T/logs/service.pid" ]
  [ ! -e "$T/args" ]
  kill -0 "$DECOY"
  rm "$T/logs/service.pid"
}

@test "another account's running service: its status and stop cannot see it and say so (4, 1), nothing touched" {
  ((EUID == 0)) || skip "needs root to run the scripts as the user nobody"
  unprivileged_kit
  "$KIT/start_service.sh" 2>/dev/null # its LOG_DIR, made by this start, is closed to other accounts
  pid=$(pid_field pid)
  unseen="PID_FILE $T/logs/service.pid cannot be seen by this account (a folder on its path is closed to it): run this as the account that started the service"
  run run_unprivileged "$UKIT/status_service.sh"
  assert_failure 4
  assert_output "status_service: $unseen"
  run run_unprivileged "$UKIT/stop_service.sh"
  assert_failure 1
  assert_output "stop_service: $unseen"
  kill -0 "$pid"
  "$KIT/stop_service.sh" 2>/dev/null
  assert_equal "$(session_of "$pid")" ""
}

@test "a service in the foreground (systemd's unit): a manual start, status and stop say so at once, touching nothing" {
  # In a session of its own, as under systemd, so that the whole of it can be stopped at the end;
  # fd 3 closed, or bats would wait for the stub's engine.
  setsid "$KIT/start_service.sh" --foreground >"$T/foreground.log" 2>&1 3>&- &
  fg=$!
  for _ in $(seq 100); do grep -q "^foreground pid=$fg " "$T/logs/service.pid.lock" 2>/dev/null && break; sleep 0.1; done
  seen="pid $fg runs this service in the foreground (systemd's unit?)"
  SECONDS=0
  run "$KIT/start_service.sh" # it waited for the lock until START_TIMEOUT, then loaded a second server
  assert_failure 1
  assert_output "start_service: this service runs in the foreground as pid $fg (systemd's unit?): manage it with systemctl, or stop that one first"
  ((SECONDS < 10))
  run "$KIT/status_service.sh" # it said "stopped"
  assert_failure 4
  assert_output "status_service: not started by these scripts: $seen: systemctl status"
  run "$KIT/stop_service.sh" # it said "not running"
  assert_failure 1
  assert_output "stop_service: not started by these scripts: $seen: systemctl stop it"
  kill -0 "$fg"
  [ ! -e "$T/logs/service.pid" ]
  # Nor does a second foreground start load the model beside it.
  run "$KIT/start_service.sh" --foreground
  assert_failure 1
  assert_output "start_service: this service already runs in the foreground as pid $fg: stop that one first"
  kill -TERM -- "-$fg" # systemd's KillMode=control-group: every process of the unit
  wait "$fg" || true
  for _ in $(seq 50); do [[ -z $(session_of "$fg") ]] && break; sleep 0.1; done
  assert_equal "$(session_of "$fg")" ""
  # Gone, it is stopped again, and a manual start works; then a foreground start beside it is refused.
  run "$KIT/status_service.sh"
  assert_failure 3
  run "$KIT/start_service.sh"
  assert_success
  run "$KIT/start_service.sh" --foreground
  assert_failure 1
  assert_output --partial "start_service: already running as pid $(pid_field pid) (started by start_service.sh): run ./stop_service.sh first"
  run "$KIT/stop_service.sh"
  assert_success
}

@test "a PID file whose log_id is empty or not device:inode is refused, its pid never signalled" {
  mkdir -p "$T/logs"
  for log_id in "" "x" "1:1 2"; do
    printf 'pid=%s\npgid=%s\nstart_time=1\nlog_id=%s\n' "$DECOY" "$DECOY" "$log_id" >"$T/logs/service.pid"
    run "$KIT/stop_service.sh"
    assert_failure 1
    assert_output "stop_service: PID_FILE $T/logs/service.pid is not a PID file of this kit; left alone"
    run "$KIT/status_service.sh"
    assert_failure 4
    assert_output "status_service: PID_FILE $T/logs/service.pid is not a PID file of this kit; left alone"
    [ -f "$T/logs/service.pid" ]
  done
  kill -0 "$DECOY"
  rm "$T/logs/service.pid"
}

@test "PID_FILE naming any other file is left alone: stop says so and exits 1" {
  printf 'meeting at 10\npid=1\n' >"$T/notes.txt"
  PID_FILE=$T/notes.txt run "$KIT/stop_service.sh"
  assert_failure 1
  assert_output "stop_service: PID_FILE $T/notes.txt is not a PID file of this kit; left alone"
  assert_equal "$(cat "$T/notes.txt")" $'meeting at 10\npid=1'
}

@test "a PID file that is a symbolic link is refused and left alone, its target too" {
  mkdir -p "$T/logs"
  printf 'pid=999999\npgid=999999\nstart_time=1\nlog_id=1:1\n' >"$T/real.pid"
  ln -s "$T/real.pid" "$T/logs/service.pid"
  run "$KIT/stop_service.sh"
  assert_failure 1
  assert_output "stop_service: PID_FILE $T/logs/service.pid is a symbolic link, not a PID file of this kit; left alone"
  [ -L "$T/logs/service.pid" ]
  [ -f "$T/real.pid" ]
  rm "$T/logs/service.pid"
}
