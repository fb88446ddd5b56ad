//! The Claude Code CLI as the runner sees it: the command line that starts or
//! resumes a worker, and the `--output-format stream-json` lines it prints.
//!
//! Kept free of process handling so both are unit-tested on their own; the
//! fixtures under `testdata/` are lines captured from the pinned CLI
//! (`tools/claude`, 2.1.329) talking to a fake Messages API.

use serde_json::Value;
use uuid::Uuid;

use super::reconcile::StopReason;
use crate::contract::WorkerLaunch;
use crate::domain::WorkerSpec;
use crate::domain::worker::CrashReason;

/// The prompt a resumed worker gets when the checkpoint names none.
pub const DEFAULT_RESUME_PROMPT: &str = "Continue";

/// How a worker begins: a new conversation, or the session's own one resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// `--session-id <id>`; the first message is `worker.prompt`.
    New,
    /// `--resume <id>`; the transcript in the session's `CLAUDE_CONFIG_DIR`
    /// carries the earlier conversation. The first message is `prompt`, or,
    /// when inputs wait for the worker, those inputs alone.
    Resume { prompt: Option<String> },
}

impl Launch {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Resume { .. } => "resume",
        }
    }

    /// As the worker record names it.
    pub fn kind(&self) -> WorkerLaunch {
        match self {
            Self::New => WorkerLaunch::New,
            Self::Resume { .. } => WorkerLaunch::Resume,
        }
    }

    /// The message the runner writes before any input.
    pub fn first_message<'a>(&'a self, spec: &'a WorkerSpec) -> Option<&'a str> {
        match self {
            Self::New => Some(&spec.prompt),
            Self::Resume { prompt } => prompt.as_deref(),
        }
    }
}

/// Arguments after the program name. The worker reads stream-json messages
/// on its stdin (the runner writes the first prompt and every later input
/// there), echoes each one it takes (`--replay-user-messages`) and asks for
/// tool permissions on stdout (`--permission-prompt-tool stdio`). The Claude
/// session id is the session's own id, so `--resume` always finds the right
/// transcript.
pub fn arguments(spec: &WorkerSpec, session_id: Uuid, launch: &Launch, bare: bool) -> Vec<String> {
    let mut args: Vec<String> = Vec::with_capacity(24);
    let mut push = |a: &str| args.push(a.to_owned());
    for a in [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--replay-user-messages",
        "--permission-prompt-tool",
        "stdio",
    ] {
        push(a);
    }
    push(match launch {
        Launch::New => "--session-id",
        Launch::Resume { .. } => "--resume",
    });
    push(&session_id.to_string());
    // The CLI never prunes the transcript the service keeps a copy of.
    push("--settings");
    push(super::transcript::WORKER_SETTINGS);
    if bare {
        push("--bare");
    }
    if let Some(model) = &spec.model {
        push("--model");
        push(model);
    }
    if let Some(mode) = spec.permission_mode {
        push("--permission-mode");
        push(mode.as_cli_arg());
    }
    if let Some(p) = &spec.system_prompt {
        push("--system-prompt");
        push(p);
    }
    if let Some(p) = &spec.append_system_prompt {
        push("--append-system-prompt");
        push(p);
    }
    if let Some(servers) = &spec.mcp_servers {
        push("--mcp-config");
        push(&serde_json::json!({ "mcpServers": servers }).to_string());
    }
    if let Some(n) = spec.max_turns {
        push("--max-turns");
        push(&n.to_string());
    }
    if let Some(b) = spec.max_budget_usd {
        push("--max-budget-usd");
        push(&b.to_string());
    }
    // Tool lists are variadic options: each takes every following argument
    // until the next option, so they go last, one tool per argument (a tool
    // pattern such as `Bash(git log, status)` may itself hold a comma).
    for (flag, tools) in [
        ("--allowedTools", &spec.allowed_tools),
        ("--disallowedTools", &spec.disallowed_tools),
    ] {
        if !tools.is_empty() {
            push(flag);
            for t in tools {
                push(t);
            }
        }
    }
    args
}

/// The `result` line that ends a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunResult {
    /// `success`, `error_max_turns`, `error_max_budget_usd`, `error_during_execution`, …
    pub subtype: String,
    pub is_error: bool,
    pub num_turns: u64,
    /// Claude Code's own running total for the conversation (it survives `--resume`).
    pub total_cost_usd: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub api_error_status: Option<u64>,
    pub terminal_reason: Option<String>,
    /// The final text (for errors, the error message).
    pub result: Option<String>,
}

/// What the runner keeps from one worker's stream: enough to report it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunSummary {
    pub claude_session_id: Option<String>,
    pub model: Option<String>,
    pub lines: u64,
    pub assistant_messages: u64,
    pub result: Option<RunResult>,
    /// The last API error an assistant line carried, if any.
    pub last_api_error: Option<String>,
}

fn u64_at(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl RunSummary {
    /// Fold one parsed stream-json line into the summary.
    pub fn observe(&mut self, line: &Value) {
        self.lines += 1;
        match line.get("type").and_then(Value::as_str) {
            Some("system") if line.get("subtype").and_then(Value::as_str) == Some("init") => {
                self.claude_session_id = str_at(line, "session_id");
                self.model = str_at(line, "model");
            }
            Some("assistant") => {
                self.assistant_messages += 1;
                if line.get("is_api_error_message").and_then(Value::as_bool) == Some(true) {
                    self.last_api_error = line
                        .pointer("/message/content/0/text")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
            }
            Some("result") => {
                self.result = Some(RunResult {
                    subtype: str_at(line, "subtype").unwrap_or_default(),
                    is_error: line
                        .get("is_error")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    num_turns: u64_at(line, &["num_turns"]),
                    total_cost_usd: line.get("total_cost_usd").and_then(Value::as_f64),
                    input_tokens: u64_at(line, &["usage", "input_tokens"])
                        + u64_at(line, &["usage", "cache_creation_input_tokens"])
                        + u64_at(line, &["usage", "cache_read_input_tokens"]),
                    output_tokens: u64_at(line, &["usage", "output_tokens"]),
                    api_error_status: line.get("api_error_status").and_then(Value::as_u64),
                    terminal_reason: str_at(line, "terminal_reason"),
                    result: str_at(line, "result"),
                });
                if self.claude_session_id.is_none() {
                    self.claude_session_id = str_at(line, "session_id");
                }
            }
            _ => {}
        }
    }
}

/// How the worker's process ended, as far as the backend could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The process was not our child (adopted after a runner restart), so its
    /// exit status is unknown.
    pub unknown: bool,
}

/// The verdict on a finished run.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Ended with a successful `result`: the session is completed.
    Succeeded,
    /// The runner stopped it (pause, completion elsewhere, stale generation).
    Stopped,
    /// The runner stopped an idle conversation: the session is paused (`idle`).
    IdledOut,
    /// The CLI ended on its own `--max-budget-usd`: the session is paused.
    BudgetReached { detail: String },
    /// Anything else: the session crashed, for this reason.
    Failed { reason: CrashReason, detail: String },
}

impl Outcome {
    pub fn crash_reason(&self) -> Option<CrashReason> {
        match self {
            Self::Failed { reason, .. } => Some(*reason),
            Self::BudgetReached { .. } => Some(CrashReason::Budget),
            _ => None,
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Failed { detail, .. } | Self::BudgetReached { detail } => Some(detail),
            _ => None,
        }
    }
}

/// Decide what a finished run means from its exit, its last lines and the
/// stop the runner asked for, if any.
pub fn classify(exit: ExitInfo, summary: &RunSummary, stop: Option<StopReason>) -> Outcome {
    match stop {
        None => {}
        Some(StopReason::Idle) => return Outcome::IdledOut,
        // Ended by the runner after its answer: judged by that answer.
        Some(StopReason::Done) => {
            let ok = summary
                .result
                .as_ref()
                .is_some_and(|r| !r.is_error && r.subtype == "success");
            if ok {
                return Outcome::Succeeded;
            }
            let after_answer = ExitInfo {
                code: None,
                signal: None,
                unknown: false,
            };
            return classify(after_answer, summary, None);
        }
        Some(_) => return Outcome::Stopped,
    }
    let clean_exit = exit.code == Some(0) || (exit.unknown && exit.signal.is_none());
    match &summary.result {
        Some(r) if !r.is_error && r.subtype == "success" && clean_exit => Outcome::Succeeded,
        Some(r)
            if r.subtype == "error_max_budget_usd"
                || r.terminal_reason.as_deref() == Some("budget_exhausted") =>
        {
            Outcome::BudgetReached {
                detail: format!(
                    "reached max_budget_usd (spent {:.6} USD)",
                    r.total_cost_usd.unwrap_or(0.0)
                ),
            }
        }
        Some(r)
            if r.is_error
                && (r.api_error_status.is_some()
                    || r.terminal_reason.as_deref() == Some("api_error")) =>
        {
            Outcome::Failed {
                reason: CrashReason::ApiError,
                detail: r
                    .result
                    .clone()
                    .or_else(|| summary.last_api_error.clone())
                    .unwrap_or_else(|| "the model API answered with an error".into()),
            }
        }
        _ => {
            let ended = match (exit.signal, exit.code, exit.unknown) {
                (Some(sig), _, _) => {
                    return Outcome::Failed {
                        reason: CrashReason::Signal,
                        detail: format!("killed by signal {sig}"),
                    };
                }
                (None, Some(code), _) => format!("exited with code {code}"),
                (None, None, true) => {
                    return Outcome::Failed {
                        reason: CrashReason::Lost,
                        detail: "the worker ended while no runner watched it, without a result"
                            .into(),
                    };
                }
                (None, None, false) => "ended".to_owned(),
            };
            let why = match &summary.result {
                Some(r) => format!(
                    "{ended}: {}",
                    r.result.clone().unwrap_or_else(|| r.subtype.clone())
                ),
                None => format!("{ended} without a result"),
            };
            Outcome::Failed {
                reason: CrashReason::ExitCode,
                detail: why,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::worker::PermissionMode;
    use serde_json::json;

    fn summary_of(jsonl: &str) -> RunSummary {
        let mut s = RunSummary::default();
        for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
            s.observe(&serde_json::from_str(line).unwrap());
        }
        s
    }

    fn spec() -> WorkerSpec {
        WorkerSpec::from_value(&json!({"prompt": "fix it"})).unwrap()
    }

    #[test]
    fn new_worker_command_line() {
        let id = Uuid::nil();
        let args = arguments(&spec(), id, &Launch::New, true);
        assert_eq!(
            args,
            [
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--replay-user-messages",
                "--permission-prompt-tool",
                "stdio",
                "--session-id",
                &id.to_string(),
                "--settings",
                super::super::transcript::WORKER_SETTINGS,
                "--bare"
            ]
        );
        assert_eq!(Launch::New.first_message(&spec()), Some("fix it"));
    }

    #[test]
    fn resume_and_every_option() {
        let mut s = spec();
        s.model = Some("claude-sonnet-4-5".into());
        s.permission_mode = Some(PermissionMode::AcceptEdits);
        s.system_prompt = Some("sys".into());
        s.append_system_prompt = Some("more".into());
        s.mcp_servers = Some(
            json!({"fs": {"command": "mcp-fs"}})
                .as_object()
                .unwrap()
                .clone(),
        );
        s.max_turns = Some(3);
        s.max_budget_usd = Some(1.5);
        s.allowed_tools = vec!["Read".into(), "Bash(git log, status)".into()];
        s.disallowed_tools = vec!["Edit".into()];
        let id = Uuid::nil();
        let launch = Launch::Resume {
            prompt: Some("go on".into()),
        };
        let args = arguments(&s, id, &launch, false);
        assert_eq!(launch.first_message(&s), Some("go on"));
        assert_eq!(Launch::Resume { prompt: None }.first_message(&s), None);
        let joined = args.join(" ");
        assert!(joined.contains(&format!("stdio --resume {id}")), "{joined}");
        assert!(!args.contains(&"--bare".to_owned()));
        for pair in [
            "--model claude-sonnet-4-5",
            "--permission-mode acceptEdits",
            "--system-prompt sys",
            "--append-system-prompt more",
            "--max-turns 3",
            "--max-budget-usd 1.5",
        ] {
            assert!(joined.contains(pair), "{pair} in {joined}");
        }
        let mcp = args.iter().position(|a| a == "--mcp-config").unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&args[mcp + 1]).unwrap(),
            json!({"mcpServers": {"fs": {"command": "mcp-fs"}}})
        );
        assert!(
            joined.ends_with("--allowedTools Read Bash(git log, status) --disallowedTools Edit")
        );
    }

    #[test]
    fn parses_a_successful_run() {
        let s = summary_of(include_str!("testdata/success.jsonl"));
        assert_eq!(
            s.claude_session_id.as_deref(),
            Some("6fbb07e4-384c-4bf6-8d32-2cc92fa551ca")
        );
        assert_eq!(s.model.as_deref(), Some("claude-opus-5-5"));
        assert_eq!(s.assistant_messages, 1);
        let r = s.result.clone().unwrap();
        assert_eq!((r.num_turns, r.input_tokens, r.output_tokens), (1, 12, 7));
        assert_eq!(r.total_cost_usd, Some(0.000188));
        let exit = ExitInfo {
            code: Some(0),
            ..Default::default()
        };
        assert_eq!(classify(exit, &s, None), Outcome::Succeeded);
        assert_eq!(
            classify(exit, &s, Some(StopReason::Paused)),
            Outcome::Stopped
        );
    }

    #[test]
    fn an_api_error_is_typed() {
        let s = summary_of(include_str!("testdata/api_error.jsonl"));
        let exit = ExitInfo {
            code: Some(1),
            ..Default::default()
        };
        match classify(exit, &s, None) {
            Outcome::Failed { reason, detail } => {
                assert_eq!(reason, CrashReason::ApiError);
                assert!(detail.contains("400"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cli_budget_stop_pauses() {
        let s = summary_of(include_str!("testdata/budget.jsonl"));
        let exit = ExitInfo {
            code: Some(1),
            ..Default::default()
        };
        let o = classify(exit, &s, None);
        assert!(matches!(o, Outcome::BudgetReached { .. }), "{o:?}");
        assert_eq!(o.crash_reason(), Some(CrashReason::Budget));
    }

    #[test]
    fn an_interrupted_run_has_no_result() {
        let s = summary_of(include_str!("testdata/interrupted.jsonl"));
        assert!(s.result.is_none());
        let exit = ExitInfo {
            code: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            classify(exit, &s, None),
            Outcome::Failed {
                reason: CrashReason::ExitCode,
                ..
            }
        ));
        let killed = ExitInfo {
            signal: Some(9),
            ..Default::default()
        };
        assert!(matches!(
            classify(killed, &s, None),
            Outcome::Failed {
                reason: CrashReason::Signal,
                ..
            }
        ));
        let unknown = ExitInfo {
            unknown: true,
            ..Default::default()
        };
        assert!(matches!(
            classify(unknown, &s, None),
            Outcome::Failed {
                reason: CrashReason::Lost,
                ..
            }
        ));
    }

    #[test]
    fn a_worker_the_runner_ended_is_judged_by_why() {
        let ok = summary_of(include_str!("testdata/success.jsonl"));
        let exit = ExitInfo {
            signal: Some(2),
            ..Default::default()
        };
        assert_eq!(
            classify(exit, &ok, Some(StopReason::Done)),
            Outcome::Succeeded
        );
        assert_eq!(
            classify(exit, &ok, Some(StopReason::Idle)),
            Outcome::IdledOut
        );
        assert_eq!(
            classify(exit, &ok, Some(StopReason::Paused)),
            Outcome::Stopped
        );
        let api = summary_of(include_str!("testdata/api_error.jsonl"));
        assert!(matches!(
            classify(exit, &api, Some(StopReason::Done)),
            Outcome::Failed {
                reason: CrashReason::ApiError,
                ..
            }
        ));
        let mut turns = ok.clone();
        if let Some(r) = turns.result.as_mut() {
            r.subtype = "error_max_turns".into();
            r.is_error = true;
            r.result = None;
        }
        match classify(exit, &turns, Some(StopReason::Done)) {
            Outcome::Failed { reason, detail } => {
                assert_eq!(reason, CrashReason::ExitCode);
                assert_eq!(detail, "ended: error_max_turns");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_adopted_worker_that_finished_is_judged_by_its_result() {
        let s = summary_of(include_str!("testdata/success.jsonl"));
        let unknown = ExitInfo {
            unknown: true,
            ..Default::default()
        };
        assert_eq!(classify(unknown, &s, None), Outcome::Succeeded);
    }
}
