//! What wakes the controller: the API's event feed (`GET /events?after=`),
//! followed by long-polls from a position kept on disk (the durable record);
//! Redis wake-up hints, published right after each commit, which make it
//! react in milliseconds even while the feed is held back; Redis
//! `events:session` messages; and a periodic full resync. Pub/sub drops what
//! arrives while disconnected, which the feed and the resync make up for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::backend::Backend;
use super::controller::Context;
use crate::backoff::Backoff;
use crate::contract::{EventEnvelope, EventKind, WakeHint};
use crate::metrics::names;

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

/// What a wake-up says about a session, from an event or a hint.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal<'a> {
    pub id: uuid::Uuid,
    pub kind: EventKind,
    /// Fields an update changed; `None` when the shape is unknown.
    pub updates: Option<Vec<&'a str>>,
    /// The session's backend, when the signal says.
    pub backend: Option<&'a str>,
    /// Whether the session has a worker spec, when the signal says.
    pub has_worker: Option<bool>,
}

impl<'a> Signal<'a> {
    pub fn of_event(e: &'a EventEnvelope) -> Self {
        let changes = e.payload.get("changes");
        Self {
            id: e.aggregate_id,
            kind: e.event_type,
            updates: e
                .payload
                .get("updates")
                .and_then(Value::as_array)
                .map(|u| u.iter().filter_map(Value::as_str).collect()),
            backend: e
                .payload
                .get("runtime_backend")
                .or_else(|| changes.and_then(|c| c.get("runtime_backend")))
                .and_then(Value::as_str),
            has_worker: (e.event_type == EventKind::Created).then(|| {
                changes
                    .and_then(|c| c.get("worker"))
                    .is_some_and(|w| !w.is_null())
            }),
        }
    }

    pub fn of_hint(h: &'a WakeHint) -> Self {
        Self {
            id: h.session_id,
            kind: h.event_type,
            updates: Some(h.updates.iter().map(String::as_str).collect()),
            backend: Some(h.runtime_backend.as_str()),
            has_worker: Some(h.has_worker),
        }
    }

    fn touches(&self, fields: &[&str]) -> bool {
        match &self.updates {
            Some(u) => u.iter().any(|f| fields.contains(f)),
            // Not the shape we know: look rather than miss it.
            None => true,
        }
    }

    /// Does this concern a session on `backend` (or one that now might be)?
    fn relevant(&self, known: bool, backend: &str) -> bool {
        if known {
            return self.kind != EventKind::Updated || self.touches(&DECISIVE);
        }
        let on_backend = self.backend.is_none_or(|b| b == backend);
        match self.kind {
            EventKind::Created => self.has_worker == Some(true) && self.backend == Some(backend),
            // A session gaining a worker spec or moving to this backend.
            EventKind::Updated => {
                self.touches(&["worker", "runtime_backend"])
                    && self.has_worker != Some(false)
                    && on_backend
            }
            // Inputs and approvals only concern a session already managed.
            EventKind::Deleted
            | EventKind::InputReceived
            | EventKind::Interrupted
            | EventKind::ApprovalRequested
            | EventKind::ApprovalDecided
            | EventKind::Forked => false,
        }
    }
}

/// Does this signal concern a session the backend manages (or now might)?
pub fn relevant<B: Backend>(ctx: &Context<B>, s: &Signal<'_>) -> bool {
    // A deletion also concerns a session the backend only keeps a workspace
    // of (its runner restarted since it ran, and catches up from the feed).
    let known = ctx.is_known(s.id)
        || ctx.backend.sessions().contains(&s.id)
        || (s.kind == EventKind::Deleted && ctx.backend.has_workspace(s.id));
    s.relevant(known, ctx.backend.kind().as_str())
}

/// Skip to the end of the feed without acting: the start-up resync covers
/// everything before it. Used when no position was saved.
pub async fn fast_forward<B: Backend>(ctx: &Context<B>, pos: &mut Position) {
    let mut at = 0;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        match ctx.api.events(at, PAGE, Duration::ZERO).await {
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
                backoff.wait().await;
            }
        }
    }
    info!(position = at, "starting at the end of the event feed");
    pos.save(at);
}

/// Follow the feed forever with long-polls: each returns as soon as an
/// event is released, or after `wait` with nothing.
pub async fn tail<B: Backend>(ctx: Arc<Context<B>>, mut pos: Position, wait: Duration) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        let after = pos.value.unwrap_or(0);
        match ctx.api.events(after, PAGE, wait).await {
            Ok(page) => {
                backoff.reset();
                for e in &page {
                    if relevant(&ctx, &Signal::of_event(e)) {
                        ctx.wake(e.aggregate_id);
                    }
                }
                if let Some(last) = page.last() {
                    pos.save(last.position);
                }
            }
            Err(e) => {
                warn!(error = %e, "reading the event feed failed");
                backoff.wait().await;
            }
        }
    }
}

/// Wake-ups from Redis: session events and, sooner, commit hints. Reconnect
/// forever; what was published while away is in the feed.
pub async fn redis_wakeups<B: Backend>(
    ctx: Arc<Context<B>>,
    url: String,
    events_channel: String,
    hints_channel: String,
) {
    let client = match redis::Client::open(url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "bad Redis URL; relying on the feed alone");
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub
                .subscribe(&[events_channel.as_str(), hints_channel.as_str()])
                .await
            {
                Ok(()) => {
                    info!(%events_channel, %hints_channel, "subscribed to session events and hints");
                    backoff.reset();
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if msg.get_channel_name() == hints_channel {
                            match serde_json::from_str::<WakeHint>(&payload) {
                                Ok(h) => {
                                    metrics::counter!(names::RUNNER_HINTS).increment(1);
                                    if relevant(&ctx, &Signal::of_hint(&h)) {
                                        ctx.wake(h.session_id);
                                    }
                                }
                                Err(e) => debug!(error = %e, "ignoring a message that is no hint"),
                            }
                            continue;
                        }
                        match serde_json::from_str::<EventEnvelope>(&payload) {
                            Ok(e) if relevant(&ctx, &Signal::of_event(&e)) => {
                                ctx.wake(e.aggregate_id)
                            }
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
        backoff.wait().await;
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
            ctx.stats.resynced(backend);
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

    fn decisive(updates: Value) -> bool {
        Signal::of_event(&updated(updates)).relevant(true, "local")
    }

    #[test]
    fn only_decisive_updates_wake_the_controller() {
        assert!(decisive(json!(["status"])));
        assert!(decisive(json!(["context", "runtime_metadata"])));
        assert!(!decisive(json!(["usage"])));
        assert!(!decisive(json!(["context"])));
        assert!(decisive(Value::Null));
    }

    fn hint(kind: EventKind, backend: &str, has_worker: bool, updates: &[&str]) -> WakeHint {
        WakeHint {
            session_id: uuid::Uuid::nil(),
            event_type: kind,
            version: 1,
            runtime_backend: backend.into(),
            has_worker,
            updates: updates.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn hints_wake_only_for_sessions_this_backend_could_run() {
        let unknown = |h: &WakeHint| Signal::of_hint(h).relevant(false, "local");
        assert!(unknown(&hint(EventKind::Created, "local", true, &[])));
        assert!(!unknown(&hint(EventKind::Created, "local", false, &[])));
        assert!(!unknown(&hint(EventKind::Created, "kubernetes", true, &[])));
        assert!(unknown(&hint(
            EventKind::Updated,
            "local",
            true,
            &["runtime_backend"]
        )));
        assert!(!unknown(&hint(
            EventKind::Updated,
            "kubernetes",
            true,
            &["runtime_backend"]
        )));
        assert!(!unknown(&hint(
            EventKind::Updated,
            "local",
            true,
            &["context"]
        )));
        let known = |h: &WakeHint| Signal::of_hint(h).relevant(true, "local");
        assert!(known(&hint(EventKind::Updated, "local", true, &["status"])));
        assert!(!known(&hint(EventKind::Updated, "local", true, &["usage"])));
        assert!(known(&hint(EventKind::Deleted, "local", true, &[])));
    }
}
