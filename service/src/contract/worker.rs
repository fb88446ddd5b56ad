//! The runner's record of a session's worker, kept in
//! `runtime_metadata.worker`: which worker holds the session (its
//! generation, pid or pod), how it ended and what it spent.
//!
//! The runner writes it with merge patches (RFC 7396) and reads it back from
//! the session, both through `WorkerRecord`. Clients may write
//! `runtime_metadata` too, so reading is lenient: a field of the wrong type
//! reads as absent instead of making the whole record unreadable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::session::format_time;
use crate::domain::SessionStatus;
use crate::domain::worker::CrashReason;

/// `runtime_metadata.worker`: the runner's record of the session's worker.
/// Every field is optional; a field the runner has not written is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerRecord {
    /// Generation of the last worker claimed for the session; a worker of an
    /// older generation is stopped on sight, so there is one writer.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub generation: Option<u64>,
    /// How that worker began: a new conversation or the session's own resumed.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub launch: Option<WorkerLaunch>,
    /// Process id of a local worker.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub pid: Option<i32>,
    /// Pod name of a Kubernetes worker.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod: Option<String>,
    /// Where the pod is on its way.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_phase: Option<PodPhase>,
    /// The node the pod was scheduled on.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub node: Option<String>,
    /// The Claude Code session id (the session's own id, so `--resume` finds it).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub claude_session_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub model: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient",
        serialize_with = "time",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<DateTime<Utc>>,
    /// When the worker stopped; absent while it runs.
    #[serde(
        default,
        deserialize_with = "lenient",
        serialize_with = "time",
        skip_serializing_if = "Option::is_none"
    )]
    pub stopped_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub exit_code: Option<i32>,
    /// The signal that ended the worker, if one did.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub signal: Option<i32>,
    /// Why the worker ended without success.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<super::CrashReason>)]
    pub crash_reason: Option<CrashReason>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_error: Option<String>,
    /// Turns over all of the session's workers.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub turns: Option<u64>,
    /// Input tokens (cache reads and writes included) over all workers.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub input_tokens: Option<u64>,
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub output_tokens: Option<u64>,
    /// Spend so far in USD, as Claude Code counts it across `--resume`.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub cost_usd: Option<f64>,
    /// Restarts the session's restart policy has made.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub restarts: Option<u32>,
    /// Why the runner paused the session, when it did.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub paused_reason: Option<PausedReason>,
    /// What the worker is doing now.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub state: Option<WorkerState>,
    /// Who asked for the stop that ended the worker (the actor of the request that paused, completed or deleted the session, or `runner` for its own reasons).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub stopped_by: Option<String>,
    /// Why the runner stopped the worker; absent when it ended on its own.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_reason: Option<StopCause>,
    /// The last input (`POST /sessions/{id}/input`, interrupt or approval answer) the worker has taken, by its `seq`.
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub input_seq: Option<i64>,
    /// Spend so far in millionths of a dollar, from token usage and the runner's price table (exact, unlike the float `cost_usd`, which mirrors it).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub cost_micro_usd: Option<u64>,
}

/// How a worker began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLaunch {
    /// `-p <worker.prompt> --session-id <id>`.
    New,
    /// `-p <resume prompt> --resume <id>`.
    Resume,
}

/// Where a worker pod is, as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PodPhase {
    Pending,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    /// The pod was deleted before it reached an end of its own.
    Deleted,
}

/// Why the runner paused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PausedReason {
    /// The spend reached the worker's `max_budget_usd`.
    Budget,
    /// A `conversation` worker idled for `worker.idle_timeout_seconds`.
    Idle,
}

/// The worker's state, as the runner last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Claimed and being started.
    Starting,
    /// Working on a turn.
    Running,
    /// Between turns, waiting for input (`conversation` mode).
    Idle,
    /// Waiting for a tool approval.
    AwaitingApproval,
    /// A stop was asked for and is under way.
    Stopping,
    /// The process or pod is gone.
    Exited,
}

impl WorkerState {
    pub const ALL: [Self; 6] = [
        Self::Starting,
        Self::Running,
        Self::Idle,
        Self::AwaitingApproval,
        Self::Stopping,
        Self::Exited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Idle => "idle",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Why the runner stopped a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopCause {
    /// The session was paused.
    Paused,
    /// The session was completed or crashed by someone else.
    Finished,
    /// The session was deleted, lost its worker spec or moved backend.
    Unmanaged,
    /// A newer generation holds the session.
    Stale,
    /// The conversation idled past `idle_timeout_seconds`.
    Idle,
}

/// A field of the record a patch removes (RFC 7396: set to `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerField {
    Pid,
    Pod,
    Model,
    StartedAt,
    StoppedAt,
    ExitCode,
    Signal,
    CrashReason,
    LastError,
    PausedReason,
    StoppedBy,
    StopReason,
}

impl WorkerField {
    fn key(self) -> &'static str {
        match self {
            Self::Pid => "pid",
            Self::Pod => "pod",
            Self::Model => "model",
            Self::StartedAt => "started_at",
            Self::StoppedAt => "stopped_at",
            Self::ExitCode => "exit_code",
            Self::Signal => "signal",
            Self::CrashReason => "crash_reason",
            Self::LastError => "last_error",
            Self::PausedReason => "paused_reason",
            Self::StoppedBy => "stopped_by",
            Self::StopReason => "stop_reason",
        }
    }

    /// What a new worker's claim removes: everything about the last one's run.
    pub const OF_A_RUN: [Self; 10] = [
        Self::Pid,
        Self::StartedAt,
        Self::StoppedAt,
        Self::ExitCode,
        Self::Signal,
        Self::CrashReason,
        Self::LastError,
        Self::PausedReason,
        Self::StoppedBy,
        Self::StopReason,
    ];
}

impl WorkerRecord {
    /// The record in a session's `runtime_metadata` (empty when there is none).
    pub fn of(runtime_metadata: &Map<String, Value>) -> Self {
        runtime_metadata
            .get("worker")
            .filter(|w| w.is_object())
            .and_then(|w| Self::deserialize(w).ok())
            .unwrap_or_default()
    }
}

/// A merge patch of a session that writes the worker record: the fields set
/// in `worker` are written, those in `clear` removed, the others left as
/// they are; `status`, if any, moves the session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerPatch {
    pub status: Option<SessionStatus>,
    pub worker: WorkerRecord,
    pub clear: Vec<WorkerField>,
}

impl WorkerPatch {
    pub fn new(worker: WorkerRecord) -> Self {
        Self {
            worker,
            ..Self::default()
        }
    }

    pub fn status(mut self, status: SessionStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn clearing(mut self, fields: &[WorkerField]) -> Self {
        self.clear.extend_from_slice(fields);
        self
    }

    /// The `application/merge-patch+json` body.
    pub fn to_json(&self) -> Value {
        let mut worker = match serde_json::to_value(&self.worker) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for f in &self.clear {
            worker.entry(f.key()).or_insert(Value::Null);
        }
        let mut patch = json!({"runtime_metadata": {"worker": worker}});
        if let (Some(status), Some(obj)) = (self.status, patch.as_object_mut()) {
            obj.insert("status".into(), json!(status));
        }
        patch
    }
}

/// A value of the wrong type reads as absent.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// Times as the API writes them (microseconds, `Z`).
fn time<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_runner_stored_and_ignores_what_it_cannot_read() {
        let meta = json!({"worker": {
            "generation": 4, "launch": "resume", "pid": 77, "restarts": 1,
            "crash_reason": "api_error", "stopped_at": "2026-11-21T09:00:00Z",
            "cost_usd": 0.25, "pod_phase": "deleted", "paused_reason": "budget",
            "turns": "many", "something_else": true
        }});
        let w = WorkerRecord::of(meta.as_object().unwrap());
        assert_eq!(w.generation, Some(4));
        assert_eq!(w.launch, Some(WorkerLaunch::Resume));
        assert_eq!(w.pid, Some(77));
        assert_eq!(w.crash_reason, Some(CrashReason::ApiError));
        assert_eq!(w.pod_phase, Some(PodPhase::Deleted));
        assert_eq!(w.paused_reason, Some(PausedReason::Budget));
        assert!(w.stopped_at.is_some());
        assert_eq!(w.turns, None, "a string is no count");
        assert_eq!(WorkerRecord::of(&Map::new()), WorkerRecord::default());
        let odd = json!({"worker": "not an object"});
        assert_eq!(
            WorkerRecord::of(odd.as_object().unwrap()),
            WorkerRecord::default()
        );
    }

    #[test]
    fn a_patch_sets_clears_and_leaves_the_rest() {
        let t = DateTime::parse_from_rfc3339("2026-11-21T09:00:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let patch = WorkerPatch::new(WorkerRecord {
            generation: Some(2),
            launch: Some(WorkerLaunch::New),
            started_at: Some(t),
            ..Default::default()
        })
        .clearing(&WorkerField::OF_A_RUN)
        .status(SessionStatus::Crashed);
        assert_eq!(
            patch.to_json(),
            json!({"status": "crashed", "runtime_metadata": {"worker": {
                "generation": 2, "launch": "new", "started_at": "2026-11-21T09:00:00.500000Z",
                "pid": null, "stopped_at": null, "exit_code": null, "signal": null,
                "crash_reason": null, "last_error": null, "paused_reason": null,
                "stopped_by": null, "stop_reason": null
            }}})
        );
        // Every cleared key is a field of the record.
        let full = WorkerRecord {
            pid: Some(1),
            pod: Some("p".into()),
            model: Some("m".into()),
            started_at: Some(t),
            stopped_at: Some(t),
            exit_code: Some(0),
            signal: Some(9),
            crash_reason: Some(CrashReason::Signal),
            last_error: Some("e".into()),
            paused_reason: Some(PausedReason::Budget),
            stopped_by: Some("alice".into()),
            stop_reason: Some(StopCause::Paused),
            ..Default::default()
        };
        let v = serde_json::to_value(&full).unwrap();
        for f in WorkerField::OF_A_RUN
            .iter()
            .chain(&[WorkerField::Pod, WorkerField::Model])
        {
            assert!(v.get(f.key()).is_some(), "{f:?}");
        }
    }
}
