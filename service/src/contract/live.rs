//! Live sessions on the wire: the inputs a client sends a running session
//! (`POST /sessions/{id}/input`, `/interrupt`, approval answers), kept in
//! one ordered queue per session that the runner delivers to the worker's
//! stdin, and the tool approvals a worker asks for.
//!
//! Every input has a `seq` (1, 2, 3 … within the session) and an `id`, the
//! `uuid` the worker's stream-json message carries; the CLI acknowledges a
//! message by that uuid and drops a second copy of it, so the runner can
//! write an input again after a restart without the model seeing it twice.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::worker_spec::ApprovalDecision;

/// `POST /sessions/{id}/input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputRequest {
    /// What the user says next; not empty, at most `api.max_input_bytes`.
    pub text: String,
}

/// What an input asks of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A user message (`body.text`).
    Message,
    /// End the current turn (the CLI's `interrupt` control request).
    Interrupt,
    /// The answer to a tool approval (`body` is an [`ApprovalAnswer`]).
    Approval,
}

impl InputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Interrupt => "interrupt",
            Self::Approval => "approval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Message, Self::Interrupt, Self::Approval]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One input in the session's queue, as accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Input {
    /// 1, 2, 3 … within the session: the order the worker gets them in.
    pub seq: i64,
    /// The stream-json message's `uuid` (and the control request's id).
    pub id: Uuid,
    pub kind: InputKind,
    /// `{"text": …}` for a message, `{}` for an interrupt, an
    /// [`ApprovalAnswer`] for an approval.
    #[schema(value_type = Object)]
    pub body: Value,
    /// Who sent it.
    pub actor: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: String,
}

/// `202 Accepted` for an input or an interrupt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InputAccepted {
    pub seq: i64,
    pub id: Uuid,
    pub kind: InputKind,
    /// The session's version after the input's event.
    pub version: i64,
}

/// The runner reports a tool approval the worker asks for
/// (also the payload of `session.approval_requested`)
/// (`POST /sessions/{id}/approvals`, runner scope). Posting the same
/// `request_id` again answers with the approval already stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// The CLI's control request id.
    pub request_id: String,
    pub tool_name: String,
    /// The tool's input as the model gave it.
    #[schema(value_type = Object)]
    pub input: Map<String, Value>,
    /// The worker generation that asked.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_use_id: Option<String>,
}

/// `POST /sessions/{id}/approvals/{request_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    pub decision: ApprovalDecision,
    /// Told to the model with a denial (and kept with an allow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Run the tool with this input instead of the model's (allow only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub updated_input: Option<Map<String, Value>>,
    /// `timeout` when the runner applies `worker.approval_default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DecisionReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    /// Nobody answered within `worker.approval_timeout_seconds`.
    Timeout,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Allowed,
    Denied,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Allowed, Self::Denied]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A tool approval and, once decided, its decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    pub request_id: String,
    pub tool_name: String,
    #[schema(value_type = Object)]
    pub input: Map<String, Value>,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_use_id: Option<String>,
    pub status: ApprovalStatus,
    #[schema(value_type = String, format = DateTime)]
    pub requested_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub decided_at: Option<String>,
    /// Who decided: the caller's subject, or `runner` for a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub updated_input: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DecisionReason>,
}

/// The body of an `approval` input: what the runner answers the worker's
/// `can_use_tool` request with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalAnswer {
    pub request_id: String,
    pub decision: ApprovalDecision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The input to run the tool with (the model's own unless overridden).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub updated_input: Option<Map<String, Value>>,
}

impl ApprovalStatus {
    /// The status a decision leaves an approval in.
    pub fn of(decision: ApprovalDecision) -> Self {
        match decision {
            ApprovalDecision::Allow => Self::Allowed,
            ApprovalDecision::Deny => Self::Denied,
        }
    }
}

/// Payload of `session.input_received`: a user message was queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InputReceivedPayload {
    pub seq: i64,
    pub input_id: Uuid,
    pub kind: InputKind,
    pub text: String,
}

/// Payload of `session.interrupted`: an interrupt was queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InterruptedPayload {
    pub seq: i64,
    pub input_id: Uuid,
}

/// Payload of `session.approval_decided`. The answer is queued for the
/// worker as an `approval` input in the same statement, at `input_seq`
/// (`input_id`); that input has no event of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalDecidedPayload {
    pub request_id: String,
    pub decision: ApprovalDecision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The override the decision carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub updated_input: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DecisionReason>,
    pub decided_by: String,
    pub input_seq: i64,
    pub input_id: Uuid,
}
