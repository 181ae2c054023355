#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 (user postgres, trust
# authentication): start the machine's cluster when it is down. Idempotent.
set -euo pipefail

host=127.0.0.1
port=5432

if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  echo "postgres: accepting connections on $host:$port"
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "postgres: starting cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
else
  echo "postgres: no server on $host:$port and no cluster to start; install PostgreSQL" >&2
  exit 1
fi
for _ in $(seq 1 100); do
  if pg_isready -q -h "$host" -p "$port"; then
    echo "postgres: accepting connections on $host:$port"
    exit 0
  fi
  sleep 0.1
done
echo "postgres: did not come up on $host:$port" >&2
exit 1
