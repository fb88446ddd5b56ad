//! The event envelope, served by the feed and published on Redis.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{EventKind, EventMetadata};

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
