//! A session's workspace on the local disk, and the runner's notes in it.
//!
//! ```text
//! <root>/<session id>/work/     the worker's files; worker.working_directory is inside
//! <root>/<session id>/claude/   CLAUDE_CONFIG_DIR: transcripts, so --resume works
//! <root>/<session id>/runner/   worker.json (pidfile), gen-N.jsonl output, gen-N.posted
//! ```
//!
//! The pidfile is what lets a restarted runner find workers that outlived
//! it; the output file (not a pipe) is what lets them outlive it.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("working directory {0:?} leaves the session's workspace")]
    Escape(String),
    #[error("bad pidfile {path}: {source}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the runner wrote down about the worker it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pidfile {
    pub session_id: Uuid,
    pub generation: u64,
    pub pid: i32,
    /// The process group (the worker leads its own).
    pub pgid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`
    /// field 22), so a recycled pid is not mistaken for the worker.
    pub proc_start: Option<u64>,
    pub started_at: DateTime<Utc>,
    /// `new` or `resume`.
    pub launch: String,
    /// The message written before any input, if any.
    #[serde(default)]
    pub first: Option<super::driver::FirstMessage>,
    /// What the session's earlier workers spent.
    #[serde(default)]
    pub before: super::cost::Spend,
}

#[derive(Debug, Clone)]
pub struct Workspace {
    pub session_id: Uuid,
    dir: PathBuf,
}

impl Workspace {
    /// `root/<id>/` with its three directories, created if missing.
    pub fn open(root: &Path, session_id: Uuid) -> Result<Self, WorkspaceError> {
        let dir = root.join(session_id.to_string());
        for sub in ["work", "claude", "runner"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Self { session_id, dir })
    }

    /// Without creating anything (for looking around).
    pub fn at(root: &Path, session_id: Uuid) -> Self {
        Self {
            session_id,
            dir: root.join(session_id.to_string()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Remove the whole workspace (its session is deleted: nothing can
    /// resume it); `false` when there was none.
    pub fn remove(&self) -> Result<bool, WorkspaceError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&self.dir)(e)),
        }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("claude")
    }

    fn runner_dir(&self) -> PathBuf {
        self.dir.join("runner")
    }

    pub fn pidfile_path(&self) -> PathBuf {
        self.runner_dir().join("worker.json")
    }

    pub fn output_path(&self, generation: u64) -> PathBuf {
        self.runner_dir().join(format!("gen-{generation}.jsonl"))
    }

    pub fn stderr_path(&self, generation: u64) -> PathBuf {
        self.runner_dir().join(format!("gen-{generation}.stderr"))
    }

    /// The worker's stdin: a FIFO the worker holds open for reading and
    /// writing, so it never sees an end of input when a runner goes away,
    /// and the next runner opens it again to write.
    pub fn stdin_path(&self, generation: u64) -> PathBuf {
        self.runner_dir().join(format!("gen-{generation}.stdin"))
    }

    /// Make generation `generation`'s stdin FIFO (replacing any left over).
    pub fn make_stdin(&self, generation: u64) -> Result<PathBuf, WorkspaceError> {
        let path = self.stdin_path(generation);
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| WorkspaceError::Io {
                path: path.clone(),
                source: std::io::Error::from(e),
            },
        )?;
        Ok(path)
    }

    fn posted_path(&self, generation: u64) -> PathBuf {
        self.runner_dir().join(format!("gen-{generation}.posted"))
    }

    /// The worker's directory: `work/` or `work/<relative>`, created, and
    /// refused if any part of it (a symlink left by an earlier worker, say)
    /// resolves outside `work/`.
    pub fn working_dir(&self, relative: Option<&str>) -> Result<PathBuf, WorkspaceError> {
        let base = self.dir.join("work");
        let base = base.canonicalize().map_err(io(&base))?;
        let Some(rel) = relative.filter(|r| !r.is_empty()) else {
            return Ok(base);
        };
        let mut cur = base.clone();
        for c in Path::new(rel).components() {
            match c {
                Component::CurDir => continue,
                Component::Normal(part) => {
                    let next = cur.join(part);
                    match std::fs::symlink_metadata(&next) {
                        Ok(_) => {
                            let real = next.canonicalize().map_err(io(&next))?;
                            if !real.starts_with(&base) || !real.is_dir() {
                                return Err(WorkspaceError::Escape(rel.to_owned()));
                            }
                            cur = real;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            std::fs::create_dir(&next).map_err(io(&next))?;
                            cur = next;
                        }
                        Err(e) => return Err(io(&next)(e)),
                    }
                }
                _ => return Err(WorkspaceError::Escape(rel.to_owned())),
            }
        }
        Ok(cur)
    }

    /// The CLI keeps `projects/<cwd slug>/<session id>.jsonl`; any of them
    /// means the conversation exists and can be resumed.
    pub fn has_transcript(&self) -> bool {
        self.transcript_path().is_some()
    }

    /// The session's transcript, wherever the CLI put it.
    pub fn transcript_path(&self) -> Option<PathBuf> {
        super::transcript::find(&self.config_dir(), self.session_id)
    }

    /// Where the CLI looks for the transcript of a worker run in `cwd`.
    pub fn transcript_path_for(&self, cwd: &Path) -> PathBuf {
        super::transcript::path_for(&self.config_dir(), cwd, self.session_id)
    }

    /// Bytes of the transcript already stored by the service, as far as
    /// this workspace knows.
    pub fn shipped_offset(&self) -> u64 {
        std::fs::read_to_string(self.runner_dir().join("transcript.shipped"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn set_shipped_offset(&self, offset: u64) {
        let _ = std::fs::write(
            self.runner_dir().join("transcript.shipped"),
            offset.to_string(),
        );
    }

    pub fn write_pidfile(&self, p: &Pidfile) -> Result<(), WorkspaceError> {
        let path = self.pidfile_path();
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(p).map_err(|source| WorkspaceError::Pidfile {
            path: path.clone(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    pub fn read_pidfile(&self) -> Result<Option<Pidfile>, WorkspaceError> {
        let path = self.pidfile_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| WorkspaceError::Pidfile { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Remove the pidfile if it still names `generation`.
    pub fn clear_pidfile(&self, generation: u64) {
        if let Ok(Some(p)) = self.read_pidfile()
            && p.generation == generation
        {
            let _ = std::fs::remove_file(self.pidfile_path());
        }
    }

    /// Bytes of `gen-N.jsonl` already posted to the API.
    pub fn posted_offset(&self, generation: u64) -> u64 {
        std::fs::read_to_string(self.posted_path(generation))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn set_posted_offset(&self, generation: u64, offset: u64) {
        let _ = std::fs::write(self.posted_path(generation), offset.to_string());
    }
}

/// Every session directory under `root` holding a pidfile.
pub fn with_pidfiles(root: &Path) -> Vec<Workspace> {
    all(root)
        .into_iter()
        .filter(|ws| ws.pidfile_path().is_file())
        .collect()
}

/// Every session's workspace under `root` (directories named by a session id).
pub fn all(root: &Path) -> Vec<Workspace> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let id = Uuid::parse_str(e.file_name().to_str()?).ok()?;
            Some(Workspace::at(root, id))
        })
        .collect()
}

/// `/proc/<pid>/stat`: (state, start time, process group). The command name
/// may hold spaces and parentheses, so fields are counted from the last `)`.
pub fn proc_stat(pid: i32) -> Option<(char, u64, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); the group is field 5, start time 22.
    let state = fields.first()?.chars().next()?;
    let pgid = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start, pgid))
}

/// The process the pidfile names is still that process, and not a zombie.
pub fn is_alive(pid: i32, proc_start: Option<u64>) -> bool {
    match proc_stat(pid) {
        Some((state, start, _)) => {
            state != 'Z' && state != 'X' && proc_start.is_none_or(|s| s == start)
        }
        None => false,
    }
}

/// Live process-group leaders working somewhere under `root`: the workers,
/// whether or not a pidfile still names them (a runner killed between spawn
/// and pidfile leaves one without). Never this process or its own group.
pub fn group_leaders_under(root: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let my_group = proc_stat(me).map(|s| s.2);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            pid != me
                && proc_stat(pid).is_some_and(|(state, _, pgid)| {
                    pgid == pid && Some(pgid) != my_group && state != 'Z'
                })
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(root))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        let p = std::env::temp_dir().join(format!("ws-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn working_dir_stays_inside() {
        let r = root();
        let ws = Workspace::open(&r, Uuid::new_v4()).unwrap();
        let base = ws.working_dir(None).unwrap();
        assert!(base.ends_with("work"));
        let sub = ws.working_dir(Some("a/./b")).unwrap();
        assert!(sub.starts_with(&base) && sub.is_dir());
        assert!(matches!(
            ws.working_dir(Some("../x")),
            Err(WorkspaceError::Escape(_))
        ));
        // A symlink planted inside that points out is refused, and nothing
        // is created outside.
        let outside = r.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("link")).unwrap();
        assert!(matches!(
            ws.working_dir(Some("link/deeper")),
            Err(WorkspaceError::Escape(_))
        ));
        assert!(!outside.join("deeper").exists());
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink(base.join("a"), base.join("inner")).unwrap();
        assert!(ws.working_dir(Some("inner/b")).unwrap().starts_with(&base));
        std::fs::remove_dir_all(r).unwrap();
    }

    #[test]
    fn pidfile_round_trip_and_liveness() {
        let r = root();
        let ws = Workspace::open(&r, Uuid::new_v4()).unwrap();
        assert_eq!(ws.read_pidfile().unwrap(), None);
        let me = std::process::id() as i32;
        let p = Pidfile {
            session_id: ws.session_id,
            generation: 3,
            pid: me,
            pgid: me,
            proc_start: proc_stat(me).map(|s| s.1),
            started_at: Utc::now(),
            launch: "new".into(),
            first: Some(crate::runner::driver::FirstMessage::new(
                ws.session_id,
                3,
                "hi".into(),
            )),
            before: crate::runner::cost::Spend::new(1, 2, 3, 4),
        };
        ws.write_pidfile(&p).unwrap();
        assert_eq!(ws.read_pidfile().unwrap(), Some(p.clone()));
        assert!(is_alive(me, p.proc_start));
        assert!(!is_alive(me, p.proc_start.map(|s| s + 1)));
        assert_eq!(with_pidfiles(&r).len(), 1);
        ws.clear_pidfile(2);
        assert!(ws.read_pidfile().unwrap().is_some());
        ws.clear_pidfile(3);
        assert!(ws.read_pidfile().unwrap().is_none());
        std::fs::remove_dir_all(r).unwrap();
    }

    #[test]
    fn finds_group_leaders_working_under_the_root() {
        use std::os::unix::process::CommandExt;
        let r = root().canonicalize().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&r)
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let found = group_leaders_under(&r);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, [pid]);
        assert!(group_leaders_under(&r.join("elsewhere")).is_empty());
        std::fs::remove_dir_all(r).unwrap();
    }
}
