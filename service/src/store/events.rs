//! Reading the event log: a session's stream and the global feed.
//!
//! Gap safety (G3): an event's position is its writing transaction's id ×
//! 1024, and the feed returns only positions below the horizon of
//! `horizon.rs` (the oldest event writer of ours still open), computed by an
//! earlier statement than the read. An event still being written can only
//! ever appear above what a reader has already seen, and a rolled-back
//! transaction leaves no hole to wait for.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

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

impl StoredEvent {
    /// The envelope; `with_metadata` is false for Redis messages (docs/design.md, events).
    pub fn envelope(&self, with_metadata: bool) -> EventEnvelope {
        EventEnvelope {
            event_id: self.event_id,
            event_type: self.kind.into(),
            aggregate_type: AGGREGATE_TYPE.to_owned(),
            aggregate_id: self.aggregate_id,
            version: self.version,
            position: self.position,
            occurred_at: format_time(&self.occurred_at),
            payload: self.payload.clone(),
            metadata: with_metadata
                .then(|| serde_json::from_value::<EventMetadata>(self.metadata.clone()).ok())
                .flatten()
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

impl Store {
    /// Events after `after` in position order, never past the safe horizon.
    #[instrument(skip(self))]
    pub async fn feed(
        &self,
        after: i64,
        limit: u64,
        filter: &FeedFilter,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let horizon = self.horizon().await?;
        if horizon.saturating_sub(1) <= after {
            return Ok(Vec::new());
        }
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
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE position > $1 AND position < $2{cond} \
             ORDER BY position LIMIT ${}",
            values.len()
        );
        self.events(sql, values).await
    }

    /// One session's stream, by version; empty when the session never existed.
    #[instrument(skip(self))]
    pub async fn session_events(
        &self,
        id: Uuid,
        after_version: i64,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 AND version > $2 \
             ORDER BY version LIMIT $3"
        );
        self.events(
            sql,
            vec![id.into(), after_version.into(), (limit as i64).into()],
        )
        .await
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
        self.db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?
            .iter()
            .map(rows::event)
            .collect()
    }
}
