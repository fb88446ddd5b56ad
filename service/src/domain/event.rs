//! Session events: their names and payloads (docs/design.md, events).
//!
//! Payloads keep the seed's shape (`agent_id`, `session_type`,
//! `runtime_backend` on create; `agent_id`, `status`, `updates` on update) and
//! add `changes`, the new value of every changed field, which is what replay
//! folds into the projection.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::session::{CreateSession, SessionChanges, SessionState};

pub const AGGREGATE_TYPE: &str = "session";

/// A new event's `event_id`: a UUIDv7, so ids grow with time and the log's
/// unique index on `event_id` takes each insert at its right edge, as the
/// position index does. With random (v4) ids every append touched a random
/// leaf of an index that outgrows the cache as the log does: pgbench's
/// create statement ran 3–13 % faster with time-ordered ids at 5 M events
/// (bench/RESULTS.md). Consumers only compare ids; none reads time from one.
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "session.created")]
    Created,
    #[serde(rename = "session.updated")]
    Updated,
    #[serde(rename = "session.deleted")]
    Deleted,
    /// A user message was queued for the worker (`session_inputs`).
    #[serde(rename = "session.input_received")]
    InputReceived,
    /// An interrupt was queued for the worker.
    #[serde(rename = "session.interrupted")]
    Interrupted,
    /// The worker asked to run a tool (`session_approvals`).
    #[serde(rename = "session.approval_requested")]
    ApprovalRequested,
    /// Someone (or the runner's timeout) answered a tool approval.
    #[serde(rename = "session.approval_decided")]
    ApprovalDecided,
    /// A new session was forked from this one (the child has its own
    /// `session.created`).
    #[serde(rename = "session.forked")]
    Forked,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        Self::Created,
        Self::Updated,
        Self::Deleted,
        Self::InputReceived,
        Self::Interrupted,
        Self::ApprovalRequested,
        Self::ApprovalDecided,
        Self::Forked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "session.created",
            Self::Updated => "session.updated",
            Self::Deleted => "session.deleted",
            Self::InputReceived => "session.input_received",
            Self::Interrupted => "session.interrupted",
            Self::ApprovalRequested => "session.approval_requested",
            Self::ApprovalDecided => "session.approval_decided",
            Self::Forked => "session.forked",
        }
    }

    /// The live-session events (their rows live in tables of their own:
    /// `session_inputs`, `session_approvals`) and `session.forked` (the
    /// child is a session of its own): on the session they only move
    /// `version` and `updated_at`, and replay folds nothing else.
    pub fn moves_version_only(self) -> bool {
        matches!(
            self,
            Self::InputReceived
                | Self::Interrupted
                | Self::ApprovalRequested
                | Self::ApprovalDecided
                | Self::Forked
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Who caused an event and in answer to what; stored with every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The authenticated subject, or `anonymous` when auth is off.
    pub actor: String,
    /// The `X-Request-Id` of the HTTP request that made the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The event or command this change answers, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Set on events that came in through `POST /sessions/import`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportMarker>,
}

/// Where an imported event came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportMarker {
    /// When it was imported (RFC 3339).
    pub at: String,
    /// The session id it had in the exported document.
    pub from_session_id: Uuid,
    /// Its event id there, when the import gave it a new one (`new_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_event_id: Option<Uuid>,
    /// Its position in the exporting database's feed.
    pub from_position: i64,
}

pub fn created_payload(cmd: &CreateSession) -> Value {
    let mut payload = json!({
        "agent_id": cmd.agent_id,
        "session_type": cmd.session_type,
        "runtime_backend": cmd.runtime_backend.as_str(),
        "changes": cmd.changes(),
    });
    if let (Some(f), Some(p)) = (cmd.forked_from, payload.as_object_mut()) {
        p.insert("forked_from".into(), json!(f));
    }
    payload
}

/// `session.forked` on the parent.
pub fn forked_payload(parent: &SessionState, child: Uuid, at_version: i64) -> Value {
    json!({
        "agent_id": parent.agent_id,
        "status": parent.status.as_str(),
        "child_session_id": child,
        "at_version": at_version,
    })
}

/// `state` is the session after the change.
pub fn updated_payload(state: &SessionState, changes: &SessionChanges) -> Value {
    json!({
        "agent_id": state.agent_id,
        "status": state.status.as_str(),
        "updates": changes.names(),
        "changes": changes,
    })
}

pub fn deleted_payload(state: &SessionState) -> Value {
    json!({
        "agent_id": state.agent_id,
        "status": state.status.as_str(),
        "session_type": state.session_type,
        "runtime_backend": state.runtime_backend.as_str(),
    })
}

/// The change set an event applies to the projection.
pub fn changes_of(payload: &Value) -> Result<SessionChanges, String> {
    let changes = payload.get("changes").ok_or("has no changes")?;
    SessionChanges::deserialize(changes).map_err(|e| format!("has unreadable changes: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_time_ordered() {
        let ids: Vec<Uuid> = (0..1000).map(|_| new_event_id()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        // Generated one after the other, each sorts after the one before:
        // appends reach the unique index at its right edge.
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
