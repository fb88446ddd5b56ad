//! The feed's horizon: the highest position a reader may pass.
//!
//! A position is its writer's transaction id × 1024. A reader must not pass
//! the position of an event writer that is still open, or that writer's event
//! would later commit below where the reader already is (G3). The horizon is
//! therefore the smallest transaction id among *our own* open event writers —
//! those holding the shared advisory lock of `append.rs` — or, when none is
//! open, the snapshot's `xmax` (no transaction id at or above it had been
//! handed out when the snapshot was taken).
//!
//! Why it is safe. The horizon is computed in one statement (snapshot S) and
//! the feed is read in a later one. Take a writer W still open when the feed
//! is read. If W's id was assigned after S was taken, it is at least S's
//! `xmax`, which bounds the horizon. Otherwise W was running when S was taken,
//! so its id is in S's list of running ids, and since W announces itself
//! before its id exists, its lock and its `backend_xid` are both visible when
//! the statement reads `pg_locks` and `pg_stat_activity` (after S): the
//! horizon is at most W's id. Writers that committed before the read are
//! visible to it. A transaction that is not an event writer (another
//! database, an operator's `UPDATE`, a long `pg_dump`) holds nothing back.
//!
//! The SQL lives in the schema (migration 11; migration 12 pins its plans
//! to generic ones): `feed_writers`, `feed_horizon`,
//! and `feed_after`, which computes the horizon and reads the whole feed
//! below it in one call, so the relay, the analytics consumer and unfiltered
//! feed pages pay one round trip per read. Each of its statements takes a
//! snapshot of its own, in order, so the horizon comes from statements
//! earlier than the read: the argument above holds unchanged. Every horizon
//! (`feed_horizon`) first takes the oldest transaction running at all (the
//! same argument, counting every running transaction as a writer of ours)
//! and looks for our writers only when committed events wait past that.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::{Store, StoreError};

/// Our open event writers that were running when the statement's snapshot
/// was taken (the schema's `feed_writers`, migration 11).
const WRITERS_CTE: &str =
    "writers AS MATERIALIZED (SELECT * FROM feed_writers(pg_current_snapshot()))";

/// The oldest event writer still holding the horizon back.
#[derive(Debug, Clone, PartialEq)]
pub struct HorizonBlocker {
    pub pid: i32,
    pub database: Option<String>,
    pub state: Option<String>,
    pub transaction_started: Option<DateTime<Utc>>,
    pub query_started: Option<DateTime<Utc>>,
}

/// What holds the feed back, for metrics, logs and readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct HorizonReport {
    pub horizon: i64,
    /// Committed events at or above the horizon (capped at [`HELD_COUNT_CAP`]).
    pub held_events: i64,
    /// When the oldest of them committed (its `occurred_at`).
    pub oldest_held: Option<DateTime<Utc>>,
    pub blocker: Option<HorizonBlocker>,
}

/// The most events the monitor counts as held, and the relay as lag.
pub const HELD_COUNT_CAP: i64 = 100_000;

/// The committed events in `range` (a condition on `position`), counted
/// as `n` with the oldest `occurred_at` as `oldest`, at most
/// [`HELD_COUNT_CAP`] of them: the monitor's held events and the relay's
/// lag. Read along the position index (`ORDER BY position`): a bare
/// `count(*) ... WHERE position >= $1 LIMIT n` is planned, once the
/// statement's plan is generic, as a scan of the whole log (a third of the
/// table is the estimate for an unknown bound): 156 ms a second at 1.5 M
/// events, in the monitor that runs every second.
pub(super) fn backlog(range: &str) -> String {
    format!(
        "SELECT count(*) AS n, min(occurred_at) AS oldest FROM \
           (SELECT occurred_at FROM events WHERE {range} \
            ORDER BY position LIMIT {HELD_COUNT_CAP}) b"
    )
}

/// What the monitor runs every second, below the horizon `$1`.
static HORIZON_REPORT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {WRITERS_CTE}, oldest AS (SELECT * FROM writers ORDER BY xid LIMIT 1), \
              held AS ({held}) \
         SELECT held.n AS held, held.oldest AS oldest_held, \
                o.pid, o.datname, o.state, o.xact_start, o.query_start \
         FROM held LEFT JOIN oldest o ON o.xid * 1024 <= $1",
        held = backlog("position >= $1")
    )
});

impl Store {
    /// The exclusive upper bound of positions a reader may see now. Read the
    /// feed with a later statement than the one that computed it.
    pub async fn horizon(&self) -> Result<i64, StoreError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT feed_horizon() AS horizon",
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("horizon query returned nothing".into()))?;
        Ok(row.try_get("", "horizon")?)
    }

    /// The horizon, the events waiting behind it and who holds it
    /// ([`HORIZON_REPORT_SQL`]).
    pub async fn horizon_report(&self) -> Result<HorizonReport, StoreError> {
        let horizon = self.horizon().await?;
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                HORIZON_REPORT_SQL.as_str(),
                vec![horizon.into()],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("horizon report returned nothing".into()))?;
        let pid: Option<i32> = row.try_get("", "pid")?;
        let held_events: i64 = row.try_get("", "held")?;
        let blocker = match pid {
            Some(pid) if held_events > 0 => Some(HorizonBlocker {
                pid,
                database: row.try_get("", "datname")?,
                state: row.try_get("", "state")?,
                transaction_started: row.try_get("", "xact_start")?,
                query_started: row.try_get("", "query_start")?,
            }),
            _ => None,
        };
        Ok(HorizonReport {
            horizon,
            held_events,
            oldest_held: row.try_get("", "oldest_held")?,
            blocker,
        })
    }
}
