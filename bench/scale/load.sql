-- Loads a synthetic but realistic population into an empty, migrated
-- agent-sessions database: :sessions sessions and about 10 events each.
-- Run by bench/scale/generate.sh (psql variables: sessions, part, parts).
--
-- Phases (each selected with -v phase=…):
--   plan     a staging plan (one row per session), the sessions rows, and the
--            secondary indexes and unique constraints of sessions and events
--            set aside (their definitions are kept and rebuilt in `finish`)
--   events   the events of every chunk k with k % :parts = :part, one
--            transaction per chunk (run :parts of these side by side)
--   finish   indexes and constraints rebuilt, staging dropped, vacuumed
--
-- Positions follow the service's rule (docs/design.md, positions): an
-- event's position is its writing transaction's id × 1024 plus its index in
-- that transaction, and a transaction writes at most 1000 events (as
-- `POST /sessions/import` does per transaction id). Each chunk is a set of
-- whole sessions (by creation time) holding at most 1019 events, written by
-- one transaction that announces itself as an event writer first (the shared
-- advisory lock of store/append.rs), so a feed reader running during the
-- load never sees a gap filled behind it.

\set ON_ERROR_STOP on
SET client_min_messages = warning;

SELECT :'phase' = 'plan' AS is_plan, :'phase' = 'events' AS is_events,
       :'phase' = 'finish' AS is_finish \gset

\if :is_plan
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM sessions) OR EXISTS (SELECT 1 FROM events) THEN
        RAISE EXCEPTION 'the database is not empty: load into a freshly migrated one';
    END IF;
END $$;

DROP TABLE IF EXISTS bench_scale_plan, bench_scale_ddl;

-- Definitions to rebuild after the load: unique/primary constraints and
-- plain indexes of the two big tables.
CREATE UNLOGGED TABLE bench_scale_ddl AS
SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', c.conrelid::regclass, c.conname) AS drop_sql,
       format('ALTER TABLE %s ADD CONSTRAINT %I %s', c.conrelid::regclass, c.conname,
              pg_get_constraintdef(c.oid)) AS create_sql
FROM pg_constraint c
WHERE c.conrelid IN ('sessions'::regclass, 'events'::regclass) AND c.contype IN ('p', 'u')
UNION ALL
SELECT format('DROP INDEX %s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
FROM pg_index i
WHERE i.indrelid IN ('sessions'::regclass, 'events'::regclass)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid);

SELECT drop_sql FROM bench_scale_ddl \gexec

-- One row per session, in creation order (ord). Distributions:
--   created_at  over the last 180 days, denser towards now
--   agent       2,000 agents, a few very busy (power law)
--   type        task 50 %, conversation 25 %, review 12 %, batch 8 %, 20 rare ones 5 %
--   backend     local 45 %, kubernetes 45 %, unknown 10 %
--   status      completed 65 %, crashed 10 %, paused 10 %, active 15 %
--               (sessions of the last day are mostly active)
--   worker      40 % have a worker spec; their runtime_metadata.worker.state
--               follows the status
--   events      1 + floor(Exp(mean 9.7)), at most 40: about 10 on average
--   forks       2 % were forked (at version 1) from an earlier session
CREATE UNLOGGED TABLE bench_scale_plan AS
WITH raw AS (
    SELECT now() - interval '180 days' * power(random(), 1.4) AS created_at,
           floor(2000 * power(random(), 3))::int AS agent,
           random() AS r_type, random() AS r_backend, random() AS r_status,
           random() AS r_worker, random() AS r_state, random() AS r_fork,
           least(40, 1 + floor(-ln(1 - random()) * 9.7))::int AS events,
           random() AS r_span
    FROM generate_series(1, :sessions)
), ordered AS (
    SELECT row_number() OVER (ORDER BY created_at) AS ord, * FROM raw
)
SELECT ord,
       md5('scale-session-' || ord)::uuid AS id,
       md5('scale-agent-' || agent)::uuid AS agent_id,
       CASE WHEN r_type < 0.50 THEN 'task' WHEN r_type < 0.75 THEN 'conversation'
            WHEN r_type < 0.87 THEN 'review' WHEN r_type < 0.95 THEN 'batch'
            ELSE 'eval-' || floor((r_type - 0.95) * 400)::int END AS session_type,
       CASE WHEN r_backend < 0.45 THEN 'local' WHEN r_backend < 0.90 THEN 'kubernetes'
            ELSE 'unknown' END AS runtime_backend,
       CASE WHEN created_at > now() - interval '1 day' AND r_status < 0.6 THEN 'active'
            WHEN r_status < 0.65 THEN 'completed' WHEN r_status < 0.75 THEN 'crashed'
            WHEN r_status < 0.85 THEN 'paused' ELSE 'active' END AS status,
       r_worker < 0.4 AS has_worker,
       r_state,
       events,
       created_at,
       least(now(), created_at + (events - 1) * interval '1 minute' * (1 + 30 * r_span)) AS updated_at,
       CASE WHEN r_fork < 0.02 AND ord > 1
            THEN md5('scale-session-' || (1 + floor(random() * (ord - 1)))::bigint)::uuid END AS parent_session_id
FROM ordered;

-- The worker's reported state follows the session's status; the final
-- projection columns.
ALTER TABLE bench_scale_plan
    ADD COLUMN worker jsonb, ADD COLUMN runtime_metadata jsonb, ADD COLUMN context jsonb,
    ADD COLUMN chunk int;
UPDATE bench_scale_plan p SET
    worker = CASE WHEN has_worker THEN jsonb_build_object(
                 'prompt', 'Work on ticket ' || ord || ' and report back.',
                 'max_budget_usd', 0.5 + (ord % 4)) END,
    runtime_metadata = CASE
        WHEN has_worker AND events > 1 THEN jsonb_build_object('worker', jsonb_build_object(
            'state', CASE WHEN status IN ('completed', 'crashed') THEN 'exited'
                          WHEN status = 'paused' THEN CASE WHEN r_state < 0.8 THEN 'exited' ELSE 'stopping' END
                          WHEN r_state < 0.5 THEN 'running' WHEN r_state < 0.8 THEN 'idle'
                          WHEN r_state < 0.9 THEN 'awaiting_approval' ELSE 'starting' END,
            'generation', 1 + (ord % 3)))
        WHEN runtime_backend = 'kubernetes' THEN jsonb_build_object('namespace', 'agents', 'node', 'node-' || (ord % 16))
        ELSE '{}'::jsonb END,
    context = jsonb_build_object('goal', 'bench task ' || ord, 'step', events),
    chunk = c.chunk
FROM (SELECT ord AS o, ((sum(events) OVER (ORDER BY ord) - events) / 980)::int AS chunk
      FROM bench_scale_plan) c
WHERE c.o = p.ord;
CREATE INDEX ON bench_scale_plan (chunk);
ANALYZE bench_scale_plan;

INSERT INTO sessions (id, agent_id, session_type, status, context, checkpoint, runtime_backend,
                      runtime_metadata, worker, usage, parent_session_id, forked_from_version,
                      version, created_at, updated_at)
SELECT id, agent_id, session_type, status, context, NULL, runtime_backend,
       runtime_metadata, worker, '{}'::jsonb, parent_session_id,
       CASE WHEN parent_session_id IS NOT NULL THEN 1 END,
       events, created_at, updated_at
FROM bench_scale_plan ORDER BY ord;

SELECT max(chunk) + 1 AS chunks, sum(events) AS events FROM bench_scale_plan \gset
\echo plan: :sessions sessions, :events events in :chunks transactions

-- One chunk, one transaction: announce, then write the chunk's events.
CREATE OR REPLACE PROCEDURE bench_scale_events(part int, parts int) LANGUAGE plpgsql AS $proc$
DECLARE
    k int;
    last_chunk int := (SELECT max(chunk) FROM bench_scale_plan);
BEGIN
    FOR k IN part..last_chunk BY parts LOOP
        PERFORM pg_advisory_xact_lock_shared(1634169701, 2003986804);
        INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, event_type,
                            payload, metadata, occurred_at)
        SELECT pg_current_xact_id()::text::bigint * 1024
                   + row_number() OVER (ORDER BY p.ord, v) - 1,
               gen_random_uuid(), 'session', p.id, v,
               CASE WHEN v = 1 THEN 'session.created' ELSE 'session.updated' END,
               CASE WHEN v = 1 THEN
                   jsonb_build_object('agent_id', p.agent_id, 'session_type', p.session_type,
                                      'runtime_backend', p.runtime_backend,
                                      'changes', jsonb_build_object(
                                          'agent_id', p.agent_id, 'session_type', p.session_type,
                                          'status', CASE WHEN p.events = 1 THEN p.status ELSE 'active' END,
                                          'context', jsonb_build_object('goal', 'bench task ' || p.ord, 'step', 1),
                                          'checkpoint', NULL, 'runtime_backend', p.runtime_backend,
                                          'runtime_metadata', CASE WHEN p.events = 1 THEN p.runtime_metadata ELSE '{}'::jsonb END,
                                          'worker', p.worker)
                                      || fork.changes)
                   || fork.changes
               WHEN v < p.events THEN
                   jsonb_build_object('agent_id', p.agent_id, 'status', 'active',
                                      'updates', '["context"]'::jsonb,
                                      'changes', jsonb_build_object('context',
                                          jsonb_build_object('goal', 'bench task ' || p.ord, 'step', v)))
               ELSE
                   jsonb_build_object('agent_id', p.agent_id, 'status', p.status,
                                      'updates', '["context", "runtime_metadata", "status"]'::jsonb,
                                      'changes', jsonb_build_object('status', p.status,
                                          'context', p.context, 'runtime_metadata', p.runtime_metadata))
               END,
               jsonb_build_object('actor', 'bench', 'request_id', 'scale-' || p.ord || '-' || v),
               CASE WHEN v = p.events THEN p.updated_at
                    ELSE p.created_at + (p.updated_at - p.created_at) * (v - 1) / greatest(p.events - 1, 1) END
        FROM bench_scale_plan p
        CROSS JOIN LATERAL generate_series(1, p.events) v
        CROSS JOIN LATERAL (SELECT CASE WHEN p.parent_session_id IS NULL THEN '{}'::jsonb
                                   ELSE jsonb_build_object('forked_from', jsonb_build_object(
                                            'session_id', p.parent_session_id, 'version', 1)) END AS changes) fork
        WHERE p.chunk = k;
        COMMIT;
    END LOOP;
END
$proc$;
\endif

\if :is_events
-- Durability of each chunk's commit is not needed until the load ends.
SET synchronous_commit = off;
CALL bench_scale_events(:part, :parts);
\endif

\if :is_finish
SET maintenance_work_mem = '1GB';
SELECT create_sql FROM bench_scale_ddl \gexec
DROP PROCEDURE IF EXISTS bench_scale_events(int, int);
DROP TABLE bench_scale_plan, bench_scale_ddl;
-- Visibility map and hint bits set now, not by the first readers.
VACUUM (ANALYZE) sessions;
VACUUM (ANALYZE) events;
\endif
