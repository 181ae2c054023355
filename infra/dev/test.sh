#!/usr/bin/env bash
# The whole test suite. Starts what the tests talk to (PostgreSQL on 127.0.0.1:5432,
# the Kafka-protocol broker on 127.0.0.1:9092, installed on first use), then runs
# every test of the workspace.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."

infra/dev/postgres.sh
infra/kafka/broker.sh ensure
cargo test --workspace "$@"
