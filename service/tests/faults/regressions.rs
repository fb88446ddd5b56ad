//! Inputs the fuzzer (`scripts/fuzz.sh`) found breaking the service, kept
//! as tests against a real `serve` process.

use std::time::Duration;

use serde_json::{Value, json};

use crate::channel_prefix;
use crate::support::db::{SHARED_ADMIN_URL, TestDatabase};
use crate::support::eventually;
use crate::support::redis_server::Subscriber;
use crate::support::serve::{ServeProcess, migrate};
use crate::support::{AGENT, SHARED_REDIS, init};

struct Fixture {
    serve: ServeProcess,
    sub: Subscriber,
    channel: String,
    _db: TestDatabase,
}

async fn start() -> Fixture {
    init();
    let db = TestDatabase::create(SHARED_ADMIN_URL).await;
    migrate(&db.url);
    let prefix = channel_prefix();
    let channel = format!("{prefix}events:session");
    let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
    let serve = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
    Fixture {
        serve,
        sub,
        channel,
        _db: db,
    }
}

impl Fixture {
    async fn create(&self, context: Value) -> String {
        self.serve
            .api
            .create_id(&json!({"agent_id": AGENT, "session_type": "fuzz", "context": context}))
            .await
    }
}

/// PostgreSQL prints a `jsonb` number near `f64::MAX` as a 309-digit
/// integer; serde_json's default float parsing rounded that to infinity and
/// failed, so reading the session, the feed, and the relay (forever) failed.
#[tokio::test]
async fn json_numbers_at_the_edges_of_f64_round_trip_and_never_stall_the_relay() {
    let f = start().await;
    let context = json!({
        "max": f64::MAX, "lowest": f64::MIN, "tiny": 5e-324,
        "u64": u64::MAX, "i64": i64::MIN
    });
    let id = f.create(context.clone()).await;
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
    let f = start().await;
    let id = f.create(json!({})).await;
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
