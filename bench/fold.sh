#!/usr/bin/env bash
# The analytics consumer alone (docs/design.md, analytics): what folding the
# log into the projection costs per event. Loads SESSIONS sessions with
# bench/scale/generate.sh (about ten events each, the mix the scale
# benchmark writes), then ROUNDS times: empties the projection (its tables
# and its position), starts `serve` with the relay off, and waits until the
# fold has reached the log's head; prints the time taken and the CPU the
# service and every PostgreSQL process spent, per event folded (from /proc:
# nothing else should run meanwhile). With BIN2, each round runs BIN and
# then BIN2, so two builds are compared in the same spells of the machine.
# MIX=creates keeps only the sessions' `session.created` events (what the
# fold costs per new session, the bulk of its work under create load).
#
#   bench/fold.sh
#   SESSIONS=50000 ROUNDS=5 bench/fold.sh
#   MIX=creates SESSIONS=60000 bench/fold.sh
#   BIN=/tmp/old/agent-sessions BIN2=./target/release/agent-sessions bench/fold.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-20000}
ROUNDS=${ROUNDS:-3}
PORT=${PORT_BENCH:-18016}
DB=bench_fold
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB

bash scripts/deps.sh
if [ -z "${BIN:-}" ]; then
  cargo build -q --release --bin agent-sessions
  BIN=./target/release/agent-sessions
fi
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL RUST_LOG=warn "$BIN" migrate
SESSIONS=$SESSIONS DATABASE_URL=$URL bash bench/scale/generate.sh
q() { psql "$URL" -X -qAt -c "$1"; }
if [ "${MIX:-scale}" = creates ]; then
  # (the log's append-only trigger is a user trigger: replica role skips it)
  q "SET session_replication_role = replica; DELETE FROM events WHERE event_type <> 'session.created'" >/dev/null
  q "VACUUM ANALYZE events"
fi
head=$(q "SELECT max(position) FROM events")
events=$(q "SELECT count(*) FROM events")
pg_jiffies() {
  local sum=0 p
  for p in $(pgrep -x postgres); do
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$sum"
}
hz=$(getconf CLK_TCK)

fold() { # $1: the build; prints "seconds svc_us pg_us" per event
  q "DELETE FROM analytics_sessions; DELETE FROM analytics_running; DELETE FROM analytics_keys;
     DELETE FROM relay_cursors WHERE name = 'analytics'; CHECKPOINT" >/dev/null
  local p0 t0 pid s p1 t1
  p0=$(pg_jiffies)
  t0=$(date +%s.%N)
  DATABASE_URL=$URL PORT=$PORT RUST_LOG=warn APP__AUTH__ENABLED=false APP__RELAY__ENABLED=false \
    APP__REDIS__CHANNEL_PREFIX="bench-fold:" "$1" serve &
  pid=$!
  for _ in $(seq 1 6000); do
    [ "$(q "SELECT position FROM relay_cursors WHERE name = 'analytics'")" = "$head" ] && break
    sleep 0.05
  done
  t1=$(date +%s.%N)
  s=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  p1=$(pg_jiffies)
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  [ "$(q "SELECT position FROM relay_cursors WHERE name = 'analytics'")" = "$head" ] ||
    { echo "fold.sh: the fold did not reach the log's head" >&2; exit 1; }
  awk -v n="$events" -v s="$s" -v p=$((p1 - p0)) -v hz="$hz" -v t0="$t0" -v t1="$t1" \
    'BEGIN { printf "%.2f %.1f %.1f\n", t1 - t0, s / hz * 1e6 / n, p / hz * 1e6 / n }'
}

median() { sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}'; }
declare -A secs svc pg
builds=(BIN)
[ -z "${BIN2:-}" ] || builds+=(BIN2)
for round in $(seq 1 "$ROUNDS"); do
  for b in "${builds[@]}"; do
    read -r t s p < <(fold "${!b}")
    echo "round $round, $b: $events events in $t s; per event: service $s µs, PostgreSQL $p µs" >&2
    secs[$b]+="$t " svc[$b]+="$s " pg[$b]+="$p "
  done
done
for b in "${builds[@]}"; do
  t=$(tr ' ' '\n' <<<"${secs[$b]}" | grep . | median)
  printf 'RESULT P14 fold_%s events_per_s=%.0f service_us=%s pg_us=%s events=%s rounds=%s build=%s\n' \
    "${b,,}" "$(echo "$events / $t" | bc -l)" \
    "$(tr ' ' '\n' <<<"${svc[$b]}" | grep . | median)" \
    "$(tr ' ' '\n' <<<"${pg[$b]}" | grep . | median)" "$events" "$ROUNDS" "${!b}"
done
