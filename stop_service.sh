#!/usr/bin/env bash
# stop_service.sh — stop the Captioner service that start_service.sh started, and only that.
#
# Usage: ./stop_service.sh [--config FILE] [-h|--help]
#
# Reads the PID file (found from PID_FILE, else LOG_DIR: the running service's record, whatever
# today's other settings say) and checks it against /proc (start time, session, log file) before
# signalling anything: SIGTERM to the API server (vLLM drains in-flight
# requests for SHUTDOWN_DRAIN s), after STOP_TIMEOUT SIGTERM and 10 s later SIGKILL to every process
# of the service, the orphaned engine of a killed API server included, until none is left.
# A stale PID file, or one whose pid now belongs to another process, is reported and removed
# without signalling. A PID_FILE that is not this account's, or not a PID file of this kit (a
# link, a folder, any other file), is refused and left alone (exit 1), nothing signalled; so is
# one this account cannot see (another account's service: its LOG_DIR is closed to others).
# Never kills by name: the video service on this host has the same names.
# Checks only the settings it uses (PID_FILE, LOG_DIR, STOP_TIMEOUT, SHUTDOWN_DRAIN): a bad value
# elsewhere in the configuration never blocks a stop.
#
# Exit codes: 0 stopped (or nothing was running), 1 bad config, a PID file refused, or processes
# that would not die.
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=stop_service
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service_lib.sh"
USES=(LOG_DIR PID_FILE SHUTDOWN_DRAIN STOP_TIMEOUT)

main() {
  init_script "$@"

  if ! read_pid_file; then
    local holder
    if holder=$(foreground_holder); then
      die "not started by these scripts: pid $holder runs this service in the foreground (systemd's unit?): systemctl stop it"
    fi
    say "not running (no PID file at $PID_FILE_ABS)"
    exit 0
  fi
  local leader="" members
  use_record
  if leader_is_ours; then leader=$PF_PID; fi
  members=$(service_pids)
  if [[ -z $members ]]; then
    if [[ -d /proc/$PF_PID ]]; then
      say "stale PID file: pid $PF_PID now belongs to another process ($(cat "/proc/$PF_PID/comm" 2>/dev/null)); not signalling it; removed $PID_FILE_ABS"
    else
      say "stale PID file: pid $PF_PID is gone; removed $PID_FILE_ABS"
    fi
    rm -f "$PID_FILE_ABS"
    exit 0
  fi
  if [[ -n $leader ]]; then
    say "stopping pid $leader ($BASE_URL; draining up to ${SHUTDOWN_DRAIN}s)"
  else
    say "API server pid $PF_PID is gone; stopping $(wc -w <<<"$members") orphaned process(es) of the service"
  fi
  if ! terminate_service "$leader"; then
    die "processes still alive after SIGKILL: $(service_pids | tr '\n' ' ')"
  fi
  rm -f "$PID_FILE_ABS"
  say "stopped"
}

main "$@"
