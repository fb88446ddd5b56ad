//! A session's message log: its workers' stream-json lines, appended in
//! batches. Each batch also updates the session's usage totals and appends
//! one `session.updated` event, in the same statement.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::event::{self, AGGREGATE_TYPE};
use crate::domain::{EventKind, EventMetadata, SessionChanges};

#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: i64,
    pub message: Value,
    pub created_at: DateTime<Utc>,
}

const ATTEMPTS: usize = 64;

impl Store {
    /// Append messages; returns the session after the usage update.
    #[instrument(skip(self, messages, meta), fields(session_id = %id, count = messages.len()))]
    pub async fn append_messages(
        &self,
        id: Uuid,
        messages: &[Value],
        meta: &EventMetadata,
    ) -> Result<crate::domain::SessionState, StoreError> {
        let batch = Value::Array(messages.to_vec());
        for _ in 0..ATTEMPTS {
            let current = self.get(id).await?.ok_or(StoreError::NotFound(id))?;
            let mut usage = current.usage.clone();
            let first_seq = usage.message_count + 1;
            usage.add_messages(messages);
            let usage_json = serde_json::to_value(&usage).expect("usage serialises");
            let changes = SessionChanges {
                usage: Some(usage),
                ..SessionChanges::default()
            };
            let mut next = current.clone();
            next.apply(&changes);
            next.version += 1;
            let sql = format!(
                "WITH u AS (UPDATE sessions SET usage = $4, version = $2 + 1, updated_at = now() \
                            WHERE id = $1 AND version = $2 RETURNING updated_at), \
                 m AS (INSERT INTO session_messages (session_id, seq, message, created_at) \
                       SELECT $1, $5 + o.i - 1, o.m, u.updated_at \
                       FROM u, jsonb_array_elements($6) WITH ORDINALITY AS o(m, i) RETURNING 1), \
                 e AS (INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
                                           event_type, payload, metadata, occurred_at) \
                       SELECT pg_current_xact_id()::text::bigint * 1024, $3, '{AGGREGATE_TYPE}', $1, $2 + 1, \
                              '{kind}', $7, $8, u.updated_at FROM u RETURNING position) \
                 SELECT u.updated_at, (SELECT count(*) FROM m) AS stored FROM u, e",
                kind = EventKind::Updated.as_str(),
            );
            let values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                Uuid::new_v4().into(),
                Param::Json(Some(Box::new(usage_json))),
                first_seq.into(),
                Param::Json(Some(Box::new(batch.clone()))),
                Param::Json(Some(Box::new(event::updated_payload(&next, &changes)))),
                Param::Json(Some(Box::new(
                    serde_json::to_value(meta).expect("metadata serialises"),
                ))),
            ];
            if let Some(row) = self
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    sql,
                    values,
                ))
                .await?
            {
                next.updated_at = row.try_get("", "updated_at")?;
                return Ok(next);
            }
        }
        Err(StoreError::Contended(id))
    }

    /// Messages after `after_seq`, in order.
    pub async fn messages(
        &self,
        id: Uuid,
        after_seq: i64,
        limit: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT seq, message, created_at FROM session_messages \
                 WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                vec![id.into(), after_seq.into(), (limit as i64).into()],
            ))
            .await?
            .iter()
            .map(|r| {
                Ok(StoredMessage {
                    seq: r.try_get("", "seq")?,
                    message: r.try_get("", "message")?,
                    created_at: r.try_get("", "created_at")?,
                })
            })
            .collect()
    }
}
