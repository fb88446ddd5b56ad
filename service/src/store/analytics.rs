//! The analytics projection (`analytics_sessions`, `analytics_running`,
//! `analytics_keys`): folding new events into it, rebuilding it from the
//! whole log, and the reads behind `GET /sessions/{id}/metrics`,
//! `GET /analytics` and the `sessions` gauge.
//!
//! `analytics_running` keeps, per key (dimension, value, status) and per
//! UTC day on which a session of the key was created, the sums over the
//! key's sessions created up to that day. A range is the difference of two
//! rows, so a query reads two rows per key whatever the range's length.
//!
//! The projection's position is the `analytics` row of `relay_cursors`. A
//! fold and a rebuild each lock that row first and move it in the same
//! transaction as the rows they write, so the projection always holds
//! exactly the events up to its position, whoever writes it (a deposed
//! consumer or a rebuild running beside one finds the row moved and stops).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqlErr, Statement,
    TransactionTrait, Value as Param,
};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::session_batches::column;
use super::{Store, StoreError};
use crate::contract::metrics::{
    AnalyticsGroup, ChangedFields, GroupBy, StatusCounts, TimeInStatus, tally_change,
    tally_change_of,
};
use crate::domain::metrics::{Tally, TallyChange, tally};
use crate::domain::{EventKind, SessionStatus};

/// The projection's cursor in `relay_cursors`.
pub const ANALYTICS_CURSOR: &str = "analytics";

/// Events read per page when folding one session's stream.
const STREAM_PAGE: u64 = 1000;

const TALLY_COLUMNS: &str = "session_id, agent_id, session_type, status, created_at, \
     status_since, active_us, paused_us, crashed_us, pauses, resumes, recoveries, crashes, \
     worker_generations, restarts, turns, input_tokens, output_tokens, cost_micro_usd";

/// The summed columns of a running row, in order (see the migrations).
const SUMS: [&str; 23] = [
    "sessions",
    "n_active",
    "n_paused",
    "n_completed",
    "n_crashed",
    "created_us",
    "ended_us",
    "active_since_us",
    "paused_since_us",
    "crashed_since_us",
    "active_us",
    "paused_us",
    "crashed_us",
    "pauses",
    "resumes",
    "recoveries",
    "crashes",
    "worker_generations",
    "restarts",
    "turns",
    "input_tokens",
    "output_tokens",
    "cost_micro_usd",
];

/// Where, in [`SUMS`], the sums of instants (epoch microseconds) lie, and
/// where the worker record's figures start (they run to its end).
const INSTANT_SUMS: std::ops::Range<usize> = 5..10;
const WORKER_SUMS: std::ops::RangeFrom<usize> = 17..;

/// Whether a sum may leave bigint, and so is `numeric` in the tables and
/// read as decimal text: the sums of instants, and those of the worker
/// record's figures, each of which a client may set to any whole number up
/// to 2^64 − 1 (a summary keeps it up to the largest bigint; two such
/// sessions' sum is beyond it, migration 13).
fn is_wide(column: &str) -> bool {
    SUMS[INSTANT_SUMS].contains(&column) || SUMS[WORKER_SUMS].contains(&column)
}

/// `f` of each column of [`SUMS`], in order, joined by commas: the column
/// lists of the projection's statements.
fn each_sum(f: impl Fn(&str) -> String) -> String {
    SUMS.iter().map(|c| f(c)).collect::<Vec<_>>().join(", ")
}

/// A group's figures from its sums (in the order of `SUMS`), as of `now`
/// (epoch µs): open stretches run to `now`, n × now − Σ since.
fn group_of(key: String, s: &[i128; 23], now: i128) -> AnalyticsGroup {
    let [
        sessions,
        n_active,
        n_paused,
        n_completed,
        n_crashed,
        created_us,
        ended_us,
        active_since_us,
        paused_since_us,
        crashed_since_us,
        active_us,
        paused_us,
        crashed_us,
        pauses,
        resumes,
        recoveries,
        crashes,
        worker_generations,
        restarts,
        turns,
        input_tokens,
        output_tokens,
        cost_micro_usd,
    ] = *s;
    let n = |v: i128| i64::try_from(v.max(0)).unwrap_or(i64::MAX);
    let secs = |us: i128| us as f64 / 1e6;
    let duration = secs(ended_us + (sessions - n_completed) * now - created_us);
    AnalyticsGroup {
        key,
        sessions: n(sessions),
        by_status: StatusCounts {
            active: n(n_active),
            paused: n(n_paused),
            completed: n(n_completed),
            crashed: n(n_crashed),
        },
        duration_seconds: duration,
        mean_duration_seconds: duration / n(sessions).max(1) as f64,
        time_in_status_seconds: TimeInStatus {
            active: secs(active_us + n_active * now - active_since_us),
            paused: secs(paused_us + n_paused * now - paused_since_us),
            crashed: secs(crashed_us + n_crashed * now - crashed_since_us),
        },
        pauses: n(pauses),
        resumes: n(resumes),
        crashes: n(crashes),
        recoveries: n(recoveries),
        worker_generations: n(worker_generations),
        restarts: n(restarts),
        turns: n(turns),
        input_tokens: n(input_tokens),
        output_tokens: n(output_tokens),
        cost_micro_usd: n(cost_micro_usd),
    }
}

/// One page of `GET /analytics`.
#[derive(Debug, Clone)]
pub struct AnalyticsPage {
    /// The projection's position the groups were read at.
    pub position: i64,
    pub groups: Vec<AnalyticsGroup>,
    /// The key to continue after; `None` on the last page.
    pub next: Option<String>,
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy)]
pub struct AnalyticsRebuild {
    pub sessions: u64,
    /// Rows of `analytics_running`: keys × days with sessions.
    pub running_rows: u64,
    /// The projection's position afterwards.
    pub position: i64,
}

/// Where a session counts: dimension, UTC day of creation, value, status.
type BucketKey = (&'static str, NaiveDate, String, &'static str);

fn micros(t: DateTime<Utc>) -> i128 {
    i128::from(t.timestamp_micros())
}

/// What a session adds on its day of creation: one row per dimension.
fn contributions(t: &Tally) -> [(BucketKey, [i128; 23]); 3] {
    let day = t.created_at.date_naive();
    let is = |s: SessionStatus| i128::from(t.status == s);
    let since = micros(t.status_since);
    let sums = [
        1,
        is(SessionStatus::Active),
        is(SessionStatus::Paused),
        is(SessionStatus::Completed),
        is(SessionStatus::Crashed),
        micros(t.created_at),
        is(SessionStatus::Completed) * since,
        is(SessionStatus::Active) * since,
        is(SessionStatus::Paused) * since,
        is(SessionStatus::Crashed) * since,
        t.active_us.into(),
        t.paused_us.into(),
        t.crashed_us.into(),
        t.pauses.into(),
        t.resumes.into(),
        t.recoveries.into(),
        t.crashes.into(),
        t.worker_generations.into(),
        t.restarts.into(),
        t.turns.into(),
        t.input_tokens.into(),
        t.output_tokens.into(),
        t.cost_micro_usd.into(),
    ];
    [
        (("all", day, String::new(), t.status.as_str()), sums),
        (("agent_id", day, t.agent_id.to_string(), ""), sums),
        (("session_type", day, t.session_type.clone(), ""), sums),
    ]
}

/// An event as the fold reads it ([`Store::feed_for_analytics`]): where it
/// is, and what it changes of a tally.
#[derive(Debug, Clone)]
pub struct FoldEvent {
    pub position: i64,
    pub aggregate_id: Uuid,
    pub kind: EventKind,
    pub occurred_at: DateTime<Utc>,
    pub change: TallyChange,
}

/// A row of [`Store::feed_for_analytics`]. `agent_id` and `status` arrive as
/// the text of whatever the payload holds there (`#>>`); only a string's
/// text parses as an id or a status, so they read as `tally_change` reads
/// them. `session_type` arrives only when it is a string.
pub(super) fn fold_event(row: &sea_orm::QueryResult) -> Result<FoldEvent, StoreError> {
    let kind: String = row.try_get("", "event_type")?;
    let kind =
        EventKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("event type {kind}")))?;
    let agent_id: Option<String> = row.try_get("", "agent_id")?;
    let session_type: Option<String> = row.try_get("", "session_type")?;
    let status: Option<String> = row.try_get("", "status")?;
    let runtime_metadata: bool = row.try_get("", "runtime_metadata")?;
    let worker: Option<Value> = row.try_get("", "worker")?;
    let change = tally_change_of(
        kind,
        ChangedFields {
            agent_id: agent_id.as_deref(),
            session_type: session_type.as_deref(),
            status: status.as_deref(),
            runtime_metadata: runtime_metadata.then_some(worker.as_ref()),
        },
    );
    Ok(FoldEvent {
        position: row.try_get("", "position")?,
        aggregate_id: row.try_get("", "aggregate_id")?,
        kind,
        occurred_at: row.try_get("", "occurred_at")?,
        change,
    })
}

fn tally_of(row: &sea_orm::QueryResult) -> Result<Tally, StoreError> {
    let status: String = row.try_get("", "status")?;
    let created_at: DateTime<Utc> = row.try_get("", "created_at")?;
    Ok(Tally {
        session_id: row.try_get("", "session_id")?,
        agent_id: row.try_get("", "agent_id")?,
        session_type: row.try_get("", "session_type")?,
        status: SessionStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("analytics status {status}")))?,
        created_at,
        status_since: row.try_get("", "status_since")?,
        // Not kept in the projection (nothing there reads them).
        last_event_at: created_at,
        deleted_at: None,
        active_us: row.try_get("", "active_us")?,
        paused_us: row.try_get("", "paused_us")?,
        crashed_us: row.try_get("", "crashed_us")?,
        pauses: row.try_get("", "pauses")?,
        resumes: row.try_get("", "resumes")?,
        recoveries: row.try_get("", "recoveries")?,
        crashes: row.try_get("", "crashes")?,
        worker_generations: row.try_get("", "worker_generations")?,
        restarts: row.try_get("", "restarts")?,
        turns: row.try_get("", "turns")?,
        input_tokens: row.try_get("", "input_tokens")?,
        output_tokens: row.try_get("", "output_tokens")?,
        cost_micro_usd: row.try_get("", "cost_micro_usd")?,
    })
}

fn stmt(sql: impl Into<String>, values: Vec<Param>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// The insert of a fold's summaries, one array per column, in the order of
/// [`TALLY_COLUMNS`]. Arrays travel in binary; the same rows as one jsonb
/// document cost PostgreSQL about 2.5× as much (400 summaries: 22 ms to
/// parse and unpack the document, 6.3 ms from arrays), most of a fold's
/// cost per new session. As is, for the sessions created in the fold's page
/// (none has a summary yet); [`UPSERT_TALLIES`] for the others.
static INSERT_TALLIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO analytics_sessions ({TALLY_COLUMNS}) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], \
             $5::timestamptz[], $6::timestamptz[], $7::int8[], $8::int8[], $9::int8[], \
             $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::int8[], \
             $16::int8[], $17::int8[], $18::int8[], $19::int8[])"
    )
});

/// [`INSERT_TALLIES`] over summaries that exist: each row replaced. (An
/// upsert writes three WAL records per new row where a plain insert writes
/// two: about 30 % of a new session's insert.)
static UPSERT_TALLIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let set = TALLY_COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{} ON CONFLICT (session_id) DO UPDATE SET {set}",
        INSERT_TALLIES.as_str()
    )
});

/// The parameters of [`INSERT_TALLIES`] and [`UPSERT_TALLIES`].
fn tally_arrays(kept: &[&Tally]) -> Vec<Param> {
    let rows = || kept.iter().copied();
    vec![
        column(rows(), |t| t.session_id).into(),
        column(rows(), |t| t.agent_id).into(),
        column(rows(), |t| t.session_type.clone()).into(),
        column(rows(), |t| t.status.as_str().to_owned()).into(),
        column(rows(), |t| t.created_at).into(),
        column(rows(), |t| t.status_since).into(),
        column(rows(), |t| t.active_us).into(),
        column(rows(), |t| t.paused_us).into(),
        column(rows(), |t| t.crashed_us).into(),
        column(rows(), |t| t.pauses).into(),
        column(rows(), |t| t.resumes).into(),
        column(rows(), |t| t.recoveries).into(),
        column(rows(), |t| t.crashes).into(),
        column(rows(), |t| t.worker_generations).into(),
        column(rows(), |t| t.restarts).into(),
        column(rows(), |t| t.turns).into(),
        column(rows(), |t| t.input_tokens).into(),
        column(rows(), |t| t.output_tokens).into(),
        column(rows(), |t| t.cost_micro_usd).into(),
    ]
}

/// Lock the cursor row; its position, created at 0 when absent.
async fn lock_cursor(txn: &DatabaseTransaction) -> Result<i64, StoreError> {
    txn.execute_raw(stmt(
        "INSERT INTO relay_cursors (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
        vec![ANALYTICS_CURSOR.into()],
    ))
    .await?;
    let row = txn
        .query_one_raw(stmt(
            // The fold's commit does not wait for the disk: the projection and
            // its position move in one transaction, so a crash that loses
            // the last folds loses their position with them, and they are
            // folded again.
            "SELECT position, set_config('synchronous_commit', 'off', true) \
             FROM relay_cursors WHERE name = $1 FOR UPDATE",
            vec![ANALYTICS_CURSOR.into()],
        ))
        .await?
        .ok_or_else(|| StoreError::Corrupt("analytics cursor vanished".into()))?;
    Ok(row.try_get("", "position")?)
}

async fn move_cursor(txn: &DatabaseTransaction, position: i64) -> Result<(), StoreError> {
    txn.execute_raw(stmt(
        "UPDATE relay_cursors SET position = $2, updated_at = now() WHERE name = $1",
        vec![ANALYTICS_CURSOR.into(), position.into()],
    ))
    .await?;
    Ok(())
}

/// What one fold writes, in one transaction with the projection's position.
struct Writes<'a> {
    /// The position the fold read from: nothing is written unless the
    /// projection is still there.
    from: i64,
    /// The position after the fold.
    to: i64,
    /// Summaries of sessions deleted in the page.
    gone: &'a [Uuid],
    deltas: &'a HashMap<BucketKey, [i128; 23]>,
}

impl Writes<'_> {
    /// `fresh` summaries inserted, `known` ones upserted. `Ok(false)` when
    /// the projection is no longer at `from`.
    async fn run(
        &self,
        db: &DatabaseConnection,
        fresh: &[&Tally],
        known: &[&Tally],
    ) -> Result<bool, StoreError> {
        let txn = db.begin().await?;
        if lock_cursor(&txn).await? != self.from {
            txn.rollback().await?;
            return Ok(false);
        }
        if !self.gone.is_empty() {
            txn.execute_raw(stmt(
                "DELETE FROM analytics_sessions WHERE session_id IN \
                 (SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb))",
                vec![serde_json::to_value(self.gone).unwrap_or_default().into()],
            ))
            .await?;
        }
        if !fresh.is_empty() {
            txn.execute_raw(stmt(INSERT_TALLIES.as_str(), tally_arrays(fresh)))
                .await?;
        }
        if !known.is_empty() {
            txn.execute_raw(stmt(UPSERT_TALLIES.as_str(), tally_arrays(known)))
                .await?;
        }
        if !self.deltas.is_empty() {
            apply_deltas(&txn, self.deltas).await?;
        }
        move_cursor(&txn, self.to).await?;
        txn.commit().await?;
        Ok(true)
    }
}

/// The session summaries of the rebuild, from the log below `$1`: the
/// sessions not deleted, folded the way `domain::metrics` folds them (the
/// worker record read with `analytics_whole`, as `tally_change` reads it).
/// Two scans of the log, each grouped by session; no per-event round trip.
const REBUILD_SESSIONS: &str = r#"
INSERT INTO analytics_sessions (session_id, agent_id, session_type, status, created_at,
    status_since, active_us, paused_us, crashed_us, pauses, resumes, recoveries, crashes,
    worker_generations, restarts, turns, input_tokens, output_tokens, cost_micro_usd)
WITH life AS (
    SELECT aggregate_id AS id,
           bool_or(event_type = 'session.deleted') AS deleted,
           min(occurred_at) FILTER (WHERE event_type = 'session.created' AND version = 1) AS created_at,
           (array_agg(payload #>> '{changes,agent_id}' ORDER BY version DESC)
                FILTER (WHERE payload -> 'changes' ? 'agent_id'))[1] AS agent_id,
           (array_agg(payload #>> '{changes,session_type}' ORDER BY version DESC)
                FILTER (WHERE payload -> 'changes' ? 'session_type'))[1] AS session_type,
           (array_agg(payload #> '{changes,runtime_metadata,worker}' ORDER BY version DESC)
                FILTER (WHERE payload -> 'changes' ? 'runtime_metadata'))[1] AS w,
           max(analytics_whole(payload #> '{changes,runtime_metadata,worker,generation}',
                               18446744073709551615)) AS generations
    FROM events
    WHERE position < $1
      AND event_type IN ('session.created', 'session.updated', 'session.deleted')
    GROUP BY aggregate_id
),
marks AS (
    SELECT aggregate_id AS id, version, occurred_at AS at,
           CASE WHEN event_type = 'session.created'
                THEN coalesce(payload #>> '{changes,status}', 'active')
                ELSE payload #>> '{changes,status}' END AS status,
           lag(CASE WHEN event_type = 'session.created'
                    THEN coalesce(payload #>> '{changes,status}', 'active')
                    ELSE payload #>> '{changes,status}' END)
               OVER (PARTITION BY aggregate_id ORDER BY version) AS prev
    FROM events
    WHERE position < $1
      AND ((event_type = 'session.created' AND version = 1)
           OR (event_type = 'session.updated' AND payload -> 'changes' ? 'status'))
),
moves AS (
    SELECT id, version, at, status, prev,
           lead(at) OVER (PARTITION BY id ORDER BY version) AS next_at
    FROM marks
    WHERE prev IS NULL OR prev <> status
),
chain AS (
    SELECT id,
           (array_agg(status ORDER BY version DESC))[1] AS status,
           (array_agg(at ORDER BY version DESC))[1] AS status_since,
           coalesce(sum((extract(epoch FROM next_at) - extract(epoch FROM at)) * 1000000)
               FILTER (WHERE status = 'active' AND next_at IS NOT NULL), 0) AS active_us,
           coalesce(sum((extract(epoch FROM next_at) - extract(epoch FROM at)) * 1000000)
               FILTER (WHERE status = 'paused' AND next_at IS NOT NULL), 0) AS paused_us,
           coalesce(sum((extract(epoch FROM next_at) - extract(epoch FROM at)) * 1000000)
               FILTER (WHERE status = 'crashed' AND next_at IS NOT NULL), 0) AS crashed_us,
           count(*) FILTER (WHERE status = 'paused' AND prev IS NOT NULL AND prev <> 'paused') AS pauses,
           count(*) FILTER (WHERE status = 'active' AND prev = 'paused') AS resumes,
           count(*) FILTER (WHERE status = 'active' AND prev = 'crashed') AS recoveries,
           count(*) FILTER (WHERE status = 'crashed' AND prev IS NOT NULL) AS crashes
    FROM moves
    GROUP BY id
)
SELECT l.id, coalesce(l.agent_id::uuid, '00000000-0000-0000-0000-000000000000'),
       coalesce(l.session_type, ''), c.status, l.created_at, c.status_since,
       c.active_us::bigint, c.paused_us::bigint, c.crashed_us::bigint,
       c.pauses, c.resumes, c.recoveries, c.crashes,
       coalesce(l.generations, 0),
       coalesce(analytics_whole(l.w -> 'restarts', 4294967295), 0),
       coalesce(analytics_whole(l.w -> 'turns', 18446744073709551615), 0),
       coalesce(analytics_whole(l.w -> 'input_tokens', 18446744073709551615), 0),
       coalesce(analytics_whole(l.w -> 'output_tokens', 18446744073709551615), 0),
       coalesce(analytics_whole(l.w -> 'cost_micro_usd', 18446744073709551615), 0)
FROM life l JOIN chain c ON c.id = l.id
WHERE NOT l.deleted AND l.created_at IS NOT NULL
"#;

/// The running sums from the summaries: each day's sums per key, then
/// summed over the key's days so far; one set-based statement per rebuild.
const REBUILD_RUNNING: &str = r#"
INSERT INTO analytics_running (dimension, value, status, day, sessions, n_active, n_paused,
    n_completed, n_crashed, created_us, ended_us, active_since_us, paused_since_us,
    crashed_since_us, active_us, paused_us, crashed_us, pauses, resumes, recoveries, crashes,
    worker_generations, restarts, turns, input_tokens, output_tokens, cost_micro_usd)
SELECT dimension, value, status, day,
       sum(sessions) OVER w, sum(n_active) OVER w, sum(n_paused) OVER w,
       sum(n_completed) OVER w, sum(n_crashed) OVER w, sum(created_us) OVER w,
       sum(ended_us) OVER w, sum(active_since_us) OVER w, sum(paused_since_us) OVER w,
       sum(crashed_since_us) OVER w, sum(active_us) OVER w, sum(paused_us) OVER w,
       sum(crashed_us) OVER w, sum(pauses) OVER w, sum(resumes) OVER w,
       sum(recoveries) OVER w, sum(crashes) OVER w, sum(worker_generations) OVER w,
       sum(restarts) OVER w, sum(turns) OVER w, sum(input_tokens) OVER w,
       sum(output_tokens) OVER w, sum(cost_micro_usd) OVER w
FROM (
    SELECT d.dimension, d.value, d.status, (s.created_at AT TIME ZONE 'UTC')::date AS day,
           count(*) AS sessions,
           count(*) FILTER (WHERE s.status = 'active') AS n_active,
           count(*) FILTER (WHERE s.status = 'paused') AS n_paused,
           count(*) FILTER (WHERE s.status = 'completed') AS n_completed,
           count(*) FILTER (WHERE s.status = 'crashed') AS n_crashed,
           sum((extract(epoch FROM s.created_at) * 1000000)::bigint) AS created_us,
           coalesce(sum((extract(epoch FROM s.status_since) * 1000000)::bigint) FILTER (WHERE s.status = 'completed'), 0) AS ended_us,
           coalesce(sum((extract(epoch FROM s.status_since) * 1000000)::bigint) FILTER (WHERE s.status = 'active'), 0) AS active_since_us,
           coalesce(sum((extract(epoch FROM s.status_since) * 1000000)::bigint) FILTER (WHERE s.status = 'paused'), 0) AS paused_since_us,
           coalesce(sum((extract(epoch FROM s.status_since) * 1000000)::bigint) FILTER (WHERE s.status = 'crashed'), 0) AS crashed_since_us,
           sum(s.active_us) AS active_us, sum(s.paused_us) AS paused_us,
           sum(s.crashed_us) AS crashed_us, sum(s.pauses) AS pauses, sum(s.resumes) AS resumes,
           sum(s.recoveries) AS recoveries, sum(s.crashes) AS crashes,
           sum(s.worker_generations) AS worker_generations, sum(s.restarts) AS restarts,
           sum(s.turns) AS turns, sum(s.input_tokens) AS input_tokens,
           sum(s.output_tokens) AS output_tokens, sum(s.cost_micro_usd) AS cost_micro_usd
    FROM analytics_sessions s
    CROSS JOIN LATERAL (VALUES ('all', '', s.status), ('agent_id', s.agent_id::text, ''),
                               ('session_type', s.session_type, '')) AS d(dimension, value, status)
    GROUP BY 1, 2, 3, 4
) daily
WINDOW w AS (PARTITION BY dimension, value, status ORDER BY day)
"#;

/// Move the running sums by a page's deltas, in the fold's transaction:
/// the keys are recorded, each delta's day gets a row (a copy of the key's
/// row before it) if it has none, every row of the key from that day on
/// moves by the delta, and rows left equal to the row before them (no
/// session of the key created that day any more) go, as do keys left with
/// no rows, so the result is what a rebuild would write.
async fn apply_deltas(
    txn: &DatabaseTransaction,
    deltas: &HashMap<BucketKey, [i128; 23]>,
) -> Result<(), StoreError> {
    let rows: Vec<Value> = deltas
        .iter()
        .map(|((dimension, day, value, status), sums)| {
            let mut row = serde_json::Map::new();
            row.insert("dimension".into(), (*dimension).into());
            row.insert("day".into(), day.to_string().into());
            row.insert("value".into(), value.clone().into());
            row.insert("status".into(), (*status).into());
            for (name, v) in SUMS.iter().zip(sums) {
                // Decimal text: jsonb keeps it exact at any size.
                row.insert((*name).into(), Value::String(v.to_string()));
            }
            Value::Object(row)
        })
        .collect();
    let rows = Value::Array(rows);
    let record = each_sum(|c| format!("{c} numeric"));
    let x = format!(
        "jsonb_to_recordset($1::jsonb) AS x(dimension text, day date, value text, status text, {record})"
    );
    let cols = SUMS.join(", ");
    let same_key = |r: &str, k: &str| {
        format!(
            "{r}.dimension = {k}.dimension AND {r}.value = {k}.value AND {r}.status = {k}.status"
        )
    };
    let statements = [
        format!(
            "INSERT INTO analytics_keys (dimension, value, status) \
             SELECT DISTINCT dimension, value, status FROM {x} ON CONFLICT DO NOTHING"
        ),
        format!(
            "INSERT INTO analytics_running (dimension, value, status, day, {cols}) \
             SELECT x.dimension, x.value, x.status, x.day, {copied} FROM {x} \
             LEFT JOIN LATERAL (SELECT {cols} FROM analytics_running r \
                 WHERE {key} AND r.day < x.day ORDER BY r.day DESC LIMIT 1) p ON true \
             ON CONFLICT DO NOTHING",
            copied = each_sum(|c| format!("coalesce(p.{c}, 0)")),
            key = same_key("r", "x"),
        ),
        format!(
            "UPDATE analytics_running r SET {set} FROM ( \
                 SELECT r.dimension, r.value, r.status, r.day, {summed} \
                 FROM {x} JOIN analytics_running r ON {key} AND r.day >= x.day \
                 GROUP BY 1, 2, 3, 4) d \
             WHERE {same} AND r.day = d.day",
            set = each_sum(|c| format!("{c} = r.{c} + d.{c}")),
            summed = each_sum(|c| format!("sum(x.{c}) AS {c}")),
            key = same_key("r", "x"),
            same = same_key("r", "d"),
        ),
        format!(
            "DELETE FROM analytics_running r USING {x} WHERE {key} AND r.day = x.day \
               AND r.sessions = coalesce((SELECT p.sessions FROM analytics_running p \
                   WHERE {prev} AND p.day < r.day ORDER BY p.day DESC LIMIT 1), 0)",
            key = same_key("r", "x"),
            prev = same_key("p", "r"),
        ),
        format!(
            "DELETE FROM analytics_keys k USING {x} WHERE {key} \
               AND NOT EXISTS (SELECT 1 FROM analytics_running r WHERE {gone})",
            key = same_key("k", "x"),
            gone = same_key("r", "k"),
        ),
    ];
    for sql in statements {
        txn.execute_raw(stmt(sql, vec![rows.clone().into()]))
            .await?;
    }
    Ok(())
}

impl Store {
    /// Every event of the projection up to this feed position is in it.
    pub async fn analytics_position(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .query_one_raw(stmt(
                "SELECT position FROM relay_cursors WHERE name = $1",
                vec![ANALYTICS_CURSOR.into()],
            ))
            .await?
            .map(|r| r.try_get::<i64>("", "position"))
            .transpose()?
            .unwrap_or(0))
    }

    /// One session's stream folded into its metrics; `None` when the log
    /// holds no `session.created` for it.
    #[instrument(skip(self))]
    pub async fn session_tally(&self, id: Uuid) -> Result<Option<Tally>, StoreError> {
        let mut folded: Option<Tally> = None;
        let mut after = 0;
        loop {
            let page = self.session_events(id, after, STREAM_PAGE).await?;
            for e in &page {
                let change = tally_change(e.kind, &e.payload);
                match folded.as_mut() {
                    Some(t) => t.apply(e.kind, e.occurred_at, &change),
                    None => {
                        folded = tally(id, [(e.kind, e.occurred_at, &change)]);
                        if folded.is_none() {
                            return Ok(None);
                        }
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() as u64 == STREAM_PAGE => after = last.version,
                _ => return Ok(folded),
            }
        }
    }

    /// Fold a page of the feed that follows position `from` into the
    /// projection. `Ok(false)` when the projection is no longer at `from`
    /// (a rebuild or another consumer moved it): nothing is written and the
    /// caller reads its position again.
    #[instrument(skip(self, events), fields(events = events.len()))]
    pub async fn fold_into_analytics(
        &self,
        from: i64,
        events: &[FoldEvent],
    ) -> Result<bool, StoreError> {
        let Some(last) = events.last() else {
            return Ok(true);
        };
        // An update that says nothing a tally reads (`context` or
        // `checkpoint` alone, the most common write) changes no tally: it
        // is left out, and so is its session's summary from the read below
        // unless another event of the page changes it.
        let folding: Vec<&FoldEvent> = events
            .iter()
            .filter(|e| match e.kind {
                EventKind::Created | EventKind::Deleted => true,
                EventKind::Updated => !e.change.is_empty(),
                _ => false,
            })
            .collect();
        // Only sessions that existed before the page can have a summary: one
        // whose first event here is its creation had none (an id is never
        // used twice: a deleted session's tombstone keeps it), so a page of
        // new sessions reads nothing.
        let mut seen = HashSet::new();
        let mut ids: Vec<Uuid> = folding
            .iter()
            .filter(|e| seen.insert(e.aggregate_id) && e.kind != EventKind::Created)
            .map(|e| e.aggregate_id)
            .collect();
        ids.sort_unstable();
        // The summaries are read before the transaction: should anyone else
        // write them meanwhile, it moves the position too, which the
        // transaction checks before writing.
        let before: HashMap<Uuid, Tally> = if ids.is_empty() {
            HashMap::new()
        } else {
            self.db
                .query_all_raw(stmt(
                    format!(
                        "SELECT {TALLY_COLUMNS} FROM analytics_sessions WHERE session_id IN \
                     (SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb))"
                    ),
                    vec![serde_json::to_value(&ids).unwrap_or_default().into()],
                ))
                .await?
                .iter()
                .map(|r| tally_of(r).map(|t| (t.session_id, t)))
                .collect::<Result<_, _>>()?
        };
        // `None`: deleted (or never seen whole) by the end of the page.
        let mut after: HashMap<Uuid, Option<Tally>> = before
            .iter()
            .map(|(id, t)| (*id, Some(t.clone())))
            .collect();
        for e in folding {
            let slot = after.entry(e.aggregate_id).or_insert(None);
            match (e.kind, slot.as_mut()) {
                (EventKind::Created, _) => {
                    *slot = Some(Tally::created(e.aggregate_id, e.occurred_at, &e.change));
                }
                (EventKind::Deleted, _) => *slot = None,
                (_, Some(t)) => {
                    t.apply(e.kind, e.occurred_at, &e.change);
                    // Not kept in the projection: not a change to write.
                    t.last_event_at = t.created_at;
                }
                (_, None) => {}
            }
        }
        let mut deltas: HashMap<BucketKey, [i128; 23]> = HashMap::new();
        let mut add = |t: &Tally, sign: i128| {
            for (key, sums) in contributions(t) {
                let d = deltas.entry(key).or_insert([0; 23]);
                for (acc, v) in d.iter_mut().zip(sums) {
                    *acc += sign * v;
                }
            }
        };
        for t in before.values() {
            add(t, -1);
        }
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for (id, t) in &after {
            match t {
                Some(t) => {
                    add(t, 1);
                    if before.get(id) != Some(t) {
                        kept.push(t);
                    }
                }
                None if before.contains_key(id) => gone.push(*id),
                None => {}
            }
        }
        deltas.retain(|_, d| d.iter().any(|v| *v != 0));
        if gone.is_empty() && kept.is_empty() && deltas.is_empty() {
            // Nothing to write (inputs, context edits): move the position
            // alone, in one statement, unless someone else moved it.
            let moved = self
                .db
                .execute_raw(stmt(
                    "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true)) \
                     INSERT INTO relay_cursors (name, position) SELECT $1, $3 FROM lazy \
                     ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now() \
                     WHERE relay_cursors.position = $2",
                    vec![ANALYTICS_CURSOR.into(), from.into(), last.position.into()],
                ))
                .await?
                .rows_affected();
            return Ok(moved == 1);
        }
        // A session not read above was created in the page: it has no
        // summary yet, and its row is inserted as is. Should one be there
        // all the same (written by hand, say), the insert fails and the
        // fold runs again with every row as an upsert, as it would without
        // this shortcut.
        let (fresh, known): (Vec<&Tally>, Vec<&Tally>) = kept
            .into_iter()
            .partition(|t| !before.contains_key(&t.session_id));
        let write = Writes {
            from,
            to: last.position,
            gone: &gone,
            deltas: &deltas,
        };
        match write.run(&self.db, &fresh, &known).await {
            Err(StoreError::Database(e))
                if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) =>
            {
                tracing::warn!(
                    error = %e,
                    "a session created in the folded page already had a summary; folding the page again as upserts"
                );
                let all: Vec<&Tally> = fresh.into_iter().chain(known).collect();
                write.run(&self.db, &[], &all).await
            }
            other => other,
        }
    }

    /// Rebuild the projection from the whole log, set-based, in one
    /// transaction (readers see the old projection until it commits), up to
    /// the feed's horizon; its position becomes that horizon.
    #[instrument(skip(self))]
    pub async fn rebuild_analytics(&self) -> Result<AnalyticsRebuild, StoreError> {
        let horizon = self.horizon().await?;
        let txn = self.db.begin().await?;
        txn.execute_raw(stmt("SET LOCAL statement_timeout = 0", vec![]))
            .await?;
        // A consumer folding now waits for this, then finds the position moved.
        lock_cursor(&txn).await?;
        txn.execute_raw(stmt("DELETE FROM analytics_keys", vec![]))
            .await?;
        txn.execute_raw(stmt("DELETE FROM analytics_running", vec![]))
            .await?;
        txn.execute_raw(stmt("DELETE FROM analytics_sessions", vec![]))
            .await?;
        let sessions = txn
            .execute_raw(stmt(REBUILD_SESSIONS, vec![horizon.into()]))
            .await?
            .rows_affected();
        let running_rows = txn
            .execute_raw(stmt(REBUILD_RUNNING, vec![]))
            .await?
            .rows_affected();
        txn.execute_raw(stmt(
            "INSERT INTO analytics_keys (dimension, value, status) \
             SELECT DISTINCT dimension, value, status FROM analytics_running",
            vec![],
        ))
        .await?;
        let position = horizon.saturating_sub(1).max(0);
        move_cursor(&txn, position).await?;
        txn.commit().await?;
        Ok(AnalyticsRebuild {
            sessions,
            running_rows,
            position,
        })
    }

    /// Sessions created on UTC days `[from, to)`, grouped, as of `now`: one
    /// page of groups, by key, after `after` (a key of an earlier page);
    /// and the projection's position they were read at (one snapshot).
    ///
    /// A page walks at most `limit` keys of the dimension (days, for `day`)
    /// and answers those with sessions in the range, so it may hold fewer
    /// groups than `limit`; `next` is the key to continue after, `None`
    /// on the last page. Two index probes per key walked, whatever the
    /// range's length or the number of sessions.
    #[instrument(skip(self))]
    pub async fn analytics(
        &self,
        group_by: GroupBy,
        range: (NaiveDate, NaiveDate),
        now: DateTime<Utc>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<AnalyticsPage, StoreError> {
        let (from, to) = range;
        let cols = SUMS.join(", ");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (ranged, params): (String, Vec<Param>) = match group_by {
            GroupBy::Day => {
                // The page's days (those with a row: with sessions), then
                // each status's rows over them, after its row before the
                // range (key ''); the differences day to day are taken in
                // Rust.
                let start = match after {
                    Some(a) => NaiveDate::parse_from_str(a, "%Y-%m-%d")
                        .map_err(|_| StoreError::Corrupt(format!("analytics day cursor {a}")))?
                        .succ_opt()
                        .unwrap_or(to)
                        .max(from),
                    None => from,
                };
                (
                    format!(
                        "walk AS (SELECT NULL::text AS key, 0::bigint AS n WHERE false), \
                         days AS (SELECT DISTINCT day FROM analytics_running \
                             WHERE dimension = 'all' AND day >= $2 AND day < $3 ORDER BY day LIMIT $4), \
                         ranged AS ( \
                             SELECT ''::text AS key, k.status, lo.{lo_cols} \
                               FROM analytics_keys k CROSS JOIN LATERAL ( \
                                 SELECT {cols} FROM analytics_running r \
                                 WHERE r.dimension = k.dimension AND r.value = k.value \
                                   AND r.status = k.status AND r.day < $2 \
                                 ORDER BY r.day DESC LIMIT 1) lo \
                               WHERE k.dimension = 'all' \
                             UNION ALL \
                             SELECT to_char(day, 'YYYY-MM-DD'), status, {cols} FROM analytics_running \
                               WHERE dimension = 'all' AND day >= $2 \
                                 AND day <= (SELECT max(day) FROM days))",
                        lo_cols = SUMS.join(", lo."),
                    ),
                    vec![start.into(), to.into(), (limit + 1).into()],
                )
            }
            _ => {
                let (dimension, key) = match group_by {
                    GroupBy::AgentId => ("agent_id", "value"),
                    GroupBy::SessionType => ("session_type", "value"),
                    _ => ("all", "status"),
                };
                let diff = each_sum(|c| format!("hi.{c} - coalesce(lo.{c}, 0) AS {c}"));
                let last_before = |alias: &str, bound: &str| {
                    format!(
                        "LATERAL (SELECT day, {cols} FROM analytics_running r \
                           WHERE r.dimension = k.dimension AND r.value = k.value \
                             AND r.status = k.status AND r.day < {bound} \
                           ORDER BY r.day DESC LIMIT 1) {alias}"
                    )
                };
                (
                    format!(
                        "walk AS (SELECT dimension, value, status, {key} AS key, \
                             row_number() OVER (ORDER BY value, status) AS n \
                           FROM (SELECT dimension, value, status FROM analytics_keys \
                                 WHERE dimension = '{dimension}' \
                                   AND ($5::text IS NULL OR {key} > $5::text COLLATE \"C\") \
                                 ORDER BY value, status LIMIT $4) w), \
                         ranged AS (SELECT k.key, ''::text AS status, {diff} FROM walk k \
                           CROSS JOIN {hi} LEFT JOIN {lo} ON true \
                           WHERE k.n < $4 AND hi.day >= $2)",
                        hi = last_before("hi", "$3"),
                        lo = last_before("lo", "$2"),
                    ),
                    vec![
                        from.into(),
                        to.into(),
                        (limit + 1).into(),
                        after.map(str::to_owned).into(),
                    ],
                )
            }
        };
        // Rows of differences, by key (a day has one per status); summed
        // per key and turned into figures here, in i128: the wide sums are
        // beyond bigint (they come as decimal text).
        // The position and the rows come from one statement, so one snapshot.
        let as_text = each_sum(|c| {
            if is_wide(c) {
                format!("r.{c}::text AS {c}")
            } else {
                format!("r.{c}")
            }
        });
        let sql = format!(
            "WITH pos AS (SELECT coalesce((SELECT position FROM relay_cursors WHERE name = $1), 0) AS position), \
             {ranged} \
             SELECT pos.position, \
                    (SELECT key FROM walk WHERE n = $4 - 1 AND EXISTS (SELECT 1 FROM walk WHERE n = $4)) AS walked_to, \
                    r.key, r.status, {as_text} \
             FROM pos LEFT JOIN ranged r ON true ORDER BY r.status, r.key"
        );
        let mut values: Vec<Param> = vec![
            ANALYTICS_CURSOR.into(),
            params[0].clone(),
            params[1].clone(),
            params[2].clone(),
        ];
        values.extend(params.into_iter().skip(3));
        let rows = self.db.query_all_raw(stmt(sql, values)).await?;
        let position = match rows.first() {
            Some(r) => r.try_get("", "position")?,
            None => 0,
        };
        let now_us = i128::from(now.timestamp_micros());
        let mut summed: Vec<(String, [i128; 23])> = Vec::new();
        // For `day`: each status's previous row, to take differences from.
        let mut previous: Option<(String, [i128; 23])> = None;
        let mut by_day: BTreeMap<String, [i128; 23]> = BTreeMap::new();
        for r in &rows {
            // The one row of an empty answer has no group.
            let Some(key) = r.try_get::<Option<String>>("", "key")? else {
                continue;
            };
            let mut sums = [0i128; 23];
            for (v, c) in sums.iter_mut().zip(SUMS) {
                *v = if is_wide(c) {
                    let text: String = r.try_get("", c)?;
                    text.parse()
                        .map_err(|_| StoreError::Corrupt(format!("analytics {c} = {text}")))?
                } else {
                    r.try_get::<i64>("", c)?.into()
                };
            }
            if matches!(group_by, GroupBy::Day) {
                let status: String = r.try_get("", "status")?;
                let before = match previous.take() {
                    Some((s, p)) if s == status => p,
                    _ => [0; 23],
                };
                if !key.is_empty() {
                    let day = by_day.entry(key).or_insert([0; 23]);
                    for ((d, v), p) in day.iter_mut().zip(sums).zip(before) {
                        *d += v - p;
                    }
                }
                previous = Some((status, sums));
                continue;
            }
            match summed.last_mut() {
                Some((k, acc)) if *k == key => {
                    for (a, v) in acc.iter_mut().zip(sums) {
                        *a += v;
                    }
                }
                _ => summed.push((key, sums)),
            }
        }
        summed.extend(by_day);
        let mut groups: Vec<AnalyticsGroup> = summed
            .into_iter()
            .filter(|(_, sums)| sums[0] > 0)
            .map(|(key, sums)| group_of(key, &sums, now_us))
            .collect();
        let next = match group_by {
            GroupBy::Day if groups.len() as i64 > limit => {
                groups.truncate(limit as usize);
                groups.last().map(|g| g.key.clone())
            }
            GroupBy::Day => None,
            _ => match rows.first() {
                Some(r) => r.try_get::<Option<String>>("", "walked_to")?,
                None => None,
            },
        };
        Ok(AnalyticsPage {
            position,
            groups,
            next,
        })
    }

    /// Live sessions per status, from the projection (the `sessions` gauge).
    pub async fn sessions_by_status(&self) -> Result<Vec<(SessionStatus, i64)>, StoreError> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT k.status, r.sessions AS n FROM analytics_keys k CROSS JOIN LATERAL ( \
                     SELECT sessions FROM analytics_running r \
                     WHERE r.dimension = k.dimension AND r.value = k.value AND r.status = k.status \
                     ORDER BY r.day DESC LIMIT 1) r \
                 WHERE k.dimension = 'all'",
                vec![],
            ))
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let status: String = r.try_get("", "status")?;
            if let Some(s) = SessionStatus::parse(&status) {
                out.push((s, r.try_get("", "n")?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wide_sums_are_the_instants_and_the_worker_figures() {
        assert_eq!(SUMS[INSTANT_SUMS.start], "created_us");
        assert_eq!(SUMS[INSTANT_SUMS.end - 1], "crashed_since_us");
        assert!(SUMS[INSTANT_SUMS].iter().all(|c| c.ends_with("_us")));
        assert_eq!(SUMS[WORKER_SUMS.start], "worker_generations");
        assert_eq!(SUMS[WORKER_SUMS].len(), 6);
        assert!(is_wide("cost_micro_usd") && is_wide("ended_us"));
        assert!(!is_wide("sessions") && !is_wide("active_us") && !is_wide("crashes"));
    }
}
