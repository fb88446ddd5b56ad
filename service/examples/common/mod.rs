//! What the benchmark clients share.

/// Latencies in milliseconds, sorted once, read by percentile.
pub(crate) struct Latencies(Vec<f64>);

impl Latencies {
    pub(crate) fn new(mut ms: Vec<f64>) -> Self {
        ms.sort_by(|a, b| a.total_cmp(b));
        Self(ms)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p` quantile (0 to 1); NaN when there is none.
    pub(crate) fn pct(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 * p) as usize).min(self.0.len().saturating_sub(1));
        self.0.get(i).copied().unwrap_or(f64::NAN)
    }

    pub(crate) fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
}

/// Create `n` plain sessions to write to; their ids.
pub(crate) async fn create_sessions(
    client: &reqwest::Client,
    api: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let s: serde_json::Value = client
            .post(format!("{api}/sessions/"))
            .json(&serde_json::json!({"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "bench"}))
            .send()
            .await?
            .json()
            .await?;
        ids.push(s["id"].as_str().unwrap_or_default().to_owned());
    }
    Ok(ids)
}
