//! Decoding rows into domain values.

use chrono::{DateTime, Utc};
use sea_orm::QueryResult;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{StoreError, events::StoredEvent};
use crate::domain::{EventKind, ForkedFrom, RuntimeBackend, SessionState, SessionStatus};

/// Columns written when a session is created (usage starts at its default).
pub(crate) const INSERT_COLUMNS: &str = "id, agent_id, session_type, status, context, checkpoint, \
     runtime_backend, runtime_metadata, worker, parent_session_id, forked_from_version, version, \
     created_at, updated_at";

pub(crate) const SESSION_COLUMNS: &str = "id, agent_id, session_type, status, context, checkpoint, \
     runtime_backend, runtime_metadata, worker, usage, parent_session_id, forked_from_version, \
     version, created_at, updated_at";

pub(crate) const EVENT_COLUMNS: &str =
    "position, event_id, aggregate_id, version, event_type, payload, metadata, occurred_at";

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn object(v: Value, col: &str) -> Result<Map<String, Value>, StoreError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(corrupt(format!("{col} is not an object: {other}"))),
    }
}

pub(crate) fn session(row: &QueryResult) -> Result<SessionState, StoreError> {
    let status: String = row.try_get("", "status")?;
    let backend: String = row.try_get("", "runtime_backend")?;
    let checkpoint: Option<Value> = row.try_get("", "checkpoint")?;
    Ok(SessionState {
        id: row.try_get("", "id")?,
        agent_id: row.try_get("", "agent_id")?,
        session_type: row.try_get("", "session_type")?,
        status: SessionStatus::parse(&status).ok_or_else(|| corrupt(&status))?,
        context: object(row.try_get("", "context")?, "context")?,
        checkpoint: checkpoint.map(|c| object(c, "checkpoint")).transpose()?,
        runtime_backend: RuntimeBackend::parse(&backend).ok_or_else(|| corrupt(&backend))?,
        runtime_metadata: object(row.try_get("", "runtime_metadata")?, "runtime_metadata")?,
        worker: row
            .try_get::<Option<Value>>("", "worker")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(corrupt)?,
        usage: serde_json::from_value(row.try_get("", "usage")?).map_err(corrupt)?,
        forked_from: match (
            row.try_get::<Option<Uuid>>("", "parent_session_id")?,
            row.try_get::<Option<i64>>("", "forked_from_version")?,
        ) {
            (Some(session_id), Some(version)) => Some(ForkedFrom {
                session_id,
                version,
            }),
            _ => None,
        },
        version: row.try_get("", "version")?,
        created_at: row.try_get::<DateTime<Utc>>("", "created_at")?,
        updated_at: row.try_get::<DateTime<Utc>>("", "updated_at")?,
    })
}

pub(crate) fn event(row: &QueryResult) -> Result<StoredEvent, StoreError> {
    let kind: String = row.try_get("", "event_type")?;
    Ok(StoredEvent {
        position: row.try_get("", "position")?,
        event_id: row.try_get::<Uuid>("", "event_id")?,
        aggregate_id: row.try_get::<Uuid>("", "aggregate_id")?,
        version: row.try_get("", "version")?,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt(&kind))?,
        payload: row.try_get("", "payload")?,
        metadata: row.try_get("", "metadata")?,
        occurred_at: row.try_get::<DateTime<Utc>>("", "occurred_at")?,
    })
}

pub(crate) fn message(row: &QueryResult) -> Result<super::StoredMessage, StoreError> {
    Ok(super::StoredMessage {
        seq: row.try_get("", "seq")?,
        message: row.try_get("", "message")?,
        created_at: row.try_get("", "created_at")?,
    })
}
