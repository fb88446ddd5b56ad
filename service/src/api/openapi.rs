//! The OpenAPI 3.1 document. Served at `/openapi.json`, browsable at
//! `/docs`, printed by `agent-sessions openapi`, and checked in as
//! `openapi/openapi.json` (a test fails when the two drift).

use utoipa::OpenApi;

use super::{events, health, messages, sessions, stream};
use crate::contract::{EventEnvelope, FieldProblem, NewSession, Problem, Session, SessionUpdate};
use crate::domain::worker::{CrashReason, PermissionMode, Resources, RestartPolicy};
use crate::domain::{EventKind, EventMetadata, RuntimeBackend, SessionStatus, Usage, WorkerSpec};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agent-sessions",
        description = "Agent sessions with an event log: every change to a session appends one event, published on Redis channel `events:session` and readable from `/events`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::update, sessions::delete,
        messages::append, messages::list,
        events::session_events, events::feed, stream::events_stream,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(
        Session, NewSession, SessionUpdate, SessionStatus, RuntimeBackend, WorkerSpec,
        PermissionMode, Resources, RestartPolicy, CrashReason, EventEnvelope, EventKind,
        EventMetadata, Problem, FieldProblem, Usage, messages::Message, health::Health, health::Checks,
    )),
    tags(
        (name = "sessions", description = "Session records"),
        (name = "events", description = "The event log"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// The document as served and checked in: pretty JSON with a final newline.
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}
