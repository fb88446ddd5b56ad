//! Usage counters of a session, derived from its worker's messages (the
//! stream-json lines of `claude --output-format stream-json`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Totals over every message the session's workers produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// Totals saturate: messages come from workers (and anyone holding the
/// API), and an absurd count must neither overflow nor make the session's
/// usage unstorable (an infinite cost would serialise as `null`).
fn add_cost(total: f64, cost: f64) -> f64 {
    (total + cost).clamp(f64::MIN, f64::MAX)
}

impl Usage {
    /// Fold a batch of messages into the totals.
    pub fn add_messages(&mut self, messages: &[Value]) {
        for m in messages {
            self.message_count = self.message_count.saturating_add(1);
            match m.get("type").and_then(Value::as_str) {
                Some("assistant") => {
                    if let Some(blocks) = m.pointer("/message/content").and_then(Value::as_array) {
                        let calls = blocks
                            .iter()
                            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                            .count() as i64;
                        self.tool_call_count = self.tool_call_count.saturating_add(calls);
                    }
                }
                Some("result") => {
                    self.turns = self.turns.saturating_add(int(m, "num_turns"));
                    let cost = m.get("total_cost_usd").and_then(Value::as_f64);
                    self.total_cost_usd = add_cost(self.total_cost_usd, cost.unwrap_or(0.0));
                    if let Some(u) = m.get("usage") {
                        for (total, key) in [
                            (&mut self.input_tokens, "input_tokens"),
                            (&mut self.output_tokens, "output_tokens"),
                            (
                                &mut self.cache_creation_input_tokens,
                                "cache_creation_input_tokens",
                            ),
                            (&mut self.cache_read_input_tokens, "cache_read_input_tokens"),
                        ] {
                            *total = total.saturating_add(int(u, key));
                        }
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
    fn totals_saturate_instead_of_overflowing() {
        let huge = json!({"type": "result", "num_turns": i64::MAX, "total_cost_usd": f64::MAX,
                          "usage": {"input_tokens": i64::MAX, "output_tokens": i64::MIN}});
        let mut u = Usage::default();
        u.add_messages(&[huge.clone(), huge]);
        assert_eq!(u.turns, i64::MAX);
        assert_eq!(u.input_tokens, i64::MAX);
        assert_eq!(u.output_tokens, i64::MIN);
        assert_eq!(u.total_cost_usd, f64::MAX);
        // Still storable: a finite cost serialises as a number, not `null`.
        let stored = serde_json::to_value(&u).unwrap();
        assert_eq!(serde_json::from_value::<Usage>(stored).unwrap(), u);
    }

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
