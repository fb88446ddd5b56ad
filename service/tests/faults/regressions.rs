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
    client: reqwest::Client,
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
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        _db: db,
    }
}

impl Fixture {
    async fn send(&self, req: reqwest::RequestBuilder, want: u16) -> Value {
        let res = req.send().await.expect("an answer");
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        assert_eq!(status, want, "{body}");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    async fn create(&self, context: Value) -> String {
        let url = format!("{}/sessions/", self.serve.base());
        let s = self
            .send(
                self.client.post(url).json(&json!({
                    "agent_id": AGENT, "session_type": "fuzz", "context": context
                })),
                201,
            )
            .await;
        s["id"].as_str().unwrap().to_owned()
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
    let base = f.serve.base();
    let got = f
        .send(f.client.get(format!("{base}/sessions/{id}")), 200)
        .await;
    assert_eq!(got["context"], context);
    let listed = f
        .send(
            f.client.get(format!("{base}/sessions/?agent_id={AGENT}")),
            200,
        )
        .await;
    assert_eq!(listed[0]["context"], context);
    let events = f
        .send(f.client.get(format!("{base}/sessions/{id}/events")), 200)
        .await;
    assert_eq!(events[0]["payload"]["changes"]["context"], context);
    f.send(f.client.get(format!("{base}/events")), 200).await;
    // An event after it still reaches Redis: the relay read past it.
    f.send(
        f.client
            .patch(format!("{base}/sessions/{id}"))
            .json(&json!({"context": {"n": 1}})),
        200,
    )
    .await;
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
    let url = format!("{}/sessions/{id}/messages", f.serve.base());
    let result = json!([{
        "type": "result", "num_turns": i64::MAX, "total_cost_usd": f64::MAX,
        "usage": {"input_tokens": i64::MAX, "output_tokens": 1}
    }]);
    for _ in 0..2 {
        f.send(f.client.post(&url).json(&result), 200).await;
    }
    let s = f
        .send(
            f.client.get(format!("{}/sessions/{id}", f.serve.base())),
            200,
        )
        .await;
    assert_eq!(s["usage"]["turns"], i64::MAX);
    assert_eq!(s["usage"]["input_tokens"], i64::MAX);
    assert_eq!(s["usage"]["output_tokens"], 2);
    assert_eq!(s["usage"]["total_cost_usd"], f64::MAX);
    assert_eq!(s["usage"]["message_count"], 2);
}
