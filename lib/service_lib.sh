# shellcheck shell=bash
# shellcheck disable=SC2034 # variables set here are read by the scripts that source it
# service_lib.sh — functions shared by start_service.sh, stop_service.sh and status_service.sh.
# Sourced, never run. Every function prefixes its errors with the calling script's name.

KIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=${PROG:-$(basename "$0" .sh)}

# The Python that reads the configuration (captioner/config.py, standard library only): the kit's
# venv, else the system's. It is also the default VLLM_PYTHON.
if [[ -x $KIT_ROOT/.venv/bin/python ]]; then KIT_PYTHON=$KIT_ROOT/.venv/bin/python; else KIT_PYTHON=python3; fi
# vLLM's only allowed media host: vLLM fetches nothing (the request guard fetches what the operator
# allows), and it treats an empty allow-list as "allow every host", so it gets one host that can
# never resolve (.invalid is reserved, RFC 2606).
NO_REMOTE_MEDIA_HOST=no-remote-media.invalid
# Largest request head (request line + headers) the HTTP parser buffers; uvicorn answers 400 past
# it. Must match MAX_HEADER_BYTES in lib/http_limits.py (tests/test_security.py checks that it does).
MAX_HEADER_BYTES=65536
# The oldest vLLM without the engine crashes that one ordinary audio request reached in 0.26
# (out-of-vocabulary stop_token_ids, the multimodal cache desync after a rejected request, a forged
# WAV sample rate, remote media read whole before the size caps: all fixed by 0.29).
MIN_VLLM_VERSION=0.29.0

say() { # progress, warnings and errors all go to stderr as "PROG: message"
  echo "$PROG: $*" >&2
}

die() {
  say "$*"
  exit 1
}

usage() { # the calling script's header comment, up to `set -euo pipefail`
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# init_script "$@": the options every script takes (-h/--help, --config FILE; --foreground for
# start_service), then the configuration, loaded and validated: only the settings named in the
# script's USES array when it sets one (so a bad value elsewhere never blocks a stop or a status),
# else every setting. Sets FOREGROUND.
init_script() {
  local config=""
  FOREGROUND=""
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config) [[ $# -ge 2 ]] || die "--config needs a FILE"; config=$2; shift ;;
      --foreground) [[ $PROG == start_service ]] || die "unknown option '$1' (see --help)"; FOREGROUND=1 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  debug_setup
  load_config "$config"
  validate_config ${USES[@]+"${USES[@]}"}
}

debug_setup() {
  if [[ -n ${CAPTIONER_DEBUG:-} ]]; then
    export PS4='+ ${BASH_SOURCE##*/}:${LINENO}: '
    set -x
  fi
}

# --- configuration ---------------------------------------------------------------------------

# load_config [FILE]: every setting of config.env.example, as its default < the config file <
# the environment (captioner/config.py; files are parsed, never executed).
load_config() {
  local assignments
  command -v "$KIT_PYTHON" >/dev/null || die "python3 not found: the scripts need it to read config.env (install python3)"
  assignments=$("$KIT_PYTHON" "$KIT_ROOT/captioner/config.py" --shell --prog "$PROG" ${1:+--config "$1"}) || exit 1
  eval "$assignments"
  derive_config
}

schema_names() { # every setting's name, in config.env.example's order
  sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$KIT_ROOT/config.env.example"
}

abs_path() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s' "$KIT_ROOT/$1" ;;
  esac
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

derive_config() {
  MODEL_DIR=$(abs_path "$MODEL_PATH")
  LOG_DIR_ABS=$(abs_path "$LOG_DIR")
  PID_FILE_ABS=$(abs_path "${PID_FILE:-$LOG_DIR/service.pid}")
  LOCK_FILE="$PID_FILE_ABS.lock"
  LOG_FILE="$LOG_DIR_ABS/service.log"
  VLLM_PYTHON=${VLLM_PYTHON:-$KIT_PYTHON}
  # Clients on this host use 127.0.0.1 whatever address the server binds.
  case $HOST in
    0.0.0.0 | 127.0.0.1 | localhost | "") HEALTH_HOST=127.0.0.1 ;;
    :: | ::1) HEALTH_HOST='[::1]' ;;
    *:*) HEALTH_HOST="[$HOST]" ;;
    *) HEALTH_HOST=$HOST ;;
  esac
  UNIX_SOCKET_ABS=""
  [[ -z $UNIX_SOCKET ]] || UNIX_SOCKET_ABS=$(abs_path "$UNIX_SOCKET")
  set_address "$HEALTH_HOST" "$PORT" "$UNIX_SOCKET_ABS"
}

# set_address HEALTH_HOST PORT SOCKET: where the scripts reach the server. Sets BASE_URL (what they
# print), HTTP_URL and CURL_SOCKET (what curl gets). With a socket the server listens on that
# socket alone (no TCP port), and curl goes through it.
set_address() {
  BASE_URL="http://$1:$2" HTTP_URL="http://$1:$2" CURL_SOCKET=()
  if [[ -n $3 ]]; then
    BASE_URL="unix:$3" HTTP_URL=http://localhost CURL_SOCKET=(--unix-socket "$3")
  fi
}

# --- validation: every value, before anything is launched -------------------------------------

bad() { # bad VAR "what is allowed"
  die "$1=\"${!1}\" is invalid: $2"
}

check_int() { # check_int VAR MIN [MAX]
  local v=${!1} rule="expected an integer >= $2"
  [[ -z ${3:-} ]] || rule="expected an integer from $2 to $3"
  [[ $v =~ ^[0-9]+$ ]] || bad "$1" "$rule"
  ((10#$v >= $2)) || bad "$1" "$rule"
  [[ -z ${3:-} ]] || ((10#$v <= $3)) || bad "$1" "$rule"
}

check_float() { # check_float VAR "rule" AWK_CONDITION (x is the value)
  local v=${!1}
  [[ $v =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || bad "$1" "$2"
  awk -v x="$v" "BEGIN { exit !($3) }" || bad "$1" "$2"
}

check_enum() { # check_enum VAR choice...
  local var=$1 c
  shift
  for c in "$@"; do [[ ${!var} == "$c" ]] && return 0; done
  bad "$var" "expected one of: $*"
}

# validate_config [NAME...]: the rules of the settings named, by default of every setting of the
# schema, in its order. One rule per setting, first failure exits. A rule that reads another
# setting (MAX_TOKENS reads MAX_MODEL_LEN, STOP_TIMEOUT reads SHUTDOWN_DRAIN) comes after that
# one's: a script that names it names the other too, first.
validate_config() {
  local name
  local -a names=("$@")
  (($#)) || mapfile -t names < <(schema_names)
  for name in "${names[@]}"; do
    case $name in
      MODEL_PATH) [[ -n $MODEL_PATH ]] || bad MODEL_PATH "must name the model folder (run 'make model' to download it)" ;;
      SERVED_MODEL_NAME) [[ $SERVED_MODEL_NAME =~ ^[A-Za-z0-9._/:-]+$ ]] || bad SERVED_MODEL_NAME "letters, digits and . _ / : - only" ;;
      LOAD_FORMAT) check_enum LOAD_FORMAT auto safetensors pt dummy ;;
      HOST) [[ $HOST =~ ^[A-Za-z0-9.:-]+$ ]] || bad HOST "an IP address or host name, e.g. 127.0.0.1" ;;
      PORT) check_int PORT 1 65535 ;;
      API_KEY) [[ $API_KEY =~ ^[[:graph:]]*$ ]] || bad API_KEY "printable characters without spaces" ;;
      DEVICE) check_enum DEVICE cuda cpu ;;
      DTYPE) check_enum DTYPE bfloat16 float16 float32 auto ;;
      TENSOR_PARALLEL_SIZE) check_int TENSOR_PARALLEL_SIZE 1 64 ;;
      DATA_PARALLEL_SIZE) check_int DATA_PARALLEL_SIZE 1 64 ;;
      GPU_MEMORY_UTIL) check_float GPU_MEMORY_UTIL "a fraction, 0 < x <= 1" "x > 0 && x <= 1" ;;
      QUANTIZATION) [[ -z $QUANTIZATION ]] || check_enum QUANTIZATION fp8 ;;
      MOE_CONFIG_DIR) [[ -z $MOE_CONFIG_DIR || -d $(abs_path "$MOE_CONFIG_DIR") ]] || bad MOE_CONFIG_DIR "no such folder ($(abs_path "$MOE_CONFIG_DIR")): name the folder bench/tune_moe.py wrote, or leave it empty" ;;
      CPU_KVCACHE_GB) check_int CPU_KVCACHE_GB 1 ;;
      MAX_MODEL_LEN) check_int MAX_MODEL_LEN 16 ;;
      MAX_NUM_SEQS) check_int MAX_NUM_SEQS 1 4096 ;;
      MAX_NUM_BATCHED_TOKENS) [[ -z $MAX_NUM_BATCHED_TOKENS ]] || check_int MAX_NUM_BATCHED_TOKENS 16 ;;
      API_SERVER_COUNT) check_int API_SERVER_COUNT 1 64 ;;
      TEMPERATURE) check_float TEMPERATURE "a number from 0 to 2" "x >= 0 && x <= 2" ;;
      TOP_P) check_float TOP_P "a fraction, 0 < x <= 1" "x > 0 && x <= 1" ;;
      TOP_K) [[ $TOP_K == -1 ]] || check_int TOP_K 1 ;;
      MAX_TOKENS)
        check_int MAX_TOKENS 1
        ((10#$MAX_TOKENS < 10#$MAX_MODEL_LEN)) || bad MAX_TOKENS "must be below MAX_MODEL_LEN ($MAX_MODEL_LEN): the prompt needs room"
        ;;
      ALLOWED_MEDIA_DOMAINS) [[ $ALLOWED_MEDIA_DOMAINS =~ ^[A-Za-z0-9.,\ -]*$ ]] || bad ALLOWED_MEDIA_DOMAINS "host names separated by commas, e.g. media.example.com,cdn.example.com" ;;
      MAX_AUDIO_SECONDS) check_int MAX_AUDIO_SECONDS 1 ;;
      MAX_AUDIO_BYTES) check_int MAX_AUDIO_BYTES 1024 ;;
      MAX_REQUEST_BYTES) check_int MAX_REQUEST_BYTES 1024 ;;
      ALLOWED_HOSTS) [[ $ALLOWED_HOSTS =~ ^[A-Za-z0-9.,\ -]*$ ]] || bad ALLOWED_HOSTS "host names separated by commas, e.g. gpu-host.example.com" ;;
      EXTRA_ROUTES)
        [[ $EXTRA_ROUTES == all || $EXTRA_ROUTES =~ ^(/[A-Za-z0-9/_.-]*)?([,\ ]+/[A-Za-z0-9/_.-]*)*$ ]] ||
          bad EXTRA_ROUTES "all, or paths separated by commas, e.g. /tokenize,/v1/completions"
        ;;
      REQUEST_TIMEOUT) check_int REQUEST_TIMEOUT 1 3600 ;;
      UNIX_SOCKET)
        [[ -z $UNIX_SOCKET || ($UNIX_SOCKET =~ ^[A-Za-z0-9/_.-]+$ && ${#UNIX_SOCKET_ABS} -lt 100) ]] ||
          bad UNIX_SOCKET "a socket path of letters, digits and / _ . - (under 100 characters in all)"
        ;;
      LOG_DIR) [[ -n $LOG_DIR ]] || bad LOG_DIR "must name a folder" ;;
      LOG_KEEP) check_int LOG_KEEP 0 1000 ;;
      START_TIMEOUT) check_int START_TIMEOUT 1 ;;
      SHUTDOWN_DRAIN) check_int SHUTDOWN_DRAIN 0 ;;
      STOP_TIMEOUT)
        check_int STOP_TIMEOUT 1
        ((10#$STOP_TIMEOUT > 10#$SHUTDOWN_DRAIN)) || bad STOP_TIMEOUT "must exceed SHUTDOWN_DRAIN ($SHUTDOWN_DRAIN s), or in-flight requests are killed mid-drain"
        ;;
      WARMUP_REQUESTS) check_int WARMUP_REQUESTS 0 4096 ;;
      EXTRA_VLLM_ARGS) [[ $EXTRA_VLLM_ARGS =~ ^[[:print:]]*$ ]] || bad EXTRA_VLLM_ARGS "printable characters only" ;;
    esac
  done
}

# --- process identity --------------------------------------------------------------------------
# A PID file holds key=value lines: pid, pgid, start_time (clock ticks since boot, /proc/PID/stat
# field 22), log_id (device:inode of the log file the service writes to), started_at, and what the
# service serves (write_pid_file): it is the running service's record, which status, stop and a
# second start read rather than today's configuration.
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
  [[ $(proc_stat_field "$1" 6) == "$PF_PID" ]] || return 1
  [[ $(proc_stat_field "$1" 3) != Z ]] || return 1
  [[ $(file_id "/proc/$1/fd/1") == "$PF_LOG_ID" ]]
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

read_pid_file() { # sets PF_PID PF_PGID PF_START PF_LOG_ID PF_STARTED_AT and PF_<KEY> of every key
  PF_PID='' PF_PGID='' PF_START='' PF_LOG_ID='' PF_STARTED_AT=''
  PF_PORT='' PF_BIND='' PF_HOST='' PF_SOCKET='' PF_URL='' PF_LOG='' PF_MODEL='' PF_SERVED_MODEL=''
  [[ -f $PID_FILE_ABS ]] || return 1
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
    esac
  done <"$PID_FILE_ABS"
  return 0
}

# use_record: from here on, the service's address and log are the PID file's (read_pid_file
# first), whatever today's configuration says. A PID file written before they were recorded
# (no url= line) leaves today's in place.
use_record() {
  [[ -n $PF_URL ]] || return 0
  set_address "$PF_HOST" "$PF_PORT" "$PF_SOCKET"
  LOG_FILE=$PF_LOG
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
    echo "model=$MODEL_DIR"
    echo "served_model=$SERVED_MODEL_NAME"
  } >"$tmp"
  mv -f "$tmp" "$PID_FILE_ABS"
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

# --- network ---------------------------------------------------------------------------------

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

http_status() { # http_status PATH -> HTTP code, 000 when unreachable
  curl -s -o /dev/null -m "${2:-5}" -w '%{http_code}' "${CURL_SOCKET[@]}" "$HTTP_URL$1" 2>/dev/null || true
}
