//! One task per worker pod: report its progress (scheduled, running) on the
//! session, follow its log once the container runs and fold the stream-json
//! into a `RunSummary` (posting the lines as the session's messages, like
//! the local backend), then wait for the pod's end, judge it and wake the
//! controller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{AsyncBufReadExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::pod::{self, Progress};
use super::{Inner, Seen, lock};
use crate::runner::api::{ApiClient, Posted};
use crate::runner::backend::WorkerExit;
use crate::runner::claude::RunSummary;

/// How often a supervisor that heard nothing asks for its pod (the watch
/// may be reconnecting).
const REFRESH: Duration = Duration::from_secs(10);
/// How long a log may keep going once its pod has ended.
const LOG_DRAIN: Duration = Duration::from_secs(5);

pub(super) fn spawn(
    inner: Arc<Inner>,
    id: Uuid,
    generation: u64,
    pod_name: String,
    rx: watch::Receiver<Seen>,
    adopted: bool,
) {
    let span = info_span!("worker_pod", session_id = %id, generation, pod = %pod_name);
    tokio::spawn(
        supervise(
            Worker {
                inner,
                id,
                generation,
                pod_name,
                rx,
            },
            adopted,
        )
        .instrument(span),
    );
}

struct Worker {
    inner: Arc<Inner>,
    id: Uuid,
    generation: u64,
    pod_name: String,
    rx: watch::Receiver<Seen>,
}

fn ended(s: &Seen) -> bool {
    s.gone || s.pod.as_ref().is_some_and(pod::is_terminal)
}

impl Worker {
    /// Until the pod changes, or a while passed (then ask for it).
    async fn wait(&mut self) {
        tokio::select! {
            changed = self.rx.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(REFRESH).await;
                }
            }
            _ = tokio::time::sleep(REFRESH) => self.refresh().await,
        }
    }

    async fn refresh(&self) {
        match self.inner.kube.get_pod(&self.pod_name).await {
            Ok(Some(p)) => self.inner.saw(p, false),
            Ok(None) => self.inner.saw_gone(self.id, self.generation),
            Err(e) => warn!(error = %e, "cannot read the worker pod"),
        }
    }

    fn seen(&mut self) -> Seen {
        self.rx.borrow_and_update().clone()
    }

    /// Record where the pod is on the session (scheduled, running, …).
    async fn report(&self, progress: &Progress) {
        let mut worker = json!({"pod": self.pod_name, "pod_phase": progress.label()});
        if let (Some(node), Some(obj)) = (progress.node(), worker.as_object_mut()) {
            obj.insert("node".into(), json!(node));
        }
        let patch = json!({"runtime_metadata": {"worker": worker}});
        if let Err(e) = self.inner.api.merge_patch(self.id, &patch, None).await {
            warn!(error = %e, "cannot record the pod's progress");
        }
    }
}

async fn supervise(mut w: Worker, adopted: bool) {
    // An adopted pod's lines so far were the earlier runner's to post.
    let post_from = if adopted
        && w.rx
            .borrow()
            .pod
            .as_ref()
            .is_some_and(pod::container_started)
    {
        match w.inner.kube.pod_log(&w.pod_name).await {
            Ok(text) => text.lines().count(),
            Err(e) => {
                warn!(error = %e, "cannot read the adopted pod's log");
                0
            }
        }
    } else {
        0
    };
    let mut summary = RunSummary::default();
    let mut poster = Poster::new(w.inner.api.clone(), w.id, w.inner.cfg.message_batch);
    let mut reported: Option<&'static str> = None;
    // Until the container runs (so there is a log), or the pod is over.
    loop {
        let seen = w.seen();
        if let Some(p) = &seen.pod {
            let progress = pod::progress(p);
            let label = progress.label();
            if matches!(
                progress,
                Progress::Scheduled { .. } | Progress::Running { .. }
            ) && reported != Some(label)
            {
                info!(phase = label, "worker pod {label}");
                w.report(&progress).await;
                reported = Some(label);
            }
        }
        if ended(&seen) || seen.pod.as_ref().is_some_and(pod::container_started) {
            break;
        }
        w.wait().await;
    }
    if w.rx
        .borrow()
        .pod
        .as_ref()
        .is_some_and(pod::container_started)
    {
        read_log(&mut w, &mut summary, &mut poster, post_from).await;
    }
    while !ended(&w.seen()) {
        w.wait().await;
    }
    for _ in 0..3 {
        poster.flush(true).await;
        if poster.pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = w.seen();
    let stopping = lock(&w.inner.slots)
        .get(&w.id)
        .is_some_and(|s| s.stopping && s.generation == w.generation);
    let (outcome, exit) = pod::outcome(seen.pod.as_ref(), &summary, stopping);
    let final_phase = match seen.pod.as_ref().map(pod::progress) {
        Some(p @ (Progress::Succeeded | Progress::Failed)) => p.label(),
        _ => "deleted",
    };
    info!(?exit, ?outcome, phase = final_phase, "worker pod ended");
    let patch = json!({"runtime_metadata": {"worker": {"pod_phase": final_phase}}});
    if let Err(e) = w.inner.api.merge_patch(w.id, &patch, None).await {
        warn!(error = %e, "cannot record the pod's end");
    }
    {
        let mut slots = lock(&w.inner.slots);
        if let Some(s) = slots
            .get_mut(&w.id)
            .filter(|s| s.generation == w.generation)
        {
            s.exit = Some(WorkerExit {
                generation: w.generation,
                outcome,
                exit,
                summary,
                pid: None,
                started_at: s.started_at,
                stopped_at: chrono::Utc::now(),
            });
        }
    }
    let _ = w.inner.wake.send(w.id);
}

/// Follow the container's log to its end (reconnecting if the stream
/// breaks while the pod still runs), feeding every line to `summary` and
/// the lines from `post_from` on to `poster`.
async fn read_log(w: &mut Worker, summary: &mut RunSummary, poster: &mut Poster, post_from: usize) {
    // Lines already taken, across reconnects (each one reads from the start).
    let mut taken = 0usize;
    let mut backoff = Duration::from_millis(200);
    loop {
        match w.inner.kube.follow_pod_log(&w.pod_name).await {
            Ok(reader) => {
                let mut lines = reader.lines();
                let mut index = 0usize;
                loop {
                    let rx = &mut w.rx;
                    let drained = async move {
                        let _ = rx.wait_for(ended).await;
                        tokio::time::sleep(LOG_DRAIN).await;
                    };
                    let line = tokio::select! {
                        line = lines.next() => line,
                        _ = drained => {
                            debug!("the pod ended but its log did not; leaving it");
                            None
                        }
                    };
                    match line {
                        Some(Ok(text)) => {
                            if index >= taken {
                                take(&w.inner, w.id, &text, index >= post_from, summary, poster);
                                taken += 1;
                                poster.flush(false).await;
                            }
                            index += 1;
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "the log stream broke");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot follow the worker's log"),
        }
        if ended(&w.rx.borrow()) {
            return;
        }
        // The stream broke while the pod runs: check on it, then read again.
        w.refresh().await;
        if ended(&w.rx.borrow()) {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn take(
    inner: &Inner,
    id: Uuid,
    line: &str,
    post: bool,
    summary: &mut RunSummary,
    poster: &mut Poster,
) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        // stderr shares the container log; it is not stream-json.
        debug!("skipping a non-JSON log line");
        return;
    };
    let had_init = summary.claude_session_id.is_some();
    summary.observe(&v);
    if !had_init && summary.claude_session_id.is_some() {
        // The CLI has begun its transcript on the claim: a restart resumes it.
        lock(&inner.claims).insert(id, true);
    }
    if post {
        poster.pending.push(v);
    }
}

/// Batches of lines on their way to `POST /sessions/{id}/messages`.
struct Poster {
    api: ApiClient,
    id: Uuid,
    batch: usize,
    pending: Vec<Value>,
    last_post: Instant,
    /// The service refused the endpoint (not deployed yet): stop trying.
    disabled: bool,
}

impl Poster {
    fn new(api: ApiClient, id: Uuid, batch: usize) -> Self {
        Self {
            api,
            id,
            batch,
            pending: Vec::new(),
            last_post: Instant::now(),
            disabled: false,
        }
    }

    async fn flush(&mut self, force: bool) {
        if self.pending.is_empty() || self.disabled {
            self.pending.clear();
            return;
        }
        if !force
            && self.pending.len() < self.batch
            && self.last_post.elapsed() < Duration::from_millis(300)
        {
            return;
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(self.batch);
            match self.api.post_messages(self.id, &self.pending[..n]).await {
                Ok(Posted::Stored) => {
                    self.pending.drain(..n);
                }
                Ok(Posted::NotAccepted) => {
                    info!("the API does not take worker messages (404); not posting them");
                    self.disabled = true;
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "posting worker messages failed; will retry");
                    // Bound memory if the API stays away; the pod log keeps everything.
                    if self.pending.len() > 10_000 {
                        self.pending.drain(..self.pending.len() - 10_000);
                    }
                    return;
                }
            }
        }
        self.last_post = Instant::now();
    }
}
