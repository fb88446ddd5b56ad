#!/usr/bin/env bash
# P1 and P2 (docs/design.md, performance targets): the service's create,
# update and read-by-id paths under wrk, and pgbench running the same SQL at
# the same concurrency, in one run. Prints each rate and the ratio
# service / pgbench for every connection count in CONNS, then the p50
# latency of each path with one request in flight (wrk --latency against
# pgbench's per-transaction log), with batching on (the default) and off
# (`database.batch_executors = 0`) side by side: batching must not make a
# request slower at low load, so the 1-in-flight RESULT's bound is the p50
# with batching off. A `RESULT ...` line per figure for bench/run.sh.
#
#   bench/p1p2.sh                      # 16 and 64 connections, 10 s each; 5 s at 1 in flight
#   CONNS="16 32" DURATION=20 bench/p1p2.sh
#   SINGLE=0 bench/p1p2.sh             # skip the 1-in-flight latencies
#   ROUNDS=1 bench/p1p2.sh             # one turn each (default 3: service, pgbench, service, ...;
#                                      # at 1 in flight batching on, off, on, ...; medians)
#   BIN=/tmp/old/agent-sessions bench/p1p2.sh   # measure another build (no cargo build)
#   PERF_DIR=/tmp/prof bench/p1p2.sh   # also `perf record` the service during each wrk run
#                                      # (<path>@<conns>.data; perf report --no-children)
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS_LIST=${CONNS:-16 64}
DURATION=${DURATION:-10}
SINGLE=${SINGLE:-5}   # seconds per path at 1 request in flight; 0 skips it
ROUNDS=${ROUNDS:-3}   # turns of service and pgbench (and of batching on and off at 1 in flight)
THREADS=${THREADS:-1}
SESSIONS=1000
PORT=${PORT_BENCH:-18011}
DB=bench_p1p2
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB
work=$(mktemp -d)

bash scripts/deps.sh
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [ -z "${BIN:-}" ]; then
  cargo build -q --release --bin agent-sessions --example p3_latency   # same set as p3.sh: no rebuild between them
  BIN=./target/release/agent-sessions
fi
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL "$BIN" migrate

cleanup() { stop_service; rm -rf "$work"; }
trap cleanup EXIT
stop_service() { [ -z "${pid:-}" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=; }; }
start_service() { # $1: pool size (the connection count under test); $2: drainers per lane (2; 0: batching off)
  stop_service
  DATABASE_URL=$URL PORT=$PORT RUST_LOG=warn APP__AUTH__ENABLED=false APP__SERVER__WORKERS=2 \
    APP__DATABASE__MAX_CONNECTIONS=$1 APP__DATABASE__BATCH_EXECUTORS=${2:-${APP__DATABASE__BATCH_EXECUTORS:-2}} APP__REDIS__CHANNEL_PREFIX="bench:" \
    "$BIN" serve &
  pid=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.1; done
}

# The create statement, exactly as the store sends it (literals for parameters).
results=()
payload='{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "bench", "runtime_backend": "unknown", "changes": {"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "bench", "status": "active", "context": {"n": 0}, "checkpoint": null, "runtime_backend": "unknown", "runtime_metadata": {}, "worker": null}}'
create_sql() { # $1: id expression
  cat <<SQL
WITH s AS (INSERT INTO sessions (id, agent_id, session_type, status, context, checkpoint, runtime_backend, runtime_metadata, worker, version, created_at, updated_at)
           SELECT $1, '550e8400-e29b-41d4-a716-446655440000'::uuid, 'bench', 'active', '{"n": 0}'::jsonb, NULL, 'unknown', '{}'::jsonb, NULL, 1, now(), now() RETURNING created_at, id),
     e AS (INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata, occurred_at)
           SELECT pg_current_xact_id()::text::bigint * 1024, gen_random_uuid(), 'session', s.id, 1, 'session.created', '$payload'::jsonb, '{"actor": "anonymous"}'::jsonb, s.created_at FROM s RETURNING position)
SELECT s.created_at FROM s, e;
SQL
}
# Fixed ids md5(n)::uuid for the sessions both sides update and read.
for n in $(seq 1 $SESSIONS); do create_sql "md5('$n')::uuid"; done | psql -q "$URL" >/dev/null
psql -qAt "$URL" -c "select md5(n::text)::uuid from generate_series(1, $SESSIONS) n" > "$work/ids"
cols="id, agent_id, session_type, status, context, checkpoint, runtime_backend, runtime_metadata, worker, version, created_at, updated_at"

create_sql "gen_random_uuid()" > "$work/create.sql"
# The update reference is issue 13's baseline: the per-request SQL of the
# store when the target was set (read, then the version-guarded write and
# its event). UPDATE2=0 runs instead the one statement the store now sends
# for a plain patch of `context` (the version read, the field set where it
# differs, the event appended): a harder reference, since the service's own
# path got shorter too.
if [ "${UPDATE2:-1}" = 1 ]; then
cat > "$work/update.sql" <<SQL
\set r random(1, $SESSIONS)
\set n random(1, 1000000000)
SELECT $cols, version AS v FROM sessions WHERE id = md5(:r::text)::uuid \gset
WITH u AS (UPDATE sessions SET context = jsonb_build_object('n', :n::bigint), version = :v::bigint + 1, updated_at = now()
           WHERE id = md5(:r::text)::uuid AND version = :v::bigint RETURNING updated_at),
     e AS (INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata, occurred_at)
           SELECT pg_current_xact_id()::text::bigint * 1024, gen_random_uuid(), 'session', md5(:r::text)::uuid, :v::bigint + 1, 'session.updated',
                  jsonb_build_object('agent_id', '550e8400-e29b-41d4-a716-446655440000', 'status', 'active', 'updates', '["context"]'::jsonb,
                                     'changes', jsonb_build_object('context', jsonb_build_object('n', :n::bigint))),
                  '{"actor": "anonymous"}'::jsonb, u.updated_at FROM u RETURNING position)
SELECT u.updated_at FROM u, e;
SQL
else
scols=$(sed -E 's/([a-z_]+)/s.\1/g' <<<"$cols")
cat > "$work/update.sql" <<SQL
\set r random(1, $SESSIONS)
\set n random(1, 1000000000)
WITH d AS (SELECT s.version AS planned, s.context IS DISTINCT FROM jsonb_build_object('n', :n::bigint) AS dc
           FROM sessions s WHERE s.id = md5(:r::text)::uuid),
     u AS (UPDATE sessions s SET context = CASE WHEN d.dc THEN jsonb_build_object('n', :n::bigint) ELSE s.context END,
                  version = d.planned + 1, updated_at = now()
           FROM d WHERE s.id = md5(:r::text)::uuid AND s.version = d.planned AND d.dc
           RETURNING $scols,
                  jsonb_build_object('agent_id', s.agent_id, 'status', s.status, 'updates', '["context"]'::jsonb,
                                     'changes', jsonb_build_object('context', s.context)) AS payload),
     e AS (INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, event_type, payload, metadata, occurred_at)
           SELECT pg_current_xact_id()::text::bigint * 1024, gen_random_uuid(), 'session', u.id, u.version, 'session.updated',
                  u.payload, '{"actor": "anonymous"}'::jsonb, u.updated_at FROM u RETURNING position)
SELECT u.* FROM u;
SQL
fi
cat > "$work/read.sql" <<SQL
\set r random(1, $SESSIONS)
SELECT $cols FROM sessions WHERE id = md5(:r::text)::uuid;
SQL

lua_ids() { printf 'local ids = {'; sed 's/.*/"&",/' "$work/ids" | tr -d '\n'; printf '}\n'; }
{ cat <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "bench", "context": {"n": 0}}'
LUA
} > "$work/create.lua"
{ lua_ids; cat <<'LUA'
local n = 0
request = function()
  n = n + 1
  local id = ids[math.random(#ids)]
  return wrk.format("PATCH", "/sessions/" .. id, {["Content-Type"] = "application/json"},
    '{"context": {"n": ' .. math.random(1000000000) .. '}}')
end
LUA
} > "$work/update.lua"
{ lua_ids; cat <<'LUA'
request = function()
  return wrk.format("GET", "/sessions/" .. ids[math.random(#ids)])
end
LUA
} > "$work/read.lua"

wrk_rate() { # $1: lua script, $2: connections
  local out rec=
  if [ -n "${PERF_DIR:-}" ]; then
    mkdir -p "$PERF_DIR"
    perf record -q -e cpu-clock -F 999 -g -p "$pid" -o "$PERF_DIR/$(basename "$1" .lua)@$2.data" \
      -- sleep "$DURATION" 2>/dev/null &
    rec=$!
  fi
  out=$(wrk -t$THREADS -c$2 -d${DURATION}s -s "$1" "http://127.0.0.1:$PORT/sessions/")
  if grep -q "Non-2xx" <<<"$out"; then echo "wrk: $(grep Non-2xx <<<"$out")" >&2; fi
  [ -z "$rec" ] || wait "$rec" || true
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}
pgbench_rate() { # $1: sql file, $2: connections
  pgbench -n -M prepared -c$2 -j$THREADS -T$DURATION -f "$1" "$URL" 2>"$work/pgbench.err" | awk '/^tps/ {print $3; exit}'
}
# One request in flight: the median round trip, in ms.
wrk_p50() { # $1: lua script
  local out; out=$(wrk -t1 -c1 -d${SINGLE}s --latency -s "$1" "http://127.0.0.1:$PORT/sessions/")
  if grep -q "Non-2xx" <<<"$out"; then echo "wrk: $(grep Non-2xx <<<"$out")" >&2; fi
  awk '$1 == "50%" { v = $2; u = v; sub(/[a-z]+$/, "", v); sub(/^[0-9.]+/, "", u);
         print (u == "us" ? v / 1000 : u == "s" ? v * 1000 : v); exit }' <<<"$out"
}
pgbench_p50() { # $1: sql file; median of the per-transaction log (microseconds, 3rd column)
  rm -f "$work"/pgl.*
  pgbench -n -M prepared -c1 -j1 -T$SINGLE -l --log-prefix="$work/pgl" -f "$1" "$URL" >/dev/null 2>"$work/pgbench.err" || return 1
  cat "$work"/pgl.* | awk '{print $3}' | sort -n | awk '{a[NR] = $1} END {if (NR) printf "%.3f\n", a[int((NR + 1) / 2)] / 1000}'
}
target_of() { case $1 in read) echo "P2 0.8" ;; *) echo "P1 1.0" ;; esac; }

# Wait (at most 120 s) until the relay and the analytics consumer have
# caught up with the log the runs before left behind (the previous path's
# events, and pgbench's, which write the same log while the service is
# stopped): their catching up shares the cores with the path under test and
# would count against whichever path runs next. Caught up means the relay
# has measured its lag (its gauge is absent until it leads) and found none,
# and the analytics projection's position (in the database: its gauge moves
# only when it folds) is the log's head (either is skipped when its
# APP__…__ENABLED=false turns it off for the run). Each path's own events are
# published and folded while it runs, as in production.
settle() {
  local lag behind
  for _ in $(seq 1 240); do
    lag=0
    [ "${APP__RELAY__ENABLED:-true}" = false ] ||
      lag=$(curl -s "localhost:$PORT/metrics" | awk '/^relay_lag_events / {l = $2} END {print l}')
    behind=0
    [ "${APP__ANALYTICS__ENABLED:-true}" = false ] ||
      behind=$(psql -qAt "$URL" -c "SELECT coalesce(max(position), 0) - coalesce((SELECT position FROM relay_cursors WHERE name = 'analytics'), 0) FROM events")
    [ "$lag" = 0 ] && [ "$behind" = 0 ] && return 0
    sleep 0.5
  done
  echo "settle: still catching up (relay lag ${lag:-not measured yet}, analytics $behind behind)" >&2
}
# The service is stopped while pgbench runs: its idle pool would otherwise
# hold connections PostgreSQL's max_connections (100 here) cannot spare at 64.
# With ROUNDS > 1 the service and pgbench take turns, ROUNDS times each, and
# each rate is the median of its rounds: on a shared machine one 10 s run
# can land on a slow spell (the same build's create@16 read 0.81 and 1.05
# in two runs an hour apart), and turns put both sides in the same spells.
median() { sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}'; }
declare -A svc pg
for conns in $CONNS_LIST; do
  svc=() pg=()
  for round in $(seq 1 "$ROUNDS"); do
    start_service "$conns"
    for path in create update read; do
      settle
      svc[$path]+="$(wrk_rate "$work/$path.lua" "$conns") "
      # What the relay had left to publish when the run ended: a relay that
      # fell behind would flatter the rate.
      echo "$path@$conns round $round: relay lag at the end of the run: $(curl -s "localhost:$PORT/metrics" | awk '/^relay_lag_events / {print $2}') events" >&2
    done
    stop_service
    for path in create update read; do
      p=$(pgbench_rate "$work/$path.sql" "$conns") || true
      [ -n "$p" ] || { echo "pgbench failed:" >&2; cat "$work/pgbench.err" >&2; exit 1; }
      pg[$path]+="$p "
    done
  done
  printf '%-22s %12s %12s %8s   %s\n' "path ($conns conns)" "service/s" "pgbench/s" "ratio" "rounds (service | pgbench)"
  for path in create update read; do
    s=$(tr ' ' '\n' <<<"${svc[$path]}" | grep . | median)
    p=$(tr ' ' '\n' <<<"${pg[$path]}" | grep . | median)
    ratio=$(echo "$s / $p" | bc -l)
    printf '%-22s %12.0f %12.0f %8.2f   %s| %s\n' "$path" "$s" "$p" "$ratio" "${svc[$path]}" "${pg[$path]}"
    read -r id target < <(target_of "$path")
    results+=("$(printf 'RESULT %s %s@%s ratio=%.2f target>=%s service=%.0f/s pgbench=%.0f/s rounds=%s' \
      "$id" "$path" "$conns" "$ratio" "$target" "$s" "$p" "$ROUNDS")")
  done
done

if [ "$SINGLE" != 0 ]; then
  declare -A on off
  for _ in $(seq 1 "$ROUNDS"); do
    start_service 8 2
    settle
    for path in create update read; do on[$path]+="$(wrk_p50 "$work/$path.lua") "; done
    start_service 8 0
    settle
    for path in create update read; do off[$path]+="$(wrk_p50 "$work/$path.lua") "; done
  done
  stop_service
  printf '%-22s %14s %14s %12s\n' "path (1 in flight)" "batching on" "batching off" "pgbench"
  for path in create update read; do
    s=$(tr ' ' '\n' <<<"${on[$path]}" | grep . | median)
    o=$(tr ' ' '\n' <<<"${off[$path]}" | grep . | median)
    p=$(pgbench_p50 "$work/$path.sql") || { echo "pgbench failed:" >&2; cat "$work/pgbench.err" >&2; exit 1; }
    printf '%-22s %11.3f ms %11.3f ms %9.3f ms\n' "$path" "$s" "$o" "$p"
    read -r id _ < <(target_of "$path")
    results+=("$(printf 'RESULT %s %s@1 p50_ms=%.3f target<=%.3f off_p50_ms=%.3f pgbench_p50_ms=%.3f rounds=%s' \
      "$id" "$path" "$s" "$o" "$o" "$p" "$ROUNDS")")
  done
fi
printf '%s\n' "${results[@]}"
