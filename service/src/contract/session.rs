//! The session representation and the create/update request bodies.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{RuntimeBackend, SessionState, SessionStatus, Usage, WorkerSpec};

/// RFC 3339 in UTC with microseconds, the precision PostgreSQL keeps.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A session as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub id: Uuid,
    pub agent_id: Uuid,
    /// Free text; conventionally conversation, development, task or batch.
    pub session_type: String,
    pub status: SessionStatus,
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Map<String, Value>>,
    pub runtime_backend: RuntimeBackend,
    /// Free-form; its `worker` member is the runner's record of the
    /// session's worker (`WorkerRecord`).
    #[schema(value_type = Object)]
    pub runtime_metadata: Map<String, Value>,
    /// What the runner starts for this session; absent for sessions agents keep themselves.
    #[serde(default)]
    pub worker: Option<WorkerSpec>,
    /// Message, tool-call, token and cost totals from the session's message log.
    #[serde(default)]
    pub usage: Usage,
    /// Number of events in the session's stream; also sent as the `ETag`.
    #[schema(minimum = 1)]
    pub version: i64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: String,
}

impl From<&SessionState> for Session {
    fn from(s: &SessionState) -> Self {
        Self {
            id: s.id,
            agent_id: s.agent_id,
            session_type: s.session_type.clone(),
            status: s.status,
            context: s.context.clone(),
            checkpoint: s.checkpoint.clone(),
            runtime_backend: s.runtime_backend,
            runtime_metadata: s.runtime_metadata.clone(),
            worker: s.worker_spec(),
            usage: s.usage.clone(),
            version: s.version,
            created_at: format_time(&s.created_at),
            updated_at: format_time(&s.updated_at),
        }
    }
}

/// The body of `POST /sessions/`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    pub agent_id: Uuid,
    #[schema(min_length = 1, max_length = 128, example = "development")]
    pub session_type: String,
    /// `active` (default) or `paused`.
    #[serde(default)]
    pub status: Option<SessionStatus>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Map<String, Value>>,
    #[serde(default)]
    pub runtime_backend: Option<RuntimeBackend>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub runtime_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(value_type = Option<WorkerSpec>)]
    pub worker: Option<Value>,
}

/// The body of `PATCH /sessions/{id}`: every field optional. With
/// `application/merge-patch+json`, `context`, `checkpoint`, `runtime_metadata`
/// and `worker` are merged (RFC 7396); otherwise each named field is replaced.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Map<String, Value>>,
    /// `null` clears the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_backend: Option<RuntimeBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub runtime_metadata: Option<Map<String, Value>>,
    /// `null` removes the worker spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WorkerSpec>)]
    pub worker: Option<Value>,
}
