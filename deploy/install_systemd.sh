#!/usr/bin/env bash
# install_systemd.sh — install the Captioner as a systemd service, with log rotation.
#
# Usage: deploy/install_systemd.sh [--print] [--user NAME] [--name UNIT] [--config FILE] [-h|--help]
#
# Fills deploy/captioner.service.in and deploy/captioner.logrotate.in with this kit's absolute
# path and its configuration (config.env, or FILE), validated first; the unit starts the service
# with that file (--config) and nothing else. So a setting that the environment changes here is
# refused by name (it would be in the unit's text but not in what the service reads): put it in
# the file. With UNIX_SOCKET the unit may write the socket's folder (ReadWritePaths); a socket in
# /tmp or /var/tmp is refused (the unit's PrivateTmp would hide it from every other process).
# Writes /etc/systemd/system/UNIT.service and /etc/logrotate.d/UNIT, creates the
# log folder (0750) and service.log (0640) owned by the service user (a shared LOG_DIR such as /tmp
# is left as it is, with a warning), and runs `systemctl daemon-reload`. It enables and starts
# nothing: it prints the commands for that.
#   --print       write both files to stdout instead; install nothing (no root needed).
#   --user NAME   the account the service runs as (default: the owner of the kit's folder).
#   --name UNIT   unit name (default: captioner).
# CUDA_VISIBLE_DEVICES, set when it runs, goes into the unit: the GPUs the service may use (leave
# the other services' GPUs out). A unit or snippet of the same name that it did not write (another
# service's) is refused, nothing overwritten.
# SYSTEMD_DIR and LOGROTATE_DIR override /etc/systemd/system and /etc/logrotate.d.
#
# Exit codes: 0 done, 1 bad option, bad config, a setting from the environment, unknown user, or
# not root without --print.
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=install_systemd
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/service_lib.sh"

# unit_path WHAT PATH: die unless PATH goes into the unit and sed as it is: no space (splits a
# systemd list), % (a systemd specifier), | & \ (sed's), quotes or a line end.
unit_path() {
  [[ $2 =~ ^/[A-Za-z0-9/_.,@+=:-]*$ ]] ||
    die "$1 $2: a systemd unit cannot name it as it is (letters, digits and / _ . , @ + = : - only): use another path"
}

# write_file TEMPLATE DEST: DEST filled whole or not at all (a rename, so a failure or Ctrl-C leaves
# the old one and no DEST.new, which logrotate would read as a second snippet).
write_file() {
  trap 'rm -f "$2.new"; exit 130' INT
  trap 'rm -f "$2.new"; exit 143' TERM
  if ! { fill "$1" >"$2.new" && chmod 0644 "$2.new" && mv -f "$2.new" "$2"; }; then
    rm -f "$2.new"
    die "cannot write $2"
  fi
  trap - INT TERM
}

# not_ours DEST: die when DEST exists and was not written by this installer (another service's
# unit or snippet of the same name): nothing is overwritten.
not_ours() {
  [[ ! -e $1 ]] || grep -qi 'written by deploy/install_systemd.sh' "$1" ||
    die "$1 exists and was not written by this installer (another service's?): left alone; choose another --name"
}

fill() { # fill TEMPLATE -> stdout, every @KEY@ replaced
  sed -e "s|@UNIT@|$UNIT|g" -e "s|@KIT@|$KIT_ROOT|g" -e "s|@USER@|$SERVICE_USER|g" \
    -e "s|@GROUP@|$SERVICE_GROUP|g" -e "s|@LISTEN@|$LISTEN|g" \
    -e "s|@LOG_DIR@|$LOG_DIR_ABS|g" -e "s|@LOG_FILE@|$LOG_FILE|g" -e "s|@SHUTDOWN_DRAIN@|$SHUTDOWN_DRAIN|g" \
    -e "s|@STOP_TIMEOUT@|$STOP_TIMEOUT|g" -e "s|@TIMEOUT_STOP@|$((10#$STOP_TIMEOUT + 30))|g" \
    -e "s|@CONFIG@|$CONFIG_ABS|g" -e "s|@SOCKET_DIR@|${UNIX_SOCKET_ABS:+ -${UNIX_SOCKET_ABS%/*}}|g" \
    -e "s|^@GPUS@$|$GPUS|" "$1"
}

# The settings the environment changes from what the config file gives: the unit will not see
# them (it runs start_service.sh --config FILE with no environment of ours).
environment_overrides() { # environment_overrides [FILE] -> their names, one a line
  local name
  local -a without=()
  # Every setting's name, in config.env.example's order.
  while read -r name; do without+=(-u "$name"); done < <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$KIT_ROOT/config.env.example")
  comm -13 <(env "${without[@]}" "$KIT_PYTHON" "$KIT_ROOT/captioner/config.py" --shell ${1:+--config "$1"} | sort) \
    <("$KIT_PYTHON" "$KIT_ROOT/captioner/config.py" --shell ${1:+--config "$1"} | sort) |
    sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p'
}

main() {
  local print="" config=""
  UNIT=captioner SERVICE_USER=""
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --print) print=1 ;;
      --user) [[ $# -ge 2 ]] || die "--user needs a NAME"; SERVICE_USER=$2; shift ;;
      --name) [[ $# -ge 2 ]] || die "--name needs a UNIT"; UNIT=$2; shift ;;
      --config) [[ $# -ge 2 ]] || die "--config needs a FILE"; config=$2; shift ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  debug_setup
  [[ $UNIT =~ ^[A-Za-z0-9][A-Za-z0-9_.@-]*$ ]] || die "--name $UNIT: letters, digits and _ . @ - only, a letter or digit first"
  load_config "$config"
  CONFIG_ABS=$(realpath -m -- "${CONFIG_FILE:-$KIT_ROOT/config.env}")
  local overrides
  overrides=$(environment_overrides "$config" | paste -s -d ',' | sed 's/,/, /g')
  [[ -z $overrides ]] ||
    die "the environment sets $overrides, which the unit would not see (it reads only $CONFIG_ABS): put them in that file, or unset them"
  load_config "$config" ALL # every setting validated (captioner/config.py --check)
  case $UNIX_SOCKET_ABS in
    /tmp/* | /var/tmp/*) die "UNIX_SOCKET=$UNIX_SOCKET_ABS: the unit has a /tmp of its own (PrivateTmp=yes), so no other process would see the socket; put it in a folder of /run, e.g. /run/captioner/api.sock" ;;
  esac
  [[ -n $SERVICE_USER ]] || SERVICE_USER=$(stat -c %U "$KIT_ROOT")
  id "$SERVICE_USER" >/dev/null 2>&1 || die "user $SERVICE_USER does not exist (create it, or pass --user)"
  SERVICE_GROUP=$(id -gn "$SERVICE_USER")
  unit_path "the kit's folder" "$KIT_ROOT"
  # The unit starts with the file validated here, whatever the environment of a later start.
  [[ -f $CONFIG_ABS ]] || die "no configuration file to install with: create $CONFIG_ABS (it may be empty: config.env.example holds the defaults)"
  unit_path --config "$CONFIG_ABS"
  unit_path LOG_DIR "$LOG_DIR_ABS"
  [[ -z $UNIX_SOCKET_ABS ]] || unit_path UNIX_SOCKET "$UNIX_SOCKET_ABS"

  # The GPUs a manual start would use here: the unit gets the same (else vLLM would take GPUs
  # 0..N-1, which may be the video service's).
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    [[ $CUDA_VISIBLE_DEVICES =~ ^[A-Za-z0-9,-]*$ ]] ||
      die "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: GPU numbers or UUIDs separated by commas only"
    GPUS="Environment=CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  else
    GPUS="# CUDA_VISIBLE_DEVICES was not set when this unit was installed: vLLM may use every GPU."
  fi
  LISTEN=$HOST:$PORT
  [[ -z $UNIX_SOCKET_ABS ]] || LISTEN=unix:$UNIX_SOCKET_ABS
  local dir=$KIT_ROOT/deploy
  if [[ -n $print ]]; then
    fill "$dir/captioner.service.in"
    fill "$dir/captioner.logrotate.in"
    return 0
  fi
  ((EUID == 0)) || die "must run as root to install (or use --print)"
  local unit_dir=${SYSTEMD_DIR:-/etc/systemd/system} rotate_dir=${LOGROTATE_DIR:-/etc/logrotate.d}
  not_ours "$unit_dir/$UNIT.service"
  not_ours "$rotate_dir/$UNIT"
  # The log folder is the service user's and closed to other accounts, unless it is not the
  # service's own (shared like /tmp, or holding other files: another service's logs): install -d
  # would chown and chmod that one too.
  if [[ -d $LOG_DIR_ABS ]] && ! services_own_dir "$LOG_DIR_ABS"; then
    say "warning: LOG_DIR=$LOG_DIR ($LOG_DIR_ABS) is shared with other accounts or holds other files: left as it is; give the service a folder of its own"
  else
    install -d -o "$SERVICE_USER" -g "$SERVICE_GROUP" -m 0750 "$LOG_DIR_ABS"
    # Logs left by manual starts as another account: the service user's now, or its warm-up could
    # not append to service.log and logrotate (su USER) could not rotate it.
    find "$LOG_DIR_ABS" -maxdepth 1 -type f -name 'service.log*' -exec chown "$SERVICE_USER:$SERVICE_GROUP" {} +
  fi
  # systemd opens service.log as root (StandardOutput=append:); made here, it is the service's, 0640.
  [[ -e $LOG_FILE ]] || install -o "$SERVICE_USER" -g "$SERVICE_GROUP" -m 0640 /dev/null "$LOG_FILE"
  install -d -o "$SERVICE_USER" -g "$SERVICE_GROUP" "$KIT_ROOT/.cache"
  write_file "$dir/captioner.service.in" "$unit_dir/$UNIT.service"
  write_file "$dir/captioner.logrotate.in" "$rotate_dir/$UNIT"
  say "wrote $unit_dir/$UNIT.service and $rotate_dir/$UNIT (runs as $SERVICE_USER)"
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    say "next: systemctl enable --now $UNIT; journal: journalctl -u $UNIT; log: $LOG_FILE"
  else
    say "systemd is not running here: the files are written, nothing reloaded"
  fi
}

main "$@"
