//! The HTTP edge: routes, extractors, problem+json. Handlers stay thin:
//! they parse into domain commands, call the store and shape the response.

pub mod analytics;
pub mod auth;
pub mod body;
pub mod error;
pub mod events;
pub mod health;
pub mod live;
pub mod messages;
pub mod middleware;
pub mod openapi;
pub mod params;
pub mod portable;
pub mod sessions;
pub mod stream;

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use tokio::sync::Notify;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::bus::{Bus, Hints};
use crate::monitor::FeedWatch;
use crate::relay::FeedSignal;
use crate::store::{Appended, Store};
use error::ApiError;
use params::PageSizes;
use tokio_util::sync::CancellationToken;

/// What every handler can reach.
pub struct AppState {
    pub store: Store,
    pub bus: Arc<Bus>,
    /// Bumped when the log may have grown; SSE streams wait on it.
    pub feed: FeedSignal,
    /// Cancelled on shutdown, ending long-lived streams.
    pub shutdown: CancellationToken,
    pub sse_heartbeat: std::time::Duration,
    pub pages: PageSizes,
    /// Longest a long-poll of the feed is held (`api.max_wait_secs`).
    pub max_wait: std::time::Duration,
    /// Largest input text accepted (`api.max_input_bytes`).
    pub max_input_bytes: usize,
    /// Largest transcript kept per session (`api.max_transcript_bytes`).
    pub max_transcript_bytes: usize,
    /// Largest import document (`api.max_import_bytes`).
    pub max_import_bytes: usize,
    /// What follows a commit (also the retention sweep's).
    pub commits: CommitEffects,
    /// The feed's horizon as last measured, for `/readyz`.
    pub feed_watch: FeedWatch,
    /// How long an idempotency key is honoured
    /// (`retention.idempotency_key_ttl_secs`).
    pub idempotency_ttl: std::time::Duration,
    /// Sessions per statement of a bulk delete (`retention.batch_size`).
    pub delete_batch: u64,
}

impl AppState {
    /// See [`CommitEffects::after_commit`].
    pub fn after_commit(&self, appended: Option<&Appended>) {
        self.commits.after_commit(appended);
    }
}

/// What follows every committed write, in one place: count the event, wake
/// the relay and the long-polls, publish the hint.
#[derive(Clone)]
pub struct CommitEffects {
    /// Wakes the relay after a commit, so publishing does not wait for a poll.
    relay_wake: Arc<Notify>,
    /// Best-effort wake-up hints on Redis, sent right after a commit.
    hints: Hints,
}

impl CommitEffects {
    pub fn new(relay_wake: Arc<Notify>, hints: Hints) -> Self {
        Self { relay_wake, hints }
    }

    /// A write that appended nothing does none of it.
    pub fn after_commit(&self, appended: Option<&Appended>) {
        let Some(a) = appended else { return };
        crate::metrics::event_appended(a.kind.as_str());
        self.relay_wake.notify_one();
        self.hints.send(a.hint.clone());
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {}", req.path())))
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.path()
    )))
}

/// Register every route. Trailing slashes are optional everywhere.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let not_allowed = || web::to(method_not_allowed);
    cfg.service(
        web::resource(["/sessions", "/sessions/"])
            .route(web::post().to(sessions::create))
            .route(web::get().to(sessions::list))
            .route(web::delete().to(sessions::delete_many))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/import", "/sessions/import/"])
            .route(web::post().to(portable::import))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}", "/sessions/{id}/"])
            .route(web::get().to(sessions::get))
            .route(web::patch().to(sessions::update))
            .route(web::delete().to(sessions::delete))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/events", "/sessions/{id}/events/"])
            .route(web::get().to(events::session_events))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/metrics", "/sessions/{id}/metrics/"])
            .route(web::get().to(analytics::session_metrics))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/analytics", "/analytics/"])
            .route(web::get().to(analytics::analytics))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/messages", "/sessions/{id}/messages/"])
            .route(web::post().to(messages::append))
            .route(web::get().to(messages::list))
            .default_service(not_allowed()),
    )
    .service(
        web::resource([
            "/sessions/{id}/messages/stream",
            "/sessions/{id}/messages/stream/",
        ])
        .route(web::get().to(stream::messages_stream))
        .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/transcript", "/sessions/{id}/transcript/"])
            .route(web::put().to(portable::put_transcript))
            .route(web::get().to(portable::get_transcript))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/fork", "/sessions/{id}/fork/"])
            .route(web::post().to(portable::fork))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/export", "/sessions/{id}/export/"])
            .route(web::get().to(portable::export))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/input", "/sessions/{id}/input/"])
            .route(web::post().to(live::input))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/interrupt", "/sessions/{id}/interrupt/"])
            .route(web::post().to(live::interrupt))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/inputs", "/sessions/{id}/inputs/"])
            .route(web::get().to(live::inputs))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/sessions/{id}/approvals", "/sessions/{id}/approvals/"])
            .route(web::post().to(live::request_approval))
            .route(web::get().to(live::approvals))
            .default_service(not_allowed()),
    )
    .service(
        web::resource([
            "/sessions/{id}/approvals/{request_id}",
            "/sessions/{id}/approvals/{request_id}/",
        ])
        .route(web::get().to(live::approval))
        .route(web::post().to(live::decide))
        .default_service(not_allowed()),
    )
    .service(
        web::resource(["/events/stream", "/events/stream/"])
            .route(web::get().to(stream::events_stream))
            .default_service(not_allowed()),
    )
    .service(
        web::resource(["/events", "/events/"])
            .route(web::get().to(events::feed))
            .default_service(not_allowed()),
    )
    .service(web::resource(["/healthz", "/healthz/"]).route(web::get().to(health::healthz)))
    .service(web::resource(["/readyz", "/readyz/"]).route(web::get().to(health::readyz)))
    .service(web::resource(["/metrics", "/metrics/"]).route(web::get().to(health::metrics)))
    .service(web::resource("/docs").route(web::get().to(|| async {
        HttpResponse::PermanentRedirect()
            .insert_header((actix_web::http::header::LOCATION, "/docs/"))
            .finish()
    })))
    .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi::ApiDoc::openapi()))
    .default_service(web::to(not_found));
}
