//! Retention: old finished sessions deleted (each with its `session.deleted`)
//! and their streams purged after the grace period, recent and live ones
//! untouched, `--dry-run` writing nothing, the feed gap-safe and `replay
//! --verify` green after a purge, ids once held refused by import after it,
//! idempotency keys expiring, the sweep in `serve`, one pass at a time, and
//! the bulk `DELETE /sessions/`.
//!
//! Time is the test's: sessions (with their events, in one transaction that
//! fires no trigger) and tombstones are moved into the past in the database,
//! so nothing waits for a clock.

use std::time::Duration;

use agent_sessions::store::{LeaderLock, LeaderRole};
use reqwest::Method;
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use serde_json::{Value, json};

use crate::support::app::{Reply, TestApp, id_of};
use crate::support::serve::{replay_verify, retention_run};
use crate::support::{AGENT, eventually};

/// Delete completed and crashed sessions untouched for 30 days; purge 7 days
/// after deletion; keys live a day.
const POLICY: [(&str, &str); 3] = [
    ("APP__RETENTION__DELETE_AFTER_SECS", "2592000"),
    ("APP__RETENTION__PURGE_AFTER_SECS", "604800"),
    ("APP__RETENTION__IDEMPOTENCY_KEY_TTL_SECS", "86400"),
];

fn quoted(ids: &[&str]) -> String {
    ids.iter()
        .map(|i| format!("'{i}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Move sessions `ids` (their rows and every event) `days` into the past.
async fn age(app: &TestApp, ids: &[&str], days: u32) {
    let db = app.db.connect().await;
    let ids = quoted(ids);
    db.execute_unprepared(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         UPDATE sessions SET created_at = created_at - interval '{days} days', \
                             updated_at = updated_at - interval '{days} days' WHERE id IN ({ids}); \
         UPDATE events SET occurred_at = occurred_at - interval '{days} days' \
                       WHERE aggregate_id IN ({ids}); \
         COMMIT;"
    ))
    .await
    .unwrap();
    db.close().await.ok();
}

/// Move every deletion `days` into the past.
async fn age_deletions(app: &TestApp, days: u32) {
    let db = app.db.connect().await;
    db.execute_unprepared(&format!(
        "UPDATE session_tombstones SET deleted_at = deleted_at - interval '{days} days'"
    ))
    .await
    .unwrap();
    db.close().await.ok();
}

/// A session moved to `status` (from active).
async fn session_in(app: &TestApp, status: &str) -> String {
    let id = id_of(&app.create_default().await);
    if status != "active" {
        app.patch(&id, &json!({ "status": status }))
            .await
            .expect(200);
    }
    id
}

/// (sessions, events, tombstones, purged tombstones, idempotency keys).
async fn census(app: &TestApp) -> (i64, i64, i64, i64, i64) {
    let (sessions, events) = app.counts().await;
    (
        sessions,
        events,
        app.db
            .sql_i64("SELECT count(*) FROM session_tombstones")
            .await,
        app.db
            .sql_i64("SELECT count(*) FROM session_tombstones WHERE purged_at IS NOT NULL")
            .await,
        app.db
            .sql_i64("SELECT count(*) FROM idempotency_keys")
            .await,
    )
}

async fn events_of(app: &TestApp, id: &str) -> i64 {
    app.db
        .sql_i64(&format!(
            "SELECT count(*) FROM events WHERE aggregate_id = '{id}'"
        ))
        .await
}

async fn create_with_key(app: &TestApp, key: &str) -> Reply {
    app.send(
        app.http
            .post(app.at("/sessions/"))
            .header("idempotency-key", key)
            .json(&json!({"agent_id": AGENT, "session_type": "keyed"})),
    )
    .await
}

async fn bulk_delete(app: &TestApp, query: &str) -> Reply {
    app.send(
        app.http
            .request(Method::DELETE, app.at(&format!("/sessions/{query}"))),
    )
    .await
}

#[tokio::test]
async fn old_finished_sessions_are_deleted_then_purged_after_the_grace_period() {
    let app = TestApp::spawn_with(|s| s.retention.sweep_interval_secs = 0).await;
    let old_done = session_in(&app, "completed").await;
    let old_done_2 = session_in(&app, "completed").await;
    let old_crashed = session_in(&app, "crashed").await;
    let old_paused = session_in(&app, "paused").await;
    let old_live = session_in(&app, "active").await;
    let recent_done = session_in(&app, "completed").await;
    let doomed = [old_done.as_str(), old_done_2.as_str(), old_crashed.as_str()];
    let kept = [old_paused.as_str(), old_live.as_str(), recent_done.as_str()];
    app.post(
        &format!("/sessions/{old_done}/messages"),
        &json!([{"type": "assistant", "message": {"content": [{"type": "text", "text": "hi"}]}}]),
    )
    .await
    .expect(200);
    let exported = app.get_json(&format!("/sessions/{old_done}/export")).await;
    age(&app, &[doomed.as_slice(), &kept[..2]].concat(), 40).await;
    create_with_key(&app, "k-old").await.expect(201);
    create_with_key(&app, "k-new").await.expect(201);
    let db = app.db.connect().await;
    db.execute_unprepared(
        "UPDATE idempotency_keys SET created_at = created_at - interval '2 days' \
         WHERE key LIKE '% k-old'",
    )
    .await
    .unwrap();
    let head = app.whole_feed().await.last().unwrap()["position"]
        .as_i64()
        .unwrap();

    // A dry run says what it would do and writes nothing.
    let before = census(&app).await;
    let (ok, out) = retention_run(&app.db.url, &POLICY, true);
    assert!(ok, "{out}");
    assert!(
        out.contains("would delete 3 session(s)")
            && out.contains("of 0 deleted session(s)")
            && out.contains("1 expired idempotency key(s)"),
        "{out}"
    );
    assert_eq!(census(&app).await, before, "a dry run writes nothing");

    // The pass: the three old finished sessions go, one event each.
    let (ok, out) = retention_run(&app.db.url, &POLICY, false);
    assert!(ok, "{out}");
    assert!(out.contains("deleted 3 session(s)"), "{out}");
    for id in doomed {
        app.fetch(&format!("/sessions/{id}")).await.expect(404);
        let deleted = app
            .db
            .sql_i64(&format!(
                "SELECT count(*) FROM events WHERE aggregate_id = '{id}' \
                 AND event_type = 'session.deleted' AND metadata->>'actor' = 'retention'"
            ))
            .await;
        assert_eq!(deleted, 1, "one session.deleted for {id}");
    }
    for id in kept {
        let s = app.get(id).await;
        assert_eq!(s["id"], id, "untouched: {s}");
    }
    let messages = app
        .db
        .sql_i64(&format!(
            "SELECT count(*) FROM session_messages WHERE session_id = '{old_done}'"
        ))
        .await;
    assert_eq!(messages, 0, "a deleted session's messages go with it");
    let new_events = app
        .whole_feed()
        .await
        .into_iter()
        .filter(|e| e["position"].as_i64().unwrap() > head)
        .collect::<Vec<_>>();
    assert_eq!(new_events.len(), 3, "{new_events:?}");
    assert!(
        new_events
            .iter()
            .all(|e| e["event_type"] == "session.deleted")
    );
    // Within the grace period the streams stay.
    assert!(events_of(&app, &old_done).await > 1);
    // The expired key is gone, the fresh one stays.
    let keys = app
        .db
        .sql_i64("SELECT count(*) FROM idempotency_keys WHERE key LIKE '% k-old'")
        .await;
    assert_eq!(keys, 0);
    let fresh = create_with_key(&app, "k-new").await.expect(201);
    assert_eq!(
        fresh.header("idempotent-replayed"),
        "true",
        "a fresh key is honoured"
    );

    // After the grace period: purged, and only their streams.
    let kept_events: Vec<i64> =
        futures_util::future::join_all(kept.map(|id| events_of(&app, id))).await;
    age_deletions(&app, 8).await;
    let (ok, out) = retention_run(&app.db.url, &POLICY, true);
    assert!(
        ok && out.contains("would purge the streams of 3 deleted session(s)"),
        "{out}"
    );
    let (ok, out) = retention_run(&app.db.url, &POLICY, false);
    assert!(ok, "{out}");
    assert!(
        out.contains("purged the streams of 3 deleted session(s)"),
        "{out}"
    );
    for id in doomed {
        assert_eq!(events_of(&app, id).await, 0, "{id} purged");
    }
    let after: Vec<i64> = futures_util::future::join_all(kept.map(|id| events_of(&app, id))).await;
    assert_eq!(after, kept_events, "the others' streams are whole");
    let (_, _, tombstones, purged, _) = census(&app).await;
    assert_eq!((tombstones, purged), (3, 3));
    let feed = app.whole_feed().await;
    assert!(
        feed.iter()
            .all(|e| !doomed.contains(&e["aggregate_id"].as_str().unwrap())),
        "the feed holds nothing of the purged sessions"
    );
    let (ok, out) = replay_verify(&app.db.url);
    assert!(ok, "replay --verify after a purge: {out}");

    // An id once held stays refused after its events are gone.
    let refused = app.post("/sessions/import", &exported).await.expect(409);
    assert!(refused.problem().detail.contains(&old_done));
    // A second pass finds nothing more.
    let (ok, out) = retention_run(&app.db.url, &POLICY, false);
    assert!(ok, "{out}");
    assert!(
        out.contains("deleted 0 session(s)") && out.contains("of 0 deleted"),
        "{out}"
    );
    app.teardown().await;
}

/// Nothing deletes events but the purge: the trigger stays on for every
/// other statement, and the purge's exception covers tombstoned sessions only.
#[tokio::test]
async fn only_the_purge_removes_events_and_only_of_deleted_sessions() {
    let app = TestApp::spawn_with(|s| s.retention.sweep_interval_secs = 0).await;
    let live = id_of(&app.create_default().await);
    let gone = id_of(&app.create_default().await);
    app.delete(&gone).await.expect(204);
    let db = app.db.connect().await;
    for (purge_flag, sql) in [
        (
            false,
            format!("DELETE FROM events WHERE aggregate_id = '{gone}'"),
        ),
        (
            true,
            format!("DELETE FROM events WHERE aggregate_id = '{live}'"),
        ),
        (
            true,
            format!("UPDATE events SET payload = '{{}}' WHERE aggregate_id = '{gone}'"),
        ),
        (true, "TRUNCATE events".to_owned()),
    ] {
        let txn = db.begin().await.unwrap();
        if purge_flag {
            txn.execute_unprepared("SET LOCAL agent_sessions.purge = 'on'")
                .await
                .unwrap();
        }
        let err = txn.execute_unprepared(&sql).await;
        assert!(
            err.as_ref()
                .is_err_and(|e| e.to_string().contains("append-only")),
            "{sql}: {err:?}"
        );
        txn.rollback().await.unwrap();
    }
    assert_eq!(events_of(&app, &live).await, 1);
    assert_eq!(events_of(&app, &gone).await, 2);
    db.close().await.ok();
    app.teardown().await;
}

/// A reader that has passed position N never misses an event committed
/// later, while a purge runs between: the purge only removes old events.
#[tokio::test]
async fn the_feed_stays_gap_safe_across_a_purge() {
    let app = TestApp::spawn_with(|s| s.retention.sweep_interval_secs = 0).await;
    let old = session_in(&app, "completed").await;
    let a = id_of(&app.create_default().await);
    let b = id_of(&app.create_default().await);
    app.delete(&old).await.expect(204);
    age_deletions(&app, 8).await;
    let db = app.db.connect().await;
    db.execute_unprepared(&format!(
        "CREATE FUNCTION hold_a() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.aggregate_id = '{a}' THEN PERFORM pg_advisory_xact_lock(4343); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER hold_a BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION hold_a();"
    ))
    .await
    .unwrap();
    let head = app.whole_feed().await.last().unwrap()["position"]
        .as_i64()
        .unwrap();
    let holder = Database::connect(&app.db.url).await.unwrap();
    let lock = holder.begin().await.unwrap();
    lock.execute_unprepared("SELECT pg_advisory_xact_lock(4343)")
        .await
        .unwrap();
    // Writer A takes its position and is held open; B commits after it.
    let writer_a = {
        let (api, a) = (app.api.clone(), a.clone());
        tokio::spawn(async move { api.patch(&a, &json!({"context": {"by": "A"}})).await.status })
    };
    eventually("writer A to be held", Duration::from_secs(10), || async {
        let waiting = app
            .db
            .sql_i64("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            .await;
        (waiting > 0).then_some(())
    })
    .await;
    app.patch(&b, &json!({"context": {"by": "B"}}))
        .await
        .expect(200);
    let (ok, out) = retention_run(&app.db.url, &POLICY, false);
    assert!(ok && out.contains("purged the streams of 1"), "{out}");
    let during = app.get_json(&format!("/events?after={head}")).await;
    assert!(
        during
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["aggregate_id"] != a.as_str()),
        "A is not committed: {during}"
    );
    lock.commit().await.unwrap();
    assert_eq!(writer_a.await.unwrap(), 200);
    let has = |v: &[Value], id: &str| v.iter().any(|e| e["aggregate_id"] == id);
    let later = app
        .get_until(&format!("/events?after={head}"), |v| {
            has(v, &a) && has(v, &b)
        })
        .await;
    assert_eq!(later.len(), 2, "A and B once each: {later:?}");
    assert!(!has(&later, &old));
    db.execute_unprepared("DROP TRIGGER hold_a ON events")
        .await
        .unwrap();
    let (ok, out) = replay_verify(&app.db.url);
    assert!(ok, "{out}");
    db.close().await.ok();
    holder.close().await.ok();
    app.teardown().await;
}

/// An expired key is not honoured even before a sweep removes it: the
/// create runs again as a new one, and the key is taken afresh.
#[tokio::test]
async fn an_expired_idempotency_key_is_not_honoured() {
    let app = TestApp::spawn_with(|s| {
        s.retention.sweep_interval_secs = 0;
        s.retention.idempotency_key_ttl_secs = 3600;
    })
    .await;
    let first = create_with_key(&app, "k1").await.expect(201);
    let again = create_with_key(&app, "k1").await.expect(201);
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(id_of(&again.json()), id_of(&first.json()));
    let db = app.db.connect().await;
    db.execute_unprepared(
        "UPDATE idempotency_keys SET created_at = created_at - interval '2 hours'",
    )
    .await
    .unwrap();
    let fresh = create_with_key(&app, "k1").await.expect(201);
    assert_eq!(fresh.header("idempotent-replayed"), "");
    assert_ne!(id_of(&fresh.json()), id_of(&first.json()));
    // The key now names the new session, and is honoured for it.
    let replay = create_with_key(&app, "k1").await.expect(201);
    assert_eq!(id_of(&replay.json()), id_of(&fresh.json()));
    // Inputs too: an expired key queues the input again.
    let sid = id_of(&first.json());
    let send = |key: &'static str| {
        let app = &app;
        let sid = sid.clone();
        async move {
            app.send(
                app.http
                    .post(app.at(&format!("/sessions/{sid}/input")))
                    .header("idempotency-key", key)
                    .json(&json!({"text": "hello"})),
            )
            .await
        }
    };
    let one = send("i1").await.json();
    assert_eq!(send("i1").await.json()["seq"], one["seq"]);
    db.execute_unprepared(
        "UPDATE idempotency_keys SET created_at = created_at - interval '2 hours'",
    )
    .await
    .unwrap();
    let two = send("i1").await.json();
    assert_ne!(two["seq"], one["seq"], "{one} {two}");
    db.close().await.ok();
    app.teardown().await;
}

/// The sweep in `serve` deletes on its own; a pass runs one at a time (the
/// retention lock held elsewhere turns `retention run` away, writing nothing).
#[tokio::test]
async fn serve_sweeps_by_itself_and_one_pass_runs_at_a_time() {
    let app = TestApp::spawn_with(|s| s.retention.sweep_interval_secs = 0).await;
    let old = session_in(&app, "completed").await;
    age(&app, &[old.as_str()], 40).await;
    let held = LeaderLock::try_acquire(&app.db.url, LeaderRole::Retention)
        .await
        .unwrap()
        .expect("the retention lock is free");
    let (ok, out) = retention_run(&app.db.url, &POLICY, false);
    assert!(!ok && out.contains("another retention pass"), "{out}");
    app.get(&old).await;
    held.release().await;

    // A replica on the same database with the sweep on.
    let mut settings = app.settings.clone();
    settings.retention.sweep_interval_secs = 1;
    settings.retention.delete_after_secs = Some(30 * 86_400);
    let replica = agent_sessions::startup::Application::build(&settings)
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{}", replica.port());
    let stop = replica.stopper();
    let server = tokio::spawn(replica.run_until_stopped());
    let api = crate::support::app::Api::new(&url);
    eventually(
        "the sweep to delete the old session",
        Duration::from_secs(20),
        || async { (api.fetch(&format!("/sessions/{old}")).await.status == 404).then_some(()) },
    )
    .await;
    stop.stop().await;
    let _ = server.await;
    app.teardown().await;
}

#[tokio::test]
async fn bulk_delete_takes_the_list_filters_and_refuses_none() {
    let app = TestApp::spawn_with(|s| {
        s.retention.sweep_interval_secs = 0;
        s.retention.batch_size = 2;
    })
    .await;
    let mut done = Vec::new();
    for _ in 0..5 {
        done.push(session_in(&app, "completed").await);
    }
    let live = session_in(&app, "active").await;
    let other = id_of(
        &app.create_session(&json!({"agent_id": AGENT, "session_type": "other"}))
            .await,
    );
    app.patch(&other, &json!({"status": "completed"}))
        .await
        .expect(200);
    let before = app.counts().await;

    for (query, field) in [
        ("", "query"),
        ("?dry_run=true", "query"),
        ("?status=bogus", "status"),
        ("?updated_before=yesterday", "updated_before"),
        ("?agent_id=nope", "agent_id"),
        ("?status=completed&dry_run=maybe", "dry_run"),
        ("?status=completed&limit=2", "limit"),
        ("?status=completed&session_type=a%00b", "session_type"),
    ] {
        let r = bulk_delete(&app, query).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        let p = r.problem();
        assert!(p.field.as_deref() == Some(field), "{query}: {p:?}");
    }
    assert_eq!(app.counts().await, before, "refused deletes write nothing");

    let dry = bulk_delete(&app, "?status=completed&session_type=task&dry_run=true")
        .await
        .expect(200)
        .json();
    assert_eq!(dry, json!({"dry_run": true, "matched": 5, "deleted": 0}));
    assert_eq!(app.counts().await, before, "a dry run writes nothing");

    // A status named twice matches each session once (it used to match
    // twice, and the second deletion event collided with the first: a 500).
    let res = bulk_delete(&app, "?status=completed,completed&session_type=task")
        .await
        .expect(200)
        .json();
    assert_eq!(res, json!({"dry_run": false, "matched": 5, "deleted": 5}));
    for id in &done {
        app.fetch(&format!("/sessions/{id}")).await.expect(404);
        let n = app
            .db
            .sql_i64(&format!(
                "SELECT count(*) FROM events WHERE aggregate_id = '{id}' AND event_type = 'session.deleted'"
            ))
            .await;
        assert_eq!(n, 1, "each deleted session has its own event");
    }
    app.get(&live).await;
    app.get(&other).await;
    assert_eq!(app.counts().await, (before.0 - 5, before.1 + 5));
    let again = bulk_delete(&app, "?status=completed&session_type=task")
        .await
        .expect(200)
        .json();
    assert_eq!(again["deleted"], 0);
    let (ok, out) = replay_verify(&app.db.url);
    assert!(ok, "{out}");
    app.teardown().await;
}
