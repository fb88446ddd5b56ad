//! The runner's HTTP client of the API service: the only way it reads or
//! writes sessions (it never touches PostgreSQL). Speaks the wire types of
//! `contract/`, so it shares no code with the server's handlers.

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::client::Endpoint;
pub use crate::client::{install_tls_provider, link_next};
use crate::contract::live::{Approval, ApprovalRequest, DecisionRequest, Input};
use crate::contract::{EventEnvelope, EventMetadata, Session, WorkerPatch};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the API: {0}")]
    Transport(#[from] reqwest::Error),
    /// `If-Match` named an older version: someone else wrote first.
    #[error("the session changed meanwhile (412)")]
    Stale,
    /// An illegal status transition.
    #[error("conflict (409): {0}")]
    Conflict(String),
    #[error("session not found (404)")]
    NotFound,
    #[error("the API answered {status}: {body}")]
    Status { status: StatusCode, body: String },
}

/// What became of a batch of worker messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Stored,
    /// The service has no messages endpoint yet (or the session is gone).
    NotAccepted,
}

#[derive(Clone, Debug)]
pub struct ApiClient {
    endpoint: Endpoint,
    /// Sent as `X-Request-Id`, so the events this client writes carry the
    /// request that caused them.
    request_id: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ApiError> {
        install_tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build()?;
        Ok(Self {
            endpoint: Endpoint::new(http, base, token),
            request_id: None,
        })
    }

    /// The same client, answering for the request `request_id`.
    pub fn for_request(&self, request_id: Option<String>) -> Self {
        Self {
            request_id,
            ..self.clone()
        }
    }

    /// The request id in the metadata of the event that made the session
    /// what it is at `version` (the change the runner is acting on).
    pub async fn cause_of(&self, id: Uuid, version: i64) -> Option<String> {
        self.metadata_at(id, version).await?.request_id
    }

    /// Who made the change that brought the session to `version`.
    pub async fn actor_of(&self, id: Uuid, version: i64) -> Option<String> {
        Some(self.metadata_at(id, version).await?.actor)
    }

    async fn metadata_at(&self, id: Uuid, version: i64) -> Option<EventMetadata> {
        let path = format!(
            "/sessions/{id}/events?after_version={}&limit=1",
            version - 1
        );
        let res = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .ok()?;
        let events: Vec<EventEnvelope> = res.json().await.ok()?;
        events.into_iter().next()?.metadata
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.endpoint.request(method, path);
        match &self.request_id {
            Some(r) => rb.header("x-request-id", r),
            None => rb,
        }
    }

    async fn fail(res: reqwest::Response) -> ApiError {
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        match status {
            StatusCode::NOT_FOUND => ApiError::NotFound,
            StatusCode::PRECONDITION_FAILED => ApiError::Stale,
            StatusCode::CONFLICT => ApiError::Conflict(body),
            _ => ApiError::Status { status, body },
        }
    }

    /// The session, or `None` when it does not exist (any more).
    #[instrument(skip(self), fields(session_id = %id), level = "debug")]
    pub async fn session(&self, id: Uuid) -> Result<Option<Session>, ApiError> {
        let res = self
            .request(reqwest::Method::GET, &format!("/sessions/{id}"))
            .send()
            .await?;
        if res.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(Some(res.json().await?))
    }

    /// RFC 7396 merge patch, optionally only at `if_match` version.
    #[instrument(skip(self, patch), fields(session_id = %id), level = "debug")]
    pub async fn merge_patch(
        &self,
        id: Uuid,
        patch: &Value,
        if_match: Option<i64>,
    ) -> Result<Session, ApiError> {
        let mut rb = self
            .request(reqwest::Method::PATCH, &format!("/sessions/{id}"))
            .header(header::CONTENT_TYPE, "application/merge-patch+json")
            .body(patch.to_string());
        if let Some(v) = if_match {
            rb = rb.header(header::IF_MATCH, format!("\"{v}\""));
        }
        let res = rb.send().await?;
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(res.json().await?)
    }

    /// Write the worker record (and maybe the status) as a merge patch.
    pub async fn patch_worker(
        &self,
        id: Uuid,
        patch: &WorkerPatch,
        if_match: Option<i64>,
    ) -> Result<Session, ApiError> {
        self.merge_patch(id, &patch.to_json(), if_match).await
    }

    /// Every session with a worker spec on `backend` whose status is one of
    /// `statuses`, following `Link: rel="next"`.
    #[instrument(skip(self), level = "debug")]
    pub async fn managed_sessions(
        &self,
        backend: &str,
        statuses: &str,
    ) -> Result<Vec<Session>, ApiError> {
        let mut next = Some(format!(
            "/sessions/?has_worker=true&runtime_backend={backend}&status={statuses}&limit=500"
        ));
        let mut all = Vec::new();
        while let Some(path) = next.take() {
            let res = self.request(reqwest::Method::GET, &path).send().await?;
            if !res.status().is_success() {
                return Err(Self::fail(res).await);
            }
            next = link_next(res.headers());
            let page: Vec<Session> = res.json().await?;
            if page.is_empty() {
                break;
            }
            all.extend(page);
        }
        Ok(all)
    }

    /// One page of the global feed after `after`; with a non-zero `wait`
    /// the API holds the request (a long-poll) until an event is there or
    /// the wait is over.
    pub async fn events(
        &self,
        after: i64,
        limit: u32,
        wait: Duration,
    ) -> Result<Vec<EventEnvelope>, ApiError> {
        let res = self
            .request(
                reqwest::Method::GET,
                &format!(
                    "/events?after={after}&limit={limit}&wait={}",
                    wait.as_secs()
                ),
            )
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(res.json().await?)
    }

    /// The session's inputs after `after` (by `seq`), oldest first; none
    /// when the session is gone (or the API keeps no inputs).
    #[instrument(skip(self), fields(session_id = %id), level = "debug")]
    pub async fn inputs(&self, id: Uuid, after: i64) -> Result<Vec<Input>, ApiError> {
        let res = self
            .request(
                reqwest::Method::GET,
                &format!("/sessions/{id}/inputs?after={after}&limit=100"),
            )
            .send()
            .await?;
        if res.status() == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(res.json().await?)
    }

    /// Record a tool approval the worker asks for (idempotent by request
    /// id: asking again answers the approval as stored, decided or not).
    #[instrument(skip(self, req), fields(session_id = %id, request_id = %req.request_id), level = "debug")]
    pub async fn request_approval(
        &self,
        id: Uuid,
        req: &ApprovalRequest,
    ) -> Result<Approval, ApiError> {
        let res = self
            .request(reqwest::Method::POST, &format!("/sessions/{id}/approvals"))
            .json(req)
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(res.json().await?)
    }

    /// Decide a tool approval (the runner does so only for a timeout).
    #[instrument(skip(self, d), fields(session_id = %id), level = "debug")]
    pub async fn decide(
        &self,
        id: Uuid,
        request_id: &str,
        d: &DecisionRequest,
    ) -> Result<(), ApiError> {
        let res = self
            .request(
                reqwest::Method::POST,
                &format!(
                    "/sessions/{id}/approvals/{}",
                    utf8_percent_encode(request_id, NON_ALPHANUMERIC)
                ),
            )
            .json(d)
            .send()
            .await?;
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(())
    }

    /// Store transcript bytes at byte `offset` (the service keeps each byte
    /// once, however often it is sent).
    #[instrument(skip(self, bytes), fields(session_id = %id, offset, len = bytes.len()), level = "debug")]
    pub async fn put_transcript(
        &self,
        id: Uuid,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<Shipped, ApiError> {
        let res = self
            .request(
                reqwest::Method::PUT,
                &format!("/sessions/{id}/transcript?offset={offset}"),
            )
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(bytes)
            .send()
            .await?;
        let status = res.status();
        // The stored length rides on every answer (`X-Transcript-Length`).
        let length = res
            .headers()
            .get("x-transcript-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match (status, length) {
            (s, Some(length)) if s.is_success() => Ok(Shipped::Stored { length }),
            // Stored less than the offset: a gap to fill from `length`.
            (StatusCode::CONFLICT, Some(length)) if length < offset => Ok(Shipped::Gap { length }),
            (StatusCode::CONFLICT, _) => Ok(Shipped::Conflict),
            _ => Err(Self::fail(res).await),
        }
    }

    /// The session's transcript as the service stores it (empty if none).
    #[instrument(skip(self), fields(session_id = %id), level = "debug")]
    pub async fn transcript(&self, id: Uuid) -> Result<Vec<u8>, ApiError> {
        let res = self
            .request(reqwest::Method::GET, &format!("/sessions/{id}/transcript"))
            .timeout(Duration::from_secs(300))
            .send()
            .await?;
        if res.status() == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !res.status().is_success() {
            return Err(Self::fail(res).await);
        }
        Ok(res.bytes().await?.to_vec())
    }

    /// Store the worker's stream-json lines, unmodified, as the session's messages.
    #[instrument(skip(self, messages), fields(session_id = %id, count = messages.len()), level = "debug")]
    pub async fn post_messages(&self, id: Uuid, messages: &[Value]) -> Result<Posted, ApiError> {
        let res = self
            .request(reqwest::Method::POST, &format!("/sessions/{id}/messages"))
            .json(messages)
            .send()
            .await?;
        match res.status() {
            s if s.is_success() => Ok(Posted::Stored),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(Posted::NotAccepted),
            _ => Err(Self::fail(res).await),
        }
    }
}

/// What the service said to a transcript chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Stored; the transcript is now this long.
    Stored { length: u64 },
    /// The chunk starts beyond the stored transcript, which is this long.
    Gap { length: u64 },
    /// The chunk disagrees with what is stored.
    Conflict,
}
