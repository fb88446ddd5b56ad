//! Live sessions: the queue of inputs a client sends a session (messages,
//! interrupts, approval answers), the tool approvals its worker asks for, and
//! an index for listing sessions by the worker state the runner reports.
//!
//! Both tables hang off a session like `session_messages`: the statement that
//! deletes a session deletes their rows too. An input's idempotency key is an
//! `idempotency_keys` row that also names the input.

const UP: &str = r#"
CREATE TABLE session_inputs (
    session_id uuid        NOT NULL,
    seq        bigint      NOT NULL CHECK (seq >= 1),
    id         uuid        NOT NULL UNIQUE,
    kind       text        NOT NULL CHECK (kind IN ('message', 'interrupt', 'approval')),
    body       jsonb       NOT NULL,
    actor      text        NOT NULL,
    -- The session's version after the event that queued it (what a retry
    -- with the same idempotency key answers).
    version    bigint      NOT NULL CHECK (version >= 1),
    created_at timestamptz NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE session_approvals (
    session_id    uuid        NOT NULL,
    request_id    text        NOT NULL,
    tool_name     text        NOT NULL,
    input         jsonb       NOT NULL,
    generation    bigint      NOT NULL CHECK (generation >= 0),
    tool_use_id   text,
    status        text        NOT NULL CHECK (status IN ('pending', 'allowed', 'denied')),
    requested_at  timestamptz NOT NULL,
    decided_at    timestamptz,
    decided_by    text,
    message       text,
    updated_input jsonb,
    reason        text,
    PRIMARY KEY (session_id, request_id)
);

ALTER TABLE idempotency_keys ADD COLUMN input_id uuid;

CREATE INDEX sessions_worker_state_created_idx
    ON sessions ((runtime_metadata -> 'worker' ->> 'state'), created_at DESC, id DESC);
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS sessions_worker_state_created_idx;
ALTER TABLE idempotency_keys DROP COLUMN IF EXISTS input_id;
DROP TABLE IF EXISTS session_approvals;
DROP TABLE IF EXISTS session_inputs;
"#;

sql_migration!(
    "m20261129_000004_create_session_inputs_and_approvals",
    UP,
    DOWN
);
