//! The session representation and the create/update request bodies.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::portable::ForkedFrom;
use super::worker_spec::{WorkerSpec, same_variants};
use crate::domain::{self, SessionState};

/// RFC 3339 in UTC with microseconds, the precision PostgreSQL keeps.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Where a session is in its life: active ⇄ paused; active or paused →
/// completed or crashed; crashed → active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Active,
    Paused,
    Completed,
    Crashed,
}

same_variants!(
    SessionStatus,
    domain::SessionStatus,
    [Active, Paused, Completed, Crashed]
);

/// Where the session's worker runs, when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeBackend {
    Local,
    Kubernetes,
    #[default]
    Unknown,
}

same_variants!(
    RuntimeBackend,
    domain::RuntimeBackend,
    [Local, Kubernetes, Unknown]
);

/// Totals over every message the session's workers produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Usage {
    /// Messages stored in the session's message log.
    pub message_count: i64,
    /// `tool_use` blocks in assistant messages.
    pub tool_call_count: i64,
    /// Turns reported by the workers' `result` messages.
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cache_read_input_tokens: i64,
    /// Sum of `total_cost_usd` over the workers' runs.
    pub total_cost_usd: f64,
}

impl From<&domain::Usage> for Usage {
    fn from(u: &domain::Usage) -> Self {
        Self {
            message_count: u.message_count,
            tool_call_count: u.tool_call_count,
            turns: u.turns,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            total_cost_usd: u.total_cost_usd,
        }
    }
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
    /// The session this one was forked from (absent unless it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_session_id: Option<Uuid>,
    /// The parent and its version this session was forked as of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkedFrom>,
    /// Number of events in the session's stream; also sent as the `ETag`.
    #[schema(minimum = 1)]
    pub version: i64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: String,
}

impl From<SessionState> for Session {
    /// Moves the state's documents into the representation (no copy).
    fn from(s: SessionState) -> Self {
        Self {
            id: s.id,
            agent_id: s.agent_id,
            session_type: s.session_type,
            status: s.status.into(),
            context: s.context,
            checkpoint: s.checkpoint,
            runtime_backend: s.runtime_backend.into(),
            runtime_metadata: s.runtime_metadata,
            worker: s.worker.map(Into::into),
            usage: Usage::from(&s.usage),
            parent_session_id: s.forked_from.map(|f| f.session_id),
            forked_from: s.forked_from.map(Into::into),
            version: s.version,
            created_at: format_time(&s.created_at),
            updated_at: format_time(&s.updated_at),
        }
    }
}

impl From<&SessionState> for Session {
    fn from(s: &SessionState) -> Self {
        Self::from(s.clone())
    }
}

/// A session as `GET /sessions/{id}` and a page of `GET /sessions/` answer
/// it: the fields of [`Session`], in its order and form, with `context`,
/// `checkpoint` and `runtime_metadata` copied from PostgreSQL's text of the
/// `jsonb` instead of being parsed into trees and written out again.
#[derive(Debug, Serialize)]
pub struct ListedSession {
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_session_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkedFrom>,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    /// `created_at` as a time, for the next page's cursor.
    #[serde(skip)]
    pub created: DateTime<Utc>,
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

/// The body of `PATCH /sessions/{id}` sent as `application/json`: every
/// field optional, each one named is replaced (see `SessionMergePatch` for
/// merging).
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

/// The body of `PATCH /sessions/{id}` sent as `application/merge-patch+json`
/// (RFC 7396): every field optional; `context`, `checkpoint`,
/// `runtime_metadata` and `worker` are merged into the stored ones, and a
/// `null` inside them removes that key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionMergePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Map<String, Value>>,
    /// Merged into the checkpoint; `null` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_backend: Option<RuntimeBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub runtime_metadata: Option<Map<String, Value>>,
    /// Merged into the worker spec (the result must be a valid spec);
    /// `null` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub worker: Option<Value>,
}
