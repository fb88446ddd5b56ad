//! Natural batching: concurrent commands of one kind run as one statement.
//!
//! Commands go to a [`Lane`]: a queue drained by a drainer holding a
//! connection of its own, and by up to a few more while the first ones are
//! held up. There are two lanes, reads and writes, so a read never waits
//! behind a write that waits for a lock (the read lane has one drainer; the
//! write lane several, so a write waiting for a lock holds up only its own
//! batch).
//! A caller that finds the lane idle (nothing queued, no drainer busy) takes
//! a drainer's place and runs its command at once on its own task: a batch
//! of one, on a connection the lane holds (no pool acquire, no release, no
//! hop to another thread). Otherwise it queues its command, and starts a
//! drainer when none is running, as a task on the lanes' own thread
//! ([`LaneThread`]: its runtime outlives the HTTP workers' runtimes in a
//! graceful shutdown, and nothing else runs on it to delay taking a
//! statement's answer). A drainer takes everything queued (at most
//! [`MAX_BATCH`]), runs the commands of each kind (read by id, create,
//! update) as one statement, answers each caller through its own oneshot,
//! and goes on until the queue is empty; then it puts its connection back
//! with the lane and ends. A caller that ran its own command hands its
//! place to a new drainer when commands queued meanwhile. There is no
//! timer: under load the drainer never finds the queue empty, and a batch is
//! whatever queued while the previous one ran. Lane connections plan their
//! statements once ([`lane_connection`]).
//! One drainer at a time while its statements flow: a second one running
//! beside it would halve every batch, and a batch's cost is mostly per
//! statement (creates at 16 connections: 7,268/s with two drainers taking
//! turns, 8,266/s with one). A statement still running after
//! [`STUCK_AFTER`] (held by another transaction's lock, or a batch far
//! larger than usual) marks its drainer stuck, and while every running
//! drainer is stuck, the lane's next place goes to what queued meanwhile:
//! a batch held up by a lock holds up only the commands it took.
//! A drainer is a task of its own, so a caller that goes away (its request
//! cancelled) never cancels a statement that carries others' commands; a
//! command run on its caller's task carries no one else's.
//!
//! Per-row results: a statement answers every command of its batch (a row
//! written, a version race lost, an idempotency key taken). When the whole
//! statement fails for a reason that may be one row's (a value PostgreSQL
//! refuses, a deadlock, any other database error), each command is run
//! again alone, so only the faulty one fails. When PostgreSQL is unreachable,
//! or the statement timed out, every command of that statement gets the
//! error (503), the connection is dropped and the next batch connects again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sea_orm::sqlx::{self, PgConnection, PgPool, Postgres, pool::PoolConnection};
use sea_orm::{DbErr, RuntimeErr};
use tokio::sync::{Notify, oneshot};

use super::StoreError;
use super::session_batches::{NewSession, PatchRow, ReadById, UpdateRow};
use crate::metrics::names;

/// The most commands one statement carries. A statement is one transaction,
/// whose events take positions xid × 1024 + index: the cap keeps index < 1024.
pub(crate) const MAX_BATCH: usize = 512;

/// How long a batch's statements run before their drainer counts as stuck
/// and another may start (see the module's notes). At the 70–100 µs of
/// PostgreSQL's time a batched create costs, a batch of 512 runs 35–50 ms,
/// one of 16 under 2 ms; one waiting for another transaction's lock, as
/// long as that transaction.
pub(crate) const STUCK_AFTER: Duration = Duration::from_millis(10);

/// One kind of batched command: how a batch of them runs as one statement.
pub(crate) trait Batch: Send + Sync + Sized + 'static {
    /// The `kind` label of the batching metrics.
    const KIND: &'static str;
    /// Whether it goes to the write lane (else the read lane).
    const WRITES: bool;
    type Out: Send + 'static;
    /// Run `cmds` as one statement; one answer per command, in order.
    fn run(
        conn: &mut PgConnection,
        cmds: &[Self],
    ) -> impl Future<Output = Result<Vec<Self::Out>, sqlx::Error>> + Send;
    /// The job as its lane queues it.
    fn queued(job: Job<Self>) -> Queued;
}

pub(crate) struct Job<C: Batch> {
    cmd: C,
    reply: oneshot::Sender<Result<C::Out, StoreError>>,
}

/// A job of any kind, as queued.
pub(crate) enum Queued {
    Read(Job<ReadById>),
    Create(Job<NewSession>),
    Update(Job<UpdateRow>),
    Patch(Job<PatchRow>),
}

impl Queued {
    fn kind(&self) -> &'static str {
        match self {
            Self::Read(_) => ReadById::KIND,
            Self::Create(_) => NewSession::KIND,
            Self::Update(_) => UpdateRow::KIND,
            Self::Patch(_) => PatchRow::KIND,
        }
    }

    /// No longer counted as queued (its caller went away).
    fn forget_queued(&self) {
        metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => self.kind()).decrement(1);
    }

    fn is_abandoned(&self) -> bool {
        match self {
            Self::Read(j) => j.reply.is_closed(),
            Self::Create(j) => j.reply.is_closed(),
            Self::Update(j) => j.reply.is_closed(),
            Self::Patch(j) => j.reply.is_closed(),
        }
    }
}

/// What a submitted command does once the lane's state is seen.
enum Next<C: Batch> {
    /// The lane is idle: run it on the caller's task, with this place.
    RunHere(Job<C>, Option<PoolConnection<Postgres>>),
    /// Queued, and a place was free: start a drainer with it.
    StartDrainer(Option<PoolConnection<Postgres>>),
    /// Queued for a running drainer.
    Wait,
}

/// A queue and the drainers that run it.
pub(crate) struct Lane {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where drainers run (see [`Shared::spawn`]).
    runtime: Option<tokio::runtime::Handle>,
    pool: PgPool,
    /// The most drainers running at once (`database.batch_executors`).
    drainers: usize,
    state: Mutex<State>,
    /// Signalled when the last drainer ends.
    stopped: Notify,
}

struct State {
    queue: VecDeque<Queued>,
    /// Drainers running (or places taken by commands run on their callers).
    running: usize,
    /// Of those, the ones whose statements have run longer than
    /// [`STUCK_AFTER`].
    stuck: usize,
    /// The connections of the drainers that ended, for the next ones.
    idle: Vec<PoolConnection<Postgres>>,
    /// Closing: no command is queued any more.
    closed: bool,
}

impl Shared {
    /// Drainers run on the lanes' thread (else on the runtime the lane was
    /// made on), which outlives the HTTP workers: a worker's runtime stops
    /// when its own requests are done during a graceful shutdown, and a
    /// drainer on it would be dropped mid-batch with other workers' commands.
    fn spawn(&self, drainer: impl Future<Output = ()> + Send + 'static) {
        match &self.runtime {
            Some(rt) => {
                rt.spawn(drainer);
            }
            None => {
                tokio::spawn(drainer);
            }
        }
    }

    /// A drainer's place given back, with its connection (kept for the next
    /// drainer, or closed when the lane is closing: it was set up for the
    /// lane's statements, see [`lane_connection`]).
    fn release(&self, mut st: MutexGuard<'_, State>, conn: Option<PoolConnection<Postgres>>) {
        st.running -= 1;
        if let Some(mut c) = conn {
            if st.closed {
                c.close_on_drop();
            } else {
                st.idle.push(c);
            }
        }
        let last = st.running == 0;
        drop(st);
        if last {
            self.stopped.notify_waiters();
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held leaves the state consistent: each
        // change under it is a single push, pop or counter step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Lane {
    /// A lane of at most `drainers` statements at once, on connections of
    /// `pool`, its own (kept between batches, at most `drainers` of them;
    /// closed with the lane).
    pub(crate) fn new(
        pool: PgPool,
        drainers: usize,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                runtime: runtime.or_else(|| tokio::runtime::Handle::try_current().ok()),
                pool,
                drainers: drainers.max(1),
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    running: 0,
                    stuck: 0,
                    idle: Vec::new(),
                    closed: false,
                }),
                stopped: Notify::new(),
            }),
        }
    }

    /// Queue `cmd` for the next batch and wait for its answer; on an idle
    /// lane, run it at once on the caller's task.
    pub(crate) async fn submit<C: Batch>(&self, cmd: C) -> Result<C::Out, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { cmd, reply };
        let next = {
            let mut st = self.shared.state();
            if st.closed {
                return Err(sqlx_error(sqlx::Error::PoolClosed));
            }
            if !st.place_free(self.shared.drainers) {
                st.queue.push_back(C::queued(job));
                metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => C::KIND).increment(1);
                Next::Wait
            } else {
                let conn = st.take_place();
                // Only on a connection a drainer took (see `LaneThread`),
                // never one this task would open: its socket would belong to
                // the worker's runtime, which stops first in a graceful
                // shutdown (failing whoever uses it next).
                if st.queue.is_empty() && conn.is_some() {
                    Next::RunHere(job, conn)
                } else {
                    st.queue.push_back(C::queued(job));
                    metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => C::KIND).increment(1);
                    Next::StartDrainer(conn)
                }
            }
        };
        match next {
            Next::RunHere(job, conn) => return self.run_here(job, answer, conn).await,
            Next::StartDrainer(conn) => self.shared.spawn(drain(self.shared.clone(), conn)),
            Next::Wait => {}
        }
        answer
            .await
            .map_err(|_| sqlx_error(sqlx::Error::PoolClosed))?
    }

    /// A command that found the lane idle: a batch of one, run on the
    /// caller's task with a drainer's place, so a request at low load takes
    /// no hop to another thread and back. Nobody else's command is in it, so
    /// a caller that goes away cancels only its own. Commands queued
    /// meanwhile (the other places taken) get a drainer that inherits this
    /// place when it is given back.
    async fn run_here<C: Batch>(
        &self,
        job: Job<C>,
        answer: oneshot::Receiver<Result<C::Out, StoreError>>,
        conn: Option<PoolConnection<Postgres>>,
    ) -> Result<C::Out, StoreError> {
        let mut place = Place {
            shared: self.shared.clone(),
            conn,
            finished: false,
        };
        metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => C::KIND).increment(1);
        watched(
            &self.shared,
            run_batch(&self.shared.pool, &mut place.conn, vec![job]),
        )
        .await;
        place.finished = true;
        drop(place);
        answer
            .await
            .map_err(|_| sqlx_error(sqlx::Error::PoolClosed))?
    }

    /// Close a lane whose runtime has stopped (an HTTP worker's): refuse
    /// new commands and close its idle connection, without waiting on that
    /// runtime. Nothing of it is left running: its drainers were tasks of
    /// the runtime, dropped with it, and their places given back.
    pub(crate) fn abandon(&self) {
        drop(self.refuse());
    }

    /// Refuse new commands and close the idle connections; the lane's
    /// state is left locked for the caller.
    fn refuse(&self) -> MutexGuard<'_, State> {
        let mut st = self.shared.state();
        st.closed = true;
        for mut c in st.idle.drain(..) {
            c.close_on_drop();
        }
        st
    }

    /// The lane's pool (for the connection counts of `/metrics`).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// Refuse new commands, let the drainers answer the queued ones, and
    /// close the lane's connections and its pool.
    pub(crate) async fn close(&self) {
        let orphaned = {
            let mut st = self.refuse();
            // Left by a drainer whose task was dropped: drained here.
            let orphaned = st.running == 0 && !st.queue.is_empty();
            if orphaned {
                st.running += 1;
            }
            orphaned
        };
        if orphaned {
            self.shared.spawn(drain(self.shared.clone(), None));
        }
        loop {
            let stopped = self.shared.stopped.notified();
            if self.shared.state().running == 0 {
                break;
            }
            stopped.await;
        }
        self.shared.pool.close().await;
    }
}

/// The thread the drainers run on: a runtime of their own, so that a
/// statement's answer is taken as soon as it arrives rather than when the
/// main runtime is done with the relay, the analytics consumer and the
/// rest (creates at 64 connections: 7,464–8,614/s on the main runtime,
/// 8,138–9,213/s here, alternating builds). Each lane has a pool of its
/// own, made on this thread (`Store::connect`), so the lanes' sockets
/// belong to this runtime: its thread notices a statement's answer and
/// runs the drainer waiting for it, with no other thread woken in between.
/// A command run on its caller's task (an idle lane) polls the same socket
/// from the caller's runtime; this thread then passes the answer on.
/// The thread ends when this is dropped: the lanes close first
/// (`Store::close`).
pub(crate) struct LaneThread {
    handle: Option<tokio::runtime::Handle>,
    _stop: Option<oneshot::Sender<()>>,
}

impl LaneThread {
    /// Start the thread; should that fail (no thread or runtime to be had),
    /// drainers run on the runtime the lane is made on, as they would
    /// without one.
    pub(crate) fn start() -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let started = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|rt| {
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name("db-batches".into())
                    .spawn(move || {
                        let _ = rt.block_on(stopped);
                    })
                    .map(|_| handle)
            });
        match started {
            Ok(handle) => Self {
                handle: Some(handle),
                _stop: Some(stop),
            },
            Err(e) => {
                tracing::warn!(error = %e, "no thread of their own for the batch drainers");
                Self {
                    handle: None,
                    _stop: None,
                }
            }
        }
    }

    pub(crate) fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.handle.clone()
    }
}

/// Run `cmd` alone on a connection of `pool` (a store without lanes).
pub(crate) async fn run_one<C: Batch>(pool: &PgPool, cmd: C) -> Result<C::Out, StoreError> {
    let mut conn = acquire(pool).await.map_err(sqlx_error)?;
    let mut out = C::run(&mut conn, std::slice::from_ref(&cmd))
        .await
        .map_err(sqlx_error)?;
    out.pop()
        .ok_or_else(|| StoreError::Corrupt("a batch of one answered nothing".into()))
}

/// A running drainer's place in its lane, given back when it ends; also
/// when its task is dropped mid-batch (its runtime shutting down), and then
/// its connection, whose statement was cut off, is closed.
struct Running {
    shared: Arc<Shared>,
    conn: Option<PoolConnection<Postgres>>,
    ended: bool,
}

impl Running {
    /// Give the place back (and the connection, unless closing), with the
    /// lane's state locked by the caller.
    fn end(&mut self, st: MutexGuard<'_, State>) {
        self.ended = true;
        self.shared.release(st, self.conn.take());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ended {
            if let Some(c) = &mut self.conn {
                c.close_on_drop();
            }
            drop(self.conn.take());
            let shared = self.shared.clone();
            self.end(shared.state());
        }
    }
}

/// The drainer's place a command run on its caller's task holds (see
/// [`Lane::run_here`]). Given back when dropped, whether the command ran or
/// its caller went away mid-statement (then its connection is closed): to
/// a drainer started for what queued meanwhile, or to the lane.
struct Place {
    shared: Arc<Shared>,
    conn: Option<PoolConnection<Postgres>>,
    /// The statement ran to its end (else it was cut off, and its
    /// connection is not used again).
    finished: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut conn = self.conn.take();
        if !self.finished
            && let Some(mut c) = conn.take()
        {
            c.close_on_drop();
        }
        let st = self.shared.state();
        if st.queue.is_empty() {
            self.shared.release(st, conn);
        } else {
            drop(st);
            self.shared.spawn(drain(self.shared.clone(), conn));
        }
    }
}

/// Run batches until the queue is empty.
async fn drain(shared: Arc<Shared>, conn: Option<PoolConnection<Postgres>>) {
    let mut me = Running {
        shared: shared.clone(),
        conn,
        ended: false,
    };
    loop {
        let taken: Vec<Queued> = {
            let mut st = shared.state();
            if st.queue.is_empty() {
                // Ends under the same lock a caller queues under, so a
                // command queued from now on finds a free place and starts
                // a drainer of its own.
                me.end(st);
                return;
            }
            let n = st.queue.len().min(MAX_BATCH);
            st.queue.drain(..n).collect()
        };
        let (mut reads, mut creates, mut updates, mut patches) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for job in taken {
            // A caller that went away (its request was cancelled) is not
            // run, as if it had been cancelled before its statement was sent.
            if job.is_abandoned() {
                job.forget_queued();
                continue;
            }
            match job {
                Queued::Read(j) => reads.push(j),
                Queued::Create(j) => creates.push(j),
                Queued::Update(j) => updates.push(j),
                Queued::Patch(j) => patches.push(j),
            }
        }
        let conn = &mut me.conn;
        watched(&shared, async {
            run_batch(&shared.pool, conn, reads).await;
            run_batch(&shared.pool, conn, creates).await;
            run_batch(&shared.pool, conn, updates).await;
            run_batch(&shared.pool, conn, patches).await;
        })
        .await;
    }
}

impl State {
    /// Whether a command may take a drainer's place (run on its caller, or
    /// start a drainer) rather than queue for a running one: when none is
    /// running, or every running one is stuck and a place is left.
    fn place_free(&self, drainers: usize) -> bool {
        self.running < drainers && self.running == self.stuck
    }

    /// Take a drainer's place, with the connection a finished drainer left
    /// (none at first: the drainer opens one).
    fn take_place(&mut self) -> Option<PoolConnection<Postgres>> {
        self.running += 1;
        self.idle.pop()
    }
}

/// Run a batch's statements; should they run past [`STUCK_AFTER`], their
/// drainer counts as stuck until they end, and if that leaves every running
/// drainer stuck with commands queued, another drainer starts for them.
async fn watched(shared: &Arc<Shared>, batch: impl Future<Output = ()>) {
    if shared.drainers == 1 {
        return batch.await;
    }
    let mut batch = std::pin::pin!(batch);
    tokio::select! {
        biased;
        () = &mut batch => return,
        () = tokio::time::sleep(STUCK_AFTER) => {}
    }
    let _stuck = Stuck::mark(shared);
    batch.await;
}

/// A drainer counted as stuck; counted no more when dropped (its statements
/// ended, or its task was dropped with them).
struct Stuck<'a>(&'a Shared);

impl<'a> Stuck<'a> {
    fn mark(shared: &'a Arc<Shared>) -> Self {
        let mut st = shared.state();
        st.stuck += 1;
        if !st.queue.is_empty() && st.place_free(shared.drainers) {
            let conn = st.take_place();
            drop(st);
            tracing::debug!(
                "a batch is held up; another drainer takes the commands queued behind it"
            );
            shared.spawn(drain(shared.clone(), conn));
        }
        Self(shared)
    }
}

impl Drop for Stuck<'_> {
    fn drop(&mut self) {
        self.0.state().stuck -= 1;
    }
}

async fn run_batch<C: Batch>(
    pool: &PgPool,
    slot: &mut Option<PoolConnection<Postgres>>,
    jobs: Vec<Job<C>>,
) {
    if jobs.is_empty() {
        return;
    }
    let n = jobs.len() as u64;
    metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => C::KIND).decrement(n as f64);
    metrics::counter!(names::DB_BATCHES, "kind" => C::KIND).increment(1);
    metrics::counter!(names::DB_BATCH_COMMANDS, "kind" => C::KIND).increment(n);
    let (cmds, replies): (Vec<C>, Vec<_>) = jobs.into_iter().map(|j| (j.cmd, j.reply)).unzip();
    let conn = match slot {
        Some(c) => c,
        None => match lane_connection(pool).await {
            Ok(c) => slot.insert(c),
            Err(e) => return fail_all(replies, e),
        },
    };
    match C::run(conn, &cmds).await {
        Ok(outs) if outs.len() == replies.len() => {
            for (reply, out) in replies.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        Ok(_) => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Corrupt(
                    "a batch answered a different number of commands".into(),
                )));
            }
        }
        Err(e) if !per_row(&e) => {
            if let Some(mut c) = slot.take() {
                c.close_on_drop();
            }
            fail_all(replies, e);
        }
        Err(e) if cmds.len() == 1 => answer_alone(replies, Err(e)),
        Err(e) => {
            // One row may be at fault: each command again, alone (nothing of
            // the failed statement committed).
            tracing::warn!(kind = C::KIND, commands = cmds.len(), error = %e,
                "a batched statement failed; running its commands one by one");
            for (cmd, reply) in cmds.iter().zip(replies) {
                let result = C::run(conn, std::slice::from_ref(cmd)).await;
                answer_alone(vec![reply], result);
            }
        }
    }
}

/// A connection for a lane, from its pool. Its statements are planned once
/// (`plan_cache_mode = force_generic_plan`): their parameters are arrays
/// whose values do not change the best plan, and PostgreSQL otherwise plans
/// some of them again at every execution (a custom plan, about 0.4 ms of a
/// batch's time here). The connection stays with the lane until it closes.
async fn lane_connection(pool: &PgPool) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let mut conn = acquire(pool).await?;
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    Ok(conn)
}

/// A connection from `pool`, its wait kept on the heap. The driver's acquire
/// (a timeout around a connect) is a 14.5 KB future; awaited in place it
/// made every future that may open a connection as large (a batch, a
/// submitted command, the store's writes, the handlers: 15–20 KB), and each
/// of them was copied whole when built, spawned or boxed, on every request,
/// though a lane opens a connection only once.
async fn acquire(pool: &PgPool) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    Box::pin(pool.acquire()).await
}

fn answer_alone<O>(
    replies: Vec<oneshot::Sender<Result<O, StoreError>>>,
    result: Result<Vec<O>, sqlx::Error>,
) {
    let Some(reply) = replies.into_iter().next() else {
        return;
    };
    let _ = reply.send(match result {
        Ok(mut outs) => outs
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a batch of one answered nothing".into())),
        Err(e) => Err(sqlx_error(e)),
    });
}

fn fail_all<O>(replies: Vec<oneshot::Sender<Result<O, StoreError>>>, e: sqlx::Error) {
    let e = Arc::new(e);
    for reply in replies {
        let _ = reply.send(Err(DbErr::Query(RuntimeErr::SqlxError(e.clone())).into()));
    }
}

/// Whether a failed statement may be the fault of one row, so that running
/// its commands alone gives the others their answer: not when PostgreSQL is
/// unreachable or the statement was cancelled by the statement timeout.
fn per_row(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => !matches!(
            d.code().as_deref(),
            Some("57014" | "57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006")
        ),
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// A driver error, classified like every other store error.
pub(crate) fn sqlx_error(e: sqlx::Error) -> StoreError {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))).into()
}
