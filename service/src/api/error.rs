//! The API's error type: every failure becomes `application/problem+json`
//! with a stable `type`. Server-side causes are logged once, here, and never
//! sent to the client.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};

use crate::contract::{FieldProblem, Problem};
use crate::domain::DomainError;
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The stored transcript's length in bytes, on transcript answers.
pub const TRANSCRIPT_LENGTH: &str = "x-transcript-length";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{detail}")]
    Validation {
        field: Option<String>,
        detail: String,
    },
    #[error("{detail}")]
    BadParameter { field: String, detail: String },
    #[error("unsupported Content-Type {0}; send application/json or application/merge-patch+json")]
    UnsupportedMediaType(String),
    #[error("the body exceeds the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// Over a limit of the stored data (a transcript's total size).
    #[error("{0}")]
    TooLarge(String),
    /// A transcript upload that does not fit; answered with the stored
    /// length in `X-Transcript-Length`.
    #[error("{detail}")]
    TranscriptConflict { detail: String, length: i64 },
    /// One field is over its own limit (an input's `text`).
    #[error("{field} exceeds the limit of {limit} bytes")]
    FieldTooLarge { field: &'static str, limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("If-Match {expected} does not match the session's version {actual}")]
    PreconditionFailed { expected: i64, actual: i64 },
    #[error(
        "If-Match W/\"{tag}\" is a weak tag, which never matches; send the strong tag \"{actual}\""
    )]
    WeakPrecondition { tag: i64, actual: i64 },
    #[error("{0}")]
    IllegalTransition(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    IdempotentTargetGone(String),
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("{0}")]
    Unauthorized(String),
    #[error("this token lacks the scope {0}")]
    Forbidden(&'static str),
    #[error("too many requests for this token; retry in {0} s")]
    RateLimited(u64),
    #[error("a dependency is unavailable; retry shortly")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Validation {
            field: Some(field.into()),
            detail: detail.into(),
        }
    }

    pub fn parameter(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::BadParameter {
            field: field.into(),
            detail: detail.into(),
        }
    }

    fn slug(&self) -> (&'static str, &'static str) {
        match self {
            Self::MalformedJson(_) => ("malformed-json", "Malformed JSON"),
            Self::Validation { .. } => ("validation", "Invalid request"),
            Self::BadParameter { .. } => ("invalid-parameter", "Invalid parameter"),
            Self::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            Self::PayloadTooLarge(_) | Self::FieldTooLarge { .. } | Self::TooLarge(_) => {
                ("payload-too-large", "Payload too large")
            }
            Self::NotFound(_) => ("not-found", "Not found"),
            Self::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            Self::PreconditionFailed { .. } | Self::WeakPrecondition { .. } => {
                ("version-mismatch", "Version mismatch")
            }
            Self::IllegalTransition(_) => ("illegal-transition", "Illegal status transition"),
            Self::Conflict(_) | Self::IdempotentTargetGone(_) | Self::TranscriptConflict { .. } => {
                ("conflict", "Conflict")
            }
            Self::IdempotencyKeyReused => ("idempotency-key-reused", "Idempotency key reused"),
            Self::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            Self::Forbidden(_) => ("forbidden", "Forbidden"),
            Self::RateLimited(_) => ("rate-limited", "Too many requests"),
            Self::Unavailable(_) => ("unavailable", "Service unavailable"),
            Self::Internal(_) => ("internal", "Internal error"),
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            Self::Validation { field, .. } => field.clone(),
            Self::BadParameter { field, .. } => Some(field.clone()),
            Self::FieldTooLarge { field, .. } => Some((*field).to_owned()),
            Self::PreconditionFailed { .. } | Self::WeakPrecondition { .. } => {
                Some("If-Match".into())
            }
            Self::IllegalTransition(_) => Some("status".into()),
            Self::UnsupportedMediaType(_) => Some("Content-Type".into()),
            Self::IdempotentTargetGone(_) => Some("Idempotency-Key".into()),
            Self::TranscriptConflict { .. } => Some("offset".into()),
            Self::IdempotencyKeyReused => Some("Idempotency-Key".into()),
            _ => None,
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug();
        let field = self.field();
        Problem {
            kind: format!("urn:agent-sessions:problem:{slug}"),
            title: title.to_owned(),
            status: self.status_code().as_u16(),
            detail: self.to_string(),
            errors: field
                .iter()
                .map(|f| FieldProblem {
                    field: f.clone(),
                    detail: self.to_string(),
                })
                .collect(),
            field,
            instance: None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::BadParameter { .. } => StatusCode::BAD_REQUEST,
            Self::Validation { .. } | Self::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) | Self::FieldTooLarge { .. } | Self::TooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::PreconditionFailed { .. } | Self::WeakPrecondition { .. } => {
                StatusCode::PRECONDITION_FAILED
            }
            Self::IllegalTransition(_)
            | Self::Conflict(_)
            | Self::IdempotentTargetGone(_)
            | Self::TranscriptConflict { .. } => StatusCode::CONFLICT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Unavailable(e) => {
                tracing::warn!(error = ?e, "request failed: dependency unavailable")
            }
            Self::Internal(e) => tracing::error!(error = ?e, "request failed"),
            _ => {}
        }
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
        match self {
            Self::Unavailable(_) => {
                res.insert_header((header::RETRY_AFTER, "1"));
            }
            Self::RateLimited(secs) => {
                res.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            Self::TranscriptConflict { length, .. } => {
                res.insert_header((TRANSCRIPT_LENGTH, length.to_string()));
            }
            Self::Unauthorized(_) => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"agent-sessions\", error=\"invalid_token\"",
                ));
            }
            Self::Forbidden(scope) => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    format!("Bearer realm=\"agent-sessions\", error=\"insufficient_scope\", scope=\"{scope}\""),
                ));
            }
            _ => {}
        }
        // A problem is strings and numbers; should it ever fail, answer with
        // the status alone rather than panic.
        res.body(serde_json::to_string(&self.problem()).unwrap_or_default())
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::InvalidField { field, detail } => Self::Validation {
                detail: format!("{field} {detail}"),
                field: Some(field),
            },
            e @ DomainError::IllegalTransition { .. } => Self::IllegalTransition(e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => Self::NotFound(format!("session {id} not found")),
            StoreError::Missing(m) => Self::NotFound(m),
            StoreError::Refused(m) => Self::Conflict(m),
            StoreError::TranscriptConflict { detail, length } => {
                Self::TranscriptConflict { detail, length }
            }
            StoreError::TooLarge(m) => Self::TooLarge(m),
            StoreError::VersionMismatch { expected, actual } => {
                Self::PreconditionFailed { expected, actual }
            }
            StoreError::Domain(d) => d.into(),
            StoreError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            e @ StoreError::IdempotentTargetGone(_) => Self::IdempotentTargetGone(e.to_string()),
            e @ StoreError::Contended(_) => Self::Conflict(e.to_string()),
            StoreError::Unstorable(m) => Self::Validation {
                field: None,
                detail: format!("the request holds a value that cannot be stored: {m}"),
            },
            e @ (StoreError::Unavailable(_) | StoreError::TimedOut(_)) => Self::Unavailable(e),
            e @ (StoreError::Database(_) | StoreError::Corrupt(_)) => Self::Internal(e.into()),
        }
    }
}
