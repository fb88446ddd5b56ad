//! Retention (docs/design.md, retention): which sessions go, when their
//! streams are purged, and when idempotency keys expire.
//!
//! One pass deletes the sessions the settings select (each with its
//! `session.deleted`, in batches through the store's delete path), purges the
//! streams of sessions deleted longer ago than the grace period, and removes
//! expired idempotency keys; `agent-sessions retention run` makes one pass,
//! and `serve` makes one every `retention.sweep_interval_secs`, one replica
//! at a time: the pass runs under the retention [`LeaderLock`] (the relay's
//! mechanism, its own key), taken for the pass and released after it.

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::CommitEffects;
use crate::domain::EventMetadata;
use crate::settings::RetentionSettings;
use crate::store::{Appended, LeaderLock, LeaderRole, ListFilter, Store, StoreError};

/// The actor of the events a retention pass writes.
pub const ACTOR: &str = "retention";

/// What one pass did, or with `dry_run` would do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    pub dry_run: bool,
    /// Sessions deleted (each with its `session.deleted`).
    pub deleted_sessions: u64,
    /// Deleted sessions whose streams were purged, and their events.
    pub purged_sessions: u64,
    pub purged_events: u64,
    /// Idempotency keys past their time, removed.
    pub expired_keys: u64,
}

impl std::fmt::Display for PassReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        write!(
            f,
            "{verb} {} session(s); {} the streams of {} deleted session(s) ({} event(s)); \
             {} {} expired idempotency key(s)",
            self.deleted_sessions,
            if self.dry_run {
                "would purge"
            } else {
                "purged"
            },
            self.purged_sessions,
            self.purged_events,
            if self.dry_run {
                "would remove"
            } else {
                "removed"
            },
            self.expired_keys,
        )
    }
}

/// The sessions retention deletes now, if it deletes any.
pub fn doomed(settings: &RetentionSettings) -> Option<ListFilter> {
    let after = settings.delete_after_secs?;
    let age = chrono::Duration::seconds(i64::try_from(after).unwrap_or(i64::MAX / 1000));
    Some(ListFilter {
        status: settings.statuses()?,
        updated_before: Some(Utc::now() - age),
        ..ListFilter::default()
    })
}

/// One pass; `dry_run` counts what it would do and writes nothing.
/// `committed` sees the events of each batch of deletions.
pub async fn run_pass(
    store: &Store,
    settings: &RetentionSettings,
    dry_run: bool,
    mut committed: impl FnMut(&[Appended]),
) -> Result<PassReport, StoreError> {
    let batch = settings.batch_size;
    let ttl = settings.idempotency_key_ttl();
    let grace = settings.purge_after_secs.map(Duration::from_secs);
    let mut report = PassReport {
        dry_run,
        ..PassReport::default()
    };
    if dry_run {
        if let Some(filter) = doomed(settings) {
            report.deleted_sessions = store.count(&filter).await?;
        }
        if let Some(grace) = grace {
            let p = store.count_purgeable(grace).await?;
            (report.purged_sessions, report.purged_events) = (p.sessions, p.events);
        }
        report.expired_keys = store.count_expired_keys(ttl).await?;
        return Ok(report);
    }
    if let Some(filter) = doomed(settings) {
        let meta = EventMetadata {
            actor: ACTOR.to_owned(),
            ..EventMetadata::default()
        };
        report.deleted_sessions = store
            .delete_matching(&filter, batch, &meta, &mut committed)
            .await?
            .deleted;
    }
    if let Some(grace) = grace {
        loop {
            let p = store.purge_deleted(grace, batch).await?;
            report.purged_sessions += p.sessions;
            report.purged_events += p.events;
            if p.sessions < batch {
                break;
            }
        }
    }
    loop {
        let n = store.expire_idempotency_keys(ttl, batch).await?;
        report.expired_keys += n;
        if n < batch {
            break;
        }
    }
    Ok(report)
}

/// `agent-sessions retention run [--dry-run]`: one pass under the
/// retention lock (a dry run, which writes nothing, takes no lock), then a
/// `NOTIFY` so the replicas' relays and streams look at the log at once.
pub async fn run_once(
    settings: &crate::settings::Settings,
    dry_run: bool,
) -> anyhow::Result<PassReport> {
    let store = Store::connect(&crate::startup::database_options(settings, 2, 0)).await?;
    let lock = if dry_run {
        None
    } else {
        match LeaderLock::try_acquire(&settings.database.url, LeaderRole::Retention).await? {
            Some(lock) => Some(lock),
            None => anyhow::bail!(
                "another retention pass is running (a serve replica's sweep); try again later"
            ),
        }
    };
    let mut wrote = false;
    let report = run_pass(&store, &settings.retention, dry_run, |batch| {
        wrote |= !batch.is_empty();
    })
    .await;
    if wrote {
        let _ = store.notify_feed("").await;
    }
    if let Some(lock) = lock {
        lock.release().await;
    }
    store.close().await;
    Ok(report?)
}

/// The sweep inside `serve`: a pass every `sweep_interval_secs` on
/// whichever replica takes the retention lock first; the others skip it.
pub(crate) async fn sweep(
    store: Store,
    settings: RetentionSettings,
    database_url: String,
    commits: CommitEffects,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(settings.sweep_interval_secs);
    // The first pass soon after start, so replicas restarted more often
    // than the interval still sweep.
    let mut wait = interval.min(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        let lock = match LeaderLock::try_acquire(&database_url, LeaderRole::Retention).await {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::debug!("another replica runs the retention sweep");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention cannot reach PostgreSQL for its lock; next time");
                continue;
            }
        };
        let pass = run_pass(&store, &settings, false, |batch| {
            for a in batch {
                commits.after_commit(Some(a));
            }
        })
        .instrument(tracing::info_span!("retention"));
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = pass => match r {
                Ok(report) => tracing::info!(
                    deleted_sessions = report.deleted_sessions,
                    purged_sessions = report.purged_sessions,
                    purged_events = report.purged_events,
                    expired_keys = report.expired_keys,
                    "retention sweep done"
                ),
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; next time"),
            },
        }
        lock.release().await;
    }
}
