//! The event envelope, served by the feed and published on Redis.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::portable::ImportMarker;
use super::worker_spec::same_variants;
use crate::domain;

/// What happened to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventKind {
    #[serde(rename = "session.created")]
    Created,
    #[serde(rename = "session.updated")]
    Updated,
    #[serde(rename = "session.deleted")]
    Deleted,
    /// A user message was queued (payload: `seq`, `input_id`, `kind`, `text`).
    #[serde(rename = "session.input_received")]
    InputReceived,
    /// An interrupt was queued (payload: `seq`, `input_id`).
    #[serde(rename = "session.interrupted")]
    Interrupted,
    /// The worker asked to run a tool (payload: the [`ApprovalRequest`](super::live::ApprovalRequest)).
    #[serde(rename = "session.approval_requested")]
    ApprovalRequested,
    /// A tool approval was answered (payload: an [`ApprovalDecidedPayload`](super::live::ApprovalDecidedPayload)).
    #[serde(rename = "session.approval_decided")]
    ApprovalDecided,
    /// A session was forked from this one (payload: a [`ForkedPayload`](super::portable::ForkedPayload)).
    #[serde(rename = "session.forked")]
    Forked,
}

same_variants!(
    EventKind,
    domain::EventKind,
    [
        Created,
        Updated,
        Deleted,
        InputReceived,
        Interrupted,
        ApprovalRequested,
        ApprovalDecided,
        Forked
    ]
);

/// Who caused an event and in answer to what; stored with every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventMetadata {
    /// The authenticated subject, or `anonymous` when auth is off.
    pub actor: String,
    /// The `X-Request-Id` of the HTTP request that made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The event or command this change answers, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Present on events that came in through `POST /sessions/import`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportMarker>,
}

impl From<domain::EventMetadata> for EventMetadata {
    fn from(m: domain::EventMetadata) -> Self {
        Self {
            actor: m.actor,
            request_id: m.request_id,
            causation_id: m.causation_id,
            imported: m.imported.map(Into::into),
        }
    }
}

impl From<EventMetadata> for domain::EventMetadata {
    fn from(m: EventMetadata) -> Self {
        Self {
            actor: m.actor,
            request_id: m.request_id,
            causation_id: m.causation_id,
            imported: m.imported.map(Into::into),
        }
    }
}

/// One event, as `/events`, `/sessions/{id}/events` and Redis carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub event_type: EventKind,
    /// Always `session`.
    pub aggregate_type: String,
    /// The session id.
    pub aggregate_id: Uuid,
    /// 1, 2, 3 … within the session's stream.
    pub version: i64,
    /// Global, increasing, gap-safe order of the feed (not dense).
    pub position: i64,
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: String,
    /// The seed's fields plus `updates` and `changes`.
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Actor, request id and causation; absent from Redis messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EventMetadata>,
}
