//! The JSON body extractor.
//!
//! Reads the body under the configured size limit and parses it as JSON
//! whatever the client called it: the seed's `curl -d` examples send
//! `application/x-www-form-urlencoded` or nothing. Only
//! `application/merge-patch+json` changes meaning (RFC 7396 merge).

use std::future::Future;
use std::pin::Pin;

use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use futures_util::StreamExt;
use serde_json::Value;

use super::error::ApiError;
use crate::domain::PatchMode;

/// Body limits, as app data: size in bytes and JSON nesting depth.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize, pub usize);

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub struct JsonBody {
    pub value: Value,
    pub mode: PatchMode,
}

/// A JSON body that may also be absent (no bytes, or only whitespace):
/// `None` then. Read under the same limits as [`JsonBody`].
pub struct OptionalJsonBody(pub Option<Value>);

/// The request's `Content-Type` as sent and its essence (lowercase, no
/// parameters), when it sent one.
pub fn content_type(req: &HttpRequest) -> Result<Option<(String, String)>, ApiError> {
    let Some(raw) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let ct = raw
        .to_str()
        .map_err(|_| ApiError::UnsupportedMediaType("(not ASCII)".into()))?;
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Ok(Some((ct.to_owned(), essence)))
}

fn mode_of(req: &HttpRequest) -> Result<PatchMode, ApiError> {
    let Some((ct, essence)) = content_type(req)? else {
        return Ok(PatchMode::Replace);
    };
    match essence.as_str() {
        "application/merge-patch+json" => Ok(PatchMode::Merge),
        "" | "application/json" | "application/x-www-form-urlencoded" | "text/plain" => {
            Ok(PatchMode::Replace)
        }
        e if e.starts_with("application/") && e.ends_with("+json") => Ok(PatchMode::Replace),
        _ => Err(ApiError::UnsupportedMediaType(ct)),
    }
}

/// A JSON body's `Content-Type` (or none), else the 415.
pub fn json_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    mode_of(req).map(|_| ())
}

impl FromRequest for JsonBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let read = read(req, payload);
        Box::pin(async move {
            match read.await? {
                (Some(value), mode) => Ok(JsonBody { value, mode }),
                (None, _) => Err(ApiError::MalformedJson("the body is empty".into())),
            }
        })
    }
}

impl FromRequest for OptionalJsonBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let read = read(req, payload);
        Box::pin(async move { Ok(OptionalJsonBody(read.await?.0)) })
    }
}

/// The request's `Content-Length`, when it sent one.
pub fn declared_length(req: &HttpRequest) -> Option<usize> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

/// Read a body of at most `limit` bytes (413 beyond, before reading when
/// the declared length says so).
pub async fn collect<S>(
    declared: Option<usize>,
    mut payload: S,
    limit: usize,
) -> Result<web::BytesMut, ApiError>
where
    S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>> + Unpin,
{
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// `value`'s nesting depth within `max_depth`, or the 400.
pub fn check_depth(value: &Value, max_depth: usize) -> Result<(), ApiError> {
    if depth(value) > max_depth {
        return Err(ApiError::MalformedJson(format!(
            "the document is nested deeper than {max_depth} levels"
        )));
    }
    Ok(())
}

type Read = Pin<Box<dyn Future<Output = Result<(Option<Value>, PatchMode), ApiError>>>>;

/// The body as JSON (`None` when empty), within the size and depth limits.
fn read(req: &HttpRequest, payload: &mut Payload) -> Read {
    let (limit, max_depth) = req
        .app_data::<web::Data<BodyLimit>>()
        .map(|l| (l.0, l.1))
        .unwrap_or((1 << 20, 32));
    let mode = mode_of(req);
    let declared = declared_length(req);
    let payload = payload.take();
    Box::pin(async move {
        let mode = mode?;
        let buf = collect(declared, payload, limit).await?;
        if buf.iter().all(u8::is_ascii_whitespace) {
            return Ok((None, mode));
        }
        let value: Value =
            serde_json::from_slice(&buf).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        check_depth(&value, max_depth)?;
        Ok((Some(value), mode))
    })
}
