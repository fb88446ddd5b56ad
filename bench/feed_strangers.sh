#!/usr/bin/env bash
# Delivery latency (Redis, SSE, long-polling /events) at 200 writes/s, before
# and while transactions of strangers hold transaction ids: one in another
# database of the same PostgreSQL cluster, one on an unrelated table of the
# service's own database. PROFILE=release (default) or dev.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
PORT=${PORT_BENCH:-18013}
DB=bench_strangers
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB
bash scripts/deps.sh
cargo build -q --profile "$PROFILE" --bin agent-sessions --example feed_latency
dir=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL "$dir/agent-sessions" migrate
DATABASE_URL=$URL PORT=$PORT RUST_LOG=warn APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="bench:strangers:" \
  "$dir/agent-sessions" serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.1; done
"$dir/examples/feed_latency" "http://127.0.0.1:$PORT" redis://127.0.0.1:6379 "bench:strangers:" "$URL" \
  "${RATE:-200}" "${BEFORE:-20}" "${DURING:-60}"
