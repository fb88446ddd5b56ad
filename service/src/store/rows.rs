//! Decoding rows into domain values.

use chrono::{DateTime, Utc};
use sea_orm::QueryResult;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{StoreError, events::StoredEvent};
use crate::contract::{self, ListedSession, format_time};
use crate::domain::{
    EventKind, ForkedFrom, RuntimeBackend, SessionState, SessionStatus, Usage, WorkerSpec,
};

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

/// [`SESSION_COLUMNS`] with the three JSON documents as text (for
/// [`listed_session`]); also usable over a derived table of those columns.
pub(crate) const SESSION_TEXT_COLUMNS: &str = "id, agent_id, session_type, status, \
     context::text AS context, checkpoint::text AS checkpoint, runtime_backend, \
     runtime_metadata::text AS runtime_metadata, worker, usage, parent_session_id, \
     forked_from_version, version, created_at, updated_at";

fn status(row: &QueryResult) -> Result<SessionStatus, StoreError> {
    let status: String = row.try_get("", "status")?;
    SessionStatus::parse(&status).ok_or_else(|| corrupt(&status))
}

fn backend(row: &QueryResult) -> Result<RuntimeBackend, StoreError> {
    let backend: String = row.try_get("", "runtime_backend")?;
    RuntimeBackend::parse(&backend).ok_or_else(|| corrupt(&backend))
}

fn worker(row: &QueryResult) -> Result<Option<WorkerSpec>, StoreError> {
    row.try_get::<Option<Value>>("", "worker")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(corrupt)
}

fn usage(row: &QueryResult) -> Result<Usage, StoreError> {
    serde_json::from_value(row.try_get("", "usage")?).map_err(corrupt)
}

fn forked_from(row: &QueryResult) -> Result<Option<ForkedFrom>, StoreError> {
    Ok(
        match (
            row.try_get::<Option<Uuid>>("", "parent_session_id")?,
            row.try_get::<Option<i64>>("", "forked_from_version")?,
        ) {
            (Some(session_id), Some(version)) => Some(ForkedFrom {
                session_id,
                version,
            }),
            _ => None,
        },
    )
}

pub(crate) fn session(row: &QueryResult) -> Result<SessionState, StoreError> {
    let checkpoint: Option<Value> = row.try_get("", "checkpoint")?;
    Ok(SessionState {
        id: row.try_get("", "id")?,
        agent_id: row.try_get("", "agent_id")?,
        session_type: row.try_get("", "session_type")?,
        status: status(row)?,
        context: object(row.try_get("", "context")?, "context")?,
        checkpoint: checkpoint.map(|c| object(c, "checkpoint")).transpose()?,
        runtime_backend: backend(row)?,
        runtime_metadata: object(row.try_get("", "runtime_metadata")?, "runtime_metadata")?,
        worker: worker(row)?,
        usage: usage(row)?,
        forked_from: forked_from(row)?,
        version: row.try_get("", "version")?,
        created_at: row.try_get::<DateTime<Utc>>("", "created_at")?,
        updated_at: row.try_get::<DateTime<Utc>>("", "updated_at")?,
    })
}

/// A session as read with [`SESSION_TEXT_COLUMNS`]: its three JSON
/// documents still PostgreSQL's text of the `jsonb`, so an answer that only
/// writes them out again (`GET /sessions/{id}`, a list's page) never parses
/// them into trees ([`SessionRow::into_listed`]); a write that plans against
/// the state parses them once ([`SessionRow::into_state`]).
#[derive(Debug, Clone)]
pub(crate) struct SessionRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub session_type: String,
    pub status: SessionStatus,
    pub context: Box<RawValue>,
    pub checkpoint: Option<Box<RawValue>>,
    pub runtime_backend: RuntimeBackend,
    pub runtime_metadata: Box<RawValue>,
    pub worker: Option<WorkerSpec>,
    pub usage: Usage,
    pub forked_from: Option<ForkedFrom>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A row of [`SESSION_TEXT_COLUMNS`].
pub(crate) fn session_row(row: &QueryResult) -> Result<SessionRow, StoreError> {
    let raw = |col: &str, text: String| {
        RawValue::from_string(text).map_err(|e| corrupt(format!("{col}: {e}")))
    };
    let checkpoint: Option<String> = row.try_get("", "checkpoint")?;
    Ok(SessionRow {
        id: row.try_get("", "id")?,
        agent_id: row.try_get("", "agent_id")?,
        session_type: row.try_get("", "session_type")?,
        status: status(row)?,
        context: raw("context", row.try_get("", "context")?)?,
        checkpoint: checkpoint.map(|c| raw("checkpoint", c)).transpose()?,
        runtime_backend: backend(row)?,
        runtime_metadata: raw("runtime_metadata", row.try_get("", "runtime_metadata")?)?,
        worker: worker(row)?,
        usage: usage(row)?,
        forked_from: forked_from(row)?,
        version: row.try_get("", "version")?,
        created_at: row.try_get::<DateTime<Utc>>("", "created_at")?,
        updated_at: row.try_get::<DateTime<Utc>>("", "updated_at")?,
    })
}

impl SessionRow {
    /// The state a write plans against: the documents parsed.
    pub(crate) fn into_state(self) -> Result<SessionState, StoreError> {
        let doc = |raw: &RawValue, col: &str| {
            serde_json::from_str::<Value>(raw.get())
                .map_err(|e| corrupt(format!("{col}: {e}")))
                .and_then(|v| object(v, col))
        };
        Ok(SessionState {
            context: doc(&self.context, "context")?,
            checkpoint: self
                .checkpoint
                .as_deref()
                .map(|c| doc(c, "checkpoint"))
                .transpose()?,
            runtime_metadata: doc(&self.runtime_metadata, "runtime_metadata")?,
            id: self.id,
            agent_id: self.agent_id,
            session_type: self.session_type,
            status: self.status,
            runtime_backend: self.runtime_backend,
            worker: self.worker,
            usage: self.usage,
            forked_from: self.forked_from,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }

    /// The representation, its documents copied as they were read.
    pub(crate) fn into_listed(self) -> ListedSession {
        ListedSession {
            id: self.id,
            agent_id: self.agent_id,
            session_type: self.session_type,
            status: self.status.into(),
            context: self.context,
            checkpoint: self.checkpoint,
            runtime_backend: self.runtime_backend.into(),
            runtime_metadata: self.runtime_metadata,
            worker: self.worker.map(Into::into),
            usage: contract::Usage::from(&self.usage),
            parent_session_id: self.forked_from.map(|f| f.session_id),
            forked_from: self.forked_from.map(Into::into),
            version: self.version,
            created_at: format_time(&self.created_at),
            updated_at: format_time(&self.updated_at),
            created: self.created_at,
        }
    }
}

/// A row of [`SESSION_TEXT_COLUMNS`] as a list answers it.
pub(crate) fn listed_session(row: &QueryResult) -> Result<ListedSession, StoreError> {
    session_row(row).map(SessionRow::into_listed)
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
