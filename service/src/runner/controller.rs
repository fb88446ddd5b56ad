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
use super::cost::Spend;
use super::driver::{FirstMessage, LiveConfig};
use super::reconcile::{self, Action, ReportStatus, SessionView, StopReason};
use super::workers::lock;
use crate::contract::live::InputKind;
use crate::contract::{
    ApprovalDecision, PausedReason, Session, StopCause, WorkerField, WorkerPatch, WorkerRecord,
    WorkerState,
};
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
        return Ok(on_deleted(ctx, id).await);
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
            stop_worker(ctx, &view, reason).await;
            Ok(Next::Done)
        }
        Action::Deliver { recheck } => {
            if let Some(live) = ctx.backend.live(id)
                && let Some(spec) = &view.managed
            {
                live.nudge(live_config(spec, &view));
            }
            Ok(recheck.map_or(Next::Done, Next::After))
        }
        Action::FinishTask => {
            if inputs_waiting(ctx, &view).await? {
                if let (Some(live), Some(spec)) = (ctx.backend.live(id), &view.managed) {
                    live.nudge(live_config(spec, &view));
                }
            } else {
                stop_worker(ctx, &view, StopReason::Done).await;
            }
            Ok(Next::Done)
        }
        Action::ResumeOnInput => {
            if inputs_waiting(ctx, &view).await? {
                info!("an input waits for the idle session: resuming it");
                let patch = WorkerPatch::new(WorkerRecord::default())
                    .clearing(&[WorkerField::PausedReason])
                    .status(SessionStatus::Active);
                ctx.api.patch_worker(id, &patch, Some(view.version)).await?;
                return Ok(Next::Retry);
            }
            Ok(Next::Done)
        }
        Action::Forget => {
            forget_exited(ctx, id, &observed);
            Ok(Next::Done)
        }
        Action::Start { generation, launch } => {
            start_worker(ctx, &session, &view, generation, launch).await
        }
        Action::Report { generation, status } => {
            report_exit(ctx, &session, &view, generation, status).await
        }
        Action::Recover => recover(ctx, &view).await,
        Action::PauseForBudget => pause_for_budget(ctx, &view).await,
    }
}

/// What a live worker's driver needs from the session.
fn live_config(spec: &crate::domain::WorkerSpec, view: &SessionView) -> LiveConfig {
    LiveConfig {
        mode: spec.mode.into(),
        approval_timeout: spec
            .approval_timeout_seconds
            .map(|s| Duration::from_secs(u64::from(s))),
        approval_default: spec
            .approval_default
            .map_or(ApprovalDecision::Deny, Into::into),
        input_seq: view.input_seq,
    }
}

/// Does an input wait that no worker has taken? (`message` inputs only
/// with `messages_only`.)
async fn inputs_waiting<B: Backend>(
    ctx: &Context<B>,
    view: &SessionView,
) -> Result<bool, ApiError> {
    Ok(!ctx.api.inputs(view.id, view.input_seq).await?.is_empty())
}

/// Begin stopping the worker and say so on the session: why, and at whose
/// request.
async fn stop_worker<B: Backend>(ctx: &Context<B>, view: &SessionView, reason: StopReason) {
    info!(?reason, "stopping worker");
    ctx.backend.stop(view.id, reason);
    let by = match reason {
        StopReason::Paused | StopReason::Finished => ctx
            .api
            .actor_of(view.id, view.version)
            .await
            .unwrap_or_else(|| "unknown".into()),
        _ => "runner".into(),
    };
    // A finished task ends on its own terms: no stop to record.
    let done = reason == StopReason::Done;
    let patch = WorkerPatch::new(WorkerRecord {
        state: Some(WorkerState::Stopping),
        stop_reason: stop_cause(reason).filter(|_| !done),
        stopped_by: Some(by).filter(|_| !done),
        ..WorkerRecord::default()
    });
    if let Err(e) = ctx.api.patch_worker(view.id, &patch, None).await {
        debug!(error = %e, "cannot record the stop on the session");
    }
}

fn stop_cause(reason: StopReason) -> Option<StopCause> {
    Some(match reason {
        StopReason::Paused => StopCause::Paused,
        StopReason::Finished => StopCause::Finished,
        StopReason::Unmanaged => StopCause::Unmanaged,
        StopReason::Stale => StopCause::Stale,
        StopReason::Idle => StopCause::Idle,
        StopReason::Done => return None,
    })
}

/// The session is gone: a worker it had is unmanaged now, and once no
/// worker holds its workspace that goes too (a deleted session never resumes).
async fn on_deleted<B: Backend>(ctx: &Context<B>, id: Uuid) -> Next {
    ctx.remember(id, false);
    let observed = ctx.backend.observe(id);
    match reconcile::decide_deleted(&observed) {
        // Its exit wakes this session again.
        Action::Stop(reason) => ctx.backend.stop(id, reason),
        Action::Forget => forget_exited(ctx, id, &observed),
        _ => {}
    }
    if ctx.backend.observe(id).worker == reconcile::WorkerState::None {
        ctx.backend.discard(id).await;
    }
    Next::Done
}

/// Claim `generation` on the session, then start its worker and record it
/// (or record why it could not start).
async fn start_worker<B: Backend>(
    ctx: &Context<B>,
    session: &Session,
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
        // Show it: `?worker_state=starting` lists the sessions waiting for a slot.
        if WorkerRecord::of(&session.runtime_metadata).state != Some(WorkerState::Starting) {
            let patch = WorkerPatch::new(WorkerRecord {
                state: Some(WorkerState::Starting),
                ..WorkerRecord::default()
            });
            ctx.api.patch_worker(id, &patch, Some(view.version)).await?;
        }
        return Ok(Next::Done);
    };
    // Follow the request that asked for this worker: in the logs of
    // everything below, and in the events of the runner's reports.
    let request_id = ctx.api.cause_of(id, view.version).await;
    if let Some(r) = &request_id {
        tracing::Span::current().record("request_id", r.as_str());
    }
    let api = ctx.api.for_request(request_id);
    // Inputs waiting for the resumed worker are its first messages.
    // A session that ran before resumes from the service's copy of its
    // transcript wherever this backend's is missing or behind it (a lost
    // workspace or claim, another host, a stay on the other backend).
    let ran_before = view.generation > 0 || session.parent_session_id.is_some();
    let restore = if ran_before {
        let bytes = ctx.api.transcript(id).await?;
        (!bytes.is_empty()).then(|| std::sync::Arc::new(bytes))
    } else {
        None
    };
    let launch = match launch {
        Launch::New if restore.is_some() => Launch::Resume {
            prompt: Some(
                view.resume_prompt
                    .clone()
                    .unwrap_or_else(|| super::claude::DEFAULT_RESUME_PROMPT.to_owned()),
            ),
        },
        other => other,
    };
    let waiting = ctx
        .api
        .inputs(id, view.input_seq)
        .await?
        .iter()
        .any(|i| i.kind == InputKind::Message);
    let launch = match launch {
        Launch::Resume { prompt: Some(_) } if waiting => Launch::Resume { prompt: None },
        other => other,
    };
    let first = launch
        .first_message(&spec)
        .map(|text| FirstMessage::new(id, generation, text.to_owned()));
    let record = WorkerRecord::of(&session.runtime_metadata);
    info!(generation, launch = launch.as_str(), "starting worker");
    // Claim the generation first: of two runners racing, one wins the
    // If-Match and the other re-reads and sees it taken.
    let claim = WorkerPatch::new(WorkerRecord {
        generation: Some(generation),
        launch: Some(launch.kind()),
        state: Some(WorkerState::Starting),
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
        first,
        before: spend_of(&record),
        restore,
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

/// What the session's workers spent so far, as recorded.
fn spend_of(r: &WorkerRecord) -> Spend {
    Spend::new(
        r.turns.unwrap_or(0),
        r.input_tokens.unwrap_or(0),
        r.output_tokens.unwrap_or(0),
        r.cost_micro_usd
            .unwrap_or_else(|| (r.cost_usd.unwrap_or(0.0) * 1_000_000.0).round().max(0.0) as u64),
    )
}

/// Count a worker's end by outcome, and the spend it added.
fn record_exit(backend: &'static str, exit: &WorkerExit, cost_before: f64) {
    let outcome = match &exit.outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Stopped => "stopped",
        Outcome::IdledOut => "idle",
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
    metrics::gauge!(crate::metrics::names::RUNNER_COST_USD, "backend" => backend)
        .increment((exit.spend.cost_usd() - cost_before).max(0.0));
}

/// The patch recording an ended worker: its exit, what the session's
/// workers spent (the driver's totals: earlier workers plus this one, each
/// turn priced once), the last input it took, and the status it leaves the
/// session in.
pub fn report_patch(before: &WorkerRecord, exit: &WorkerExit, status: ReportStatus) -> WorkerPatch {
    let budget = matches!(exit.outcome, Outcome::BudgetReached { .. });
    let idle = status == ReportStatus::PausedIdle;
    let spend = exit.spend;
    let worker = WorkerRecord {
        pid: exit.pid,
        started_at: Some(exit.started_at),
        stopped_at: Some(exit.stopped_at),
        exit_code: exit.exit.code,
        signal: exit.exit.signal,
        crash_reason: exit.outcome.crash_reason(),
        last_error: exit.outcome.detail().map(str::to_owned),
        turns: Some(spend.turns.max(before.turns.unwrap_or(0))),
        input_tokens: Some(spend.input_tokens.max(before.input_tokens.unwrap_or(0))),
        output_tokens: Some(spend.output_tokens.max(before.output_tokens.unwrap_or(0))),
        cost_micro_usd: Some(spend.cost_micro_usd.max(before.cost_micro_usd.unwrap_or(0))),
        cost_usd: Some(spend.cost_usd().max(before.cost_usd.unwrap_or(0.0))),
        input_seq: Some(exit.input_seq.max(before.input_seq.unwrap_or(0))),
        state: Some(WorkerState::Exited),
        claude_session_id: exit.summary.claude_session_id.clone(),
        model: exit.summary.model.clone(),
        paused_reason: if budget {
            Some(PausedReason::Budget)
        } else if idle {
            Some(PausedReason::Idle)
        } else {
            None
        },
        stop_reason: idle.then_some(StopCause::Idle),
        stopped_by: idle.then(|| "runner".to_owned()),
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
        ReportStatus::Paused | ReportStatus::PausedIdle => patch.status(SessionStatus::Paused),
    }
}
