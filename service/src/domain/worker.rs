//! The optional `worker` spec: what the runner needs to start a Claude Code
//! worker for a session (docs/design.md, the runner).
//!
//! Parsed strictly (unknown fields are refused) and validated here, so a spec
//! that reaches the store is one the runner can act on. Secrets never live in
//! it: environment keys the runner owns are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Environment variables the runner hands to workers itself; a session may
/// neither set nor override them.
/// The longest idle or approval timeout: a week.
pub const MAX_TIMEOUT_SECONDS: u32 = 604_800;

const RESERVED_ENV_PREFIXES: &[&str] = &[
    "ANTHROPIC_",
    "CLAUDE_CODE_",
    "CLAUDE_CONFIG_DIR",
    "AGENT_SESSIONS_",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// The first prompt given to `claude -p`.
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disallowed_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<PermissionMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_system_prompt: Option<String>,
    /// MCP server definitions, passed to `--mcp-config` as `{"mcpServers": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// A worker that reaches this spend is paused, not killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Non-secret environment for the worker.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Directory inside the session's workspace to run in (relative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Container image for the kubernetes backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Kubernetes resource requests and limits, e.g. `{"limits": {"memory": "1Gi"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// `task` (default): the session completes with the first answer that
    /// leaves no input waiting. `conversation`: the worker idles between
    /// turns and the session stays active.
    #[serde(default, skip_serializing_if = "WorkerMode::is_task")]
    pub mode: WorkerMode,
    /// A conversation idle this long is paused (reason `idle`); the next
    /// input resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u32>,
    /// A tool approval left unanswered this long gets `approval_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_seconds: Option<u32>,
    /// The decision a timed-out approval gets (default `deny`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_default: Option<ApprovalDecision>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerMode {
    #[default]
    Task,
    Conversation,
}

impl WorkerMode {
    pub fn is_task(&self) -> bool {
        *self == Self::Task
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    Allow,
    Deny,
}

impl ApprovalDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PermissionMode {
    Default,
    AcceptEdits,
    BypassPermissions,
    Plan,
    DontAsk,
}

impl PermissionMode {
    pub fn as_cli_arg(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AcceptEdits => "acceptEdits",
            Self::BypassPermissions => "bypassPermissions",
            Self::Plan => "plan",
            Self::DontAsk => "dontAsk",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// What the runner does when the worker crashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed over the session's life; 0 never restarts.
    #[serde(default)]
    pub max_restarts: u32,
    /// Delay before the first restart, doubled for each further one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Crash reasons that allow a restart; empty means every reason but `budget`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<CrashReason>,
}

/// Delay before a first restart when the policy names none.
pub const DEFAULT_BACKOFF_MS: u64 = 1000;

fn default_backoff_ms() -> u64 {
    DEFAULT_BACKOFF_MS
}

/// Why a worker ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashReason {
    /// Exited with a non-zero code.
    ExitCode,
    /// Killed by a signal it did not ask for.
    Signal,
    /// Out of memory (pod OOMKilled).
    Oom,
    /// The pod was evicted.
    Evicted,
    /// The worker ran past its deadline.
    Deadline,
    /// The model API answered with an error.
    ApiError,
    /// The worker reached `max_budget_usd`.
    Budget,
    /// The worker vanished (its runner or node died).
    Lost,
}

impl RestartPolicy {
    pub fn allows(&self, reason: CrashReason, restarts_so_far: u32) -> bool {
        restarts_so_far < self.max_restarts
            && if self.on.is_empty() {
                reason != CrashReason::Budget
            } else {
                self.on.contains(&reason)
            }
    }

    pub fn backoff(&self, restarts_so_far: u32) -> std::time::Duration {
        let factor = 1u64 << restarts_so_far.min(10);
        std::time::Duration::from_millis(self.backoff_ms.saturating_mul(factor).min(600_000))
    }
}

/// A field of the spec that failed validation and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub detail: String,
}

impl WorkerSpec {
    /// Parse and validate a spec given as JSON.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, SpecProblem> {
        let spec: WorkerSpec =
            super::json::read_at(value.clone(), Some("worker")).map_err(|e| SpecProblem {
                field: e.field.unwrap_or_else(|| "worker".into()),
                detail: e.detail,
            })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecProblem> {
        let bad = |field: &str, detail: &str| {
            Err(SpecProblem {
                field: format!("worker.{field}"),
                detail: detail.to_owned(),
            })
        };
        if self.prompt.trim().is_empty() {
            return bad("prompt", "must not be empty");
        }
        if self.max_turns == Some(0) {
            return bad("max_turns", "must be at least 1");
        }
        for (field, v) in [
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("approval_timeout_seconds", self.approval_timeout_seconds),
        ] {
            if v.is_some_and(|n| n == 0 || n > MAX_TIMEOUT_SECONDS) {
                return bad(field, "must be 1 to 604800 seconds");
            }
        }
        if self.idle_timeout_seconds.is_some() && self.mode.is_task() {
            return bad(
                "idle_timeout_seconds",
                "only a `conversation` worker idles; set `mode` to `conversation`",
            );
        }
        if let Some(b) = self.max_budget_usd
            && (!b.is_finite() || b <= 0.0)
        {
            return bad("max_budget_usd", "must be a positive number");
        }
        for key in self.env.keys() {
            let valid = !key.is_empty()
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !key.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return bad("env", &format!("`{key}` is not a valid variable name"));
            }
            if RESERVED_ENV_PREFIXES.iter().any(|p| key.starts_with(p)) {
                return bad(
                    "env",
                    &format!("`{key}` is set by the runner, not by a session"),
                );
            }
        }
        if let Some(dir) = &self.working_directory {
            let path = std::path::Path::new(dir);
            let escapes = path.is_absolute()
                || path.components().any(|c| {
                    !matches!(
                        c,
                        std::path::Component::Normal(_) | std::path::Component::CurDir
                    )
                });
            if escapes {
                return bad(
                    "working_directory",
                    "must be a relative path inside the session's workspace",
                );
            }
        }
        for (name, v) in [("model", &self.model), ("image", &self.image)] {
            if v.as_deref()
                .is_some_and(|s| s.trim().is_empty() || s.len() > 512)
            {
                return bad(name, "must be a non-empty name of at most 512 characters");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_full_spec() {
        let spec = WorkerSpec::from_value(&json!({
            "prompt": "fix the bug", "model": "claude-sonnet-4-5", "allowed_tools": ["Read"],
            "permission_mode": "acceptEdits", "max_turns": 3, "max_budget_usd": 1.5,
            "env": {"RUST_LOG": "info"}, "working_directory": "repo/sub",
            "restart_policy": {"max_restarts": 2}
        }))
        .unwrap();
        assert_eq!(spec.permission_mode, Some(PermissionMode::AcceptEdits));
        assert_eq!(spec.restart_policy.unwrap().backoff_ms, 1000);
    }

    #[test]
    fn refuses_unknown_fields_and_reserved_env() {
        assert!(WorkerSpec::from_value(&json!({"prompt": "x", "promt": "y"})).is_err());
        let e = WorkerSpec::from_value(&json!({"prompt": "x", "env": {"ANTHROPIC_API_KEY": "k"}}))
            .unwrap_err();
        assert_eq!(e.field, "worker.env");
    }

    #[test]
    fn refuses_paths_leaving_the_workspace() {
        for dir in ["../x", "/etc", "a/../../b"] {
            let e = WorkerSpec::from_value(&json!({"prompt": "x", "working_directory": dir}))
                .unwrap_err();
            assert_eq!(e.field, "worker.working_directory", "{dir}");
        }
    }

    #[test]
    fn restart_policy_respects_reasons_and_count() {
        let p = RestartPolicy {
            max_restarts: 2,
            backoff_ms: 100,
            on: vec![],
        };
        assert!(p.allows(CrashReason::ApiError, 1));
        assert!(!p.allows(CrashReason::ApiError, 2));
        assert!(!p.allows(CrashReason::Budget, 0));
        assert_eq!(p.backoff(2), std::time::Duration::from_millis(400));
    }
}
