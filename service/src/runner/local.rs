//! The local backend: each worker is a `claude` child process leading its
//! own process group, in the session's workspace.
//!
//! The worker's stdout goes to a file in the workspace, not a pipe, and its
//! stdin is a FIFO in the workspace that the worker itself also holds open
//! for writing, so a worker outlives a runner killed with SIGKILL without
//! seeing the end of either; the pidfile (with the process start time,
//! against recycled pids) lets the next runner adopt it and open the FIFO
//! again. One supervising task per worker tails the output file (polling
//! faster while lines come), hands the lines and the FIFO to the worker's
//! `Driver`, notices the exit and wakes the controller.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, instrument, warn};
use uuid::Uuid;

use super::api::ApiClient;
use super::backend::{Backend, BackendError, StartRequest, Started, Wake, WorkerExit};
use super::claude::{self, ExitInfo};
use super::cost::Prices;
use super::driver::{Driver, Live, Setup, Stdin};
use super::reconcile::{Observed, StopReason};
use super::transcript::Shipper;
use super::workers::{Ended, Slot, WorkerTable};
use super::workspace::{self, Pidfile, Workspace};
use crate::domain::RuntimeBackend;
use crate::signals;

/// How the local backend is set up.
#[derive(Clone)]
pub struct LocalConfig {
    pub root: PathBuf,
    pub claude_bin: String,
    pub bare: bool,
    /// Inherited and pass-through environment (API key among it): never logged.
    pub worker_env: Vec<(String, String)>,
    pub interrupt_grace: Duration,
    pub terminate_grace: Duration,
    pub message_batch: usize,
    pub prices: Arc<Prices>,
}

/// What the local backend keeps of a worker beside the common slot.
struct Group {
    pgid: i32,
    /// Flips to true when the worker has exited.
    exited: watch::Receiver<bool>,
}

struct Inner {
    cfg: LocalConfig,
    api: ApiClient,
    wake: Wake,
    workers: WorkerTable<Group>,
}

#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

/// How the supervisor learns that the worker ended.
enum Proc {
    Child(tokio::process::Child),
    /// Not our child (adopted): poll `/proc`, exit status unknown.
    Adopted {
        proc_start: Option<u64>,
    },
}

impl LocalBackend {
    pub fn new(cfg: LocalConfig, api: ApiClient, wake: Wake) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                api,
                wake,
                workers: WorkerTable::default(),
            }),
        }
    }
}

impl Backend for LocalBackend {
    fn kind(&self) -> RuntimeBackend {
        RuntimeBackend::Local
    }

    fn observe(&self, session_id: Uuid) -> Observed {
        Observed {
            worker: self.inner.workers.state(session_id),
            has_transcript: Workspace::at(&self.inner.cfg.root, session_id).has_transcript(),
        }
    }

    fn exit_of(&self, session_id: Uuid, generation: u64) -> Option<WorkerExit> {
        self.inner.workers.exit_of(session_id, generation)
    }

    #[instrument(skip(self, req), fields(session_id = %req.session_id, generation = req.generation, launch = req.launch.as_str()))]
    async fn start(&self, req: StartRequest) -> Result<Started, BackendError> {
        let cfg = &self.inner.cfg;
        if matches!(
            self.inner.workers.state(req.session_id),
            super::reconcile::WorkerState::Running { .. }
        ) {
            return Err(BackendError::AlreadyRunning(req.session_id));
        }
        let ws = Workspace::open(&cfg.root, req.session_id)?;
        let cwd = ws.working_dir(req.spec.working_directory.as_deref())?;
        let open = |p: PathBuf| {
            std::fs::File::create(&p).map_err(|source| {
                BackendError::Workspace(workspace::WorkspaceError::Io { path: p, source })
            })
        };
        let local_len = ws
            .transcript_path()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        if let Some(bytes) = &req.restore
            && local_len < bytes.len() as u64
        {
            if let Some(stale) = ws.transcript_path() {
                let _ = std::fs::remove_file(stale);
            }
            let path = ws.transcript_path_for(&cwd);
            super::transcript::restore(&path, bytes).map_err(|source| {
                BackendError::Workspace(workspace::WorkspaceError::Io {
                    path: path.clone(),
                    source,
                })
            })?;
            ws.set_shipped_offset(bytes.len() as u64);
            info!(bytes = bytes.len(), "transcript restored from the service");
        }
        let stdout = open(ws.output_path(req.generation))?;
        let stderr = open(ws.stderr_path(req.generation))?;
        let fifo = ws.make_stdin(req.generation)?;
        // Read and write: the worker never sees the end of its input while
        // it holds this, whoever else opens or closes the FIFO.
        let stdin = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .map_err(|source| {
                BackendError::Workspace(workspace::WorkspaceError::Io {
                    path: fifo.clone(),
                    source,
                })
            })?;
        let args = claude::arguments(&req.spec, req.session_id, &req.launch, cfg.bare);
        let mut cmd = tokio::process::Command::new(&cfg.claude_bin);
        cmd.args(&args)
            .current_dir(&cwd)
            .env_clear()
            .envs(cfg.worker_env.iter().map(|(k, v)| (k, v)))
            .env("HOME", ws.dir())
            .env("CLAUDE_CONFIG_DIR", ws.config_dir())
            // Validated on the way in: none of these is a reserved key.
            .envs(&req.spec.env)
            .stdin(Stdio::from(stdin))
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|source| BackendError::Spawn {
            program: cfg.claude_bin.clone(),
            source,
        })?;
        let started_at = Utc::now();
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let pidfile = Pidfile {
            session_id: req.session_id,
            generation: req.generation,
            pid,
            pgid: pid,
            proc_start: workspace::proc_stat(pid).map(|s| s.1),
            started_at,
            launch: req.launch.as_str().to_owned(),
            first: req.first.clone(),
            before: req.before,
        };
        if let Err(e) = ws.write_pidfile(&pidfile) {
            // Without a pidfile a restarted runner could not find it: do not run it.
            signals::signal_group(pid, Signal::SIGKILL);
            return Err(e.into());
        }
        info!(pid, "worker started");
        self.supervise(ws, pidfile, Proc::Child(child));
        Ok(Started {
            pid: Some(pid),
            pod: None,
            started_at,
        })
    }

    fn live(&self, session_id: Uuid) -> Option<Arc<Live>> {
        self.inner.workers.live(session_id)
    }

    fn stop(&self, session_id: Uuid, reason: StopReason) {
        let Some((pgid, mut exited)) = self.inner.workers.begin_stop(session_id, reason, |s| {
            (s.handle.pgid, s.handle.exited.clone())
        }) else {
            return;
        };
        let cfg = self.inner.cfg.clone();
        let span = info_span!("stop_worker", session_id = %session_id, pgid, reason = ?reason);
        tokio::spawn(
            async move {
                // Interrupt first: the CLI ends its turn and keeps the transcript.
                for (sig, grace) in [
                    (Signal::SIGINT, cfg.interrupt_grace),
                    (Signal::SIGTERM, cfg.terminate_grace),
                    (Signal::SIGKILL, Duration::from_secs(5)),
                ] {
                    if !signals::signal_group(pgid, sig) {
                        return;
                    }
                    debug!(signal = %sig, "signalled worker group");
                    let done = tokio::time::timeout(grace, exited.wait_for(|e| *e)).await;
                    if matches!(done, Ok(Ok(_))) {
                        return;
                    }
                }
                warn!("worker group still there after SIGKILL");
            }
            .instrument(span),
        );
    }

    fn forget(&self, session_id: Uuid, generation: u64) {
        if self.inner.workers.forget(session_id, generation).is_some() {
            Workspace::at(&self.inner.cfg.root, session_id).clear_pidfile(generation);
        }
    }

    fn running(&self) -> usize {
        self.inner.workers.running()
    }

    fn sessions(&self) -> Vec<Uuid> {
        self.inner.workers.sessions()
    }

    async fn adopt(&self) -> Vec<Uuid> {
        let mut found = Vec::new();
        let mut adopted_groups = std::collections::HashSet::new();
        for ws in workspace::with_pidfiles(&self.inner.cfg.root) {
            let p = match ws.read_pidfile() {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    warn!(session_id = %ws.session_id, error = %e, "unreadable pidfile; ignoring it");
                    continue;
                }
            };
            let alive = workspace::is_alive(p.pid, p.proc_start);
            info!(session_id = %p.session_id, pid = p.pid, generation = p.generation, alive,
                "found a worker from an earlier runner");
            found.push(p.session_id);
            if alive {
                adopted_groups.insert(p.pgid);
            }
            let proc_start = p.proc_start;
            self.supervise(ws, p, Proc::Adopted { proc_start });
        }
        // A worker no pidfile names cannot be watched or reported: end it
        // rather than risk a second writer beside the one started next.
        for pgid in workspace::group_leaders_under(&self.inner.cfg.root) {
            if !adopted_groups.contains(&pgid) {
                warn!(
                    pgid,
                    "a worker without a pidfile under the workspace root; killing its group"
                );
                signals::signal_group(pgid, Signal::SIGKILL);
            }
        }
        self.remove_orphaned_workspaces(&found).await;
        found
    }

    fn has_workspace(&self, session_id: Uuid) -> bool {
        Workspace::at(&self.inner.cfg.root, session_id)
            .dir()
            .is_dir()
    }

    async fn discard(&self, session_id: Uuid) {
        if self.inner.workers.contains(session_id) {
            return;
        }
        match Workspace::at(&self.inner.cfg.root, session_id).remove() {
            Ok(true) => info!(%session_id, "the session is deleted: workspace removed"),
            Ok(false) => {}
            Err(e) => {
                warn!(%session_id, error = %e, "cannot remove the workspace of a deleted session")
            }
        }
    }
}

impl LocalBackend {
    /// At start-up, before any worker starts: remove the workspaces of
    /// sessions the service answers 404 for. Deleted sessions only (ids are
    /// never reused, and a workspace is made only for a session the runner
    /// has read), whose deletion this runner may never see in the feed
    /// (down meanwhile, and the events purged since). Those with a worker
    /// just adopted wait for its exit; a session the service cannot be
    /// asked about now is left for the feed or the next start.
    async fn remove_orphaned_workspaces(&self, adopted: &[Uuid]) {
        for ws in workspace::all(&self.inner.cfg.root) {
            let id = ws.session_id;
            if adopted.contains(&id) {
                continue;
            }
            match self.inner.api.session(id).await {
                Ok(None) => self.discard(id).await,
                Ok(Some(_)) => {}
                Err(e) => {
                    debug!(session_id = %id, error = %e, "cannot ask about a workspace's session; kept");
                }
            }
        }
    }
}

impl LocalBackend {
    /// Register the worker and spawn the task that watches it.
    fn supervise(&self, ws: Workspace, p: Pidfile, proc: Proc) {
        let (tx, rx) = watch::channel(false);
        let group = Group {
            pgid: p.pgid,
            exited: rx,
        };
        // The start checked for a live worker; an adopted one is the first.
        let slot = Slot::new(p.generation, p.started_at, group);
        let live = slot.live.clone();
        self.inner.workers.lock().insert(p.session_id, slot);
        let inner = self.inner.clone();
        let span = info_span!("worker", session_id = %p.session_id, generation = p.generation, pid = p.pid);
        tokio::spawn(supervise(inner, ws, p, proc, tx, live).instrument(span));
    }
}

/// Reads the output file as it grows; complete lines only.
struct Tail {
    reader: Option<BufReader<std::fs::File>>,
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        Self {
            reader: None,
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// New complete lines, each with the file offset just past it.
    fn read(&mut self) -> Vec<(Vec<u8>, u64)> {
        if self.reader.is_none() {
            match std::fs::File::open(&self.path) {
                Ok(mut f) => {
                    if f.seek(SeekFrom::Start(self.offset)).is_err() {
                        return Vec::new();
                    }
                    self.reader = Some(BufReader::new(f));
                }
                Err(_) => return Vec::new(),
            }
        }
        let mut out = Vec::new();
        let Some(r) = self.reader.as_mut() else {
            return out;
        };
        loop {
            match r.read_until(b'\n', &mut self.partial) {
                Ok(0) => break,
                Ok(n) => {
                    self.offset += n as u64;
                    if self.partial.ends_with(b"\n") {
                        out.push((std::mem::take(&mut self.partial), self.offset));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read worker output");
                    break;
                }
            }
        }
        out
    }
}

/// The worker's stdin FIFO, opened for writing (it has a reader: the
/// worker holds it open).
fn open_stdin(ws: &Workspace, generation: u64) -> Option<Stdin> {
    let path = ws.stdin_path(generation);
    match tokio::net::unix::pipe::OpenOptions::new().open_sender(&path) {
        Ok(tx) => Some(Box::new(tx)),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the worker's stdin");
            None
        }
    }
}

/// Output polling: quick while lines come, slower while the worker is quiet.
const POLL_FAST: Duration = Duration::from_millis(2);
const POLL_SLOW: Duration = Duration::from_millis(25);

async fn supervise(
    inner: Arc<Inner>,
    ws: Workspace,
    p: Pidfile,
    mut proc: Proc,
    exited_tx: watch::Sender<bool>,
    live: Arc<Live>,
) {
    let id = p.session_id;
    let mut tail = Tail::new(ws.output_path(p.generation));
    let mut driver = Driver::new(Setup {
        api: inner.api.clone(),
        session_id: id,
        generation: p.generation,
        first: p.first.clone(),
        before: p.before,
        prices: inner.cfg.prices.clone(),
        message_batch: inner.cfg.message_batch,
        wake: inner.wake.clone(),
        live,
        posted_from: ws.posted_offset(p.generation),
    });
    let live = driver.live().clone();
    let mut shipper = Shipper::new(inner.api.clone(), id, ws.shipped_offset());
    let mut transcript = ws.transcript_path();
    let mut poll = POLL_FAST;
    let exit = loop {
        let lines = tail.read();
        let got = !lines.is_empty();
        for (line, end) in lines {
            match serde_json::from_slice::<Value>(&line) {
                Ok(v) => driver.hear(v, end).await,
                Err(_) => debug!("skipping a non-JSON output line"),
            }
        }
        if !driver.has_stdin()
            && let Some(stdin) = open_stdin(&ws, p.generation)
        {
            driver.attach(stdin).await;
        }
        if let Some(end) = driver.settle().await {
            ws.set_posted_offset(p.generation, end);
        }
        if transcript.is_none() && got {
            transcript = ws.transcript_path();
        }
        if let Some(path) = &transcript
            && let Some(at) = shipper.ship(path).await
        {
            ws.set_shipped_offset(at);
        }
        poll = if got {
            POLL_FAST
        } else {
            (poll * 2).min(POLL_SLOW)
        };
        let due = driver.next_due().map_or(poll, |at| {
            at.saturating_duration_since(tokio::time::Instant::now())
                .min(poll)
        });
        let ended = match &mut proc {
            Proc::Child(child) => tokio::select! {
                status = child.wait() => Some(match status {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        ExitInfo { code: s.code(), signal: s.signal(), unknown: false }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot wait for the worker");
                        ExitInfo { unknown: true, ..Default::default() }
                    }
                }),
                // An input written starts a turn: its lines come soon.
                _ = live.nudged() => { driver.sync().await; poll = POLL_FAST; None }
                _ = tokio::time::sleep(due) => None,
            },
            Proc::Adopted { proc_start } => {
                if workspace::is_alive(p.pid, *proc_start) {
                    tokio::select! {
                        _ = live.nudged() => { driver.sync().await; poll = POLL_FAST; }
                        _ = tokio::time::sleep(due.max(Duration::from_millis(20))) => {}
                    }
                    None
                } else {
                    Some(ExitInfo {
                        unknown: true,
                        ..Default::default()
                    })
                }
            }
        };
        if let Some(exit) = ended {
            break exit;
        }
        if driver
            .next_due()
            .is_some_and(|at| at <= tokio::time::Instant::now())
            && let Some(end) = driver.tick().await
        {
            ws.set_posted_offset(p.generation, end);
        }
    };
    // Whatever the worker started in its group goes with it.
    if signals::group_alive(p.pgid) {
        signals::signal_group(p.pgid, Signal::SIGKILL);
    }
    for (line, end) in tail.read() {
        if let Ok(v) = serde_json::from_slice::<Value>(&line) {
            driver.hear(v, end).await;
        }
    }
    if let Some(end) = driver.finish().await {
        ws.set_posted_offset(p.generation, end);
    }
    if let Some(path) = ws.transcript_path()
        && let Some(at) = shipper.finish(&path).await
    {
        ws.set_shipped_offset(at);
    }
    let _ = std::fs::remove_file(ws.stdin_path(p.generation));
    let stopping = inner.workers.stopping(id, p.generation);
    let outcome = claude::classify(exit, &driver.summary, stopping);
    info!(?exit, ?outcome, "worker ended");
    inner.workers.ended(
        id,
        p.generation,
        Ended {
            outcome,
            exit,
            spend: driver.totals(),
            input_seq: driver.input_seq(),
            summary: std::mem::take(&mut driver.summary),
            pid: Some(p.pid),
        },
    );
    let _ = exited_tx.send(true);
    let _ = inner.wake.send(id);
}
