//! Issue 11 (live sessions), the service's side: inputs and interrupts are
//! queued in order with their events, idempotently and never on a refusal;
//! tool approvals are asked for by the runner and decided once; the message
//! log streams as SSE; lists filter by the worker's state.

use std::time::Duration;

use agent_sessions::auth::hash_token;
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::AGENT;
use crate::support::app::{Reply, TestApp, id_of, read_sse};

/// A person (`alice`) and the runner, each with its own scopes.
async fn secured() -> TestApp {
    TestApp::spawn_with(|s| {
        s.auth.enabled = true;
        s.auth.tokens_json = json!([
            {"subject": "alice", "sha256": hash_token("alice-token"),
             "scopes": ["sessions:read", "sessions:write", "events:read"]},
            {"subject": "runner", "sha256": hash_token("runner-token"),
             "scopes": ["sessions:read", "sessions:run", "events:read"]},
        ])
        .to_string();
        s.auth.rate_limit_per_second = 100_000;
        s.auth.rate_limit_burst = 100_000;
    })
    .await
}

async fn post_as(app: &TestApp, token: &str, path: &str, body: &Value) -> Reply {
    app.send(app.http.post(app.at(path)).bearer_auth(token).json(body))
        .await
}

async fn get_as(app: &TestApp, token: &str, path: &str) -> Reply {
    app.send(app.http.get(app.at(path)).bearer_auth(token))
        .await
}

/// The session's version and its whole input queue: what a refused request
/// must leave as it found.
async fn snapshot(app: &TestApp, id: &str) -> (Value, Value) {
    (
        app.get(id).await["version"].clone(),
        app.get_json(&format!("/sessions/{id}/inputs?limit=500"))
            .await,
    )
}

#[tokio::test]
async fn inputs_are_queued_in_order_each_with_its_event() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let mut accepted = Vec::new();
    for text in ["one", "two", "three"] {
        let r = app
            .post(&format!("/sessions/{id}/input"), &json!({"text": text}))
            .await
            .expect(202)
            .json();
        accepted.push(r);
    }
    let seqs: Vec<i64> = accepted
        .iter()
        .map(|a| a["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let versions: Vec<i64> = accepted
        .iter()
        .map(|a| a["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3, 4], "each input moves the session by one");
    assert!(accepted.iter().all(|a| a["kind"] == "message"));

    let inputs = app.get_json(&format!("/sessions/{id}/inputs")).await;
    let inputs = inputs.as_array().unwrap();
    assert_eq!(inputs.len(), 3);
    for (i, (input, text)) in inputs.iter().zip(["one", "two", "three"]).enumerate() {
        assert_eq!(input["seq"], i as i64 + 1);
        assert_eq!(input["id"], accepted[i]["id"]);
        assert_eq!(input["body"], json!({"text": text}));
        assert_eq!(input["actor"], "anonymous");
    }
    // Pages follow `after`.
    let page = app
        .fetch(&format!("/sessions/{id}/inputs?limit=2"))
        .await
        .expect(200);
    assert!(
        page.header("link").contains("after=2"),
        "{:?}",
        page.headers
    );
    let rest = app
        .get_json(&format!("/sessions/{id}/inputs?after=2"))
        .await;
    assert_eq!(rest.as_array().unwrap().len(), 1);

    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 4);
    for (i, e) in events[1..].iter().enumerate() {
        assert_eq!(e["event_type"], "session.input_received");
        assert_eq!(e["version"], i as i64 + 2);
        assert_eq!(e["payload"]["seq"], i as i64 + 1);
        assert_eq!(e["payload"]["input_id"], accepted[i]["id"]);
        assert_eq!(e["payload"]["kind"], "message");
        assert_eq!(e["payload"]["text"], ["one", "two", "three"][i]);
    }
    // Published like every event, and the session is at the last version.
    app.get_until(
        &format!("/events?session_id={id}&event_type=session.input_received"),
        |page| page.len() == 3,
    )
    .await;
    assert_eq!(app.get(&id).await["version"], 4);
}

#[tokio::test]
async fn an_input_retried_with_its_idempotency_key_is_queued_once() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let send = |key: &'static str, text: &'static str| {
        let app = &app;
        let id = id.clone();
        async move {
            app.send(
                app.http
                    .post(app.at(&format!("/sessions/{id}/input")))
                    .header("idempotency-key", key)
                    .json(&json!({"text": text})),
            )
            .await
        }
    };
    let first = send("k-1", "hello").await.expect(202);
    let again = send("k-1", "hello").await.expect(202);
    assert_eq!(first.json(), again.json(), "the same answer");
    assert_eq!(again.header("idempotent-replayed"), "true");
    // Concurrent retries settle on the one input too.
    let racing = join_all((0..6).map(|_| send("k-2", "racing"))).await;
    let answers: Vec<Value> = racing.into_iter().map(|r| r.expect(202).json()).collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let before = snapshot(&app, &id).await;
    let reused = send("k-1", "something else").await.expect(422);
    assert_eq!(reused.problem().field.as_deref(), Some("Idempotency-Key"));
    assert_eq!(snapshot(&app, &id).await, before);
    let inputs = app.get_json(&format!("/sessions/{id}/inputs")).await;
    assert_eq!(inputs.as_array().unwrap().len(), 2);
    assert_eq!(app.get(&id).await["version"], 3);
}

#[tokio::test]
async fn refused_inputs_are_problems_and_write_nothing() {
    let app = TestApp::spawn_with(|s| s.api.max_input_bytes = 16).await;
    let id = id_of(&app.create_default().await);
    app.post(&format!("/sessions/{id}/input"), &json!({"text": "kept"}))
        .await
        .expect(202);
    let before = snapshot(&app, &id).await;
    let input = format!("/sessions/{id}/input");
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (json!({"text": 5}), 422, Some("text")),
        (json!({"text": "hi", "extra": 1}), 422, None),
        (json!({}), 422, None),
        (json!({"text": "   "}), 422, Some("text")),
        (json!(["text"]), 422, None),
        (json!({"text": "x".repeat(17)}), 413, Some("text")),
        (json!({"text": "nul \u{0}"}), 422, None),
    ];
    for (body, status, field) in cases {
        let r = app.post(&input, &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let p = r.problem();
        if let Some(f) = field {
            assert_eq!(p.field.as_deref(), Some(f), "{body}");
        }
    }
    let malformed = app
        .send(app.http.post(app.at(&input)).body("{\"text\":"))
        .await
        .expect(400);
    malformed.problem();
    let bad_key = app
        .send(
            app.http
                .post(app.at(&input))
                .header("idempotency-key", "")
                .json(&json!({"text": "hi"})),
        )
        .await
        .expect(400);
    bad_key.problem();
    // Interrupts take nothing but an empty body or {}.
    let r = app
        .post(&format!("/sessions/{id}/interrupt"), &json!({"now": true}))
        .await
        .expect(422);
    r.problem();
    assert_eq!(snapshot(&app, &id).await, before, "nothing was written");

    // Unknown sessions: 404, for both.
    let unknown = uuid::Uuid::new_v4();
    for (path, body) in [
        (format!("/sessions/{unknown}/input"), json!({"text": "hi"})),
        (format!("/sessions/{unknown}/interrupt"), json!({})),
        (
            "/sessions/not-a-uuid/input".to_owned(),
            json!({"text": "hi"}),
        ),
    ] {
        app.post(&path, &body).await.expect(404).problem();
    }
    app.fetch(&format!("/sessions/{unknown}/inputs"))
        .await
        .expect(404)
        .problem();

    // An interrupt needs an active session; a completed one takes no input.
    app.patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    let before = snapshot(&app, &id).await;
    let r = app
        .post(&format!("/sessions/{id}/interrupt"), &json!({}))
        .await
        .expect(409);
    assert!(r.problem().detail.contains("paused"));
    assert_eq!(snapshot(&app, &id).await, before);
    // A paused session keeps input for the worker that resumes it.
    app.post(&input, &json!({"text": "later"}))
        .await
        .expect(202);
    app.patch(&id, &json!({"status": "completed"}))
        .await
        .expect(200);
    let before = snapshot(&app, &id).await;
    app.post(&input, &json!({"text": "too late"}))
        .await
        .expect(409)
        .problem();
    assert_eq!(snapshot(&app, &id).await, before);
    app.delete(&id).await.expect(204);
    app.post(&input, &json!({"text": "gone"}))
        .await
        .expect(404)
        .problem();
    assert_eq!(
        app.db
            .sql_i64(&format!(
                "SELECT count(*) FROM session_inputs WHERE session_id = '{id}'"
            ))
            .await,
        0,
        "a deleted session's inputs go with it"
    );
}

#[tokio::test]
async fn an_interrupt_is_queued_for_an_active_session() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let empty = app
        .send(app.http.post(app.at(&format!("/sessions/{id}/interrupt"))))
        .await
        .expect(202)
        .json();
    let braces = app
        .post(&format!("/sessions/{id}/interrupt"), &json!({}))
        .await
        .expect(202)
        .json();
    assert_eq!(
        (empty["seq"].clone(), braces["seq"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(empty["kind"], "interrupt");
    let inputs = app.get_json(&format!("/sessions/{id}/inputs")).await;
    assert_eq!(inputs[0]["kind"], "interrupt");
    assert_eq!(inputs[0]["body"], json!({}));
    let events = app
        .get_json(&format!("/sessions/{id}/events?after_version=1"))
        .await;
    assert_eq!(events[0]["event_type"], "session.interrupted");
    assert_eq!(
        events[0]["payload"],
        json!({"seq": 1, "input_id": empty["id"]})
    );
}

fn approval_request(request_id: &str) -> Value {
    json!({"request_id": request_id, "tool_name": "Bash",
           "input": {"command": "ls -la"}, "generation": 1, "tool_use_id": "toolu_1"})
}

#[tokio::test]
async fn approvals_are_asked_by_the_runner_and_decided_once_by_a_person() {
    let app = secured().await;
    let id = id_of(
        &post_as(
            &app,
            "alice-token",
            "/sessions/",
            &json!({"agent_id": AGENT, "session_type": "t"}),
        )
        .await
        .expect(201)
        .json(),
    );
    let approvals = format!("/sessions/{id}/approvals");
    // Only the runner asks.
    post_as(&app, "alice-token", &approvals, &approval_request("req-1"))
        .await
        .expect(403)
        .problem();
    let asked = post_as(&app, "runner-token", &approvals, &approval_request("req-1"))
        .await
        .expect(201)
        .json();
    assert_eq!(asked["status"], "pending");
    assert_eq!(asked["input"], json!({"command": "ls -la"}));
    let again = post_as(&app, "runner-token", &approvals, &approval_request("req-1"))
        .await
        .expect(200)
        .json();
    assert_eq!(
        again, asked,
        "the same request id answers the stored approval"
    );
    let session = get_as(&app, "alice-token", &format!("/sessions/{id}"))
        .await
        .json();
    assert_eq!(session["version"], 2, "and appends nothing");

    let pending = get_as(&app, "alice-token", &format!("{approvals}?status=pending"))
        .await
        .expect(200)
        .json();
    assert_eq!(pending, json!([asked]));
    get_as(&app, "alice-token", &format!("{approvals}?status=maybe"))
        .await
        .expect(400)
        .problem();

    // Deciding: a deny cannot carry input; unknown ids are 404.
    let decide = format!("{approvals}/req-1");
    post_as(
        &app,
        "alice-token",
        &decide,
        &json!({"decision": "deny", "updated_input": {"command": "ls"}}),
    )
    .await
    .expect(422)
    .problem();
    post_as(
        &app,
        "alice-token",
        &format!("{approvals}/nope"),
        &json!({"decision": "allow"}),
    )
    .await
    .expect(404)
    .problem();
    post_as(&app, "alice-token", &decide, &json!({"decision": "maybe"}))
        .await
        .expect(422)
        .problem();
    let decided = app
        .send(
            app.http
                .post(app.at(&decide))
                .bearer_auth("alice-token")
                .header("x-request-id", "decide-1")
                .json(&json!({"decision": "allow", "message": "fine"})),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(decided["status"], "allowed");
    assert_eq!(decided["decided_by"], "alice");
    assert_eq!(decided["message"], "fine");
    assert!(decided["decided_at"].is_string());
    let second = post_as(&app, "alice-token", &decide, &json!({"decision": "deny"}))
        .await
        .expect(409);
    assert!(second.problem().detail.contains("allowed"));
    let one = get_as(&app, "alice-token", &decide)
        .await
        .expect(200)
        .json();
    assert_eq!(one, decided);
    get_as(&app, "alice-token", &format!("{approvals}/nope"))
        .await
        .expect(404)
        .problem();

    // The decision's event, with its actor, and the answer queued for the
    // worker with the model's own input.
    let events = get_as(&app, "alice-token", &format!("/sessions/{id}/events"))
        .await
        .expect(200)
        .json();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "session.created",
            "session.approval_requested",
            "session.approval_decided"
        ]
    );
    assert_eq!(
        events[1]["payload"],
        json!({"request_id": "req-1", "tool_name": "Bash", "input": {"command": "ls -la"},
               "generation": 1, "tool_use_id": "toolu_1"})
    );
    assert_eq!(events[1]["metadata"]["actor"], "runner");
    let decided_event = &events[2];
    assert_eq!(decided_event["metadata"]["actor"], "alice");
    assert_eq!(decided_event["metadata"]["request_id"], "decide-1");
    assert_eq!(decided_event["payload"]["decision"], "allow");
    assert_eq!(decided_event["payload"]["decided_by"], "alice");
    assert_eq!(decided_event["payload"]["input_seq"], 1);
    let inputs = get_as(&app, "alice-token", &format!("/sessions/{id}/inputs"))
        .await
        .expect(200)
        .json();
    assert_eq!(inputs.as_array().unwrap().len(), 1);
    assert_eq!(inputs[0]["kind"], "approval");
    assert_eq!(inputs[0]["id"], decided_event["payload"]["input_id"]);
    assert_eq!(inputs[0]["actor"], "alice");
    assert_eq!(
        inputs[0]["body"],
        json!({"request_id": "req-1", "decision": "allow", "message": "fine",
               "updated_input": {"command": "ls -la"}})
    );

    // A timeout's default, with an override of the input refused for deny
    // but kept for allow.
    post_as(&app, "runner-token", &approvals, &approval_request("req-2"))
        .await
        .expect(201);
    let timed_out = post_as(
        &app,
        "alice-token",
        &format!("{approvals}/req-2"),
        &json!({"decision": "deny", "reason": "timeout"}),
    )
    .await
    .expect(200)
    .json();
    assert_eq!(
        (timed_out["status"].as_str(), timed_out["reason"].as_str()),
        (Some("denied"), Some("timeout"))
    );
    post_as(&app, "runner-token", &approvals, &approval_request("req-3"))
        .await
        .expect(201);
    post_as(
        &app,
        "alice-token",
        &format!("{approvals}/req-3"),
        &json!({"decision": "allow", "updated_input": {"command": "ls"}}),
    )
    .await
    .expect(200);
    let inputs = get_as(
        &app,
        "alice-token",
        &format!("/sessions/{id}/inputs?after=1"),
    )
    .await
    .expect(200)
    .json();
    assert_eq!(
        inputs[0]["body"],
        json!({"request_id": "req-2", "decision": "deny"})
    );
    assert_eq!(inputs[1]["body"]["updated_input"], json!({"command": "ls"}));
    let allowed = get_as(
        &app,
        "alice-token",
        &format!("{approvals}?status=allowed,denied"),
    )
    .await
    .expect(200)
    .json();
    assert_eq!(allowed.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn concurrent_decisions_make_exactly_one() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let approvals = format!("/sessions/{id}/approvals");
    app.post(&approvals, &approval_request("req-race"))
        .await
        .expect(201);
    let decide = format!("{approvals}/req-race");
    let answers = join_all((0..8).map(|i| {
        let (app, decide) = (&app, decide.clone());
        async move {
            let decision = if i % 2 == 0 { "allow" } else { "deny" };
            app.post(&decide, &json!({"decision": decision})).await
        }
    }))
    .await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409, 409, 409, 409, 409, 409]);
    for r in answers.iter().filter(|r| r.status == 409) {
        r.problem();
    }
    assert_eq!(
        app.db
            .sql_i64("SELECT count(*) FROM events WHERE event_type = 'session.approval_decided'")
            .await,
        1
    );
    assert_eq!(
        app.db
            .sql_i64("SELECT count(*) FROM session_inputs WHERE kind = 'approval'")
            .await,
        1
    );
    assert_eq!(app.get(&id).await["version"], 3);
}

#[tokio::test]
async fn the_message_log_streams_in_order_and_resumes_after_last_event_id() {
    let app = TestApp::spawn_with(|s| s.relay.sse_heartbeat_secs = 1).await;
    let id = id_of(&app.create_default().await);
    let messages = format!("/sessions/{id}/messages");
    let line = |n: i64| json!({"type": "assistant", "n": n});
    app.post(&messages, &json!([line(1), line(2)]))
        .await
        .expect(200);
    let stream = format!("/sessions/{id}/messages/stream");
    let res = app.open(app.http.get(app.at(&stream))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let writer = async {
        for n in 3..=5 {
            app.post(&messages, &json!([line(n)])).await.expect(200);
        }
    };
    let (first, ()) = tokio::join!(read_sse(res, 5), writer);
    let seqs: Vec<i64> = first.iter().map(|(i, _)| *i).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    for (seq, data) in &first {
        assert_eq!(data["seq"], *seq);
        assert_eq!(data["message"], line(*seq));
        assert!(data["created_at"].is_string());
    }

    // Missed while away: exactly those, after Last-Event-ID (or `after`).
    app.post(&messages, &json!([line(6), line(7)]))
        .await
        .expect(200);
    let res = app
        .open(app.http.get(app.at(&stream)).header("last-event-id", "5"))
        .await;
    let resumed = read_sse(res, 2).await;
    assert_eq!(resumed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [6, 7]);
    let res = app
        .open(app.http.get(app.at(&format!("{stream}?after=6"))))
        .await;
    let mut body = res.bytes_stream();
    let mut text = String::new();
    // The 7th, then keep-alives while nothing new comes.
    while !text.contains(": keep-alive") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("a keep-alive in time")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("id: 7\nevent: message\n"), "{text}");
    assert!(!text.contains("id: 6\n"), "{text}");

    let bad = app
        .send(app.http.get(app.at(&stream)).header("last-event-id", "x"))
        .await
        .expect(400);
    bad.problem();
    app.fetch(&format!(
        "/sessions/{}/messages/stream",
        uuid::Uuid::new_v4()
    ))
    .await
    .expect(404)
    .problem();
}

#[tokio::test]
async fn sessions_filter_by_worker_state() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for state in ["idle", "running", "idle"] {
        let id = id_of(&app.create_default().await);
        app.merge_patch(
            &id,
            &json!({"runtime_metadata": {"worker": {"generation": 1, "state": state}}}),
        )
        .await
        .expect(200);
        ids.push(id);
    }
    app.create_default().await; // no worker record at all
    let listed = |q: &'static str| {
        let app = &app;
        async move {
            let page = app.get_json(&format!("/sessions/?{q}")).await;
            let mut got: Vec<String> = page.as_array().unwrap().iter().map(id_of).collect();
            got.sort();
            got
        }
    };
    let mut idle = vec![ids[0].clone(), ids[2].clone()];
    idle.sort();
    assert_eq!(listed("worker_state=idle").await, idle);
    let mut both = ids.clone();
    both.sort();
    assert_eq!(listed("worker_state=idle,running").await, both);
    assert_eq!(listed("worker_state=exited").await, Vec::<String>::new());
    let r = app
        .fetch("/sessions/?worker_state=napping")
        .await
        .expect(400);
    assert_eq!(r.problem().field.as_deref(), Some("worker_state"));
}
