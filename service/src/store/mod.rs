//! The store: the only place that speaks SQL.
//!
//! Every state change is one statement that writes the `sessions` row and its
//! event together, guarded by the version it was planned against, so a
//! change and its event commit or vanish as one (G1). See `events.rs` for why
//! feed positions are gap-safe.

mod analytics;
mod append;
mod batch;
mod error;
mod events;
mod horizon;
mod list;
mod live;
mod messages;
mod nodelay;
mod portable;
mod relay;
mod replay;
mod retention;
mod rows;
mod session_batches;
mod sessions;

pub use analytics::{ANALYTICS_CURSOR, AnalyticsPage, AnalyticsRebuild};
pub use error::StoreError;
pub use events::{FeedFilter, FeedMessage, StoredEvent};
pub use horizon::{HELD_COUNT_CAP, HorizonBlocker, HorizonReport};
pub use list::{ListCursor, ListFilter};
pub use live::{ApprovalWritten, InputWritten, NewInput};
pub use messages::StoredMessage;
pub use portable::{ForkPlan, Forked, ImportPlan, SessionDump, TranscriptChunk};
pub use relay::{FEED_CHANNEL, FeedListener, FeedNotifier, LeaderLock, LeaderRole, RelayLag};
pub(crate) use replay::fold;
pub use replay::{ReplayDifference, ReplayReport};
pub use retention::Purged;
pub use sessions::{Appended, BulkDeleted, Created, IdempotencyRequest, Written};

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};

use batch::{Batch, Lane};

/// How to reach PostgreSQL and how many connections to keep.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    pub url: String,
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout: Duration,
    /// `statement_timeout` of every connection (bounds how long a writer of
    /// ours can hold the feed's horizon).
    pub statement_timeout: Duration,
    pub idle_in_transaction_timeout: Duration,
    /// Drainers (each holding a connection) of each of the two lanes of
    /// batched commands: reads by id, and writes (creates, updates). 0 runs
    /// each command alone on a pooled connection.
    pub batch_executors: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    lanes: Option<Arc<Lanes>>,
}

/// The two lanes of batched commands (`batch.rs`).
struct Lanes {
    read: Lane,
    write: Lane,
    _thread: batch::LaneThread,
}

/// Drainers of the read lane. A read by id waits for no lock, so a second
/// drainer buys no isolation, and one drainer makes bigger batches: reads
/// at 16 and 64 connections 12,037–24,100/s with two, 14,675–27,860/s
/// with one (alternating, same build); creates and updates keep
/// `database.batch_executors`.
const READ_DRAINERS: usize = 1;

impl Lanes {
    fn start(db: &DatabaseConnection, executors: usize) -> Self {
        let pool = db.get_postgres_connection_pool();
        let thread = batch::LaneThread::start();
        Self {
            read: Lane::new(pool, executors.min(READ_DRAINERS), thread.handle()),
            write: Lane::new(pool, executors, thread.handle()),
            _thread: thread,
        }
    }
}

impl Store {
    /// Build the pool. Connections are made lazily, so the service starts
    /// (and reports not-ready) while PostgreSQL is still down.
    pub async fn connect(opts: &DatabaseOptions) -> Result<Self, StoreError> {
        let mut co = ConnectOptions::new(opts.url.clone());
        let session_settings = [
            ("application_name", "agent-sessions".to_owned()),
            (
                "statement_timeout",
                opts.statement_timeout.as_millis().to_string(),
            ),
            (
                "idle_in_transaction_session_timeout",
                opts.idle_in_transaction_timeout.as_millis().to_string(),
            ),
        ];
        co.map_sqlx_postgres_opts(move |o| o.options(session_settings.clone()));
        // sqlx 0.9.0 leaves Nagle's algorithm on (`nodelay.rs`).
        let port = opts
            .url
            .parse::<sea_orm::sqlx::postgres::PgConnectOptions>()
            .map(|o| o.get_port())
            .unwrap_or(5432);
        co.map_sqlx_postgres_pool_opts(move |p| {
            p.after_connect(move |_conn, _meta| {
                Box::pin(async move {
                    match nodelay::set_on_sockets_to(port) {
                        Ok(0) => {
                            tracing::debug!(port, "no socket to the database found for TCP_NODELAY")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "TCP_NODELAY not set on database sockets")
                        }
                    }
                    Ok(())
                })
            })
        });
        co.max_connections(opts.max_connections)
            .min_connections(opts.min_connections)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(opts.acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy(true)
            .sqlx_logging(false);
        let db = Database::connect(co).await.map_err(StoreError::from)?;
        let lanes =
            (opts.batch_executors > 0).then(|| Arc::new(Lanes::start(&db, opts.batch_executors)));
        Ok(Self { db, lanes })
    }

    /// A store without batching (tools and tests that bring a connection).
    pub fn from_connection(db: DatabaseConnection) -> Self {
        Self { db, lanes: None }
    }

    /// Run `cmd` in the next batch of its lane, or alone without lanes.
    async fn batched<C: Batch>(&self, cmd: C) -> Result<C::Out, StoreError> {
        match &self.lanes {
            Some(lanes) if C::WRITES => lanes.write.submit(cmd).await,
            Some(lanes) => lanes.read.submit(cmd).await,
            None => batch::run_one(self.db.get_postgres_connection_pool(), cmd).await,
        }
    }

    /// Connections open, idle and allowed, for `/metrics`.
    pub fn pool_stats(&self) -> PoolStats {
        let pool = self.db.get_postgres_connection_pool();
        PoolStats {
            size: pool.size(),
            idle: pool.num_idle() as u32,
            max: pool.options().get_max_connections(),
        }
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .execute_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT 1",
            ))
            .await?;
        Ok(())
    }

    /// Answer the queued commands, then close the pool's connections
    /// (graceful shutdown).
    pub async fn close(self) {
        if let Some(lanes) = &self.lanes {
            tokio::join!(lanes.read.close(), lanes.write.close());
        }
        let _ = self.db.close().await;
    }
}
