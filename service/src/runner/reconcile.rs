//! The runner's decision, as a pure function: from what the session asks for
//! and what worker the backend actually has, the one action to take now
//! (the runner's table of session status against worker). Level-triggered: calling it again after the action
//! took effect yields `Nothing`, so duplicate wake-ups are harmless.
//!
//! No I/O here; `controller` fetches the inputs and carries the action out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::claude::{DEFAULT_RESUME_PROMPT, Launch, Outcome};
use super::driver::Activity;
use crate::contract::{PausedReason, Session, WorkerRecord};
use crate::domain::worker::{CrashReason, RestartPolicy};
use crate::domain::{RuntimeBackend, SessionStatus, WorkerSpec};

/// The part of a session the decision reads, with `runtime_metadata.worker`
/// (the runner's own record) parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionView {
    pub id: Uuid,
    pub status: SessionStatus,
    /// The spec, when the session is one this backend manages.
    pub managed: Option<WorkerSpec>,
    /// Generation of the last worker claimed for the session (0: never).
    pub generation: u64,
    /// Restarts done by the restart policy so far.
    pub restarts: u32,
    pub crash_reason: Option<CrashReason>,
    /// When the last worker stopped, as reported.
    pub stopped_at: Option<DateTime<Utc>>,
    /// Spend so far, as reported.
    pub cost_usd: f64,
    /// The checkpoint's `resume_prompt` (or the seed's `recovery_prompt`).
    pub resume_prompt: Option<String>,
    /// Why the runner paused the session, when it did.
    pub paused_reason: Option<PausedReason>,
    /// The last input a worker took.
    pub input_seq: i64,
    /// The session's version (its ETag), for `If-Match`.
    pub version: i64,
}

impl SessionView {
    /// Read a session; `backend` is the runtime backend this runner serves.
    pub fn new(s: &Session, backend: RuntimeBackend) -> Self {
        let rec = WorkerRecord::of(&s.runtime_metadata);
        Self {
            id: s.id,
            status: s.status.into(),
            managed: s
                .worker
                .clone()
                .map(WorkerSpec::from)
                .filter(|_| RuntimeBackend::from(s.runtime_backend) == backend),
            generation: rec.generation.unwrap_or(0),
            restarts: rec.restarts.unwrap_or(0),
            crash_reason: rec.crash_reason,
            stopped_at: rec.stopped_at,
            cost_usd: rec
                .cost_micro_usd
                .map_or(rec.cost_usd.unwrap_or(0.0), |m| m as f64 / 1_000_000.0),
            resume_prompt: ["resume_prompt", "recovery_prompt"].iter().find_map(|k| {
                s.checkpoint
                    .as_ref()
                    .and_then(|c| c.get(*k))
                    .and_then(Value::as_str)
                    .filter(|p| !p.trim().is_empty())
                    .map(str::to_owned)
            }),
            paused_reason: rec.paused_reason,
            input_seq: rec.input_seq.unwrap_or(0),
            version: s.version,
        }
    }
}

/// The worker the backend has for a session.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerState {
    None,
    Running {
        generation: u64,
        /// A stop is under way.
        stopping: bool,
        /// What its driver says it is doing.
        activity: Activity,
    },
    /// Ended; `Report` has not yet recorded it on the session.
    Exited {
        generation: u64,
        outcome: Outcome,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub worker: WorkerState,
    /// The session's transcript exists, so the CLI can `--resume` it.
    pub has_transcript: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A `task` worker answered and nothing waits for it: the session is done.
    Done,
    /// A `conversation` worker idled past `idle_timeout_seconds`.
    Idle,
    Paused,
    /// The session is completed or crashed by someone else.
    Finished,
    /// An older generation than the session records: never two writers.
    Stale,
    /// The session is gone, lost its worker spec or moved to another backend.
    Unmanaged,
}

/// The status a report moves the session to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportStatus {
    /// Only the worker record changes.
    Unchanged,
    Completed,
    Crashed,
    Paused,
    /// Paused with reason `idle`.
    PausedIdle,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Nothing,
    /// Claim generation `generation` and start a worker.
    Start {
        generation: u64,
        launch: Launch,
    },
    Stop(StopReason),
    /// Record the ended worker on the session, moving its status.
    Report {
        generation: u64,
        status: ReportStatus,
    },
    /// The ended worker is older than the session's record: drop it quietly.
    Forget,
    /// Restart policy: move the crashed session back to active.
    Recover,
    /// The spend reached `max_budget_usd`: pause instead of starting.
    PauseForBudget,
    /// Look again after this long (backoff not yet elapsed).
    RequeueAfter(Duration),
    /// Let the live worker's driver deliver the inputs it has not had,
    /// and look again after `recheck` if set (an idle timeout to come).
    Deliver {
        recheck: Option<Duration>,
    },
    /// A `task` worker is idle: end it if no input waits, else deliver.
    FinishTask,
    /// Paused for idling: resume if an input waits.
    ResumeOnInput,
}

/// The table of session status against worker, plus the generation rule
/// and the restart policy.
pub fn decide(s: &SessionView, o: &Observed, now: DateTime<Utc>) -> Action {
    let Some(spec) = &s.managed else {
        return match o.worker {
            WorkerState::Running {
                stopping: false, ..
            } => Action::Stop(StopReason::Unmanaged),
            WorkerState::Exited { .. } => Action::Forget,
            _ => Action::Nothing,
        };
    };
    match &o.worker {
        WorkerState::Running {
            generation,
            stopping,
            activity,
        } => {
            if *stopping {
                Action::Nothing
            } else if *generation < s.generation {
                Action::Stop(StopReason::Stale)
            } else {
                match s.status {
                    SessionStatus::Active => live(s, spec, *activity),
                    SessionStatus::Paused => Action::Stop(StopReason::Paused),
                    SessionStatus::Completed | SessionStatus::Crashed => {
                        Action::Stop(StopReason::Finished)
                    }
                }
            }
        }
        WorkerState::Exited {
            generation,
            outcome,
        } => {
            // Older than the record, or already reported by an earlier runner.
            if *generation < s.generation || (*generation == s.generation && s.stopped_at.is_some())
            {
                return Action::Forget;
            }
            let status = match (s.status, outcome) {
                (SessionStatus::Active, Outcome::Succeeded) => ReportStatus::Completed,
                (SessionStatus::Active, Outcome::Failed { .. }) => ReportStatus::Crashed,
                (SessionStatus::Active, Outcome::BudgetReached { .. }) => ReportStatus::Paused,
                (SessionStatus::Active, Outcome::IdledOut) => ReportStatus::PausedIdle,
                // Stopped by us, or the session moved on meanwhile.
                _ => ReportStatus::Unchanged,
            };
            Action::Report {
                generation: *generation,
                status,
            }
        }
        WorkerState::None => match s.status {
            SessionStatus::Active => {
                if spec.max_budget_usd.is_some_and(|b| s.cost_usd >= b) {
                    return Action::PauseForBudget;
                }
                let launch = if o.has_transcript {
                    Launch::Resume {
                        prompt: Some(
                            s.resume_prompt
                                .clone()
                                .unwrap_or_else(|| DEFAULT_RESUME_PROMPT.to_owned()),
                        ),
                    }
                } else {
                    Launch::New
                };
                Action::Start {
                    generation: s.generation + 1,
                    launch,
                }
            }
            SessionStatus::Crashed => recover(s, spec.restart_policy.as_ref(), now),
            SessionStatus::Paused if s.paused_reason == Some(PausedReason::Idle) => {
                Action::ResumeOnInput
            }
            SessionStatus::Paused | SessionStatus::Completed => Action::Nothing,
        },
    }
}

/// An active session's live worker: the budget, the end of a task, the
/// idle timeout of a conversation; otherwise deliver what waits.
fn live(s: &SessionView, spec: &WorkerSpec, activity: Activity) -> Action {
    if spec.max_budget_usd.is_some_and(|b| s.cost_usd >= b) {
        return Action::PauseForBudget;
    }
    let Activity::Idle { since, .. } = activity else {
        return Action::Deliver { recheck: None };
    };
    if spec.mode.is_task() {
        return Action::FinishTask;
    }
    match spec
        .idle_timeout_seconds
        .map(|t| Duration::from_secs(u64::from(t)))
    {
        Some(limit) => {
            let idle = since.elapsed();
            if idle >= limit {
                Action::Stop(StopReason::Idle)
            } else {
                Action::Deliver {
                    recheck: Some(limit - idle),
                }
            }
        }
        None => Action::Deliver { recheck: None },
    }
}

/// The session is gone: a worker it had is no one's now.
pub fn decide_deleted(o: &Observed) -> Action {
    match o.worker {
        WorkerState::Running {
            stopping: false, ..
        } => Action::Stop(StopReason::Unmanaged),
        WorkerState::Exited { .. } => Action::Forget,
        _ => Action::Nothing,
    }
}

fn recover(s: &SessionView, policy: Option<&RestartPolicy>, now: DateTime<Utc>) -> Action {
    let (Some(policy), Some(reason)) = (policy, s.crash_reason) else {
        return Action::Nothing;
    };
    if !policy.allows(reason, s.restarts) {
        return Action::Nothing;
    }
    let since = s
        .stopped_at
        .map_or(Duration::MAX, |t| (now - t).to_std().unwrap_or_default());
    let wait = policy.backoff(s.restarts);
    if since >= wait {
        Action::Recover
    } else {
        Action::RequeueAfter(wait - since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(status: SessionStatus) -> SessionView {
        SessionView {
            id: Uuid::nil(),
            status,
            managed: Some(WorkerSpec::from_value(&json!({"prompt": "p"})).unwrap()),
            generation: 0,
            restarts: 0,
            crash_reason: None,
            stopped_at: None,
            cost_usd: 0.0,
            resume_prompt: None,
            paused_reason: None,
            input_seq: 0,
            version: 1,
        }
    }

    fn none(has_transcript: bool) -> Observed {
        Observed {
            worker: WorkerState::None,
            has_transcript,
        }
    }

    fn running(generation: u64) -> Observed {
        Observed {
            worker: WorkerState::Running {
                generation,
                stopping: false,
                activity: Activity::Busy,
            },
            has_transcript: true,
        }
    }

    fn exited(generation: u64, outcome: Outcome) -> Observed {
        Observed {
            worker: WorkerState::Exited {
                generation,
                outcome,
            },
            has_transcript: true,
        }
    }

    #[test]
    fn active_never_started_starts_new() {
        assert_eq!(
            decide(&view(SessionStatus::Active), &none(false), Utc::now()),
            Action::Start {
                generation: 1,
                launch: Launch::New
            }
        );
    }

    #[test]
    fn active_with_a_transcript_resumes_with_the_checkpoint_prompt() {
        let mut v = view(SessionStatus::Active);
        v.generation = 2;
        assert_eq!(
            decide(&v, &none(true), Utc::now()),
            Action::Start {
                generation: 3,
                launch: Launch::Resume {
                    prompt: Some("Continue".into())
                }
            }
        );
        v.resume_prompt = Some("pick up at step 5".into());
        assert!(matches!(
            decide(&v, &none(true), Utc::now()),
            Action::Start { launch: Launch::Resume { prompt }, .. } if prompt.as_deref() == Some("pick up at step 5")
        ));
    }

    #[test]
    fn paused_or_finished_with_a_worker_stops_it() {
        let mut v = view(SessionStatus::Paused);
        v.generation = 1;
        assert_eq!(
            decide(&v, &running(1), Utc::now()),
            Action::Stop(StopReason::Paused)
        );
        v.status = SessionStatus::Completed;
        assert_eq!(
            decide(&v, &running(1), Utc::now()),
            Action::Stop(StopReason::Finished)
        );
        v.status = SessionStatus::Active;
        assert_eq!(
            decide(&v, &running(1), Utc::now()),
            Action::Deliver { recheck: None }
        );
        let stopping = Observed {
            worker: WorkerState::Running {
                generation: 1,
                stopping: true,
                activity: Activity::Busy,
            },
            has_transcript: true,
        };
        v.status = SessionStatus::Paused;
        assert_eq!(decide(&v, &stopping, Utc::now()), Action::Nothing);
    }

    #[test]
    fn an_older_generation_is_stopped_on_sight() {
        let mut v = view(SessionStatus::Active);
        v.generation = 3;
        assert_eq!(
            decide(&v, &running(2), Utc::now()),
            Action::Stop(StopReason::Stale)
        );
        assert_eq!(
            decide(&v, &exited(2, Outcome::Succeeded), Utc::now()),
            Action::Forget
        );
    }

    #[test]
    fn exits_are_reported_with_the_right_status() {
        let mut v = view(SessionStatus::Active);
        v.generation = 1;
        let report = |o, v: &SessionView| decide(v, &exited(1, o), Utc::now());
        assert_eq!(
            report(Outcome::Succeeded, &v),
            Action::Report {
                generation: 1,
                status: ReportStatus::Completed
            }
        );
        let failed = Outcome::Failed {
            reason: CrashReason::ApiError,
            detail: "x".into(),
        };
        assert_eq!(
            report(failed.clone(), &v),
            Action::Report {
                generation: 1,
                status: ReportStatus::Crashed
            }
        );
        assert_eq!(
            report(Outcome::BudgetReached { detail: "b".into() }, &v),
            Action::Report {
                generation: 1,
                status: ReportStatus::Paused
            }
        );
        v.status = SessionStatus::Paused;
        assert_eq!(
            report(Outcome::Stopped, &v),
            Action::Report {
                generation: 1,
                status: ReportStatus::Unchanged
            }
        );
        // Reported already (by this runner before a restart, say).
        v.stopped_at = Some(Utc::now());
        assert_eq!(report(failed, &v), Action::Forget);
    }

    #[test]
    fn crashed_sessions_recover_only_as_the_policy_allows() {
        let mut v = view(SessionStatus::Crashed);
        v.generation = 1;
        v.crash_reason = Some(CrashReason::ApiError);
        let now = Utc::now();
        v.stopped_at = Some(now);
        assert_eq!(decide(&v, &none(true), now), Action::Nothing);
        v.managed.as_mut().unwrap().restart_policy = Some(RestartPolicy {
            max_restarts: 1,
            backoff_ms: 1000,
            on: vec![],
        });
        assert_eq!(
            decide(&v, &none(true), now + chrono::Duration::milliseconds(400)),
            Action::RequeueAfter(Duration::from_millis(600))
        );
        assert_eq!(
            decide(&v, &none(true), now + chrono::Duration::seconds(2)),
            Action::Recover
        );
        v.restarts = 1;
        assert_eq!(
            decide(&v, &none(true), now + chrono::Duration::seconds(9)),
            Action::Nothing
        );
        v.restarts = 0;
        v.crash_reason = Some(CrashReason::Budget);
        assert_eq!(
            decide(&v, &none(true), now + chrono::Duration::seconds(9)),
            Action::Nothing
        );
    }

    #[test]
    fn spent_budget_pauses_instead_of_starting() {
        let mut v = view(SessionStatus::Active);
        v.managed.as_mut().unwrap().max_budget_usd = Some(0.5);
        v.cost_usd = 0.5;
        assert_eq!(decide(&v, &none(true), Utc::now()), Action::PauseForBudget);
    }

    #[test]
    fn sessions_without_a_worker_spec_are_never_touched() {
        let mut v = view(SessionStatus::Active);
        v.managed = None;
        assert_eq!(decide(&v, &none(false), Utc::now()), Action::Nothing);
        assert_eq!(
            decide(&v, &running(1), Utc::now()),
            Action::Stop(StopReason::Unmanaged)
        );
    }

    #[test]
    fn view_reads_the_runner_record() {
        let s: Session = serde_json::from_value(json!({
            "id": Uuid::nil(), "agent_id": Uuid::nil(), "session_type": "task",
            "status": "crashed", "context": {}, "checkpoint": {"resume_prompt": "again"},
            "runtime_backend": "local",
            "runtime_metadata": {"worker": {"generation": 4, "restarts": 1,
                "crash_reason": "api_error", "stopped_at": "2026-11-21T09:00:00Z", "cost_usd": 0.25}},
            "worker": {"prompt": "p"}, "version": 7,
            "created_at": "2026-11-21T09:00:00Z", "updated_at": "2026-11-21T09:00:00Z"
        }))
        .unwrap();
        let v = SessionView::new(&s, RuntimeBackend::Local);
        assert_eq!((v.generation, v.restarts, v.version), (4, 1, 7));
        assert_eq!(v.crash_reason, Some(CrashReason::ApiError));
        assert_eq!(v.resume_prompt.as_deref(), Some("again"));
        assert!(v.stopped_at.is_some() && v.managed.is_some());
        assert!(
            SessionView::new(&s, RuntimeBackend::Kubernetes)
                .managed
                .is_none()
        );
    }
}
