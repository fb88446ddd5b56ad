//! Usage counters of a session, derived from its worker's messages (the
//! stream-json lines of `claude --output-format stream-json`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Totals over every message the session's workers produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Usage {
    /// Messages stored in the session's message log.
    pub message_count: i64,
    /// `tool_use` blocks in assistant messages.
    pub tool_call_count: i64,
    /// Turns reported by the workers' `result` messages.
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cache_read_input_tokens: i64,
    /// Sum of `total_cost_usd` over the workers' runs.
    pub total_cost_usd: f64,
}

fn int(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

impl Usage {
    /// Fold a batch of messages into the totals.
    pub fn add_messages(&mut self, messages: &[Value]) {
        for m in messages {
            self.message_count += 1;
            match m.get("type").and_then(Value::as_str) {
                Some("assistant") => {
                    if let Some(blocks) = m.pointer("/message/content").and_then(Value::as_array) {
                        self.tool_call_count += blocks
                            .iter()
                            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                            .count() as i64;
                    }
                }
                Some("result") => {
                    self.turns += int(m, "num_turns");
                    self.total_cost_usd += m
                        .get("total_cost_usd")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0);
                    if let Some(u) = m.get("usage") {
                        self.input_tokens += int(u, "input_tokens");
                        self.output_tokens += int(u, "output_tokens");
                        self.cache_creation_input_tokens += int(u, "cache_creation_input_tokens");
                        self.cache_read_input_tokens += int(u, "cache_read_input_tokens");
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_messages_tool_calls_and_result_totals() {
        let mut u = Usage::default();
        u.add_messages(&[
            json!({"type": "system", "subtype": "init", "session_id": "s"}),
            json!({"type": "assistant", "message": {"content": [
                {"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]}}),
            json!({"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1"}]}}),
            json!({"type": "result", "subtype": "success", "num_turns": 2, "total_cost_usd": 0.25,
                   "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3}}),
        ]);
        u.add_messages(&[json!({"type": "result", "num_turns": 1, "total_cost_usd": 0.5, "usage": {"input_tokens": 1}})]);
        assert_eq!(
            u,
            Usage {
                message_count: 5,
                tool_call_count: 1,
                turns: 3,
                input_tokens: 11,
                output_tokens: 5,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 3,
                total_cost_usd: 0.75,
            }
        );
    }
}
