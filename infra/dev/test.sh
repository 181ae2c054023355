#!/usr/bin/env bash
# The whole test suite. Starts what the tests talk to (PostgreSQL on 127.0.0.1:5432,
# installed on first use; a Kafka-protocol broker of the suite's own on
# 127.0.0.1:19092, started on empty state for every run so that what earlier runs
# left on a broker cannot slow this one), runs every test of the workspace, then
# fuzzes the public API against its OpenAPI document (infra/dev/fuzz.sh).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."

infra/dev/postgres.sh
export ORDERLINE_BROKER="${ORDERLINE_TEST_BROKER:-127.0.0.1:19092}"
export ORDERLINE_BROKER_DIR="$PWD/target/test-broker"
infra/kafka/broker.sh stop >/dev/null
rm -rf "$ORDERLINE_BROKER_DIR"
infra/kafka/broker.sh ensure
trap 'infra/kafka/broker.sh stop >/dev/null' EXIT
export ORDERLINE_TEST_KAFKA="$ORDERLINE_BROKER"
cargo test --workspace "$@"
# The whole suite (no arguments) ends with the fuzzing of the API.
if [ "$#" -eq 0 ]; then
  infra/dev/fuzz.sh
  # The short profile of faults at saturation (docs/reliability.md): the broker
  # stopped and started, then the order service killed, with the test build.
  ORDERLINE_BIN="$PWD/target/debug/orderline" infra/dev/kill_at_saturation.py broker order
fi
