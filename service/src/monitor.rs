//! Watching the feed's horizon: how many committed events wait behind it,
//! since when, and which of our writers holds it.
//!
//! Every replica runs one (the figures are the database's, not a leader's).
//! While the feed is held longer than `relay.feed_held_warn_secs` it logs
//! one warning every [`WARN_EVERY`] naming the writer (pid, database, state,
//! transaction and query start), and one line when the feed moves again.
//! `/readyz` shows the latest report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::names;
use crate::store::{HorizonReport, Store};

const EVERY: Duration = Duration::from_secs(1);
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What `/readyz` says about the feed.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct FeedHealth {
    /// `ok`, `held` (longer than the threshold) or `unknown`.
    pub status: String,
    /// Committed events not yet released to readers.
    pub held_events: i64,
    /// How long the oldest of them has waited, in seconds.
    pub held_seconds: f64,
    /// The process id of the writer holding the feed, when one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocker_pid: Option<i32>,
    /// That writer's transaction age in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocker_age_seconds: Option<f64>,
}

/// The latest report, shared with `/readyz`.
#[derive(Clone, Default)]
pub struct FeedWatch {
    latest: Arc<Mutex<Option<FeedHealth>>>,
}

impl FeedWatch {
    pub fn latest(&self) -> FeedHealth {
        self.latest
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| FeedHealth {
                status: "unknown".into(),
                ..FeedHealth::default()
            })
    }

    fn set(&self, h: Option<FeedHealth>) {
        if let Ok(mut g) = self.latest.lock() {
            *g = h;
        }
    }
}

fn seconds_since(t: Option<chrono::DateTime<Utc>>) -> f64 {
    t.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3)
        .unwrap_or(0.0)
}

fn health(r: &HorizonReport, warn_after: Duration) -> FeedHealth {
    let held_seconds = seconds_since(r.oldest_held);
    let held = r.held_events > 0 && held_seconds >= warn_after.as_secs_f64();
    FeedHealth {
        status: if held { "held" } else { "ok" }.into(),
        held_events: r.held_events,
        held_seconds,
        blocker_pid: r.blocker.as_ref().map(|b| b.pid),
        blocker_age_seconds: r
            .blocker
            .as_ref()
            .map(|b| seconds_since(b.transaction_started)),
    }
}

/// Measure every second until shutdown.
pub(crate) async fn watch_feed(
    store: Store,
    watch: FeedWatch,
    warn_after: Duration,
    shutdown: CancellationToken,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match store.horizon_report().await {
            Ok(r) => {
                let h = health(&r, warn_after);
                metrics::gauge!(names::FEED_HELD_EVENTS).set(h.held_events as f64);
                metrics::gauge!(names::FEED_HELD_SECONDS).set(h.held_seconds);
                metrics::gauge!(names::FEED_BLOCKER_AGE_SECONDS)
                    .set(h.blocker_age_seconds.unwrap_or(0.0));
                if h.status == "held" {
                    if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        let b = r.blocker.as_ref();
                        tracing::warn!(
                            held_events = h.held_events,
                            held_seconds = h.held_seconds,
                            blocker_pid = b.map(|b| b.pid),
                            blocker_database = b.and_then(|b| b.database.as_deref()),
                            blocker_state = b.and_then(|b| b.state.as_deref()),
                            blocker_transaction_start = b
                                .and_then(|b| b.transaction_started)
                                .map(|t| t.to_rfc3339()),
                            blocker_query_start =
                                b.and_then(|b| b.query_started).map(|t| t.to_rfc3339()),
                            "the event feed is held back by an open event writer; \
                             its events reach readers when it commits or is cut by the statement timeout"
                        );
                        last_warning = Some(Instant::now());
                    }
                } else if last_warning.take().is_some() {
                    tracing::info!("the event feed moves again");
                }
                watch.set(Some(h));
            }
            Err(e) => {
                tracing::debug!(error = %e, "feed horizon not measured");
                watch.set(None);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
