//! Retention: a tombstone per deleted session, and the one exception to the
//! log's append-only rule (the purge).
//!
//! A tombstone is written by the statement that deletes a session (with its
//! `session.deleted` event) and is kept for ever: it is how a purge finds
//! the streams whose grace period is over once their row is gone, and how an
//! import keeps refusing an id this database once held after the events that
//! said so are purged. `purged_at` records when the session's events went.
//!
//! The append-only trigger keeps refusing every UPDATE, DELETE and TRUNCATE
//! of `events`, except a DELETE of an event of a tombstoned session in a
//! transaction that set `agent_sessions.purge = 'on'` (the service's purge,
//! `store/retention.rs`, does so with `SET LOCAL`, and nothing else does).

const UP: &str = r#"
CREATE TABLE session_tombstones (
    session_id uuid PRIMARY KEY,
    deleted_at timestamptz NOT NULL,
    purged_at  timestamptz
);
CREATE INDEX session_tombstones_unpurged_idx
    ON session_tombstones (deleted_at) WHERE purged_at IS NULL;

-- Sessions deleted before tombstones existed.
INSERT INTO session_tombstones (session_id, deleted_at)
SELECT aggregate_id, max(occurred_at) FROM events
WHERE event_type = 'session.deleted'
GROUP BY aggregate_id
ON CONFLICT (session_id) DO NOTHING;

CREATE OR REPLACE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('agent_sessions.purge', true) = 'on'
       AND EXISTS (SELECT 1 FROM session_tombstones WHERE session_id = OLD.aggregate_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events is append-only (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
END
$$;
"#;

const DOWN: &str = r#"
CREATE OR REPLACE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only (% refused)', TG_OP USING ERRCODE = 'restrict_violation';
END
$$;
DROP TABLE IF EXISTS session_tombstones;
"#;

sql_migration!("m20261230_000006_create_session_tombstones", UP, DOWN);
