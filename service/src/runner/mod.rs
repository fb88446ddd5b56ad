//! The runner (`agent-sessions runner`): turns session events into Claude
//! Code workers and reports what they do, through the HTTP API only.
//!
//! `reconcile` decides (pure), `controller` acts, `backend` is the trait the
//! local backend (`local`, child processes in per-session `workspace`s)
//! implements, `claude` knows the CLI, `feed` brings the wake-ups, `api` is
//! the HTTP client. Start-up: find the end of the feed, adopt workers an
//! earlier runner left, resync every managed session, then follow the feed,
//! Redis and a periodic resync.

pub mod api;
pub mod backend;
pub mod claude;
pub mod controller;
pub mod feed;
pub mod local;
pub mod reconcile;
pub mod workspace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tracing::info;

use crate::settings::{RunnerSecrets, Settings};
use api::ApiClient;
use backend::Backend;
use controller::Context;
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
    #[error("runner.backend = {0:?}: only the local backend is built so far")]
    UnsupportedBackend(String),
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
        if r.backend != "local" {
            return Err(RunnerError::UnsupportedBackend(r.backend.clone()));
        }
        std::fs::create_dir_all(&r.workspace_root).map_err(|source| {
            RunnerError::WorkspaceRoot {
                path: r.workspace_root.clone(),
                source,
            }
        })?;
        let root =
            r.workspace_root
                .canonicalize()
                .map_err(|source| RunnerError::WorkspaceRoot {
                    path: r.workspace_root.clone(),
                    source,
                })?;
        let api = ApiClient::new(&r.api_url, self.secrets.api_token.clone())?;
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
        let ctx = Arc::new(Context::new(api, backend, r.max_workers, wake_tx));
        info!(
            api = %r.api_url,
            root = %root.display(),
            claude = %r.claude_bin,
            max_workers = r.max_workers,
            passes_env = ?self.secrets,
            "runner starting"
        );

        let work = async {
            // Position first, so nothing that happens during the resync is missed.
            let mut pos = feed::Position::load(&root);
            if pos.value.is_none() {
                feed::fast_forward(&ctx, &mut pos).await;
            }
            for id in ctx.backend.adopt().await {
                ctx.wake(id);
            }
            let nudge = Arc::new(Notify::new());
            let tasks = vec![
                tokio::spawn(controller::run_queue(
                    ctx.clone(),
                    wake_rx,
                    r.reconcile_concurrency,
                )),
                tokio::spawn(feed::resync_forever(ctx.clone(), r.resync_interval())),
                tokio::spawn(feed::tail(ctx.clone(), pos, r.feed_poll(), nudge.clone())),
                tokio::spawn(feed::redis_wakeups(
                    ctx.clone(),
                    self.settings.redis.url.clone(),
                    self.settings.session_channel(),
                    nudge,
                )),
            ];
            info!("runner running");
            AbortOnDrop(tasks)
        };
        tokio::pin!(shutdown);
        let tasks = tokio::select! {
            tasks = work => tasks,
            _ = &mut shutdown => return Ok(()),
        };
        shutdown.await;
        drop(tasks);
        info!(
            workers_left = ctx.backend.running(),
            "runner stopped; workers keep running"
        );
        Ok(())
    }
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
