//! The runner under test: in-process (`InProcessRunner`) or as the real
//! `agent-sessions runner` binary (`RunnerProcess`), pointed at a `TestApp`,
//! a fake Anthropic API and a fresh workspace root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent_sessions::runner::workspace;
use agent_sessions::runner::{Runner, RunnerStats};
use agent_sessions::settings::{RunnerSecrets, Settings};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::app::TestApp;
use super::{claude_bin, eventually, free_port};

pub fn temp_root() -> PathBuf {
    let p = std::env::temp_dir().join(format!("as-runner-test-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&p).expect("create workspace root");
    p
}

/// What the runner hands workers: the fake's URL and a dummy key.
pub fn worker_env(fake_url: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("ANTHROPIC_BASE_URL".to_owned(), fake_url.to_owned()),
        (
            "ANTHROPIC_API_KEY".to_owned(),
            "sk-ant-test-not-a-real-key".to_owned(),
        ),
        (
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_owned(),
            "1".to_owned(),
        ),
    ];
    if let Ok(path) = std::env::var("PATH") {
        env.push(("PATH".to_owned(), path));
    }
    env
}

pub fn runner_settings(api: &TestApp, root: &Path) -> Settings {
    let mut s = api.settings.clone();
    s.runner.api_url = api.url.clone();
    s.runner.workspace_root = root.to_path_buf();
    s.runner.claude_bin = claude_bin();
    s.runner.resync_interval_secs = 2;
    s.runner.interrupt_grace_ms = 3000;
    s.runner.terminate_grace_ms = 2000;
    s
}

/// Kill every worker group a pidfile under `root` names, then remove `root`.
pub fn clean_root(root: &Path) {
    for ws in workspace::with_pidfiles(root) {
        if let Ok(Some(p)) = ws.read_pidfile() {
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_dir_all(root);
}

pub struct InProcessRunner {
    pub root: PathBuf,
    /// What the runner has done so far (resyncs, …).
    pub stats: Arc<RunnerStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessRunner {
    pub fn start(settings: Settings, worker_env: Vec<(String, String)>) -> Self {
        let root = settings.runner.workspace_root.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let secrets = RunnerSecrets {
            api_token: None,
            worker_env,
        };
        let runner = Runner::new(&settings, secrets);
        let stats = runner.stats();
        let task = tokio::spawn(async move {
            runner
                .run_until(async {
                    let _ = rx.await;
                })
                .await
                .expect("runner ran");
        });
        Self {
            root,
            stats,
            stop: Some(tx),
            task,
        }
    }

    /// Wait until `more` full resyncs have completed after this call: each
    /// looked at every managed session, so whatever a resync would do has
    /// had its chance.
    pub async fn until_resyncs(&self, more: u64) {
        let target = self.stats.resyncs_done() + more;
        eventually(
            &format!("{more} more resyncs"),
            Duration::from_secs(30),
            || async { (self.stats.resyncs_done() >= target).then_some(()) },
        )
        .await;
    }

    pub async fn stop(self) {
        let root = self.halt().await;
        clean_root(&root);
    }

    /// Stop, leaving the workspace root (and the workers) for a runner
    /// started next on it; the root.
    pub async fn halt(mut self) -> PathBuf {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // Dropping with an empty root cleans nothing.
        std::mem::take(&mut self.root)
    }
}

/// `agent-sessions runner` as a child process (so it can be SIGKILLed).
pub struct RunnerProcess {
    pub child: Child,
    pub log: PathBuf,
    /// Base URL of the runner's `/metrics` and `/healthz`.
    pub metrics_url: String,
}

impl RunnerProcess {
    pub fn spawn(api: &TestApp, root: &Path, fake_url: &str, log_name: &str) -> Self {
        let log = root.join(log_name);
        let out = std::fs::File::create(&log).expect("runner log");
        let port = free_port();
        let metrics = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent-sessions"));
        cmd.arg("runner")
            .env_clear()
            .env("API_URL", &api.url)
            .env("WORKSPACE_ROOT", root)
            .env("CLAUDE_BIN", claude_bin())
            .env("DATABASE_URL", &api.settings.database.url)
            .env("REDIS_URL", &api.settings.redis.url)
            .env(
                "APP__REDIS__CHANNEL_PREFIX",
                &api.settings.redis.channel_prefix,
            )
            .env("APP__RUNNER__METRICS_LISTEN", &metrics)
            .env("APP__RUNNER__FEED_POLL_MS", "100")
            .env("APP__RUNNER__RESYNC_INTERVAL_SECS", "2")
            .env("APP__LOG__FORMAT", "pretty")
            .env("RUST_LOG", "info,agent_sessions=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        for (k, v) in worker_env(fake_url) {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn agent-sessions runner");
        Self {
            child,
            log,
            metrics_url: format!("http://{metrics}"),
        }
    }

    pub fn kill9(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// The runner's `/metrics` text, once it answers.
    pub async fn metrics(&self) -> Option<String> {
        let res = reqwest::get(format!("{}/metrics", self.metrics_url))
            .await
            .ok()?;
        res.text().await.ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A test that fails before `stop` leaves no worker behind: workers wait
/// for input for ever, so nothing else would end them.
impl Drop for InProcessRunner {
    fn drop(&mut self) {
        if self.root.exists() {
            clean_root(&self.root);
        }
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
