//! What a worker spent, from the token usage of each turn and a price table
//! per model, in whole millionths of a dollar (no float drift however many
//! turns add up).
//!
//! The CLI's own `total_cost_usd` is a running total over the process's
//! turns (summing it over-counts) and its price list is the CLI's, not the
//! operator's; it is used only for a model the table does not price, and
//! then as the difference between successive totals.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// USD per million tokens of each kind (`runner.prices.<model>`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cache_write: f64,
    #[serde(default)]
    pub cache_read: f64,
}

/// Micro-dollars per million tokens, exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Rates {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
}

fn micro(usd: f64) -> u64 {
    (usd * 1_000_000.0).round().max(0.0) as u64
}

/// The price table: exact model names, else the longest matching prefix
/// (a key ending in `*`), else `default`.
#[derive(Debug, Clone, Default)]
pub struct Prices {
    rates: BTreeMap<String, Rates>,
}

impl Prices {
    pub fn new(table: &BTreeMap<String, Price>) -> Self {
        Self {
            rates: table
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        Rates {
                            input: micro(p.input),
                            output: micro(p.output),
                            cache_write: micro(p.cache_write),
                            cache_read: micro(p.cache_read),
                        },
                    )
                })
                .collect(),
        }
    }

    fn rates(&self, model: Option<&str>) -> Option<Rates> {
        if let Some(m) = model {
            if let Some(r) = self.rates.get(m) {
                return Some(*r);
            }
            let best = self
                .rates
                .iter()
                .filter_map(|(k, r)| {
                    let prefix = k.strip_suffix('*')?;
                    m.starts_with(prefix).then_some((prefix.len(), *r))
                })
                .max_by_key(|(n, _)| *n);
            if let Some((_, r)) = best {
                return Some(r);
            }
        }
        self.rates.get("default").copied()
    }
}

/// Totals over the turns of one worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(default)]
pub struct Spend {
    pub turns: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micro_usd: u64,
    /// The CLI's running total at the last `result`, in micro-dollars.
    #[serde(skip)]
    cli_total_micro: u64,
}

#[derive(Debug, Clone, Copy)]
struct Tokens {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
}

impl Tokens {
    /// tokens × µ$/Mtok = µ$ × 10⁶, rounded to the nearest µ$.
    fn priced(self, r: Rates) -> u64 {
        let scaled = u128::from(self.input) * u128::from(r.input)
            + u128::from(self.output) * u128::from(r.output)
            + u128::from(self.cache_write) * u128::from(r.cache_write)
            + u128::from(self.cache_read) * u128::from(r.cache_read);
        u64::try_from((scaled + 500_000) / 1_000_000).unwrap_or(u64::MAX)
    }
}

fn u64_at(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

impl Spend {
    /// Add one `result` line (one turn's usage). The CLI's per-model usage
    /// since the previous result is priced model by model when the line
    /// carries it; otherwise the turn's `usage` at `model`'s price.
    pub fn add_result(&mut self, line: &Value, model: Option<&str>, prices: &Prices) {
        self.turns += u64_at(line, "/num_turns").max(1);
        let cli_total = line
            .get("total_cost_usd")
            .and_then(Value::as_f64)
            .map(micro);
        let cli_delta = cli_total.map(|t| t.saturating_sub(self.cli_total_micro));
        if let Some(t) = cli_total {
            self.cli_total_micro = self.cli_total_micro.max(t);
        }
        let mut cost: u64 = 0;
        match line
            .get("model_usage_since_last_result")
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
        {
            Some(per_model) => {
                for (name, u) in per_model {
                    let tokens = Tokens {
                        input: u64_at(u, "/inputTokens"),
                        output: u64_at(u, "/outputTokens"),
                        cache_write: u64_at(u, "/cacheCreationInputTokens"),
                        cache_read: u64_at(u, "/cacheReadInputTokens"),
                    };
                    self.count(tokens);
                    cost = cost.saturating_add(match prices.rates(Some(name)) {
                        Some(r) => tokens.priced(r),
                        None => u.get("costUSD").and_then(Value::as_f64).map_or(0, micro),
                    });
                }
            }
            None => {
                let tokens = Tokens {
                    input: u64_at(line, "/usage/input_tokens"),
                    output: u64_at(line, "/usage/output_tokens"),
                    cache_write: u64_at(line, "/usage/cache_creation_input_tokens"),
                    cache_read: u64_at(line, "/usage/cache_read_input_tokens"),
                };
                self.count(tokens);
                cost = match prices.rates(model) {
                    Some(r) => tokens.priced(r),
                    None => cli_delta.unwrap_or(0),
                };
            }
        }
        self.cost_micro_usd = self.cost_micro_usd.saturating_add(cost);
    }

    fn count(&mut self, t: Tokens) {
        self.input_tokens += t.input + t.cache_write + t.cache_read;
        self.output_tokens += t.output;
    }

    /// `self` on top of what earlier workers spent.
    pub fn plus(self, before: Spend) -> Spend {
        Spend {
            turns: before.turns + self.turns,
            input_tokens: before.input_tokens + self.input_tokens,
            output_tokens: before.output_tokens + self.output_tokens,
            cost_micro_usd: before.cost_micro_usd.saturating_add(self.cost_micro_usd),
            cli_total_micro: self.cli_total_micro,
        }
    }

    pub fn new(turns: u64, input_tokens: u64, output_tokens: u64, cost_micro_usd: u64) -> Self {
        Self {
            turns,
            input_tokens,
            output_tokens,
            cost_micro_usd,
            cli_total_micro: 0,
        }
    }

    pub fn cost_usd(&self) -> f64 {
        self.cost_micro_usd as f64 / 1_000_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Prices {
        let mut t = BTreeMap::new();
        t.insert(
            "claude-opus-5-5".to_owned(),
            Price {
                input: 15.0,
                output: 75.0,
                cache_write: 18.75,
                cache_read: 1.5,
            },
        );
        t.insert(
            "claude-sonnet*".to_owned(),
            Price {
                input: 3.0,
                output: 15.0,
                ..Price::default()
            },
        );
        Prices::new(&t)
    }

    fn result(input: u64, output: u64, total: f64) -> Value {
        json!({"type": "result", "num_turns": 1, "total_cost_usd": total,
               "usage": {"input_tokens": input, "output_tokens": output,
                         "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
    }

    #[test]
    fn each_turn_is_priced_once_without_float_noise() {
        let p = table();
        let mut s = Spend::default();
        // 12 in × 15 $/M + 7 out × 75 $/M = 180 + 525 µ$.
        for _ in 0..3 {
            s.add_result(&result(12, 7, 0.1), Some("claude-opus-5-5"), &p);
        }
        assert_eq!(s.cost_micro_usd, 3 * 705);
        assert_eq!((s.turns, s.input_tokens, s.output_tokens), (3, 36, 21));
        let mut t = Spend::default();
        for _ in 0..1000 {
            t.add_result(&result(1000, 0, 0.0), Some("claude-sonnet-4-5"), &p);
        }
        assert_eq!(
            t.cost_micro_usd, 3_000_000,
            "exactly $3 for a million tokens"
        );
    }

    #[test]
    fn an_unpriced_model_counts_the_clis_running_total_once() {
        let p = table();
        let mut s = Spend::default();
        s.add_result(&result(1, 1, 0.000188), Some("other"), &p);
        s.add_result(&result(1, 1, 0.000376), Some("other"), &p);
        s.add_result(&result(1, 1, 0.000752), Some("other"), &p);
        assert_eq!(s.cost_micro_usd, 752, "not 188 + 376 + 752");
        let before = Spend::new(2, 10, 10, 1000);
        let all = s.plus(before);
        assert_eq!((all.turns, all.cost_micro_usd), (5, 1752));
    }

    #[test]
    fn the_per_model_usage_since_the_last_result_wins() {
        let p = table();
        let mut s = Spend::default();
        // A budget stop: `usage` reads zero, the per-model usage does not.
        let line = json!({"type": "result", "num_turns": 1, "total_cost_usd": 0.9,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "model_usage_since_last_result": {
                "claude-opus-5-5": {"inputTokens": 21, "outputTokens": 9,
                    "cacheReadInputTokens": 0, "cacheCreationInputTokens": 0, "costUSD": 0.5},
                "unpriced": {"inputTokens": 1, "outputTokens": 1, "costUSD": 0.000002}}});
        s.add_result(&line, None, &p);
        assert_eq!((s.input_tokens, s.output_tokens), (22, 10));
        assert_eq!(s.cost_micro_usd, 21 * 15 + 9 * 75 + 2);
    }

    #[test]
    fn defaults_and_prefixes() {
        let mut t = BTreeMap::new();
        t.insert(
            "default".to_owned(),
            Price {
                input: 1.0,
                output: 2.0,
                ..Price::default()
            },
        );
        let p = Prices::new(&t);
        let mut s = Spend::default();
        s.add_result(&result(1_000_000, 1_000_000, 0.0), Some("x"), &p);
        assert_eq!(s.cost_micro_usd, 3_000_000);
    }
}
