#!/usr/bin/env bash
# The door's latency now against the door of an earlier commit, on this machine, in
# one run: `infra/dev/door-compare.sh [REV] [ROUNDS]` (REV defaults to 8fd22f4, the
# last commit before the work on the pipeline's throughput, whose door the pipeline
# issue measured at 25-70 ms p99; 3 rounds).
#
# Builds REV's release binary in a worktree under target/door-compare (once), and the
# current one (`cargo build --release`). Then, ROUNDS times and interleaved so the
# machine's drift falls on all alike: a fresh embedded server (auth off) on a fresh
# data directory, 10 s of saturation by infra/dev/door_load.py (64 connections), for
#   then     REV's binary (no admission control: it accepts everything),
#   now      the current binary with its defaults (backlog bound 1000),
#   now-0    the current binary with no backlog bound (it accepts everything too).
# Each line: 202/s, the 202s' p50/p90/p99, the count of each status.
set -euo pipefail
cd "$(dirname "$0")/../.."
rev="${1:-8fd22f4}"
rounds="${2:-3}"
port="${ORDERLINE_COMPARE_PORT:-18080}"
root="$PWD/target/door-compare"
then_dir="$root/$rev"
mkdir -p "$root"
if [ ! -x "$then_dir/target/release/orderline" ]; then
  git worktree remove --force "$then_dir" 2>/dev/null || true
  git worktree add --force --detach "$then_dir" "$rev" >/dev/null
  echo "building $rev (once) ..." >&2
  (cd "$then_dir" && cargo build --release --bin orderline --quiet)
fi
cargo build --release --bin orderline --quiet
now_bin="$PWD/target/release/orderline"
then_bin="$then_dir/target/release/orderline"

run() { # LABEL BIN [ARGS...]
  local label=$1 bin=$2
  shift 2
  local data="$root/data"
  rm -rf "$data"
  ORDERLINE_AUTH=off "$bin" serve --listen "127.0.0.1:$port" --data-dir "$data" "$@" \
    >"$root/$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.1
  done
  printf '%-8s %s\n' "$label" "$(python3 infra/dev/door_load.py "$port" 10)"
  kill -TERM "$pid"
  wait "$pid" || true
}

for round in $(seq "$rounds"); do
  echo "round $round"
  run then "$then_bin"
  run now "$now_bin"
  run now-0 "$now_bin" --max-backlog 0
done
rm -rf "$root/data"
