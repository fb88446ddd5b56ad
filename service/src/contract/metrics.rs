//! What `GET /sessions/{id}/metrics` and `GET /analytics` answer. Times are
//! seconds with microsecond precision (the events' own precision): a figure
//! is a whole number of microseconds divided by 10^6.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::session::{SessionStatus, format_time};
use super::worker::WorkerRecord;
use crate::domain::EventKind;
use crate::domain::metrics::{Tally, TallyChange, WorkerTotals};

/// What an event's payload says that a tally reads: `changes.agent_id`,
/// `session_type`, `status`, and the worker record in
/// `changes.runtime_metadata` read as leniently as the runner reads it (a
/// field of the wrong type counts as absent, and absent counts 0). The
/// SQL rebuild (`store/analytics.rs`) reads the same fields the same way.
pub fn tally_change(kind: EventKind, payload: &Value) -> TallyChange {
    let Some(changes) = payload.get("changes") else {
        return TallyChange::default();
    };
    let text = |field: &str| changes.get(field).and_then(Value::as_str);
    tally_change_of(
        kind,
        ChangedFields {
            agent_id: text("agent_id"),
            session_type: text("session_type"),
            status: text("status"),
            runtime_metadata: changes.get("runtime_metadata").map(|m| m.get("worker")),
        },
    )
}

/// The fields of an event's `changes` that a tally reads: the text of
/// `agent_id`, `session_type` and `status` (`None` when absent; only a
/// string's text parses as an id or a status, and a `session_type` that is
/// not a string is `None`), and `runtime_metadata`, `Some` when the event
/// set it, holding its `worker` member if any. The analytics consumer's
/// read takes them out of the payload in PostgreSQL
/// (`Store::feed_for_analytics`) rather than the payload whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChangedFields<'a> {
    pub agent_id: Option<&'a str>,
    pub session_type: Option<&'a str>,
    pub status: Option<&'a str>,
    pub runtime_metadata: Option<Option<&'a Value>>,
}

/// [`tally_change`] from the fields it reads.
pub fn tally_change_of(kind: EventKind, fields: ChangedFields<'_>) -> TallyChange {
    if !matches!(kind, EventKind::Created | EventKind::Updated) {
        return TallyChange::default();
    }
    let worker = fields.runtime_metadata.map(|w| {
        // Only an object is a record: serde would take an array's items as
        // the fields in order, where the SQL rebuild finds no fields in it.
        let r = w
            .filter(|w| w.is_object())
            .and_then(|w| WorkerRecord::deserialize(w).ok())
            .unwrap_or_default();
        let n = |v: Option<u64>| v.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX));
        WorkerTotals {
            generation: n(r.generation),
            restarts: n(r.restarts.map(u64::from)),
            turns: n(r.turns),
            input_tokens: n(r.input_tokens),
            output_tokens: n(r.output_tokens),
            cost_micro_usd: n(r.cost_micro_usd),
        }
    });
    TallyChange {
        agent_id: fields.agent_id.and_then(|s| Uuid::parse_str(s).ok()),
        session_type: fields.session_type.map(str::to_owned),
        status: fields.status.and_then(crate::domain::SessionStatus::parse),
        worker,
    }
}

/// Seconds from a whole number of microseconds.
pub fn seconds(us: i64) -> f64 {
    us as f64 / 1e6
}

/// Time spent in each status, in seconds. `completed` is final and has no
/// time of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimeInStatus {
    pub active: f64,
    pub paused: f64,
    pub crashed: f64,
}

/// One session's figures, derived from its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionMetrics {
    pub session_id: Uuid,
    /// The status after the last event (the status it had when deleted, for
    /// a deleted session).
    pub status: SessionStatus,
    /// True when the log ends with `session.deleted`.
    pub deleted: bool,
    /// The instant open stretches are counted up to: the request's time.
    #[schema(value_type = String, format = DateTime)]
    pub as_of: String,
    /// `occurred_at` of `session.created`.
    #[schema(value_type = String, format = DateTime)]
    pub first_activity_at: String,
    /// `occurred_at` of the session's last event, of any type.
    #[schema(value_type = String, format = DateTime)]
    pub last_activity_at: String,
    /// When the session's life ended: the event that made it `completed`, or
    /// `session.deleted`; absent while it lives (`crashed` is not an end: it
    /// can recover).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<String>,
    /// From `first_activity_at` to `ended_at`, or to `as_of` while it lives.
    pub duration_seconds: f64,
    /// Per status, the stretches from the event that moved the session into
    /// it to the event that moved it out; the current stretch runs to
    /// `ended_at`, or to `as_of` while the session lives.
    pub time_in_status_seconds: TimeInStatus,
    /// Moves into `paused` (a session created paused has not paused).
    pub pauses: i64,
    /// Moves from `paused` to `active`.
    pub resumes: i64,
    /// Moves into `crashed`.
    pub crashes: i64,
    /// Moves from `crashed` to `active`.
    pub recoveries: i64,
    /// The highest `runtime_metadata.worker.generation` recorded: how many
    /// workers the runner started for the session.
    pub worker_generations: i64,
    /// `runtime_metadata.worker.restarts` as last recorded: restarts made
    /// by the session's restart policy after crashes.
    pub restarts: i64,
    /// `turns` of the last worker record (the runner's total over all the
    /// session's workers); 0 when none was recorded.
    pub turns: i64,
    /// `input_tokens` of the last worker record (cache reads and writes included).
    pub input_tokens: i64,
    /// `output_tokens` of the last worker record.
    pub output_tokens: i64,
    /// `cost_micro_usd` of the last worker record: spend in millionths of a dollar.
    pub cost_micro_usd: i64,
}

impl SessionMetrics {
    pub fn new(t: &Tally, as_of: DateTime<Utc>) -> Self {
        let [active, paused, crashed] = t.time_in_status_us(as_of);
        Self {
            session_id: t.session_id,
            status: t.status.into(),
            deleted: t.deleted_at.is_some(),
            as_of: format_time(&as_of),
            first_activity_at: format_time(&t.created_at),
            last_activity_at: format_time(&t.last_event_at),
            ended_at: t.ended_at().as_ref().map(format_time),
            duration_seconds: seconds(t.duration_us(as_of)),
            time_in_status_seconds: TimeInStatus {
                active: seconds(active),
                paused: seconds(paused),
                crashed: seconds(crashed),
            },
            pauses: t.pauses,
            resumes: t.resumes,
            crashes: t.crashes,
            recoveries: t.recoveries,
            worker_generations: t.worker_generations,
            restarts: t.restarts,
            turns: t.turns,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cost_micro_usd: t.cost_micro_usd,
        }
    }
}

/// How `GET /analytics` groups sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Status,
    AgentId,
    SessionType,
    /// The UTC day of creation (`YYYY-MM-DD`).
    Day,
}

impl GroupBy {
    pub const ALL: [GroupBy; 4] = [Self::Status, Self::AgentId, Self::SessionType, Self::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::AgentId => "agent_id",
            Self::SessionType => "session_type",
            Self::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// Sessions in each status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusCounts {
    pub active: i64,
    pub paused: i64,
    pub completed: i64,
    pub crashed: i64,
}

/// The sums over one group's sessions (each as `GET /sessions/{id}/metrics`
/// would give it at `as_of`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AnalyticsGroup {
    /// The status, agent id, session type or day (`YYYY-MM-DD`).
    pub key: String,
    pub sessions: i64,
    pub by_status: StatusCounts,
    /// Sum of the sessions' `duration_seconds`.
    pub duration_seconds: f64,
    /// `duration_seconds / sessions`.
    pub mean_duration_seconds: f64,
    pub time_in_status_seconds: TimeInStatus,
    pub pauses: i64,
    pub resumes: i64,
    pub crashes: i64,
    pub recoveries: i64,
    pub worker_generations: i64,
    pub restarts: i64,
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micro_usd: i64,
}

/// `GET /analytics`: live (not deleted) sessions created in `[from, to)`, grouped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Analytics {
    /// First UTC day counted (inclusive).
    #[schema(value_type = String, format = Date)]
    pub from: String,
    /// First UTC day not counted.
    #[schema(value_type = String, format = Date)]
    pub to: String,
    pub group_by: GroupBy,
    #[schema(value_type = String, format = DateTime)]
    pub as_of: String,
    /// The projection holds every event up to this feed position (also in
    /// the `X-Projection-Position` header): wait for it to reach a write's
    /// event position to read that write's effect.
    pub position: i64,
    /// This page's groups with at least one session, by key (byte order;
    /// days in date order). More may follow: see the `Link` header.
    pub groups: Vec<AnalyticsGroup>,
}
