//! Natural batching: concurrent commands of one kind run as one statement.
//!
//! Commands go to a [`Lane`]: a queue and a few executor tasks, each holding
//! its own connection. There are two lanes, reads and writes, so a read
//! never waits behind a write that waits for a lock. An executor takes the
//! first queued command, then everything else that queued while it waited or
//! ran its previous batch (at most [`MAX_BATCH`]), and runs the commands of
//! each kind (read by id, create, update) as one statement, answering each
//! caller through its own oneshot. There is no timer: at one request in
//! flight a batch is that request, and its cost is one statement on a held
//! connection (no pool acquire, no release). With several executors a
//! batch held up by a lock (another writer's row) holds up only the commands
//! it took: the next ones go to another executor.
//!
//! Per-row results: a statement answers every command of its batch (a row
//! written, a version race lost, an idempotency key taken). When the whole
//! statement fails for a reason that may be one row's (a value PostgreSQL
//! refuses, a deadlock, any other database error), each command is run
//! again alone, so only the faulty one fails. When PostgreSQL is unreachable,
//! or the statement timed out, every command of that statement gets the
//! error (503), the connection is dropped and the next batch connects again.

use std::sync::Arc;

use sea_orm::sqlx::{self, PgConnection, PgPool, Postgres, pool::PoolConnection};
use sea_orm::{DbErr, RuntimeErr};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::StoreError;
use super::session_batches::{NewSession, ReadById, UpdateRow};
use crate::metrics::names;

/// The most commands one statement carries. A statement is one transaction,
/// whose events take positions xid × 1024 + index: the cap keeps index < 1024.
pub(crate) const MAX_BATCH: usize = 512;

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
}

impl Queued {
    fn is_abandoned(&self) -> bool {
        match self {
            Self::Read(j) => j.reply.is_closed(),
            Self::Create(j) => j.reply.is_closed(),
            Self::Update(j) => j.reply.is_closed(),
        }
    }
}

/// A queue and the executors that drain it.
pub(crate) struct Lane {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Lane {
    /// A lane of `executors` tasks on connections of `pool`; once `closing`
    /// is cancelled they answer what is queued, then stop.
    pub(crate) fn start(
        pool: &PgPool,
        executors: usize,
        closing: &CancellationToken,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let tasks = (0..executors)
            .map(|_| tokio::spawn(execute(pool.clone(), rx.clone(), closing.clone())))
            .collect();
        (Self { tx }, tasks)
    }

    /// Queue `cmd` for the next batch and wait for its answer.
    pub(crate) async fn submit<C: Batch>(&self, cmd: C) -> Result<C::Out, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(C::queued(Job { cmd, reply }))
            .map_err(|_| sqlx_error(sqlx::Error::PoolClosed))?;
        metrics::gauge!(names::DB_BATCH_QUEUED, "kind" => C::KIND).increment(1);
        answer
            .await
            .map_err(|_| sqlx_error(sqlx::Error::PoolClosed))?
    }
}

/// Run `cmd` alone on a connection of `pool` (a store without lanes).
pub(crate) async fn run_one<C: Batch>(pool: &PgPool, cmd: C) -> Result<C::Out, StoreError> {
    let mut conn = pool.acquire().await.map_err(sqlx_error)?;
    let mut out = C::run(&mut conn, std::slice::from_ref(&cmd))
        .await
        .map_err(sqlx_error)?;
    out.pop()
        .ok_or_else(|| StoreError::Corrupt("a batch of one answered nothing".into()))
}

async fn execute(
    pool: PgPool,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>,
    closing: CancellationToken,
) {
    let mut conn: Option<PoolConnection<Postgres>> = None;
    loop {
        let taken = {
            let mut rx = rx.lock().await;
            let first = tokio::select! {
                biased;
                job = rx.recv() => job,
                () = closing.cancelled() => {
                    // Refuse new commands; drain the queued ones.
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = first else { break };
            let mut taken = vec![first];
            while taken.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => taken.push(job),
                    Err(_) => break,
                }
            }
            taken
        };
        let (mut reads, mut creates, mut updates) = (Vec::new(), Vec::new(), Vec::new());
        for job in taken {
            // A caller that went away (its request was cancelled) is not
            // run, as if it had been cancelled before its statement was sent.
            if job.is_abandoned() {
                continue;
            }
            match job {
                Queued::Read(j) => reads.push(j),
                Queued::Create(j) => creates.push(j),
                Queued::Update(j) => updates.push(j),
            }
        }
        run_batch(&pool, &mut conn, reads).await;
        run_batch(&pool, &mut conn, creates).await;
        run_batch(&pool, &mut conn, updates).await;
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
        None => match pool.acquire().await {
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
