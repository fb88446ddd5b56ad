//! The CLI's transcript (`CLAUDE_CONFIG_DIR/projects/<cwd slug>/<id>.jsonl`)
//! kept in the service, so a session can resume where its workspace is
//! gone: the `Shipper` sends what the file gained, complete lines only, as
//! chunks the service stores once whatever is sent twice; before a
//! `--resume` on a workspace without the file, the backend writes it back
//! from the service.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use super::api::{ApiClient, ApiError, Shipped};
use crate::backoff::Backoff;

/// The most sent in one request.
const MAX_CHUNK: u64 = 1 << 20;

/// Settings every worker gets: the CLI never deletes a transcript.
pub const WORKER_SETTINGS: &str = r#"{"cleanupPeriodDays": 36500}"#;

pub struct Shipper {
    api: ApiClient,
    session_id: Uuid,
    /// Bytes the service holds.
    offset: u64,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// The service refuses this transcript (too large, or it conflicts
    /// with what is stored): stop sending it.
    refused: bool,
}

impl Shipper {
    pub fn new(api: ApiClient, session_id: Uuid, offset: u64) -> Self {
        Self {
            api,
            session_id,
            offset,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            refused: false,
        }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Send what `path` holds beyond what the service has, in complete
    /// lines; `Some(new offset)` when the service took something.
    pub async fn ship(&mut self, path: &Path) -> Option<u64> {
        if self.refused || self.retry_at.is_some_and(|t| t > Instant::now()) {
            return None;
        }
        let before = self.offset;
        loop {
            let chunk = match read_lines_from(path, self.offset) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "cannot read the transcript");
                    break;
                }
            };
            match self
                .api
                .put_transcript(self.session_id, self.offset, chunk)
                .await
            {
                Ok(Shipped::Stored { length }) => {
                    self.offset = length;
                    self.backoff.reset();
                    self.retry_at = None;
                }
                // The service has less than we thought: send from there.
                Ok(Shipped::Gap { length }) => self.offset = length,
                Ok(Shipped::Conflict) => {
                    warn!(
                        offset = self.offset,
                        "the service's transcript conflicts with the worker's; not sending it"
                    );
                    self.refused = true;
                    break;
                }
                Err(ApiError::Status { status, .. })
                    if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE =>
                {
                    warn!("the transcript outgrew the service's limit; not sending more");
                    self.refused = true;
                    break;
                }
                Err(ApiError::NotFound) => {
                    self.refused = true;
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "sending the transcript failed; will retry");
                    self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                    break;
                }
            }
        }
        (self.offset != before).then_some(self.offset)
    }
}

/// The complete lines of `path` from byte `from`, at most `MAX_CHUNK`
/// (or one longer line); `None` when there is none yet.
fn read_lines_from(path: &Path, from: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len <= from {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    (&mut f)
        .take((len - from).min(MAX_CHUNK))
        .read_to_end(&mut buf)?;
    match buf.iter().rposition(|b| *b == b'\n') {
        Some(end) => {
            buf.truncate(end + 1);
            Ok(Some(buf))
        }
        None if len - from > MAX_CHUNK => {
            // One line longer than a chunk: send it whole once it ends.
            let mut rest = Vec::new();
            f.seek(SeekFrom::Start(from))?;
            f.read_to_end(&mut rest)?;
            Ok(rest
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|end| rest[..=end].to_vec()))
        }
        None => Ok(None),
    }
}

/// Write a transcript back where the CLI will look for it.
pub fn restore(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("jsonl.restoring");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_lines_are_read() {
        let dir = std::env::temp_dir().join(format!("as-transcript-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        assert_eq!(
            read_lines_from(&p, 0).unwrap().unwrap(),
            b"{\"a\":1}\n{\"b\":2}\n"
        );
        assert_eq!(read_lines_from(&p, 16).unwrap(), None, "half a line waits");
        restore(&dir.join("x/y/t.jsonl"), b"{}\n").unwrap();
        assert_eq!(std::fs::read(dir.join("x/y/t.jsonl")).unwrap(), b"{}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
