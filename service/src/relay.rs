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
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::metrics::names;
use crate::store::{FeedFilter, FeedListener, LeaderLock, Leadership, Store};

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

/// Returns true when shutdown was requested during the sleep.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
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
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        metrics::gauge!(names::RELAY_LEADER).set(0.0);
        loop {
            let lock = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = LeaderLock::try_acquire(&self.settings.database_url, Leadership::Relay) => l,
            };
            match lock {
                Ok(Some(lock)) => {
                    backoff.reset();
                    tracing::info!("relay is the leader: publishing events to Redis");
                    metrics::gauge!(names::RELAY_LEADER).set(1.0);
                    let span = tracing::info_span!("relay");
                    self.lead(lock, &shutdown).instrument(span).await;
                    metrics::gauge!(names::RELAY_LEADER).set(0.0);
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tracing::warn!("relay lost leadership");
                }
                Ok(None) => {
                    if sleep_or_shutdown(self.settings.leader_check_interval, &shutdown).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot reach PostgreSQL for its lock; retrying");
                    if sleep_or_shutdown(backoff.next_delay(), &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Publish until leadership is lost or shutdown.
    async fn lead(&self, mut lock: LeaderLock, shutdown: &CancellationToken) {
        let mut changes = self.signal.subscribe();
        let mut cursor = None;
        let mut checked = Instant::now();
        let mut lag_checked = Instant::now() - Duration::from_secs(10);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut fast_retries = 0u32;
        loop {
            if shutdown.is_cancelled() {
                lock.release().await;
                return;
            }
            if checked.elapsed() >= self.settings.leader_check_interval {
                if !lock.still_held().await {
                    lock.release().await;
                    return;
                }
                checked = Instant::now();
            }
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
            // Mark the signal seen before reading, so a commit during the read wakes us again.
            changes.borrow_and_update();
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
                // An event may be held back behind an open transaction: look
                // again shortly a few times before waiting for the next signal.
                let wait = if fast_retries < 4 {
                    fast_retries += 1;
                    Duration::from_millis(1 << fast_retries)
                } else {
                    self.settings.poll_interval
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = changes.changed() => { fast_retries = 0; }
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            fast_retries = 0;
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
