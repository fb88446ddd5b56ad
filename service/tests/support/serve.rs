//! The real `agent-sessions` binary: `migrate`, `replay --verify`,
//! `retention run`, and a
//! `serve` process that can be SIGKILLed and started again on the same port,
//! so clients keep their base URL across the crash.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::app::Api;
use super::{eventually, free_port, init, tail};

const BIN: &str = env!("CARGO_BIN_EXE_agent-sessions");

/// `agent-sessions migrate` against `database_url`.
pub fn migrate(database_url: &str) {
    let out = Command::new(BIN)
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("agent-sessions migrate");
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `agent-sessions replay --verify`: whether it passed, and what it printed.
pub fn replay_verify(database_url: &str) -> (bool, String) {
    replay(database_url, &["--verify"])
}

/// `agent-sessions replay <args>`: whether it succeeded, and what it printed.
pub fn replay(database_url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("replay")
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("agent-sessions replay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (out.status.success(), text)
}

/// `agent-sessions retention run [--dry-run]` with the retention settings
/// in `env` (`APP__RETENTION__…`): whether it succeeded, and what it printed.
pub fn retention_run(database_url: &str, env: &[(&str, &str)], dry_run: bool) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["retention", "run"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("agent-sessions retention run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (out.status.success(), text)
}

pub struct ServeProcess {
    pub port: u16,
    /// Requests to this process (same port across restarts).
    pub api: Api,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl ServeProcess {
    pub async fn start(database_url: &str, redis_url: &str, channel_prefix: &str) -> Self {
        init();
        let port = free_port();
        let env = vec![
            ("DATABASE_URL", database_url.to_owned()),
            ("REDIS_URL", redis_url.to_owned()),
            ("PORT", port.to_string()),
            ("APP__REDIS__CHANNEL_PREFIX", channel_prefix.to_owned()),
            // Authentication is not what these tests are about.
            ("APP__AUTH__ENABLED", "false".to_owned()),
            ("APP__RELAY__LEADER_CHECK_INTERVAL_MS", "200".to_owned()),
            ("APP__DATABASE__MAX_CONNECTIONS", "8".to_owned()),
            ("APP__SERVER__WORKERS", "2".to_owned()),
            ("APP__LOG__FORMAT", "json".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ];
        let log =
            std::env::temp_dir().join(format!("as-test-serve-{}-{port}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut s = Self {
            port,
            api: Api::new(&format!("http://127.0.0.1:{port}")),
            env,
            log,
            child: None,
        };
        s.spawn().await;
        s
    }

    pub fn base(&self) -> String {
        self.api.url.clone()
    }

    /// Whether this process's relay holds the leader lock (from /metrics).
    pub async fn is_relay_leader(&self) -> bool {
        let Ok(res) = self.api.http.get(self.api.at("/metrics")).send().await else {
            return false;
        };
        let text = res.text().await.unwrap_or_default();
        text.lines().any(|l| l.trim() == "relay_leader 1")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Still the process we started (it was never restarted or crashed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as Kubernetes sends before a pod goes: how it exited and how
    /// long it took, or None if it was still running after `secs` (then it
    /// is SIGKILLed).
    pub async fn sigterm(&mut self, secs: u64) -> Option<(std::process::ExitStatus, Duration)> {
        let child = self.child.as_mut()?;
        let sent = std::time::Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {}", child.id());
        while sent.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status, sent.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.sigkill();
        None
    }

    /// Start (again) on the same port and wait until it answers `/healthz`.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("serve log");
        let child = Command::new(BIN)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent-sessions serve");
        // Held by `self` while waiting, so a panic here still kills it.
        self.child = Some(child);
        let (api, log, child) = (&self.api, &self.log, &mut self.child);
        eventually("serve to answer /healthz", Duration::from_secs(20), || {
            let exited = !child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            async move {
                assert!(!exited, "serve exited at start:\n{}", tail(log, 20));
                let res = api.http.get(api.at("/healthz")).send().await;
                res.is_ok_and(|r| r.status() == 200).then_some(())
            }
        })
        .await;
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the serve log ---\n{}",
                tail(&self.log, 40)
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
