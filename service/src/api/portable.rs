//! Portable sessions at the edge: the CLI transcript (uploaded by the
//! runner, read by anyone), forks, and export/import of a whole session
//! (`store/portable.rs` writes each).

use std::collections::HashSet;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;
use uuid::Uuid;

use super::AppState;
use super::auth::{Authorized, SessionsRead, SessionsRun, SessionsWrite};
use super::body::{
    BodyLimit, OptionalJsonBody, check_depth, collect, content_type, declared_length,
};
use super::error::{ApiError, TRANSCRIPT_LENGTH};
use super::middleware::RequestMeta;
use super::params;
use super::sessions::{created, existing_session, parse_dto, session_id, with_session};
use crate::contract::portable::{
    EXPORT_FORMAT, EXPORT_FORMAT_VERSION, ExportedMessage, ForkRequest, SessionExport,
    TranscriptChunk as WireChunk, TranscriptWritten,
};
use crate::contract::{Problem, Session, format_time};
use crate::domain::event::{self, ImportMarker};
use crate::domain::transcript::rename_session;
use crate::domain::{EventMetadata, SessionStatus};
use crate::store::{
    ForkPlan, ImportPlan, SessionDump, StoredEvent, StoredMessage, TranscriptChunk,
};

/// Levels an export document adds above the JSON it carries (document,
/// events, envelope, payload, changes, field).
const EXPORT_NESTING: usize = 6;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PutTranscriptQuery {
    /// The byte offset in the transcript where the body starts.
    #[param(value_type = i64, minimum = 0)]
    pub offset: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetTranscriptQuery {
    /// Only the chunks stored while the session's version was at most this.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub at_version: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// `true` imports under a new session id (and new event ids).
    #[param(value_type = Option<bool>)]
    pub new_id: Option<String>,
}

fn transcript_response(mut res: actix_web::HttpResponseBuilder, length: i64) -> HttpResponse {
    res.insert_header((TRANSCRIPT_LENGTH, length.to_string()))
        .json(TranscriptWritten { length })
}

/// Upload the CLI transcript as it grows (the runner does, with scope
/// `sessions:run`).
#[utoipa::path(
    put, path = "/sessions/{id}/transcript", tag = "portable", operation_id = "put_transcript",
    params(("id" = Uuid, Path, description = "Session id"), PutTranscriptQuery),
    request_body(content = String, content_type = "application/octet-stream",
        description = "Whole JSONL lines (UTF-8, ending with a newline) of the transcript from `offset` on; `application/x-ndjson` is accepted too"),
    responses(
        (status = 200, description = "Stored (or already stored): the transcript's length", body = TranscriptWritten,
         headers(("X-Transcript-Length" = i64, description = "The stored length in bytes"))),
        (status = 400, description = "Missing or invalid offset", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A gap (offset past the stored length) or bytes that differ from the stored ones; `X-Transcript-Length` gives the stored length", body = Problem, content_type = "application/problem+json",
         headers(("X-Transcript-Length" = i64, description = "The stored length in bytes"))),
        (status = 413, description = "The transcript would exceed `api.max_transcript_bytes`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not UTF-8, or not whole lines", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put_transcript(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
    _auth: Authorized<SessionsRun>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let q: PutTranscriptQuery = params::query(&req)?;
    if q.offset.is_none() {
        return Err(ApiError::parameter("offset", "is required"));
    }
    let offset = params::non_negative("offset", &q.offset)?;
    if let Some((ct, essence)) = content_type(&req)?
        && !matches!(
            essence.as_str(),
            "application/x-ndjson" | "application/jsonl" | "application/octet-stream" | ""
        )
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "{ct}; send application/x-ndjson or application/octet-stream"
        )));
    }
    let limit = state.max_transcript_bytes;
    let body = collect(declared_length(&req), payload, limit).await?;
    if std::str::from_utf8(&body).is_err() {
        return Err(ApiError::validation("body", "must be UTF-8"));
    }
    if !body.is_empty() && !body.ends_with(b"\n") {
        return Err(ApiError::validation(
            "body",
            "must be whole lines, ending with a newline",
        ));
    }
    let length = state
        .store
        .append_transcript(id, offset, &body, limit as i64)
        .await?;
    Ok(transcript_response(HttpResponse::Ok(), length))
}

/// Read the CLI transcript.
#[utoipa::path(
    get, path = "/sessions/{id}/transcript", tag = "portable", operation_id = "get_transcript",
    params(("id" = Uuid, Path, description = "Session id"), GetTranscriptQuery),
    responses(
        (status = 200, description = "The transcript as JSONL (empty when none was uploaded): `application/x-ndjson`, or `application/octet-stream` when the request accepts that and not JSONL",
         content((String = "application/octet-stream"), (String = "application/x-ndjson")),
         headers(("X-Transcript-Length" = i64, description = "Its length in bytes"))),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_transcript(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: GetTranscriptQuery = params::query(&req)?;
    let at_version = match &q.at_version {
        None => None,
        Some(_) => {
            let v = params::non_negative("at_version", &q.at_version)?;
            if v < 1 {
                return Err(ApiError::parameter("at_version", "must be at least 1"));
            }
            Some(v)
        }
    };
    let id = existing_session(&state, &id).await?;
    let chunks = state.store.transcript(id, at_version).await?;
    let body: Vec<u8> = chunks.into_iter().flat_map(|c| c.bytes).collect();
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let octets =
        accept.contains("application/octet-stream") && !accept.contains("application/x-ndjson");
    Ok(HttpResponse::Ok()
        .insert_header((TRANSCRIPT_LENGTH, body.len().to_string()))
        .content_type(if octets {
            "application/octet-stream"
        } else {
            "application/x-ndjson"
        })
        .body(body))
}

/// Fork a session as of one of its versions.
#[utoipa::path(
    post, path = "/sessions/{id}/fork", tag = "portable", operation_id = "fork_session",
    params(("id" = Uuid, Path, description = "The parent session's id")),
    request_body(content = Option<ForkRequest>, description = "JSON; may be empty (the latest version, paused, the parent's worker spec)"),
    responses(
        (status = 201, description = "The new session (`parent_session_id`, `forked_from`), with the parent's context and checkpoint as of that version and its transcript up to it", body = Session,
         headers(("Location" = String, description = "URL of the new session"), ("ETag" = String))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The parent kept changing; retry", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`at_version` out of range, an invalid worker spec or status", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn fork(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: OptionalJsonBody,
    meta: RequestMeta,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let dto: ForkRequest = match body.0 {
        None | Some(Value::Null) => ForkRequest::default(),
        Some(v @ Value::Object(_)) => parse_dto(v)?,
        Some(_) => {
            return Err(ApiError::Validation {
                field: None,
                detail: "the body must be a JSON object".into(),
            });
        }
    };
    let plan = ForkPlan {
        at_version: dto.at_version,
        worker: dto.worker,
        status: dto.status.map_or(SessionStatus::Paused, Into::into),
    };
    let forked = state.store.fork(id, &plan, &meta.0).await?;
    for a in &forked.appended {
        state.after_commit(Some(a));
    }
    Ok(with_session(created(&forked.child), forked.child))
}

fn document(dump: SessionDump) -> Result<SessionExport, ApiError> {
    let mut transcript = Vec::new();
    let mut chunks = Vec::new();
    for c in dump.transcript {
        chunks.push(WireChunk {
            offset: c.offset,
            version: c.version,
        });
        transcript.extend_from_slice(&c.bytes);
    }
    let transcript = String::from_utf8(transcript)
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("a stored transcript is not UTF-8")))?;
    let mut messages = Vec::with_capacity(dump.messages.len());
    for m in dump.messages {
        let Value::Object(message) = m.message else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "stored message {} is not an object",
                m.seq
            )));
        };
        messages.push(ExportedMessage {
            seq: m.seq,
            created_at: format_time(&m.created_at),
            message,
        });
    }
    Ok(SessionExport {
        format: EXPORT_FORMAT.to_owned(),
        format_version: EXPORT_FORMAT_VERSION,
        exported_at: format_time(&Utc::now()),
        session: Session::from(&dump.session),
        events: dump.events.iter().map(|e| e.envelope()).collect(),
        messages,
        inputs: dump.inputs,
        approvals: dump.approvals,
        transcript,
        transcript_chunks: Some(chunks),
    })
}

/// Export a session: one document with everything needed to recreate it.
#[utoipa::path(
    get, path = "/sessions/{id}/export", tag = "portable", operation_id = "export_session",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session, its events (with metadata, in version order), messages, inputs, approvals and transcript, read in one snapshot", body = SessionExport),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn export(
    state: web::Data<AppState>,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let id = session_id(&id)?;
    let dump = state
        .store
        .export(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))?;
    Ok(HttpResponse::Ok().json(document(dump)?))
}

fn invalid(field: impl Into<String>, detail: impl Into<String>) -> ApiError {
    ApiError::validation(field, detail)
}

fn instant(field: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| invalid(field, "must be an RFC 3339 timestamp"))
}

/// Check an export document and turn it into what the store writes: the
/// events fold into the session it carries, versions run 1, 2, 3 …, and
/// the rows under the (possibly new) id.
fn plan_import(doc: SessionExport, new_id: bool) -> Result<ImportPlan, ApiError> {
    if doc.format != EXPORT_FORMAT {
        return Err(invalid("format", format!("must be {EXPORT_FORMAT}")));
    }
    if doc.format_version != EXPORT_FORMAT_VERSION {
        return Err(invalid(
            "format_version",
            format!("must be {EXPORT_FORMAT_VERSION}"),
        ));
    }
    let from = doc.session.id;
    let id = if new_id { Uuid::now_v7() } else { from };
    if doc.events.is_empty() {
        return Err(invalid("events", "must hold the session's events"));
    }
    let at = format_time(&Utc::now());
    let mut events = Vec::with_capacity(doc.events.len());
    let mut ids = HashSet::new();
    for (i, e) in doc.events.into_iter().enumerate() {
        let field = |f: &str| format!("events[{i}].{f}");
        if e.version != i as i64 + 1 {
            return Err(invalid(
                field("version"),
                format!(
                    "versions must run 1, 2, 3 … without gaps: found {} where {} was expected",
                    e.version,
                    i + 1
                ),
            ));
        }
        if e.aggregate_id != from {
            return Err(invalid(field("aggregate_id"), "must be the session's id"));
        }
        if e.aggregate_type != crate::domain::event::AGGREGATE_TYPE {
            return Err(invalid(field("aggregate_type"), "must be session"));
        }
        if !ids.insert(e.event_id) {
            return Err(invalid(field("event_id"), "is repeated"));
        }
        let Some(meta) = e.metadata else {
            return Err(invalid(field("metadata"), "is required"));
        };
        let mut meta: EventMetadata = meta.into();
        let event_id = if new_id {
            event::new_event_id()
        } else {
            e.event_id
        };
        meta.imported = Some(ImportMarker {
            at: at.clone(),
            from_session_id: from,
            from_event_id: new_id.then_some(e.event_id),
            from_position: e.position,
        });
        events.push(StoredEvent {
            position: 0,
            event_id,
            aggregate_id: id,
            version: e.version,
            kind: e.event_type.into(),
            payload: e.payload,
            metadata: serde_json::to_value(&meta)
                .map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?,
            occurred_at: instant(&field("occurred_at"), &e.occurred_at)?,
        });
    }
    let session = match crate::store::fold(&events) {
        Err(e) => return Err(invalid("events", e)),
        Ok(None) => return Err(invalid("events", "the stream ends with session.deleted")),
        Ok(Some(s)) => s,
    };
    let mut served = Session::from(&session);
    served.id = from;
    // Times compare as instants, whatever RFC 3339 spelling carried them.
    let mut carried = doc.session;
    carried.created_at = format_time(&instant("session.created_at", &carried.created_at)?);
    carried.updated_at = format_time(&instant("session.updated_at", &carried.updated_at)?);
    if served != carried {
        let (a, b) = (
            serde_json::to_value(&served).unwrap_or_default(),
            serde_json::to_value(&carried).unwrap_or_default(),
        );
        let fields: Vec<String> = match (a, b) {
            (Value::Object(a), Value::Object(b)) => a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        return Err(invalid(
            "session",
            format!(
                "does not match the fold of its events (differs in: {})",
                fields.join(", ")
            ),
        ));
    }
    let mut messages = Vec::with_capacity(doc.messages.len());
    for (i, m) in doc.messages.into_iter().enumerate() {
        if m.seq != i as i64 + 1 {
            return Err(invalid(
                format!("messages[{i}].seq"),
                format!(
                    "must run 1, 2, 3 …: found {} where {} was expected",
                    m.seq,
                    i + 1
                ),
            ));
        }
        messages.push(StoredMessage {
            seq: m.seq,
            created_at: instant(&format!("messages[{i}].created_at"), &m.created_at)?,
            message: Value::Object(m.message),
        });
    }
    let mut inputs = Vec::with_capacity(doc.inputs.len());
    for (i, input) in doc.inputs.into_iter().enumerate() {
        let field = |f: &str| format!("inputs[{i}].{f}");
        if input.seq != i as i64 + 1 {
            return Err(invalid(field("seq"), "must run 1, 2, 3 …"));
        }
        instant(&field("created_at"), &input.created_at)?;
        // The input's version is that of the event that queued it.
        let version = events
            .iter()
            .find(|e| {
                e.payload.get("input_id").and_then(Value::as_str)
                    == Some(input.id.to_string().as_str())
            })
            .map(|e| e.version)
            .ok_or_else(|| invalid(field("id"), "no event of the session queued this input"))?;
        inputs.push((input, version));
    }
    if new_id {
        // Input ids are unique across sessions: the copy's inputs get new
        // ones, and the events that name them follow.
        for (input, _) in &mut inputs {
            let (from, to) = (input.id.to_string(), Uuid::new_v4());
            input.id = to;
            for e in &mut events {
                if let Some(v) = e.payload.get_mut("input_id")
                    && v.as_str() == Some(from.as_str())
                {
                    *v = Value::String(to.to_string());
                }
            }
        }
    }
    let mut request_ids = HashSet::new();
    for (i, a) in doc.approvals.iter().enumerate() {
        let field = |f: &str| format!("approvals[{i}].{f}");
        if !request_ids.insert(a.request_id.clone()) {
            return Err(invalid(field("request_id"), "is repeated"));
        }
        if i64::try_from(a.generation).is_err() {
            return Err(invalid(field("generation"), "is out of range"));
        }
        instant(&field("requested_at"), &a.requested_at)?;
        if let Some(t) = &a.decided_at {
            instant(&field("decided_at"), t)?;
        }
    }
    let bytes = doc.transcript.into_bytes();
    let layout = doc.transcript_chunks.unwrap_or_else(|| {
        if bytes.is_empty() {
            Vec::new()
        } else {
            vec![WireChunk {
                offset: 0,
                version: session.version,
            }]
        }
    });
    let len = bytes.len() as i64;
    for (i, c) in layout.iter().enumerate() {
        let field = format!("transcript_chunks[{i}]");
        let starts_right = match i {
            0 => c.offset == 0,
            _ => c.offset > layout[i - 1].offset,
        };
        if !starts_right || c.offset >= len {
            return Err(invalid(
                field,
                "offsets must start at 0 and rise within the transcript",
            ));
        }
        if c.version < 1
            || c.version > session.version
            || (i > 0 && c.version < layout[i - 1].version)
        {
            return Err(invalid(
                field,
                "versions must rise within 1 and the session's version",
            ));
        }
    }
    let transcript: Vec<TranscriptChunk> = layout
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let end = layout.get(i + 1).map_or(len, |n| n.offset);
            TranscriptChunk {
                offset: c.offset,
                version: c.version,
                bytes: bytes[c.offset as usize..end as usize].to_vec(),
            }
        })
        .collect();
    if layout.is_empty() && !bytes.is_empty() {
        return Err(invalid("transcript_chunks", "must cover the transcript"));
    }
    let mut transcript = transcript;
    if new_id {
        // Renaming changes lengths: the chunks are renamed one by one.
        let name = id.to_string();
        let mut offset = 0;
        for c in &mut transcript {
            c.bytes = rename_session(&c.bytes, &name);
            c.offset = offset;
            offset += c.bytes.len() as i64;
        }
    }
    let mut session = session;
    session.id = id;
    Ok(ImportPlan {
        session,
        events,
        messages,
        inputs,
        approvals: doc.approvals,
        transcript,
    })
}

/// Import a session from an export document.
#[utoipa::path(
    post, path = "/sessions/import", tag = "portable", operation_id = "import_session",
    params(ImportQuery),
    request_body(content = SessionExport, description = "A document from `GET /sessions/{id}/export` (up to `api.max_import_bytes`)"),
    responses(
        (status = 201, description = "Imported: the session as now stored", body = Session,
         headers(("Location" = String, description = "URL of the session"), ("ETag" = String))),
        (status = 400, description = "Malformed JSON or parameter", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The session (or one of its event ids) already exists here", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Beyond `api.max_import_bytes`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported Content-Type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a valid export document: unknown format, a field of the wrong type, versions with a gap, events that do not fold into the session", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn import(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    _auth: Authorized<SessionsWrite>,
) -> Result<HttpResponse, ApiError> {
    let q: ImportQuery = params::query(&req)?;
    let new_id = match q.new_id.as_deref() {
        None => false,
        Some(v) => v
            .parse::<bool>()
            .map_err(|_| ApiError::parameter("new_id", "must be true or false"))?,
    };
    super::body::json_content_type(&req)?;
    let body = collect(declared_length(&req), payload, state.max_import_bytes).await?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let max_depth = req.app_data::<web::Data<BodyLimit>>().map_or(32, |l| l.1);
    check_depth(&value, max_depth + EXPORT_NESTING)?;
    if !value.is_object() {
        return Err(ApiError::Validation {
            field: None,
            detail: "the body must be a JSON object".into(),
        });
    }
    let doc: SessionExport = parse_dto(value)?;
    let plan = plan_import(doc, new_id)?;
    let appended = state.store.import(&plan).await?;
    state.after_commit(Some(&appended));
    Ok(with_session(created(&plan.session), plan.session))
}
