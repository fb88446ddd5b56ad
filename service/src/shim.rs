//! `agent-sessions worker-shim -- <program> <args…>`: the entrypoint of a
//! worker pod, between the container runtime and the Claude Code CLI. It
//! gives the pod's transcript a way in and out over the channels the runner
//! already holds (the attach for stdin, the log for output), so the pod
//! needs no token of its own:
//!
//! - in: before the CLI starts, the runner writes framing lines to stdin:
//!   optionally `{"agent_sessions":"restore","length":N}` and N raw bytes
//!   (the transcript to put back where the CLI looks for it), then
//!   `{"agent_sessions":"start"}` (optionally with `"offset"`: the bytes of
//!   the transcript the service already holds). The shim reads exactly
//!   those bytes, never more: the rest of stdin is the CLI's, inherited.
//! - out: stderr carries `{"type":"agent_sessions.started"}` once the
//!   framing is taken, then `{"type":"agent_sessions.transcript","offset":…,
//!   "data":…}` for every run of complete lines the transcript file gains
//!   (checked every 200 ms), among the CLI's own stderr lines, which the
//!   shim passes on whole.
//!
//! It forwards SIGTERM and SIGINT to the CLI, reaps what is left to it (it
//! is the container's process 1), and exits with the CLI's status.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use uuid::Uuid;

use crate::runner::transcript;

/// The environment variable with the session (and Claude session) id.
pub const SESSION_ID_ENV: &str = "AGENT_SESSIONS_SESSION_ID";
/// The stderr line saying the framing is taken.
pub const STARTED: &str = "agent_sessions.started";
/// The stderr lines with the transcript's new bytes.
pub const TRANSCRIPT: &str = "agent_sessions.transcript";
/// The largest piece of transcript in one stderr line.
const PIECE: usize = 256 * 1024;
/// The longest framing line.
const MAX_FRAME_LINE: usize = 64 * 1024;
const POLL: Duration = Duration::from_millis(200);

/// One framing line.
#[derive(Debug, Deserialize)]
#[serde(tag = "agent_sessions", rename_all = "snake_case", deny_unknown_fields)]
enum Frame {
    Restore {
        length: u64,
        /// Where to write it (under `CLAUDE_CONFIG_DIR`); by default where
        /// the CLI will look for it, from the shim's working directory.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    Start {
        #[serde(default)]
        offset: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShimError {
    #[error("reading the framing from stdin: {0}")]
    Io(String),
    #[error("stdin ended before the start frame")]
    Eof,
    #[error("not a framing line: {0}")]
    NotAFrame(String),
    #[error("a restore needs CLAUDE_CONFIG_DIR and {SESSION_ID_ENV}")]
    NoTranscript,
    #[error("refusing to restore outside CLAUDE_CONFIG_DIR: {0}")]
    Outside(String),
}

/// Where the worker's transcript is, as the shim's environment says.
#[derive(Debug, Clone)]
pub struct Place {
    pub config_dir: PathBuf,
    pub session_id: Uuid,
    pub cwd: PathBuf,
}

impl Place {
    fn from_env() -> Option<Self> {
        Some(Self {
            config_dir: PathBuf::from(std::env::var_os("CLAUDE_CONFIG_DIR")?),
            session_id: std::env::var(SESSION_ID_ENV).ok()?.parse().ok()?,
            cwd: std::env::current_dir().ok()?,
        })
    }
}

/// What the framing said.
#[derive(Debug, PartialEq, Eq)]
pub struct Framed {
    /// The transcript written back, and its length.
    pub restored: Option<(PathBuf, u64)>,
    /// Report the transcript from this byte on.
    pub offset: u64,
}

/// The framing a runner writes before anything else: the transcript to
/// restore, if any, and where the shim's reports start.
pub fn framing(restore: Option<&[u8]>, offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(bytes) = restore {
        out.extend_from_slice(
            json!({"agent_sessions": "restore", "length": bytes.len()})
                .to_string()
                .as_bytes(),
        );
        out.push(b'\n');
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(
        json!({"agent_sessions": "start", "offset": offset})
            .to_string()
            .as_bytes(),
    );
    out.push(b'\n');
    out
}

/// A line of the shim's among a worker's output.
#[derive(Debug, PartialEq, Eq)]
pub enum Report<'a> {
    Started,
    Transcript { offset: u64, data: &'a str },
}

/// What `line` reports, if it is the shim's.
pub fn report(line: &serde_json::Value) -> Option<Report<'_>> {
    match line.get("type")?.as_str()? {
        STARTED => Some(Report::Started),
        TRANSCRIPT => Some(Report::Transcript {
            offset: line.get("offset")?.as_u64()?,
            data: line.get("data")?.as_str()?,
        }),
        _ => None,
    }
}

/// One line (with its `\n`), a byte at a time: nothing past it is read.
fn read_line(r: &mut impl Read) -> Result<Option<Vec<u8>>, ShimError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(ShimError::Eof),
            Ok(_) if b[0] == b'\n' => return Ok(Some(line)),
            Ok(_) if line.len() >= MAX_FRAME_LINE => {
                return Err(ShimError::NotAFrame("a line too long".to_owned()));
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ShimError::Io(e.to_string())),
        }
    }
}

/// `path` itself, when it is absolute, plain (no `..`) and under `dir`.
fn under(dir: &Path, path: &Path) -> Result<PathBuf, ShimError> {
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if plain && path.starts_with(dir) && path != dir {
        Ok(path.to_owned())
    } else {
        Err(ShimError::Outside(path.display().to_string()))
    }
}

/// Read the framing from `r` (byte-exact) and do what it says.
pub fn read_framing(r: &mut impl Read, place: Option<&Place>) -> Result<Framed, ShimError> {
    let mut restored = None;
    loop {
        let line = read_line(r)?.ok_or(ShimError::Eof)?;
        let frame: Frame = serde_json::from_slice(&line).map_err(|_| {
            let text = String::from_utf8_lossy(&line);
            ShimError::NotAFrame(text.chars().take(200).collect())
        })?;
        match frame {
            Frame::Restore { length, path } => {
                let place = place.ok_or(ShimError::NoTranscript)?;
                let path = match path {
                    Some(p) => under(&place.config_dir, &p)?,
                    None => transcript::path_for(&place.config_dir, &place.cwd, place.session_id),
                };
                let mut bytes = Vec::new();
                r.take(length)
                    .read_to_end(&mut bytes)
                    .map_err(|e| ShimError::Io(e.to_string()))?;
                if (bytes.len() as u64) < length {
                    return Err(ShimError::Eof);
                }
                // A copy on the claim at least as long (lines not yet
                // shipped) is the newer one: keep it.
                let here = std::fs::metadata(&path).map_or(0, |m| m.len());
                if here < length {
                    transcript::restore(&path, &bytes)
                        .map_err(|e| ShimError::Io(format!("writing {}: {e}", path.display())))?;
                }
                restored = Some((path, length));
            }
            Frame::Start { offset } => {
                let offset = offset.or(restored.as_ref().map(|(_, n)| *n)).unwrap_or(0);
                return Ok(Framed { restored, offset });
            }
        }
    }
}

/// Reports what the transcript file gains as stderr lines.
pub struct Tail {
    place: Place,
    path: Option<PathBuf>,
    offset: u64,
    /// Not UTF-8 (never from the CLI): no more reports.
    broken: bool,
}

impl Tail {
    pub fn new(place: Place, path: Option<PathBuf>, offset: u64) -> Self {
        Self {
            place,
            path,
            offset,
            broken: false,
        }
    }

    /// Write a line for every new run of complete lines (pieces of at most
    /// `PIECE` bytes, split between characters).
    pub fn report(&mut self, out: &mut impl Write) {
        if self.broken {
            return;
        }
        if self.path.is_none() {
            self.path = transcript::find(&self.place.config_dir, self.place.session_id);
        }
        let Some(path) = &self.path else { return };
        while let Ok(Some(bytes)) = transcript::read_lines_from(path, self.offset) {
            let Ok(text) = String::from_utf8(bytes) else {
                let _ = writeln!(
                    out,
                    "agent-sessions worker-shim: the transcript is not UTF-8 at byte {}; not reporting it",
                    self.offset
                );
                self.broken = true;
                return;
            };
            let mut rest = text.as_str();
            while !rest.is_empty() {
                let mut end = rest.len().min(PIECE);
                while !rest.is_char_boundary(end) {
                    end -= 1;
                }
                let (piece, more) = rest.split_at(end);
                let line = json!({"type": TRANSCRIPT, "offset": self.offset, "data": piece});
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return;
                }
                self.offset += piece.len() as u64;
                rest = more;
            }
        }
    }
}

fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Run `command` behind the framing; the process's exit code.
pub async fn run(command: Vec<String>) -> ExitCode {
    let Some((program, args)) = command.split_first() else {
        say("agent-sessions worker-shim: give the command after `--`");
        return ExitCode::from(2);
    };
    let place = Place::from_env();
    let (Ok(mut term), Ok(mut int), Ok(mut chld)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::child()),
    ) else {
        say("agent-sessions worker-shim: cannot handle signals");
        return ExitCode::from(2);
    };
    // The framing, read straight from fd 0 (no buffer that could take the
    // CLI's bytes), while a stop signal still ends the wait.
    let framing = {
        let place = place.clone();
        tokio::task::spawn_blocking(move || {
            // SAFETY: fd 0 stays open for the process's life; ManuallyDrop
            // never closes it.
            let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
            read_framing(&mut *stdin, place.as_ref())
        })
    };
    let framed = tokio::select! {
        r = framing => r,
        _ = term.recv() => std::process::exit(128 + Signal::SIGTERM as i32),
        _ = int.recv() => std::process::exit(128 + Signal::SIGINT as i32),
    };
    let framed = match framed {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            say(&format!("agent-sessions worker-shim: {e}"));
            return ExitCode::from(2);
        }
        Err(e) => {
            say(&format!("agent-sessions worker-shim: {e}"));
            return ExitCode::from(2);
        }
    };
    say(&json!({"type": STARTED}).to_string());
    let mut child = match std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!(
                "agent-sessions worker-shim: cannot run {program}: {e}"
            ));
            return ExitCode::from(127);
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The CLI's stderr, passed on line by line so no line of ours splits one.
    let (passed_tx, passed_rx) = std::sync::mpsc::channel::<()>();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(err);
            let mut buf = Vec::new();
            while let Ok(n) = std::io::BufRead::read_until(&mut lines, b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                if !buf.ends_with(b"\n") {
                    buf.push(b'\n');
                }
                let _ = std::io::stderr().lock().write_all(&buf);
                buf.clear();
            }
            let _ = passed_tx.send(());
        });
    }
    let mut tail =
        place.map(|p| Tail::new(p, framed.restored.map(|(path, _)| path), framed.offset));
    let mut tick = tokio::time::interval(POLL);
    let code = loop {
        tokio::select! {
            _ = term.recv() => { let _ = kill(pid, Signal::SIGTERM); }
            _ = int.recv() => { let _ = kill(pid, Signal::SIGINT); }
            _ = chld.recv() => {}
            _ = tick.tick() => {
                if let Some(t) = &mut tail {
                    t.report(&mut std::io::stderr().lock());
                }
            }
        }
        if let Some(code) = reap(pid) {
            break code;
        }
    };
    // The CLI's last stderr (its children may hold the pipe: not for long).
    let _ = passed_rx.recv_timeout(Duration::from_secs(2));
    if let Some(t) = &mut tail {
        t.report(&mut std::io::stderr().lock());
    }
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

/// Reap every child that ended; the CLI's exit code (128 + signal) once
/// it has.
fn reap(cli: Pid) -> Option<i32> {
    let mut code = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, c)) if p == cli => code = Some(c),
            Ok(WaitStatus::Signaled(p, s, _)) if p == cli => code = Some(128 + s as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return code,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> (PathBuf, Place) {
        let root = std::env::temp_dir().join(format!("as-shim-{}", Uuid::new_v4()));
        let p = Place {
            config_dir: root.join("cfg"),
            session_id: Uuid::new_v4(),
            cwd: PathBuf::from("/workspace/sub"),
        };
        (root, p)
    }

    #[test]
    fn restore_then_start_writes_the_transcript_and_leaves_the_rest_of_stdin() {
        let (root, p) = place();
        let body = b"{\"a\":1}\n{\"b\":2}\n";
        let mut input = framing(Some(body), body.len() as u64);
        input.extend_from_slice(b"{\"type\":\"user\"}\n");
        let mut r = &input[..];
        let framed = read_framing(&mut r, Some(&p)).unwrap();
        let want = p
            .config_dir
            .join("projects/-workspace-sub")
            .join(format!("{}.jsonl", p.session_id));
        assert_eq!(framed.restored, Some((want.clone(), body.len() as u64)));
        assert_eq!(framed.offset, body.len() as u64);
        assert_eq!(std::fs::read(&want).unwrap(), body);
        assert_eq!(r, b"{\"type\":\"user\"}\n", "the CLI's bytes untouched");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn start_alone_starts_with_nothing_restored() {
        let mut r = &b"{\"agent_sessions\":\"start\",\"offset\":42}\nrest"[..];
        let framed = read_framing(&mut r, None).unwrap();
        assert_eq!(
            framed,
            Framed {
                restored: None,
                offset: 42
            }
        );
        assert_eq!(r, b"rest");
        let mut r = &b"{\"agent_sessions\":\"start\"}\n"[..];
        assert_eq!(read_framing(&mut r, None).unwrap().offset, 0);
    }

    #[test]
    fn a_restore_outside_the_config_dir_and_other_lines_are_refused() {
        let (root, p) = place();
        let inside = p.config_dir.join("projects/x/t.jsonl");
        for bad in [
            PathBuf::from("/etc/passwd"),
            p.config_dir.join("projects/../../evil.jsonl"),
            PathBuf::from("relative/t.jsonl"),
            p.config_dir.clone(),
        ] {
            let line = json!({"agent_sessions": "restore", "length": 3, "path": bad});
            let input = format!("{line}\nabc{{\"agent_sessions\":\"start\"}}\n");
            let mut r = input.as_bytes();
            assert!(
                matches!(read_framing(&mut r, Some(&p)), Err(ShimError::Outside(_))),
                "{}",
                bad.display()
            );
        }
        assert!(!root.join("evil.jsonl").exists());
        let line = json!({"agent_sessions": "restore", "length": 3, "path": inside});
        let input = format!("{line}\nabc{{\"agent_sessions\":\"start\"}}\n");
        let framed = read_framing(&mut input.as_bytes(), Some(&p)).unwrap();
        assert_eq!(framed.restored, Some((inside.clone(), 3)));
        assert_eq!(std::fs::read(&inside).unwrap(), b"abc");
        // Not framing at all; or stdin ends before the start.
        let mut r = &b"{\"type\":\"user\"}\n"[..];
        assert!(matches!(
            read_framing(&mut r, Some(&p)),
            Err(ShimError::NotAFrame(_))
        ));
        let mut r = &b"{\"agent_sessions\":\"restore\",\"length\":9}\nabc"[..];
        assert_eq!(read_framing(&mut r, Some(&p)), Err(ShimError::Eof));
        let mut r = &b"{\"agent_sessions\":\"restore\",\"length\":1}\nx"[..];
        assert_eq!(read_framing(&mut r, None), Err(ShimError::NoTranscript));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_tail_reports_complete_lines_with_their_offsets() {
        let (root, p) = place();
        let path = transcript::path_for(&p.config_dir, &p.cwd, p.session_id);
        let mut tail = Tail::new(p.clone(), None, 0);
        let mut out = Vec::new();
        tail.report(&mut out);
        assert!(out.is_empty(), "no file yet");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let big = format!("{{\"x\":\"{}\"}}\n", "é".repeat(PIECE));
        std::fs::write(&path, format!("{{\"a\":1}}\n{big}{{\"half\"")).unwrap();
        tail.report(&mut out);
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut joined = String::new();
        for l in &lines {
            let Some(Report::Transcript { offset, data }) = report(l) else {
                panic!("{l}")
            };
            assert_eq!(offset, joined.len() as u64);
            assert!(data.len() <= PIECE);
            joined.push_str(data);
        }
        assert!(lines.len() >= 3, "the long line in pieces");
        assert_eq!(joined, format!("{{\"a\":1}}\n{big}"), "not the half line");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
