//! One task per worker pod: report its progress (scheduled, running) on the
//! session, follow its log once the container runs and fold the stream-json
//! into a `RunSummary` (posting the lines as the session's messages, like
//! the local backend), then wait for the pod's end, judge it and wake the
//! controller.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::pod::{self, Progress};
use super::{Inner, Seen};
use crate::backoff::Backoff;
use crate::contract::{PodPhase, WorkerPatch, WorkerRecord};
use crate::runner::claude::RunSummary;
use crate::runner::poster::Poster;
use crate::runner::workers::{Ended, lock};

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
        let patch = WorkerPatch::new(WorkerRecord {
            pod: Some(self.pod_name.clone()),
            pod_phase: Some(progress.phase()),
            node: progress.node().map(str::to_owned),
            ..WorkerRecord::default()
        });
        if let Err(e) = self.inner.api.patch_worker(self.id, &patch, None).await {
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
    let mut reported: Option<PodPhase> = None;
    // Until the container runs (so there is a log), or the pod is over.
    loop {
        let seen = w.seen();
        if let Some(p) = &seen.pod {
            let progress = pod::progress(p);
            let phase = progress.phase();
            if matches!(
                progress,
                Progress::Scheduled { .. } | Progress::Running { .. }
            ) && reported != Some(phase)
            {
                info!(?phase, "worker pod progressed");
                w.report(&progress).await;
                reported = Some(phase);
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
    poster.finish().await;
    let seen = w.seen();
    let stopping = w.inner.workers.stopping(w.id, w.generation);
    let (outcome, exit) = pod::outcome(seen.pod.as_ref(), &summary, stopping);
    let final_phase = match seen.pod.as_ref().map(pod::progress) {
        Some(p @ (Progress::Succeeded | Progress::Failed)) => p.phase(),
        _ => PodPhase::Deleted,
    };
    info!(?exit, ?outcome, phase = ?final_phase, "worker pod ended");
    let patch = WorkerPatch::new(WorkerRecord {
        pod_phase: Some(final_phase),
        ..WorkerRecord::default()
    });
    if let Err(e) = w.inner.api.patch_worker(w.id, &patch, None).await {
        warn!(error = %e, "cannot record the pod's end");
    }
    w.inner.workers.ended(
        w.id,
        w.generation,
        Ended {
            outcome,
            exit,
            summary,
            spend: crate::runner::cost::Spend::default(),
            input_seq: 0,
            pid: None,
        },
    );
    let _ = w.inner.wake.send(w.id);
}

/// Follow the container's log to its end (reconnecting if the stream
/// breaks while the pod still runs), feeding every line to `summary` and
/// the lines from `post_from` on to `poster`.
async fn read_log(w: &mut Worker, summary: &mut RunSummary, poster: &mut Poster, post_from: usize) {
    // Lines already taken, across reconnects (each one reads from the start).
    let mut taken = 0usize;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
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
                    // A batch that is due goes even while the log is quiet.
                    let due = poster.due_at();
                    let linger = async move {
                        match due {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    let line = tokio::select! {
                        line = lines.next() => line,
                        _ = linger => {
                            poster.flush(false).await;
                            continue;
                        }
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
        backoff.wait().await;
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
        poster.push(v, 0);
    }
}
