//! The relay: publishes committed events to Redis, in position order, from a
//! durable cursor (G4 in docs/design.md).
//!
//! Every `serve` replica runs one; a PostgreSQL advisory lock lets exactly one
//! publish at a time, and another takes over within a leader-check interval
//! when it dies. Publishing happens before the cursor is saved, so a crash in
//! between re-publishes (at least once; consumers drop duplicates by
//! `event_id`), never skips.
//!
//! The publish loop does nothing but read the feed and publish: the cursor
//! is saved by a task of its own (at most every [`CURSOR_SAVE_EVERY`], not
//! waiting for the disk), the lag is measured by another, and the leader
//! lock is checked in the background (`leader::Held`).
//!
//! Wake-ups: a commit on this replica wakes it at once; commits on other
//! replicas arrive as PostgreSQL `NOTIFY` (at most one per 2 ms of local
//! commits, tagged with the sender so it ignores its own); a short poll covers the
//! rest (for instance an event held back behind a transaction that then
//! rolled back).
//!
//! Pacing: a read is one call (`feed_after`: the horizon, then the page),
//! which under write load also scans `pg_locks` and `pg_stat_activity`
//! (events wait behind the writes in flight), and reads run back to back,
//! each finding the few events committed during the one before. So
//! once reads find [`BUSY_EVENTS`] or more on average ([`Pace`]), the relay
//! starts one at most every `relay.busy_interval_ms`: fewer, larger reads,
//! and more of the database left to the writes. At low load reads find an
//! event or two and the relay still reads at every commit; behind the log
//! (a read that fills its page) it reads on at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::leader::{self, FeedWait, Held, sleep_or_shutdown};
use crate::metrics::names;
use crate::store::{FeedListener, FeedNotifier, LeaderLock, LeaderRole, Store};

/// Cursor name of the Redis relay.
pub(crate) const CURSOR: &str = "redis";

/// The cursor is saved at most this often: a crash re-publishes at most
/// about this much (consumers drop repeats by `event_id`).
const CURSOR_SAVE_EVERY: Duration = Duration::from_millis(50);

/// How often the lag behind the log is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub(crate) struct RelaySettings {
    pub database_url: String,
    pub channel_prefix: String,
    pub batch_size: u64,
    pub poll_interval: Duration,
    pub leader_check_interval: Duration,
    pub lag_warn_after: Duration,
    /// The least time between the starts of two reads under load (see [`Pace`]).
    pub busy_interval: Duration,
}

/// Events per read, on average, from which the relay is under load.
pub(crate) const BUSY_EVENTS: f64 = 8.0;

/// When the relay may start its next read: at once while reads find a few
/// events or a backlog (a full page), at most every `interval` once they
/// find [`BUSY_EVENTS`] or more on average. The average is over the last few reads (a moving average
/// that gives each read a quarter of the weight), so one large commit after
/// a quiet spell does not slow the reads that follow it.
#[derive(Debug)]
pub(crate) struct Pace {
    interval: Duration,
    average: f64,
}

impl Pace {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            average: 0.0,
        }
    }

    /// A read that started at `started` found `events` (`page_full`: as many
    /// as it asked for, so more are waiting): the earliest start of the next.
    pub(crate) fn next_read(
        &mut self,
        started: tokio::time::Instant,
        events: usize,
        page_full: bool,
    ) -> tokio::time::Instant {
        self.average += (events as f64 - self.average) / 4.0;
        if self.average >= BUSY_EVENTS && !page_full {
            started + self.interval
        } else {
            started
        }
    }
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

/// The least time between two `NOTIFY`s of one replica: under write load a
/// commit ends every fraction of a millisecond, and a `NOTIFY` per commit
/// cost the database (a transaction each, plus every listener's wake-up)
/// more than the relay's own reads. Other replicas hear of a commit at most
/// this much later; this replica's signal is not delayed.
const NOTIFY_EVERY: Duration = Duration::from_millis(2);

/// Turn local commits into signals here and `NOTIFY`s for other replicas,
/// tagged `replica`: at most one per [`NOTIFY_EVERY`], the last commits of
/// a burst covered by one sent at the end of the interval.
pub(crate) async fn forward_local_commits(
    database_url: String,
    replica: String,
    wake: Arc<Notify>,
    signal: FeedSignal,
    shutdown: CancellationToken,
) {
    let mut notifier = FeedNotifier::new(&database_url);
    let mut next_notify = tokio::time::Instant::now();
    let mut pending = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {
                signal.bump();
                pending = true;
            }
            _ = tokio::time::sleep_until(next_notify), if pending => {}
        }
        let now = tokio::time::Instant::now();
        if pending && now >= next_notify {
            pending = false;
            next_notify = now + NOTIFY_EVERY;
            if let Err(e) = notifier.notify(&replica).await {
                tracing::debug!(error = %e, "could not NOTIFY other replicas");
            }
        }
    }
}

/// Listen for other replicas' commits (notifications from `replica`, this
/// one, are skipped: its commits signal directly); a lost connection also
/// bumps the signal, since notifications may have been missed meanwhile.
pub(crate) async fn listen_for_commits(
    database_url: String,
    replica: String,
    signal: FeedSignal,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let mut listener = match FeedListener::connect(&database_url, &replica).await {
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
                from = listener.next() => match from {
                    Some(from) if from == replica => {}
                    Some(_) => signal.bump(),
                    None => {
                        signal.bump();
                        break;
                    }
                },
            }
        }
    }
}

pub(crate) struct Relay {
    /// The publish loop's (one connection).
    store: Store,
    /// The cursor saver's and the lag measure's.
    aux: Store,
    bus: Arc<Bus>,
    settings: RelaySettings,
    signal: FeedSignal,
}

impl Relay {
    pub(crate) fn new(
        store: Store,
        aux: Store,
        bus: Arc<Bus>,
        settings: RelaySettings,
        signal: FeedSignal,
    ) -> Self {
        Self {
            store,
            aux,
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
        let mut held = Held::new(lock, self.settings.leader_check_interval, shutdown);
        let leading = held.token().clone();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let start = loop {
            match self.store.relay_cursor(CURSOR).await {
                Ok(p) => break Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot read its cursor; retrying");
                    if sleep_or_shutdown(backoff.next_delay(), &leading).await {
                        break None;
                    }
                }
            }
        };
        let Some(start) = start else {
            held.still_leading().await;
            return;
        };
        let (published, watch_published) = watch::channel(start);
        let saver = tokio::spawn(save_cursor(
            self.aux.clone(),
            watch_published.clone(),
            leading.clone(),
        ));
        let lag = tokio::spawn(report_lag(
            self.aux.clone(),
            watch_published,
            self.settings.lag_warn_after,
            leading.clone(),
        ));
        self.publish(&mut held, start, &published).await;
        // Leadership is over: the saver saves what was published, once more.
        let _ = saver.await;
        let _ = lag.await;
    }

    /// Read the feed after `position` and publish it, until `held` ends;
    /// `published` follows the last event published.
    async fn publish(&self, held: &mut Held, mut position: i64, published: &watch::Sender<i64>) {
        let leading = held.token().clone();
        let mut wait = FeedWait::new(&self.signal, self.settings.poll_interval);
        let mut pace = Pace::new(self.settings.busy_interval);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut next_read = tokio::time::Instant::now();
        while held.still_leading().await {
            if next_read > tokio::time::Instant::now() {
                tokio::select! {
                    _ = leading.cancelled() => continue,
                    _ = tokio::time::sleep_until(next_read) => {}
                }
            }
            wait.before_read();
            let started = tokio::time::Instant::now();
            let batch = match self
                .store
                .feed_messages(position, self.settings.batch_size)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot read the log; retrying");
                    sleep_or_shutdown(backoff.next_delay(), &leading).await;
                    continue;
                }
            };
            next_read = pace.next_read(
                started,
                batch.len(),
                batch.len() as u64 >= self.settings.batch_size,
            );
            let Some(last) = batch.last() else {
                wait.idle(&leading).await;
                continue;
            };
            wait.found();
            match self
                .bus
                .publish_events(&self.settings.channel_prefix, &batch)
                .await
            {
                Ok(()) => {
                    backoff.reset();
                    metrics::counter!(names::RELAY_PUBLISHED).increment(batch.len() as u64);
                    // The oldest event of the batch: its wait is the batch's worst.
                    let age = (chrono::Utc::now() - batch[0].occurred_at)
                        .num_microseconds()
                        .unwrap_or(0);
                    metrics::histogram!(names::RELAY_COMMIT_TO_PUBLISH).record(age as f64 / 1e6);
                    position = last.position;
                    published.send_replace(position);
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, pending = batch.len(), "relay cannot publish to Redis; retrying");
                    metrics::counter!(names::RELAY_PUBLISH_FAILURES).increment(1);
                    sleep_or_shutdown(d, &leading).await;
                }
            }
        }
    }
}

/// Save the relay's cursor as `published` advances, at most every
/// [`CURSOR_SAVE_EVERY`], and once more when `leading` ends. A save that
/// fails is tried again at the next turn: publishing again after a restart
/// is allowed, skipping is not (and the save never moves the cursor back).
async fn save_cursor(
    store: Store,
    mut published: watch::Receiver<i64>,
    leading: CancellationToken,
) {
    let mut saved = *published.borrow_and_update();
    loop {
        let last_turn = leading.is_cancelled();
        let position = *published.borrow_and_update();
        if position > saved {
            match store.save_relay_cursor(CURSOR, position).await {
                Ok(()) => saved = position,
                Err(e) => tracing::warn!(error = %e, "relay could not save its cursor"),
            }
        }
        if last_turn {
            return;
        }
        if saved >= position {
            // Caught up: wait for the next publish (or the end).
            tokio::select! {
                _ = leading.cancelled() => continue,
                changed = published.changed() => {
                    if changed.is_err() {
                        leading.cancelled().await;
                        continue;
                    }
                }
            }
        }
        sleep_or_shutdown(CURSOR_SAVE_EVERY, &leading).await;
    }
}

/// Measure the lag behind the log every [`LAG_EVERY`] while `leading`.
async fn report_lag(
    store: Store,
    published: watch::Receiver<i64>,
    warn_after: Duration,
    leading: CancellationToken,
) {
    loop {
        let cursor = *published.borrow();
        match store.relay_lag(cursor).await {
            Ok(lag) => {
                let seconds = lag
                    .oldest_unpublished
                    .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3)
                    .unwrap_or(0.0);
                metrics::gauge!(names::RELAY_LAG_EVENTS).set(lag.events as f64);
                metrics::gauge!(names::RELAY_LAG_SECONDS).set(seconds);
                if seconds >= warn_after.as_secs_f64() {
                    tracing::warn!(
                        lag_events = lag.events,
                        lag_seconds = seconds,
                        "relay is behind the log"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "relay lag not measured"),
        }
        if sleep_or_shutdown(LAG_EVERY, &leading).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const INTERVAL: Duration = Duration::from_millis(4);

    #[test]
    fn a_few_events_per_read_never_wait() {
        let mut pace = Pace::new(INTERVAL);
        let t = Instant::now();
        for n in [1, 2, 0, 3, 1, 7, 2, 1] {
            assert_eq!(pace.next_read(t, n, false), t, "after a read of {n}");
        }
    }

    #[test]
    fn one_large_read_after_a_quiet_spell_does_not_wait() {
        let mut pace = Pace::new(INTERVAL);
        let t = Instant::now();
        for _ in 0..8 {
            pace.next_read(t, 1, false);
        }
        assert_eq!(pace.next_read(t, 20, false), t);
    }

    #[test]
    fn sustained_load_spaces_reads_until_it_ends() {
        let mut pace = Pace::new(INTERVAL);
        let t = Instant::now();
        let paced: Vec<bool> = [12, 12, 12, 12, 12, 12, 0, 0, 0, 0]
            .into_iter()
            .map(|n| pace.next_read(t, n, false) == t + INTERVAL)
            .collect();
        // 12 × (1 − (3/4)^k) reaches 8 at the fourth read; empty reads bring
        // the average back under 8 at once.
        assert_eq!(
            paced,
            [
                false, false, false, true, true, true, false, false, false, false
            ]
        );
    }

    #[test]
    fn a_zero_interval_never_waits() {
        let mut pace = Pace::new(Duration::ZERO);
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(pace.next_read(t, 500, false), t);
        }
    }

    #[test]
    fn a_backlog_is_read_without_waiting() {
        let mut pace = Pace::new(INTERVAL);
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(pace.next_read(t, 500, true), t);
        }
        // Once caught up, a part page of a busy log waits its turn.
        assert_eq!(pace.next_read(t, 100, false), t + INTERVAL);
    }
}
