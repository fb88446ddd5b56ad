//! The running sums of the worker record's figures become `numeric`.
//!
//! A session's worker figures (generation, restarts, turns, tokens, cost)
//! come from `runtime_metadata.worker`, which a client may write with any
//! whole number up to 2^64 − 1; a summary keeps each up to the largest
//! bigint. Two such sessions of one key made the key's running sum leave
//! bigint, and the fold (and a rebuild) failed on that page for good: the
//! projection stopped at it. The instants' sums were `numeric` already for
//! the same reason; these join them. Answers still saturate at the largest
//! bigint (`store/analytics.rs`); `down` saturates the sums the same way.

const UP: &str = r#"
ALTER TABLE analytics_running
    ALTER COLUMN worker_generations TYPE numeric,
    ALTER COLUMN restarts TYPE numeric,
    ALTER COLUMN turns TYPE numeric,
    ALTER COLUMN input_tokens TYPE numeric,
    ALTER COLUMN output_tokens TYPE numeric,
    ALTER COLUMN cost_micro_usd TYPE numeric;
"#;

const DOWN: &str = r#"
ALTER TABLE analytics_running
    ALTER COLUMN worker_generations TYPE bigint USING least(worker_generations, 9223372036854775807)::bigint,
    ALTER COLUMN restarts TYPE bigint USING least(restarts, 9223372036854775807)::bigint,
    ALTER COLUMN turns TYPE bigint USING least(turns, 9223372036854775807)::bigint,
    ALTER COLUMN input_tokens TYPE bigint USING least(input_tokens, 9223372036854775807)::bigint,
    ALTER COLUMN output_tokens TYPE bigint USING least(output_tokens, 9223372036854775807)::bigint,
    ALTER COLUMN cost_micro_usd TYPE bigint USING least(cost_micro_usd, 9223372036854775807)::bigint;
"#;

sql_migration!("m20261231_000013_analytics_worker_sums_numeric", UP, DOWN);
