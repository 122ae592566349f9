#!/usr/bin/env bash
# status_service.sh — is the Captioner service running, healthy and busy?
#
# Usage: ./status_service.sh [--config FILE] [-h|--help]
#
# Prints pid, uptime, port, model, /health and the requests running and waiting (from /metrics).
# Exit codes (LSB): 0 running and healthy; 1 dead with a PID file left (API server gone, or its
# engine dead: /health 503), or not answering; 3 stopped.
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=status_service
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service_lib.sh"

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

main() {
  init_script "$@"

  if ! read_pid_file; then
    echo "stopped"
    exit 3
  fi
  local orphans
  if ! leader_is_ours; then
    orphans=$(service_pids | wc -l)
    echo "dead: API server pid $PF_PID is gone but $PID_FILE_ABS remains; $orphans orphaned process(es); run ./stop_service.sh"
    exit 1
  fi
  local health metrics up
  up=$(uptime_of "$PF_PID" || echo "?")
  health=$(http_status /health)
  echo "pid:      $PF_PID (group $PF_PGID)"
  echo "uptime:   ${up}s (since $PF_STARTED_AT)"
  echo "url:      $BASE_URL"
  echo "model:    $PF_MODEL"
  case $health in
    200) echo "health:   ok" ;;
    503) echo "health:   503 — the engine is dead; run ./stop_service.sh then ./start_service.sh"; exit 1 ;;
    000) echo "health:   not answering (starting, or hung)"; exit 1 ;;
    *) echo "health:   HTTP $health"; exit 1 ;;
  esac
  # /metrics needs the key when one is set; it goes to curl on stdin, not in argv (ps shows argv).
  metrics=$(printf '%s' "${API_KEY:+Authorization: Bearer $API_KEY}" | curl -s -m 5 -H @- "${CURL_SOCKET[@]}" "$HTTP_URL/metrics" 2>/dev/null || true)
  echo "requests: $(metric vllm:num_requests_running "$metrics") running, $(metric vllm:num_requests_waiting "$metrics") waiting"
  exit 0
}

main "$@"
