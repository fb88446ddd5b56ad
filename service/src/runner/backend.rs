//! Where workers run. The controller only speaks this trait, so the local
//! backend (child processes, `local.rs`) and a Kubernetes backend (pods)
//! differ behind it and nowhere else.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::claude::{ExitInfo, Launch, Outcome, RunSummary};
use super::reconcile::{Observed, StopReason};
use crate::domain::{RuntimeBackend, WorkerSpec};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Workspace(#[from] super::workspace::WorkspaceError),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("session {0} already has a live worker")]
    AlreadyRunning(Uuid),
    #[error(transparent)]
    Kubernetes(#[from] super::kubernetes::KubeError),
}

/// Everything needed to start one worker.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub session_id: Uuid,
    /// Claimed on the session before the start; the worker carries it.
    pub generation: u64,
    pub spec: WorkerSpec,
    pub launch: Launch,
    /// The message written before any input (`None`: the inputs alone).
    pub first: Option<super::driver::FirstMessage>,
    /// What the session's earlier workers spent.
    pub before: super::cost::Spend,
    /// The transcript to write back before a `--resume`, when the backend
    /// has none (the service's copy).
    pub restore: Option<std::sync::Arc<Vec<u8>>>,
}

#[derive(Debug, Clone)]
pub struct Started {
    /// Process id (local) — what `runtime_metadata.worker.pid` shows.
    pub pid: Option<i32>,
    /// Pod name (kubernetes) — `runtime_metadata.worker.pod`.
    pub pod: Option<String>,
    pub started_at: DateTime<Utc>,
}

/// A worker that ended, with what it said on the way.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub generation: u64,
    pub outcome: Outcome,
    pub exit: ExitInfo,
    pub summary: RunSummary,
    /// Everything the session's workers spent, this one included.
    pub spend: super::cost::Spend,
    /// The last input the worker took.
    pub input_seq: i64,
    pub pid: Option<i32>,
    pub started_at: DateTime<Utc>,
    pub stopped_at: DateTime<Utc>,
}

/// Wakes the controller for one session (a worker started, ended, …).
pub type Wake = tokio::sync::mpsc::UnboundedSender<Uuid>;

pub trait Backend: Send + Sync + 'static {
    /// The sessions this backend manages have this `runtime_backend`.
    fn kind(&self) -> RuntimeBackend;

    /// The worker it has for the session right now.
    fn observe(&self, session_id: Uuid) -> Observed;

    /// The ended worker of `generation`, until `forget` drops it.
    fn exit_of(&self, session_id: Uuid, generation: u64) -> Option<WorkerExit>;

    fn start(
        &self,
        req: StartRequest,
    ) -> impl Future<Output = Result<Started, BackendError>> + Send;

    /// Begin a graceful stop; returns at once, the exit wakes the controller.
    fn stop(&self, session_id: Uuid, reason: StopReason);

    /// The live worker's state shared with its driver (to nudge it with
    /// the session's latest view), if there is a live worker.
    fn live(&self, session_id: Uuid) -> Option<std::sync::Arc<super::driver::Live>>;

    /// The exit of `generation` is recorded on the session: let it go.
    fn forget(&self, session_id: Uuid, generation: u64);

    /// Workers alive (those being stopped included).
    fn running(&self) -> usize;

    /// Sessions the backend holds a worker or an unreported exit for.
    fn sessions(&self) -> Vec<Uuid>;

    /// At start-up: find workers left by an earlier runner (after a crash or
    /// `kill -9`) and take them over; returns the sessions to reconcile.
    /// Workspaces of sessions that no longer exist (deleted while no runner
    /// watched, their events maybe purged since) are removed here too.
    fn adopt(&self) -> impl Future<Output = Vec<Uuid>> + Send;

    /// Whether the backend keeps a workspace for the session (a local
    /// directory, a claim).
    fn has_workspace(&self, session_id: Uuid) -> bool;

    /// The session is deleted, so nothing can resume it: remove its
    /// workspace, unless a worker still holds it (its exit comes back here).
    fn discard(&self, session_id: Uuid) -> impl Future<Output = ()> + Send;
}
