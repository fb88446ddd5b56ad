//! Acceptance load test: 16 concurrent writers and a reader tailing
//! `/events?after=`; every committed event is read exactly once, in
//! increasing position order.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::AGENT;
use crate::support::app::{TestApp, id_of};

#[tokio::test]
async fn sixteen_writers_and_a_tailing_reader_see_every_event_once() {
    let app = TestApp::spawn().await;
    const WRITERS: usize = 16;
    const WRITES: usize = 25;
    let (done_tx, done_rx) = watch::channel(0usize);

    let reader = {
        let api = app.api.clone();
        tokio::spawn(async move {
            let mut after = 0i64;
            let mut seen: Vec<Value> = Vec::new();
            loop {
                let page: Vec<Value> = api
                    .fetch(&format!("/events?after={after}&limit=100"))
                    .await
                    .expect(200)
                    .parse();
                if page.is_empty() {
                    // Done once every committed event has been read; the
                    // feed may trail commits while transactions are open.
                    let target = *done_rx.borrow();
                    if target > 0 && seen.len() >= target {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                for e in &page {
                    let p = e["position"].as_i64().unwrap();
                    assert!(p > after, "positions increase: {p} after {after}");
                    after = p;
                }
                seen.extend(page);
            }
        })
    };

    let writers = (0..WRITERS).map(|w| {
        let app = &app;
        async move {
            let s = app
                .create_session(
                    &json!({"agent_id": AGENT, "session_type": "load", "context": {"w": w}}),
                )
                .await;
            let id = id_of(&s);
            let mut acked = 1;
            for i in 0..WRITES {
                let res = app.patch(&id, &json!({"context": {"w": w, "i": i}})).await;
                assert_eq!(res.status, 200);
                acked += 1;
            }
            acked
        }
    });
    let acked: usize = join_all(writers).await.into_iter().sum();
    let committed = app.db.sql_i64("SELECT count(*) FROM events").await as usize;
    done_tx.send(committed).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader catches up with every committed event")
        .unwrap();

    assert_eq!(
        committed, acked,
        "every acknowledged write committed one event"
    );
    let unique: HashSet<&str> = seen
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), seen.len(), "no event read twice");
    assert_eq!(seen.len(), committed, "no event missed");
}
