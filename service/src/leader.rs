//! What the log's single-replica consumers (the Redis relay, the analytics
//! projection) share: being elected by a PostgreSQL advisory lock per role,
//! keeping the lock checked while leading, and waiting for the feed to grow
//! (a local commit, another replica's `NOTIFY`, or a short poll).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::relay::FeedSignal;
use crate::store::{LeaderLock, LeaderRole};

/// Returns true when shutdown was requested during the sleep.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Contend for `role` until shutdown; while elected, run `lead` (which
/// returns when it loses the lock or on shutdown). `gauge` reads 1 while
/// this replica leads.
pub(crate) async fn run_elected<F, Fut>(
    role: LeaderRole,
    database_url: &str,
    check_interval: Duration,
    gauge: &'static str,
    shutdown: &CancellationToken,
    mut lead: F,
) where
    F: FnMut(LeaderLock) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    metrics::gauge!(gauge).set(0.0);
    loop {
        let lock = tokio::select! {
            _ = shutdown.cancelled() => return,
            l = LeaderLock::try_acquire(database_url, role) => l,
        };
        match lock {
            Ok(Some(lock)) => {
                backoff.reset();
                tracing::info!(role = role.as_str(), "elected leader");
                metrics::gauge!(gauge).set(1.0);
                let span = tracing::info_span!("leader", role = role.as_str());
                lead(lock).instrument(span).await;
                metrics::gauge!(gauge).set(0.0);
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::warn!(role = role.as_str(), "lost leadership");
            }
            Ok(None) => {
                if sleep_or_shutdown(check_interval, shutdown).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(role = role.as_str(), error = %e, "cannot reach PostgreSQL for the leader lock; retrying");
                if sleep_or_shutdown(backoff.next_delay(), shutdown).await {
                    return;
                }
            }
        }
    }
}

/// A leader's lock, checked every `interval`.
pub(crate) struct Held {
    lock: Option<LeaderLock>,
    interval: Duration,
    checked: Instant,
}

impl Held {
    pub(crate) fn new(lock: LeaderLock, interval: Duration) -> Self {
        Self {
            lock: Some(lock),
            interval,
            checked: Instant::now(),
        }
    }

    /// False (and the lock released) on shutdown or when the lock is gone.
    pub(crate) async fn still_leading(&mut self, shutdown: &CancellationToken) -> bool {
        let Some(lock) = self.lock.as_mut() else {
            return false;
        };
        let keep = !shutdown.is_cancelled()
            && (self.checked.elapsed() < self.interval || lock.still_held().await);
        if keep {
            if self.checked.elapsed() >= self.interval {
                self.checked = Instant::now();
            }
            return true;
        }
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
        false
    }
}

/// Waiting for the feed to grow between reads.
pub(crate) struct FeedWait {
    changes: watch::Receiver<u64>,
    poll: Duration,
    fast_retries: u32,
}

impl FeedWait {
    pub(crate) fn new(signal: &FeedSignal, poll: Duration) -> Self {
        Self {
            changes: signal.subscribe(),
            poll,
            fast_retries: 0,
        }
    }

    /// Call before each read, so a commit during the read wakes the next wait.
    pub(crate) fn before_read(&mut self) {
        self.changes.borrow_and_update();
    }

    /// The read found events.
    pub(crate) fn found(&mut self) {
        self.fast_retries = 0;
    }

    /// The read found nothing: wait for a signal or a poll. An event may be
    /// held back behind an open transaction, so look again shortly a few
    /// times before falling back to the poll interval.
    pub(crate) async fn idle(&mut self, shutdown: &CancellationToken) {
        let wait = if self.fast_retries < 4 {
            self.fast_retries += 1;
            Duration::from_millis(1 << self.fast_retries)
        } else {
            self.poll
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.changes.changed() => { self.fast_retries = 0; }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
