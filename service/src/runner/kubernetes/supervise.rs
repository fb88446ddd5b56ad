//! One task per worker pod: report its progress (scheduled, running) on the
//! session, follow its log once the container runs and fold the stream-json
//! into a `RunSummary` (posting the lines as the session's messages, like
//! the local backend), then wait for the pod's end, judge it and wake the
//! controller.
//!
//! The pod runs the CLI behind `agent-sessions worker-shim` (`crate::shim`):
//! the first attach writes the shim's framing (the transcript to restore, if
//! any) before anything of the driver's, and the shim's lines in the log
//! (the transcript as it grows) go to the service, not to the driver.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{AsyncBufReadExt, FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::pod::{self, Progress};
use super::{Inner, Seen};
use crate::backoff::Backoff;
use crate::contract::{PodPhase, WorkerPatch, WorkerRecord};
use crate::runner::driver::{Driver, Setup};
use crate::runner::transcript::{Relay, Shipper};
use crate::runner::workers::{Ended, lock};
use crate::shim::{self, Report};

/// How often a supervisor that heard nothing asks for its pod (the watch
/// may be reconnecting).
const REFRESH: Duration = Duration::from_secs(10);
/// How long a log may keep going once its pod has ended.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// How a supervisor comes to its pod.
pub(super) enum Begin {
    /// This runner created it: with the transcript to write back first.
    New { restore: Option<Arc<Vec<u8>>> },
    /// An earlier runner did.
    Adopted,
}

pub(super) fn spawn(
    inner: Arc<Inner>,
    id: Uuid,
    generation: u64,
    pod_name: String,
    rx: watch::Receiver<Seen>,
    begin: Begin,
) {
    let span = info_span!("worker_pod", session_id = %id, generation, pod = %pod_name);
    let (adopted, framing) = match begin {
        Begin::New { restore } => (false, Framing::Due(restore)),
        Begin::Adopted => (true, Framing::Unsure(None)),
    };
    tokio::spawn(
        supervise(
            Worker {
                inner,
                id,
                generation,
                pod_name,
                rx,
                framing,
                transcript: None,
            },
            adopted,
        )
        .instrument(span),
    );
}

/// The shim's framing (see `crate::shim`), written once per pod.
enum Framing {
    /// To write on the next attach (with the transcript to restore).
    Due(Option<Arc<Vec<u8>>>),
    /// Maybe written already (by an earlier runner, or by a write that
    /// failed): the log says whether the shim took it.
    Unsure(Option<Arc<Vec<u8>>>),
    Done,
}

struct Worker {
    inner: Arc<Inner>,
    id: Uuid,
    generation: u64,
    pod_name: String,
    rx: watch::Receiver<Seen>,
    framing: Framing,
    /// The transcript the shim reports, on its way to the service (from
    /// its first report on).
    transcript: Option<(Shipper, Relay)>,
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

    /// Write the framing to a new attach, unless the shim took it already.
    async fn frame(
        &mut self,
        stdin: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        if let Framing::Unsure(held) = &self.framing {
            if !self.runs_the_shim() {
                // A pod of a runner from before the shim: the CLI alone.
                self.framing = Framing::Done;
                return Ok(());
            }
            let log = self
                .inner
                .kube
                .pod_log(&self.pod_name)
                .await
                .map_err(|e| e.to_string())?;
            let started = log.lines().any(|l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| shim::report(&v) == Some(Report::Started))
            });
            self.framing = if started {
                Framing::Done
            } else {
                Framing::Due(match held {
                    Some(bytes) => Some(bytes.clone()),
                    None => self.fetch_restore().await?,
                })
            };
        }
        let Framing::Due(restore) = &self.framing else {
            return Ok(());
        };
        let restore = restore.clone();
        let offset = match &restore {
            Some(bytes) => bytes.len() as u64,
            None => lock(&self.inner.shipped)
                .get(&self.id)
                .copied()
                .unwrap_or(0),
        };
        let bytes = shim::framing(restore.as_deref().map(Vec::as_slice), offset);
        let written = async {
            stdin.write_all(&bytes).await?;
            stdin.flush().await
        }
        .await;
        match written {
            Ok(()) => {
                if let Some(r) = &restore {
                    info!(bytes = r.len(), "transcript restored from the service");
                    lock(&self.inner.claims).insert(self.id, true);
                }
                self.framing = Framing::Done;
                Ok(())
            }
            Err(e) => {
                self.framing = Framing::Unsure(restore);
                Err(e.to_string())
            }
        }
    }

    fn runs_the_shim(&self) -> bool {
        self.rx
            .borrow()
            .pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.command.as_ref())
            .is_some_and(|c| c.iter().map(String::as_str).eq(pod::COMMAND))
    }

    /// An adopted pod whose shim has not started: the transcript its
    /// creator meant to restore (the service's copy), if it meant to.
    async fn fetch_restore(&self) -> Result<Option<Arc<Vec<u8>>>, String> {
        let meant = self
            .rx
            .borrow()
            .pod
            .as_ref()
            .and_then(|p| p.metadata.annotations.as_ref())
            .is_some_and(|a| a.contains_key(pod::RESTORE_ANNOTATION));
        if !meant {
            return Ok(None);
        }
        let bytes = self
            .inner
            .api
            .transcript(self.id)
            .await
            .map_err(|e| e.to_string())?;
        Ok((!bytes.is_empty()).then(|| Arc::new(bytes)))
    }

    /// One log line: the shim's go to the service, the rest to the driver
    /// (its mark is its line number, 1, 2, …: the driver posts the lines
    /// past those an earlier runner posted).
    async fn take(&mut self, line: &str, mark: u64, driver: &mut Driver) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            // stderr shares the container log; it is not stream-json.
            debug!("skipping a non-JSON log line");
            return;
        };
        match shim::report(&v) {
            Some(Report::Started) => return,
            Some(Report::Transcript { offset, data }) => {
                let (_, relay) = self.transcript.get_or_insert_with(|| {
                    (
                        Shipper::new(self.inner.api.clone(), self.id, offset),
                        Relay::new(offset),
                    )
                });
                relay.push(offset, data.as_bytes());
                self.ship().await;
                return;
            }
            None => {}
        }
        let had_init = driver.summary.claude_session_id.is_some();
        driver.hear(v, mark).await;
        if !had_init && driver.summary.claude_session_id.is_some() {
            // The CLI has begun its transcript on the claim: a restart resumes it.
            lock(&self.inner.claims).insert(self.id, true);
        }
    }

    async fn ship(&mut self) {
        self.ship_now(false).await;
    }

    /// Send the service what the shim reported and it lacks (`last`: the
    /// pod is over, try now whatever an earlier failure said).
    async fn ship_now(&mut self, last: bool) {
        let Some((shipper, relay)) = &mut self.transcript else {
            return;
        };
        let sent = if last {
            shipper.finish_from(relay).await
        } else {
            shipper.ship_from(relay).await
        };
        if let Some(at) = sent {
            relay.shipped(at);
            let mut shipped = lock(&self.inner.shipped);
            let known = shipped.entry(self.id).or_default();
            *known = (*known).max(at);
        }
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
    let (first, before) =
        w.rx.borrow()
            .pod
            .as_ref()
            .map(|p| pod::driver_state(&p.metadata))
            .unwrap_or_default();
    let mut driver = Driver::new(Setup {
        api: w.inner.api.clone(),
        session_id: w.id,
        generation: w.generation,
        first,
        before,
        prices: w.inner.cfg.prices.clone(),
        message_batch: w.inner.cfg.message_batch,
        wake: w.inner.wake.clone(),
        live: w.inner.workers.live(w.id).unwrap_or_default(),
        posted_from: post_from as u64,
    });
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
        read_log(&mut w, &mut driver).await;
    }
    while !ended(&w.seen()) {
        w.wait().await;
    }
    driver.finish().await;
    w.ship_now(true).await;
    let seen = w.seen();
    let stopping = w.inner.workers.stopping(w.id, w.generation);
    let (outcome, exit) = pod::outcome(seen.pod.as_ref(), &driver.summary, stopping);
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
            spend: driver.totals(),
            input_seq: driver.input_seq(),
            summary: std::mem::take(&mut driver.summary),
            pid: None,
        },
    );
    let _ = w.inner.wake.send(w.id);
}

/// Follow the container's log to its end (reconnecting if the stream
/// breaks while the pod still runs), feeding every line to the driver, and
/// keep the driver attached to the container's stdin.
async fn read_log(w: &mut Worker, driver: &mut Driver) {
    // Lines already taken, across reconnects (each one reads from the start).
    let mut taken = 0usize;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attach_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attach_at = tokio::time::Instant::now();
    let live = driver.live().clone();
    loop {
        match w.inner.kube.follow_pod_log(&w.pod_name).await {
            Ok(reader) => {
                let mut lines = reader.lines();
                let mut index = 0usize;
                loop {
                    if !driver.has_stdin() && tokio::time::Instant::now() >= attach_at {
                        let attached = match w.inner.attach_stdin(&w.pod_name).await {
                            Ok(mut stdin) => match w.frame(&mut stdin).await {
                                Ok(()) => Ok(stdin),
                                Err(e) => Err(format!("cannot write the shim's framing: {e}")),
                            },
                            Err(e) => Err(e.to_string()),
                        };
                        match attached {
                            Ok(stdin) => {
                                attach_backoff.reset();
                                driver.attach(Box::new(stdin)).await;
                            }
                            Err(e) => {
                                debug!(error = %e, "cannot attach to the worker's stdin yet");
                                attach_at =
                                    tokio::time::Instant::now() + attach_backoff.next_delay();
                            }
                        }
                    }
                    let rx = &mut w.rx;
                    let drained = async move {
                        let _ = rx.wait_for(ended).await;
                        tokio::time::sleep(LOG_DRAIN).await;
                    };
                    // A transcript send that failed is retried on its own
                    // clock, not only when the pod reports more.
                    let resend = w.transcript.as_ref().and_then(|(s, _)| s.retry_at());
                    let due = [
                        driver.next_due(),
                        (!driver.has_stdin()).then_some(attach_at),
                        resend,
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    let timer = async move {
                        match due {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    let line = tokio::select! {
                        line = lines.next() => line,
                        _ = live.nudged() => {
                            driver.sync().await;
                            continue;
                        }
                        _ = timer => {
                            driver.tick().await;
                            w.ship().await;
                            continue;
                        }
                        _ = drained => {
                            debug!("the pod ended but its log did not; leaving it");
                            None
                        }
                    };
                    match line {
                        Some(Ok(text)) => {
                            // With what else is there already: one post for
                            // the lot (natural batching, no timer).
                            let mut batch = vec![text];
                            while let Some(Some(Ok(more))) = lines.next().now_or_never() {
                                batch.push(more);
                            }
                            for text in batch {
                                if index >= taken {
                                    w.take(&text, index as u64 + 1, driver).await;
                                    taken += 1;
                                }
                                index += 1;
                            }
                            driver.settle().await;
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
