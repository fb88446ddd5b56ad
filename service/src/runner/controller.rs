//! Carrying out the decisions: a work queue of session ids (one reconcile
//! per session at a time, repeated if it was woken meanwhile), and the
//! reconcile itself: read the session over HTTP, observe the backend, ask
//! `reconcile::decide`, act, report through PATCH.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::api::{ApiClient, ApiError};
use super::backend::{Backend, StartRequest, WorkerExit};
use super::reconcile::{self, Action, ReportStatus, SessionView};
use crate::contract::{Session, format_time};

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
}

impl<B: Backend> Context<B> {
    pub fn new(
        api: ApiClient,
        backend: B,
        max_workers: usize,
        wake: mpsc::UnboundedSender<Uuid>,
    ) -> Self {
        Self {
            api,
            backend,
            max_workers,
            waiting: Mutex::new(VecDeque::new()),
            starting: Mutex::new(0),
            known: Mutex::new(HashSet::new()),
            wake,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

async fn step<B: Backend>(ctx: &Context<B>, id: Uuid) -> Result<Next, ApiError> {
    let session = ctx.api.session(id).await?;
    let Some(session) = session else {
        // Deleted: a worker it had is unmanaged now.
        ctx.remember(id, false);
        let observed = ctx.backend.observe(id);
        return Ok(match reconcile::decide_deleted(&observed) {
            Action::Stop(reason) => {
                ctx.backend.stop(id, reason);
                Next::Done
            }
            Action::Forget => {
                forget_exited(ctx, id, &observed);
                Next::Done
            }
            _ => Next::Done,
        });
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
        Action::Start { generation, launch } => {
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
            // Claim the generation first: of two runners racing, one wins
            // the If-Match and the other re-reads and sees it taken.
            let claim = json!({"runtime_metadata": {"worker": {
                "generation": generation,
                "pid": null, "started_at": null, "stopped_at": null, "exit_code": null,
                "signal": null, "crash_reason": null, "last_error": null,
                "launch": launch.as_str(),
            }}});
            api.merge_patch(id, &claim, Some(view.version)).await?;
            let launch_kind = launch.as_str();
            let req = StartRequest {
                session_id: id,
                generation,
                spec: spec.clone(),
                launch,
            };
            match ctx.backend.start(req).await {
                Ok(started) => {
                    let patch = json!({"runtime_metadata": {"worker": {
                        "pid": started.pid,
                        "pod": started.pod,
                        "started_at": format_time(&started.started_at),
                        "claude_session_id": id.to_string(),
                        "model": spec.model,
                    }}});
                    metrics::counter!("runner_worker_starts_total", "backend" => ctx.backend.kind().as_str(), "launch" => launch_kind).increment(1);
                    api.merge_patch(id, &patch, None).await?;
                    Ok(Next::Done)
                }
                Err(e) => {
                    warn!(error = %e, "cannot start the worker");
                    metrics::counter!("runner_worker_start_failures_total", "backend" => ctx.backend.kind().as_str()).increment(1);
                    let patch = json!({
                        "status": "crashed",
                        "runtime_metadata": {"worker": {
                            "stopped_at": format_time(&Utc::now()),
                            "crash_reason": "exit_code",
                            "last_error": format!("cannot start the worker: {e}"),
                        }}
                    });
                    ctx.api.merge_patch(id, &patch, None).await?;
                    Ok(Next::Done)
                }
            }
        }
        Action::Report { generation, status } => {
            let Some(exit) = ctx.backend.exit_of(id, generation) else {
                return Ok(Next::Done);
            };
            let patch = report_patch(&session, &exit, status);
            info!(?status, outcome = ?exit.outcome, "reporting the worker's end");
            record_exit(ctx.backend.kind().as_str(), &exit, view.cost_usd);
            match ctx.api.merge_patch(id, &patch, Some(view.version)).await {
                Ok(_) => {}
                Err(ApiError::Conflict(detail)) => {
                    // The status moved where ours cannot follow: record the worker only.
                    debug!(%detail, "status change refused; recording the worker only");
                    let patch = report_patch(&session, &exit, ReportStatus::Unchanged);
                    ctx.api.merge_patch(id, &patch, None).await?;
                }
                Err(e) => return Err(e),
            }
            ctx.backend.forget(id, generation);
            ctx.release_waiting();
            Ok(Next::Retry)
        }
        Action::Recover => {
            metrics::counter!("runner_worker_restarts_total", "backend" => ctx.backend.kind().as_str()).increment(1);
            info!(
                restarts = view.restarts + 1,
                "restart policy: recovering the crashed session"
            );
            let patch = json!({
                "status": "active",
                "runtime_metadata": {"worker": {"restarts": view.restarts + 1}},
            });
            ctx.api.merge_patch(id, &patch, Some(view.version)).await?;
            Ok(Next::Retry)
        }
        Action::PauseForBudget => {
            info!(cost_usd = view.cost_usd, "max_budget_usd reached: pausing");
            let patch = json!({
                "status": "paused",
                "runtime_metadata": {"worker": {"paused_reason": "budget"}},
            });
            ctx.api.merge_patch(id, &patch, Some(view.version)).await?;
            Ok(Next::Done)
        }
    }
}

fn forget_exited<B: Backend>(ctx: &Context<B>, id: Uuid, observed: &reconcile::Observed) {
    if let reconcile::WorkerState::Exited { generation, .. } = observed.worker {
        ctx.backend.forget(id, generation);
        ctx.release_waiting();
    }
}

fn prev_u64(rec: Option<&Map<String, Value>>, key: &str) -> u64 {
    rec.and_then(|r| r.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The merge patch recording an ended worker: its exit, what it spent, and
/// the status it leaves the session in. Turns and tokens add up over the
/// session's workers; cost is Claude Code's own running total, which it
/// carries across `--resume`.
/// Count a worker's end by outcome, and the spend it added.
fn record_exit(backend: &'static str, exit: &WorkerExit, cost_before: f64) {
    use super::claude::Outcome;
    let outcome = match &exit.outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Stopped => "stopped",
        Outcome::BudgetReached { .. } => "budget",
        Outcome::Failed { .. } => "crashed",
    };
    metrics::counter!("runner_worker_exits_total", "backend" => backend, "outcome" => outcome)
        .increment(1);
    if let Outcome::Failed { reason, .. } = &exit.outcome {
        let reason = serde_json::to_value(reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        metrics::counter!("runner_worker_crashes_total", "backend" => backend, "reason" => reason)
            .increment(1);
    }
    if let Some(total) = exit.summary.result.as_ref().and_then(|r| r.total_cost_usd) {
        metrics::gauge!("runner_cost_usd_total", "backend" => backend)
            .increment((total - cost_before).max(0.0));
    }
}

pub fn report_patch(session: &Session, exit: &WorkerExit, status: ReportStatus) -> Value {
    let rec = reconcile::worker_record(&session.runtime_metadata);
    let run = exit.summary.result.clone().unwrap_or_default();
    let prev_cost = rec
        .and_then(|r| r.get("cost_usd"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let cost = run.total_cost_usd.map_or(prev_cost, |c| c.max(prev_cost));
    let mut worker = json!({
        "pid": exit.pid,
        "started_at": format_time(&exit.started_at),
        "stopped_at": format_time(&exit.stopped_at),
        "exit_code": exit.exit.code,
        "signal": exit.exit.signal,
        "crash_reason": exit.outcome.crash_reason(),
        "last_error": exit.outcome.detail(),
        "turns": prev_u64(rec, "turns") + run.num_turns,
        "input_tokens": prev_u64(rec, "input_tokens") + run.input_tokens,
        "output_tokens": prev_u64(rec, "output_tokens") + run.output_tokens,
        "cost_usd": cost,
    });
    if let Some(obj) = worker.as_object_mut() {
        if let Some(sid) = &exit.summary.claude_session_id {
            obj.insert("claude_session_id".into(), json!(sid));
        }
        if let Some(model) = &exit.summary.model {
            obj.insert("model".into(), json!(model));
        }
        if matches!(exit.outcome, super::claude::Outcome::BudgetReached { .. }) {
            obj.insert("paused_reason".into(), json!("budget"));
        }
    }
    let mut patch = json!({"runtime_metadata": {"worker": worker}});
    let status = match status {
        ReportStatus::Unchanged => None,
        ReportStatus::Completed => Some("completed"),
        ReportStatus::Crashed => Some("crashed"),
        ReportStatus::Paused => Some("paused"),
    };
    if let (Some(s), Some(obj)) = (status, patch.as_object_mut()) {
        obj.insert("status".into(), json!(s));
    }
    patch
}
