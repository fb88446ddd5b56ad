//! `/sessions/{id}/messages`: the worker's message log, as JSON or JSONL.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Authorized, SessionsRead, SessionsRun};
use super::body::JsonBody;
use super::error::ApiError;
use super::middleware::RequestMeta;
use super::params::{self, link_next};
use super::sessions::{existing_session, session_id, with_session};
use crate::contract::{Problem, Session, format_time};

/// Most messages accepted in one append.
pub const MAX_BATCH: usize = 1000;

/// One stored message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// 1, 2, 3 … within the session.
    pub seq: i64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
    /// The stream-json object as the worker printed it.
    #[schema(value_type = Object)]
    pub message: Value,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Messages with a `seq` above this one (default 0).
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
    /// Page size (default 20, at most `api.max_page_size`, 500 by default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
    /// `jsonl` for one raw message per line (also chosen by `Accept: application/x-ndjson`).
    #[param(pattern = "^(json|jsonl)$")]
    pub format: Option<String>,
}

/// NUL cannot be stored in `jsonb`; in worker output it is replaced, not refused.
fn without_nul(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nul).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), without_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Append worker messages (the runner does, with scope `sessions:run`).
#[utoipa::path(
    post, path = "/sessions/{id}/messages", tag = "sessions", operation_id = "append_messages",
    params(("id" = Uuid, Path, description = "Session id")),
    request_body(content = Vec<Object>, description = "1 to 1000 stream-json objects, in order"),
    responses(
        (status = 200, description = "The session with its updated usage", body = Session, headers(("ETag" = String))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not an array of 1 to 1000 objects", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn append(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsRun>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let Value::Array(items) = body.value else {
        return Err(ApiError::validation(
            "body",
            "must be a JSON array of message objects",
        ));
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::validation(
            "body",
            format!("must hold 1 to {MAX_BATCH} messages"),
        ));
    }
    if let Some(i) = items.iter().position(|m| !m.is_object()) {
        return Err(ApiError::validation(
            format!("[{i}]"),
            "each message must be a JSON object",
        ));
    }
    if let Some(i) = items.iter().position(|m| {
        crate::domain::json::check_storable(m)
            .is_err_and(|e| !matches!(e, crate::domain::json::JsonProblem::Nul(_)))
    }) {
        return Err(ApiError::validation(
            format!("[{i}]"),
            "is nested too deeply",
        ));
    }
    let items: Vec<Value> = items.into_iter().map(without_nul).collect();
    let written = state.store.append_messages(id, &items, &meta.0).await?;
    state.after_commit(written.appended.as_ref());
    Ok(with_session(HttpResponse::Ok(), written.session))
}

/// Read the message log.
#[utoipa::path(
    get, path = "/sessions/{id}/messages", tag = "sessions", operation_id = "list_messages",
    params(("id" = Uuid, Path, description = "Session id"), MessagesQuery),
    responses(
        (status = 200, description = "Messages in order; `Link: rel=\"next\"` for more. With `format=jsonl`, one raw message per line (`application/x-ndjson`)",
         content((Vec<Message> = "application/json"), (String = "application/x-ndjson"))),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: MessagesQuery = params::query(&req)?;
    let after = params::non_negative("after", &q.after)?;
    let limit = params::limit(&q.limit, &state.pages)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let jsonl = match q.format.as_deref() {
        Some("jsonl") => true,
        Some("json") | None => {
            accept.contains("application/x-ndjson") || accept.contains("application/jsonl")
        }
        Some(_) => return Err(ApiError::parameter("format", "must be json or jsonl")),
    };
    let id = existing_session(&state, &id).await?;
    let messages = state.store.messages(id, after, limit).await?;
    let mut res = HttpResponse::Ok();
    if messages.len() as u64 == limit
        && let Some(last) = messages.last()
    {
        let path = format!("/sessions/{id}/messages");
        res.insert_header((
            header::LINK,
            link_next(&req, &path, "after", &last.seq.to_string()),
        ));
    }
    if jsonl {
        let mut body = String::new();
        for m in &messages {
            body.push_str(&m.message.to_string());
            body.push('\n');
        }
        return Ok(res.content_type("application/x-ndjson").body(body));
    }
    let out: Vec<Message> = messages
        .into_iter()
        .map(|m| Message {
            seq: m.seq,
            created_at: format_time(&m.created_at),
            message: m.message,
        })
        .collect();
    Ok(res.json(out))
}
