//! What wakes the controller: the API's event feed (`GET /events?after=`),
//! tailed from a position kept on disk; Redis `events:session` messages,
//! which only make it sooner (pub/sub drops what arrives while disconnected,
//! so every reconnect re-reads the feed); and a periodic full resync.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::backend::Backend;
use super::controller::Context;
use crate::contract::EventEnvelope;
use crate::contract::EventKind;

const PAGE: u32 = 500;

/// The runner's place in the feed, in `<root>/.runner/feed-position`.
pub struct Position {
    path: PathBuf,
    pub value: Option<i64>,
}

impl Position {
    pub fn load(root: &Path) -> Self {
        Self::load_named(root, "feed-position")
    }

    /// A second controller (one per backend) keeps its own place.
    pub fn load_named(root: &Path, file_name: &str) -> Self {
        let path = root.join(".runner").join(file_name);
        let value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Self { path, value }
    }

    pub fn save(&mut self, position: i64) {
        self.value = Some(position);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = self.path.with_extension("tmp");
        if std::fs::write(&tmp, position.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.path);
        }
    }
}

/// Fields whose change can change a decision. Others (message appends
/// update `usage`, say) do not wake the controller.
const DECISIVE: [&str; 5] = [
    "status",
    "worker",
    "runtime_backend",
    "runtime_metadata",
    "checkpoint",
];

fn touches_decisive_field(e: &EventEnvelope) -> bool {
    match e.payload.get("updates").and_then(Value::as_array) {
        Some(u) => u
            .iter()
            .any(|f| f.as_str().is_some_and(|f| DECISIVE.contains(&f))),
        // Not the shape we know: look rather than miss it.
        None => true,
    }
}

/// Does this event concern a session the backend manages (or now might)?
pub fn relevant<B: Backend>(ctx: &Context<B>, e: &EventEnvelope) -> bool {
    let id = e.aggregate_id;
    if ctx.is_known(id) || ctx.backend.sessions().contains(&id) {
        return e.event_type != EventKind::Updated || touches_decisive_field(e);
    }
    let backend = ctx.backend.kind().as_str();
    match e.event_type {
        EventKind::Created => {
            let changes = e.payload.get("changes");
            let has_worker = changes
                .and_then(|c| c.get("worker"))
                .is_some_and(|w| !w.is_null());
            let on_backend = e
                .payload
                .get("runtime_backend")
                .or_else(|| changes.and_then(|c| c.get("runtime_backend")))
                .and_then(Value::as_str)
                == Some(backend);
            has_worker && on_backend
        }
        // A session gaining a worker spec or moving to this backend.
        EventKind::Updated => e
            .payload
            .get("updates")
            .and_then(Value::as_array)
            .is_some_and(|u| {
                u.iter()
                    .any(|f| matches!(f.as_str(), Some("worker" | "runtime_backend")))
            }),
        EventKind::Deleted => false,
    }
}

/// Skip to the end of the feed without acting: the start-up resync covers
/// everything before it. Used when no position was saved.
pub async fn fast_forward<B: Backend>(ctx: &Context<B>, pos: &mut Position) {
    let mut at = 0;
    loop {
        match ctx.api.events(at, PAGE).await {
            Ok(page) => {
                let n = page.len();
                if let Some(last) = page.last() {
                    at = last.position;
                }
                if n < PAGE as usize {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the event feed yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    info!(position = at, "starting at the end of the event feed");
    pos.save(at);
}

/// Tail the feed forever: every `poll`, or at once when `nudge` fires.
pub async fn tail<B: Backend>(
    ctx: Arc<Context<B>>,
    mut pos: Position,
    poll: Duration,
    nudge: Arc<Notify>,
) {
    loop {
        let after = pos.value.unwrap_or(0);
        match ctx.api.events(after, PAGE).await {
            Ok(page) => {
                let full = page.len() == PAGE as usize;
                for e in &page {
                    if relevant(&ctx, e) {
                        ctx.wake(e.aggregate_id);
                    }
                }
                if let Some(last) = page.last() {
                    pos.save(last.position);
                }
                if full {
                    continue;
                }
            }
            Err(e) => warn!(error = %e, "reading the event feed failed"),
        }
        tokio::select! {
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Wake-ups from Redis: reconnect forever; each (re)connect nudges the feed
/// so whatever was published while away is read from the log.
pub async fn redis_wakeups<B: Backend>(
    ctx: Arc<Context<B>>,
    url: String,
    channel: String,
    nudge: Arc<Notify>,
) {
    let client = match redis::Client::open(url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "bad Redis URL; relying on the feed alone");
            return;
        }
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    info!(%channel, "subscribed to session events");
                    backoff = Duration::from_millis(250);
                    nudge.notify_one();
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<EventEnvelope>(&payload) {
                            Ok(e) if relevant(&ctx, &e) => ctx.wake(e.aggregate_id),
                            Ok(_) => {}
                            Err(e) => debug!(error = %e, "ignoring a message that is no event"),
                        }
                    }
                    warn!("Redis subscription ended; reconnecting");
                }
                Err(e) => warn!(error = %e, "cannot subscribe on Redis"),
            },
            Err(e) => debug!(error = %e, "Redis unreachable; the feed keeps the runner going"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Level-triggered safety net: every managed session that may need
/// something, plus every session the backend holds a worker for.
pub async fn resync<B: Backend>(ctx: &Context<B>) -> bool {
    let backend = ctx.backend.kind().as_str();
    match ctx
        .api
        .managed_sessions(backend, "active,paused,crashed")
        .await
    {
        Ok(sessions) => {
            debug!(count = sessions.len(), "resync");
            for s in &sessions {
                ctx.remember(s.id, true);
                ctx.wake(s.id);
            }
            for id in ctx.backend.sessions() {
                ctx.wake(id);
            }
            true
        }
        Err(e) => {
            warn!(error = %e, "resync failed");
            false
        }
    }
}

pub async fn resync_forever<B: Backend>(ctx: Arc<Context<B>>, every: Duration) {
    loop {
        let ok = resync(&ctx).await;
        let wait = if ok {
            every
        } else {
            every.min(Duration::from_secs(2))
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn updated(updates: Value) -> EventEnvelope {
        serde_json::from_value(json!({
            "event_id": uuid::Uuid::nil(), "event_type": "session.updated",
            "aggregate_type": "session", "aggregate_id": uuid::Uuid::nil(),
            "version": 2, "position": 9, "occurred_at": "2026-11-21T09:00:00Z",
            "payload": {"updates": updates}
        }))
        .unwrap()
    }

    #[test]
    fn only_decisive_updates_wake_the_controller() {
        assert!(touches_decisive_field(&updated(json!(["status"]))));
        assert!(touches_decisive_field(&updated(json!([
            "context",
            "runtime_metadata"
        ]))));
        assert!(!touches_decisive_field(&updated(json!(["usage"]))));
        assert!(!touches_decisive_field(&updated(json!(["context"]))));
        assert!(touches_decisive_field(&updated(Value::Null)));
    }
}
