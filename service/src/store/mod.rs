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
    /// HTTP workers that may read by id through a lane of their own
    /// ([`Store::open_worker_reads`]), one connection each, counted in
    /// `max_connections`: the store gives lanes to as many of them as fit
    /// in half of what its shared lanes leave (none without batching); 0
    /// for a store no HTTP worker reads from.
    pub worker_reads: usize,
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
    /// The HTTP workers' read lanes (at most `worker_slots`), kept here for
    /// `/metrics` and for closing; each worker finds its own in
    /// [`WORKER_READS`].
    workers: std::sync::Mutex<Vec<Arc<Lane>>>,
    worker_slots: usize,
    /// Tells these lanes apart in a thread's [`WORKER_READS`].
    id: u64,
    options: PgConnectOptions,
    acquire_timeout: Duration,
    port: u16,
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
        worker_slots: usize,
        acquire_timeout: Duration,
        port: u16,
    ) -> Self {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let thread = batch::LaneThread::start();
        let options = (*shared.connect_options()).clone();
        let (reads, writes) = drainers(executors);
        let read_pool = lane_pool(&thread, options.clone(), reads, acquire_timeout, port).await;
        let write_pool = lane_pool(&thread, options.clone(), writes, acquire_timeout, port).await;
        Self {
            read: Lane::new(read_pool, reads, thread.handle()),
            write: Lane::new(write_pool, writes, thread.handle()),
            workers: std::sync::Mutex::new(Vec::new()),
            worker_slots,
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            options,
            acquire_timeout,
            port,
            _thread: thread,
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Lane>>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// This thread's read lane (an HTTP worker's), by the id of the
    /// [`Lanes`] it belongs to; weak, so a store that is dropped takes its
    /// worker lanes with it.
    static WORKER_READS: std::cell::RefCell<Vec<(u64, std::sync::Weak<Lane>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The calling thread's read lane of `lanes`, if it has one.
fn worker_read_lane(lanes: &Lanes) -> Option<Arc<Lane>> {
    WORKER_READS.with(|w| {
        w.borrow()
            .iter()
            .find(|(id, _)| *id == lanes.id)
            .and_then(|(_, lane)| lane.upgrade())
    })
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
    let make =
        move |options: PgConnectOptions| make_lane_pool(options, size, acquire_timeout, port);
    if let Some(rt) = thread.handle() {
        let theirs = options.clone();
        if let Ok(pool) = rt.spawn(async move { make(theirs) }).await {
            return pool;
        }
    }
    make(options)
}

/// A lane's pool of `size` connections, opened by the runtime this is
/// called on.
fn make_lane_pool(
    options: PgConnectOptions,
    size: usize,
    acquire_timeout: Duration,
    port: u16,
) -> PgPool {
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
        // The workers' read lanes take at most half of what the shared
        // lanes leave, so the shared pool keeps the other half; none
        // without batching.
        let worker_reads = if opts.batch_executors > 0 {
            let left = (opts.max_connections as usize).saturating_sub(reads + writes);
            opts.worker_reads.min(left / 2)
        } else {
            0
        };
        let shared = opts
            .max_connections
            .saturating_sub((reads + writes + worker_reads) as u32)
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
            let lanes = Lanes::start(
                pool,
                opts.batch_executors,
                worker_reads,
                opts.acquire_timeout,
                port,
            );
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

    /// Give the calling HTTP worker a read lane of its own: one drainer on
    /// the worker's thread, on a connection the worker's runtime opens now
    /// (in the background). The worker's reads by id then batch among
    /// themselves, and a read's answer wakes the worker itself rather than
    /// the lanes' thread, which then woke the worker: on two busy cores
    /// each wake-up waited about 0.1 ms for a core. Called by the HTTP
    /// server's app factory, which runs on each worker's thread. A worker
    /// beyond the lanes the store gives (`DatabaseOptions::worker_reads`),
    /// or any other thread, reads through the shared read lane.
    pub fn open_worker_reads(&self) {
        let Some(lanes) = &self.lanes else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if worker_read_lane(lanes).is_some() {
            return;
        }
        let mut all = lanes.workers();
        if all.len() >= lanes.worker_slots {
            return;
        }
        let pool = make_lane_pool(lanes.options.clone(), 1, lanes.acquire_timeout, lanes.port);
        let lane = Arc::new(Lane::new(pool, 1, Some(rt)));
        all.push(lane.clone());
        WORKER_READS.with(|w| {
            let mut w = w.borrow_mut();
            w.retain(|(_, l)| l.strong_count() > 0);
            w.push((lanes.id, Arc::downgrade(&lane)));
        });
    }

    /// Run `cmd` in the next batch of its lane, or alone without lanes.
    async fn batched<C: Batch>(&self, cmd: C) -> Result<C::Out, StoreError> {
        match &self.lanes {
            Some(lanes) if C::WRITES => lanes.write.submit(cmd).await,
            Some(lanes) => match worker_read_lane(lanes) {
                Some(lane) => lane.submit(cmd).await,
                None => lanes.read.submit(cmd).await,
            },
            None => batch::run_one(self.db.get_postgres_connection_pool(), cmd).await,
        }
    }

    /// Connections open, idle and allowed, for `/metrics`: the shared
    /// pool's and the lanes' together (the workers' read lanes included).
    pub fn pool_stats(&self) -> PoolStats {
        let mut stats = PoolStats {
            size: 0,
            idle: 0,
            max: 0,
        };
        let mut add = |p: &PgPool| {
            stats.size += p.size();
            stats.idle += p.num_idle() as u32;
            stats.max += p.options().get_max_connections();
        };
        add(self.db.get_postgres_connection_pool());
        if let Some(l) = &self.lanes {
            add(l.read.pool());
            add(l.write.pool());
            let workers = l.workers();
            workers.iter().for_each(|w| add(w.pool()));
            // Worker slots not taken yet (a worker that has not started)
            // are still kept out of the shared pool.
            stats.max += l.worker_slots.saturating_sub(workers.len()) as u32;
        }
        stats
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
            // The workers' lanes: their runtimes have stopped (the HTTP
            // server first), and with them any statement of theirs.
            for lane in lanes.workers().iter() {
                lane.abandon();
            }
            tokio::join!(lanes.read.close(), lanes.write.close());
        }
        let _ = self.db.close().await;
    }
}
