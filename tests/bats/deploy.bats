#!/usr/bin/env bats
# deploy/install_systemd.sh, the unit it writes (checked by systemd-analyze verify) and the
# logrotate snippet (checked by logrotate, then run against a live O_APPEND writer).

load test_helper

setup() {
  T=$BATS_TEST_TMPDIR
  : >"$T/empty.env"
  export CAPTIONER_CONFIG=$T/empty.env
  # No setting comes from this shell's environment: the installer refuses those (the unit reads
  # only the config file).
  while read -r name; do unset "$name"; done < <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$KIT/config.env.example")
}

# config_file KEY=VALUE...: the settings, in $T/c.env, which becomes the installer's config file.
config_file() {
  printf '%s\n' "$@" >"$T/c.env"
  export CAPTIONER_CONFIG=$T/c.env
}

# The two files --print writes, split apart: $T/captioner.service and $T/captioner.logrotate.
print_split() {
  run "$KIT/deploy/install_systemd.sh" --print "$@"
  assert_success
  awk '/^# \/etc\/logrotate.d\//{f=1} !f' <<<"$output" >"$T/captioner.service"
  awk '/^# \/etc\/logrotate.d\//{f=1} f' <<<"$output" >"$T/captioner.logrotate"
}

@test "--print: the unit runs the kit's own launch path with the kit's absolute paths" {
  print_split
  refute_output --regexp '@.*@'
  run cat "$T/captioner.service"
  assert_line "ExecStart=$KIT/start_service.sh --foreground --config $T/empty.env"
  assert_line "WorkingDirectory=$KIT"
  refute_output --partial EnvironmentFile
  assert_line KillMode=control-group
  assert_line Restart=on-failure
  assert_line TimeoutStopSec=90 # STOP_TIMEOUT 60 + 30 > SHUTDOWN_DRAIN 30
  assert_line "User=$(stat -c %U "$KIT")"
  assert_line "StandardOutput=append:$KIT/logs/service.log"
  for line in NoNewPrivileges=yes PrivateTmp=yes ProtectSystem=full \
    "ReadWritePaths=-$KIT/logs -$KIT/.cache"; do
    assert_line "$line"
  done
  grep -q "^$KIT/logs/service.log {$" "$T/captioner.logrotate"
  grep -q '^    copytruncate$' "$T/captioner.logrotate"
}

@test "the unit starts with the file it was installed with: --config, else \$CAPTIONER_CONFIG, else config.env" {
  printf 'PORT=8124\n' >"$T/other.env"
  print_split --config "$T/other.env"
  grep -qx "ExecStart=$KIT/start_service.sh --foreground --config $T/other.env" "$T/captioner.service"
  grep -q 'on 127.0.0.1:8124$' "$T/captioner.service"
  unset CAPTIONER_CONFIG
  print_split
  grep -qx "ExecStart=$KIT/start_service.sh --foreground --config $KIT/config.env" "$T/captioner.service"
}

@test "--print follows the configuration: drain window, log folder, port, user" {
  config_file SHUTDOWN_DRAIN=300 STOP_TIMEOUT=400 LOG_DIR=/srv/captioner-logs PORT=8123
  print_split --user root --name cap2
  run cat "$T/captioner.service"
  assert_line TimeoutStopSec=430
  assert_output --partial $'\nUser=root\nGroup=root\n'
  assert_output --partial 'on 127.0.0.1:8123'
  assert_line StandardOutput=append:/srv/captioner-logs/service.log
  assert_output --partial '# cap2.service'
  grep -q '^/srv/captioner-logs/service.log {$' "$T/captioner.logrotate"
}

@test "--print: the unit's umask and the snippet keep service.log closed to other accounts" {
  print_split
  grep -qx 'UMask=0027' "$T/captioner.service" # systemd creates a missing log 0666 & ~UMask: 0640
  grep -qx "StandardOutput=append:$KIT/logs/service.log" "$T/captioner.service"
  # copytruncate keeps the file and its mode; a `create` line would do nothing beside it.
  grep -qx '    copytruncate' "$T/captioner.logrotate"
  refute grep -q '^ *create' "$T/captioner.logrotate"
}

@test "systemd-analyze verify accepts the unit" {
  command -v systemd-analyze >/dev/null || skip "systemd-analyze is not installed (apt package: systemd)"
  print_split
  run systemd-analyze verify "$T/captioner.service"
  assert_success
  assert_output ''
}

@test "the unit uses the GPUs CUDA_VISIBLE_DEVICES names when installing, not every GPU (the video service's too)" {
  print_split
  assert_equal "$(grep CUDA_VISIBLE_DEVICES "$T/captioner.service" | grep -v '^# The GPUs')" \
    "# CUDA_VISIBLE_DEVICES was not set when this unit was installed: vLLM may use every GPU."
  CUDA_VISIBLE_DEVICES=2,3 print_split
  grep -qx "Environment=CUDA_VISIBLE_DEVICES=2,3" "$T/captioner.service"
  if command -v systemd-analyze >/dev/null; then
    run systemd-analyze verify "$T/captioner.service"
    assert_success
    assert_output ''
  fi
  CUDA_VISIBLE_DEVICES='1 2' run "$KIT/deploy/install_systemd.sh" --print
  assert_failure 1
  assert_output "install_systemd: CUDA_VISIBLE_DEVICES=1 2: GPU numbers or UUIDs separated by commas only"
}

@test "logrotate accepts the snippet" {
  command -v logrotate >/dev/null || skip "logrotate is not installed (apt package: logrotate)"
  config_file LOG_DIR=$T/logs
  print_split --user root
  mkdir -p "$T/logs"
  echo line >"$T/logs/service.log"
  run logrotate -d -s "$T/state" "$T/captioner.logrotate"
  assert_success
  assert_output --partial "considering log $T/logs/service.log"
  # Either it plans the copy or it finds nothing to rotate yet; both mean the snippet is accepted.
  if [[ $output != *"log does not need rotating"* ]]; then
    assert_output --partial "copying $T/logs/service.log to $T/logs/service.log-"
  fi
  refute_output --partial error
}

@test "copytruncate under a live O_APPEND writer: no hole, the writer goes on, at most a line or two lost" {
  command -v logrotate >/dev/null || skip "logrotate is not installed (apt package: logrotate)"
  config_file LOG_DIR=$T/logs
  print_split --user root
  mkdir -p "$T/logs"
  # Like vLLM under start_service.sh or systemd's append:, a writer that holds the file with O_APPEND.
  (for i in $(seq 1 400); do echo "line $i"; sleep 0.01; done >>"$T/logs/service.log") 3>&- &
  writer=$!
  sleep 1
  run logrotate -f -s "$T/state" "$T/captioner.logrotate"
  assert_success
  wait "$writer"
  rotated=$(ls "$T/logs"/service.log-*)
  [ -s "$rotated" ]
  # No NUL bytes: the writer's next write went to the start of the truncated file, not its old offset.
  assert_equal "$(tr -d -c '\000' <"$T/logs/service.log" | wc -c)" 0
  # A line written between the copy and the truncate is lost (logrotate's documented caveat of
  # copytruncate; vLLM never reopens its log, so no other method works): allow two of 400.
  cat "$rotated" "$T/logs/service.log" | sort -u -t' ' -k2n | awk '{print $2}' >"$T/seen"
  assert [ "$(wc -l <"$T/seen")" -ge 398 ]
  assert_equal "$(tail -n 1 "$T/logs/service.log")" "line 400"
}

@test "logrotate keeps service.log and its copies, compressed too, at 0640" {
  command -v logrotate >/dev/null || skip "logrotate is not installed (apt package: logrotate)"
  config_file LOG_DIR=$T/logs
  print_split --user root
  mkdir -m 0750 "$T/logs"
  (umask 027 && echo one >"$T/logs/service.log")
  run logrotate -f -s "$T/state" "$T/captioner.logrotate"
  assert_success
  sleep 1 # dateformat counts seconds: the next copy gets a name of its own
  echo two >>"$T/logs/service.log"
  run logrotate -f -s "$T/state" "$T/captioner.logrotate" # compresses the first copy (delaycompress)
  assert_success
  ls "$T/logs"/service.log-*.gz
  assert_equal "$(ls "$T/logs" | wc -l)" 3
  assert_equal "$(stat -c %a "$T/logs" "$T/logs"/* | sort -u)" $'640\n750'
}

@test "install writes the unit and the snippet where told, and makes the log folder" {
  ((EUID == 0)) || skip "installing needs root"
  mkdir -p "$T/units" "$T/rotate"
  config_file LOG_DIR=$T/newlogs
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_success
  [ -f "$T/units/captioner.service" ]
  [ -f "$T/rotate/captioner" ]
  assert_equal "$(stat -c '%a %U' "$T/newlogs" "$T/newlogs/service.log")" $'750 root\n640 root'
  grep -q "^ExecStart=$KIT/start_service.sh --foreground --config $T/c.env$" "$T/units/captioner.service"
  assert_output --partial "install_systemd: wrote $T/units/captioner.service and $T/rotate/captioner (runs as root)"
}

@test "install gives the service user the logs that manual starts left in its folder" {
  ((EUID == 0)) || skip "installing needs root"
  mkdir -p "$T/units" "$T/rotate" "$T/newlogs"
  echo old >"$T/newlogs/service.log"
  echo older >"$T/newlogs/service.log.1"
  ln -s /etc/hostname "$T/newlogs/service.log.2" # a link is no log of ours: not followed, not changed
  config_file LOG_DIR=$T/newlogs
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user nobody
  assert_success
  assert_equal "$(stat -c %U "$T/newlogs" "$T/newlogs/service.log" "$T/newlogs/service.log.1")" $'nobody\nnobody\nnobody'
  assert_equal "$(stat -c %U /etc/hostname)" root
}

@test "install leaves a shared LOG_DIR (like /tmp) as it is, with a warning" {
  ((EUID == 0)) || skip "installing needs root"
  mkdir -p "$T/units" "$T/rotate"
  mkdir -m 1777 "$T/shared"
  config_file LOG_DIR=$T/shared
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_success
  assert_line "install_systemd: warning: LOG_DIR=$T/shared ($T/shared) is shared with other accounts or holds other files: left as it is; give the service a folder of its own"
  assert_equal "$(stat -c %a "$T/shared" "$T/shared/service.log")" $'1777\n640'
}

@test "another service's log folder, unit or snippet is left alone: nothing re-owned, nothing overwritten" {
  ((EUID == 0)) || skip "installing needs root"
  mkdir -p "$T/units" "$T/rotate"
  # A log folder that holds another account's files: not taken over (install -d would chown it).
  mkdir -m 0755 "$T/video-logs"
  echo video >"$T/video-logs/video.log"
  chown -R nobody "$T/video-logs"
  config_file LOG_DIR=$T/video-logs
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_success
  assert_line "install_systemd: warning: LOG_DIR=$T/video-logs ($T/video-logs) is shared with other accounts or holds other files: left as it is; give the service a folder of its own"
  assert_equal "$(stat -c '%a %U' "$T/video-logs" "$T/video-logs/video.log")" $'755 nobody\n644 nobody'
  # A unit or snippet of that name that this installer did not write.
  config_file LOG_DIR=$T/newlogs
  echo "ExecStart=/opt/video/serve --port 8002" >"$T/units/video.service"
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root --name video
  assert_failure 1
  assert_output "install_systemd: $T/units/video.service exists and was not written by this installer (another service's?): left alone; choose another --name"
  assert_equal "$(cat "$T/units/video.service")" "ExecStart=/opt/video/serve --port 8002"
  [ ! -e "$T/rotate/video" ] && [ ! -e "$T/newlogs" ]
  echo "/var/log/video/*.log { daily }" >"$T/rotate/captioner"
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_failure 1
  assert_output --partial "install_systemd: $T/rotate/captioner exists and was not written by this installer"
  # Its own files it rewrites.
  rm "$T/rotate/captioner"
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_success
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
  assert_success
}

@test "an unknown user, a bad name and a bad configuration are refused before anything is written" {
  run "$KIT/deploy/install_systemd.sh" --print --user no-such-user-xyz
  assert_failure 1
  assert_output "install_systemd: user no-such-user-xyz does not exist (create it, or pass --user)"
  for name in 'a b' .. .hidden; do
    run "$KIT/deploy/install_systemd.sh" --print --name "$name"
    assert_failure 1
    assert_output "install_systemd: --name $name: letters, digits and _ . @ - only, a letter or digit first"
  done
  config_file SHUTDOWN_DRAIN=90 STOP_TIMEOUT=60
  run "$KIT/deploy/install_systemd.sh" --print
  assert_failure 1
  assert_output 'install_systemd: STOP_TIMEOUT="60" is invalid: must exceed SHUTDOWN_DRAIN (90 s), or in-flight requests are killed mid-drain'
}

@test "a log folder the unit cannot name as it is (a space, %, sed's | and &) is refused, and nothing is written" {
  mkdir -p "$T/units" "$T/rotate"
  echo "the unit of yesterday" >"$T/units/captioner.service"
  for dir in "$T/a b" "$T/100%" "$T/x|y" "$T/x&y"; do
    config_file "LOG_DIR=$dir"
    SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate run "$KIT/deploy/install_systemd.sh" --user root
    assert_failure 1
    assert_output "install_systemd: LOG_DIR $dir: a systemd unit cannot name it as it is (letters, digits and / _ . , @ + = : - only): use another path"
  done
  assert_equal "$(cat "$T/units/captioner.service")" "the unit of yesterday"
}

@test "a setting the environment changes is refused by name: the unit reads only the config file" {
  config_file PORT=8124
  PORT=9999 LOG_DIR=$T/x run "$KIT/deploy/install_systemd.sh" --print
  assert_failure 1
  assert_output "install_systemd: the environment sets LOG_DIR, PORT, which the unit would not see (it reads only $T/c.env): put them in that file, or unset them"
  API_KEY=secret run "$KIT/deploy/install_systemd.sh" --print --config "$T/empty.env"
  assert_failure 1
  assert_output "install_systemd: the environment sets API_KEY, which the unit would not see (it reads only $T/empty.env): put them in that file, or unset them"
  # The same value as the file's changes nothing: accepted.
  PORT=8124 run "$KIT/deploy/install_systemd.sh" --print
  assert_success
  assert_output --partial 'on 127.0.0.1:8124'
  ((EUID == 0)) || return 0
  mkdir -p "$T/units" "$T/rotate"
  SYSTEMD_DIR=$T/units LOGROTATE_DIR=$T/rotate PORT=9999 run "$KIT/deploy/install_systemd.sh" --user root
  assert_failure 1
  assert_equal "$(find "$T/units" "$T/rotate" -mindepth 1)" ""
}

@test "UNIX_SOCKET: the unit may write the socket's folder, and systemd-analyze verify accepts it" {
  config_file UNIX_SOCKET=/run/captioner/api.sock
  print_split
  run grep '^ReadWritePaths=' "$T/captioner.service"
  assert_output "ReadWritePaths=-$KIT/logs -$KIT/.cache -/run/captioner"
  grep -qx 'Description=Qwen3-Omni Captioner (vLLM) on unix:/run/captioner/api.sock' "$T/captioner.service"
  command -v systemd-analyze >/dev/null || skip "systemd-analyze is not installed (apt package: systemd)"
  run systemd-analyze verify "$T/captioner.service"
  assert_success
  assert_output ''
}

@test "UNIX_SOCKET in /tmp is refused: the unit's private /tmp would hide the socket" {
  config_file UNIX_SOCKET=/tmp/captioner.sock
  run "$KIT/deploy/install_systemd.sh" --print
  assert_failure 1
  assert_output "install_systemd: UNIX_SOCKET=/tmp/captioner.sock: the unit has a /tmp of its own (PrivateTmp=yes), so no other process would see the socket; put it in a folder of /run, e.g. /run/captioner/api.sock"
}

@test "router.sh: loopback unless --public, its metrics on a port of its own, services still loading waited for" {
  printf '#!/usr/bin/env bash\nprintf "%%s\\n" "$@"\n' >"$T/router"
  chmod +x "$T/router"
  export VLLM_ROUTER=$T/router
  run "$KIT/deploy/router.sh" --port 8100 http://127.0.0.1:8003 http://127.0.0.1:8004
  assert_success
  assert_output --partial $'--host\n127.0.0.1\n--port\n8100\n'
  # vllm-router's default, 29000, is one port for the whole host: a second router died on it.
  assert_output --partial $'--prometheus-port\n8101\n'
  assert_output --partial $'--worker-startup-timeout-secs\n1900\n'
  run "$KIT/deploy/router.sh" --port 8100 --metrics-port 9100 http://127.0.0.1:8003
  assert_output --partial $'--prometheus-port\n9100\n'
  run "$KIT/deploy/router.sh" --port 8100 --metrics-port 8100 http://127.0.0.1:8003
  assert_failure 1
  assert_output "router: --metrics-port 8100: expected 1 to 65535, not the router's port"
  # Its /add_worker and /remove_worker take no key: whoever reaches it could reroute clients.
  run "$KIT/deploy/router.sh" --host 0.0.0.0 http://127.0.0.1:8003
  assert_failure 1
  assert_output --partial "router: --host 0.0.0.0 is not loopback: the router's /add_worker and /remove_worker take no key"
  run "$KIT/deploy/router.sh" --host 0.0.0.0 --public http://127.0.0.1:8003
  assert_success
  assert_output --partial $'--host\n0.0.0.0\n'
}

@test "--help prints the usage" {
  run "$KIT/deploy/install_systemd.sh" --help
  assert_success
  assert_line --index 0 "install_systemd.sh — install the Captioner as a systemd service, with log rotation."
  assert_output --partial "Usage: deploy/install_systemd.sh [--print]"
}
