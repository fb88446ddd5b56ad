//! After a fault: was every acknowledged write kept with its event, and did
//! every committed event reach the Redis subscriber?

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::load::Ack;
use crate::support::app::Api;
use crate::support::redis_server::{Delivery, Subscriber, delivery};

/// One session's events over HTTP, following pages.
pub(crate) async fn session_events(api: &Api, id: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |e| e["version"].as_i64().unwrap());
        let page: Vec<Value> = api
            .fetch(&format!(
                "/sessions/{id}/events?after_version={after}&limit=500"
            ))
            .await
            .expect(200)
            .parse();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Acknowledged writes missing from the log, or present with another
/// content, as readable lines; read back through the API as a client would.
pub(crate) async fn lost_acks(api: &Api, acks: &[Ack]) -> Vec<String> {
    let mut by_session: HashMap<&str, Vec<&Ack>> = HashMap::new();
    for a in acks {
        by_session.entry(&a.session).or_default().push(a);
    }
    let mut lost = Vec::new();
    for (id, acks) in by_session {
        let events = session_events(api, id).await;
        let versions: Vec<i64> = events
            .iter()
            .map(|e| e["version"].as_i64().unwrap())
            .collect();
        assert!(
            versions.iter().enumerate().all(|(i, v)| *v == i as i64 + 1),
            "session {id}: versions not contiguous: {versions:?}"
        );
        for a in acks {
            let found = events.get(a.version as usize - 1);
            let context = found.map(|e| &e["payload"]["changes"]["context"]);
            if context != Some(&a.context) {
                lost.push(format!(
                    "{id} v{}: acknowledged with context {}, log has {:?}",
                    a.version, a.context, context
                ));
            }
        }
    }
    lost
}

/// Everything the subscribers got on `channel`, in order.
pub(crate) async fn received(subs: &[&Subscriber], channel: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for s in subs {
        all.extend(s.on(channel).await);
    }
    all
}

/// Wait (up to `secs`) until the subscribers hold every committed event;
/// returns the delivery figures and how long the wait took.
pub(crate) async fn await_delivery(
    subs: &[&Subscriber],
    channel: &str,
    committed: &[(String, String, i64)],
    secs: u64,
) -> (Delivery, Duration) {
    let started = Instant::now();
    loop {
        let d = delivery(&received(subs, channel).await, committed);
        if d.lost == 0 || started.elapsed() >= Duration::from_secs(secs) {
            return (d, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
