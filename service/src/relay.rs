//! The relay: publishes committed events to Redis, in position order, from a
//! durable cursor (G4 in docs/design.md).
//!
//! Every `serve` replica runs one; a PostgreSQL advisory lock lets exactly one
//! publish at a time, and another takes over within a leader-check interval
//! when it dies. Publishing happens before the cursor is saved, so a crash in
//! between re-publishes (at least once; consumers drop duplicates by
//! `event_id`), never skips.
//!
//! Wake-ups: a commit on this replica wakes it at once; commits on other
//! replicas arrive as PostgreSQL `NOTIFY`; a short poll covers the rest (for
//! instance an event held back behind a transaction that then rolled back).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::leader::{self, FeedWait, Held, sleep_or_shutdown};
use crate::metrics::names;
use crate::store::{FeedFilter, FeedListener, LeaderLock, LeaderRole, Store};

/// Cursor name of the Redis relay.
pub(crate) const CURSOR: &str = "redis";

#[derive(Debug, Clone)]
pub(crate) struct RelaySettings {
    pub database_url: String,
    pub channel_prefix: String,
    pub batch_size: u64,
    pub poll_interval: Duration,
    pub leader_check_interval: Duration,
    pub lag_warn_after: Duration,
}

/// A counter bumped whenever the log may have grown; SSE streams and the
/// relay wait on it.
#[derive(Clone)]
pub struct FeedSignal {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for FeedSignal {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(0).0),
        }
    }
}

impl FeedSignal {
    pub fn bump(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// Turn local commits into signals here and `NOTIFY`s for other replicas.
pub(crate) async fn forward_local_commits(
    store: Store,
    wake: Arc<Notify>,
    signal: FeedSignal,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
        }
        signal.bump();
        // Commits that arrive while this NOTIFY is in flight coalesce into one permit.
        if let Err(e) = store.notify_feed().await {
            tracing::debug!(error = %e, "could not NOTIFY other replicas");
        }
    }
}

/// Listen for other replicas' commits; a lost connection also bumps the
/// signal, since notifications may have been missed meanwhile.
pub(crate) async fn listen_for_commits(
    database_url: String,
    signal: FeedSignal,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let mut listener = match FeedListener::connect(&database_url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "feed listener cannot connect; retrying");
                if sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        signal.bump();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                alive = listener.next() => {
                    signal.bump();
                    if !alive {
                        break;
                    }
                }
            }
        }
    }
}

pub(crate) struct Relay {
    store: Store,
    bus: Arc<Bus>,
    settings: RelaySettings,
    signal: FeedSignal,
}

impl Relay {
    pub(crate) fn new(
        store: Store,
        bus: Arc<Bus>,
        settings: RelaySettings,
        signal: FeedSignal,
    ) -> Self {
        Self {
            store,
            bus,
            settings,
            signal,
        }
    }

    /// Contend for leadership, publish while leader, until shutdown.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        leader::run_elected(
            LeaderRole::Relay,
            &self.settings.database_url,
            self.settings.leader_check_interval,
            names::RELAY_LEADER,
            &shutdown,
            |lock| self.lead(lock, &shutdown),
        )
        .await;
    }

    /// Publish until leadership is lost or shutdown.
    async fn lead(&self, lock: LeaderLock, shutdown: &CancellationToken) {
        let mut held = Held::new(lock, self.settings.leader_check_interval);
        let mut wait = FeedWait::new(&self.signal, self.settings.poll_interval);
        let mut cursor = None;
        let mut lag_checked = Instant::now() - Duration::from_secs(10);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        while held.still_leading(shutdown).await {
            let position = match cursor {
                Some(p) => p,
                None => match self.store.relay_cursor(CURSOR).await {
                    Ok(p) => {
                        cursor = Some(p);
                        p
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay cannot read its cursor; retrying");
                        sleep_or_shutdown(backoff.next_delay(), shutdown).await;
                        continue;
                    }
                },
            };
            if lag_checked.elapsed() >= Duration::from_secs(1) {
                self.report_lag(position).await;
                lag_checked = Instant::now();
            }
            wait.before_read();
            let batch = match self
                .store
                .feed(position, self.settings.batch_size, &FeedFilter::default())
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot read the log; retrying");
                    sleep_or_shutdown(backoff.next_delay(), shutdown).await;
                    continue;
                }
            };
            if batch.is_empty() {
                wait.idle(shutdown).await;
                continue;
            }
            wait.found();
            match self
                .bus
                .publish_events(&self.settings.channel_prefix, &batch)
                .await
            {
                Ok(()) => {
                    backoff.reset();
                    let last = batch.last().map_or(position, |e| e.position);
                    metrics::counter!(names::RELAY_PUBLISHED).increment(batch.len() as u64);
                    if let Some(e) = batch.last() {
                        let age = (chrono::Utc::now() - e.occurred_at)
                            .num_microseconds()
                            .unwrap_or(0);
                        metrics::histogram!(names::RELAY_COMMIT_TO_PUBLISH)
                            .record(age as f64 / 1e6);
                    }
                    cursor = Some(last);
                    if let Err(e) = self.store.save_relay_cursor(CURSOR, last).await {
                        // Publishing again after a restart is allowed; skipping is not.
                        tracing::warn!(error = %e, "relay could not save its cursor");
                    }
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, pending = batch.len(), "relay cannot publish to Redis; retrying");
                    metrics::counter!(names::RELAY_PUBLISH_FAILURES).increment(1);
                    sleep_or_shutdown(d, shutdown).await;
                }
            }
        }
    }

    async fn report_lag(&self, cursor: i64) {
        match self.store.relay_lag(cursor).await {
            Ok(lag) => {
                let seconds = lag
                    .oldest_unpublished
                    .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3)
                    .unwrap_or(0.0);
                metrics::gauge!(names::RELAY_LAG_EVENTS).set(lag.events as f64);
                metrics::gauge!(names::RELAY_LAG_SECONDS).set(seconds);
                if seconds >= self.settings.lag_warn_after.as_secs_f64() {
                    tracing::warn!(
                        lag_events = lag.events,
                        lag_seconds = seconds,
                        "relay is behind the log"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "relay lag not measured"),
        }
    }
}
