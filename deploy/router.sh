#!/usr/bin/env bash
# router.sh — run vLLM's router (vllm-router) in front of several caption services.
#
# Usage: deploy/router.sh [--host ADDR [--public]] [--port PORT] [--metrics-port PORT] URL [URL ...] [-h|--help]
#
# One URL for every client, whatever the number of services behind it: each request goes to
# the less loaded of the services (policy power_of_two: captions share no prompt prefix, so
# the router's default cache_aware has nothing to reuse), a service that fails its /health
# twice (checked every 5 s) or keeps failing requests (circuit breaker) gets no more until it
# recovers, and a request that fails on one service is retried on another. Clients use it as
# they use one service: python test_client.py recordings/ --base-url http://127.0.0.1:8100
#   --host ADDR   bind address (default 127.0.0.1: reach it through a tunnel, as the services); any
#                 other address needs --public too
#   --public      bind ADDR although it is not loopback: the router's /add_worker and
#                 /remove_worker take no key, so whoever reaches it can send clients (their audio
#                 and their API key) to a server of theirs. Run it where no other account is.
#   --port PORT   router port (default 8100)
#   --metrics-port PORT  its Prometheus metrics (default PORT+1; vllm-router's own default, 29000,
#                 is one port for every router on the host: a second one would not start)
#   URL           a service, e.g. http://127.0.0.1:8003, or a tunnel to one on another host
# Services still loading are waited for up to 1900 s (START_TIMEOUT's default is 1800).
# VLLM_ROUTER names the router binary (default: the kit's .venv/bin/vllm-router, from
# `pip install vllm-router`); ROUTER_ARGS adds more of its flags, split on spaces.
#
# Exit codes: 1 bad option or no router; otherwise the router's own (it runs in the foreground).
# CAPTIONER_DEBUG=1 traces the script.
set -euo pipefail
PROG=router
# shellcheck source=lib/service_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/service_lib.sh"

main() {
  local host=127.0.0.1 port=8100 metrics="" public="" router=${VLLM_ROUTER:-$KIT_ROOT/.venv/bin/vllm-router}
  local -a urls=() args=() extra=()
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --host) [[ $# -ge 2 ]] || die "--host needs an ADDR"; host=$2; shift ;;
      --port) [[ $# -ge 2 ]] || die "--port needs a PORT"; port=$2; shift ;;
      --metrics-port) [[ $# -ge 2 ]] || die "--metrics-port needs a PORT"; metrics=$2; shift ;;
      --public) public=1 ;;
      http://* | https://*) urls+=("${1%/}") ;;
      *) die "unknown option or URL '$1' (see --help)" ;;
    esac
    shift
  done
  debug_setup
  ((${#urls[@]})) || die "give the services' URLs, e.g. http://127.0.0.1:8003 http://127.0.0.1:8004"
  if ! [[ $port =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65534)); then
    die "--port $port: expected 1 to 65534"
  fi
  metrics=${metrics:-$((10#$port + 1))}
  if ! [[ $metrics =~ ^[0-9]+$ ]] || ((10#$metrics < 1 || 10#$metrics > 65535 || 10#$metrics == 10#$port)); then
    die "--metrics-port $metrics: expected 1 to 65535, not the router's port"
  fi
  case $host in
    127.* | localhost | ::1) ;;
    *) [[ -n $public ]] || die "--host $host is not loopback: the router's /add_worker and /remove_worker take no key, so whoever reaches it could send clients to a server of theirs; add --public if no other account can reach it" ;;
  esac
  command -v "$router" >/dev/null || die "$router not found: pip install vllm-router (or set VLLM_ROUTER)"
  read -r -a extra <<<"${ROUTER_ARGS:-}"
  local policy=power_of_two # needs two services; with one there is nothing to choose
  ((${#urls[@]} >= 2)) || policy=round_robin
  args=(--host "$host" --port "$port" --worker-urls "${urls[@]}" --policy "$policy"
    --health-check-interval-secs 5 --health-failure-threshold 2 --health-success-threshold 1
    --retry-max-retries 3 --cb-failure-threshold 3 --cb-timeout-duration-secs 10
    --request-timeout-secs 600 --worker-startup-check-interval 1 --worker-startup-timeout-secs 1900
    --prometheus-port "$metrics" --log-level warning "${extra[@]}")
  exec "$router" "${args[@]}"
}

main "$@"
