//! Wire types: what the API serves and what its clients (the runner among
//! them) read. Kept apart from `api/` so a client never imports the server.

mod event;
mod hint;
mod problem;
mod session;
mod worker;
mod worker_spec;

pub mod live;
pub mod metrics;
pub mod portable;
pub use event::{EventEnvelope, EventKind, EventMetadata};
pub use hint::{WakeHint, hint_channel};
pub use problem::{FieldProblem, Problem};
pub use session::{
    ListedSession, NewSession, RuntimeBackend, Session, SessionMergePatch, SessionStatus,
    SessionUpdate, Usage, format_time,
};
pub use worker::{
    PausedReason, PodPhase, StopCause, WorkerField, WorkerLaunch, WorkerPatch, WorkerRecord,
    WorkerState,
};
pub use worker_spec::{
    ApprovalDecision, CrashReason, PermissionMode, Resources, RestartPolicy, WorkerMode, WorkerSpec,
};
