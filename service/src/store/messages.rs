//! A session's message log: its workers' stream-json lines, appended in
//! batches. Each batch also updates the session's usage totals and appends
//! one `session.updated` event, in the same statement.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow};
use super::sessions::{Appended, Attempt, Written};
use super::{Store, StoreError};
use crate::domain::event;
use crate::domain::{EventKind, EventMetadata, SessionChanges};

#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub seq: i64,
    pub message: Value,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Append messages; returns the session after the usage update.
    #[instrument(skip(self, messages, meta), fields(session_id = %id, count = messages.len()))]
    pub async fn append_messages(
        &self,
        id: Uuid,
        messages: &[Value],
        meta: &EventMetadata,
    ) -> Result<Written, StoreError> {
        let batch = Value::Array(messages.to_vec());
        let event = EventRow::updated("$7", "$8").cte();
        let sql = format!(
            "WITH {ANNOUNCE}, \
             u AS (UPDATE sessions SET usage = $4, version = $2 + 1, updated_at = now() FROM announce \
                   WHERE id = $1 AND version = $2 RETURNING updated_at), \
             m AS (INSERT INTO session_messages (session_id, seq, message, created_at) \
                   SELECT $1, $5 + o.i - 1, o.m, u.updated_at \
                   FROM u, jsonb_array_elements($6) WITH ORDINALITY AS o(m, i) RETURNING 1), \
             {event} \
             SELECT u.updated_at, (SELECT count(*) FROM m) AS stored FROM u, e"
        );
        let meta = Param::Json(Some(Box::new(
            serde_json::to_value(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        )));
        self.on_version(id, None, async |current| {
            let mut usage = current.usage.clone();
            let first_seq = usage.message_count + 1;
            usage.add_messages(messages);
            let usage_json =
                serde_json::to_value(&usage).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let changes = SessionChanges {
                usage: Some(usage),
                ..SessionChanges::default()
            };
            let mut next = current.clone();
            next.apply(&changes);
            next.version += 1;
            let payload = event::updated_payload(&next, &changes);
            let values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                event::new_event_id().into(),
                Param::Json(Some(Box::new(usage_json))),
                first_seq.into(),
                Param::Json(Some(Box::new(batch.clone()))),
                Param::Json(Some(Box::new(payload.clone()))),
                meta.clone(),
            ];
            let Some(row) = self
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    sql.as_str(),
                    values,
                ))
                .await?
            else {
                return Ok(Attempt::LostRace);
            };
            next.updated_at = row.try_get("", "updated_at")?;
            let appended = Appended::new(&next, EventKind::Updated, &payload);
            Ok(Attempt::Done(Written {
                session: next,
                appended: Some(appended),
            }))
        })
        .await
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
            .map(super::rows::message)
            .collect()
    }
}
