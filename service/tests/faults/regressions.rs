//! Inputs the fuzzer (`scripts/fuzz.sh`) found breaking the service, kept
//! as tests against a real `serve` process.

use std::time::Duration;

use serde_json::{Value, json};

use crate::Stage;
use crate::support::{AGENT, eventually};

async fn create(f: &Stage, context: Value) -> String {
    f.serve
        .api
        .create_id(&json!({"agent_id": AGENT, "session_type": "fuzz", "context": context}))
        .await
}

/// PostgreSQL prints a `jsonb` number near `f64::MAX` as a 309-digit
/// integer; serde_json's default float parsing rounded that to infinity and
/// failed, so reading the session, the feed, and the relay (forever) failed.
#[tokio::test]
async fn json_numbers_at_the_edges_of_f64_round_trip_and_never_stall_the_relay() {
    let f = Stage::start().await;
    let context = json!({
        "max": f64::MAX, "lowest": f64::MIN, "tiny": 5e-324,
        "u64": u64::MAX, "i64": i64::MIN
    });
    let id = create(&f, context.clone()).await;
    let api = &f.serve.api;
    assert_eq!(api.get(&id).await["context"], context);
    let listed = api.get_json(&format!("/sessions/?agent_id={AGENT}")).await;
    assert_eq!(listed[0]["context"], context);
    let events = api.get_json(&format!("/sessions/{id}/events")).await;
    assert_eq!(events[0]["payload"]["changes"]["context"], context);
    api.fetch("/events").await.expect(200);
    // An event after it still reaches Redis: the relay read past it.
    api.patch(&id, &json!({"context": {"n": 1}}))
        .await
        .expect(200);
    eventually("both events on Redis", Duration::from_secs(10), || async {
        (f.sub.on(&f.channel).await.len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        f.sub.on(&f.channel).await[0]["payload"]["changes"]["context"],
        context
    );
}

/// Usage totals overflowed (a panic in debug builds, wrapped totals in
/// release) and an infinite cost made the usage unstorable.
#[tokio::test]
async fn usage_totals_saturate() {
    let f = Stage::start().await;
    let id = create(&f, json!({})).await;
    let api = &f.serve.api;
    let result = json!([{
        "type": "result", "num_turns": i64::MAX, "total_cost_usd": f64::MAX,
        "usage": {"input_tokens": i64::MAX, "output_tokens": 1}
    }]);
    for _ in 0..2 {
        api.post(&format!("/sessions/{id}/messages"), &result)
            .await
            .expect(200);
    }
    let s = api.get(&id).await;
    assert_eq!(s["usage"]["turns"], i64::MAX);
    assert_eq!(s["usage"]["input_tokens"], i64::MAX);
    assert_eq!(s["usage"]["output_tokens"], 2);
    assert_eq!(s["usage"]["total_cost_usd"], f64::MAX);
    assert_eq!(s["usage"]["message_count"], 2);
}
