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

use sea_orm::sqlx::PgPool;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
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

/// The two lanes of batched commands (`batch.rs`), each with a pool of its
/// own made on the lanes' thread.
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

/// Drainers of the read lane and of the write lane for `executors`
/// (`database.batch_executors`); each keeps one connection, taken from
/// `database.max_connections`.
fn drainers(executors: usize) -> (usize, usize) {
    (executors.min(READ_DRAINERS), executors)
}

impl Lanes {
    async fn start(
        shared: &PgPool,
        executors: usize,
        acquire_timeout: Duration,
        port: u16,
    ) -> Self {
        let thread = batch::LaneThread::start();
        let options = (*shared.connect_options()).clone();
        let (reads, writes) = drainers(executors);
        let read_pool = lane_pool(&thread, options.clone(), reads, acquire_timeout, port).await;
        let write_pool = lane_pool(&thread, options, writes, acquire_timeout, port).await;
        Self {
            read: Lane::new(read_pool, reads, thread.handle()),
            write: Lane::new(write_pool, writes, thread.handle()),
            _thread: thread,
        }
    }
}

/// A lane's pool: `size` connections like the shared pool's, opened in the
/// background from the start (`min_connections`, so the first requests do
/// not wait for a TLS handshake and a backend's start, about 100 ms on a
/// slow machine) and again on demand by a drainer. Made on the lanes'
/// thread, where both happen, so the sockets belong to that thread's
/// runtime and it takes their answers itself; from the shared pool they
/// were mostly the main runtime's, whose thread woke for every answer and
/// then woke the drainer.
async fn lane_pool(
    thread: &batch::LaneThread,
    options: PgConnectOptions,
    size: usize,
    acquire_timeout: Duration,
    port: u16,
) -> PgPool {
    let make = move |options: PgConnectOptions| {
        with_nodelay(PgPoolOptions::new(), port)
            .max_connections(size as u32)
            .min_connections(size as u32)
            // Without an idle timeout or a lifetime, the driver opens the
            // `min_connections` at once (with either, only after reaping
            // one); a lane holds its connections until it closes anyway.
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(options)
    };
    if let Some(rt) = thread.handle() {
        let theirs = options.clone();
        if let Ok(pool) = rt.spawn(async move { make(theirs) }).await {
            return pool;
        }
    }
    make(options)
}

/// `TCP_NODELAY` on every connection a pool opens (sqlx 0.9.0 leaves
/// Nagle's algorithm on: `nodelay.rs`).
fn with_nodelay(p: PgPoolOptions, port: u16) -> PgPoolOptions {
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
        let port = opts
            .url
            .parse::<PgConnectOptions>()
            .map(|o| o.get_port())
            .unwrap_or(5432);
        co.map_sqlx_postgres_pool_opts(move |p| with_nodelay(p, port));
        // The lanes' connections come out of `max_connections` (at least
        // one is left to the shared pool: `Settings::validate`).
        let (reads, writes) = drainers(opts.batch_executors);
        let shared = opts
            .max_connections
            .saturating_sub((reads + writes) as u32)
            .max(1);
        co.max_connections(shared)
            .min_connections(opts.min_connections.min(shared))
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(opts.acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy(true)
            .sqlx_logging(false);
        let db = Database::connect(co).await.map_err(StoreError::from)?;
        let lanes = if opts.batch_executors > 0 {
            let pool = db.get_postgres_connection_pool();
            let lanes = Lanes::start(pool, opts.batch_executors, opts.acquire_timeout, port);
            Some(Arc::new(lanes.await))
        } else {
            None
        };
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

    /// Connections open, idle and allowed, for `/metrics`: the shared
    /// pool's and the lanes' together.
    pub fn pool_stats(&self) -> PoolStats {
        let shared = self.db.get_postgres_connection_pool();
        let lanes = self
            .lanes
            .iter()
            .flat_map(|l| [l.read.pool(), l.write.pool()]);
        std::iter::once(shared).chain(lanes).fold(
            PoolStats {
                size: 0,
                idle: 0,
                max: 0,
            },
            |t, p| PoolStats {
                size: t.size + p.size(),
                idle: t.idle + p.num_idle() as u32,
                max: t.max + p.options().get_max_connections(),
            },
        )
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
