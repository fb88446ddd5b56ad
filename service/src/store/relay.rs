//! What the relay needs from PostgreSQL: its durable cursor, a leader lock
//! (shared with the analytics consumer and the retention sweep, by role),
//! the cross-replica wake-up (`NOTIFY`), and lag figures.

use chrono::{DateTime, Utc};
use std::str::FromStr;
use std::sync::LazyLock;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sea_orm::sqlx::{self, Connection, PgConnection};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::horizon::backlog;
use super::{Store, StoreError};

/// `NOTIFY` channel that tells every replica the log has grown.
pub const FEED_CHANNEL: &str = "agent_sessions_events";

/// `pg_notify` on a channel (`$1`) with a payload (`$2`), not waiting for
/// the commit to be flushed.
const NOTIFY_SQL: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)";

/// The `application_name` of a replica's [`FeedListener`] connection,
/// followed by the replica's tag: how a [`FeedNotifier`] sees whether any
/// other replica listens (PostgreSQL keeps the first 63 bytes: 24 + a
/// 36-character UUID fit).
const LISTENER_NAME: &str = "agent-sessions listener ";

/// How long a [`FeedNotifier`]'s answer to "does another replica listen?"
/// is used before it asks again.
const LISTENERS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether a replica other than `$1` (a full listener name) has a listener
/// on this database (`$2`: [`LISTENER_NAME`]).
const OTHER_LISTENERS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
     WHERE datname = current_database() AND starts_with(application_name, $2) \
     AND application_name <> $1)";

/// What a leader lock elects: each role is held by one replica at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderRole {
    /// The relay publishing events to Redis.
    Relay,
    /// The consumer keeping the analytics projection.
    Analytics,
    /// The retention sweep.
    Retention,
}

impl LeaderRole {
    /// Its advisory lock key (bigint key space; the writers' announcement
    /// lock of `append.rs` uses another).
    fn key(self) -> i64 {
        match self {
            Self::Relay => 0x6167_7365_7373,
            Self::Analytics => 0x6167_7365_616e,
            Self::Retention => 0x6167_7365_7274,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Analytics => "analytics",
            Self::Retention => "retention",
        }
    }
}

/// Lag behind the head of the log, capped (at [`super::HELD_COUNT_CAP`] events) so
/// a huge backlog stays cheap to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayLag {
    pub events: i64,
    pub oldest_unpublished: Option<DateTime<Utc>>,
}

/// The relay's lag between its cursor `$1` and the horizon `$2`.
static RELAY_LAG_SQL: LazyLock<String> =
    LazyLock::new(|| backlog("position > $1 AND position < $2"));

impl Store {
    /// The cursor's position, creating it at 0 (publish everything) if absent.
    pub async fn relay_cursor(&self, name: &str) -> Result<i64, StoreError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO relay_cursors (name, position) VALUES ($1, 0) \
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING position",
                vec![name.into()],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("relay cursor upsert returned nothing".into()))?;
        Ok(row.try_get("", "position")?)
    }

    /// Advance the cursor; it never moves back (a deposed leader cannot rewind it).
    ///
    /// The commit does not wait for the WAL to reach disk
    /// (`synchronous_commit = off` for this transaction): a save lost in a
    /// PostgreSQL crash only leaves the cursor a little behind, and the relay
    /// publishes those events again (at least once; consumers drop repeats).
    pub async fn save_relay_cursor(&self, name: &str, position: i64) -> Result<(), StoreError> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "WITH lazy AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 UPDATE relay_cursors SET position = GREATEST(position, $2), updated_at = now() \
                 FROM lazy WHERE name = $1",
                vec![name.into(), position.into()],
            ))
            .await?;
        Ok(())
    }

    /// Tell every replica's listeners that events were committed; `from`
    /// names the sender (a replica ignores its own), empty when anonymous.
    /// Nothing waits for the WAL to reach disk: a wake-up lost in a crash
    /// is covered by the listeners' reconnect and their poll.
    pub async fn notify_feed(&self, from: &str) -> Result<(), StoreError> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                NOTIFY_SQL,
                vec![FEED_CHANNEL.into(), from.into()],
            ))
            .await?;
        Ok(())
    }

    /// Released events the relay has not published yet (the feed's horizon
    /// bounds them; what waits behind it is in [`Store::horizon_report`]).
    pub async fn relay_lag(&self, cursor: i64) -> Result<RelayLag, StoreError> {
        let horizon = self.horizon().await?;
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                RELAY_LAG_SQL.as_str(),
                vec![cursor.into(), horizon.into()],
            ))
            .await?
            .ok_or_else(|| StoreError::Corrupt("lag query returned nothing".into()))?;
        Ok(RelayLag {
            events: row.try_get("", "n")?,
            oldest_unpublished: row.try_get("", "oldest")?,
        })
    }
}

/// Leadership of a role: a session-level advisory lock on a connection of
/// its own. It is released when that connection ends, so a leader that dies
/// hands over as soon as PostgreSQL notices.
pub struct LeaderLock {
    conn: PgConnection,
    key: i64,
}

impl LeaderLock {
    /// `Ok(None)` when another replica holds the role.
    pub async fn try_acquire(url: &str, role: LeaderRole) -> Result<Option<Self>, sqlx::Error> {
        let key = role.key();
        let mut conn = PgConnection::connect(url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn, key }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Whether the lock's connection is still alive (and so the lock held).
    pub async fn still_held(&mut self) -> bool {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
             AND ((classid::bigint << 32) | objid::bigint) = $1)",
        )
        .bind(self.key)
        .fetch_one(&mut self.conn)
        .await
        .unwrap_or(false)
    }

    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// `LISTEN` on [`FEED_CHANNEL`] over a connection of its own: other replicas'
/// commits. It does not reconnect by itself; the caller makes a new one
/// (and assumes it missed notifications meanwhile).
pub struct FeedListener {
    listener: PgListener,
}

impl FeedListener {
    /// Listen as replica `replica`: the connection is named after it, so
    /// other replicas' [`FeedNotifier`]s know someone listens.
    pub async fn connect(url: &str, replica: &str) -> Result<Self, sqlx::Error> {
        let options =
            PgConnectOptions::from_str(url)?.application_name(&format!("{LISTENER_NAME}{replica}"));
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.listen(FEED_CHANNEL).await?;
        Ok(Self { listener })
    }

    /// The next notification's sender (see [`Store::notify_feed`]); `None`
    /// when the connection is gone.
    pub async fn next(&mut self) -> Option<String> {
        match self.listener.try_recv().await {
            Ok(Some(n)) => Some(n.payload().to_owned()),
            _ => None,
        }
    }
}

/// Sends [`FEED_CHANNEL`] notifications over a connection of its own, so a
/// wake-up for the other replicas never waits for (or holds) a pooled
/// connection. It connects lazily and again after any error.
///
/// A `NOTIFY` is a transaction, and every listener of the server wakes for
/// it: with no other replica listening (one replica, the usual case) it is
/// not sent. Whether another replica listens is asked again every
/// [`LISTENERS_CHECK_EVERY`]; a replica that starts meanwhile misses at most
/// that much of the wake-ups, which its readers' polls cover (a `NOTIFY`
/// is a wake-up, never the record), and its listener's first connect
/// signals its readers anyway.
pub struct FeedNotifier {
    url: String,
    conn: Option<PgConnection>,
    /// When others were last looked for, and whether any listened.
    others: Option<(std::time::Instant, bool)>,
}

impl FeedNotifier {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            conn: None,
            others: None,
        }
    }

    /// Notify, tagged `from` (see [`Store::notify_feed`]), unless no other
    /// replica listens; `Ok(true)` when sent.
    pub async fn notify(&mut self, from: &str) -> Result<bool, sqlx::Error> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => self.conn.insert(PgConnection::connect(&self.url).await?),
        };
        let others = match self.others {
            Some((at, others)) if at.elapsed() < LISTENERS_CHECK_EVERY => Ok(others),
            _ => sqlx::query_scalar::<_, bool>(OTHER_LISTENERS_SQL)
                .bind(format!("{LISTENER_NAME}{from}"))
                .bind(LISTENER_NAME)
                .fetch_one(&mut *conn)
                .await
                .inspect(|&others| self.others = Some((std::time::Instant::now(), others))),
        };
        let sent = match others {
            Ok(true) => sqlx::query(NOTIFY_SQL)
                .bind(FEED_CHANNEL)
                .bind(from)
                .execute(conn)
                .await
                .map(|_| true),
            other => other,
        };
        if sent.is_err()
            && let Some(c) = self.conn.take()
        {
            let _ = c.close().await;
        }
        sent
    }
}
