//! `GET /events/stream`: the feed as Server-Sent Events.
//!
//! Each event's SSE `id` is its position, so a client that reconnects with
//! `Last-Event-ID` resumes exactly after the last event it received: the
//! stream reads from the gap-safe feed, never from a lossy broadcast, and the
//! feed signal only says when to read again.

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::auth::{Authorized, EventsRead};
use super::error::ApiError;
use super::events::{FeedQuery, feed_filter};
use super::params;
use crate::contract::Problem;
use crate::store::{FeedFilter, Store};

const PAGE: u64 = 200;
/// Re-read even without a signal, for events held back behind a transaction.
const POLL: Duration = Duration::from_secs(1);

struct Cursor {
    store: Store,
    after: i64,
    filter: FeedFilter,
    changes: watch::Receiver<u64>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    last_sent: Instant,
    opened: bool,
}

fn frame(events: &[crate::store::StoredEvent]) -> Bytes {
    let mut out = String::new();
    for e in events {
        let Ok(data) = serde_json::to_string(&e.envelope(true)) else {
            tracing::error!(
                position = e.position,
                "an event does not serialise; skipped on this stream"
            );
            continue;
        };
        out.push_str(&format!(
            "id: {}\nevent: {}\ndata: {data}\n\n",
            e.position,
            e.kind.as_str()
        ));
    }
    Bytes::from(out)
}

async fn next_chunk(mut c: Cursor) -> Option<(Result<Bytes, actix_web::Error>, Cursor)> {
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
        match c.store.feed(c.after, PAGE, &c.filter).await {
            Ok(events) if let Some(last) = events.last().map(|e| e.position) => {
                c.after = last;
                c.last_sent = Instant::now();
                return Some((Ok(frame(&events)), c));
            }
            Ok(_) => {}
            Err(e) => {
                // End the stream; the client reconnects with Last-Event-ID.
                tracing::warn!(error = %e, "event stream cannot read the log; closing it");
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
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::parameter("Last-Event-ID", "must be a position from this stream")
                })
        })
        .transpose()?;
    let after = match last_event_id {
        Some(p) => p,
        None => params::non_negative("after", &q.after)?,
    };
    let cursor = Cursor {
        store: state.store.clone(),
        after,
        filter: feed_filter(&q)?,
        changes: state.feed.subscribe(),
        shutdown: state.shutdown.clone(),
        heartbeat: state.sse_heartbeat,
        last_sent: Instant::now(),
        opened: false,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream::unfold(cursor, next_chunk)))
}
