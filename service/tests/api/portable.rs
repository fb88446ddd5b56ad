//! Issue 12 (portable sessions), the service's side: the CLI transcript is
//! stored once per byte however often a chunk is sent; a fork copies a
//! session as of a version (its transcript under the child's id) and leaves
//! the parent as it was but for one event; an export imports into a fresh
//! database as the same session, and a bad document writes nothing.

use serde_json::{Value, json};

use crate::support::AGENT;
use crate::support::app::{Reply, TestApp, id_of};
use crate::support::serve::replay_verify;

/// One transcript line as the CLI writes it.
fn line(session: &str, n: usize) -> String {
    format!(
        "{{\"type\":\"user\",\"uuid\":\"u-{n}\",\"sessionId\":\"{session}\",\"message\":{{\"text\":\"turn {n}\",\"sessionId\":\"kept\"}}}}\n"
    )
}

async fn put(app: &TestApp, id: &str, offset: i64, body: &str) -> Reply {
    app.send(
        app.http
            .put(app.at(&format!("/sessions/{id}/transcript?offset={offset}")))
            .header("content-type", "application/x-ndjson")
            .body(body.to_owned()),
    )
    .await
}

async fn transcript(app: &TestApp, id: &str, query: &str) -> String {
    let r = app
        .fetch(&format!("/sessions/{id}/transcript{query}"))
        .await
        .expect(200);
    assert_eq!(r.header("content-type"), "application/x-ndjson");
    assert_eq!(r.header("x-transcript-length"), r.body.len().to_string());
    r.text()
}

async fn events(app: &TestApp, id: &str) -> Vec<Value> {
    app.get_json(&format!("/sessions/{id}/events?limit=500"))
        .await
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn transcript_uploads_store_every_byte_once_however_they_are_retried() {
    let app = TestApp::spawn_with(|s| s.api.max_transcript_bytes = 4096).await;
    let id = id_of(&app.create_default().await);
    assert_eq!(transcript(&app, &id, "").await, "", "none uploaded yet");
    let (a, b, c) = (line(&id, 1), line(&id, 2), line(&id, 3));
    let ab = format!("{a}{b}");

    let r = put(&app, &id, 0, &a).await.expect(200);
    assert_eq!(r.json()["length"], a.len());
    assert_eq!(r.header("x-transcript-length"), a.len().to_string());
    // The same chunk again, then one that overlaps it and goes on.
    put(&app, &id, 0, &a).await.expect(200);
    let r = put(&app, &id, 0, &ab).await.expect(200);
    assert_eq!(r.json()["length"], ab.len());
    // A retry of the second line alone, and the third from its own offset twice.
    put(&app, &id, a.len() as i64, &b).await.expect(200);
    put(&app, &id, ab.len() as i64, &c).await.expect(200);
    put(&app, &id, ab.len() as i64, &c).await.expect(200);
    let whole = format!("{ab}{c}");
    assert_eq!(transcript(&app, &id, "").await, whole, "every line once");

    // A gap names the stored length, in the problem and in a header.
    let r = put(&app, &id, whole.len() as i64 + 10, &c)
        .await
        .expect(409);
    assert_eq!(r.header("x-transcript-length"), whole.len().to_string());
    let p = r.problem();
    assert!(p.detail.contains(&whole.len().to_string()), "{}", p.detail);
    // An overlap whose bytes differ from the stored ones.
    let other = line(&id, 9);
    let p = put(&app, &id, a.len() as i64, &format!("{other}{c}"))
        .await
        .expect(409)
        .problem();
    assert!(p.detail.contains("conflict"), "{}", p.detail);
    // Past the limit: 413, nothing stored.
    let big = format!("{}\n", "x".repeat(4096));
    put(&app, &id, whole.len() as i64, &big)
        .await
        .expect(413)
        .problem();
    // Not whole lines, not UTF-8 (as octet-stream), a missing offset.
    put(&app, &id, whole.len() as i64, "{\"half\":")
        .await
        .expect(422)
        .problem();
    let r = app
        .send(
            app.http
                .put(app.at(&format!("/sessions/{id}/transcript?offset={}", whole.len())))
                .header("content-type", "application/octet-stream")
                .body(vec![0xff, 0xfe, b'\n']),
        )
        .await;
    r.expect(422).problem();
    app.send(
        app.http
            .put(app.at(&format!("/sessions/{id}/transcript")))
            .body(a.clone()),
    )
    .await
    .expect(400)
    .problem();
    app.send(
        app.http
            .put(app.at(&format!("/sessions/{id}/transcript?offset=0")))
            .header("content-type", "text/html")
            .body(a.clone()),
    )
    .await
    .expect(415)
    .problem();
    assert_eq!(
        transcript(&app, &id, "").await,
        whole,
        "refusals stored nothing"
    );
    assert_eq!(
        app.db
            .sql_i64(&format!(
                "SELECT count(*) FROM session_transcript_chunks WHERE session_id = '{id}'"
            ))
            .await,
        3,
        "one chunk per new piece"
    );
    // Chunks neither append events nor move the version.
    assert_eq!(app.get(&id).await["version"], 1);

    let unknown = "0194a4c2-0000-7000-8000-000000000000";
    put(&app, unknown, 0, &a).await.expect(404).problem();
    app.fetch(&format!("/sessions/{unknown}/transcript"))
        .await
        .expect(404)
        .problem();
    // Deleted with its session.
    app.delete(&id).await.expect(204);
    assert_eq!(
        app.db
            .sql_i64("SELECT count(*) FROM session_transcript_chunks")
            .await,
        0
    );
}

#[tokio::test]
async fn concurrent_duplicate_uploads_store_each_line_once() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let lines: Vec<String> = (0..20).map(|n| line(&id, n)).collect();
    // Each of four uploaders sends every line from its own offset.
    let mut offsets = vec![0i64];
    for l in &lines {
        offsets.push(offsets.last().unwrap() + l.len() as i64);
    }
    let uploader = |_: usize| {
        let (app, id, lines, offsets) = (&app, &id, &lines, &offsets);
        async move {
            for (i, l) in lines.iter().enumerate() {
                put(app, id, offsets[i], l).await.expect(200);
            }
        }
    };
    futures_util::future::join_all((0..4).map(uploader)).await;
    assert_eq!(transcript(&app, &id, "").await, lines.concat());
}

#[tokio::test]
async fn transcript_at_version_returns_what_was_stored_up_to_it() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let (a, b) = (line(&id, 1), line(&id, 2));
    put(&app, &id, 0, &a).await.expect(200); // at version 1
    app.patch(&id, &json!({"context": {"n": 1}}))
        .await
        .expect(200);
    put(&app, &id, a.len() as i64, &b).await.expect(200); // at version 2
    assert_eq!(transcript(&app, &id, "?at_version=1").await, a);
    assert_eq!(
        transcript(&app, &id, "?at_version=2").await,
        format!("{a}{b}")
    );
    assert_eq!(
        transcript(&app, &id, "?at_version=99").await,
        format!("{a}{b}")
    );
    app.fetch(&format!("/sessions/{id}/transcript?at_version=0"))
        .await
        .expect(400)
        .problem();
    app.fetch(&format!("/sessions/{id}/transcript?at_version=x"))
        .await
        .expect(400)
        .problem();
}

/// A parent with history: versions 1 (created), 2 (context n=1, checkpoint
/// step 1) with the first transcript line, 3 (context n=2, checkpoint step
/// 2) with the second, then an input (version 4).
async fn parent_with_history(app: &TestApp) -> (String, String, String) {
    let id = app
        .create_id(&json!({
            "agent_id": AGENT, "session_type": "conversation", "runtime_backend": "local",
            "context": {"n": 0}, "runtime_metadata": {"team": "x"},
            "worker": {"prompt": "hello", "model": "claude-sonnet-4-5"},
        }))
        .await;
    let (a, b) = (line(&id, 1), line(&id, 2));
    app.patch(
        &id,
        &json!({"context": {"n": 1}, "checkpoint": {"step": 1}}),
    )
    .await
    .expect(200);
    put(app, &id, 0, &a).await.expect(200);
    app.patch(
        &id,
        &json!({"context": {"n": 2}, "checkpoint": {"step": 2}}),
    )
    .await
    .expect(200);
    put(app, &id, a.len() as i64, &b).await.expect(200);
    app.post(&format!("/sessions/{id}/input"), &json!({"text": "more"}))
        .await
        .expect(202);
    (id, a, b)
}

#[tokio::test]
async fn a_fork_copies_the_session_as_of_a_version_and_leaves_the_parent_alone() {
    let app = TestApp::spawn().await;
    let (parent, a, b) = parent_with_history(&app).await;
    let before = app.get(&parent).await;
    assert_eq!(before["version"], 4);
    let parent_events = events(&app, &parent).await;

    // At the latest version (the default), paused by default.
    let r = app
        .post(&format!("/sessions/{parent}/fork"), &json!({}))
        .await
        .expect(201);
    let child = r.json();
    let cid = id_of(&child);
    assert_eq!(r.header("location"), format!("/sessions/{cid}"));
    assert_eq!(child["parent_session_id"], parent);
    assert_eq!(
        child["forked_from"],
        json!({"session_id": parent, "version": 4})
    );
    assert_eq!(child["status"], "paused");
    assert_eq!(child["version"], 1);
    assert_eq!(child["context"], json!({"n": 2}));
    assert_eq!(child["checkpoint"], json!({"step": 2}));
    assert_eq!(child["agent_id"], before["agent_id"]);
    assert_eq!(child["session_type"], "conversation");
    assert_eq!(child["runtime_backend"], "local");
    assert_eq!(child["worker"], before["worker"]);
    assert_eq!(child["runtime_metadata"], json!({"team": "x"}));
    assert_eq!(
        transcript(&app, &cid, "").await,
        format!("{a}{b}").replace(&parent, &cid),
        "the transcript under the child's id (only the top-level sessionId)"
    );
    assert!(
        transcript(&app, &cid, "")
            .await
            .contains("\"sessionId\":\"kept\"")
    );
    let created = events(&app, &cid).await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["event_type"], "session.created");
    assert_eq!(
        created[0]["payload"]["forked_from"],
        json!({"session_id": parent, "version": 4})
    );

    // At an earlier version, started, with a worker override.
    let r = app
        .post(
            &format!("/sessions/{parent}/fork"),
            &json!({"at_version": 2, "status": "active", "worker": {"model": "claude-opus-4-1"}}),
        )
        .await
        .expect(201);
    let early = r.json();
    let eid = id_of(&early);
    assert_eq!(
        early["forked_from"],
        json!({"session_id": parent, "version": 2})
    );
    assert_eq!(early["status"], "active");
    assert_eq!(early["context"], json!({"n": 1}));
    assert_eq!(early["checkpoint"], json!({"step": 1}));
    assert_eq!(early["worker"]["model"], "claude-opus-4-1");
    assert_eq!(early["worker"]["prompt"], "hello");
    assert_eq!(
        transcript(&app, &eid, "").await,
        a.replace(&parent, &eid),
        "the transcript as stored up to version 2"
    );

    // The parent: unchanged but for one session.forked per fork.
    let after = app.get(&parent).await;
    assert_eq!(after["version"], 6);
    for field in [
        "context",
        "checkpoint",
        "worker",
        "status",
        "runtime_metadata",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    let now = events(&app, &parent).await;
    assert_eq!(&now[..4], &parent_events[..]);
    assert_eq!(now[4]["event_type"], "session.forked");
    assert_eq!(now[4]["payload"]["child_session_id"], cid);
    assert_eq!(now[4]["payload"]["at_version"], 4);
    assert_eq!(now[5]["payload"]["child_session_id"], eid);
    assert_eq!(now[5]["payload"]["at_version"], 2);
    assert_eq!(transcript(&app, &parent, "").await, format!("{a}{b}"));

    // The children list filter.
    let children = app
        .get_json(&format!("/sessions/?parent_session_id={parent}"))
        .await;
    let ids: Vec<&str> = children
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![eid.as_str(), cid.as_str()], "newest first");
    app.fetch("/sessions/?parent_session_id=nope")
        .await
        .expect(400)
        .problem();
    // The feed filters by the new event type; replay holds.
    let forked = app.get_json("/events?event_type=session.forked").await;
    assert_eq!(forked.as_array().unwrap().len(), 2);
    let (ok, out) = replay_verify(&app.db.url);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn a_refused_fork_writes_nothing() {
    let app = TestApp::spawn().await;
    let (parent, _, _) = parent_with_history(&app).await;
    let counts = app.counts().await;
    let chunks = "SELECT count(*) FROM session_transcript_chunks";
    let stored = app.db.sql_i64(chunks).await;
    for (body, status) in [
        (json!({"at_version": 0}), 422),
        (json!({"at_version": 5}), 422),
        (json!({"at_version": "2"}), 422),
        (json!({"status": "completed"}), 422),
        (json!({"worker": {"model": 7}}), 422),
        (json!({"unknown": 1}), 422),
        (json!([1]), 422),
    ] {
        app.post(&format!("/sessions/{parent}/fork"), &body)
            .await
            .expect(status)
            .problem();
    }
    app.post(
        "/sessions/0194a4c2-0000-7000-8000-000000000000/fork",
        &json!({}),
    )
    .await
    .expect(404)
    .problem();
    assert_eq!(app.counts().await, counts);
    assert_eq!(app.db.sql_i64(chunks).await, stored);
    assert_eq!(app.get(&parent).await["version"], 4);
}

/// A session with every kind of data: events of each kind, messages, an
/// input, a decided approval, a transcript.
async fn rich_session(app: &TestApp) -> String {
    let (id, _, _) = parent_with_history(app).await;
    app.post(
        &format!("/sessions/{id}/messages"),
        &json!([{"type": "assistant", "message": {"content": [{"type": "text", "text": "hi"}]}},
                {"type": "result", "num_turns": 1, "total_cost_usd": 0.01}]),
    )
    .await
    .expect(200);
    app.post(
        &format!("/sessions/{id}/approvals"),
        &json!({"request_id": "r1", "tool_name": "Bash", "input": {"command": "ls"}, "generation": 1}),
    )
    .await
    .expect(201);
    app.post(
        &format!("/sessions/{id}/approvals/r1"),
        &json!({"decision": "allow"}),
    )
    .await
    .expect(200);
    id
}

async fn export(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/sessions/{id}/export")).await
}

async fn import(app: &TestApp, doc: &Value, query: &str) -> Reply {
    app.post(&format!("/sessions/import{query}"), doc).await
}

/// The parts of an event an import keeps.
fn kept(events: &Value) -> Vec<Value> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            json!([
                e["event_id"],
                e["event_type"],
                e["version"],
                e["occurred_at"],
                e["payload"],
                e["metadata"]["actor"]
            ])
        })
        .collect()
}

#[tokio::test]
async fn an_export_imports_into_a_fresh_database_as_the_same_session() {
    let source = TestApp::spawn().await;
    let id = rich_session(&source).await;
    let doc = export(&source, &id).await;
    assert_eq!(doc["format"], "agent-sessions.export");
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["session"], source.get(&id).await);
    assert_eq!(doc["events"].as_array().unwrap().len(), 7);
    assert_eq!(doc["messages"].as_array().unwrap().len(), 2);
    assert_eq!(doc["inputs"].as_array().unwrap().len(), 2);
    assert_eq!(doc["approvals"].as_array().unwrap().len(), 1);
    assert_eq!(doc["transcript"], transcript(&source, &id, "").await);

    let target = TestApp::spawn().await;
    let r = import(&target, &doc, "").await.expect(201);
    assert_eq!(r.header("location"), format!("/sessions/{id}"));
    assert_eq!(r.json(), doc["session"]);
    assert_eq!(target.get(&id).await, doc["session"]);
    let again = export(&target, &id).await;
    assert_eq!(kept(&again["events"]), kept(&doc["events"]));
    for e in again["events"].as_array().unwrap() {
        assert_eq!(e["metadata"]["imported"]["from_session_id"], id);
    }
    for part in [
        "messages",
        "inputs",
        "approvals",
        "transcript",
        "transcript_chunks",
    ] {
        assert_eq!(again[part], doc[part], "{part}");
    }
    assert_eq!(
        transcript(&target, &id, "?at_version=2").await,
        transcript(&source, &id, "?at_version=2").await,
        "the transcript cuts at the same versions"
    );
    // Its events are in the feed like any others.
    let feed = target
        .get_json(&format!("/events?session_id={id}&limit=100"))
        .await;
    assert_eq!(feed.as_array().unwrap().len(), 7);
    let (ok, out) = replay_verify(&target.db.url);
    assert!(ok, "{out}");

    // Again: the id exists.
    let counts = target.counts().await;
    import(&target, &doc, "").await.expect(409).problem();
    assert_eq!(target.counts().await, counts);
    // Under a new id it goes in again, its transcript renamed.
    let r = import(&target, &doc, "?new_id=true").await.expect(201);
    let copy = r.json();
    let cid = id_of(&copy);
    assert_ne!(cid, id);
    assert_eq!(copy["context"], doc["session"]["context"]);
    assert_eq!(copy["version"], doc["session"]["version"]);
    assert_eq!(
        transcript(&target, &cid, "").await,
        doc["transcript"].as_str().unwrap().replace(&id, &cid)
    );
    let (ok, out) = replay_verify(&target.db.url);
    assert!(ok, "{out}");
}

#[tokio::test]
async fn a_tampered_or_truncated_document_is_refused_and_writes_nothing() {
    let source = TestApp::spawn().await;
    let id = rich_session(&source).await;
    let doc = export(&source, &id).await;
    let target = TestApp::spawn().await;
    let counts = target.counts().await;

    let edit = |f: &dyn Fn(&mut Value)| {
        let mut d = doc.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a gap in versions",
            edit(&|d| {
                d["events"].as_array_mut().unwrap().remove(2);
            }),
            "events[2].version",
        ),
        (
            "truncated events",
            edit(&|d| {
                d["events"].as_array_mut().unwrap().truncate(5);
            }),
            "session",
        ),
        (
            "a wrong type",
            edit(&|d| d["messages"] = json!("many")),
            "messages",
        ),
        (
            "a version as a string",
            edit(&|d| d["events"][0]["version"] = json!("1")),
            "events[0].version",
        ),
        (
            "an unknown field",
            edit(&|d| d["extra"] = json!(1)),
            "extra",
        ),
        (
            "an unknown format",
            edit(&|d| d["format"] = json!("other")),
            "format",
        ),
        (
            "a newer format version",
            edit(&|d| d["format_version"] = json!(2)),
            "format_version",
        ),
        (
            "a tampered payload",
            edit(&|d| d["events"][2]["payload"]["changes"]["context"] = json!({"n": 9})),
            "session",
        ),
        (
            "another session's event",
            edit(&|d| d["events"][3]["aggregate_id"] = json!(AGENT)),
            "events[3].aggregate_id",
        ),
        (
            "a tampered session",
            edit(&|d| d["session"]["status"] = json!("completed")),
            "session",
        ),
        (
            "a message gap",
            edit(&|d| {
                d["messages"].as_array_mut().unwrap().remove(0);
            }),
            "messages[0].seq",
        ),
        (
            "an input without its event",
            edit(&|d| d["inputs"][0]["id"] = json!(AGENT)),
            "inputs[0].id",
        ),
        (
            "chunks beyond the transcript",
            edit(&|d| d["transcript_chunks"][1]["offset"] = json!(0)),
            "transcript_chunks[1]",
        ),
    ];
    for (what, bad, field) in cases {
        let p = import(&target, &bad, "").await.expect(422).problem();
        assert_eq!(p.field.as_deref(), Some(field), "{what}: {}", p.detail);
    }
    import(&target, &json!([]), "").await.expect(422).problem();
    target
        .send(
            target
                .http
                .post(target.at("/sessions/import"))
                .header("content-type", "application/json")
                .body("{\"format\":"),
        )
        .await
        .expect(400)
        .problem();
    import(&target, &doc, "?new_id=maybe")
        .await
        .expect(400)
        .problem();
    assert_eq!(target.counts().await, counts, "nothing written");
    for table in [
        "session_messages",
        "session_inputs",
        "session_approvals",
        "session_transcript_chunks",
    ] {
        assert_eq!(
            target
                .db
                .sql_i64(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}"
        );
    }
    // Beyond the import limit.
    let small = TestApp::spawn_with(|s| s.api.max_import_bytes = 2048).await;
    import(&small, &doc, "").await.expect(413).problem();
    assert_eq!(small.counts().await, (0, 0));
    // A document larger than the ordinary body limit is fine here.
    let roomy = TestApp::spawn_with(|s| s.server.body_limit_bytes = 1024).await;
    import(&roomy, &doc, "").await.expect(201);
}

#[tokio::test]
async fn an_import_of_more_events_than_one_transaction_id_holds_keeps_the_feed_in_order() {
    let source = TestApp::spawn().await;
    let id = id_of(&source.create_default().await);
    for n in 1..=2100 {
        source
            .patch(&id, &json!({"context": {"n": n}}))
            .await
            .expect(200);
    }
    let doc = export(&source, &id).await;
    let target = TestApp::spawn().await;
    let before = target.create_default().await;
    import(&target, &doc, "").await.expect(201);
    let after = target.create_default().await;
    let feed = target.whole_feed().await;
    assert_eq!(feed.len(), 2103);
    let positions: Vec<i64> = feed
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let mine: Vec<i64> = feed
        .iter()
        .filter(|e| e["aggregate_id"] == id)
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(mine, (1..=2101).collect::<Vec<_>>(), "in version order");
    assert_eq!(feed[0]["aggregate_id"], before["id"]);
    assert_eq!(feed[2102]["aggregate_id"], after["id"]);
    let (ok, out) = replay_verify(&target.db.url);
    assert!(ok, "{out}");
}
