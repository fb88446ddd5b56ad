//! Server-Sent Events: `GET /events/stream` (the feed) and
//! `GET /sessions/{id}/messages/stream` (a session's message log).
//!
//! Both run one loop ([`sse`]): read what follows a cursor from the store,
//! send it with the cursor as each SSE `id`, else wait for the feed signal,
//! a poll interval or the next keep-alive, and end on shutdown. A client that
//! reconnects with `Last-Event-ID` resumes exactly after the last item it
//! received: the stream reads durable rows, never a lossy broadcast, and the
//! signal only says when to read again.

use std::future::Future;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::auth::{Authorized, EventsRead, SessionsRead};
use super::error::ApiError;
use super::events::{FeedQuery, feed_filter};
use super::messages::Message;
use super::params;
use super::sessions::existing_session;
use crate::contract::{Problem, format_time};
use crate::store::StoreError;

const PAGE: u64 = 200;
/// Re-read even without a signal, for events held back behind a transaction.
const POLL: Duration = Duration::from_secs(1);

/// One read of a stream's source: the SSE text of what follows the cursor
/// and the cursor after it, or `None` when nothing does yet.
type Read = Result<Option<(i64, String)>, StoreError>;

struct Cursor<F> {
    read: F,
    after: i64,
    changes: watch::Receiver<u64>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    last_sent: Instant,
    opened: bool,
}

async fn next_chunk<F, Fut>(
    mut c: Cursor<F>,
) -> Option<(Result<Bytes, actix_web::Error>, Cursor<F>)>
where
    F: Fn(i64) -> Fut,
    Fut: Future<Output = Read>,
{
    if !c.opened {
        c.opened = true;
        c.last_sent = Instant::now();
        return Some((Ok(Bytes::from_static(b"retry: 2000\n: stream open\n\n")), c));
    }
    loop {
        if c.shutdown.is_cancelled() {
            return None;
        }
        c.changes.borrow_and_update();
        match (c.read)(c.after).await {
            Ok(Some((after, text))) => {
                c.after = after;
                c.last_sent = Instant::now();
                return Some((Ok(Bytes::from(text)), c));
            }
            Ok(None) => {}
            Err(e) => {
                // End the stream; the client reconnects with Last-Event-ID.
                tracing::warn!(error = %e, "an event stream cannot read the store; closing it");
                return None;
            }
        }
        let until_heartbeat = c.heartbeat.saturating_sub(c.last_sent.elapsed());
        if until_heartbeat.is_zero() {
            c.last_sent = Instant::now();
            return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), c));
        }
        tokio::select! {
            _ = c.shutdown.cancelled() => return None,
            _ = c.changes.changed() => {}
            _ = tokio::time::sleep(until_heartbeat.min(POLL)) => {}
        }
    }
}

/// A live `text/event-stream` answer from `after` on, reading with `read`.
fn sse<F, Fut>(state: &AppState, after: i64, read: F) -> HttpResponse
where
    F: Fn(i64) -> Fut + 'static,
    Fut: Future<Output = Read> + 'static,
{
    let cursor = Cursor {
        read,
        after,
        changes: state.feed.subscribe(),
        shutdown: state.shutdown.clone(),
        heartbeat: state.sse_heartbeat,
        last_sent: Instant::now(),
        opened: false,
    };
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream::unfold(cursor, next_chunk))
}

/// Where a stream starts: after `Last-Event-ID` when sent, else after the
/// `after` parameter (0 when absent).
fn resume_after(req: &HttpRequest, after: &Option<String>) -> Result<i64, ApiError> {
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::parameter("Last-Event-ID", "must be an id from this stream")
                })
        })
        .transpose()?;
    match last_event_id {
        Some(p) => Ok(p),
        None => params::non_negative("after", after),
    }
}

/// One SSE event: `id`, `event` and one line of JSON `data`.
fn frame(out: &mut String, id: i64, event: &str, data: &impl serde::Serialize) {
    match serde_json::to_string(data) {
        Ok(data) => out.push_str(&format!("id: {id}\nevent: {event}\ndata: {data}\n\n")),
        Err(e) => {
            tracing::error!(id, error = %e, "an item does not serialise; skipped on this stream")
        }
    }
}

/// The feed, live, as Server-Sent Events.
#[utoipa::path(
    get, path = "/events/stream", tag = "events", operation_id = "stream_events",
    params(
        FeedQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position, the `id` of the last event received (takes precedence over `after`)", pattern = "^[0-9]+$"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one SSE event per log event (`id` = position, `event` = event type, `data` = the envelope), keep-alive comments in between",
         body = String, content_type = "text/event-stream"),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn events_stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    _auth: Authorized<EventsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: FeedQuery = params::query(&req)?;
    let after = resume_after(&req, &q.after)?;
    let filter = feed_filter(&q)?;
    let store = state.store.clone();
    Ok(sse(&state, after, move |after| {
        let (store, filter) = (store.clone(), filter.clone());
        async move {
            let events = store.feed(after, PAGE, &filter).await?;
            let Some(last) = events.last().map(|e| e.position) else {
                return Ok(None);
            };
            let mut out = String::new();
            for e in &events {
                frame(&mut out, e.position, e.kind.as_str(), &e.envelope());
            }
            Ok(Some((last, out)))
        }
    }))
}

/// Query of `GET /sessions/{id}/messages/stream`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessageStreamQuery {
    /// Start after this `seq` (default 0); `Last-Event-ID` takes precedence.
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
}

/// A session's message log, live, as Server-Sent Events.
#[utoipa::path(
    get, path = "/sessions/{id}/messages/stream", tag = "sessions", operation_id = "stream_messages",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        MessageStreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this `seq`, the `id` of the last message received (takes precedence over `after`)", pattern = "^[0-9]+$"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one SSE event per message (`id` = its seq, `event: message`, `data` = `{\"seq\", \"created_at\", \"message\"}`), keep-alive comments in between",
         body = String, content_type = "text/event-stream"),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn messages_stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: MessageStreamQuery = params::query(&req)?;
    let after = resume_after(&req, &q.after)?;
    let id = existing_session(&state, &id).await?;
    let store = state.store.clone();
    Ok(sse(&state, after, move |after| {
        let store = store.clone();
        async move {
            let messages = store.messages(id, after, PAGE).await?;
            let Some(last) = messages.last().map(|m| m.seq) else {
                return Ok(None);
            };
            let mut out = String::new();
            for m in messages {
                let seq = m.seq;
                let data = Message {
                    seq,
                    created_at: format_time(&m.created_at),
                    message: m.message,
                };
                frame(&mut out, seq, "message", &data);
            }
            Ok(Some((last, out)))
        }
    }))
}
