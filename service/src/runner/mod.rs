//! The runner (`agent-sessions runner`): turns session events into Claude
//! Code workers and reports what they do, through the HTTP API only.
//!
//! `reconcile` decides (pure), `controller` acts, `backend` is the trait the
//! local backend (`local`, child processes in per-session `workspace`s) and
//! the Kubernetes backend (`kubernetes`, pods over per-session claims)
//! implement, `claude` knows the CLI, `feed` brings the wake-ups, `api` is
//! the HTTP client. Each backend the settings choose gets its own
//! controller. Start-up: find the end of the feed, adopt workers an earlier
//! runner left, resync every managed session, then follow the feed, Redis
//! and a periodic resync.

pub mod api;
pub mod backend;
pub mod claude;
pub mod controller;
pub mod feed;
pub mod kubernetes;
pub mod local;
pub mod reconcile;
pub mod workspace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use crate::settings::{RunnerSecrets, Settings};
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

/// A configured runner, not yet running.
pub struct Runner {
    settings: Settings,
    secrets: RunnerSecrets,
}

impl Runner {
    pub fn new(settings: &Settings, secrets: RunnerSecrets) -> Self {
        Self {
            settings: settings.clone(),
            secrets,
        }
    }

    /// Run until `shutdown` resolves. Workers are left running: they are
    /// adopted by the next runner (DESIGN G8), not orphaned.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), RunnerError> {
        let r = &self.settings.runner;
        let root = if r.backend.local() {
            std::fs::create_dir_all(&r.workspace_root).map_err(|source| {
                RunnerError::WorkspaceRoot {
                    path: r.workspace_root.clone(),
                    source,
                }
            })?;
            r.workspace_root
                .canonicalize()
                .map_err(|source| RunnerError::WorkspaceRoot {
                    path: r.workspace_root.clone(),
                    source,
                })?
        } else {
            // Only the feed position lives there (best effort: without
            // it a restart fast-forwards and the resync covers the gap).
            r.workspace_root.clone()
        };
        let api = ApiClient::new(&r.api_url, self.secrets.api_token.clone())?;
        let mut running: Vec<Box<dyn Fn() -> usize + Send + Sync>> = Vec::new();
        // One task per controller; dropping it (abort) drops its tasks.
        let mut controllers = AbortOnDrop(Vec::new());
        if r.backend.local() {
            let (wake_tx, wake_rx) = mpsc::unbounded_channel();
            let backend = LocalBackend::new(
                LocalConfig {
                    root: root.clone(),
                    claude_bin: r.claude_bin.clone(),
                    bare: r.bare,
                    worker_env: self.secrets.worker_env.clone(),
                    interrupt_grace: Duration::from_millis(r.interrupt_grace_ms),
                    terminate_grace: Duration::from_millis(r.terminate_grace_ms),
                    message_batch: r.message_batch,
                },
                api.clone(),
                wake_tx.clone(),
            );
            let ctx = Arc::new(Context::new(api.clone(), backend, r.max_workers, wake_tx));
            info!(
                api = %r.api_url,
                root = %root.display(),
                claude = %r.claude_bin,
                max_workers = r.max_workers,
                passes_env = ?self.secrets,
                "local backend starting"
            );
            let c = ctx.clone();
            running.push(Box::new(move || c.backend.running()));
            controllers.0.push(tokio::spawn(run_controller(
                ctx,
                wake_rx,
                feed::Position::load(&root),
                self.settings.clone(),
                AbortOnDrop(Vec::new()),
            )));
        }
        if r.backend.kubernetes() {
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
            let ctx = Arc::new(Context::new(api.clone(), backend, r.max_workers, wake_tx));
            let c = ctx.clone();
            running.push(Box::new(move || c.backend.running()));
            controllers.0.push(tokio::spawn(run_controller(
                ctx,
                wake_rx,
                feed::Position::load_named(&root, "feed-position-kubernetes"),
                self.settings.clone(),
                extra,
            )));
        }
        let running = Arc::new(running);
        let server = serve_metrics(&r.metrics_listen, running.clone(), r.max_workers);
        info!("runner running");
        shutdown.await;
        if let Some(handle) = server {
            handle.stop(false).await;
        }
        drop(controllers);
        info!(
            workers_left = running.iter().map(|f| f()).sum::<usize>(),
            "runner stopped; workers keep running"
        );
        Ok(())
    }
}

/// One backend's controller until aborted: position in the feed, adopt
/// what an earlier runner left, then the queue, the resync, the feed and
/// Redis (and the backend's own `tasks`).
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
                        metrics::gauge!("runner_workers", "state" => "running").set(n as f64);
                        metrics::gauge!("runner_max_workers").set(max_workers as f64);
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
        .run_until(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
