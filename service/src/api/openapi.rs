//! The OpenAPI 3.1 document. Served at `/openapi.json`, browsable at
//! `/docs`, printed by `agent-sessions openapi`, and checked in as
//! `openapi/openapi.json` (a test fails when the two drift).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{analytics, events, health, live, messages, portable, sessions, stream};
use crate::contract::live::{
    Approval, ApprovalAnswer, ApprovalDecidedPayload, ApprovalRequest, ApprovalStatus,
    DecisionReason, DecisionRequest, Input, InputAccepted, InputKind, InputReceivedPayload,
    InputRequest, InterruptedPayload,
};
use crate::contract::metrics::{
    Analytics, AnalyticsGroup, GroupBy, SessionMetrics, StatusCounts, TimeInStatus,
};
use crate::contract::portable::{
    ExportedMessage, ForkRequest, ForkedFrom, ForkedPayload, ImportMarker, SessionExport,
    TranscriptChunk, TranscriptWritten,
};
use crate::contract::{
    CrashReason, EventEnvelope, EventKind, EventMetadata, FieldProblem, NewSession, PausedReason,
    PermissionMode, PodPhase, Problem, Resources, RestartPolicy, RuntimeBackend, Session,
    SessionMergePatch, SessionStatus, SessionUpdate, Usage, WorkerLaunch, WorkerRecord, WorkerSpec,
    WorkerState,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agent-sessions",
        description = "Agent sessions with an event log: every change to a session appends one event, published on Redis channel `events:session` and readable from `/events`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        sessions::create, sessions::list, sessions::delete_many, sessions::get, sessions::update, sessions::delete,
        analytics::session_metrics, analytics::analytics,
        messages::append, messages::list, stream::messages_stream,
        live::input, live::interrupt, live::inputs,
        live::request_approval, live::approvals, live::approval, live::decide,
        portable::put_transcript, portable::get_transcript, portable::fork,
        portable::export, portable::import,
        events::session_events, events::feed, stream::events_stream,
        health::healthz, health::readyz, health::metrics,
    ),
    components(schemas(
        Session, NewSession, SessionUpdate, SessionMergePatch, SessionStatus, RuntimeBackend, WorkerSpec,
        PermissionMode, Resources, RestartPolicy, CrashReason, EventEnvelope, EventKind,
        EventMetadata, Problem, FieldProblem, Usage, messages::Message, sessions::BulkDeleteResult, health::Health, health::Checks, crate::monitor::FeedHealth,
        WorkerRecord, WorkerLaunch, PodPhase, PausedReason, WorkerState,
        InputRequest, InputKind, Input, InputAccepted, ApprovalRequest, DecisionRequest,
        DecisionReason, ApprovalStatus, Approval, ApprovalAnswer,
        InputReceivedPayload, InterruptedPayload, ApprovalDecidedPayload,
        ForkedFrom, ForkRequest, ForkedPayload, ImportMarker, TranscriptWritten, SessionExport,
        ExportedMessage, TranscriptChunk,
        SessionMetrics, TimeInStatus, Analytics, AnalyticsGroup, GroupBy, StatusCounts,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "Session records"),
        (name = "live", description = "Live sessions: input, interrupt, tool approvals"),
        (name = "portable", description = "Portable sessions: transcript, fork, export and import"),
        (name = "events", description = "The event log"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// Bearer authentication on every operation but the open ones, each
/// documenting its 401, 403 and 429 answers.
struct BearerAuth;

const OPEN: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::builder().scheme(HttpAuthScheme::Bearer).description(Some(
                "A static API token or a JWT (HS256, RS256 or ES256) with scopes sessions:read, sessions:write, events:read and, for the runner, sessions:run",
            )).build()),
        );
        let problem = |d: &str| {
            ResponseBuilder::new()
                .description(d)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let open = OPEN.contains(&path.as_str());
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ]
            .into_iter()
            .flatten()
            {
                if open {
                    op.security = Some(vec![SecurityRequirement::default()]);
                    continue;
                }
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
                op.responses
                    .responses
                    .insert("401".into(), problem("Missing or invalid token").into());
                op.responses
                    .responses
                    .insert("403".into(), problem("The token lacks the scope").into());
                op.responses.responses.insert(
                    "429".into(),
                    problem("Rate limit for this token exceeded").into(),
                );
            }
        }
    }
}

/// The document as served and checked in: pretty JSON with a final newline.
pub fn document() -> Result<String, serde_json::Error> {
    let mut s = ApiDoc::openapi().to_pretty_json()?;
    s.push('\n');
    Ok(s)
}
