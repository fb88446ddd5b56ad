//! The one harness every integration-test binary (`api`, `runner`, `faults`)
//! includes: test databases (`db`), the API in-process (`app`), the real
//! `serve` binary as a process (`serve`), a private Redis and a subscriber
//! (`redis_server`), loopback HTTP servers for the fakes (`loopback`,
//! `fake_anthropic`, `fake_kube`, `messages_proxy`), the runner under test
//! (`runner`, `rig`), and a way to wait on a condition with a deadline
//! (`eventually`; never sleep-and-hope).
#![allow(dead_code, unreachable_pub)]

pub mod app;
pub mod db;
pub mod fake_anthropic;
pub mod fake_kube;
pub mod loopback;
pub mod messages_proxy;
pub mod redis_server;
pub mod rig;
pub mod runner;
pub mod serve;

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

/// An agent id for sessions whose agent does not matter.
pub const AGENT: &str = "550e8400-e29b-41d4-a716-446655440000";
/// The machine's Redis, shared by tests that do not restart it (each test
/// uses a channel prefix of its own).
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// Once per test process: the TLS provider reqwest is built without, and
/// logs (shown by the test runner when a test fails; `TEST_LOG` sets the
/// filter).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        agent_sessions::client::install_tls_provider();
        let filter = std::env::var("TEST_LOG")
            .unwrap_or_else(|_| "warn,agent_sessions::runner=debug".to_owned());
        agent_sessions::telemetry::init(agent_sessions::settings::LogFormat::Pretty, &filter);
    });
}

/// Poll `check` every 20 ms until it yields `Some`, or panic after `limit`
/// saying what was awaited (`what` is rendered only then, so an `Explain`
/// can describe the state at the deadline). For a plain condition, yield
/// `cond.then_some(())`.
pub async fn eventually<T, F, Fut>(what: impl Display, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A description computed when it is shown: `eventually(Explain(|| ...), ..)`.
pub struct Explain<F>(pub F);

impl<F: Fn() -> String> Display for Explain<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// A Redis channel prefix of its own, so tests can share one Redis.
pub fn channel_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// A loopback port free when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Pids of live processes whose command line mentions `needle` (a session id).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|i| s[i + 1..].trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            !zombie
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
        })
        .collect()
}

/// Is any process left in process group `pgid`?
pub fn group_alive(pgid: i32) -> bool {
    // No signal: only asks whether the group exists.
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

/// The Claude Code CLI installed by `scripts/deps.sh` (`tools/claude`).
pub fn claude_bin() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/claude/node_modules/.bin/claude");
    assert!(
        p.exists(),
        "the Claude Code CLI is not installed at {}: run scripts/deps.sh",
        p.display()
    );
    p.canonicalize()
        .expect("canonical CLI path")
        .to_string_lossy()
        .into_owned()
}
