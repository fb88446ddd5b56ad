#!/usr/bin/env bash
# P1 and P2 (docs/design.md, performance targets): the service's create,
# update and read-by-id paths under wrk, and pgbench running the same SQL at
# the same concurrency, in one run. Prints each rate and the ratio
# service / pgbench.
#
#   bench/p1p2.sh            # 16 connections, 10 s per measurement
#   CONNS=32 DURATION=20 bench/p1p2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-16}
DURATION=${DURATION:-10}
THREADS=${THREADS:-1}
SESSIONS=1000
PORT=${PORT_BENCH:-18011}
DB=bench_p1p2
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
URL=postgres://postgres@127.0.0.1:5432/$DB
work=$(mktemp -d)

bash scripts/deps.sh
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build -q --release --bin agent-sessions --example p3_latency   # same set as p3.sh: no rebuild between them
psql "$ADMIN" -qc "drop database if exists $DB with (force)" -qc "create database $DB"
DATABASE_URL=$URL ./target/release/agent-sessions migrate

cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
DATABASE_URL=$URL PORT=$PORT RUST_LOG=warn APP__AUTH__ENABLED=false APP__SERVER__WORKERS=2 \
  APP__DATABASE__MAX_CONNECTIONS=$CONNS APP__REDIS__CHANNEL_PREFIX="bench:" \
  ./target/release/agent-sessions serve &
pid=$!
for _ in $(seq 1 100); do curl -s -o /dev/null "localhost:$PORT/healthz" && break; sleep 0.1; done

# The create statement, exactly as the store sends it (literals for parameters).
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

wrk_rate() { # $1: lua script
  local out; out=$(wrk -t$THREADS -c$CONNS -d${DURATION}s -s "$1" "http://127.0.0.1:$PORT/sessions/")
  if grep -q "Non-2xx" <<<"$out"; then echo "wrk: $(grep Non-2xx <<<"$out")" >&2; fi
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}
pgbench_rate() { # $1: sql file
  pgbench -n -M prepared -c$CONNS -j$THREADS -T$DURATION -f "$1" "$URL" 2>"$work/pgbench.err" | awk '/^tps/ {print $3; exit}'
}

printf '%-22s %12s %12s %8s\n' "path ($CONNS conns)" "service/s" "pgbench/s" "ratio"
for path in create update read; do
  s=$(wrk_rate "$work/$path.lua")
  p=$(pgbench_rate "$work/$path.sql") || true
  [ -n "$p" ] || { echo "pgbench failed:" >&2; cat "$work/pgbench.err" >&2; exit 1; }
  printf '%-22s %12.0f %12.0f %8.2f\n' "$path" "$s" "$p" "$(echo "$s / $p" | bc -l)"
done
