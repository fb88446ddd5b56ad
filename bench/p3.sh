#!/usr/bin/env bash
# P3: commit-to-Redis-subscriber latency at 1,000 writes/s (release build).
# The first 2 s of writes warm the fresh service up and are not measured
# (service/examples/p3_latency.rs); every write of the run, warm-up
# included, must arrive (`received=` in the RESULT line).
#
#   bench/p3.sh
#   P3_SLOW=/tmp/slow.txt bench/p3.sh   # also list each event slower than 10 ms
#   P3_WARMUP=0 P3_LOG=info bench/p3.sh # measure from the first write, with the service's log
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT_BENCH:-18012}
DB=bench_p3
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB
bash scripts/deps.sh
cargo build -q --release --bin agent-sessions --example p3_latency
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL ./target/release/agent-sessions migrate
DATABASE_URL=$URL PORT=$PORT RUST_LOG=${P3_LOG:-warn} APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="bench:p3:" \
  ./target/release/agent-sessions serve &
pid=$!
trap 'kill $pid 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.1; done
out=$(mktemp)
trap 'kill $pid 2>/dev/null; wait 2>/dev/null; rm -f "$out"' EXIT
./target/release/examples/p3_latency "http://127.0.0.1:$PORT" redis://127.0.0.1:6379 "bench:p3:" | tee "$out"
curl -s "localhost:$PORT/metrics" | grep -E "^relay_commit_to_publish_seconds_(bucket|count)" | sed "s/^/  relay: /"
# For bench/run.sh: the p99, and whether every acknowledged write arrived.
awk '/^writes:/ {ok = $2} /^received:/ {got = $2}
     /^commit→subscriber/ {p99 = $8}
     END {printf "RESULT P3 commit_to_subscriber p99_ms=%s target<=3 received=%s/%s\n", p99, got, ok}' "$out"
