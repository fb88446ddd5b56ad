//! The analytics consumer: keeps the analytics projection (`GET
//! /analytics`, the `sessions` gauge) in step with the event log.
//!
//! It follows the feed like the relay: every `serve` replica runs one, an
//! advisory lock (`LeaderRole::Analytics`) lets one fold at a time, and it
//! wakes on the same commit signal. Each page of events is folded in one
//! transaction with the projection's position (`store/analytics.rs`), so a
//! crash between pages loses nothing and folds nothing twice. The write
//! path is untouched: a request never waits for the projection.
//!
//! Once caught up it folds at most every `analytics.fold_interval_ms`: under
//! write load the commit signal fires for every batch, and a read of the
//! feed plus a fold per commit cost the database about as much as the writes
//! themselves. A backlog (a full page) is folded without waiting.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::leader::{self, FeedWait, Held, sleep_or_shutdown};
use crate::metrics::names;
use crate::relay::FeedSignal;
use crate::store::{LeaderLock, LeaderRole, Store};

#[derive(Debug, Clone)]
pub(crate) struct AnalyticsSettings {
    pub database_url: String,
    pub batch_size: u64,
    /// The least time between two reads once caught up.
    pub fold_interval: Duration,
    pub poll_interval: Duration,
    pub leader_check_interval: Duration,
}

pub(crate) struct AnalyticsConsumer {
    store: Store,
    settings: AnalyticsSettings,
    signal: FeedSignal,
}

impl AnalyticsConsumer {
    pub(crate) fn new(store: Store, settings: AnalyticsSettings, signal: FeedSignal) -> Self {
        Self {
            store,
            settings,
            signal,
        }
    }

    /// Contend for the role, fold while elected, until shutdown.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        leader::run_elected(
            LeaderRole::Analytics,
            &self.settings.database_url,
            self.settings.leader_check_interval,
            names::ANALYTICS_LEADER,
            &shutdown,
            |lock| self.lead(lock, &shutdown),
        )
        .await;
    }

    async fn lead(&self, lock: LeaderLock, shutdown: &CancellationToken) {
        let mut held = Held::new(lock, self.settings.leader_check_interval, shutdown);
        let leading = held.token().clone();
        let mut wait = FeedWait::new(&self.signal, self.settings.poll_interval);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut position = None;
        let mut last_read: Option<tokio::time::Instant> = None;
        while held.still_leading().await {
            let from = match position {
                Some(p) => p,
                None => match self.store.analytics_position().await {
                    Ok(p) => {
                        position = Some(p);
                        p
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "analytics cannot read its position; retrying");
                        sleep_or_shutdown(backoff.next_delay(), &leading).await;
                        continue;
                    }
                },
            };
            // Caught up at the last read: let commits gather first.
            if let Some(at) = last_read.take() {
                let due = at + self.settings.fold_interval;
                tokio::select! {
                    _ = leading.cancelled() => continue,
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            wait.before_read();
            let read_at = tokio::time::Instant::now();
            let page = self
                .store
                .feed_for_analytics(from, self.settings.batch_size)
                .await;
            let page = match page {
                Ok(p) if p.is_empty() => {
                    wait.idle(&leading).await;
                    last_read = Some(read_at);
                    continue;
                }
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "analytics cannot read the log; retrying");
                    sleep_or_shutdown(backoff.next_delay(), &leading).await;
                    continue;
                }
            };
            wait.found();
            match self.store.fold_into_analytics(from, &page).await {
                Ok(true) => {
                    backoff.reset();
                    let last = page.last().map_or(from, |e| e.position);
                    metrics::counter!(names::ANALYTICS_FOLDED).increment(page.len() as u64);
                    metrics::gauge!(names::ANALYTICS_POSITION).set(last as f64);
                    position = Some(last);
                    if (page.len() as u64) < self.settings.batch_size {
                        last_read = Some(read_at);
                    }
                }
                Ok(false) => {
                    tracing::info!(
                        "the analytics projection moved (rebuilt?); reading its position again"
                    );
                    position = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "analytics cannot fold events; retrying");
                    position = None;
                    sleep_or_shutdown(backoff.next_delay(), &leading).await;
                }
            }
        }
    }
}
