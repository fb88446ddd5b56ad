//! The `worker` spec as the API documents and serves it, with conversions
//! to and from the domain's `WorkerSpec`, which holds the validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::worker as domain;

/// What the runner starts for a session: a Claude Code worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
    #[schema(value_type = Option<Object>)]
    pub mcp_servers: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
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
    /// `task` (default): the session is `completed` by the first answer
    /// that leaves no input waiting. `conversation`: the worker idles
    /// between turns, waiting for `POST /sessions/{id}/input`; the session
    /// stays `active`.
    #[serde(default, skip_serializing_if = "WorkerMode::is_task")]
    pub mode: WorkerMode,
    /// A `conversation` worker idle this long is stopped and the session
    /// paused with reason `idle`; the next input resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604800)]
    pub idle_timeout_seconds: Option<u32>,
    /// A tool approval unanswered this long is decided by `approval_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604800)]
    pub approval_timeout_seconds: Option<u32>,
    /// The decision a timed-out approval gets (default `deny`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_default: Option<ApprovalDecision>,
}

/// How long a worker lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
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

/// An answer to a tool approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PermissionMode {
    Default,
    AcceptEdits,
    BypassPermissions,
    Plan,
    DontAsk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// What the runner does when the worker crashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed over the session's life; 0 never restarts.
    #[serde(default)]
    pub max_restarts: u32,
    /// Delay before the first restart, doubled for each further one (default 1000).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Crash reasons that allow a restart; empty means every reason but `budget`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<CrashReason>,
}

fn default_backoff_ms() -> u64 {
    domain::DEFAULT_BACKOFF_MS
}

/// Why a worker ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
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

/// Both directions of a conversion between two enums with the same variants.
macro_rules! same_variants {
    ($wire:ident, $dom:path, [$($v:ident),* $(,)?]) => {
        impl From<$dom> for $wire {
            fn from(v: $dom) -> Self {
                use $dom as D;
                match v { $(D::$v => Self::$v,)* }
            }
        }
        impl From<$wire> for $dom {
            fn from(v: $wire) -> Self {
                use $dom as D;
                match v { $($wire::$v => D::$v,)* }
            }
        }
    };
}
pub(crate) use same_variants;

same_variants!(
    PermissionMode,
    domain::PermissionMode,
    [Default, AcceptEdits, BypassPermissions, Plan, DontAsk]
);
same_variants!(WorkerMode, domain::WorkerMode, [Task, Conversation]);
same_variants!(ApprovalDecision, domain::ApprovalDecision, [Allow, Deny]);
same_variants!(
    CrashReason,
    domain::CrashReason,
    [
        ExitCode, Signal, Oom, Evicted, Deadline, ApiError, Budget, Lost
    ]
);

impl From<domain::Resources> for Resources {
    fn from(r: domain::Resources) -> Self {
        Self {
            requests: r.requests,
            limits: r.limits,
        }
    }
}

impl From<Resources> for domain::Resources {
    fn from(r: Resources) -> Self {
        Self {
            requests: r.requests,
            limits: r.limits,
        }
    }
}

impl From<domain::RestartPolicy> for RestartPolicy {
    fn from(p: domain::RestartPolicy) -> Self {
        Self {
            max_restarts: p.max_restarts,
            backoff_ms: p.backoff_ms,
            on: p.on.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<RestartPolicy> for domain::RestartPolicy {
    fn from(p: RestartPolicy) -> Self {
        Self {
            max_restarts: p.max_restarts,
            backoff_ms: p.backoff_ms,
            on: p.on.into_iter().map(Into::into).collect(),
        }
    }
}

/// Field by field, converting the nested types; both directions.
macro_rules! spec_fields {
    ($from:ty => $to:ty) => {
        impl From<$from> for $to {
            fn from(s: $from) -> Self {
                Self {
                    prompt: s.prompt,
                    model: s.model,
                    allowed_tools: s.allowed_tools,
                    disallowed_tools: s.disallowed_tools,
                    permission_mode: s.permission_mode.map(Into::into),
                    system_prompt: s.system_prompt,
                    append_system_prompt: s.append_system_prompt,
                    mcp_servers: s.mcp_servers,
                    max_turns: s.max_turns,
                    max_budget_usd: s.max_budget_usd,
                    env: s.env,
                    working_directory: s.working_directory,
                    image: s.image,
                    resources: s.resources.map(Into::into),
                    restart_policy: s.restart_policy.map(Into::into),
                    mode: s.mode.into(),
                    idle_timeout_seconds: s.idle_timeout_seconds,
                    approval_timeout_seconds: s.approval_timeout_seconds,
                    approval_default: s.approval_default.map(Into::into),
                }
            }
        }
    };
}

spec_fields!(domain::WorkerSpec => WorkerSpec);
spec_fields!(WorkerSpec => domain::WorkerSpec);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The wire form and the domain's serialise alike, so a spec read back
    /// from either is the same spec.
    #[test]
    fn wire_and_domain_specs_agree() {
        let v = json!({
            "prompt": "fix it", "model": "m", "allowed_tools": ["Read"], "permission_mode": "plan",
            "mcp_servers": {"x": {"command": "y"}}, "max_turns": 2, "max_budget_usd": 0.5,
            "env": {"A": "b"}, "working_directory": "sub", "image": "img",
            "resources": {"limits": {"memory": "1Gi"}},
            "restart_policy": {"max_restarts": 1, "on": ["oom", "exit_code"]}
        });
        let d = domain::WorkerSpec::from_value(&v).unwrap();
        let wire = WorkerSpec::from(d.clone());
        assert_eq!(
            serde_json::to_value(&wire).unwrap(),
            serde_json::to_value(&d).unwrap()
        );
        assert_eq!(domain::WorkerSpec::from(wire), d);
        let defaulted: WorkerSpec =
            serde_json::from_value(json!({"prompt": "p", "restart_policy": {}})).unwrap();
        assert_eq!(
            defaulted.restart_policy.map(|p| p.backoff_ms),
            Some(domain::DEFAULT_BACKOFF_MS)
        );
    }
}
