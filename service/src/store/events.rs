//! Reading the event log: a session's stream and the global feed.
//!
//! Gap safety (G3): an event's position is its writing transaction's id ×
//! 1024, and the feed returns only positions below the horizon of
//! `horizon.rs` (the oldest event writer of ours still open), computed by an
//! earlier statement than the read. An event still being written can only
//! ever appear above what a reader has already seen, and a rolled-back
//! transaction leaves no hole to wait for.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value as Param};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::analytics::{FoldEvent, fold_event};
use super::rows::{self, EVENT_COLUMNS};
use super::{Store, StoreError};
use crate::contract::{EventEnvelope, format_time};
use crate::domain::event::AGGREGATE_TYPE;
use crate::domain::{EventKind, EventMetadata};

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub event_id: Uuid,
    pub aggregate_id: Uuid,
    pub version: i64,
    pub kind: EventKind,
    pub payload: Value,
    pub metadata: Value,
    pub occurred_at: DateTime<Utc>,
}

impl EventPage {
    fn empty() -> Self {
        Self {
            json: "[]".into(),
            count: 0,
            last: None,
        }
    }
}

impl StoredEvent {
    /// The envelope, with its metadata (Redis messages carry none: see
    /// [`FeedMessage`]).
    pub fn envelope(&self) -> EventEnvelope {
        EventEnvelope {
            event_id: self.event_id,
            event_type: self.kind.into(),
            aggregate_type: AGGREGATE_TYPE.to_owned(),
            aggregate_id: self.aggregate_id,
            version: self.version,
            position: self.position,
            occurred_at: format_time(&self.occurred_at),
            payload: self.payload.clone(),
            metadata: serde_json::from_value::<EventMetadata>(self.metadata.clone())
                .ok()
                .map(Into::into),
        }
    }
}

/// Restricts the feed to some sessions or event types.
#[derive(Debug, Clone, Default)]
pub struct FeedFilter {
    pub aggregate_id: Option<Uuid>,
    pub kinds: Vec<EventKind>,
}

/// A page of events in its JSON form, the body `/events` and
/// `/sessions/{id}/events` answer: each payload is copied from PostgreSQL's
/// text form of the `jsonb` into the output, never parsed and built again.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    /// A JSON array of envelopes (the `EventEnvelope` schema).
    pub json: String,
    pub count: usize,
    /// Position and version of the last event of the page.
    pub last: Option<(i64, i64)>,
}

/// The columns of an [`EventPage`] row: `payload` and `metadata` as text.
const EVENT_TEXT_COLUMNS: &str = "position, event_id, aggregate_id, version, event_type, \
     payload::text AS payload, metadata::text AS metadata, occurred_at";

/// The feed's statement over `columns`: events after `after`, strictly below
/// the horizon's position.
fn feed_statement(
    columns: &str,
    after: i64,
    horizon: i64,
    limit: u64,
    filter: &FeedFilter,
) -> (String, Vec<Param>) {
    let mut values: Vec<Param> = vec![after.into(), horizon.into()];
    let mut cond = String::new();
    if let Some(id) = filter.aggregate_id {
        values.push(id.into());
        cond.push_str(&format!(" AND aggregate_id = ${}", values.len()));
    }
    if !filter.kinds.is_empty() {
        let mut marks = Vec::new();
        for k in &filter.kinds {
            values.push(k.as_str().into());
            marks.push(format!("${}", values.len()));
        }
        cond.push_str(&format!(" AND event_type IN ({})", marks.join(", ")));
    }
    values.push((limit as i64).into());
    let sql = format!(
        "SELECT {columns} FROM events \
         WHERE position > $1 AND position < $2{cond} \
         ORDER BY position LIMIT ${}",
        values.len()
    );
    (sql, values)
}

fn session_statement(columns: &str, id: Uuid, after_version: i64, limit: u64) -> Statement {
    Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT {columns} FROM events WHERE aggregate_id = $1 AND version > $2 \
             ORDER BY version LIMIT $3"
        ),
        vec![id.into(), after_version.into(), (limit as i64).into()],
    )
}

/// What [`write_envelope`] wrote an envelope of.
struct Written {
    position: i64,
    version: i64,
    aggregate_id: Uuid,
    occurred_at: DateTime<Utc>,
}

/// Appends one envelope, as `EventEnvelope` serialises, with its metadata
/// when `with_metadata` (the row then has a `metadata` column).
fn write_envelope(
    out: &mut String,
    row: &QueryResult,
    with_metadata: bool,
) -> Result<Written, StoreError> {
    use std::fmt::Write as _;
    let kind: String = row.try_get("", "event_type")?;
    let kind =
        EventKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("event type {kind}")))?;
    let position: i64 = row.try_get("", "position")?;
    let version: i64 = row.try_get("", "version")?;
    let aggregate_id: Uuid = row.try_get("", "aggregate_id")?;
    let payload: String = row.try_get("", "payload")?;
    let occurred_at: DateTime<Utc> = row.try_get("", "occurred_at")?;
    let _ = write!(
        out,
        "{{\"event_id\":\"{}\",\"event_type\":\"{}\",\"aggregate_type\":\"{AGGREGATE_TYPE}\",\
         \"aggregate_id\":\"{aggregate_id}\",\"version\":{version},\"position\":{position},\
         \"occurred_at\":\"{}\",\"payload\":{payload}",
        row.try_get::<Uuid>("", "event_id")?,
        kind.as_str(),
        format_time(&occurred_at),
    );
    // The metadata goes through its type, as `StoredEvent::envelope` does:
    // only the known fields, and none when it does not read.
    if with_metadata {
        let metadata: String = row.try_get("", "metadata")?;
        if let Ok(m) = serde_json::from_str::<EventMetadata>(&metadata) {
            let m: crate::contract::EventMetadata = m.into();
            out.push_str(",\"metadata\":");
            out.push_str(
                &serde_json::to_string(&m).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
    }
    out.push('}');
    Ok(Written {
        position,
        version,
        aggregate_id,
        occurred_at,
    })
}

/// An event as the relay publishes it: its envelope without metadata, as
/// JSON text built around the payload's text from PostgreSQL (never parsed).
#[derive(Debug, Clone)]
pub struct FeedMessage {
    pub position: i64,
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub json: String,
}

/// The columns of a [`FeedMessage`] row.
const MESSAGE_COLUMNS: &str =
    "position, event_id, aggregate_id, version, event_type, payload::text AS payload, occurred_at";

impl Store {
    /// The feed's statement over `columns` below the horizon computed now
    /// (a statement earlier than the read, as G3 needs); `None` when
    /// nothing after `after` is below it. The whole feed is one call of
    /// `feed_after` (horizon and read in one round trip, `horizon.rs`); a
    /// filtered one asks for the horizon first.
    async fn feed_below_horizon(
        &self,
        columns: &str,
        after: i64,
        limit: u64,
        filter: &FeedFilter,
    ) -> Result<Option<(String, Vec<Param>)>, StoreError> {
        if filter.aggregate_id.is_none() && filter.kinds.is_empty() {
            let page = i32::try_from(limit).unwrap_or(i32::MAX);
            return Ok(Some((
                format!("SELECT {columns} FROM feed_after($1, $2) ORDER BY position"),
                vec![after.into(), page.into()],
            )));
        }
        let horizon = self.horizon().await?;
        if horizon.saturating_sub(1) <= after {
            return Ok(None);
        }
        Ok(Some(feed_statement(columns, after, horizon, limit, filter)))
    }

    /// The events of [`Store::feed_below_horizon`]'s statement, read as
    /// [`StoredEvent`]s (`columns` in [`EVENT_COLUMNS`]' shape).
    async fn events_below_horizon(
        &self,
        columns: &str,
        after: i64,
        limit: u64,
        filter: &FeedFilter,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match self
            .feed_below_horizon(columns, after, limit, filter)
            .await?
        {
            Some((sql, values)) => self.events(sql, values).await,
            None => Ok(Vec::new()),
        }
    }

    /// Events after `after` in position order, never past the safe horizon.
    #[instrument(skip(self))]
    pub async fn feed(
        &self,
        after: i64,
        limit: u64,
        filter: &FeedFilter,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.events_below_horizon(EVENT_COLUMNS, after, limit, filter)
            .await
    }

    /// [`Store::feed`] for the analytics consumer: of each event, only what
    /// `tally_change` reads, taken out of the payload by PostgreSQL (the
    /// fields of `changes` it reads, each by its path), so neither side
    /// builds, sends or parses the rest of the payload (`context` and
    /// `checkpoint` can be large; the projection never looks at them).
    #[instrument(skip(self))]
    pub async fn feed_for_analytics(
        &self,
        after: i64,
        limit: u64,
    ) -> Result<Vec<FoldEvent>, StoreError> {
        // Only a created or updated event's payload is looked into: the
        // others (messages, inputs: large ones among them) are never
        // detoasted here.
        static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let tallied = format!(
                "event_type IN ('{}', '{}')",
                EventKind::Created.as_str(),
                EventKind::Updated.as_str()
            );
            let when = |e: &str| format!("CASE WHEN {tallied} THEN {e} END");
            format!(
                "position, aggregate_id, event_type, occurred_at, {} AS agent_id, \
                 {} AS session_type, {} AS status, \
                 coalesce({}, false) AS runtime_metadata, {} AS worker",
                when("payload #>> '{changes,agent_id}'"),
                when(
                    "CASE WHEN jsonb_typeof(payload #> '{changes,session_type}') = 'string' \
                     THEN payload #>> '{changes,session_type}' END"
                ),
                when("payload #>> '{changes,status}'"),
                when("payload #> '{changes,runtime_metadata}' IS NOT NULL"),
                when("payload #> '{changes,runtime_metadata,worker}'"),
            )
        });
        let filter = FeedFilter::default();
        let Some((sql, values)) = self
            .feed_below_horizon(&COLUMNS, after, limit, &filter)
            .await?
        else {
            return Ok(Vec::new());
        };
        self.rows_of(sql, values, fold_event).await
    }

    /// [`Store::feed`] as the relay's messages.
    #[instrument(skip(self))]
    pub async fn feed_messages(
        &self,
        after: i64,
        limit: u64,
    ) -> Result<Vec<FeedMessage>, StoreError> {
        let filter = FeedFilter::default();
        let Some((sql, values)) = self
            .feed_below_horizon(MESSAGE_COLUMNS, after, limit, &filter)
            .await?
        else {
            return Ok(Vec::new());
        };
        self.rows_of(sql, values, |row| {
            let mut json = String::with_capacity(512);
            let w = write_envelope(&mut json, row, false)?;
            Ok(FeedMessage {
                position: w.position,
                aggregate_id: w.aggregate_id,
                occurred_at: w.occurred_at,
                json,
            })
        })
        .await
    }

    /// [`Store::feed`] as the JSON body of `/events`.
    #[instrument(skip(self))]
    pub async fn feed_page(
        &self,
        after: i64,
        limit: u64,
        filter: &FeedFilter,
    ) -> Result<EventPage, StoreError> {
        let Some((sql, values)) = self
            .feed_below_horizon(EVENT_TEXT_COLUMNS, after, limit, filter)
            .await?
        else {
            return Ok(EventPage::empty());
        };
        self.page(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await
    }

    /// One session's stream, by version; empty when the session never existed.
    #[instrument(skip(self))]
    pub async fn session_events(
        &self,
        id: Uuid,
        after_version: i64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.db
            .query_all_raw(session_statement(EVENT_COLUMNS, id, after_version, limit))
            .await?
            .iter()
            .map(rows::event)
            .collect()
    }

    /// [`Store::session_events`] as the JSON body of `/sessions/{id}/events`.
    #[instrument(skip(self))]
    pub async fn session_events_page(
        &self,
        id: Uuid,
        after_version: i64,
        limit: u64,
    ) -> Result<EventPage, StoreError> {
        self.page(session_statement(
            EVENT_TEXT_COLUMNS,
            id,
            after_version,
            limit,
        ))
        .await
    }

    async fn page(&self, statement: Statement) -> Result<EventPage, StoreError> {
        let rows = self.db.query_all_raw(statement).await?;
        let mut page = EventPage {
            json: String::with_capacity(64 + rows.len() * 768),
            count: rows.len(),
            last: None,
        };
        page.json.push('[');
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                page.json.push(',');
            }
            let w = write_envelope(&mut page.json, row, true)?;
            page.last = Some((w.position, w.version));
        }
        page.json.push(']');
        Ok(page)
    }

    /// Whether a session ever existed (it has at least one event).
    pub async fn session_exists_in_log(&self, id: Uuid) -> Result<bool, StoreError> {
        Ok(self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 AS one FROM events WHERE aggregate_id = $1 AND version = 1",
                vec![id.into()],
            ))
            .await?
            .is_some())
    }

    async fn events(
        &self,
        sql: String,
        values: Vec<Param>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.rows_of(sql, values, rows::event).await
    }

    /// Run a feed statement and turn each row into a `T`.
    async fn rows_of<T>(
        &self,
        sql: String,
        values: Vec<Param>,
        each: impl Fn(&QueryResult) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?
            .iter()
            .map(each)
            .collect()
    }
}
