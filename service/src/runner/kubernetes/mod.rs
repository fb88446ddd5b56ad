//! The Kubernetes backend: each running session is one pod
//! (`as-worker-<session id>`) over one PersistentVolumeClaim
//! (`as-ws-<session id>`) that holds its workspace and `CLAUDE_CONFIG_DIR`,
//! so a pod started again with `--resume` continues the same transcript.
//!
//! `access` is every API call (and the RBAC they need), `pod` builds the
//! objects and reads pod status, `supervise` follows one worker pod (its
//! status from the pod watch, its stream-json from the pod log) until it
//! ends, `attach` writes to a worker's stdin (the pod's `attach`). One watch over the managed pods feeds every supervisor; a sweep at
//! start-up and every resync adopts pods of active sessions and deletes the
//! rest (orphans), and removes the claims of deleted sessions (and of
//! completed ones unless they are kept).

pub mod access;
pub mod attach;
pub mod pod;
mod supervise;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, instrument, warn};
use uuid::Uuid;

use super::api::ApiClient;
use super::backend::{Backend, BackendError, StartRequest, Started, Wake, WorkerExit};
use super::reconcile::{Observed, SessionView, StopReason};
use super::workers::{Slot, WorkerTable, lock};
use crate::backoff::Backoff;
use crate::domain::worker::Resources;
use crate::domain::{RuntimeBackend, SessionStatus};
use crate::settings::{RunnerSettings, WORKER_PASSTHROUGH_ENV};
use access::{Created, Kube};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
    #[error("the Kubernetes API refused or failed `{call}`: {source}")]
    Api {
        call: String,
        #[source]
        source: kube::Error,
    },
    #[error("pod {0} of an earlier worker is still being removed")]
    PodInTheWay(String),
    #[error("the workspace claim {0} is being deleted")]
    ClaimTerminating(String),
}

/// How the backend is set up (from the runner settings).
#[derive(Debug, Clone)]
pub struct KubeConfig {
    pub namespace: String,
    pub worker_image: String,
    pub api_key_secret: String,
    pub api_key_secret_key: String,
    pub storage_class: Option<String>,
    pub claim_size: String,
    pub active_deadline_seconds: i64,
    /// Between SIGTERM and SIGKILL when a worker pod is deleted.
    pub termination_grace_seconds: i64,
    pub delete_claim_on_completion: bool,
    pub default_resources: Resources,
    pub bare: bool,
    /// Non-secret pass-through values (`ANTHROPIC_BASE_URL`, …) as literals;
    /// the API key is only ever a Secret reference.
    pub worker_env: Vec<(String, String)>,
    pub message_batch: usize,
    pub resync_interval: Duration,
    /// What workers' turns cost.
    pub prices: std::sync::Arc<crate::runner::cost::Prices>,
}

impl KubeConfig {
    pub fn from_settings(r: &RunnerSettings, runner_env: &[(String, String)]) -> Self {
        let grace_ms = r.interrupt_grace_ms + r.terminate_grace_ms;
        Self {
            namespace: r.namespace.clone(),
            worker_image: r.worker_image.clone(),
            api_key_secret: r.api_key_secret.clone(),
            api_key_secret_key: r.api_key_secret_key.clone(),
            storage_class: r.storage_class().map(str::to_owned),
            claim_size: r.claim_size.clone(),
            active_deadline_seconds: r.active_deadline_seconds,
            termination_grace_seconds: i64::try_from(grace_ms.div_ceil(1000)).unwrap_or(30),
            delete_claim_on_completion: r.delete_claim_on_completion,
            default_resources: Resources {
                requests: r.default_requests.clone(),
                limits: r.default_limits.clone(),
            },
            bare: r.bare,
            worker_env: runner_env
                .iter()
                .filter(|(k, _)| {
                    k != "ANTHROPIC_API_KEY" && WORKER_PASSTHROUGH_ENV.contains(&k.as_str())
                })
                .cloned()
                .collect(),
            message_batch: r.message_batch,
            prices: std::sync::Arc::new(crate::runner::cost::Prices::new(&r.prices)),
            resync_interval: r.resync_interval(),
        }
    }
}

/// The latest state of a worker's pod, from its creation, the watch or a get.
#[derive(Debug, Clone, Default)]
struct Seen {
    pod: Option<Pod>,
    /// Deleted from the API (not just being deleted).
    gone: bool,
}

/// What the Kubernetes backend keeps of a worker beside the common slot.
struct PodHandle {
    pod: String,
    /// Feeds the worker's supervisor what the watch sees of its pod.
    seen: watch::Sender<Seen>,
}

struct Inner {
    cfg: KubeConfig,
    kube: Kube,
    api: ApiClient,
    wake: Wake,
    workers: WorkerTable<PodHandle>,
    /// Sessions with a workspace claim, and whether it holds a transcript
    /// (a worker printed its `system/init`, or an earlier runner's claim).
    claims: Mutex<HashMap<Uuid, bool>>,
    /// Bytes of each session's transcript the service is known to hold
    /// (where a new pod's shim starts reporting).
    shipped: Mutex<HashMap<Uuid, u64>>,
}

#[derive(Clone)]
pub struct KubernetesBackend {
    inner: Arc<Inner>,
}

/// A kube client for the settings: `kube_api_url` (plain HTTP allowed, for
/// tests), else kubeconfig or the in-cluster service account.
pub async fn client(r: &RunnerSettings) -> Result<kube::Client, KubeError> {
    crate::client::install_tls_provider();
    let config = match r.kube_api_url() {
        Some(url) => {
            let uri = url
                .parse()
                .map_err(|e| KubeError::Config(format!("kube_api_url {url:?}: {e}")))?;
            let mut c = kube::Config::new(uri);
            c.default_namespace = r.namespace.clone();
            c
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
}

impl KubernetesBackend {
    pub fn new(cfg: KubeConfig, client: kube::Client, api: ApiClient, wake: Wake) -> Self {
        let kube = Kube::new(client, &cfg.namespace);
        Self {
            inner: Arc::new(Inner {
                cfg,
                kube,
                api,
                wake,
                workers: WorkerTable::default(),
                claims: Mutex::new(HashMap::new()),
                shipped: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A writer to the stdin of worker pod `pod` (see [`attach`]): each
    /// call is a new attach; dropping it leaves the container's stdin open.
    pub async fn attach_stdin(
        &self,
        pod: &str,
    ) -> Result<Box<dyn tokio::io::AsyncWrite + Send + Unpin>, KubeError> {
        Ok(Box::new(self.inner.attach_stdin(pod).await?))
    }

    /// The pod watch and the periodic sweep; they run until aborted.
    pub fn spawn_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let watch_inner = self.inner.clone();
        let sweeper = self.clone();
        vec![
            tokio::spawn(watch_inner.watch_pods().instrument(info_span!("pod_watch"))),
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(sweeper.inner.cfg.resync_interval).await;
                        for id in sweeper.sweep().await {
                            let _ = sweeper.inner.wake.send(id);
                        }
                    }
                }
                .instrument(info_span!("pod_sweep")),
            ),
        ]
    }

    /// Adopt the pods of active sessions that no slot holds; delete the
    /// others (orphans: the session is gone, not active, unmanaged, or has
    /// moved to a newer worker); delete the claims of deleted sessions, and
    /// of completed ones unless claims are kept.
    /// Returns the sessions adopted.
    #[instrument(skip(self))]
    pub async fn sweep(&self) -> Vec<Uuid> {
        let inner = &self.inner;
        let mut adopted = Vec::new();
        match inner.kube.list_pods().await {
            Ok(pods) => {
                for p in pods {
                    if let Some(id) = self.sweep_pod(p).await {
                        adopted.push(id);
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list worker pods"),
        }
        match inner.kube.list_claims().await {
            Ok(claims) => {
                for c in claims {
                    let (Some((id, _)), Some(name)) =
                        (pod::session_of(&c.metadata), c.metadata.name.clone())
                    else {
                        continue;
                    };
                    lock(&inner.claims).entry(id).or_insert(true);
                    if !inner.workers.contains(id) {
                        inner.release_claim_if_done(id, &name).await;
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list workspace claims"),
        }
        adopted
    }

    async fn sweep_pod(&self, p: Pod) -> Option<Uuid> {
        let inner = &self.inner;
        let name = p.metadata.name.clone()?;
        let Some((id, generation)) = pod::session_of(&p.metadata) else {
            warn!(pod = %name, "a managed pod without a session label; leaving it alone");
            return None;
        };
        if inner.workers.contains(id) {
            return None;
        }
        let session = match inner.api.session(id).await {
            Ok(s) => s,
            Err(e) => {
                warn!(session_id = %id, error = %e, "cannot read the session of a pod; left for now");
                return None;
            }
        };
        let view = session.map(|s| SessionView::new(&s, RuntimeBackend::Kubernetes));
        let generation = generation.unwrap_or(0);
        let keep = view.as_ref().is_some_and(|v| {
            v.managed.is_some()
                && v.status == SessionStatus::Active
                && generation >= v.generation
                && !(generation == v.generation && v.stopped_at.is_some())
        });
        if !keep {
            info!(session_id = %id, pod = %name, generation,
                status = ?view.as_ref().map(|v| v.status), "deleting an orphaned worker pod");
            if let Err(e) = inner.kube.delete_pod(&name).await {
                warn!(pod = %name, error = %e, "cannot delete an orphaned pod");
            }
            return None;
        }
        let started_at = p
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
            .unwrap_or_else(Utc::now);
        info!(session_id = %id, pod = %name, generation, "adopting a worker pod");
        let (tx, rx) = watch::channel(Seen {
            pod: Some(p),
            gone: false,
        });
        let handle = PodHandle {
            pod: name.clone(),
            seen: tx,
        };
        if !inner
            .workers
            .insert_if_absent(id, Slot::new(generation, started_at, handle))
        {
            return None;
        }
        lock(&inner.claims).entry(id).or_insert(true);
        supervise::spawn(
            inner.clone(),
            id,
            generation,
            name,
            rx,
            supervise::Begin::Adopted,
        );
        Some(id)
    }
}

impl Inner {
    async fn attach_stdin(&self, pod: &str) -> Result<attach::PodStdin, KubeError> {
        self.kube.attach_stdin(pod).await
    }

    /// A pod the watch (or a get) saw: hand it to its worker's supervisor.
    fn saw(&self, pod: Pod, gone: bool) {
        let Some((id, Some(generation))) = pod::session_of(&pod.metadata) else {
            return;
        };
        let slots = self.workers.lock();
        if let Some(s) = slots.get(&id)
            && s.generation == generation
            && pod.metadata.name.as_deref() == Some(s.handle.pod.as_str())
        {
            s.handle.seen.send_if_modified(|cur| {
                if cur.gone {
                    return false;
                }
                *cur = Seen {
                    pod: Some(pod),
                    gone,
                };
                true
            });
        }
    }

    fn saw_gone(&self, id: Uuid, generation: u64) {
        let slots = self.workers.lock();
        if let Some(s) = slots.get(&id).filter(|s| s.generation == generation) {
            s.handle.seen.send_modify(|cur| cur.gone = true);
        }
    }

    async fn watch_pods(self: Arc<Self>) {
        let events = self.kube.watch_pods().default_backoff();
        futures_util::pin_mut!(events);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => self.saw(p, false),
                Ok(watcher::Event::Delete(p)) => self.saw(p, true),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => warn!(error = %e, "pod watch failed; retrying"),
            }
        }
    }

    /// Make sure the session's claim exists (and is not on its way out).
    async fn ensure_claim(&self, id: Uuid) -> Result<(), KubeError> {
        let name = pod::claim_name(id);
        match self.kube.get_claim(&name).await? {
            Some(c) if c.metadata.deletion_timestamp.is_some() => {
                Err(KubeError::ClaimTerminating(name))
            }
            Some(_) => {
                lock(&self.claims).entry(id).or_insert(true);
                Ok(())
            }
            None => {
                match self
                    .kube
                    .create_claim(&pod::workspace_claim(&self.cfg, id))
                    .await?
                {
                    Created::New(_) => info!(claim = %name, "workspace claim created"),
                    Created::AlreadyExists => {}
                }
                lock(&self.claims).entry(id).or_insert(false);
                Ok(())
            }
        }
    }

    /// Create the pod; a pod of that name and generation counts as created.
    async fn create_pod(&self, req: &StartRequest) -> Result<Pod, KubeError> {
        let want = pod::worker_pod(&self.cfg, req);
        let name = pod::pod_name(req.session_id);
        for _ in 0..2 {
            match self.kube.create_pod(&want).await? {
                Created::New(p) => return Ok(p),
                Created::AlreadyExists => {}
            }
            let Some(existing) = self.kube.get_pod(&name).await? else {
                continue; // gone meanwhile: try again
            };
            if pod::session_of(&existing.metadata).and_then(|(_, g)| g) == Some(req.generation) {
                info!(pod = %name, "the pod exists already (same generation): taking it");
                return Ok(existing);
            }
            // An earlier worker's pod: it must go before this one can start.
            info!(pod = %name, "an earlier worker's pod is in the way; deleting it");
            self.kube.delete_pod(&name).await?;
            let deadline = tokio::time::Instant::now()
                + Duration::from_secs(self.cfg.termination_grace_seconds.unsigned_abs() + 10);
            while self.kube.get_pod(&name).await?.is_some() {
                if tokio::time::Instant::now() > deadline {
                    return Err(KubeError::PodInTheWay(name));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Err(KubeError::PodInTheWay(name))
    }

    /// Delete the claim when the session is gone (deleted: nothing can
    /// resume it, whatever `delete_claim_on_completion` says), or completed
    /// and claims of completed sessions are not kept.
    async fn release_claim_if_done(&self, id: Uuid, claim: &str) {
        let done = match self.api.session(id).await {
            Ok(None) => true,
            Ok(Some(s)) => {
                self.cfg.delete_claim_on_completion
                    && SessionStatus::from(s.status) == SessionStatus::Completed
            }
            Err(e) => {
                warn!(session_id = %id, error = %e, "cannot read the session of a claim");
                false
            }
        };
        if done {
            self.delete_claim(id, claim).await;
        }
    }

    async fn delete_claim(&self, id: Uuid, claim: &str) {
        match self.kube.delete_claim(claim).await {
            Ok(_) => {
                info!(session_id = %id, %claim, "workspace claim deleted");
                lock(&self.claims).remove(&id);
            }
            Err(e) => warn!(%claim, error = %e, "cannot delete the workspace claim"),
        }
    }
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> RuntimeBackend {
        RuntimeBackend::Kubernetes
    }

    fn observe(&self, session_id: Uuid) -> Observed {
        Observed {
            worker: self.inner.workers.state(session_id),
            has_transcript: lock(&self.inner.claims)
                .get(&session_id)
                .copied()
                .unwrap_or(false),
        }
    }

    fn exit_of(&self, session_id: Uuid, generation: u64) -> Option<WorkerExit> {
        self.inner.workers.exit_of(session_id, generation)
    }

    #[instrument(skip(self, req), fields(session_id = %req.session_id, generation = req.generation, launch = req.launch.as_str()))]
    async fn start(&self, req: StartRequest) -> Result<Started, BackendError> {
        let inner = &self.inner;
        let id = req.session_id;
        let name = pod::pod_name(id);
        // The slot first, so a sweep meanwhile does not adopt the new pod.
        let (tx, rx) = watch::channel(Seen::default());
        let handle = PodHandle {
            pod: name.clone(),
            seen: tx,
        };
        if !inner
            .workers
            .claim(id, Slot::new(req.generation, Utc::now(), handle))
        {
            return Err(BackendError::AlreadyRunning(id));
        }
        let created = async {
            inner.ensure_claim(id).await?;
            inner.create_pod(&req).await
        }
        .await;
        let pod = match created {
            Ok(p) => p,
            Err(e) => {
                inner.workers.remove(id);
                return Err(e.into());
            }
        };
        let started_at = Utc::now();
        if let Some(s) = inner.workers.lock().get_mut(&id) {
            s.started_at = started_at;
            s.handle.seen.send_modify(|cur| {
                if cur.pod.is_none() {
                    cur.pod = Some(pod);
                }
            });
        }
        info!(pod = %name, "worker pod created");
        supervise::spawn(
            inner.clone(),
            id,
            req.generation,
            name.clone(),
            rx,
            supervise::Begin::New {
                restore: req.restore.clone(),
            },
        );
        Ok(Started {
            pid: None,
            pod: Some(name),
            started_at,
        })
    }

    fn stop(&self, session_id: Uuid, reason: StopReason) {
        let Some((name, generation)) = self
            .inner
            .workers
            .begin_stop(session_id, reason, |s| (s.handle.pod.clone(), s.generation))
        else {
            return;
        };
        let inner = self.inner.clone();
        let span =
            info_span!("stop_worker", session_id = %session_id, pod = %name, reason = ?reason);
        tokio::spawn(
            async move {
                // Deleting sends SIGTERM, then SIGKILL after the grace period.
                let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
                for _ in 0..6 {
                    match inner.kube.delete_pod(&name).await {
                        Ok(true) => return info!("worker pod deleted"),
                        Ok(false) => {
                            inner.saw_gone(session_id, generation);
                            return;
                        }
                        Err(e) => warn!(error = %e, "cannot delete the worker pod; retrying"),
                    }
                    backoff.wait().await;
                }
                // Let the controller decide again.
                inner.workers.stop_failed(session_id);
                let _ = inner.wake.send(session_id);
            }
            .instrument(span),
        );
    }

    fn live(&self, session_id: Uuid) -> Option<std::sync::Arc<crate::runner::driver::Live>> {
        self.inner.workers.live(session_id)
    }

    fn forget(&self, session_id: Uuid, generation: u64) {
        let Some(name) = self
            .inner
            .workers
            .forget(session_id, generation)
            .map(|s| s.handle.pod)
        else {
            return;
        };
        let inner = self.inner.clone();
        let span = info_span!("forget_worker", session_id = %session_id, pod = %name);
        tokio::spawn(
            async move {
                // The exit is on record: the pod has nothing more to tell.
                if let Err(e) = inner.kube.delete_pod(&name).await {
                    warn!(error = %e, "cannot delete the ended pod; the sweep will");
                }
                inner
                    .release_claim_if_done(session_id, &pod::claim_name(session_id))
                    .await;
            }
            .instrument(span),
        );
    }

    fn running(&self) -> usize {
        self.inner.workers.running()
    }

    fn sessions(&self) -> Vec<Uuid> {
        self.inner.workers.sessions()
    }

    async fn adopt(&self) -> Vec<Uuid> {
        self.sweep().await
    }

    fn has_workspace(&self, session_id: Uuid) -> bool {
        lock(&self.inner.claims).contains_key(&session_id)
    }

    async fn discard(&self, session_id: Uuid) {
        if !self.inner.workers.contains(session_id) {
            self.inner
                .delete_claim(session_id, &pod::claim_name(session_id))
                .await;
        }
    }
}
