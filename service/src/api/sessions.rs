//! `/sessions/` handlers: parse the request, call the store, shape the answer.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::{Authorized, SessionsRead, SessionsWrite};
use super::body::JsonBody;
use super::error::ApiError;
use super::middleware::RequestMeta;
use super::params::{self, link_next};
use crate::contract::{
    NewSession, Problem, Session, SessionMergePatch, SessionUpdate, WorkerState,
};
use crate::domain::json::{FieldError, read_at};
use crate::domain::{CreateSession, RuntimeBackend, SessionPatch, SessionState, SessionStatus};
use crate::store::{IdempotencyRequest, ListCursor, ListFilter};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// A session as the answer: its `ETag` and its representation.
pub(crate) fn with_session(mut res: HttpResponseBuilder, s: SessionState) -> HttpResponse {
    res.insert_header((header::ETAG, etag(s.version)))
        .json(Session::from(s))
}

/// `201 Created` for a new session, with its `Location`; finish it with
/// [`with_session`].
pub(crate) fn created(s: &SessionState) -> HttpResponseBuilder {
    let mut res = HttpResponse::Created();
    res.insert_header((header::LOCATION, format!("/sessions/{}", s.id)));
    res
}

/// What a write's `If-Match` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precondition {
    /// No header, or `*`: any current version.
    Any,
    /// `"5"` (or `5`): only at this version.
    Version(i64),
    /// `W/"5"`: a weak tag, which never matches under the strong comparison
    /// RFC 9110 requires for `If-Match`.
    Weak(i64),
}

/// `If-Match`: `"5"`, `5`, `*`, or a weak `W/"5"` (which never matches).
fn if_match(req: &HttpRequest) -> Result<Precondition, ApiError> {
    let Some(raw) = req.headers().get(header::IF_MATCH) else {
        return Ok(Precondition::Any);
    };
    let bad = || ApiError::parameter("If-Match", "must be an ETag such as \"3\" or *");
    let s = raw.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(Precondition::Any);
    }
    let (weak, s) = match s.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    let version = s.parse::<i64>().map_err(|_| bad())?;
    Ok(if weak {
        Precondition::Weak(version)
    } else {
        Precondition::Version(version)
    })
}

/// The version a write must find, or the 412 a weak tag earns once the
/// session is known to exist (a missing session stays a 404).
async fn expected_version(
    state: &AppState,
    id: Uuid,
    pre: Precondition,
) -> Result<Option<i64>, ApiError> {
    match pre {
        Precondition::Any => Ok(None),
        Precondition::Version(v) => Ok(Some(v)),
        Precondition::Weak(v) => {
            let current = state
                .store
                .get(id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))?;
            Err(ApiError::WeakPrecondition {
                tag: v,
                actual: current.version,
            })
        }
    }
}

/// `If-None-Match` (weak comparison, as RFC 9110 asks for it): `*` or a
/// list of tags, one of which is the session's.
fn none_match(req: &HttpRequest, tag: &str) -> bool {
    req.headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim() == "*"
                || v.split(',')
                    .any(|t| t.trim().trim_start_matches("W/") == tag)
        })
}

/// A session id from a path (anything else names no session: 404).
pub(crate) fn session_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("session {raw} not found")))
}

/// The id of a session that exists now, or the 404.
pub(crate) async fn existing_session(state: &AppState, raw: &str) -> Result<Uuid, ApiError> {
    let id = session_id(raw)?;
    match state.store.get_listed(id).await? {
        Some(_) => Ok(id),
        None => Err(ApiError::NotFound(format!("session {id} not found"))),
    }
}

pub(crate) fn parse_dto<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    read_at(value, None).map_err(|FieldError { field, detail }| ApiError::Validation {
        detail: match &field {
            Some(f) => format!("{f}: {detail}"),
            None => detail,
        },
        field,
    })
}

/// The request's `Idempotency-Key`, scoped to its actor and, for writes
/// other than a create, to what it writes to (`scope`, e.g. `input:<id>`).
pub(crate) fn idempotency(
    state: &AppState,
    req: &HttpRequest,
    scope: Option<&str>,
    actor: &str,
    body: &Value,
) -> Result<Option<IdempotencyRequest>, ApiError> {
    let Some(raw) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::parameter(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    let canonical = body.to_string().into_bytes();
    Ok(Some(IdempotencyRequest {
        key: match scope {
            None => format!("{actor} {key}"),
            Some(scope) => format!("{actor} {scope} {key}"),
        },
        request_hash: hex::encode(Sha256::digest(canonical)),
        ttl: state.idempotency_ttl,
    }))
}

/// Create a session.
#[utoipa::path(
    post, path = "/sessions/", tag = "sessions", operation_id = "create_session",
    request_body(content = NewSession, description = "JSON; a body without Content-Type (or form-encoded, as `curl -d` sends it) is read as JSON"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body return the first session instead of creating another")),
    responses(
        (status = 201, description = "Created", body = Session,
         headers(("Location" = String, description = "URL of the session"), ("ETag" = String, description = "The session's version"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid session, or Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The session created under this Idempotency-Key was deleted", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    if !body.value.is_object() {
        return Err(ApiError::Validation {
            field: None,
            detail: "the body must be a JSON object".into(),
        });
    }
    let idem = idempotency(&state, &req, None, &meta.0.actor, &body.value)?;
    let dto: NewSession = parse_dto(body.value)?;
    let cmd = CreateSession::new(
        dto.agent_id,
        dto.session_type,
        dto.status.map(Into::into),
        dto.context,
        dto.checkpoint,
        dto.runtime_backend.map(Into::into),
        dto.runtime_metadata,
        dto.worker,
    )?;
    let created = state.store.create(&cmd, &meta.0, idem.as_ref()).await?;
    state.after_commit(created.appended.as_ref());
    let mut res = self::created(&created.session);
    if created.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(with_session(res, created.session))
}

/// Get one session.
#[utoipa::path(
    get, path = "/sessions/{id}", tag = "sessions", operation_id = "get_session",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("If-None-Match" = Option<String>, Header, description = "Answer 304 without a body when the session is still at one of these versions (its ETag, e.g. `\"5\"`; `*` for any)"),
    ),
    responses(
        (status = 200, description = "The session", body = Session, headers(("ETag" = String))),
        (status = 304, description = "Not modified since the `If-None-Match` version"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let s = state
        .store
        .get_listed(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))?;
    let tag = etag(s.version);
    if none_match(&req, &tag) {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, tag))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, tag))
        .json(s))
}

/// Update a session.
#[utoipa::path(
    patch, path = "/sessions/{id}", tag = "sessions", operation_id = "update_session",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("If-Match" = Option<String>, Header, description = "Apply only if the session is at this version (its ETag); a weak tag (`W/\"5\"`) never matches", pattern = r#"^(\*|(W/)?("[0-9]+"|[0-9]+))$"#),
    ),
    request_body(description = "Plain JSON replaces each named field; `application/merge-patch+json` merges objects (RFC 7396)",
        content((SessionUpdate = "application/json"), (SessionMergePatch = "application/merge-patch+json"))),
    responses(
        (status = 200, description = "The session after the update", body = Session, headers(("ETag" = String))),
        (status = 400, description = "Malformed JSON or If-Match", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Illegal status transition", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match does not match the current version, or is weak", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let pre = if_match(&req)?;
    let Value::Object(fields) = body.value else {
        return Err(ApiError::Validation {
            field: None,
            detail: "the body must be a JSON object".into(),
        });
    };
    let patch = SessionPatch::parse(body.mode, fields)?;
    let expected = expected_version(&state, id, pre).await?;
    let written = state.store.update(id, &patch, expected, &meta.0).await?;
    state.after_commit(written.appended.as_ref());
    Ok(with_session(HttpResponse::Ok(), written.session))
}

/// Delete a session (appends `session.deleted`).
#[utoipa::path(
    delete, path = "/sessions/{id}", tag = "sessions", operation_id = "delete_session",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("If-Match" = Option<String>, Header, description = "Delete only if the session is at this version; a weak tag (`W/\"5\"`) never matches", pattern = r#"^(\*|(W/)?("[0-9]+"|[0-9]+))$"#),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed If-Match", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "If-Match does not match the current version, or is weak", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let expected = expected_version(&state, id, if_match(&req)?).await?;
    let written = state.store.delete(id, expected, &meta.0).await?;
    state.after_commit(written.appended.as_ref());
    Ok(HttpResponse::NoContent().finish())
}

/// The filters of `GET /sessions/` and `DELETE /sessions/`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilterQuery {
    #[param(value_type = Option<Uuid>)]
    pub agent_id: Option<String>,
    /// Only sessions forked from this one.
    #[param(value_type = Option<Uuid>)]
    pub parent_session_id: Option<String>,
    /// One status, or several separated by commas.
    #[param(pattern = "^(active|paused|completed|crashed)(,(active|paused|completed|crashed))*$")]
    pub status: Option<String>,
    pub session_type: Option<String>,
    #[param(pattern = "^(local|kubernetes|unknown)$")]
    pub runtime_backend: Option<String>,
    /// Only sessions with (true) or without (false) a worker spec.
    #[param(value_type = Option<bool>)]
    pub has_worker: Option<String>,
    /// Only sessions whose worker is in one of these states
    /// (`runtime_metadata.worker.state`, as the runner reports it),
    /// separated by commas.
    #[param(
        pattern = "^(starting|running|idle|awaiting_approval|stopping|exited)(,(starting|running|idle|awaiting_approval|stopping|exited))*$"
    )]
    pub worker_state: Option<String>,
    /// RFC 3339; inclusive.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub created_after: Option<String>,
    /// RFC 3339; exclusive.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub created_before: Option<String>,
    #[param(value_type = Option<DateTime<Utc>>)]
    pub updated_after: Option<String>,
    #[param(value_type = Option<DateTime<Utc>>)]
    pub updated_before: Option<String>,
}

/// Paging of `GET /sessions/`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (default 20, at most `api.max_page_size`, 500 by default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
    /// The opaque cursor from the previous page's `Link: rel="next"`.
    pub cursor: Option<String>,
}

fn time(field: &str, v: &Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::parameter(field, "must be an RFC 3339 timestamp"))
        })
        .transpose()
}

/// The request's session filters (`FilterQuery`), read.
fn read_filter(req: &HttpRequest) -> Result<ListFilter, ApiError> {
    let q: FilterQuery = params::query(req)?;
    let status = params::one_of(
        "status",
        &q.status,
        SessionStatus::parse,
        "active, paused, completed or crashed",
    )?;
    let worker_state = params::one_of(
        "worker_state",
        &q.worker_state,
        WorkerState::parse,
        "starting, running, idle, awaiting_approval, stopping or exited",
    )?;
    let uuid = |field: &str, v: &Option<String>| {
        v.as_deref()
            .map(|a| Uuid::parse_str(a).map_err(|_| ApiError::parameter(field, "must be a UUID")))
            .transpose()
    };
    Ok(ListFilter {
        agent_id: uuid("agent_id", &q.agent_id)?,
        parent_session_id: uuid("parent_session_id", &q.parent_session_id)?,
        status,
        session_type: match &q.session_type {
            // No stored text holds a NUL (PostgreSQL refuses one).
            Some(t) if t.contains('\0') => {
                return Err(ApiError::parameter(
                    "session_type",
                    "must not contain a NUL character",
                ));
            }
            t => t.clone(),
        },
        runtime_backend: q
            .runtime_backend
            .as_deref()
            .map(|b| {
                RuntimeBackend::parse(b).ok_or_else(|| {
                    ApiError::parameter("runtime_backend", "must be local, kubernetes or unknown")
                })
            })
            .transpose()?,
        created_after: time("created_after", &q.created_after)?,
        created_before: time("created_before", &q.created_before)?,
        updated_after: time("updated_after", &q.updated_after)?,
        updated_before: time("updated_before", &q.updated_before)?,
        has_worker: q
            .has_worker
            .as_deref()
            .map(|v| {
                v.parse::<bool>()
                    .map_err(|_| ApiError::parameter("has_worker", "must be true or false"))
            })
            .transpose()?,
        worker_state,
    })
}

/// Options of `DELETE /sessions/` beside the filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BulkDeleteQuery {
    /// Answer how many sessions match, deleting nothing.
    #[param(value_type = Option<bool>)]
    pub dry_run: Option<String>,
    // Paging belongs to the list: refused here rather than ignored.
    #[serde(default)]
    #[param(ignore)]
    pub limit: Option<String>,
    #[serde(default)]
    #[param(ignore)]
    pub cursor: Option<String>,
}

/// The answer of `DELETE /sessions/`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BulkDeleteResult {
    /// True when nothing was deleted because `dry_run` asked so.
    pub dry_run: bool,
    /// Sessions the filters matched.
    pub matched: u64,
    /// Sessions deleted, each with its own `session.deleted` event (0 on a
    /// dry run; below `matched` when some changed while being deleted,
    /// which are left alone).
    pub deleted: u64,
}

/// Delete every session the filters match (at least one filter is needed).
#[utoipa::path(
    delete, path = "/sessions/", tag = "sessions", operation_id = "delete_sessions",
    params(FilterQuery, BulkDeleteQuery),
    responses(
        (status = 200, description = "How many sessions matched and were deleted; each deleted session has its own `session.deleted` event", body = BulkDeleteResult),
        (status = 400, description = "An invalid parameter, paging, or no filter at all (a bulk delete of every session is refused)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_many(
    state: web::Data<AppState>,
    req: HttpRequest,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let filter = read_filter(&req)?;
    let q: BulkDeleteQuery = params::query(&req)?;
    for (field, v) in [("limit", &q.limit), ("cursor", &q.cursor)] {
        if v.is_some() {
            return Err(ApiError::parameter(
                field,
                "a bulk delete takes filters, not paging",
            ));
        }
    }
    let dry_run = match q.dry_run.as_deref() {
        None => false,
        Some(v) => v
            .parse::<bool>()
            .map_err(|_| ApiError::parameter("dry_run", "must be true or false"))?,
    };
    if filter.is_empty() {
        return Err(ApiError::parameter(
            "query",
            "a bulk delete needs at least one filter (status, updated_before, …); \
             every session at once is refused",
        ));
    }
    let result = if dry_run {
        BulkDeleteResult {
            dry_run,
            matched: state.store.count(&filter).await?,
            deleted: 0,
        }
    } else {
        let done = state
            .store
            .delete_matching(&filter, state.delete_batch, &meta.0, |batch| {
                for a in batch {
                    state.after_commit(Some(a));
                }
            })
            .await?;
        BulkDeleteResult {
            dry_run,
            matched: done.matched,
            deleted: done.deleted,
        }
    };
    Ok(HttpResponse::Ok().json(result))
}

/// List sessions, newest first.
#[utoipa::path(
    get, path = "/sessions/", tag = "sessions", operation_id = "list_sessions",
    params(FilterQuery, PageQuery),
    responses(
        (status = 200, description = "A page of sessions; the next page is in `Link: <…>; rel=\"next\"`", body = Vec<Session>,
         headers(("Link" = String, description = "RFC 8288 link to the next page"))),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let filter = read_filter(&req)?;
    let q: PageQuery = params::query(&req)?;
    let limit = params::limit(&q.limit, &state.pages)?;
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            ListCursor::decode(c)
                .ok_or_else(|| ApiError::parameter("cursor", "is not a cursor this service issued"))
        })
        .transpose()?;
    let mut sessions = state.store.list_page(&filter, limit + 1, cursor).await?;
    let mut res = HttpResponse::Ok();
    if sessions.len() as u64 > limit {
        sessions.truncate(limit as usize);
        let Some(last) = sessions.last() else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "a full page has no last row"
            )));
        };
        let next = ListCursor {
            created_at: last.created,
            id: last.id,
        };
        res.insert_header((
            header::LINK,
            link_next(&req, "/sessions/", "cursor", &next.encode()),
        ));
    }
    Ok(res.json(sessions))
}
