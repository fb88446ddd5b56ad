//! The analytics projection (`GET /analytics`, the `sessions` gauge): one
//! summary row per live session and pre-aggregated buckets, both kept in
//! step with the event log by the analytics consumer inside `serve` and
//! rebuilt from the log by `agent-sessions replay --analytics`. Its position
//! in the log is the `analytics` row of `relay_cursors`, written in the same
//! transaction as the rows it covers.
//!
//! A bucket sums the summaries of the sessions created on one UTC day with
//! one value of a dimension (`agent_id`, `session_type`; or `all`, split by
//! status), so a query over a range reads days × values rows, never the
//! sessions. Sums of instants are epoch microseconds in `numeric` (a
//! million sessions' overflow `bigint`).

const UP: &str = r#"
CREATE TABLE analytics_sessions (
    session_id         uuid PRIMARY KEY,
    agent_id           uuid        NOT NULL,
    session_type       text        NOT NULL,
    status             text        NOT NULL,
    created_at         timestamptz NOT NULL,
    -- When the session took its current status (for `completed`, when it ended).
    status_since       timestamptz NOT NULL,
    -- Closed stretches in each status, in microseconds.
    active_us          bigint      NOT NULL,
    paused_us          bigint      NOT NULL,
    crashed_us         bigint      NOT NULL,
    pauses             bigint      NOT NULL,
    resumes            bigint      NOT NULL,
    recoveries         bigint      NOT NULL,
    crashes            bigint      NOT NULL,
    worker_generations bigint      NOT NULL,
    restarts           bigint      NOT NULL,
    turns              bigint      NOT NULL,
    input_tokens       bigint      NOT NULL,
    output_tokens      bigint      NOT NULL,
    cost_micro_usd     bigint      NOT NULL
);

CREATE TABLE analytics_buckets (
    dimension          text    NOT NULL CHECK (dimension IN ('all', 'agent_id', 'session_type')),
    day                date    NOT NULL,
    value              text    NOT NULL,
    -- The sessions' status for `all` (so sums split by status); '' for the
    -- other dimensions, whose rows count each status in columns instead.
    status             text    NOT NULL,
    sessions           bigint  NOT NULL,
    n_active           bigint  NOT NULL,
    n_paused           bigint  NOT NULL,
    n_completed        bigint  NOT NULL,
    n_crashed          bigint  NOT NULL,
    -- Σ creation instants; Σ end instants of the completed sessions; Σ the
    -- instants the others took their status, per status (epoch µs). Open
    -- stretches are n × now − Σ, computed when read.
    created_us         numeric NOT NULL,
    ended_us           numeric NOT NULL,
    active_since_us    numeric NOT NULL,
    paused_since_us    numeric NOT NULL,
    crashed_since_us   numeric NOT NULL,
    active_us          bigint  NOT NULL,
    paused_us          bigint  NOT NULL,
    crashed_us         bigint  NOT NULL,
    pauses             bigint  NOT NULL,
    resumes            bigint  NOT NULL,
    recoveries         bigint  NOT NULL,
    crashes            bigint  NOT NULL,
    worker_generations bigint  NOT NULL,
    restarts           bigint  NOT NULL,
    turns              bigint  NOT NULL,
    input_tokens       bigint  NOT NULL,
    output_tokens      bigint  NOT NULL,
    cost_micro_usd     bigint  NOT NULL,
    PRIMARY KEY (dimension, day, value, status)
);

-- A whole number from the worker record the way the service reads it
-- (serde, leniently): a JSON integer from 0 to `max`, else NULL; kept
-- within bigint. The rebuild of the projection reads the record with it.
CREATE FUNCTION analytics_whole(v jsonb, max numeric) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' AND (v #>> '{}') ~ '^[0-9]{1,20}$'
                THEN CASE WHEN (v #>> '{}')::numeric <= max
                          THEN least((v #>> '{}')::numeric, 9223372036854775807)::bigint END
           END
$$;
"#;

const DOWN: &str = r#"
DROP FUNCTION IF EXISTS analytics_whole(jsonb, numeric);
DROP TABLE IF EXISTS analytics_buckets;
DROP TABLE IF EXISTS analytics_sessions;
DELETE FROM relay_cursors WHERE name = 'analytics';
"#;

sql_migration!("m20261230_000007_create_session_analytics", UP, DOWN);
