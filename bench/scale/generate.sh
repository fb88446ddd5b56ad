#!/usr/bin/env bash
# Loads 1 M sessions and about 10 M events into a freshly migrated
# agent-sessions database (bench/scale/load.sql says how), and prints how
# long each phase took.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/scale bench/scale/generate.sh
#   SESSIONS=100000 PARTS=4 DATABASE_URL=… bench/scale/generate.sh
#
# SESSIONS (default 1000000) sets the size; PARTS (default: the number of
# CPUs, at least 2) the number of event writers run side by side. The
# database must be migrated (`agent-sessions migrate`) and empty.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?set DATABASE_URL to a migrated, empty database}"
SESSIONS=${SESSIONS:-1000000}
PARTS=${PARTS:-$(( $(nproc) < 2 ? 2 : $(nproc) ))}
sql() { psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -v sessions="$SESSIONS" "$@" -f load.sql; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

t0=$(now)
sql -v phase=plan
t1=$(now)
echo "sessions and plan: $(secs "$t0" "$t1") s"
pids=()
for part in $(seq 0 $((PARTS - 1))); do
  sql -v phase=events -v part="$part" -v parts="$PARTS" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
t2=$(now)
echo "events ($PARTS writers): $(secs "$t1" "$t2") s"
sql -v phase=finish
t3=$(now)
echo "indexes and vacuum: $(secs "$t2" "$t3") s"
psql "$DATABASE_URL" -X -qAt -c "SELECT format('loaded %s sessions, %s events in %s s; database %s',
    (SELECT count(*) FROM sessions), (SELECT count(*) FROM events), '$(secs "$t0" "$t3")',
    pg_size_pretty(pg_database_size(current_database())))"
