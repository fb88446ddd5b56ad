#!/usr/bin/env bash
# P3: commit-to-Redis-subscriber latency at 1,000 writes/s (release build).
# The first 2 s of writes warm the fresh service up and are not measured
# (service/examples/p3_latency.rs); every write of the run, warm-up
# included, must arrive (`received=` in the RESULT line).
#
#   bench/p3.sh
#   P3_SLOW=/tmp/slow.txt bench/p3.sh   # also list each event slower than 10 ms
#   P3_WARMUP=0 P3_LOG=info bench/p3.sh # measure from the first write, with the service's log
#   P3_FLOOR=0 bench/p3.sh              # skip the database's own commit latency at the same rate
#   BIN=/tmp/old/agent-sessions bench/p3.sh   # measure another build of the service (no cargo build)
#
# Then, with the service stopped, the floor: a bare one-row UPDATE per
# transaction at the same 1,000/s (pgbench -R), whose p99 is what a commit
# costs on this machine. The relay passes a position only once every
# writer before it has committed, so no event reaches Redis sooner than
# the slowest of the writes it follows: a floor above 3 ms puts the target
# out of reach whatever the service does.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT_BENCH:-18012}
DB=bench_p3
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB
bash scripts/deps.sh
if [ -z "${BIN:-}" ] || [ ! -x ./target/release/examples/p3_latency ]; then
  cargo build -q --release --bin agent-sessions --example p3_latency
fi
BIN=${BIN:-./target/release/agent-sessions}
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL "$BIN" migrate
DATABASE_URL=$URL PORT=$PORT RUST_LOG=${P3_LOG:-warn} APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="bench:p3:" \
  "$BIN" serve &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.1; done
out=$(mktemp)
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null; rm -f "$out"' EXIT
./target/release/examples/p3_latency "http://127.0.0.1:$PORT" redis://127.0.0.1:6379 "bench:p3:" | tee "$out"
curl -s "localhost:$PORT/metrics" | grep -E "^relay_commit_to_publish_seconds_(bucket|count)" | sed "s/^/  relay: /"
# For bench/run.sh: the p99, and whether every acknowledged write arrived.
awk '/^writes:/ {ok = $2} /^received:/ {got = $2}
     /^commit→subscriber/ {p99 = $8}
     END {printf "RESULT P3 commit_to_subscriber p99_ms=%s target<=3 received=%s/%s\n", p99, got, ok}' "$out"
kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
if [ "${P3_FLOOR:-1}" != 0 ]; then
  floor=$(mktemp -d)
  psql -q "$URL" -c "CREATE TABLE p3_floor (id int PRIMARY KEY, n bigint NOT NULL)" \
    -c "INSERT INTO p3_floor SELECT i, 0 FROM generate_series(1, 1000) i"
  printf '\\set r random(1, 1000)\nUPDATE p3_floor SET n = n + 1 WHERE id = :r;\n' > "$floor/update.sql"
  pgbench -n -M prepared -c8 -j1 -R1000 -T10 -l --log-prefix="$floor/log" -f "$floor/update.sql" "$URL" >/dev/null 2>"$floor/err" \
    || { echo "pgbench failed:" >&2; cat "$floor/err" >&2; exit 1; }
  cat "$floor"/log.* | awk '{print $3}' | sort -n | awk '{a[NR] = $1} END {
    printf "floor: a bare UPDATE at 1,000/s, ms: p50 %.2f  p99 %.2f  max %.2f\n", a[int((NR + 1) / 2)] / 1000, a[int(NR * 0.99)] / 1000, a[NR] / 1000
    printf "RESULT P3 database_commit p99_ms=%.2f\n", a[int(NR * 0.99)] / 1000 }'
  psql -q "$URL" -c "DROP TABLE p3_floor"
  rm -rf "$floor"
fi
