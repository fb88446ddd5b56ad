//! The session projection, the append-only event log and idempotency keys.
//!
//! `events.position` is the writing transaction's id (`xid8`) times 1024 plus
//! the event's index within that transaction. Readers of the global feed only
//! return positions below the oldest event writer still open (the service's
//! `store/horizon.rs`), so an event that commits late can never appear below a
//! position a reader has already passed (G3 in docs/design.md), and writers
//! never serialise on a lock.

const UP: &str = r#"
CREATE TABLE sessions (
    id               uuid PRIMARY KEY,
    agent_id         uuid        NOT NULL,
    session_type     text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('active', 'paused', 'completed', 'crashed')),
    context          jsonb       NOT NULL,
    checkpoint       jsonb,
    runtime_backend  text        NOT NULL CHECK (runtime_backend IN ('local', 'kubernetes', 'unknown')),
    runtime_metadata jsonb       NOT NULL,
    worker           jsonb,
    version          bigint      NOT NULL CHECK (version >= 1),
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX sessions_created_idx         ON sessions (created_at DESC, id DESC);
CREATE INDEX sessions_agent_created_idx   ON sessions (agent_id, created_at DESC, id DESC);
CREATE INDEX sessions_status_created_idx  ON sessions (status, created_at DESC, id DESC);
CREATE INDEX sessions_type_created_idx    ON sessions (session_type, created_at DESC, id DESC);
CREATE INDEX sessions_backend_created_idx ON sessions (runtime_backend, created_at DESC, id DESC);
CREATE INDEX sessions_updated_idx         ON sessions (updated_at);

CREATE TABLE events (
    position       bigint PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    aggregate_type text        NOT NULL,
    aggregate_id   uuid        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 1),
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    occurred_at    timestamptz NOT NULL,
    UNIQUE (aggregate_id, version)
);

-- The log is append-only: no statement may change or remove an event.
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request_hash text        NOT NULL,
    session_id   uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS idempotency_keys;
DROP TABLE IF EXISTS events;
DROP FUNCTION IF EXISTS events_append_only();
DROP TABLE IF EXISTS sessions;
"#;

sql_migration!("m20261121_000001_create_sessions_and_events", UP, DOWN);
