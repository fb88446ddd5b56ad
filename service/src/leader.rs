//! What the log's single-replica consumers (the Redis relay, the analytics
//! projection) share: being elected by a PostgreSQL advisory lock per role,
//! keeping the lock checked while leading, and waiting for the feed to grow
//! (a local commit, another replica's `NOTIFY`, or a short poll).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
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

/// A leader's lock, checked every `interval` by a task of its own, so the
/// work it guards never waits for the check: the task cancels [`Held::token`]
/// when the lock is gone (or on shutdown), and the leader stops at its next
/// look at [`Held::still_leading`] or wakes from any wait on the token.
pub(crate) struct Held {
    lost: CancellationToken,
    checker: Option<JoinHandle<()>>,
}

impl Held {
    pub(crate) fn new(lock: LeaderLock, interval: Duration, shutdown: &CancellationToken) -> Self {
        let lost = shutdown.child_token();
        let checker = tokio::spawn(check_lock(lock, interval, lost.clone()));
        Self {
            lost,
            checker: Some(checker),
        }
    }

    /// Cancelled when leadership ends: the lock is gone, or shutdown.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.lost
    }

    /// False (and the lock released) on shutdown or when the lock is gone.
    /// It does not touch the database: the check runs in the background.
    pub(crate) async fn still_leading(&mut self) -> bool {
        if !self.lost.is_cancelled() {
            return true;
        }
        if let Some(checker) = self.checker.take() {
            // It releases the lock on its way out.
            let _ = checker.await;
        }
        false
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // The checker then releases the lock by itself.
        self.lost.cancel();
    }
}

/// Check `lock` every `interval` until `lost` is cancelled, cancelling it
/// when the lock is gone; then release the lock.
async fn check_lock(mut lock: LeaderLock, interval: Duration, lost: CancellationToken) {
    loop {
        tokio::select! {
            _ = lost.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        let held = tokio::select! {
            _ = lost.cancelled() => break,
            h = lock.still_held() => h,
        };
        if !held {
            lost.cancel();
            break;
        }
    }
    lock.release().await;
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
