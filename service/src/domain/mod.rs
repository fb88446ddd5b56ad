//! The domain: sessions, their state machine and the events they produce.
//!
//! Nothing here knows about HTTP, SQL or Redis. A change is computed as a pure
//! function of the current state and a command, and the same `apply` that the
//! write path uses rebuilds state during replay, so the projection and the log
//! cannot disagree about what an event means.

pub mod event;
pub mod json;
pub mod metrics;
pub mod session;
pub mod transcript;
pub mod usage;
pub mod worker;

pub use event::{EventKind, EventMetadata};
pub use session::{
    CreateSession, DomainError, ForkedFrom, PatchMode, RuntimeBackend, SessionChanges,
    SessionPatch, SessionState, SessionStatus,
};
pub use usage::Usage;
pub use worker::WorkerSpec;
