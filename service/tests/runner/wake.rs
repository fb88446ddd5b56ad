//! The runner reacts to changes while the event feed is held back: wake-up
//! hints published right after each commit reach it before the feed
//! releases the event.

use std::time::{Duration, Instant};

use crate::support::rig::Rig;
use crate::support::{eventually, group_alive};
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use serde_json::json;

/// An open transaction that looks exactly like an event writer of the
/// service to the feed's horizon: it announces itself with the writers'
/// shared lock and holds a transaction id.
async fn hold_the_feed(db_url: &str) -> sea_orm::DatabaseTransaction {
    let db = Database::connect(db_url).await.expect("connect");
    db.execute_unprepared("CREATE TABLE IF NOT EXISTS scratch (n int)")
        .await
        .expect("scratch table");
    let tx = db.begin().await.expect("begin");
    tx.execute_unprepared(
        "SELECT pg_advisory_xact_lock_shared(1634169701, 2003986804); \
         INSERT INTO scratch VALUES (1);",
    )
    .await
    .expect("announce and take an xid");
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_starts_pauses_and_stops_workers_while_the_feed_is_held() {
    // A resync far away: only the hints can make the runner act in time.
    let rig = Rig::start_with(false, |s| s.runner.resync_interval_secs = 3600).await;
    let feed = |after: i64| {
        let api = &rig.api;
        async move {
            api.fetch(&format!("/events?after={after}&limit=500"))
                .await
                .expect(200)
                .parse::<Vec<serde_json::Value>>()
        }
    };
    let head = feed(0)
        .await
        .last()
        .map_or(0, |e| e["position"].as_i64().unwrap());
    let held = hold_the_feed(&rig.api.settings.database.url).await;

    let t0 = Instant::now();
    let id = rig
        .create_local(json!({"prompt": "Write a long essay [slow:60]"}))
        .await;
    let pid = rig.worker_pid(&id).await;
    let started = t0.elapsed();
    assert!(
        feed(head).await.is_empty(),
        "the worker started while the feed still held the session's events"
    );

    let t1 = Instant::now();
    let status = rig
        .api
        .merge_patch(&id, &json!({"status": "paused"}))
        .await
        .status;
    assert_eq!(status, 200);
    eventually(
        "the worker to be stopped",
        Duration::from_secs(30),
        || async { (!group_alive(pid)).then_some(()) },
    )
    .await;
    let paused = t1.elapsed();

    let t2 = Instant::now();
    let status = rig
        .api
        .merge_patch(&id, &json!({"status": "active"}))
        .await
        .status;
    assert_eq!(status, 200);
    let resumed_pid = eventually("the worker to resume", Duration::from_secs(30), || async {
        let s = rig.api.get(&id).await;
        let w = &s["runtime_metadata"]["worker"];
        (w["generation"] == 2).then(|| w["pid"].as_i64()).flatten()
    })
    .await as i32;
    let resumed = t2.elapsed();

    let t3 = Instant::now();
    let status = rig
        .api
        .merge_patch(&id, &json!({"status": "completed"}))
        .await
        .status;
    assert_eq!(status, 200);
    eventually(
        "the resumed worker to be stopped",
        Duration::from_secs(30),
        || async { (!group_alive(resumed_pid)).then_some(()) },
    )
    .await;
    let stopped = t3.elapsed();
    assert!(
        feed(head).await.is_empty(),
        "everything above happened while the feed was held"
    );
    eprintln!(
        "while the feed was held: started in {started:?}, paused in {paused:?}, \
         resumed in {resumed:?}, stopped in {stopped:?}"
    );

    held.rollback().await.expect("release the feed");
    eventually(
        "the feed to release the events",
        Duration::from_secs(10),
        || async {
            let events = feed(head).await;
            events
                .iter()
                .any(|e| e["aggregate_id"] == id.as_str())
                .then_some(())
        },
    )
    .await;
    rig.stop().await;
}
