//! `GET /sessions/`: sessions newest first, one keyset page at a time.
//!
//! Every list reads `ORDER BY created_at DESC, id DESC` and continues after
//! the last row of the previous page with `(created_at, id) < cursor`: no
//! `OFFSET`, no count, so a page costs the same at row 20 and at row
//! 1,000,000 (docs/design.md, performance: list queries and their indexes).
//! The statement is shaped so that PostgreSQL can walk an index in exactly
//! that order and stop after `limit` rows:
//!
//! - each filter compares a column (or the indexed expression of the
//!   worker's state) with a parameter, never a function of the column;
//! - several statuses or worker states become one branch per value, each
//!   an ordered index scan that stops at `limit`, merged by a sort of at
//!   most `branches × limit` rows (an `IN` list cannot walk an index in
//!   `created_at` order and would sort every matching row);
//! - `updated_before` also bounds `created_at` (a session is never updated
//!   before it was created), so the walk starts where matches can be instead
//!   of skipping every session created since;
//! - `updated_after` splits into the sessions created since (a plain
//!   newest-first walk, every row matches) and the older ones updated since
//!   (few: those still changing when that time passed).
//!
//! The two `updated_*` shapes rely on `updated_at >= created_at`, which
//! holds as both are the database's `now()` of transactions that follow
//! each other; [`CLOCK_SLACK`] covers a server clock stepped back.

use base64::Engine as _;
use chrono::{DateTime, Duration, TimeZone, Utc};
use sea_orm::{ConnectionTrait, QueryResult, Value as Param};
use tracing::instrument;
use uuid::Uuid;

use super::rows::{self, SESSION_COLUMNS, SESSION_TEXT_COLUMNS};
use super::sessions::stmt;
use super::{Store, StoreError};
use crate::contract::{ListedSession, WorkerState};
use crate::domain::{RuntimeBackend, SessionState, SessionStatus};

/// Filters of `GET /sessions/`; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub agent_id: Option<Uuid>,
    pub status: Vec<SessionStatus>,
    pub session_type: Option<String>,
    pub runtime_backend: Option<RuntimeBackend>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    /// Only sessions with (true) or without (false) a worker spec.
    pub has_worker: Option<bool>,
    /// Only sessions whose worker the runner last reported in one of these
    /// states (`runtime_metadata.worker.state`).
    pub worker_state: Vec<WorkerState>,
    /// Only sessions forked from this one.
    pub parent_session_id: Option<Uuid>,
}

impl ListFilter {
    /// No filter at all: it matches every session.
    pub fn is_empty(&self) -> bool {
        let Self {
            agent_id,
            status,
            session_type,
            runtime_backend,
            created_after,
            created_before,
            updated_after,
            updated_before,
            has_worker,
            worker_state,
            parent_session_id,
        } = self;
        agent_id.is_none()
            && status.is_empty()
            && session_type.is_none()
            && runtime_backend.is_none()
            && created_after.is_none()
            && created_before.is_none()
            && updated_after.is_none()
            && updated_before.is_none()
            && has_worker.is_none()
            && worker_state.is_empty()
            && parent_session_id.is_none()
    }
}

/// Keyset position in the newest-first list: the last row returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl ListCursor {
    pub fn encode(&self) -> String {
        let raw = format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let raw = std::str::from_utf8(&raw).ok()?;
        let (micros, id) = raw.split_once('.')?;
        Some(Self {
            created_at: Utc.timestamp_micros(micros.parse().ok()?).single()?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// The worker's state as the runner records it; the same expression as the
/// indexes `sessions_worker_state_created_idx` and
/// `sessions_agent_worker_state_created_idx` (partial: `IS NOT NULL`, which
/// `= value` implies).
const WORKER_STATE: &str = "(runtime_metadata -> 'worker' ->> 'state')";

/// How far `created_at` may exceed `updated_at` and the session still be
/// listed by `updated_before` / `updated_after` (see the module's notes).
const CLOCK_SLACK: Duration = Duration::minutes(1);

/// A filtered expression and the values it may take.
type Column<'a> = (&'a str, &'a [&'a str]);

const ORDER: &str = "ORDER BY created_at DESC, id DESC";

/// A statement under construction: its parameters and `AND`ed conditions.
#[derive(Default)]
struct Conditions {
    values: Vec<Param>,
    cond: Vec<String>,
}

impl Conditions {
    /// The placeholder of a new parameter.
    fn param(&mut self, v: Param) -> String {
        self.values.push(v);
        format!("${}", self.values.len())
    }

    /// `expr` with `?` standing for a new parameter.
    fn push(&mut self, expr: &str, v: Param) {
        let p = self.param(v);
        self.cond.push(expr.replace('?', &p));
    }
}

/// The statement of one page: `limit` rows after `cursor`, as `columns`
/// (expressions over [`SESSION_COLUMNS`]).
pub(super) fn list_statement(
    filter: &ListFilter,
    limit: u64,
    cursor: Option<ListCursor>,
    columns: &str,
) -> (String, Vec<Param>) {
    let mut c = Conditions::default();
    if let Some(a) = filter.agent_id {
        c.push("agent_id = ?", a.into());
    }
    if let Some(p) = filter.parent_session_id {
        c.push("parent_session_id = ?", p.into());
    }
    if let Some(t) = &filter.session_type {
        c.push("session_type = ?", t.clone().into());
    }
    if let Some(b) = filter.runtime_backend {
        c.push("runtime_backend = ?", b.as_str().into());
    }
    for (expr, v) in [
        ("created_at >= ?", filter.created_after),
        ("created_at < ?", filter.created_before),
        ("updated_at < ?", filter.updated_before),
    ] {
        if let Some(t) = v {
            c.push(expr, t.into());
        }
    }
    if let Some(t) = filter.updated_before {
        c.push("created_at < ?", (t + CLOCK_SLACK).into());
    }
    match filter.has_worker {
        Some(true) => c.cond.push("worker IS NOT NULL".into()),
        Some(false) => c.cond.push("worker IS NULL".into()),
        None => {}
    }
    if let Some(k) = cursor {
        let at = c.param(k.created_at.into());
        let id = c.param(k.id.into());
        c.cond.push(format!("(created_at, id) < ({at}, {id})"));
    }
    // Each value once: a value named twice would be two branches of the
    // split below, each returning the same rows (a list showed them twice,
    // and a bulk delete appended two events of one version: a 500).
    let distinct = |mut v: Vec<&'static str>| {
        v.sort_unstable();
        v.dedup();
        v
    };
    let statuses = distinct(filter.status.iter().map(|s| s.as_str()).collect());
    let states = distinct(filter.worker_state.iter().map(|s| s.as_str()).collect());
    // One branch per value of the first filter that has several; the other
    // (if any) stays a plain condition of every branch.
    let (split, rest): (Column, Column) = if statuses.len() > 1 {
        (("status", &statuses), (WORKER_STATE, &states))
    } else {
        ((WORKER_STATE, &states), ("status", &statuses))
    };
    let mut branches: Vec<Vec<String>> = vec![Vec::new()];
    match rest.1 {
        [] => {}
        [one] => c.push(&format!("{} = ?", rest.0), (*one).into()),
        many => {
            let marks: Vec<String> = many.iter().map(|v| c.param((*v).into())).collect();
            c.cond.push(format!("{} IN ({})", rest.0, marks.join(", ")));
        }
    }
    if !split.1.is_empty() {
        branches = split
            .1
            .iter()
            .map(|v| vec![format!("{} = {}", split.0, c.param((*v).into()))])
            .collect();
    }
    // `updated_after`: the sessions created since (each was updated since:
    // a plain newest-first walk, no row to skip) and, apart, the older ones
    // updated since (few: the sessions still changing when T passed).
    if let Some(t) = filter.updated_after {
        let since = c.param(t.into());
        let created = c.param((t + CLOCK_SLACK).into());
        branches = branches
            .into_iter()
            .flat_map(|b| {
                [
                    vec![format!("created_at >= {created}")],
                    vec![
                        format!("updated_at >= {since}"),
                        format!("created_at < {created}"),
                    ],
                ]
                .map(|extra| [b.clone(), extra].concat())
            })
            .collect();
    }
    let lim = c.param((limit as i64).into());
    let select = |extra: &[String]| {
        let mut all: Vec<&str> = c.cond.iter().map(String::as_str).collect();
        all.extend(extra.iter().map(String::as_str));
        let where_ = if all.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", all.join(" AND "))
        };
        format!("FROM sessions {where_} {ORDER} LIMIT {lim}")
    };
    let sql = match branches.as_slice() {
        [one] => format!("SELECT {columns} {}", select(one)),
        many => format!(
            "SELECT {columns} FROM ({}) branches {ORDER} LIMIT {lim}",
            many.iter()
                .map(|b| format!("(SELECT {SESSION_COLUMNS} {})", select(b)))
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        ),
    };
    (sql, c.values)
}

impl Store {
    /// Newest first, `limit` rows after `cursor`.
    #[instrument(skip(self))]
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: u64,
        cursor: Option<ListCursor>,
    ) -> Result<Vec<SessionState>, StoreError> {
        self.rows_of_page(filter, limit, cursor, SESSION_COLUMNS, rows::session)
            .await
    }

    /// [`Store::list`] as a page of the API answers it (the JSON documents
    /// copied, not parsed).
    #[instrument(skip(self))]
    pub async fn list_page(
        &self,
        filter: &ListFilter,
        limit: u64,
        cursor: Option<ListCursor>,
    ) -> Result<Vec<ListedSession>, StoreError> {
        self.rows_of_page(
            filter,
            limit,
            cursor,
            SESSION_TEXT_COLUMNS,
            rows::listed_session,
        )
        .await
    }

    async fn rows_of_page<T>(
        &self,
        filter: &ListFilter,
        limit: u64,
        cursor: Option<ListCursor>,
        columns: &str,
        decode: fn(&QueryResult) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let (sql, values) = list_statement(filter, limit, cursor, columns);
        self.db
            .query_all_raw(stmt(&sql, values))
            .await?
            .iter()
            .map(decode)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = ListCursor {
            created_at: Utc.timestamp_micros(1_763_700_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(ListCursor::decode(&c.encode()), Some(c));
        for bad in ["", "!!", "bm90LWEtY3Vyc29y"] {
            assert_eq!(ListCursor::decode(bad), None);
        }
    }

    #[test]
    fn several_values_become_ordered_branches() {
        let filter = ListFilter {
            status: vec![SessionStatus::Paused, SessionStatus::Crashed],
            worker_state: vec![WorkerState::Idle, WorkerState::Exited],
            ..Default::default()
        };
        let (sql, values) = list_statement(&filter, 21, None, SESSION_COLUMNS);
        assert_eq!(sql.matches("UNION ALL").count(), 1, "{sql}");
        assert_eq!(sql.matches("status = $").count(), 2, "{sql}");
        assert!(
            sql.contains(&format!("{WORKER_STATE} IN ($1, $2)")),
            "{sql}"
        );
        assert!(!sql.contains("OFFSET"), "{sql}");
        // Two states, two statuses, the limit.
        assert_eq!(values.len(), 5);
    }

    #[test]
    fn updated_after_splits_on_the_creation_time() {
        let t = Utc.timestamp_micros(1_763_700_000_000_000).unwrap();
        let filter = ListFilter {
            status: vec![SessionStatus::Active, SessionStatus::Paused],
            updated_after: Some(t),
            ..Default::default()
        };
        let (sql, _) = list_statement(&filter, 21, None, SESSION_COLUMNS);
        assert_eq!(sql.matches("UNION ALL").count(), 3, "{sql}");
        // $3: the time, $4: the time plus the slack.
        assert_eq!(sql.matches("created_at >= $4").count(), 2, "{sql}");
        assert_eq!(
            sql.matches("updated_at >= $3 AND created_at < $4").count(),
            2,
            "{sql}"
        );
    }

    #[test]
    fn updated_before_bounds_the_creation_walk() {
        let t = Utc.timestamp_micros(1_763_700_000_000_000).unwrap();
        let filter = ListFilter {
            updated_before: Some(t),
            ..Default::default()
        };
        let (sql, values) = list_statement(&filter, 21, None, SESSION_COLUMNS);
        assert!(sql.contains("updated_at < $1"), "{sql}");
        assert!(sql.contains("created_at < $2"), "{sql}");
        assert_eq!(values[1], Param::from(t + CLOCK_SLACK));
    }
}
