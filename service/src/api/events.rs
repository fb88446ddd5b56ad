//! The event log over HTTP: one session's stream and the global feed.

use std::time::{Duration, Instant};

use actix_web::http::header::{self, ContentType};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::AppState;
use super::auth::{Authorized, EventsRead};
use super::error::ApiError;
use super::params::{self, link_next};
use crate::contract::{EventEnvelope, Problem};
use crate::domain::EventKind;
use crate::store::FeedFilter;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Return events with a version above this one (default 0).
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after_version: Option<String>,
    /// Page size (default 20, at most `api.max_page_size`, 500 by default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
}

/// One session's events, by version.
#[utoipa::path(
    get, path = "/sessions/{id}/events", tag = "events", operation_id = "list_session_events",
    params(("id" = Uuid, Path, description = "Session id"), StreamQuery),
    responses(
        (status = 200, description = "Events by version; more in `Link: rel=\"next\"`", body = Vec<EventEnvelope>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session, now or ever", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn session_events(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<EventsRead>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("session {id} not found"));
    let sid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let q: StreamQuery = params::query(&req)?;
    let after = params::non_negative("after_version", &q.after_version)?;
    let limit = params::limit(&q.limit, &state.pages)?;
    let page = state.store.session_events_page(sid, after, limit).await?;
    if page.count == 0 && !state.store.session_exists_in_log(sid).await? {
        return Err(not_found());
    }
    let mut res = HttpResponse::Ok();
    if page.count as u64 == limit
        && let Some((_, version)) = page.last
    {
        let path = format!("/sessions/{sid}/events");
        res.insert_header((
            header::LINK,
            link_next(&req, &path, "after_version", &version.to_string()),
        ));
    }
    Ok(res.content_type(ContentType::json()).body(page.json))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FeedQuery {
    /// Return events with a position above this one (default 0).
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
    /// Page size (default 20, at most `api.max_page_size`, 500 by default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
    /// Only this session's events.
    #[param(value_type = Option<Uuid>)]
    pub session_id: Option<String>,
    /// Only these event types, comma-separated.
    #[param(
        pattern = "^session\\.(created|updated|deleted|input_received|interrupted|approval_requested|approval_decided|forked)(,session\\.(created|updated|deleted|input_received|interrupted|approval_requested|approval_decided|forked))*$"
    )]
    pub event_type: Option<String>,
}

/// The long-poll parameter of `GET /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to hold the request while no event is there yet (0 to 60,
    /// default 0; the server may hold it less, `api.max_wait_secs`): the
    /// answer comes as soon as one is released.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 60)]
    pub wait: Option<String>,
}

/// Longest long-poll, in seconds.
const MAX_WAIT_SECS: i64 = 60;
/// Re-read even without a signal while waiting (an event held back behind a
/// writer that then commits on another replica, say).
const WAIT_POLL: Duration = Duration::from_secs(1);

pub(crate) fn feed_filter(q: &FeedQuery) -> Result<FeedFilter, ApiError> {
    Ok(FeedFilter {
        aggregate_id: q
            .session_id
            .as_deref()
            .map(|s| {
                Uuid::parse_str(s).map_err(|_| ApiError::parameter("session_id", "must be a UUID"))
            })
            .transpose()?,
        kinds: params::one_of(
            "event_type",
            &q.event_type,
            EventKind::parse,
            "session.created, session.updated, session.deleted, session.input_received, \
             session.interrupted, session.approval_requested, session.approval_decided or session.forked",
        )?,
    })
}

/// The global feed, in position order. Positions increase but are not dense;
/// an event never appears below a position already returned.
#[utoipa::path(
    get, path = "/events", tag = "events", operation_id = "list_events",
    params(FeedQuery, WaitQuery),
    responses(
        (status = 200, description = "Events after `after` (empty when none came within `wait`); `Link: rel=\"next\"` carries the last position", body = Vec<EventEnvelope>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn feed(
    state: web::Data<AppState>,
    req: HttpRequest,
    _auth: Authorized<EventsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: FeedQuery = params::query(&req)?;
    let after = params::non_negative("after", &q.after)?;
    let limit = params::limit(&q.limit, &state.pages)?;
    let filter = feed_filter(&q)?;
    let w: WaitQuery = params::query(&req)?;
    let wait = params::non_negative("wait", &w.wait)?;
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::parameter("wait", "must be at most 60 seconds"));
    }
    let deadline = Instant::now() + Duration::from_secs(wait as u64).min(state.max_wait);
    let mut changes = state.feed.subscribe();
    let page = loop {
        // Mark the signal seen before reading, so a commit during the read wakes us.
        changes.borrow_and_update();
        let page = state.store.feed_page(after, limit, &filter).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        if page.count > 0 || left.is_zero() {
            break page;
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break page,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(left.min(WAIT_POLL)) => {}
        }
    };
    let last = page.last.map_or(after, |(position, _)| position);
    Ok(HttpResponse::Ok()
        .insert_header((
            header::LINK,
            link_next(&req, "/events", "after", &last.to_string()),
        ))
        .content_type(ContentType::json())
        .body(page.json))
}
