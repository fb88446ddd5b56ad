//! Live sessions at the edge: inputs and interrupts queued for the worker,
//! the queue itself, and tool approvals (the runner asks, a person decides).
//! The store writes each with its event in one statement (`store/live.rs`).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use super::AppState;
use super::auth::{Authorized, SessionsRead, SessionsRun, SessionsWrite};
use super::body::{JsonBody, OptionalJsonBody};
use super::error::ApiError;
use super::middleware::RequestMeta;
use super::params::{self, link_next};
use super::sessions::{existing_session, idempotency, parse_dto, session_id};
use crate::contract::ApprovalDecision;
use crate::contract::Problem;
use crate::contract::live::{
    Approval, ApprovalRequest, ApprovalStatus, DecisionRequest, Input, InputAccepted, InputRequest,
};
use crate::store::{InputWritten, NewInput};

fn object(value: Value) -> Result<Value, ApiError> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::Validation {
            field: None,
            detail: "the body must be a JSON object".into(),
        })
    }
}

fn accepted(state: &AppState, written: InputWritten) -> HttpResponse {
    state.after_commit(written.appended.as_ref());
    let mut res = HttpResponse::Accepted();
    if written.replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    res.json(InputAccepted {
        seq: written.input.seq,
        id: written.input.id,
        kind: written.input.kind,
        version: written.version,
    })
}

/// Send the session's worker a message.
#[utoipa::path(
    post, path = "/sessions/{id}/input", tag = "live", operation_id = "send_input",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body answer the input queued first instead of queueing another"),
    ),
    request_body(content = InputRequest, description = "JSON; a body without Content-Type is read as JSON"),
    responses(
        (status = 202, description = "Queued for the worker (delivered once, in `seq` order; kept until a worker takes it)", body = InputAccepted),
        (status = 400, description = "Malformed JSON or Idempotency-Key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The session is completed", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or text too large (`api.max_input_bytes`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn input(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let value = object(body.value)?;
    let idem = idempotency(
        &state,
        &req,
        Some(&format!("input:{id}")),
        &meta.0.actor,
        &value,
    )?;
    let dto: InputRequest = parse_dto(value)?;
    if dto.text.trim().is_empty() {
        return Err(ApiError::validation("text", "must not be empty"));
    }
    if dto.text.len() > state.max_input_bytes {
        return Err(ApiError::FieldTooLarge {
            field: "text",
            limit: state.max_input_bytes,
        });
    }
    let input = NewInput::Message { text: dto.text };
    let written = state
        .store
        .append_input(id, &input, &meta.0, idem.as_ref())
        .await?;
    Ok(accepted(&state, written))
}

/// End the worker's current turn; the worker and the session stay.
#[utoipa::path(
    post, path = "/sessions/{id}/interrupt", tag = "live", operation_id = "interrupt_session",
    params(("id" = Uuid, Path, description = "Session id")),
    request_body(content = Option<Object>, description = "Nothing, `null` or `{}`"),
    responses(
        (status = 202, description = "The interrupt is queued for the worker", body = InputAccepted),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The session is not active", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A body other than `{}` or `null`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn interrupt(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: OptionalJsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    match body.0 {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => return Err(ApiError::validation("body", "must be empty or {}")),
    }
    let written = state
        .store
        .append_input(id, &NewInput::Interrupt, &meta.0, None)
        .await?;
    Ok(accepted(&state, written))
}

/// Query of `GET /sessions/{id}/inputs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InputsQuery {
    /// Inputs with a `seq` above this one (default 0).
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
    /// Page size (default 20, at most `api.max_page_size`, 500 by default).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
}

/// The session's input queue, in `seq` order.
#[utoipa::path(
    get, path = "/sessions/{id}/inputs", tag = "live", operation_id = "list_inputs",
    params(("id" = Uuid, Path, description = "Session id"), InputsQuery),
    responses(
        (status = 200, description = "Inputs in order; `Link: rel=\"next\"` for more", body = Vec<Input>,
         headers(("Link" = String, description = "RFC 8288 link to the next page"))),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn inputs(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: InputsQuery = params::query(&req)?;
    let after = params::non_negative("after", &q.after)?;
    let limit = params::limit(&q.limit, &state.pages)?;
    let id = existing_session(&state, &id).await?;
    let inputs = state.store.inputs(id, after, limit).await?;
    let mut res = HttpResponse::Ok();
    if inputs.len() as u64 == limit
        && let Some(last) = inputs.last()
    {
        let path = format!("/sessions/{id}/inputs");
        res.insert_header((
            header::LINK,
            link_next(&req, &path, "after", &last.seq.to_string()),
        ));
    }
    Ok(res.json(inputs))
}

/// Report a tool approval the worker asks for (the runner does, with scope
/// `sessions:run`).
#[utoipa::path(
    post, path = "/sessions/{id}/approvals", tag = "live", operation_id = "request_approval",
    params(("id" = Uuid, Path, description = "Session id")),
    request_body(content = ApprovalRequest, description = "JSON"),
    responses(
        (status = 201, description = "Stored as pending; `session.approval_requested` appended", body = Approval),
        (status = 200, description = "This `request_id` was already stored: the approval as it stands, nothing appended", body = Approval),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn request_approval(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsRun>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let dto: ApprovalRequest = parse_dto(object(body.value)?)?;
    for (field, v) in [
        ("request_id", &dto.request_id),
        ("tool_name", &dto.tool_name),
    ] {
        if v.trim().is_empty() {
            return Err(ApiError::validation(field, "must not be empty"));
        }
    }
    let written = state.store.request_approval(id, &dto, &meta.0).await?;
    state.after_commit(written.appended.as_ref());
    let mut res = match written.appended {
        Some(_) => HttpResponse::Created(),
        None => HttpResponse::Ok(),
    };
    Ok(res.json(written.approval))
}

/// Query of `GET /sessions/{id}/approvals`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsQuery {
    /// Only approvals in these statuses, comma-separated.
    #[param(pattern = "^(pending|allowed|denied)(,(pending|allowed|denied))*$")]
    pub status: Option<String>,
}

/// The session's tool approvals, in the order they were asked for.
#[utoipa::path(
    get, path = "/sessions/{id}/approvals", tag = "live", operation_id = "list_approvals",
    params(("id" = Uuid, Path, description = "Session id"), ApprovalsQuery),
    responses(
        (status = 200, description = "Approvals, oldest first", body = Vec<Approval>),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn approvals(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: ApprovalsQuery = params::query(&req)?;
    let statuses = params::one_of(
        "status",
        &q.status,
        ApprovalStatus::parse,
        "pending, allowed or denied",
    )?;
    let id = existing_session(&state, &id).await?;
    Ok(HttpResponse::Ok().json(state.store.approvals(id, &statuses).await?))
}

/// One tool approval.
#[utoipa::path(
    get, path = "/sessions/{id}/approvals/{request_id}", tag = "live", operation_id = "get_approval",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("request_id" = String, Path, description = "The worker's control request id"),
    ),
    responses(
        (status = 200, description = "The approval", body = Approval),
        (status = 404, description = "No such session or approval", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn approval(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let (id, request_id) = path.into_inner();
    let id = session_id(&id)?;
    let approval = state
        .store
        .approval(id, &request_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("session {id} has no approval {request_id}")))?;
    Ok(HttpResponse::Ok().json(approval))
}

/// Decide a pending tool approval; the answer is queued for the worker.
#[utoipa::path(
    post, path = "/sessions/{id}/approvals/{request_id}", tag = "live", operation_id = "decide_approval",
    params(
        ("id" = Uuid, Path, description = "Session id"),
        ("request_id" = String, Path, description = "The worker's control request id"),
    ),
    request_body(content = DecisionRequest, description = "JSON"),
    responses(
        (status = 200, description = "Decided; `session.approval_decided` appended and the answer queued as an `approval` input", body = Approval),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session or approval", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already decided", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid decision (e.g. `updated_input` with a denial)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn decide(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: JsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let (id, request_id) = path.into_inner();
    let id = session_id(&id)?;
    let dto: DecisionRequest = parse_dto(object(body.value)?)?;
    if dto.decision == ApprovalDecision::Deny && dto.updated_input.is_some() {
        return Err(ApiError::validation(
            "updated_input",
            "goes with an allow, not a deny",
        ));
    }
    let written = state
        .store
        .decide_approval(id, &request_id, &dto, &meta.0)
        .await?;
    state.after_commit(written.appended.as_ref());
    Ok(HttpResponse::Ok().json(written.approval))
}
