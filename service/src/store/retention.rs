//! Retention in the store: purging the streams of sessions deleted longer
//! ago than a grace period, and removing idempotency keys past their time.
//!
//! Deleting a session (`sessions.rs`, `delete_many`) removes its row and its
//! messages, inputs, approvals and transcript at once, and leaves its events
//! and a tombstone. The purge here is the only code that removes events:
//! the append-only trigger lets a DELETE of `events` through only in a
//! transaction that set `agent_sessions.purge` and only for a tombstoned
//! session (migration `m20261230_000006`). Each batch is one short
//! transaction over at most `batch` sessions.
//!
//! The feed stays gap-safe: a purge only removes events, long committed
//! (they are older than the grace period) and below every reader's horizon;
//! it never adds a position below one a reader has passed, so no reader can
//! miss a live event. A reader far behind simply never sees the purged ones
//! (the runner copes: `runner::local`'s start-up sweep removes workspaces of
//! sessions that no longer exist). Replay stays exact: a purged session has
//! neither a row nor events.

use std::time::Duration;

use sea_orm::{ConnectionTrait, TransactionTrait};
use tracing::instrument;

use super::sessions::stmt;
use super::{Store, StoreError};

/// What one purge batch removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub sessions: u64,
    pub events: u64,
}

fn secs(d: Duration) -> sea_orm::Value {
    d.as_secs_f64().into()
}

impl Store {
    /// Purge the streams of up to `batch` sessions deleted more than
    /// `grace` ago: their events (and any message, input, approval or
    /// transcript row left); their tombstones stay, marked purged.
    #[instrument(skip(self))]
    pub async fn purge_deleted(&self, grace: Duration, batch: u64) -> Result<Purged, StoreError> {
        let txn = self.db.begin().await?;
        txn.execute_unprepared("SET LOCAL agent_sessions.purge = 'on'")
            .await?;
        let row = txn
            .query_one_raw(stmt(
                "WITH t AS (SELECT session_id FROM session_tombstones \
                            WHERE purged_at IS NULL AND deleted_at < now() - make_interval(secs => $1) \
                            ORDER BY deleted_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
                      e AS (DELETE FROM events WHERE aggregate_id IN (SELECT session_id FROM t) \
                            RETURNING 1), \
                      dm AS (DELETE FROM session_messages WHERE session_id IN (SELECT session_id FROM t)), \
                      di AS (DELETE FROM session_inputs WHERE session_id IN (SELECT session_id FROM t)), \
                      da AS (DELETE FROM session_approvals WHERE session_id IN (SELECT session_id FROM t)), \
                      dt AS (DELETE FROM session_transcript_chunks \
                             WHERE session_id IN (SELECT session_id FROM t)), \
                      u AS (UPDATE session_tombstones SET purged_at = now() \
                            WHERE session_id IN (SELECT session_id FROM t) RETURNING 1) \
                 SELECT (SELECT count(*) FROM u) AS sessions, (SELECT count(*) FROM e) AS events",
                vec![secs(grace), (batch as i64).into()],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("a purge returned nothing".into()))?;
        txn.commit().await?;
        Ok(Purged {
            sessions: row.try_get::<i64>("", "sessions")?.max(0) as u64,
            events: row.try_get::<i64>("", "events")?.max(0) as u64,
        })
    }

    /// Sessions and events a purge with this `grace` would remove now.
    pub async fn count_purgeable(&self, grace: Duration) -> Result<Purged, StoreError> {
        let row = self
            .db
            .query_one_raw(stmt(
                "WITH t AS (SELECT session_id FROM session_tombstones \
                            WHERE purged_at IS NULL AND deleted_at < now() - make_interval(secs => $1)) \
                 SELECT (SELECT count(*) FROM t) AS sessions, \
                        (SELECT count(*) FROM events WHERE aggregate_id IN (SELECT session_id FROM t)) AS events",
                vec![secs(grace)],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("a count returned nothing".into()))?;
        Ok(Purged {
            sessions: row.try_get::<i64>("", "sessions")?.max(0) as u64,
            events: row.try_get::<i64>("", "events")?.max(0) as u64,
        })
    }

    /// Remove up to `batch` idempotency keys older than `ttl`; how many.
    #[instrument(skip(self))]
    pub async fn expire_idempotency_keys(
        &self,
        ttl: Duration,
        batch: u64,
    ) -> Result<u64, StoreError> {
        let res = self
            .db
            .execute_raw(stmt(
                "DELETE FROM idempotency_keys WHERE key IN \
                   (SELECT key FROM idempotency_keys \
                    WHERE created_at <= now() - make_interval(secs => $1) \
                    ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                vec![secs(ttl), (batch as i64).into()],
            ))
            .await?;
        Ok(res.rows_affected())
    }

    /// Idempotency keys older than `ttl`.
    pub async fn count_expired_keys(&self, ttl: Duration) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT count(*) AS n FROM idempotency_keys \
                 WHERE created_at <= now() - make_interval(secs => $1)",
                vec![secs(ttl)],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("a count returned nothing".into()))?;
        Ok(row.try_get::<i64>("", "n")?.max(0) as u64)
    }
}
