//! The CLI's transcript (`CLAUDE_CONFIG_DIR/projects/<cwd slug>/<id>.jsonl`)
//! kept in the service, so a session can resume where its workspace is
//! gone: the `Shipper` sends what the file gained, complete lines only, as
//! chunks the service stores once whatever is sent twice; before a
//! `--resume` on a workspace without the file, the backend writes it back
//! from the service.
//!
//! The bytes come from one of two places, both through the one `Shipper`:
//! the file itself (the local backend tails it) or a [`Relay`] of what a
//! pod's `worker-shim` printed (offset and lines, in the pod's log).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
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

/// Where the CLI keeps the transcript of session `id` run in `cwd`:
/// `<config dir>/projects/<cwd with every character but letters and digits
/// as '-'>/<id>.jsonl`.
pub fn path_for(config_dir: &Path, cwd: &Path, id: Uuid) -> PathBuf {
    let slug: String = cwd
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    config_dir
        .join("projects")
        .join(slug)
        .join(format!("{id}.jsonl"))
}

/// The transcript of session `id` wherever the CLI put it under
/// `config_dir` (any project directory).
pub fn find(config_dir: &Path, id: Uuid) -> Option<PathBuf> {
    let name = format!("{id}.jsonl");
    std::fs::read_dir(config_dir.join("projects"))
        .ok()?
        .flatten()
        .map(|d| d.path().join(&name))
        .find(|p| p.is_file())
}

/// Where a `Shipper` reads the transcript's bytes.
pub trait Source {
    /// Complete lines from byte `offset` (at most about `MAX_CHUNK`);
    /// `None` when there is none yet.
    fn lines_from(&mut self, offset: u64) -> std::io::Result<Option<Vec<u8>>>;
}

/// The transcript file itself.
struct File<'a>(&'a Path);

impl Source for File<'_> {
    fn lines_from(&mut self, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
        read_lines_from(self.0, offset)
    }
}

/// The transcript's bytes as relayed from elsewhere (a pod's shim prints
/// them with their offsets): kept from the first byte the service may lack
/// until it has them.
#[derive(Debug, Default)]
pub struct Relay {
    /// The offset of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
}

impl Relay {
    pub fn new(start: u64) -> Self {
        Self {
            start,
            bytes: Vec::new(),
        }
    }

    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// `data` is the transcript from byte `offset`: keep what is new. A
    /// piece beyond what is held (bytes missed) restarts the relay there.
    pub fn push(&mut self, offset: u64, data: &[u8]) {
        let end = self.end();
        if offset > end {
            self.start = offset;
            self.bytes.clear();
            self.bytes.extend_from_slice(data);
        } else if let Some(new) = data.get(usize::try_from(end - offset).unwrap_or(usize::MAX)..) {
            self.bytes.extend_from_slice(new);
        }
    }

    /// The service holds everything before `offset`: let it go.
    pub fn shipped(&mut self, offset: u64) {
        if offset >= self.end() {
            self.start = offset;
            self.bytes.clear();
        } else if offset > self.start {
            self.bytes
                .drain(..usize::try_from(offset - self.start).unwrap_or(0));
            self.start = offset;
        }
    }
}

impl Source for Relay {
    fn lines_from(&mut self, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
        if offset < self.start {
            return Err(std::io::Error::other(format!(
                "the service needs the transcript from byte {offset}; the relay starts at {}",
                self.start
            )));
        }
        let from = usize::try_from(offset - self.start).unwrap_or(usize::MAX);
        let Some(rest) = self.bytes.get(from..) else {
            return Ok(None);
        };
        Ok(complete_lines(rest, MAX_CHUNK as usize).map(<[u8]>::to_vec))
    }
}

/// The complete lines at the start of `bytes`, at most `max` bytes of them
/// (or the first line whole, if longer).
fn complete_lines(bytes: &[u8], max: usize) -> Option<&[u8]> {
    let head = &bytes[..bytes.len().min(max)];
    let end = head
        .iter()
        .rposition(|b| *b == b'\n')
        .or_else(|| bytes.iter().position(|b| *b == b'\n'))?;
    Some(&bytes[..=end])
}

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

    /// When a failed send is due again, if one failed.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| !self.refused)
    }

    /// Send what `path` holds beyond what the service has, in complete
    /// lines; `Some(new offset)` when the service took something.
    pub async fn ship(&mut self, path: &Path) -> Option<u64> {
        self.ship_from(&mut File(path)).await
    }

    /// The worker ended: send the rest now, trying a few times whatever
    /// backoff an earlier failure set.
    pub async fn finish(&mut self, path: &Path) -> Option<u64> {
        self.finish_from(&mut File(path)).await
    }

    /// [`Self::finish`] from any source.
    pub async fn finish_from(&mut self, source: &mut impl Source) -> Option<u64> {
        let mut shipped = None;
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            self.retry_at = None;
            shipped = self.ship_from(source).await.or(shipped);
            if self.retry_at.is_none() {
                break;
            }
        }
        shipped
    }

    /// Send what `source` holds beyond what the service has.
    pub async fn ship_from(&mut self, source: &mut impl Source) -> Option<u64> {
        if self.refused || self.retry_at.is_some_and(|t| t > Instant::now()) {
            return None;
        }
        let before = self.offset;
        loop {
            let chunk = match source.lines_from(self.offset) {
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
pub fn read_lines_from(path: &Path, from: u64) -> std::io::Result<Option<Vec<u8>>> {
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

    #[test]
    fn a_relay_holds_what_the_service_lacks_in_complete_lines() {
        let mut r = Relay::new(10);
        r.push(10, b"{\"a\":1}\n{\"b\"");
        assert_eq!(r.lines_from(10).unwrap().unwrap(), b"{\"a\":1}\n");
        // A repeated piece adds nothing; the rest of the line completes it.
        r.push(10, b"{\"a\":1}\n");
        r.push(18, b"{\"b\":2}\n");
        assert_eq!(r.lines_from(18).unwrap().unwrap(), b"{\"b\":2}\n");
        assert_eq!(r.lines_from(26).unwrap(), None);
        r.shipped(18);
        assert!(r.lines_from(10).is_err(), "let go once shipped");
        assert_eq!(r.lines_from(18).unwrap().unwrap(), b"{\"b\":2}\n");
        // Bytes missed: it starts again where the next piece does.
        r.push(40, b"{}\n");
        assert_eq!(r.lines_from(40).unwrap().unwrap(), b"{}\n");
    }
}
