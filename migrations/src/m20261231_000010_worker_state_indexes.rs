//! Lists by worker state at scale (docs/design.md, performance: list queries
//! and their indexes).
//!
//! `GET /sessions/?agent_id=A&worker_state=S` walked the worker-state index
//! and filtered the agent: for one of the busiest agents and a rare state it
//! visited hundreds of rows per page, each a heap page (p99 15–21 ms at 1 M
//! sessions). The new index walks exactly the page. Both worker-state
//! indexes leave out sessions whose worker never reported a state (most of
//! them, and every new one): a filter on a state never matches those, and a
//! create no longer writes to either index.

const UP: &str = r#"
DROP INDEX IF EXISTS sessions_worker_state_created_idx;
CREATE INDEX sessions_worker_state_created_idx
    ON sessions ((runtime_metadata -> 'worker' ->> 'state'), created_at DESC, id DESC)
    WHERE (runtime_metadata -> 'worker' ->> 'state') IS NOT NULL;
CREATE INDEX sessions_agent_worker_state_created_idx
    ON sessions (agent_id, (runtime_metadata -> 'worker' ->> 'state'), created_at DESC, id DESC)
    WHERE (runtime_metadata -> 'worker' ->> 'state') IS NOT NULL;
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS sessions_agent_worker_state_created_idx;
DROP INDEX IF EXISTS sessions_worker_state_created_idx;
CREATE INDEX sessions_worker_state_created_idx
    ON sessions ((runtime_metadata -> 'worker' ->> 'state'), created_at DESC, id DESC);
"#;

sql_migration!("m20261231_000010_worker_state_indexes", UP, DOWN);
