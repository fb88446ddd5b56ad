//! Wire types: what the API serves and what its clients (the runner among
//! them) read. Kept apart from `api/` so a client never imports the server.

mod event;
mod hint;
mod problem;
mod session;
mod worker;

pub use event::EventEnvelope;
pub use hint::{WakeHint, hint_channel};
pub use problem::{FieldProblem, Problem};
pub use session::{NewSession, Session, SessionUpdate, format_time};
pub use worker::{PausedReason, PodPhase, WorkerField, WorkerLaunch, WorkerPatch, WorkerRecord};
