# shellcheck shell=bash
# shellcheck disable=SC2034 # variables set here are read by the scripts that source it
# service_lib.sh — functions shared by start_service.sh, stop_service.sh and status_service.sh.
# Sourced, never run. Every function prefixes its errors with the calling script's name.

KIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=${PROG:-$(basename "$0" .sh)}

# The Python that reads the configuration (captioner/config.py, standard library only): the kit's
# venv, else the system's. It is also the default VLLM_PYTHON.
if [[ -x $KIT_ROOT/.venv/bin/python ]]; then KIT_PYTHON=$KIT_ROOT/.venv/bin/python; else KIT_PYTHON=python3; fi
# Every Python the scripts run (config, the vLLM probe, vLLM and its workers, the warm-up) imports
# nothing from the caller's folder: a vllm.py or vllm/ there is never executed (Python >= 3.11;
# the kit's own packages come through PYTHONPATH).
export PYTHONSAFEPATH=1

say() { # progress, warnings and errors all go to stderr as "PROG: message"
  echo "$PROG: $*" >&2
}

die() { # die MESSAGE: one line, exit DIE_CODE (1; status_service.sh makes it LSB's 4, "unknown")
  say "$*"
  exit "${DIE_CODE:-1}"
}

usage() { # the calling script's header comment, up to `set -euo pipefail`
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# init_script "$@": the options every script takes (-h/--help, --config FILE), any other one to
# the script's own_option function where it has one (start_service's --foreground), then the
# configuration, loaded and validated: only the settings named in the script's USES array when it
# sets one (so a bad value elsewhere never blocks a stop or a status), else every setting.
init_script() {
  local config=""
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config) [[ $# -ge 2 ]] || die "--config needs a FILE"; config=$2; shift ;;
      *) { declare -F own_option >/dev/null && own_option "$1"; } || die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  debug_setup
  load_config "$config" "${USES[@]:-ALL}"
}

debug_setup() {
  if [[ -n ${CAPTIONER_DEBUG:-} ]]; then
    export PS4='+ ${BASH_SOURCE##*/}:${LINENO}: '
    set -x
  fi
}

# --- configuration ---------------------------------------------------------------------------

# load_config FILE [NAME...|ALL]: every setting of config.env.example, as its default < the config
# file < the environment, and what the scripts derive from them: NAME_ABS of each path,
# PID_FILE_ABS, LOCK_FILE, LOG_FILE, HEALTH_HOST, BASE_URL, HTTP_URL, CURL_SOCKET and GUARD_ENV
# (captioner/config.py, which parses files, never executes them). The settings named (ALL: every
# one) are validated first, each by its rule in config.env.example: the first bad one exits.
load_config() {
  local assignments
  command -v "$KIT_PYTHON" >/dev/null || die "python3 not found: the scripts need it to read config.env (install python3)"
  assignments=$("$KIT_PYTHON" "$KIT_ROOT/captioner/config.py" --shell --derived --prog "$PROG" \
    ${1:+--config "$1"} ${2:+--check "${@:2}"}) || exit "${DIE_CODE:-1}"
  eval "$assignments"
  VLLM_PYTHON=${VLLM_PYTHON:-$KIT_PYTHON}
}

# shared_dir DIR: is DIR other accounts' too, so never ours to chmod or chown? It is when others
# may make files in it (writable by all, or sticky, as /tmp) or it holds an entry of an account
# other than its owner (as /var/log does).
shared_dir() {
  local mode owner
  mode=$(stat -L -c %a "$1") owner=$(stat -L -c %u "$1")
  ((8#$mode & 01002)) && return 0
  [[ -n $(find -H "$1" -mindepth 1 -maxdepth 1 ! -uid "$owner" -print -quit 2>/dev/null) ]]
}

# services_own_dir DIR: may the service take DIR as its own (close it, give it to its user)? Not
# when it is shared (shared_dir); yes when it is the kit's logs/ or holds nothing but service.log*
# and service.pid* (a home folder, or another service's log folder, is not the service's).
services_own_dir() {
  ! shared_dir "$1" || return 1
  [[ $1 -ef $KIT_ROOT/logs ]] && return 0
  [[ -z $(find -H "$1" -mindepth 1 -maxdepth 1 ! -name 'service.log*' ! -name 'service.pid*' -print -quit 2>/dev/null) ]]
}

# foreground_holder: the pid of a live `start_service.sh --foreground` (systemd's unit) of this
# service, which names itself in LOCK_FILE (its pid and start time: the vLLM it becomes keeps
# both); 1 when there is none. Start, stop and status say so rather than load a second server or
# say "stopped" (there is no PID file then).
foreground_holder() {
  local pid start
  # shellcheck disable=SC2153 # LOCK_FILE is load_config's (captioner/config.py derives it)
  [[ -r $LOCK_FILE ]] || return 1
  read -r _ pid start <"$LOCK_FILE" 2>/dev/null || true
  pid=${pid#pid=} start=${start#start_time=}
  [[ $pid =~ ^[0-9]+$ && -d /proc/$pid && $(proc_stat_field "$pid" 22) == "$start" ]] || return 1
  echo "$pid"
}

# --- process identity --------------------------------------------------------------------------
# A PID file holds key=value lines: pid, pgid, start_time (clock ticks since boot, /proc/PID/stat
# field 22), log_id (device:inode of the log file the service writes to), started_at, and what the
# service serves (start_service.sh's write_pid_file): the running service's record, which status, stop
# and a second start read rather than today's configuration.
# The service is launched with setsid, so every process of it (API server, engine, workers, and
# the engine orphaned by a kill -9 of the API server) sits in session PID and writes its stdout to
# that log file. A process is ours only if both hold. The kernel never hands out a pid that is in
# use as a session id, so the session id cannot be taken over while any member lives; and the
# log inode rules out a later, unrelated session that happens to get the same number.
# (An id in the environment would not do: vLLM's setproctitle overwrites /proc/PID/environ.)

proc_stat_field() { # proc_stat_field PID N -> field N of /proc/PID/stat (N >= 3)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  local -a f
  read -r -a f <<<"$stat"
  printf '%s' "${f[$(($2 - 3))]}"
}

file_id() { # file_id PATH -> device:inode (follows links, so /proc/PID/fd/1 works)
  stat -L -c '%d:%i' "$1" 2>/dev/null
}

is_member() { # is_member PID: in our session, writing to our log, not a zombie
  local log_id
  [[ $(proc_stat_field "$1" 6) == "$PF_PID" ]] || return 1
  [[ $(proc_stat_field "$1" 3) != Z ]] || return 1
  # Another account's process: its fd 1 cannot be read, so it is not ours.
  log_id=$(file_id "/proc/$1/fd/1") || return 1
  [[ -n $log_id && $log_id == "$PF_LOG_ID" ]]
}

# Pids of every live process of the service recorded in the PID file (read_pid_file first).
service_pids() {
  [[ $PF_PID =~ ^[0-9]+$ && -n $PF_LOG_ID ]] || return 0
  local pid sid
  while read -r pid sid; do
    [[ $sid == "$PF_PID" ]] || continue
    is_member "$pid" && echo "$pid"
  done < <(ps -e -o pid= -o sid=)
  return 0
}

# read_pid_file: 1 when there is no PID file. One that is a link, not a regular file, not ours, or
# not in the form write_pid_file writes (a forged or mistyped PID_FILE) is refused: one line (die:
# exit 1, status 4), nothing signalled and nothing removed; so is a PID file this account cannot
# see (a folder closed to it: another account's service, whose start made LOG_DIR private). Else
# sets PF_PID PF_PGID PF_START PF_LOG_ID PF_STARTED_AT and PF_<KEY> of every key.
read_pid_file() {
  PF_PID='' PF_PGID='' PF_START='' PF_LOG_ID='' PF_STARTED_AT=''
  PF_PORT='' PF_BIND='' PF_HOST='' PF_SOCKET='' PF_URL='' PF_LOG='' PF_MODEL='' PF_SERVED_MODEL=''
  if [[ ! -e $PID_FILE_ABS && ! -L $PID_FILE_ABS ]]; then
    [[ $(LC_ALL=C stat -c %i -- "$PID_FILE_ABS" 2>&1) != *"Permission denied"* ]] ||
      die "PID_FILE $PID_FILE_ABS cannot be seen by this account (a folder on its path is closed to it): run this as the account that started the service"
    return 1
  fi
  [[ ! -L $PID_FILE_ABS ]] || die "PID_FILE $PID_FILE_ABS is a symbolic link, not a PID file of this kit; left alone"
  [[ -f $PID_FILE_ABS ]] || die "PID_FILE $PID_FILE_ABS is not a regular file, not a PID file of this kit; left alone"
  [[ -O $PID_FILE_ABS ]] ||
    die "PID_FILE $PID_FILE_ABS belongs to another account (uid $(stat -c %u "$PID_FILE_ABS")), not to this one (uid $EUID); left alone"
  local key value
  while IFS='=' read -r key value; do
    case $key in
      pid) PF_PID=$value ;;
      pgid) PF_PGID=$value ;;
      start_time) PF_START=$value ;;
      log_id) PF_LOG_ID=$value ;;
      started_at) PF_STARTED_AT=$value ;;
      port) PF_PORT=$value ;;
      bind) PF_BIND=$value ;;
      host) PF_HOST=$value ;;
      socket) PF_SOCKET=$value ;;
      url) PF_URL=$value ;;
      log) PF_LOG=$value ;;
      model) PF_MODEL=$value ;;
      served_model) PF_SERVED_MODEL=$value ;;
      *) PF_PID='' && break ;; # a line write_pid_file never writes
    esac
  done <"$PID_FILE_ABS"
  [[ $PF_PID =~ ^[0-9]+$ && $PF_PGID =~ ^[0-9]*$ && $PF_START =~ ^[0-9]*$ && $PF_LOG_ID =~ ^[0-9]+:[0-9]+$ ]] ||
    die "PID_FILE $PID_FILE_ABS is not a PID file of this kit; left alone"
}

# use_record: from here on, the service's address and log are the PID file's (read_pid_file
# first), whatever today's configuration says: its URL, and curl through its socket when it has
# one. A PID file written before they were recorded (no url= line) leaves today's in place.
use_record() {
  [[ -n $PF_URL ]] || return 0
  BASE_URL=$PF_URL HTTP_URL=$PF_URL CURL_SOCKET=() LOG_FILE=$PF_LOG
  [[ -z $PF_SOCKET ]] || HTTP_URL=http://localhost CURL_SOCKET=(--unix-socket "$PF_SOCKET")
}

# Is the PID file's leader (the API server) alive and really ours?
leader_is_ours() {
  [[ $PF_PID =~ ^[0-9]+$ && -d /proc/$PF_PID ]] || return 1
  [[ $(proc_stat_field "$PF_PID" 22) == "$PF_START" ]] || return 1
  is_member "$PF_PID"
}

# Signal every process of the service: the process group at once (atomic: catches children being
# forked; the group can only hold members of our session), then any member outside it.
signal_service() { # signal_service SIG
  local sig=$1 pid
  [[ -n $(service_pids) ]] || return 0
  kill "-$sig" -- "-$PF_PID" 2>/dev/null || true
  for pid in $(service_pids); do
    [[ $(proc_stat_field "$pid" 5) == "$PF_PID" ]] || kill "-$sig" "$pid" 2>/dev/null || true
  done
}

wait_service_gone() { # wait_service_gone SECONDS -> 0 when no process of the service is left
  local deadline=$((SECONDS + $1))
  while [[ -n $(service_pids) ]]; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# terminate_service [LEADER_ALIVE]: SIGTERM the API server alone first (vLLM drains in-flight
# requests for SHUTDOWN_DRAIN s and stops its engine), then SIGTERM, then SIGKILL, whatever is
# left of the service.
terminate_service() {
  if [[ -n ${1:-} ]]; then
    kill -TERM "$PF_PID" 2>/dev/null || true
    wait_service_gone "$STOP_TIMEOUT" && return 0
    say "still running after ${STOP_TIMEOUT}s (STOP_TIMEOUT); sending SIGTERM to the whole service"
  fi
  signal_service TERM
  wait_service_gone 10 && return 0
  say "sending SIGKILL to $(service_pids | wc -l) remaining process(es)"
  signal_service KILL
  wait_service_gone 10
}

# --- probes ----------------------------------------------------------------------------------

http_status() { # http_status PATH -> HTTP code, 000 when unreachable
  curl -s -o /dev/null -m "${2:-5}" -w '%{http_code}' "${CURL_SOCKET[@]}" "$HTTP_URL$1" 2>/dev/null || true
}
