//! Request ids, the request span and the access log line.
//!
//! The id comes from `X-Request-Id` when the client sent a sane one and is
//! generated otherwise; it is returned on the response, recorded on the span
//! of everything the request does, and stored in the metadata of the events
//! the request writes.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, FromRequest, HttpMessage, HttpRequest, dev::Payload};
use tracing::Instrument;

use crate::auth::Principal;
use crate::domain::EventMetadata;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    // The client's id is sent back as it came (the same header value); a
    // new one is made into a header value once.
    let sent = req.headers().get(&REQUEST_ID).and_then(|v| {
        Some((
            v.to_str().ok().filter(|v| acceptable(v))?.to_owned(),
            v.clone(),
        ))
    });
    let (id, header) = match sent {
        Some((id, header)) => (id, Some(header)),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            let header = HeaderValue::from_str(&id).ok();
            (id, header)
        }
    };
    let method = req.method().clone();
    let span = tracing::info_span!("http", request_id = %id, %method, path = %req.path());
    req.extensions_mut().insert(RequestId(id));
    let started = Instant::now();
    let draining = req
        .app_data::<actix_web::web::Data<super::AppState>>()
        .map(|s| s.shutdown.clone());
    let mut res = next.call(req).instrument(span.clone()).await?;
    // Draining: no further request on this connection. A client reusing a
    // keep-alive connection would otherwise keep the worker busy past the
    // shutdown timeout, and a request cut off then answers 5xx.
    if draining.is_some_and(|d| d.is_cancelled()) {
        res.response_mut()
            .head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
    }
    let status = res.status().as_u16();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let elapsed = started.elapsed();
    crate::metrics::http_request(method.as_str(), &route, status, elapsed);
    // Reads that succeed are what pollers and dashboards repeat all day:
    // `debug`. Writes and every failure are worth a line at `info`.
    let quiet = (method == Method::GET || method == Method::HEAD) && status < 400;
    let elapsed_ms = elapsed.as_secs_f64() * 1e3;
    span.in_scope(|| {
        if quiet {
            tracing::debug!(status, elapsed_ms, %route, "request");
        } else {
            tracing::info!(status, elapsed_ms, %route, "request");
        }
    });
    if let Some(v) = header {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    Ok(res)
}

/// Who is asking and under which request id: the metadata of events a
/// request writes.
pub struct RequestMeta(pub EventMetadata);

impl FromRequest for RequestMeta {
    type Error = Error;
    type Future = std::future::Ready<Result<Self, Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ext = req.extensions();
        let request_id = ext.get::<RequestId>().map(|r| r.0.clone());
        let actor = ext
            .get::<Arc<Principal>>()
            .map_or_else(|| "anonymous".to_owned(), |p| p.subject.clone());
        std::future::ready(Ok(RequestMeta(EventMetadata {
            actor,
            request_id,
            causation_id: None,
            imported: None,
        })))
    }
}
