//! A worker's stream-json lines on their way to `POST /sessions/{id}/messages`,
//! in batches: both backends feed their lines here.
//!
//! Lines go as soon as they are read, with no timer: a batch is whatever the
//! worker printed while the previous post was in flight (natural batching),
//! up to `runner.message_batch` lines, so a quiet worker's line reaches the
//! API at once and a busy one's lines share requests. What
//! the API answers decides what happens to it: stored, the lines are done; a
//! 413 halves the batch and tries again; any other 4xx (or a 413 for a
//! single line) skips the batch, since sending it again cannot help and must
//! not hold back the session's later lines; a 404 or 405 means the API has
//! no messages endpoint, so posting stops; anything else (the API away, a
//! 5xx) keeps the lines and tries again after a backoff. The worker's own
//! output (the file or the pod log) keeps every line either way.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use super::api::{ApiClient, ApiError, Posted};
use crate::backoff::Backoff;

/// Lines kept while the API is away; older ones are dropped first.
const MAX_PENDING: usize = 10_000;

pub struct Poster {
    api: ApiClient,
    session_id: Uuid,
    batch: usize,
    /// Each line with its mark: where it ends in the worker's output.
    pending: VecDeque<(Value, u64)>,
    /// When the oldest pending line arrived.
    oldest: Option<Instant>,
    /// A failed post is tried again no sooner than this.
    retry_at: Option<Instant>,
    retry: Backoff,
    /// The mark of the last line dealt with (stored or skipped), until taken.
    progress: Option<u64>,
    /// The API has no messages endpoint: stop trying.
    disabled: bool,
}

impl Poster {
    pub fn new(api: ApiClient, session_id: Uuid, batch: usize) -> Self {
        Self {
            api,
            session_id,
            batch: batch.max(1),
            pending: VecDeque::new(),
            oldest: None,
            retry_at: None,
            retry: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            progress: None,
            disabled: false,
        }
    }

    pub fn push(&mut self, line: Value, mark: u64) {
        if self.disabled {
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            // Bound memory while the API stays away.
            self.pending.pop_front();
        }
        self.pending.push_back((line, mark));
        self.oldest.get_or_insert_with(Instant::now);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When `flush(false)` will next have something to send.
    pub fn due_at(&self) -> Option<Instant> {
        if self.disabled {
            return None;
        }
        let ready = self.oldest?;
        Some(self.retry_at.map_or(ready, |r| r.max(ready)))
    }

    /// The mark of the last line dealt with since the previous call.
    pub fn take_progress(&mut self) -> Option<u64> {
        self.progress.take()
    }

    /// Send what is due (everything, with `force`) until done or a failure
    /// that a retry may cure.
    pub async fn flush(&mut self, force: bool) {
        if !force && self.due_at().is_none_or(|at| at > Instant::now()) {
            return;
        }
        let mut size = self.batch;
        while !self.pending.is_empty() && !self.disabled {
            let n = self.pending.len().min(size);
            let lines: Vec<Value> = self
                .pending
                .iter()
                .take(n)
                .map(|(v, _)| v.clone())
                .collect();
            match self.api.post_messages(self.session_id, &lines).await {
                Ok(Posted::Stored) => self.done(n),
                Ok(Posted::NotAccepted) => {
                    info!("the API does not take worker messages (404); not posting them");
                    self.disabled = true;
                    self.pending.clear();
                }
                Err(ApiError::Status { status, .. })
                    if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE && n > 1 =>
                {
                    size = (n / 2).max(1);
                }
                Err(ApiError::Status { status, body }) if status.is_client_error() => {
                    warn!(%status, %body, count = n, "the API refused worker messages; skipped");
                    self.done(n);
                }
                Err(e) => {
                    warn!(error = %e, count = n, "posting worker messages failed; will retry");
                    self.retry_at = Some(Instant::now() + self.retry.next_delay());
                    return;
                }
            }
        }
        self.oldest = None;
    }

    /// The first `n` lines are dealt with.
    fn done(&mut self, n: usize) {
        if let Some((_, mark)) = self.pending.drain(..n).next_back() {
            self.progress = Some(mark);
        }
        self.retry.reset();
        self.retry_at = None;
        self.oldest = (!self.pending.is_empty()).then(Instant::now);
    }

    /// The worker ended: send the rest, trying a few times.
    pub async fn finish(&mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        for _ in 0..3 {
            self.flush(true).await;
            if self.pending.is_empty() || self.disabled {
                return;
            }
            backoff.wait().await;
        }
        warn!(
            count = self.pending.len(),
            "worker messages not posted; the worker's output keeps them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn poster(batch: usize) -> Poster {
        let api = ApiClient::new("http://127.0.0.1:9", None).expect("client");
        Poster::new(api, Uuid::nil(), batch)
    }

    #[tokio::test]
    async fn lines_are_due_at_once() {
        let mut p = poster(2);
        assert_eq!(p.due_at(), None, "nothing to send");
        p.push(json!({"n": 1}), 10);
        assert!(
            p.due_at().expect("due") <= Instant::now(),
            "a lone line waits for nothing"
        );
        p.push(json!({"n": 2}), 20);
        assert!(p.due_at().expect("due") <= Instant::now(), "full: due now");
        assert!(!p.is_empty());
        assert_eq!(p.take_progress(), None, "nothing dealt with yet");
    }

    #[tokio::test]
    async fn an_unreachable_api_keeps_the_lines_and_backs_off() {
        let mut p = poster(1);
        p.push(json!({"n": 1}), 10);
        p.flush(true).await;
        assert!(!p.is_empty(), "kept for a retry");
        assert_eq!(p.take_progress(), None);
        let retry = p.due_at().expect("retried later");
        assert!(retry > Instant::now(), "not before the backoff");
    }
}
