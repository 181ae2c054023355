#!/usr/bin/env bash
# A Kafka-protocol broker for development and tests: Tansu (from crates.io) on
# 127.0.0.1:9092 with its SQLite storage engine.
#
#   infra/kafka/broker.sh ensure   install when missing, start when down (idempotent)
#   infra/kafka/broker.sh install  build Tansu once into the cache (about 10 minutes)
#   infra/kafka/broker.sh start | stop | status
#   infra/kafka/broker.sh index    add the indexes of ADR 15 to the storage in
#                                  ORDERLINE_BROKER_DIR (done by start)
#
# ORDERLINE_CACHE_DIR  where the binary is cached     (default ~/.cache/orderline)
# ORDERLINE_BROKER_DIR where data, log and pid live   (default $ORDERLINE_CACHE_DIR/broker)
# ORDERLINE_BROKER     host:port to listen on         (default 127.0.0.1:9092)
#
# Tansu's SQLite schema has no index on the record headers (nor on the watermarks),
# so every record it fetches scans every header it holds and a broker slows down as
# it fills (ADR 15): the indexes are added once the storage exists.
set -euo pipefail

TANSU_VERSION=0.6.0
cache="${ORDERLINE_CACHE_DIR:-$HOME/.cache/orderline}"
root="$cache/tansu-$TANSU_VERSION"
bin="$root/bin/tansu"
run="${ORDERLINE_BROKER_DIR:-$cache/broker}"
address="${ORDERLINE_BROKER:-127.0.0.1:9092}"
host="${address%:*}"
port="${address##*:}"

listening() {
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

running_pid() {
  local pid
  [ -f "$run/tansu.pid" ] || return 1
  pid=$(cat "$run/tansu.pid")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install() {
  if [ -x "$bin" ]; then
    echo "tansu $TANSU_VERSION: installed at $bin"
    return
  fi
  echo "tansu $TANSU_VERSION: building into $root (once; about 10 minutes on 2 cores)"
  mkdir -p "$root"
  cargo install --locked tansu --version "$TANSU_VERSION" --features libsql --root "$root" --quiet
  echo "tansu $TANSU_VERSION: installed at $bin"
}

start() {
  if listening; then
    echo "broker: already listening on $address"
    [ ! -f "$run/tansu.db" ] || index_storage
    return
  fi
  [ -x "$bin" ] || { echo "broker: tansu is not installed; run '$0 install'" >&2; exit 1; }
  mkdir -p "$run"
  (
    cd "$run"
    nohup "$bin" broker \
      --listener-url "tcp://$address" \
      --advertised-listener-url "tcp://$address" \
      --storage-engine "sqlite://tansu.db" \
      >>"$run/tansu.log" 2>&1 &
    echo $! >"$run/tansu.pid"
  )
  for _ in $(seq 1 100); do
    if listening; then
      index_storage
      echo "broker: listening on $address (pid $(cat "$run/tansu.pid"), log $run/tansu.log)"
      return
    fi
    sleep 0.1
  done
  echo "broker: did not start; last lines of $run/tansu.log:" >&2
  tail -n 20 "$run/tansu.log" >&2 || true
  exit 1
}

# The indexes Tansu's schema lacks (ADR 15), added to its database once Tansu has
# created its tables. Python's sqlite3 module, so no other tool is needed.
index_storage() {
  local db="$run/tansu.db"
  for _ in $(seq 1 100); do
    if python3 - "$db" <<'PY' 2>/dev/null
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10)
found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'header'")
if found.fetchone() is None:
    sys.exit(1)
db.execute("CREATE INDEX IF NOT EXISTS header_topition_offset ON header (topition, offset_id)")
db.execute("CREATE INDEX IF NOT EXISTS watermark_topition ON watermark (topition)")
db.commit()
PY
    then
      return
    fi
    sleep 0.1
  done
  echo "broker: could not index $db" >&2
  exit 1
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid"
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "broker: stopped (pid $pid)"
  else
    echo "broker: not running"
  fi
  rm -f "$run/tansu.pid"
}

status() {
  if listening; then
    echo "broker: listening on $address${1:+}"
  else
    echo "broker: not listening on $address"
    return 1
  fi
}

case "${1:-ensure}" in
  ensure) install; start ;;
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  index) index_storage ;;
  *) echo "usage: $0 ensure|install|start|stop|status|index" >&2; exit 2 ;;
esac
