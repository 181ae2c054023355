#!/usr/bin/env bash
# The distributed deployment on this machine: the Kafka-protocol broker on
# 127.0.0.1:9092 (or ORDERLINE_BROKER; none when ORDERLINE_KAFKA_BROKERS names
# another), PostgreSQL on 127.0.0.1:5432, one process per service, and the
# gateway with the public API on 127.0.0.1:8090.
#
#   infra/dev/distributed.sh up       start what is not running (idempotent)
#   infra/dev/distributed.sh down     stop the services and the gateway
#   infra/dev/distributed.sh status   what runs, and whether it answers
#
# ORDERLINE_RUN_DIR        logs and pid files          (default target/distributed)
# ORDERLINE_BIN            the orderline binary        (default target/release/orderline, built when missing)
# ORDERLINE_POSTGRES_URL   the PostgreSQL server       (default postgres://postgres@127.0.0.1:5432)
# ORDERLINE_PORT_BASE      the gateway's port; the services take the next eight (default 8090)
# ORDERLINE_DATABASE_PREFIX, ORDERLINE_TOPIC_PREFIX, ORDERLINE_KAFKA_BROKERS,
# ORDERLINE_PAYMENT_TIMEOUT_MS and ORDERLINE_AUTH are passed on to the services;
# ORDERLINE_RATE_LIMIT to the gateway, which limits each client's rate.
#
# Every service checks tokens with the same keys: the operator token and the signing
# key are files in the run directory (mode 0600), created on the first `up`, unless
# ORDERLINE_OPERATOR_TOKEN_FILE / ORDERLINE_SIGNING_KEY_FILE name others.
set -euo pipefail
cd "$(dirname "$0")/../.."

run="${ORDERLINE_RUN_DIR:-$PWD/target/distributed}"
bin="${ORDERLINE_BIN:-$PWD/target/release/orderline}"
export ORDERLINE_POSTGRES_URL="${ORDERLINE_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
# The broker this script starts (infra/kafka/broker.sh, on ORDERLINE_BROKER), and the
# brokers the services use: that one, unless ORDERLINE_KAFKA_BROKERS names others,
# which are then neither started nor checked here.
local_broker="${ORDERLINE_BROKER:-127.0.0.1:9092}"
export ORDERLINE_KAFKA_BROKERS="${ORDERLINE_KAFKA_BROKERS:-$local_broker}"
uses_local_broker() { [ "$ORDERLINE_KAFKA_BROKERS" = "$local_broker" ]; }
gateway_port="${ORDERLINE_PORT_BASE:-8090}"
declare -A ports=([order]=$((gateway_port + 1)) [inventory]=$((gateway_port + 2))
  [payment]=$((gateway_port + 3)) [shipping]=$((gateway_port + 4))
  [customer]=$((gateway_port + 5)) [catalog]=$((gateway_port + 6))
  [cart]=$((gateway_port + 7)) [notification]=$((gateway_port + 8)))
services=(order inventory payment shipping customer catalog cart notification)

alive() {
  [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null
}

healthy() {
  curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$1/health"
}

wait_healthy() {
  local name=$1 port=$2
  for _ in $(seq 1 300); do
    if healthy "$port"; then
      echo "$name: answering on 127.0.0.1:$port"
      return
    fi
    if ! alive "$name"; then
      echo "$name: exited; last lines of $run/$name.log:" >&2
      tail -n 20 "$run/$name.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "$name: not answering on 127.0.0.1:$port; see $run/$name.log" >&2
  exit 1
}

start() {
  local name=$1 port=$2
  shift 2
  if alive "$name"; then
    echo "$name: already running (pid $(cat "$run/$name.pid"))"
    return
  fi
  nohup "$bin" "$@" >>"$run/$name.log" 2>&1 &
  echo $! >"$run/$name.pid"
  wait_healthy "$name" "$port"
}

# A secret file of 32 random bytes (base64) only its owner can read, made once.
secret() {
  if [ ! -s "$1" ]; then
    (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '\n=' >"$1")
  fi
}

up() {
  mkdir -p "$run"
  export ORDERLINE_OPERATOR_TOKEN_FILE="${ORDERLINE_OPERATOR_TOKEN_FILE:-$run/operator-token}"
  export ORDERLINE_SIGNING_KEY_FILE="${ORDERLINE_SIGNING_KEY_FILE:-$run/signing-key}"
  secret "$ORDERLINE_OPERATOR_TOKEN_FILE"
  secret "$ORDERLINE_SIGNING_KEY_FILE"
  if uses_local_broker; then
    infra/kafka/broker.sh ensure
  fi
  infra/dev/postgres.sh
  if [ ! -x "$bin" ]; then
    echo "building $bin"
    cargo build --release --quiet
  fi
  for service in "${services[@]}"; do
    # The gateway limits each client's rate: a service sees them all at its address.
    start "$service" "${ports[$service]}" serve --service "$service" \
      --listen "127.0.0.1:${ports[$service]}" --rate-limit off
  done
  start gateway "$gateway_port" gateway --listen "127.0.0.1:$gateway_port" \
    --order "http://127.0.0.1:${ports[order]}" \
    --inventory "http://127.0.0.1:${ports[inventory]}" \
    --payment "http://127.0.0.1:${ports[payment]}" \
    --shipping "http://127.0.0.1:${ports[shipping]}" \
    --customer "http://127.0.0.1:${ports[customer]}" \
    --catalog "http://127.0.0.1:${ports[catalog]}" \
    --cart "http://127.0.0.1:${ports[cart]}" \
    --notification "http://127.0.0.1:${ports[notification]}"
  echo "the public API: http://127.0.0.1:$gateway_port (logs and pids in $run;" \
    "the operator token in $ORDERLINE_OPERATOR_TOKEN_FILE)"
}

down() {
  for name in gateway "${services[@]}"; do
    if alive "$name"; then
      local pid
      pid=$(cat "$run/$name.pid")
      kill -TERM "$pid"
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -9 "$pid" 2>/dev/null || true
      echo "$name: stopped"
    fi
    rm -f "$run/$name.pid"
  done
}

status() {
  local ok=0
  for name in "${services[@]}" gateway; do
    local port=$gateway_port
    [ "$name" = gateway ] || port=${ports[$name]}
    if alive "$name" && healthy "$port"; then
      echo "$name: running (pid $(cat "$run/$name.pid")), answering on 127.0.0.1:$port"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  if uses_local_broker; then
    infra/kafka/broker.sh status || ok=1
  fi
  return $ok
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
