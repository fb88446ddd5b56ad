//! The runner (`agent-sessions runner`): turns session events into Claude
//! Code workers and reports what they do, through the HTTP API only.
//!
//! `reconcile` decides (pure), `controller` acts, `backend` is the trait the
//! local backend (`local`, child processes in per-session `workspace`s) and
//! the Kubernetes backend (`kubernetes`, pods over per-session claims)
//! implement, both over one `workers` table and one `poster` of the
//! workers' output as messages; `claude` knows the CLI, `feed` brings the
//! wake-ups, `api` is the HTTP client. Each backend the settings choose gets
//! its own controller. Start-up: find the end of the feed, adopt workers an earlier
//! runner left, resync every managed session, then follow the feed, Redis
//! and a periodic resync.

pub mod api;
pub mod backend;
pub mod claude;
pub mod controller;
pub mod cost;
pub mod driver;
pub mod feed;
pub mod kubernetes;
pub mod local;
pub mod poster;
pub mod protocol;
pub mod reconcile;
pub mod transcript;
pub mod workers;
pub mod workspace;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use crate::settings::{RunnerSecrets, RunnerSettings, Settings};
use api::ApiClient;
use backend::Backend;
use controller::Context;
use kubernetes::{KubeConfig, KubernetesBackend};
use local::{LocalBackend, LocalConfig};

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot create the workspace root {path}: {source}")]
    WorkspaceRoot {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeError),
}

/// What the runner has done so far, for whoever holds the runner (tests
/// wait on it instead of sleeping) and for `/metrics`.
#[derive(Debug, Default)]
pub struct RunnerStats {
    resyncs: AtomicU64,
}

impl RunnerStats {
    /// Full resyncs completed: every managed session listed and woken.
    pub fn resyncs_done(&self) -> u64 {
        self.resyncs.load(Ordering::SeqCst)
    }

    fn resynced(&self, backend: &'static str) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
        metrics::counter!(crate::metrics::names::RUNNER_RESYNCS, "backend" => backend).increment(1);
    }
}

/// A configured runner, not yet running.
pub struct Runner {
    settings: Settings,
    secrets: RunnerSecrets,
    stats: Arc<RunnerStats>,
}

/// The controllers started so far: their tasks (aborted when this is
/// dropped) and how to count each one's live workers.
#[derive(Default)]
struct Controllers {
    tasks: AbortOnDrop,
    running: Vec<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl Runner {
    pub fn new(settings: &Settings, secrets: RunnerSecrets) -> Self {
        Self {
            settings: settings.clone(),
            secrets,
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> Arc<RunnerStats> {
        self.stats.clone()
    }

    /// Run until `shutdown` resolves. Workers are left running: they are
    /// adopted by the next runner, not orphaned.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), RunnerError> {
        let r = &self.settings.runner;
        let root = workspace_root(r)?;
        let api = ApiClient::new(&r.api_url, self.secrets.api_token.clone())?;
        let mut controllers = Controllers::default();
        if r.backend.local() {
            self.start_local(&api, &root, &mut controllers);
        }
        if r.backend.kubernetes() {
            self.start_kubernetes(&api, &root, &mut controllers).await?;
        }
        let running = Arc::new(controllers.running);
        let server = serve_metrics(&r.metrics_listen, running.clone(), r.max_workers);
        info!("runner running");
        shutdown.await;
        if let Some(handle) = server {
            handle.stop(false).await;
        }
        drop(controllers.tasks);
        info!(
            workers_left = running.iter().map(|f| f()).sum::<usize>(),
            "runner stopped; workers keep running"
        );
        Ok(())
    }

    fn start_local(&self, api: &ApiClient, root: &std::path::Path, into: &mut Controllers) {
        let r = &self.settings.runner;
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let backend = LocalBackend::new(
            LocalConfig {
                root: root.to_path_buf(),
                claude_bin: r.claude_bin.clone(),
                bare: r.bare,
                worker_env: self.secrets.worker_env.clone(),
                interrupt_grace: Duration::from_millis(r.interrupt_grace_ms),
                terminate_grace: Duration::from_millis(r.terminate_grace_ms),
                message_batch: r.message_batch,
                prices: Arc::new(cost::Prices::new(&r.prices)),
            },
            api.clone(),
            wake_tx.clone(),
        );
        info!(
            api = %r.api_url,
            root = %root.display(),
            claude = %r.claude_bin,
            max_workers = r.max_workers,
            passes_env = ?self.secrets,
            "local backend starting"
        );
        let position = feed::Position::load(root);
        self.start_controller(
            api,
            backend,
            (wake_tx, wake_rx),
            position,
            AbortOnDrop::default(),
            into,
        );
    }

    async fn start_kubernetes(
        &self,
        api: &ApiClient,
        root: &std::path::Path,
        into: &mut Controllers,
    ) -> Result<(), RunnerError> {
        let r = &self.settings.runner;
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        let client = kubernetes::client(r).await?;
        let cfg = KubeConfig::from_settings(r, &self.secrets.worker_env);
        info!(
            namespace = %cfg.namespace,
            image = %cfg.worker_image,
            api_key_secret = %cfg.api_key_secret,
            max_workers = r.max_workers,
            "kubernetes backend starting"
        );
        let backend = KubernetesBackend::new(cfg, client, api.clone(), wake_tx.clone());
        // The pod watch runs before adoption, so no change is missed.
        let extra = AbortOnDrop(backend.spawn_tasks());
        let position = feed::Position::load_named(root, "feed-position-kubernetes");
        self.start_controller(api, backend, (wake_tx, wake_rx), position, extra, into);
        Ok(())
    }

    /// One controller for `backend`, with its own queue and place in the feed.
    fn start_controller<B: Backend>(
        &self,
        api: &ApiClient,
        backend: B,
        (wake_tx, wake_rx): (mpsc::UnboundedSender<Uuid>, mpsc::UnboundedReceiver<Uuid>),
        position: feed::Position,
        extra: AbortOnDrop,
        into: &mut Controllers,
    ) {
        let r = &self.settings.runner;
        let ctx = Arc::new(Context::new(
            api.clone(),
            backend,
            r.max_workers,
            wake_tx,
            self.stats.clone(),
        ));
        let c = ctx.clone();
        into.running.push(Box::new(move || c.backend.running()));
        into.tasks.0.push(tokio::spawn(run_controller(
            ctx,
            wake_rx,
            position,
            self.settings.clone(),
            extra,
        )));
    }
}

/// Where workspaces (local) and the feed position live. The local backend
/// needs it to exist, canonical; the Kubernetes one only keeps its feed
/// position there (best effort: without it a restart fast-forwards and the
/// resync covers the gap).
fn workspace_root(r: &RunnerSettings) -> Result<PathBuf, RunnerError> {
    if !r.backend.local() {
        return Ok(r.workspace_root.clone());
    }
    let failed = |source| RunnerError::WorkspaceRoot {
        path: r.workspace_root.clone(),
        source,
    };
    std::fs::create_dir_all(&r.workspace_root).map_err(failed)?;
    r.workspace_root.canonicalize().map_err(failed)
}

type RunningCounts = Arc<Vec<Box<dyn Fn() -> usize + Send + Sync>>>;

/// `/metrics` (the process's Prometheus recorder, with live worker gauges)
/// and `/healthz`. A port already taken is logged, not fatal: the runner's
/// job is its workers.
fn serve_metrics(
    listen: &str,
    running: RunningCounts,
    max_workers: usize,
) -> Option<actix_web::dev::ServerHandle> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    if listen.is_empty() {
        return None;
    }
    let handle = crate::metrics::handle();
    let server = HttpServer::new(move || {
        let (handle, running) = (handle.clone(), running.clone());
        App::new()
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok") }),
            )
            .route(
                "/metrics",
                web::get().to(move || {
                    let (handle, running) = (handle.clone(), running.clone());
                    async move {
                        let n: usize = running.iter().map(|f| f()).sum();
                        metrics::gauge!(crate::metrics::names::RUNNER_WORKERS, "state" => "running").set(n as f64);
                        metrics::gauge!(crate::metrics::names::RUNNER_MAX_WORKERS).set(max_workers as f64);
                        HttpResponse::Ok()
                            .content_type("text/plain; version=0.0.4")
                            .body(handle.render())
                    }
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .bind(listen);
    match server {
        Ok(s) => {
            let s = s.run();
            let h = s.handle();
            tokio::spawn(s);
            info!(%listen, "runner metrics listening");
            Some(h)
        }
        Err(e) => {
            warn!(%listen, error = %e, "runner metrics cannot listen; continuing without them");
            None
        }
    }
}

/// One backend's controller until aborted: position in the feed, adopt
/// what an earlier runner left, then the queue, the resync, the feed and
/// Redis (and the backend's own `tasks`).
async fn run_controller<B: Backend>(
    ctx: Arc<Context<B>>,
    wake_rx: mpsc::UnboundedReceiver<Uuid>,
    mut pos: feed::Position,
    settings: Settings,
    mut tasks: AbortOnDrop,
) {
    let r = &settings.runner;
    // Position first, so nothing that happens during the resync is missed.
    if pos.value.is_none() {
        feed::fast_forward(&ctx, &mut pos).await;
    }
    for id in ctx.backend.adopt().await {
        ctx.wake(id);
    }
    tasks.0.extend([
        tokio::spawn(controller::run_queue(
            ctx.clone(),
            wake_rx,
            r.reconcile_concurrency,
        )),
        tokio::spawn(feed::resync_forever(ctx.clone(), r.resync_interval())),
        tokio::spawn(feed::tail(ctx.clone(), pos, r.feed_wait())),
        tokio::spawn(feed::redis_wakeups(
            ctx.clone(),
            settings.redis.url.clone(),
            settings.session_channel(),
            settings.hint_channel(),
        )),
    ]);
    info!(backend = ctx.backend.kind().as_str(), "controller running");
    std::future::pending::<()>().await;
    drop(tasks);
}

#[derive(Default)]
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// `agent-sessions runner`: until SIGINT or SIGTERM.
pub async fn run(settings: &Settings) -> Result<(), RunnerError> {
    Runner::new(settings, RunnerSecrets::from_env())
        .run_until(crate::signals::shutdown_requested())
        .await
}
