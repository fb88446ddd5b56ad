#!/usr/bin/env bash
# Analytics (docs/design.md 9.5, issue 14's acceptance: /analytics p99 <= 20 ms
# at 1 M sessions). Against a database loaded to scale: rebuild the analytics
# projection with `replay --analytics` (timed), start `serve`, then measure
# GET /analytics under wrk for each group_by over random ranges of 1, 7, 30
# and 90 days (first page: the default page size of 20 keys; ANALYTICS_LIMIT
# to change it), and print p50/p99 against the 20 ms target.
#
#   bash bench/analytics.sh
#
# Environment:
#   ANALYTICS_DB        database to use (default agent_sessions_analytics; kept).
#                       Point it at a database the scale generator loaded and
#                       nothing is loaded here.
#   ANALYTICS_SESSIONS  sessions to load when the database has none (default 1000000)
#   ANALYTICS_EVENTS    events per loaded session (default 10, so 10 M events)
#   ANALYTICS_AGENTS    distinct agents among loaded sessions (default 100)
#   ANALYTICS_DAYS      loaded sessions are created over this many days (default 90)
#   ANALYTICS_PROFILE   cargo profile of the binary (default release)
#   ANALYTICS_REBUILD   0 to keep the projection as it is (default 1: rebuild)
#   ANALYTICS_LIMIT     keys per page (default: the service's default, 20)
#   CONNS, DURATION     wrk connections and seconds per group_by (default 4, 10)
#   WARMUP              seconds of uncounted requests before each (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${ANALYTICS_DB:-agent_sessions_analytics}
N=${ANALYTICS_SESSIONS:-1000000}
E=${ANALYTICS_EVENTS:-10}
AGENTS=${ANALYTICS_AGENTS:-100}
DAYS=${ANALYTICS_DAYS:-90}
CONNS=${CONNS:-4}
DURATION=${DURATION:-10}
TARGET_MS=20
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
SERVE_TAG=analytics
# shellcheck source=scripts/lib/serve.sh
. scripts/lib/serve.sh
serve_build "${ANALYTICS_PROFILE:-release}"
serve_database "$DB" keep
WORK=$(mktemp -d /tmp/analytics.XXXXXX)
SERVE_ON_EXIT='rm -rf "$WORK"'
q() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qtAc "$1"; }

if [ "$(q 'SELECT count(*) FROM sessions')" = 0 ]; then
  [ "$E" -ge 4 ] || { echo "ANALYTICS_EVENTS must be at least 4" >&2; exit 2; }
  serve_say "loading $N sessions with $E events each (set-based, synchronous_commit off)"
  start=$SECONDS
  # Session g: agent g % AGENTS, type g % 4, created over DAYS days; its
  # events one minute apart: created, paused, active, context updates, a
  # worker record with spend, and a last move to its final status (g % 4:
  # active, paused, completed, crashed). The sessions row is what the
  # events fold to. Positions 1.. stay far below any live horizon.
  psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q <<SQL
SET synchronous_commit = off;
CREATE TEMP TABLE plan AS
SELECT g,
       md5('session' || g)::uuid AS id,
       md5('agent' || (g % $AGENTS))::uuid AS agent,
       (ARRAY['conversation', 'development', 'task', 'batch'])[1 + g % 4] AS stype,
       (ARRAY['active', 'paused', 'completed', 'crashed'])[1 + (g / 4) % 4] AS final,
       now() - make_interval(secs => ($DAYS * 86400.0) * g / $N) AS t0,
       (g % 1000) * 10 AS cost
FROM generate_series(1, $N) g;
INSERT INTO sessions (id, agent_id, session_type, status, context, checkpoint, runtime_backend,
                      runtime_metadata, worker, version, created_at, updated_at)
SELECT id, agent, stype, final, jsonb_build_object('n', $E - 2), NULL, 'unknown',
       jsonb_build_object('worker', jsonb_build_object('generation', 1, 'turns', $E - 1,
                                                       'cost_micro_usd', cost)),
       NULL, $E, t0, t0 + make_interval(mins => $E - 1)
FROM plan;
INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, event_type,
                    payload, metadata, occurred_at)
SELECT (p.g - 1) * $E + v, gen_random_uuid(), 'session', p.id, v,
       CASE WHEN v = 1 THEN 'session.created' ELSE 'session.updated' END,
       CASE
         WHEN v = 1 THEN jsonb_build_object('agent_id', p.agent, 'session_type', p.stype,
              'runtime_backend', 'unknown', 'changes', jsonb_build_object(
                'agent_id', p.agent, 'session_type', p.stype, 'status', 'active',
                'context', '{}'::jsonb, 'checkpoint', NULL, 'runtime_backend', 'unknown',
                'runtime_metadata', '{}'::jsonb, 'worker', NULL))
         WHEN v IN (2, 3) THEN jsonb_build_object('agent_id', p.agent,
              'status', CASE v WHEN 2 THEN 'paused' ELSE 'active' END, 'updates', '["status"]'::jsonb,
              'changes', jsonb_build_object('status', CASE v WHEN 2 THEN 'paused' ELSE 'active' END))
         WHEN v = $E - 1 THEN jsonb_build_object('agent_id', p.agent, 'status', 'active',
              'updates', '["runtime_metadata"]'::jsonb, 'changes', jsonb_build_object(
                'runtime_metadata', jsonb_build_object('worker', jsonb_build_object(
                  'generation', 1, 'turns', $E - 1, 'cost_micro_usd', p.cost))))
         WHEN v = $E AND p.final <> 'active' THEN jsonb_build_object('agent_id', p.agent,
              'status', p.final, 'updates', '["context", "status"]'::jsonb,
              'changes', jsonb_build_object('status', p.final, 'context', jsonb_build_object('n', v - 2)))
         ELSE jsonb_build_object('agent_id', p.agent, 'status', 'active', 'updates', '["context"]'::jsonb,
              'changes', jsonb_build_object('context', jsonb_build_object('n', v - 2)))
       END,
       '{"actor": "bench"}'::jsonb,
       p.t0 + make_interval(mins => v - 1)
FROM plan p CROSS JOIN generate_series(1, $E) v;
ANALYZE sessions;
ANALYZE events;
SQL
  echo "# loaded $N sessions, $((N * E)) events in $((SECONDS - start)) s"
fi

SESSIONS=$(q 'SELECT count(*) FROM sessions')
EVENTS=$(q 'SELECT count(*) FROM events')
echo "# analytics $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $SESSIONS sessions, $EVENTS events, profile ${ANALYTICS_PROFILE:-release}"
if [ "${ANALYTICS_REBUILD:-1}" = 1 ]; then
  start=$(date +%s.%N)
  RUST_LOG=warn "$SERVE_BIN" replay --analytics
  echo "# rebuild: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall for $EVENTS events"
fi
echo "# running rows: $(q 'SELECT count(*) FROM analytics_running'), keys: $(q "SELECT string_agg(dimension || ' ' || n, ', ') FROM (SELECT dimension, count(*) AS n FROM analytics_keys GROUP BY 1 ORDER BY 1) k"), days: $(q "SELECT count(DISTINCT day) FROM analytics_running WHERE dimension = 'all'")"

export APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="analytics-bench:"
serve_start "${ANALYTICS_PORT:-}"

# Ranges: 1, 7, 30 and 90 days at random offsets within the loaded days.
FIRST=$(q "SELECT coalesce(min(day), current_date) FROM analytics_running")
LAST=$(q "SELECT coalesce(max(day), current_date) FROM analytics_running")
cat >"$WORK/ranges.lua" <<'LUA'
local first = os.getenv("FIRST_DAY")
local span = tonumber(os.getenv("SPAN_DAYS"))
local group_by = os.getenv("GROUP_BY")
local y, m, d = first:match("(%d+)-(%d+)-(%d+)")
local t0 = os.time({year = tonumber(y), month = tonumber(m), day = tonumber(d), hour = 12})
local widths = {1, 7, 30, 90}
math.randomseed(os.time())
request = function()
  local w = widths[math.random(#widths)]
  local off = math.random(0, math.max(0, span - 1))
  local from = os.date("!%Y-%m-%d", t0 + off * 86400)
  local to = os.date("!%Y-%m-%d", t0 + (off + w) * 86400)
  local limit = os.getenv("LIMIT")
  local page = (limit ~= nil and limit ~= "") and ("&limit=" .. limit) or ""
  return wrk.format("GET", "/analytics?group_by=" .. group_by .. "&from=" .. from .. "&to=" .. to .. page)
end
LUA
SPAN=$(q "SELECT ('$LAST'::date - '$FIRST'::date) + 1")
printf '%-13s %10s %9s %9s %9s %s\n' group_by requests p50_ms p99_ms target verdict
: >"$WORK/results"
for g in status agent_id session_type day; do
  # Warm-up, not counted: the pool's connections open on demand and each new
  # PostgreSQL backend loads its catalog caches and plans the statement
  # afresh (the first seconds after start have a p99 of about 90 ms).
  FIRST_DAY=$FIRST SPAN_DAYS=$SPAN GROUP_BY=$g LIMIT=${ANALYTICS_LIMIT:-} \
    wrk -t1 -c"$CONNS" -d"${WARMUP:-3}s" -s "$WORK/ranges.lua" "$SERVE_URL" >/dev/null
  out=$(FIRST_DAY=$FIRST SPAN_DAYS=$SPAN GROUP_BY=$g LIMIT=${ANALYTICS_LIMIT:-} \
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/ranges.lua" "$SERVE_URL")
  if grep -q "Non-2xx" <<<"$out"; then echo "wrk: $(grep Non-2xx <<<"$out")" >&2; fi
  ms() { # wrk latency ("812.00us", "3.21ms", "1.02s") in ms
    awk -v p="$1" '$1 == p {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.2f", v}' <<<"$out"
  }
  p50=$(ms 50%); p99=$(ms 99%)
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  verdict=$(python3 -c "print('met' if $p99 <= $TARGET_MS else 'NOT met')")
  printf '%-13s %10s %9s %9s %9s %s\n' "$g" "$n" "$p50" "$p99" "<= $TARGET_MS" "$verdict"
  echo "RESULT A analytics_${g}_p99 ms=$p99 target<=$TARGET_MS p50_ms=$p50" >>"$WORK/results"
done
# For bench/run.sh (ONLY=analytics): one line per group_by.
cat "$WORK/results"
