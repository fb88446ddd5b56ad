//! The guarantees (`docs/design.md`, "Guarantees"): each is a test that
//! fails when it is broken.

use std::time::Duration;

use agent_sessions::store::Store;
use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};

use crate::support::app::{TestApp, id_of};
use crate::support::serve::replay_verify;
use crate::support::{AGENT, eventually};

/// A mixed workload: creates, updates (some no-ops, some refused), deletes.
async fn workload(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..6 {
        let s = app
            .create_session(&json!({"agent_id": AGENT, "session_type": "task", "context": {"i": i},
                           "checkpoint": if i % 2 == 0 { json!({"step": 0}) } else { Value::Null }}))
            .await;
        ids.push(id_of(&s));
    }
    let tasks = ids.iter().enumerate().map(|(i, id)| async move {
        for step in 0..5 {
            app.patch(id, &json!({"context": {"i": i, "step": step}}))
                .await;
            app.patch(id, &json!({"context": {"i": i, "step": step}}))
                .await; // no-op
            app.patch(
                id,
                &json!({"status": if step % 2 == 0 { "paused" } else { "active" }}),
            )
            .await;
            app.patch(id, &json!({"status": "bogus"})).await; // refused
            app.merge_patch(
                id,
                &json!({"runtime_metadata": {(format!("s{step}")): step}}),
            )
            .await;
        }
    });
    join_all(tasks).await;
    // Live sessions: inputs, a refused interrupt (the session is paused), an
    // approval asked for and decided, and inputs of a session then deleted.
    for (id, text) in [(&ids[2], "first"), (&ids[2], "second"), (&ids[1], "gone")] {
        app.post(&format!("/sessions/{id}/input"), &json!({"text": text}))
            .await
            .expect(202);
    }
    app.post(&format!("/sessions/{}/interrupt", ids[2]), &json!({}))
        .await
        .expect(409);
    app.post(
        &format!("/sessions/{}/approvals", ids[3]),
        &json!({"request_id": "r1", "tool_name": "Bash", "input": {"command": "ls"}, "generation": 1}),
    )
    .await
    .expect(201);
    app.post(
        &format!("/sessions/{}/approvals/r1", ids[3]),
        &json!({"decision": "allow"}),
    )
    .await
    .expect(200);
    app.patch(&ids[0], &json!({"status": "completed"})).await;
    app.patch(&ids[0], &json!({"status": "active"})).await; // illegal
    app.delete(&ids[1]).await;
    ids
}

#[tokio::test]
async fn g1_every_change_has_exactly_one_event_and_versions_are_contiguous() {
    let app = TestApp::spawn().await;
    workload(&app).await;
    // Each live session's version equals its number of events, 1..n without gaps.
    let bad = app
        .db
        .sql_i64(
            "SELECT count(*) FROM sessions s WHERE s.version <> \
               (SELECT count(*) FROM events e WHERE e.aggregate_id = s.id) \
             OR s.version <> (SELECT max(version) FROM events e WHERE e.aggregate_id = s.id)",
        )
        .await;
    assert_eq!(bad, 0, "a session whose version disagrees with its events");
    let gaps = app
        .db
        .sql_i64(
            "SELECT count(*) FROM (SELECT aggregate_id, count(*) c, max(version) m, min(version) lo \
             FROM events GROUP BY aggregate_id) x WHERE c <> m OR lo <> 1",
        )
        .await;
    assert_eq!(gaps, 0, "versions must be 1..n");
    // Exactly the accepted changes: 6 creates + 6×(5 context + 5 status + 5 metadata)
    // + 3 inputs + an approval asked and decided + complete + delete.
    assert_eq!(
        app.db.sql_i64("SELECT count(*) FROM events").await,
        6 + 6 * 15 + 3 + 2 + 2
    );
    assert_eq!(
        app.db.sql_i64("SELECT count(*) FROM events WHERE event_type = 'session.updated' AND payload->'changes' = '{}'::jsonb")
            .await,
        0,
        "no event without a change"
    );
    // The log is append-only.
    let db = app.db.connect().await;
    assert!(
        db.execute_unprepared("UPDATE events SET payload = '{}'")
            .await
            .is_err()
    );
    assert!(db.execute_unprepared("DELETE FROM events").await.is_err());
}

#[tokio::test]
async fn g2_replay_reproduces_the_projection_and_reports_a_hand_edit() {
    let app = TestApp::spawn().await;
    let ids = workload(&app).await;
    let store = Store::from_connection(Database::connect(&app.db.url).await.unwrap());
    let report = store.replay_verify().await.unwrap();
    assert_eq!(report.differences, vec![], "replay after the workload");
    assert_eq!(report.sessions_checked, 6);
    assert_eq!(report.events_read, 6 + 6 * 15 + 3 + 2 + 2);

    // Also through the CLI, as an operator would run it.
    let (ok, out) = replay_verify(&app.db.url);
    assert!(ok, "{out}");

    let db = app.db.connect().await;
    db.execute_unprepared(&format!(
        "UPDATE sessions SET context = '{{\"edited\": true}}' WHERE id = '{}'",
        ids[2]
    ))
    .await
    .unwrap();
    let report = store.replay_verify().await.unwrap();
    assert_eq!(report.differences.len(), 1);
    assert_eq!(report.differences[0].session_id.to_string(), ids[2]);
    assert!(report.differences[0].detail.contains("context"));
    let (ok, out) = replay_verify(&app.db.url);
    assert!(!ok, "replay --verify must fail on a difference");
    assert!(out.contains(&ids[2]), "{out}");
}

/// Writer A's real HTTP write is held open inside its transaction (a
/// test-only trigger waits on an advisory lock the test holds) while writer
/// B commits. The feed must not move past A's slot, and must deliver A once
/// A commits.
#[tokio::test]
async fn g3_feed_never_skips_an_event_that_commits_late() {
    let app = TestApp::spawn().await;
    let a = id_of(&app.create_default().await);
    let b = id_of(&app.create_default().await);
    let db = app.db.connect().await;
    db.execute_unprepared(&format!(
        "CREATE FUNCTION hold_a() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.aggregate_id = '{a}' THEN PERFORM pg_advisory_xact_lock(4242); END IF; \
           IF NEW.aggregate_id = '{a}' AND NEW.payload->'changes'->'context' ? 'fail' THEN \
             RAISE EXCEPTION 'rolled back on purpose'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER hold_a BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION hold_a();"
    ))
    .await
    .unwrap();
    let before = app.feed_with(2).await;
    let head = before.last().unwrap()["position"].as_i64().unwrap();

    // The lock holder: a transaction on its own connection.
    let holder = Database::connect(&app.db.url).await.unwrap();
    let lock = sea_orm::TransactionTrait::begin(&holder).await.unwrap();
    lock.execute_unprepared("SELECT pg_advisory_xact_lock(4242)")
        .await
        .unwrap();

    let writer_a = {
        let (api, a) = (app.api.clone(), a.clone());
        tokio::spawn(async move { api.patch(&a, &json!({"context": {"by": "A"}})).await.status })
    };
    // Wait until A is really inside its transaction (blocked on the lock).
    wait_until(
        &app,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
    )
    .await;
    let res = app.patch(&b, &json!({"context": {"by": "B"}})).await;
    assert_eq!(res.status, 200, "B commits while A is open");

    let first = app.get_json(&format!("/events?after={head}")).await;
    let first = first.as_array().unwrap().clone();
    assert!(
        first.iter().all(|e| e["aggregate_id"] != a.as_str()),
        "A has not committed, so it cannot be in the feed"
    );

    lock.commit().await.unwrap();
    assert_eq!(writer_a.await.unwrap(), 200);
    let has = |v: &[Value], id: &str| v.iter().any(|e| e["aggregate_id"] == id);
    let second = app
        .get_until(&format!("/events?after={head}"), |v| {
            has(v, &a) && has(v, &b)
        })
        .await;
    let ids = |v: &[Value]| {
        v.iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let (first_ids, second_ids) = (ids(&first), ids(&second));
    assert!(
        first_ids.iter().all(|e| second_ids.contains(e)),
        "the second read holds the first"
    );
    // A reader that continued from the first read's last position sees A:
    // if A had been placed below it, this would never hold.
    let resumed_from = first
        .last()
        .map_or(head, |e| e["position"].as_i64().unwrap());
    app.get_until(&format!("/events?after={resumed_from}"), |v| has(v, &a))
        .await;
    let positions: Vec<i64> = app
        .whole_feed()
        .await
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase"
    );

    // A rolled-back writer leaves a gap that never blocks the feed.
    let res = app.patch(&a, &json!({"context": {"fail": true}})).await;
    assert!(
        (500..600).contains(&res.status),
        "the trigger aborts A's transaction"
    );
    app.patch(&b, &json!({"context": {"by": "B", "again": true}}))
        .await;
    // Other tests' open transactions on the cluster can delay it, not hide it.
    app.get_until(
        &format!("/events?session_id={b}&event_type=session.updated"),
        |v| v.len() == 2,
    )
    .await;
}

async fn wait_until(app: &TestApp, count_sql: &str) {
    eventually(count_sql, Duration::from_secs(10), || async {
        (app.db.sql_i64(count_sql).await != 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn g5_stale_if_match_gets_412_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let patch = |if_match: &'static str, body: Value| {
        app.send(
            app.http
                .patch(app.at(&format!("/sessions/{id}")))
                .header("if-match", if_match)
                .json(&body),
        )
    };
    let ok = patch("\"1\"", json!({"context": {"n": 1}})).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("etag"), "\"2\"");
    let stale = patch("\"1\"", json!({"context": {"n": 99}})).await;
    assert_eq!(stale.status, 412);
    assert_eq!(
        stale.problem().kind,
        "urn:agent-sessions:problem:version-mismatch"
    );
    let s = app.get(&id).await;
    assert_eq!(
        (s["version"].clone(), s["context"].clone()),
        (json!(2), json!({"n": 1}))
    );
    assert_eq!(app.counts().await.1, 2);
    let bad = patch("yesterday", json!({"context": {}})).await;
    assert_eq!(bad.status, 400);
}

/// 8 clients increment one counter with read → If-Match write → retry on 412.
#[tokio::test]
async fn g5_concurrent_if_match_increments_lose_no_update() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    const CLIENTS: i64 = 8;
    const EACH: i64 = 15;
    let clients = (0..CLIENTS).map(|_| {
        let app = &app;
        let id = id.clone();
        async move {
            let mut retries = 0;
            for _ in 0..EACH {
                loop {
                    let res = app.fetch(&format!("/sessions/{id}")).await.expect(200);
                    let n = res.json()["context"]["n"].as_i64().unwrap();
                    let res = app
                        .send(
                            app.http
                                .patch(app.at(&format!("/sessions/{id}")))
                                .header("if-match", res.header("etag"))
                                .json(&json!({"context": {"n": n + 1}})),
                        )
                        .await;
                    match res.status {
                        200 => break,
                        412 => retries += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
            }
            retries
        }
    });
    let retries: i64 = join_all(clients).await.into_iter().sum();
    let s = app.get(&id).await;
    assert_eq!(
        s["context"]["n"],
        CLIENTS * EACH,
        "no increment lost ({retries} retries)"
    );
    assert_eq!(s["version"], 1 + CLIENTS * EACH);
}

#[tokio::test]
async fn g6_a_retried_create_with_the_same_key_makes_one_session() {
    let app = TestApp::spawn().await;
    let body = json!({"agent_id": AGENT, "session_type": "task", "context": {"k": 1}});
    let send = |key: &'static str, body: Value| {
        let app = &app;
        async move {
            app.send(
                app.http
                    .post(app.at("/sessions/"))
                    .header("idempotency-key", key)
                    .json(&body),
            )
            .await
        }
    };
    // Concurrent retries of one request.
    let results = join_all((0..8).map(|_| send("key-1", body.clone()))).await;
    let mut ids = Vec::new();
    let mut replays = 0;
    for r in results {
        assert_eq!(r.status, 201);
        replays += r.headers.contains_key("idempotent-replayed") as usize;
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one session for one key");
    assert_eq!(replays, 7);
    assert_eq!(app.counts().await, (1, 1));
    // Same key, another body: refused, nothing written.
    let res = send("key-1", json!({"agent_id": AGENT, "session_type": "other"})).await;
    assert_eq!(res.status, 422);
    assert_eq!(
        res.problem().kind,
        "urn:agent-sessions:problem:idempotency-key-reused"
    );
    // Another key makes another session.
    assert_eq!(send("key-2", body.clone()).await.status, 201);
    assert_eq!(app.counts().await, (2, 2));
    let res = send("", body.clone()).await;
    assert_eq!(res.status, 400);
}

#[tokio::test]
async fn g7_bad_input_gets_a_4xx_problem_and_writes_nothing() {
    let app = spawn_app_limited().await;
    let id = id_of(&app.create_default().await);
    let before = app.counts().await;
    let deep = format!(
        "{{\"agent_id\": \"{AGENT}\", \"session_type\": \"t\", \"context\": {{\"x\": {}1{}}}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let deep_ok_for_serde = format!(
        "{{\"context\": {{\"x\": {}1{}}}}}",
        "[".repeat(70),
        "]".repeat(70)
    );
    let big = format!(
        "{{\"agent_id\": \"{AGENT}\", \"session_type\": \"t\", \"context\": {{\"x\": \"{}\"}}}}",
        "a".repeat(70_000)
    );
    let cases: Vec<(&str, &str, Option<&str>, String, u16)> = vec![
        ("POST", "/sessions/", None, "{".into(), 400),
        ("POST", "/sessions/", None, "".into(), 400),
        ("POST", "/sessions/", None, "[]".into(), 422),
        ("POST", "/sessions/", None, "null".into(), 422),
        (
            "POST",
            "/sessions/",
            None,
            r#"{"session_type": "t"}"#.into(),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            r#"{"agent_id": "nope", "session_type": "t"}"#.into(),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": 5}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": ""}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "status": "running"}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "status": "completed"}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "runtime_backend": "mars"}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "context": []}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "colour": 1}}"#),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(
                r#"{{"agent_id": "{AGENT}", "session_type": "t", "context": {{"a": "x\u0000y"}}}}"#
            ),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(
                r#"{{"agent_id": "{AGENT}", "session_type": "t", "context": {{"a\u0000": 1}}}}"#
            ),
            422,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(
                r#"{{"agent_id": "{AGENT}", "session_type": "t", "context": {{"a": "\ud800"}}}}"#
            ),
            400,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t", "context": {{"a": 1e400}}}}"#),
            400,
        ),
        (
            "POST",
            "/sessions/",
            None,
            format!(r#"{{"agent_id": "{AGENT}", "session_type": "t\u0000"}}"#),
            422,
        ),
        ("POST", "/sessions/", None, deep, 400),
        ("POST", "/sessions/", None, big, 413),
        (
            "POST",
            "/sessions/",
            Some("application/xml"),
            "<a/>".into(),
            415,
        ),
        (
            "POST",
            "/sessions/",
            Some("multipart/form-data"),
            "{}".into(),
            415,
        ),
        ("PATCH", "/sessions/{id}", None, "{".into(), 400),
        ("PATCH", "/sessions/{id}", None, "[1]".into(), 422),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"status": "running"}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"status": null}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"context": null}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"checkpoint": [1]}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"agent_id": "x"}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"whatever": 1}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"runtime_metadata": {"a": "\u0000"}}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            None,
            r#"{"worker": {"prompt": "x", "bogus": 1}}"#.into(),
            422,
        ),
        ("PATCH", "/sessions/{id}", None, deep_ok_for_serde, 400),
        (
            "PATCH",
            "/sessions/{id}",
            Some("application/merge-patch+json"),
            r#"{"context": null}"#.into(),
            422,
        ),
        (
            "PATCH",
            "/sessions/{id}",
            Some("text/html"),
            r#"{"status": "paused"}"#.into(),
            415,
        ),
    ];
    for (method, path, ct, body, expected) in cases {
        let path = path.replace("{id}", &id);
        let mut req = app
            .http
            .request(method.parse().unwrap(), app.at(&path))
            .body(body.clone());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let res = app.send(req).await;
        let short: String = body.chars().take(80).collect();
        assert_eq!(res.status, expected, "{method} {path} {short}");
        res.problem();
    }
    assert_eq!(app.counts().await, before, "nothing written");
    let s = app.get(&id).await;
    assert_eq!(s["version"], 1);
}

async fn spawn_app_limited() -> TestApp {
    TestApp::spawn_with(|s| s.server.body_limit_bytes = 64 * 1024).await
}
