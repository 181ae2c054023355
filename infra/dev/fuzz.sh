#!/usr/bin/env bash
# The public API fuzzed against its own OpenAPI document: schemathesis (from PyPI,
# installed once into a virtual environment under ~/.cache/orderline) sends a bounded
# number of generated requests per operation to a server on fresh state, and fails on
# any 5xx and on any response that breaks its documented schema. The server runs with
# auth on and the requests carry its operator token (no rate limit: the fuzzer sends
# far more than a client would).
#   ORDERLINE_FUZZ_EXAMPLES (default 50) examples per operation,
#   ORDERLINE_FUZZ_SEED (default 1), ORDERLINE_FUZZ_PORT (default 18580),
#   ORDERLINE_BIN (default target/debug/orderline, built if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="$HOME/.cache/orderline/schemathesis-4"
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
  echo "schemathesis: installing into $venv (once)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis>=4.32,<5"
fi

binary="${ORDERLINE_BIN:-target/debug/orderline}"
[ -x "$binary" ] || cargo build --bin orderline
port="${ORDERLINE_FUZZ_PORT:-18580}"
base="http://127.0.0.1:$port"
work="$(mktemp -d)"
(umask 077 && head -c 32 /dev/urandom | base64 >"$work/operator-token")
"$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/data" --auth on \
  --operator-token-file "$work/operator-token" --rate-limit off >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 150); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('$base/health', timeout=1)" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

if ! "$venv/bin/schemathesis" run "$base/openapi.json" --url "$base" \
  --header "Authorization: Bearer $(tr -d '\n' <"$work/operator-token")" \
  --checks not_a_server_error,response_schema_conformance \
  --max-examples "${ORDERLINE_FUZZ_EXAMPLES:-50}" --seed "${ORDERLINE_FUZZ_SEED:-1}"; then
  echo "== the server's log (last 50 lines)"
  tail -n 50 "$work/server.log"
  exit 1
fi
