//! The CLI's stream-json control protocol, both ways: the lines the runner
//! writes to a worker's stdin (user messages, control requests, answers to
//! permission requests) and what it reads back from stdout that matters
//! for a conversation (an input taken, a turn's end, a tool approval asked
//! for, a control request answered).
//!
//! Checked against the pinned CLI (2.1.329): a user message carrying a
//! `uuid` is acknowledged by `command_lifecycle` lines naming that uuid
//! (`queued`, `started`, `completed`) and echoed with `isReplay` when taken;
//! a second message with the same uuid is dropped, which is what lets the
//! runner write an input again after a restart without the model seeing it
//! twice.

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::contract::ApprovalDecision;
use crate::contract::live::ApprovalAnswer;

/// A user message for the worker's stdin (one line, newline included).
pub fn user_message(session_id: Uuid, id: Uuid, text: &str) -> String {
    line(&json!({
        "type": "user",
        "message": {"role": "user", "content": [{"type": "text", "text": text}]},
        "parent_tool_use_id": null,
        "session_id": session_id,
        "uuid": id,
    }))
}

/// A control request (`initialize`, `interrupt`) with its id.
pub fn control_request(request_id: &str, subtype: &str) -> String {
    line(&json!({
        "type": "control_request",
        "request_id": request_id,
        "request": {"subtype": subtype},
    }))
}

/// The answer to a `can_use_tool` request.
pub fn permission_answer(answer: &ApprovalAnswer, actor: &str) -> String {
    let response = match answer.decision {
        ApprovalDecision::Allow => json!({
            "behavior": "allow",
            "updatedInput": answer.updated_input.clone().unwrap_or_default(),
        }),
        ApprovalDecision::Deny => json!({
            "behavior": "deny",
            "message": answer
                .message
                .clone()
                .unwrap_or_else(|| format!("denied by {actor}")),
        }),
    };
    line(&json!({
        "type": "control_response",
        "response": {
            "subtype": "success",
            "request_id": answer.request_id,
            "response": response,
        },
    }))
}

fn line(v: &Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// A tool the worker wants to use, waiting for a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub request_id: String,
    pub tool_name: String,
    pub input: Map<String, Value>,
    pub tool_use_id: Option<String>,
}

/// What a stdout line means for the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// The worker took the message with this uuid into its conversation.
    Taken(Uuid),
    /// The worker queued it (read, not yet started).
    Queued(Uuid),
    /// A turn ended (`result`); `ok` when it succeeded.
    TurnEnded {
        ok: bool,
    },
    /// A turn began (the `system`/`init` line each turn starts with).
    TurnStarted,
    /// The worker asks whether it may use a tool.
    Permission(ToolRequest),
    /// The worker answered our control request with this id.
    ControlAnswered {
        request_id: String,
    },
    Other,
}

/// Read one stdout line.
pub fn hear(v: &Value) -> Heard {
    let str_at = |p: &str| v.pointer(p).and_then(Value::as_str);
    let uuid_at = |p: &str| str_at(p).and_then(|s| Uuid::parse_str(s).ok());
    match str_at("/type") {
        Some("command_lifecycle") => match (uuid_at("/command_uuid"), str_at("/state")) {
            (Some(id), Some("queued")) => Heard::Queued(id),
            (Some(id), Some("started")) => Heard::Taken(id),
            _ => Heard::Other,
        },
        Some("user") if v.get("isReplay").and_then(Value::as_bool) == Some(true) => {
            uuid_at("/uuid").map_or(Heard::Other, Heard::Taken)
        }
        Some("result") => Heard::TurnEnded {
            ok: v.get("is_error").and_then(Value::as_bool) != Some(true)
                && str_at("/subtype") == Some("success"),
        },
        Some("system") if str_at("/subtype") == Some("init") => Heard::TurnStarted,
        Some("control_request") if str_at("/request/subtype") == Some("can_use_tool") => {
            match (str_at("/request_id"), str_at("/request/tool_name")) {
                (Some(id), Some(tool)) => Heard::Permission(ToolRequest {
                    request_id: id.to_owned(),
                    tool_name: tool.to_owned(),
                    input: v
                        .pointer("/request/input")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                    tool_use_id: str_at("/request/tool_use_id").map(str::to_owned),
                }),
                _ => Heard::Other,
            }
        }
        Some("control_response") => match str_at("/response/request_id") {
            Some(id) => Heard::ControlAnswered {
                request_id: id.to_owned(),
            },
            None => Heard::Other,
        },
        _ => Heard::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s.trim_end()).unwrap()
    }

    #[test]
    fn lines_written_are_one_json_object_each() {
        let (sid, id) = (Uuid::new_v4(), Uuid::new_v4());
        let m = user_message(sid, id, "two\nlines");
        assert!(m.ends_with('\n') && m.matches('\n').count() == 1);
        let v = parse(&m);
        assert_eq!(v["uuid"], json!(id));
        assert_eq!(v["message"]["content"][0]["text"], "two\nlines");
        let c = parse(&control_request("r1", "interrupt"));
        assert_eq!(c["request"]["subtype"], "interrupt");
    }

    #[test]
    fn permission_answers() {
        let mut input = Map::new();
        input.insert("command".into(), json!("ls"));
        let allow = ApprovalAnswer {
            request_id: "q".into(),
            decision: ApprovalDecision::Allow,
            message: None,
            updated_input: Some(input.clone()),
        };
        let v = parse(&permission_answer(&allow, "alice"));
        assert_eq!(v["response"]["request_id"], "q");
        assert_eq!(v["response"]["response"]["behavior"], "allow");
        assert_eq!(v["response"]["response"]["updatedInput"], json!(input));
        let deny = ApprovalAnswer {
            decision: ApprovalDecision::Deny,
            updated_input: None,
            ..allow
        };
        let v = parse(&permission_answer(&deny, "alice"));
        assert_eq!(v["response"]["response"]["behavior"], "deny");
        assert_eq!(v["response"]["response"]["message"], "denied by alice");
    }

    #[test]
    fn hears_what_matters() {
        let id = Uuid::new_v4();
        assert_eq!(
            hear(&json!({"type": "command_lifecycle", "command_uuid": id, "state": "started"})),
            Heard::Taken(id)
        );
        assert_eq!(
            hear(&json!({"type": "command_lifecycle", "command_uuid": id, "state": "queued"})),
            Heard::Queued(id)
        );
        assert_eq!(
            hear(&json!({"type": "user", "isReplay": true, "uuid": id})),
            Heard::Taken(id)
        );
        assert_eq!(
            hear(&json!({"type": "user", "uuid": id})),
            Heard::Other,
            "a tool result, not an echo"
        );
        assert_eq!(
            hear(&json!({"type": "result", "subtype": "success", "is_error": false})),
            Heard::TurnEnded { ok: true }
        );
        let ask = json!({"type": "control_request", "request_id": "r9",
            "request": {"subtype": "can_use_tool", "tool_name": "Bash",
                        "input": {"command": "touch x"}, "tool_use_id": "toolu_1"}});
        match hear(&ask) {
            Heard::Permission(t) => {
                assert_eq!(
                    (t.request_id.as_str(), t.tool_name.as_str()),
                    ("r9", "Bash")
                );
                assert_eq!(t.input["command"], "touch x");
                assert_eq!(t.tool_use_id.as_deref(), Some("toolu_1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            hear(
                &json!({"type": "control_response", "response": {"subtype": "success", "request_id": "i1"}})
            ),
            Heard::ControlAnswered {
                request_id: "i1".into()
            }
        );
    }
}
