#!/usr/bin/env bash
# status_service.sh — is the Captioner service running, healthy and busy?
#
# Usage: ./status_service.sh [--config FILE] [-h|--help]
#
# Prints pid, uptime, URL, model, log, /health and the requests running and waiting (from
# /metrics, which needs API_KEY when the service has one: without it they are "unknown"), and a
# memory line when the log holds PyTorch's allocator OOM warnings since this start. The
# address and log are the PID file's (found from PID_FILE, else LOG_DIR), not today's
# configuration's; only PID_FILE, LOG_DIR and API_KEY are checked, so a bad value elsewhere never
# blocks a status.
# Exit codes (LSB): 0 running and healthy; 1 dead with a PID file left (API server gone, or its
# engine dead: /health 503), or not answering; 3 stopped; 4 unknown: a bad option or setting, or a
# PID file refused (not this account's, not one this account can see, or not a PID file of this
# kit: nothing is asked of its address).
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=status_service
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service_lib.sh"
USES=(LOG_DIR PID_FILE API_KEY)
DIE_CODE=4 # LSB: the status is unknown

metric() { # metric NAME METRICS_TEXT -> summed value, as an integer
  awk -v n="$1" '$1 ~ "^"n"({|$)" { s += $NF } END { printf "%d", s }' <<<"$2"
}

uptime_of() { # seconds since the process started
  local ticks hz boot
  ticks=$(proc_stat_field "$1" 22) || return 1
  hz=$(getconf CLK_TCK)
  boot=$(awk '{ print int($1) }' /proc/uptime)
  echo $((boot - ticks / hz))
}

requests_line() { # "N running, M waiting" from /metrics, or why they are unknown
  local metrics code
  # /metrics needs the key when one is set; it goes to curl on stdin, not in argv (ps shows argv).
  metrics=$(printf '%s' "${API_KEY:+Authorization: Bearer $API_KEY}" |
    curl -s -m 5 -H @- -w '\n%{http_code}' "${CURL_SOCKET[@]}" "$HTTP_URL/metrics" 2>/dev/null || true)
  code=${metrics##*$'\n'}
  case $code in
    200) echo "$(metric vllm:num_requests_running "$metrics") running, $(metric vllm:num_requests_waiting "$metrics") waiting" ;;
    401) if [[ -z $API_KEY ]]; then
      echo "unknown (the API key is required to read /metrics)"
    else
      echo "unknown (/metrics refused the API key given: give status the service's API_KEY)"
    fi ;;
    *) echo "unknown (/metrics answered HTTP ${code:-000})" ;;
  esac
}

# PyTorch's own warning, whole line: "[rank0]:[W1207 09:28:28.17 CUDACachingAllocator.cpp:3933] memory
# allocation failed with OOM on device 0 ...". Anchored, so text a request gets into the log
# mid-line never counts.
OOM_WARNING='^(\[rank[0-9]+\]:)?\[W[0-9]{4} [0-9:.]+ CUDACachingAllocator\.cpp:[0-9]+\] memory allocation failed with OOM'

memory_line() { # the allocator's OOM warnings in this start's log, if any
  local n
  n=$(grep -cE "$OOM_WARNING" "$LOG_FILE" 2>/dev/null) || return 0
  echo "memory:   $n GPU allocation(s) failed with OOM since the start: the margin is thin; set GPU_MEMORY_UTIL=0.93 and restart"
}

main() {
  init_script "$@"

  if ! read_pid_file; then
    local holder
    if holder=$(foreground_holder); then
      die "not started by these scripts: pid $holder runs this service in the foreground (systemd's unit?): systemctl status"
    fi
    echo "stopped"
    exit 3
  fi
  use_record
  local orphans
  if ! leader_is_ours; then
    orphans=$(service_pids | wc -l)
    echo "dead: API server pid $PF_PID is gone but $PID_FILE_ABS remains; $orphans orphaned process(es); run ./stop_service.sh"
    exit 1
  fi
  local health up
  up=$(uptime_of "$PF_PID" || echo "?")
  health=$(http_status /health)
  echo "pid:      $PF_PID (group $PF_PGID)"
  echo "uptime:   ${up}s (since $PF_STARTED_AT)"
  echo "url:      $BASE_URL"
  echo "model:    ${PF_SERVED_MODEL:+$PF_SERVED_MODEL (}$PF_MODEL${PF_SERVED_MODEL:+)}"
  echo "log:      $LOG_FILE"
  case $health in
    200) echo "health:   ok" ;;
    503) echo "health:   503 — the engine is dead; run ./stop_service.sh then ./start_service.sh"; exit 1 ;;
    000) echo "health:   not answering (starting, or hung)"; exit 1 ;;
    *) echo "health:   HTTP $health"; exit 1 ;;
  esac
  echo "requests: $(requests_line)"
  memory_line
  exit 0
}

main "$@"
