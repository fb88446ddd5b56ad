//! Portable sessions on the wire: the transcript store's answers, fork
//! requests and the export document (docs/design.md, portable sessions).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::event::EventEnvelope;
use super::live::{Approval, Input};
use super::session::{Session, SessionStatus};
use crate::domain;

/// The `format` of an export document.
pub const EXPORT_FORMAT: &str = "agent-sessions.export";
/// The `format_version` this service writes and reads.
pub const EXPORT_FORMAT_VERSION: u32 = 1;

/// The parent of a forked session and the parent's version it was copied as of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkedFrom {
    pub session_id: Uuid,
    #[schema(minimum = 1)]
    pub version: i64,
}

impl From<domain::ForkedFrom> for ForkedFrom {
    fn from(f: domain::ForkedFrom) -> Self {
        Self {
            session_id: f.session_id,
            version: f.version,
        }
    }
}

/// Where an imported event came from (in its metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImportMarker {
    /// When it was imported.
    #[schema(value_type = String, format = DateTime)]
    pub at: String,
    /// The session id it had in the exported document.
    pub from_session_id: Uuid,
    /// Its event id there, when the import gave it a new one (`new_id=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_event_id: Option<Uuid>,
    /// Its position in the exporting service's feed.
    pub from_position: i64,
}

impl From<domain::event::ImportMarker> for ImportMarker {
    fn from(m: domain::event::ImportMarker) -> Self {
        Self {
            at: m.at,
            from_session_id: m.from_session_id,
            from_event_id: m.from_event_id,
            from_position: m.from_position,
        }
    }
}

impl From<ImportMarker> for domain::event::ImportMarker {
    fn from(m: ImportMarker) -> Self {
        Self {
            at: m.at,
            from_session_id: m.from_session_id,
            from_event_id: m.from_event_id,
            from_position: m.from_position,
        }
    }
}

/// The answer to a transcript upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TranscriptWritten {
    /// The stored transcript's length in bytes (where the next upload starts).
    #[schema(minimum = 0)]
    pub length: i64,
}

/// The body of `POST /sessions/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// The parent's version to fork as of (1 to its current version; the
    /// current one by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub at_version: Option<i64>,
    /// Merged into the parent's worker spec (RFC 7396: `null` removes a
    /// key, or the whole spec); the result is validated like a create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub worker: Option<Value>,
    /// `paused` (default) or `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
}

/// `session.forked`'s payload, on the parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ForkedPayload {
    pub agent_id: Uuid,
    pub status: SessionStatus,
    pub child_session_id: Uuid,
    pub at_version: i64,
}

/// One message of an export document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportedMessage {
    #[schema(minimum = 1)]
    pub seq: i64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    #[schema(value_type = Object)]
    pub message: Map<String, Value>,
}

/// Where a transcript chunk starts and the session's version when it was
/// stored, so an imported transcript cuts at the same versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscriptChunk {
    #[schema(minimum = 0)]
    pub offset: i64,
    #[schema(minimum = 1)]
    pub version: i64,
}

/// `GET /sessions/{id}/export`, and the body of `POST /sessions/import`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionExport {
    /// Always `agent-sessions.export`.
    #[schema(example = "agent-sessions.export")]
    pub format: String,
    /// 1.
    #[schema(example = 1)]
    pub format_version: u32,
    #[schema(value_type = String, format = DateTime)]
    pub exported_at: String,
    pub session: Session,
    /// Every event of the session, in version order, with metadata.
    pub events: Vec<EventEnvelope>,
    pub messages: Vec<ExportedMessage>,
    pub inputs: Vec<Input>,
    pub approvals: Vec<Approval>,
    /// The CLI transcript (JSONL), empty when none was uploaded.
    pub transcript: String,
    /// Where each stored chunk of `transcript` starts and its version;
    /// absent means one chunk at the session's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript_chunks: Option<Vec<TranscriptChunk>>,
}
