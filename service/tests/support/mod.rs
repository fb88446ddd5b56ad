//! Shared harness of the integration tests: the API in-process on a fresh
//! database (`api`), a fake Anthropic Messages API (`fake_anthropic`), and
//! small helpers to poll for conditions with deadlines (never sleep-and-hope).
#![allow(dead_code)]

pub mod api;
pub mod fake_anthropic;
pub mod fake_kube;
pub mod messages_proxy;
pub mod rig;
pub mod runner;

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `check` every 50 ms until it yields `Some`, or panic after `limit`
/// saying what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tools/claude/node_modules/.bin/claude");
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
