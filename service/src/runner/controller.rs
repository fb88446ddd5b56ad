//! Carrying out the decisions: a work queue of session ids (one reconcile
//! per session at a time, repeated if it was woken meanwhile), and the
//! reconcile itself: read the session over HTTP, observe the backend, ask
//! `reconcile::decide`, act, report through PATCH.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::RunnerStats;
use super::api::{ApiClient, ApiError};
use super::backend::{Backend, StartRequest, WorkerExit};
use super::claude::{Launch, Outcome};
use super::reconcile::{self, Action, ReportStatus, SessionView};
use super::workers::lock;
use crate::contract::{PausedReason, Session, WorkerField, WorkerPatch, WorkerRecord};
use crate::domain::SessionStatus;
use crate::domain::worker::CrashReason;

/// What a reconcile asks of the queue afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Done,
    /// Look again soon (a lost `If-Match` race, an unreachable API).
    Retry,
    After(Duration),
}

/// Shared by every reconcile.
pub struct Context<B> {
    pub api: ApiClient,
    pub backend: B,
    pub max_workers: usize,
    /// Sessions that want a worker but found every slot taken, in order.
    waiting: Mutex<VecDeque<Uuid>>,
    /// Starts under way (claimed, not yet running): they hold a slot too,
    /// or concurrent reconciles would all see room for themselves.
    starting: Mutex<usize>,
    /// Sessions known to carry a worker spec for this backend; the feed only
    /// wakes the controller for these (and for new specs).
    known: Mutex<HashSet<Uuid>>,
    wake: mpsc::UnboundedSender<Uuid>,
    /// Shared by the runner's controllers.
    pub stats: Arc<RunnerStats>,
}

impl<B: Backend> Context<B> {
    pub fn new(
        api: ApiClient,
        backend: B,
        max_workers: usize,
        wake: mpsc::UnboundedSender<Uuid>,
        stats: Arc<RunnerStats>,
    ) -> Self {
        Self {
            api,
            backend,
            max_workers,
            waiting: Mutex::new(VecDeque::new()),
            starting: Mutex::new(0),
            known: Mutex::new(HashSet::new()),
            wake,
            stats,
        }
    }

    pub fn wake(&self, id: Uuid) {
        let _ = self.wake.send(id);
    }

    pub fn is_known(&self, id: Uuid) -> bool {
        lock(&self.known).contains(&id)
    }

    pub fn remember(&self, id: Uuid, managed: bool) {
        let mut known = lock(&self.known);
        if managed {
            known.insert(id);
        } else {
            known.remove(&id);
        }
    }

    /// A slot freed up: wake the sessions that wait for one, oldest first.
    fn release_waiting(&self) {
        let busy = self.backend.running() + *lock(&self.starting);
        let free = self.max_workers.saturating_sub(busy);
        let ids: Vec<Uuid> = {
            let mut w = lock(&self.waiting);
            let n = free.min(w.len());
            w.drain(..n).collect()
        };
        for id in ids {
            self.wake(id);
        }
    }

    /// Take a worker slot for a start, if one is free.
    fn reserve_slot(&self) -> Option<SlotGuard<'_, B>> {
        let mut starting = lock(&self.starting);
        if self.backend.running() + *starting >= self.max_workers {
            return None;
        }
        *starting += 1;
        Some(SlotGuard(self))
    }

    fn wait_for_slot(&self, id: Uuid) {
        let mut w = lock(&self.waiting);
        if !w.contains(&id) {
            w.push_back(id);
        }
    }
}

/// A reserved slot; given back when the start is over (the worker, if it
/// started, then counts in `Backend::running`).
struct SlotGuard<'a, B: Backend>(&'a Context<B>);

impl<B: Backend> Drop for SlotGuard<'_, B> {
    fn drop(&mut self) {
        {
            let mut starting = lock(&self.0.starting);
            *starting = starting.saturating_sub(1);
        }
        // A start that failed leaves its slot to whoever waits.
        self.0.release_waiting();
    }
}

/// The queue: ids arrive on `rx`; each is reconciled by at most one task at
/// a time, and again if it was woken while in progress.
pub async fn run_queue<B: Backend>(
    ctx: Arc<Context<B>>,
    mut rx: mpsc::UnboundedReceiver<Uuid>,
    concurrency: usize,
) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Uuid, Next)>();
    let mut in_progress: HashSet<Uuid> = HashSet::new();
    let mut dirty: HashSet<Uuid> = HashSet::new();
    let spawn = |id: Uuid, in_progress: &mut HashSet<Uuid>| {
        in_progress.insert(id);
        let ctx = ctx.clone();
        let permits = permits.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let next = match permits.acquire_owned().await {
                Ok(_permit) => reconcile_one(&ctx, id).await,
                Err(_) => Next::Done,
            };
            let _ = done.send((id, next));
        });
    };
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(id) = msg else { break };
                if in_progress.contains(&id) {
                    dirty.insert(id);
                } else {
                    spawn(id, &mut in_progress);
                }
            }
            Some((id, next)) = done_rx.recv() => {
                in_progress.remove(&id);
                if dirty.remove(&id) {
                    spawn(id, &mut in_progress);
                    continue;
                }
                let delay = match next {
                    Next::Done => continue,
                    Next::Retry => Duration::from_millis(200),
                    Next::After(d) => d,
                };
                let wake = ctx.wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = wake.send(id);
                });
            }
        }
    }
}

/// One level-triggered pass over one session.
pub async fn reconcile_one<B: Backend>(ctx: &Context<B>, id: Uuid) -> Next {
    let span = info_span!("reconcile", session_id = %id, request_id = tracing::field::Empty);
    async {
        match step(ctx, id).await {
            Ok(next) => next,
            Err(ApiError::Stale) => {
                debug!("lost an If-Match race; reading again");
                Next::Retry
            }
            Err(e) => {
                warn!(error = %e, "reconcile failed; retrying");
                Next::After(Duration::from_secs(1))
            }
        }
    }
    .instrument(span)
    .await
}

/// Read the session, observe the backend, decide, act.
async fn step<B: Backend>(ctx: &Context<B>, id: Uuid) -> Result<Next, ApiError> {
    let Some(session) = ctx.api.session(id).await? else {
        return Ok(on_deleted(ctx, id));
    };
    let view = SessionView::new(&session, ctx.backend.kind());
    ctx.remember(id, view.managed.is_some());
    let observed = ctx.backend.observe(id);
    let action = reconcile::decide(&view, &observed, Utc::now());
    if action != Action::Nothing {
        debug!(?action, status = %view.status, generation = view.generation, "decided");
    }
    match action {
        Action::Nothing => Ok(Next::Done),
        Action::RequeueAfter(d) => Ok(Next::After(d)),
        Action::Stop(reason) => {
            info!(?reason, "stopping worker");
            ctx.backend.stop(id, reason);
            Ok(Next::Done)
        }
        Action::Forget => {
            forget_exited(ctx, id, &observed);
            Ok(Next::Done)
        }
        Action::Start { generation, launch } => start_worker(ctx, &view, generation, launch).await,
        Action::Report { generation, status } => {
            report_exit(ctx, &session, &view, generation, status).await
        }
        Action::Recover => recover(ctx, &view).await,
        Action::PauseForBudget => pause_for_budget(ctx, &view).await,
    }
}

/// The session is gone: a worker it had is unmanaged now.
fn on_deleted<B: Backend>(ctx: &Context<B>, id: Uuid) -> Next {
    ctx.remember(id, false);
    let observed = ctx.backend.observe(id);
    match reconcile::decide_deleted(&observed) {
        Action::Stop(reason) => ctx.backend.stop(id, reason),
        Action::Forget => forget_exited(ctx, id, &observed),
        _ => {}
    }
    Next::Done
}

/// Claim `generation` on the session, then start its worker and record it
/// (or record why it could not start).
async fn start_worker<B: Backend>(
    ctx: &Context<B>,
    view: &SessionView,
    generation: u64,
    launch: Launch,
) -> Result<Next, ApiError> {
    let id = view.id;
    let Some(spec) = view.managed.clone() else {
        return Ok(Next::Done);
    };
    let Some(_slot) = ctx.reserve_slot() else {
        debug!("every worker slot is taken; queued");
        ctx.wait_for_slot(id);
        return Ok(Next::Done);
    };
    // Follow the request that asked for this worker: in the logs of
    // everything below, and in the events of the runner's reports.
    let request_id = ctx.api.cause_of(id, view.version).await;
    if let Some(r) = &request_id {
        tracing::Span::current().record("request_id", r.as_str());
    }
    let api = ctx.api.for_request(request_id);
    info!(generation, launch = launch.as_str(), "starting worker");
    // Claim the generation first: of two runners racing, one wins the
    // If-Match and the other re-reads and sees it taken.
    let claim = WorkerPatch::new(WorkerRecord {
        generation: Some(generation),
        launch: Some(launch.kind()),
        ..WorkerRecord::default()
    })
    .clearing(&WorkerField::OF_A_RUN);
    api.patch_worker(id, &claim, Some(view.version)).await?;
    let launch_kind = launch.as_str();
    let backend = ctx.backend.kind().as_str();
    let req = StartRequest {
        session_id: id,
        generation,
        spec: spec.clone(),
        launch,
    };
    match ctx.backend.start(req).await {
        Ok(started) => {
            let patch = WorkerPatch::new(WorkerRecord {
                pid: started.pid,
                pod: started.pod,
                started_at: Some(started.started_at),
                claude_session_id: Some(id.to_string()),
                model: spec.model,
                ..WorkerRecord::default()
            })
            .clearing(&[WorkerField::Pid, WorkerField::Pod, WorkerField::Model]);
            metrics::counter!(crate::metrics::names::RUNNER_WORKER_STARTS, "backend" => backend, "launch" => launch_kind).increment(1);
            api.patch_worker(id, &patch, None).await?;
        }
        Err(e) => {
            warn!(error = %e, "cannot start the worker");
            metrics::counter!(crate::metrics::names::RUNNER_WORKER_START_FAILURES, "backend" => backend)
                .increment(1);
            let patch = WorkerPatch::new(WorkerRecord {
                stopped_at: Some(Utc::now()),
                crash_reason: Some(CrashReason::ExitCode),
                last_error: Some(format!("cannot start the worker: {e}")),
                ..WorkerRecord::default()
            })
            .status(SessionStatus::Crashed);
            ctx.api.patch_worker(id, &patch, None).await?;
        }
    }
    Ok(Next::Done)
}

/// Record the ended worker of `generation` on the session, then let it go.
async fn report_exit<B: Backend>(
    ctx: &Context<B>,
    session: &Session,
    view: &SessionView,
    generation: u64,
    status: ReportStatus,
) -> Result<Next, ApiError> {
    let id = view.id;
    let Some(exit) = ctx.backend.exit_of(id, generation) else {
        return Ok(Next::Done);
    };
    let before = WorkerRecord::of(&session.runtime_metadata);
    info!(?status, outcome = ?exit.outcome, "reporting the worker's end");
    record_exit(ctx.backend.kind().as_str(), &exit, view.cost_usd);
    let patch = report_patch(&before, &exit, status);
    match ctx.api.patch_worker(id, &patch, Some(view.version)).await {
        Ok(_) => {}
        Err(ApiError::Conflict(detail)) => {
            // The status moved where ours cannot follow: record the worker only.
            debug!(%detail, "status change refused; recording the worker only");
            let patch = report_patch(&before, &exit, ReportStatus::Unchanged);
            ctx.api.patch_worker(id, &patch, None).await?;
        }
        Err(e) => return Err(e),
    }
    ctx.backend.forget(id, generation);
    ctx.release_waiting();
    Ok(Next::Retry)
}

/// Restart policy: move the crashed session back to active.
async fn recover<B: Backend>(ctx: &Context<B>, view: &SessionView) -> Result<Next, ApiError> {
    metrics::counter!(crate::metrics::names::RUNNER_WORKER_RESTARTS, "backend" => ctx.backend.kind().as_str())
        .increment(1);
    let restarts = view.restarts.saturating_add(1);
    info!(restarts, "restart policy: recovering the crashed session");
    let worker = WorkerRecord {
        restarts: Some(restarts),
        ..WorkerRecord::default()
    };
    move_session(ctx, view, SessionStatus::Active, worker).await?;
    Ok(Next::Retry)
}

async fn pause_for_budget<B: Backend>(
    ctx: &Context<B>,
    view: &SessionView,
) -> Result<Next, ApiError> {
    info!(cost_usd = view.cost_usd, "max_budget_usd reached: pausing");
    let budget = Some(PausedReason::Budget);
    move_session(
        ctx,
        view,
        SessionStatus::Paused,
        WorkerRecord {
            paused_reason: budget,
            ..WorkerRecord::default()
        },
    )
    .await?;
    Ok(Next::Done)
}

/// Move the session to `status` with `worker` written beside it, only if it
/// is still the version the decision read.
async fn move_session<B: Backend>(
    ctx: &Context<B>,
    view: &SessionView,
    status: SessionStatus,
    worker: WorkerRecord,
) -> Result<(), ApiError> {
    let patch = WorkerPatch::new(worker).status(status);
    ctx.api
        .patch_worker(view.id, &patch, Some(view.version))
        .await?;
    Ok(())
}

fn forget_exited<B: Backend>(ctx: &Context<B>, id: Uuid, observed: &reconcile::Observed) {
    if let reconcile::WorkerState::Exited { generation, .. } = observed.worker {
        ctx.backend.forget(id, generation);
        ctx.release_waiting();
    }
}

/// Count a worker's end by outcome, and the spend it added.
fn record_exit(backend: &'static str, exit: &WorkerExit, cost_before: f64) {
    let outcome = match &exit.outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Stopped => "stopped",
        Outcome::BudgetReached { .. } => "budget",
        Outcome::Failed { .. } => "crashed",
    };
    metrics::counter!(crate::metrics::names::RUNNER_WORKER_EXITS, "backend" => backend, "outcome" => outcome)
        .increment(1);
    if let Outcome::Failed { reason, .. } = &exit.outcome {
        let reason = serde_json::to_value(reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        metrics::counter!(crate::metrics::names::RUNNER_WORKER_CRASHES, "backend" => backend, "reason" => reason)
            .increment(1);
    }
    if let Some(total) = exit.summary.result.as_ref().and_then(|r| r.total_cost_usd) {
        metrics::gauge!(crate::metrics::names::RUNNER_COST_USD, "backend" => backend)
            .increment((total - cost_before).max(0.0));
    }
}

/// The patch recording an ended worker: its exit, what it spent, and the
/// status it leaves the session in. Turns and tokens add up over the
/// session's workers (`before` is the record so far); cost is Claude Code's
/// own running total, which it carries across `--resume`.
pub fn report_patch(before: &WorkerRecord, exit: &WorkerExit, status: ReportStatus) -> WorkerPatch {
    let run = exit.summary.result.clone().unwrap_or_default();
    let prev_cost = before.cost_usd.unwrap_or(0.0);
    let budget = matches!(exit.outcome, Outcome::BudgetReached { .. });
    let worker = WorkerRecord {
        pid: exit.pid,
        started_at: Some(exit.started_at),
        stopped_at: Some(exit.stopped_at),
        exit_code: exit.exit.code,
        signal: exit.exit.signal,
        crash_reason: exit.outcome.crash_reason(),
        last_error: exit.outcome.detail().map(str::to_owned),
        turns: Some(before.turns.unwrap_or(0) + run.num_turns),
        input_tokens: Some(before.input_tokens.unwrap_or(0) + run.input_tokens),
        output_tokens: Some(before.output_tokens.unwrap_or(0) + run.output_tokens),
        cost_usd: Some(run.total_cost_usd.map_or(prev_cost, |c| c.max(prev_cost))),
        claude_session_id: exit.summary.claude_session_id.clone(),
        model: exit.summary.model.clone(),
        paused_reason: budget.then_some(PausedReason::Budget),
        ..WorkerRecord::default()
    };
    let patch = WorkerPatch::new(worker).clearing(&[
        WorkerField::Pid,
        WorkerField::ExitCode,
        WorkerField::Signal,
        WorkerField::CrashReason,
        WorkerField::LastError,
    ]);
    match status {
        ReportStatus::Unchanged => patch,
        ReportStatus::Completed => patch.status(SessionStatus::Completed),
        ReportStatus::Crashed => patch.status(SessionStatus::Crashed),
        ReportStatus::Paused => patch.status(SessionStatus::Paused),
    }
}
