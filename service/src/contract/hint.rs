//! Wake-up hints: a best-effort message published on Redis right after a
//! write commits, before the event is released to the feed.
//!
//! A hint is not the record (the feed is): it may be lost, duplicated or
//! arrive before the event can be read. It carries only what a consumer
//! needs to decide whether to look at the session now (the runner uses it
//! to react in milliseconds even while the feed is held back).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::EventKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeHint {
    pub session_id: Uuid,
    pub event_type: EventKind,
    /// The session's version after the write.
    pub version: i64,
    /// The session's backend after the write (`local`, `kubernetes`, `unknown`).
    pub runtime_backend: String,
    /// Whether the session has a worker spec after the write.
    pub has_worker: bool,
    /// The fields an update changed; empty for creates and deletes.
    #[serde(default)]
    pub updates: Vec<String>,
}

/// The channel hints go to, under the deployment's channel prefix.
pub fn hint_channel(prefix: &str) -> String {
    format!("{prefix}hints:session")
}
