//! The feed functions of migration 11 keep one plan per statement.
//!
//! PL/pgSQL plans each statement with the function's variables as
//! parameters and, like any prepared statement, chooses between a plan for
//! the values at hand (planned again at every call) and a generic one. For
//! `position > after AND position < horizon ... LIMIT page` the generic
//! plan's estimate (a range of unknown width) is always dearer than a
//! custom plan's (a few rows at the end of the log), so PostgreSQL planned
//! the read again at every call: a sixth of the relay's backend under write
//! load went to the planner. Every statement of these functions reads the
//! position index the same way whatever the values, so the generic plan is
//! the right one: `plan_cache_mode = force_generic_plan` for the two
//! functions (a 30-event `feed_after` 0.19 ms → 0.14 ms on an idle
//! database, bench/RESULTS.md).

const UP: &str = r#"
ALTER FUNCTION feed_horizon() SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION feed_after(bigint, integer) SET plan_cache_mode = force_generic_plan;
"#;

const DOWN: &str = r#"
ALTER FUNCTION feed_after(bigint, integer) RESET plan_cache_mode;
ALTER FUNCTION feed_horizon() RESET plan_cache_mode;
"#;

sql_migration!("m20261231_000012_feed_generic_plans", UP, DOWN);
