//! Event delivery (issue 3): the relay to Redis and the SSE stream.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use agent_sessions::store::{FeedListener, FeedNotifier};

use crate::support::app::{TestApp, id_of, read_sse};
use crate::support::db::TestDatabase;
use crate::support::redis_server::{RedisServer, Subscriber, delivery};
use crate::support::serve::ServeProcess;
use crate::support::{AGENT, SHARED_REDIS, channel_prefix, eventually};

const SECS_10: Duration = Duration::from_secs(10);

const FIELDS: [&str; 8] = [
    "event_id",
    "event_type",
    "aggregate_type",
    "aggregate_id",
    "version",
    "position",
    "occurred_at",
    "payload",
];

#[tokio::test]
async fn subscribers_receive_created_updated_deleted_with_the_design_fields() {
    let app = TestApp::spawn().await;
    let all = format!("{}events:session", app.settings.redis.channel_prefix);
    let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&all)).await;
    let s = app
        .create_session(
            &json!({"agent_id": AGENT, "session_type": "development", "runtime_backend": "local"}),
        )
        .await;
    let id = id_of(&s);
    let one = format!("{all}:{id}");
    let sub_one = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&one)).await;
    app.patch(&id, &json!({"status": "paused", "checkpoint": {"step": 5}}))
        .await;
    app.delete(&id).await;

    eventually("three messages", SECS_10, || async {
        (sub.on(&all).await.len() >= 3).then_some(())
    })
    .await;
    let msgs = sub.on(&all).await;
    assert_eq!(msgs.len(), 3);
    let feed = app.feed_with(3).await;
    for (m, e) in msgs.iter().zip(&feed) {
        let keys: HashSet<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            FIELDS.into_iter().collect(),
            "exactly an event's published fields: {m}"
        );
        for f in FIELDS {
            assert_eq!(m[f], e[f], "{f} matches the log");
        }
    }
    assert_eq!(msgs[0]["event_type"], "session.created");
    assert_eq!(msgs[0]["aggregate_type"], "session");
    assert_eq!(msgs[0]["version"], 1);
    assert_eq!(msgs[0]["payload"]["agent_id"], AGENT);
    assert_eq!(msgs[0]["payload"]["session_type"], "development");
    assert_eq!(msgs[0]["payload"]["runtime_backend"], "local");
    assert_eq!(msgs[0]["payload"]["changes"]["status"], "active");
    assert_eq!(msgs[1]["event_type"], "session.updated");
    assert_eq!(
        msgs[1]["payload"],
        json!({"agent_id": AGENT, "status": "paused",
        "updates": ["checkpoint", "status"], "changes": {"status": "paused", "checkpoint": {"step": 5}}})
    );
    assert_eq!(msgs[2]["event_type"], "session.deleted");
    assert_eq!(msgs[2]["version"], 3);
    assert!(msgs[0]["position"].as_i64() < msgs[1]["position"].as_i64());
    // The per-session channel carries the same messages for that session.
    eventually("per-session messages", SECS_10, || async {
        (sub_one.on(&one).await.len() >= 2).then_some(())
    })
    .await;
    // (It may also carry the created event, if it was published after subscribing.)
    assert!(sub_one.on(&one).await.ends_with(&msgs[1..]));
}

/// Dedupe by event_id, then check per-session version order and completeness.
fn check_delivery(received: &[Value], committed: &[Value]) {
    let rows: Vec<(String, String, i64)> = committed
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["aggregate_id"].as_str().unwrap().to_owned(),
                e["version"].as_i64().unwrap(),
            )
        })
        .collect();
    delivery(received, &rows).assert_complete();
}

#[tokio::test]
async fn events_committed_while_redis_is_down_are_published_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(|s| s.redis.url = url.clone()).await;
    let channel = format!("{}events:session", app.settings.redis.channel_prefix);
    let sub = Subscriber::start(&url, std::slice::from_ref(&channel)).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(id_of(&app.create_default().await));
    }
    eventually("the first four events", SECS_10, || async {
        (sub.on(&channel).await.len() >= 4).then_some(())
    })
    .await;
    let before = sub.on(&channel).await;

    redis.kill();
    eventually("readyz to report redis down", SECS_10, || async {
        let r = app.fetch("/readyz").await;
        (r.status == 503 && r.json()["checks"]["database"] == "ok").then_some(())
    })
    .await;
    for step in 0..5 {
        for id in &ids {
            let res = app.patch(id, &json!({"context": {"step": step}})).await;
            assert_eq!(res.status, 200, "writes succeed while Redis is down");
        }
    }
    ids.push(id_of(&app.create_default().await));

    redis.restart(false).await;
    let sub2 = Subscriber::start(&url, std::slice::from_ref(&channel)).await;
    redis.allow_publish().await;
    eventually(
        "the backlog after Redis returns",
        Duration::from_secs(30),
        || async { (sub2.on(&channel).await.len() >= 21).then_some(()) },
    )
    .await;
    let mut received = before;
    received.extend(sub2.on(&channel).await);
    let committed = app.feed_with(4 + 20 + 1).await;
    assert_eq!(committed.len(), 4 + 20 + 1);
    check_delivery(&received, &committed);
    eventually("readyz to recover", SECS_10, || async {
        (app.fetch("/readyz").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_replicas_publish_once_and_the_standby_takes_over() {
    let db = TestDatabase::migrated().await;
    let prefix = channel_prefix();
    let channel = format!("{prefix}events:session");
    let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
    let mut a = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
    let mut b = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
    eventually("one leader", SECS_10, || async {
        (a.is_relay_leader().await ^ b.is_relay_leader().await).then_some(())
    })
    .await;
    // Writes through both replicas.
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        s.api
            .create_session(&json!({"agent_id": AGENT, "session_type": "t"}))
            .await;
    }
    eventually("20 messages", SECS_10, || async {
        (sub.on(&channel).await.len() >= 20).then_some(())
    })
    .await;
    // Let any duplicate arrive before counting: both replicas have read past the head.
    let feed = a.api.whole_feed().await;
    let last = feed.last().unwrap()["position"].as_i64().unwrap();
    eventually("cursor at the head", SECS_10, || async {
        db.sql_opt_i64("SELECT position FROM relay_cursors WHERE name = 'redis'")
            .await
            .is_some_and(|p| p >= last)
            .then_some(())
    })
    .await;
    let msgs = sub.on(&channel).await;
    assert_eq!(
        msgs.len(),
        20,
        "no event published twice in normal operation"
    );

    let (leader, standby) = if a.is_relay_leader().await {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    leader.sigkill();
    let started = std::time::Instant::now();
    for _ in 0..5 {
        standby
            .api
            .create_session(&json!({"agent_id": AGENT, "session_type": "t"}))
            .await;
    }
    eventually(
        "the standby to publish",
        Duration::from_secs(15),
        || async { (sub.on(&channel).await.len() >= 25).then_some(()) },
    )
    .await;
    eprintln!("standby took over and published in {:?}", started.elapsed());
    let feed = standby.api.whole_feed().await;
    check_delivery(&sub.on(&channel).await, &feed);
}

/// A replica sends its cross-replica wake-up only when another replica
/// listens, and that one hears it (its own notifications it skips by tag).
#[tokio::test]
async fn a_replica_notifies_only_when_another_one_listens() {
    let db = TestDatabase::migrated().await;
    let mut own = FeedListener::connect(&db.url, "replica-a").await.unwrap();
    let mut a = FeedNotifier::new(&db.url);
    assert!(
        !a.notify("replica-a").await.unwrap(),
        "alone (its own listener only): no NOTIFY"
    );
    let mut other = FeedListener::connect(&db.url, "replica-b").await.unwrap();
    // The notifier's last answer ("nobody else") is kept for a short while.
    notify_until(&mut a, true, "the other listener to be seen").await;
    let from = tokio::time::timeout(SECS_10, other.next()).await.unwrap();
    assert_eq!(from.as_deref(), Some("replica-a"));
    // Replica a's own listener hears it too, tagged, and skips it.
    let own_from = tokio::time::timeout(SECS_10, own.next()).await.unwrap();
    assert_eq!(own_from.as_deref(), Some("replica-a"));
    drop(other);
    notify_until(&mut a, false, "replica b's listener to be gone").await;
}

/// Notify as replica a until the notifier answers `sent` (at most 10 s).
async fn notify_until(a: &mut FeedNotifier, sent: bool, what: &str) {
    let deadline = std::time::Instant::now() + SECS_10;
    while a.notify("replica-a").await.unwrap() != sent {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sse_resumes_with_last_event_id_without_loss_or_repeat() {
    let app = TestApp::spawn_with(|s| s.relay.sse_heartbeat_secs = 1).await;
    let id = id_of(&app.create_default().await);
    let res = app.open(app.http.get(app.at("/events/stream"))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let writer = async {
        for i in 1..=4 {
            app.patch(&id, &json!({"context": {"n": i}})).await;
        }
    };
    let (first, ()) = tokio::join!(read_sse(res, 5), writer);
    assert_eq!(first[0].1["event_type"], "session.created");
    let last_id = first.last().unwrap().0;

    // Missed while disconnected:
    for i in 10..13 {
        app.patch(&id, &json!({"context": {"n": i}})).await;
    }
    app.create_default().await;
    let res = app
        .open(
            app.http
                .get(app.at("/events/stream"))
                .header("last-event-id", last_id.to_string()),
        )
        .await;
    let second = read_sse(res, 4).await;
    let feed = app.feed_with(9).await;
    let expected: Vec<i64> = feed
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .filter(|p| *p > last_id)
        .collect();
    assert_eq!(
        second.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        expected,
        "exactly the missed events"
    );
    assert!(second.iter().all(|(i, d)| d["position"] == *i));

    // Filtered by session and type; keep-alives flow while idle.
    let res = app
        .open(app.http.get(app.at(&format!(
            "/events/stream?session_id={id}&event_type=session.updated"
        ))))
        .await;
    let only = read_sse(res, 7).await;
    assert!(
        only.iter()
            .all(|(_, d)| d["aggregate_id"] == id.as_str() && d["event_type"] == "session.updated")
    );
    let res = app
        .open(
            app.http
                .get(app.at(&format!("/events/stream?after={}", i64::MAX - 1))),
        )
        .await;
    let mut s = res.bytes_stream();
    let mut text = String::new();
    while !text.contains(": keep-alive") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("heartbeat in time")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let bad = app
        .send(
            app.http
                .get(app.at("/events/stream"))
                .header("last-event-id", "abc"),
        )
        .await;
    assert_eq!(bad.status, 400);
}
