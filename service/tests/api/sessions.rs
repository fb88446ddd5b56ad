//! The seed-003 contract and its extensions, endpoint by endpoint.

use serde_json::{Value, json};

use crate::support::AGENT;
use crate::support::app::{TestApp, id_of};

/// The seed's curl examples send `-d` bodies, which curl labels
/// `application/x-www-form-urlencoded`; some send no `-H` at all.
#[tokio::test]
async fn seed_examples_work_with_the_content_types_curl_sends() {
    let app = TestApp::spawn().await;
    let res = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .header("content-type", "application/json")
                .body(r#"{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "development",
                 "context": {"working_directory": "/project", "files_open": ["SteamModal.tsx"]},
                 "runtime_backend": "local", "runtime_metadata": {"terminal_id": "term-123", "pid": 12345}}"#),
        )
        .await
        .expect(201);
    assert_eq!(res.header("etag"), "\"1\"");
    let s = res.json();
    assert_eq!(
        res.header("location"),
        format!("/sessions/{}", s["id"].as_str().unwrap())
    );
    assert_eq!(s["status"], "active");
    assert_eq!(s["runtime_backend"], "local");
    assert_eq!(s["checkpoint"], Value::Null);
    let id = s["id"].as_str().unwrap();

    // No content type given explicitly: curl sends form-urlencoded.
    for (body, check) in [
        (r#"{"status": "paused"}"#, ("status", json!("paused"))),
        (r#"{"status": "active"}"#, ("status", json!("active"))),
        (
            r#"{"checkpoint": {"step": 5, "state": {"files": ["a.ts"]}, "resume_prompt": "Continue from step 5"}}"#,
            (
                "checkpoint",
                json!({"step": 5, "state": {"files": ["a.ts"]}, "resume_prompt": "Continue from step 5"}),
            ),
        ),
        (r#"{"status": "completed"}"#, ("status", json!("completed"))),
    ] {
        let res = app
            .send(
                app.http
                    .patch(app.at(&format!("/sessions/{id}")))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await;
        assert_eq!(res.status, 200, "{body}");
        assert_eq!(res.json()[check.0], check.1);
    }
    // And with no Content-Type header at all.
    let other = app.create_default().await;
    let res = app
        .send(
            app.http
                .patch(app.at(&format!("/sessions/{}", other["id"].as_str().unwrap())))
                .body(r#"{"status": "crashed"}"#),
        )
        .await;
    assert_eq!(res.status, 200);

    // Conversation example: no runtime_backend → unknown.
    let conv = app
        .create_session(&json!({"agent_id": AGENT, "session_type": "conversation",
                       "context": {"user_id": "user-456", "topic": "code review", "message_count": 0}}))
        .await;
    assert_eq!(conv["runtime_backend"], "unknown");
    assert_eq!(conv["runtime_metadata"], json!({}));

    let list = app
        .get_json(&format!("/sessions/?agent_id={AGENT}&limit=10"))
        .await;
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[0]["id"], conv["id"], "newest first");
    let got = app.get(id).await;
    assert_eq!(got["status"], "completed");
    assert_eq!(got["version"], 5);
}

#[tokio::test]
async fn plain_patch_replaces_and_merge_patch_merges() {
    let app = TestApp::spawn().await;
    let s = app
        .create_session(
            &json!({"agent_id": AGENT, "session_type": "task", "context": {"a": 1, "b": {"c": 2}}}),
        )
        .await;
    let id = s["id"].as_str().unwrap();
    let merged = app
        .merge_patch(
            id,
            &json!({"context": {"a": null, "b": {"d": 3}}, "checkpoint": {"step": 1}}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(merged["context"], json!({"b": {"c": 2, "d": 3}}));
    assert_eq!(merged["checkpoint"], json!({"step": 1}));
    let replaced = app
        .patch(id, &json!({"context": {"z": true}}))
        .await
        .expect(200)
        .json();
    assert_eq!(replaced["context"], json!({"z": true}));
    assert_eq!(
        replaced["checkpoint"],
        json!({"step": 1}),
        "unnamed fields stay"
    );
    let cleared = app
        .patch(id, &json!({"checkpoint": null}))
        .await
        .expect(200)
        .json();
    assert_eq!(cleared["checkpoint"], Value::Null);
}

#[tokio::test]
async fn a_patch_that_changes_nothing_appends_no_event() {
    let app = TestApp::spawn().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .patch(id, &json!({"status": "active", "context": {"n": 0}}))
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("etag"), "\"1\"");
    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    assert_eq!(events.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn illegal_transitions_are_409_naming_from_and_to() {
    let app = TestApp::spawn().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    app.patch(id, &json!({"status": "completed"}))
        .await
        .expect(200);
    let p = app
        .patch(id, &json!({"status": "active"}))
        .await
        .expect(409)
        .problem();
    assert_eq!(p.kind, "urn:agent-sessions:problem:illegal-transition");
    assert_eq!(p.field.as_deref(), Some("status"), "{p:?}");
    assert_eq!(p.errors[0].field, "status", "{p:?}");
    assert!(
        p.detail.contains("completed") && p.detail.contains("active"),
        "{}",
        p.detail
    );
}

#[tokio::test]
async fn delete_appends_an_event_and_the_stream_stays_readable() {
    let app = TestApp::spawn().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .send(
            app.http
                .delete(app.at(&format!("/sessions/{id}")))
                .header("if-match", "\"7\""),
        )
        .await;
    assert_eq!(res.status, 412);
    let res = app.delete(&format!("{id}/")).await;
    assert_eq!(res.status, 204);
    assert_eq!(app.fetch(&format!("/sessions/{id}")).await.status, 404);
    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["session.created", "session.deleted"]);
    assert_eq!(events[1]["version"], 2);
    assert_eq!(events[1]["payload"]["agent_id"], AGENT);
    assert_eq!(app.delete(id).await.status, 404);
}

#[tokio::test]
async fn list_filters_and_paginates_with_a_keyset_cursor() {
    let app = TestApp::spawn().await;
    let other_agent = "11111111-2222-3333-4444-555555555555";
    let mut ids = Vec::new();
    for i in 0..7 {
        let s = app
            .create_session(
                &json!({"agent_id": if i % 2 == 0 { AGENT } else { other_agent },
                           "session_type": if i < 4 { "task" } else { "batch" },
                           "runtime_backend": if i == 6 { "kubernetes" } else { "local" }}),
            )
            .await;
        ids.push(id_of(&s));
    }
    app.patch(&ids[1], &json!({"status": "paused"})).await;
    app.patch(&ids[2], &json!({"status": "crashed"})).await;

    // Page through everything, two at a time, following Link.
    let mut seen = Vec::new();
    let mut next = Some("/sessions/?limit=2".to_owned());
    while let Some(path) = next {
        let res = app.fetch(&path).await.expect(200);
        next = res.headers.get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""));
            l[1..l.find('>').unwrap()].to_owned()
        });
        let page: Vec<Value> = res.parse();
        seen.extend(page.into_iter().map(|s| id_of(&s)));
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "newest first, each once");

    let q = |path: &str| {
        let path = path.to_owned();
        let app = &app;
        async move {
            app.get_json(&path)
                .await
                .as_array()
                .unwrap()
                .iter()
                .map(id_of)
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(
        q(&format!("/sessions?agent_id={other_agent}")).await,
        [ids[5].as_str(), ids[3].as_str(), ids[1].as_str()]
    );
    assert_eq!(
        q("/sessions/?status=paused,crashed").await,
        [ids[2].as_str(), ids[1].as_str()]
    );
    assert_eq!(
        q("/sessions/?status=crashed,paused,crashed").await,
        [ids[2].as_str(), ids[1].as_str()],
        "a status named twice lists each session once"
    );
    assert_eq!(
        q("/sessions/?session_type=batch&runtime_backend=local").await,
        [ids[5].as_str(), ids[4].as_str()]
    );
    assert_eq!(
        q("/sessions/?runtime_backend=kubernetes").await,
        [ids[6].as_str()]
    );
    let mid = app.get(&ids[3]).await;
    let t = mid["created_at"].as_str().unwrap().replace('+', "%2B");
    assert_eq!(
        q(&format!("/sessions/?created_before={t}")).await,
        [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );
    assert_eq!(
        q(&format!("/sessions/?created_after={t}&limit=2")).await,
        [ids[6].as_str(), ids[5].as_str()]
    );
    let updated = app.get(&ids[2]).await["updated_at"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        q(&format!("/sessions/?updated_after={updated}")).await,
        [ids[2].as_str()]
    );

    for bad in [
        "limit=0",
        "limit=100000",
        "limit=x",
        "status=running",
        "agent_id=nope",
        "runtime_backend=mars",
        "cursor=zzz",
        "created_after=yesterday",
        "has_worker=maybe",
    ] {
        let p = app
            .fetch(&format!("/sessions/?{bad}"))
            .await
            .expect(400)
            .problem();
        assert!(p.field.is_some(), "{bad}: {p:?}");
    }
}

/// A list copies the stored documents instead of rebuilding them
/// (docs/design.md, session pages): each item must still be the value a GET
/// of the session answers, whatever the documents hold.
#[tokio::test]
async fn a_listed_session_is_the_value_get_answers() {
    let app = TestApp::spawn().await;
    let rich = json!({
        "text": "quote \" backslash \\ tab \t newline \n control \u{1} é \u{2603} \u{1f680}",
        "nested": {"b": [1, 2.5, -0.125, 1e-7, 12345678901234_i64, true, null], "a": {}},
        "empty": [], "zero": 0, "big": 9007199254740993_i64
    });
    let plain = app.create_default().await;
    let documented = app
        .create_session(
            &json!({"agent_id": AGENT, "session_type": "task", "runtime_backend": "local",
                       "context": rich, "checkpoint": {"step": 3, "notes": ["ü", ""]},
                       "runtime_metadata": {"owner": "ops", "labels": {"z": 1, "a": 2}},
                       "worker": {"prompt": "fix it", "max_turns": 3}}),
        )
        .await;
    app.patch(&id_of(&documented), &json!({"status": "paused"}))
        .await
        .expect(200);
    let fork = app
        .post(
            &format!("/sessions/{}/fork", id_of(&documented)),
            &json!({}),
        )
        .await
        .expect(201)
        .json();

    let listed = app.get_json("/sessions/?limit=10").await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3);
    for item in listed {
        let id = id_of(item);
        assert_eq!(item, &app.get(&id).await, "session {id}");
    }
    let ids: Vec<String> = listed.iter().map(id_of).collect();
    assert_eq!(ids, [id_of(&fork), id_of(&documented), id_of(&plain)]);
    assert_eq!(listed[1]["context"], rich);
    assert!(listed[2]["checkpoint"].is_null());
    assert_eq!(listed[0]["forked_from"]["session_id"], id_of(&documented));
}

#[tokio::test]
async fn get_supports_etags_and_unknown_ids_are_404_problems() {
    let app = TestApp::spawn().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .send(
            app.http
                .get(app.at(&format!("/sessions/{id}")))
                .header("if-none-match", "\"1\""),
        )
        .await;
    assert_eq!(res.status, 304);
    for path in [
        "/sessions/660e8400-e29b-41d4-a716-446655440001",
        "/sessions/not-a-uuid",
        "/nowhere",
        "/sessions/660e8400-e29b-41d4-a716-446655440001/events",
    ] {
        let res = app.fetch(path).await;
        assert_eq!(res.status, 404, "{path}");
        res.problem();
    }
    let res = app.send(app.http.put(app.at("/sessions/"))).await;
    assert_eq!(res.status, 405);
    res.problem();
}

#[tokio::test]
async fn events_carry_the_seed_shape_plus_changes_and_metadata() {
    let app = TestApp::spawn().await;
    let s = app
        .create_session(
            &json!({"agent_id": AGENT, "session_type": "development", "runtime_backend": "local"}),
        )
        .await;
    let id = s["id"].as_str().unwrap();
    app.send(
        app.http
            .patch(app.at(&format!("/sessions/{id}")))
            .header("x-request-id", "req-abc-123")
            .json(&json!({"status": "paused", "checkpoint": {"step": 5}})),
    )
    .await
    .expect(200);
    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    let created = &events[0];
    assert_eq!(created["event_type"], "session.created");
    assert_eq!(created["aggregate_type"], "session");
    assert_eq!(created["aggregate_id"], id);
    assert_eq!(created["version"], 1);
    assert_eq!(created["payload"]["agent_id"], AGENT);
    assert_eq!(created["payload"]["session_type"], "development");
    assert_eq!(created["payload"]["runtime_backend"], "local");
    assert_eq!(created["payload"]["changes"]["status"], "active");
    let updated = &events[1];
    assert_eq!(
        updated["payload"],
        json!({
            "agent_id": AGENT, "status": "paused", "updates": ["checkpoint", "status"],
            "changes": {"status": "paused", "checkpoint": {"step": 5}}
        })
    );
    assert_eq!(updated["metadata"]["request_id"], "req-abc-123");
    assert_eq!(updated["metadata"]["actor"], "anonymous");
    assert!(updated["position"].as_i64().unwrap() > created["position"].as_i64().unwrap());

    let feed = app
        .get_until("/events?event_type=session.updated", |v| !v.is_empty())
        .await;
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0]["event_id"], updated["event_id"]);
    let feed = app
        .get_until(&format!("/events?session_id={id}&limit=1"), |v| {
            !v.is_empty()
        })
        .await;
    assert_eq!(feed.len(), 1);
    let page = app
        .get_json(&format!("/sessions/{id}/events?after_version=1"))
        .await;
    assert_eq!(page[0]["version"], 2);
    for bad in [
        "/events?after=-1",
        "/events?limit=0",
        "/events?event_type=x",
        "/events?session_id=1",
    ] {
        assert_eq!(app.fetch(bad).await.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn worker_spec_is_validated_stored_and_returned() {
    let app = TestApp::spawn().await;
    let s = app
        .create_session(&json!({"agent_id": AGENT, "session_type": "task", "runtime_backend": "local",
                       "worker": {"prompt": "fix it", "max_turns": 3, "restart_policy": {"max_restarts": 1}}}))
        .await;
    assert_eq!(s["worker"]["prompt"], "fix it");
    assert_eq!(
        s["worker"]["restart_policy"]["backoff_ms"], 1000,
        "defaults are filled in"
    );
    for (worker, field) in [
        (json!({"prompt": ""}), "worker.prompt"),
        (
            json!({"prompt": "x", "env": {"ANTHROPIC_API_KEY": "k"}}),
            "worker.env",
        ),
        (
            json!({"prompt": "x", "working_directory": "../../etc"}),
            "worker.working_directory",
        ),
        (
            json!({"prompt": "x", "max_budget_usd": -1}),
            "worker.max_budget_usd",
        ),
        (json!({"max_turns": 2}), "worker.prompt"),
        (json!({"prompt": "x", "promt": "y"}), "worker.promt"),
        (
            json!({"prompt": "x", "restart_policy": {"on": ["oom", "gremlins"]}}),
            "worker.restart_policy.on[1]",
        ),
    ] {
        let p = app
            .post(
                "/sessions/",
                &json!({"agent_id": AGENT, "session_type": "task", "worker": worker}),
            )
            .await
            .expect(422)
            .problem();
        assert_eq!(p.field.as_deref(), Some(field), "{worker}");
    }
    let s = app
        .merge_patch(
            s["id"].as_str().unwrap(),
            &json!({"worker": {"max_turns": 9}}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(s["worker"]["max_turns"], 9);
    assert_eq!(s["worker"]["prompt"], "fix it");
}

#[tokio::test]
async fn a_missing_required_field_is_named() {
    let app = TestApp::spawn().await;
    for (body, field) in [
        (json!({"session_type": "task"}), "agent_id"),
        (json!({"agent_id": AGENT}), "session_type"),
    ] {
        let p = app.post("/sessions/", &body).await.expect(422).problem();
        assert_eq!(p.kind, "urn:agent-sessions:problem:validation");
        assert_eq!(p.field.as_deref(), Some(field), "{p:?}");
        assert_eq!(p.errors[0].field, field, "{p:?}");
    }
    assert_eq!(app.counts().await, (0, 0), "nothing was written");
}

/// `If-Match` uses the strong comparison (RFC 9110): a weak tag never
/// matches, not even the session's own version.
#[tokio::test]
async fn a_weak_if_match_is_a_412_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let send = |method: reqwest::Method, tag: &'static str, target: String| {
        app.send(
            app.http
                .request(method, app.at(&format!("/sessions/{target}")))
                .header("if-match", tag)
                .json(&json!({"status": "paused"})),
        )
    };
    for method in [reqwest::Method::PATCH, reqwest::Method::DELETE] {
        let res = send(method.clone(), "W/\"1\"", id.clone()).await;
        assert_eq!(res.status, 412, "{method}");
        let p = res.problem();
        assert_eq!(p.kind, "urn:agent-sessions:problem:version-mismatch");
        assert_eq!(p.field.as_deref(), Some("If-Match"), "{p:?}");
    }
    let after = app.get(&id).await;
    assert_eq!(
        (after["version"].as_i64(), after["status"].as_str()),
        (Some(1), Some("active"))
    );
    assert_eq!(app.counts().await, (1, 1), "no event appended");

    // A session that does not exist stays a 404 whatever the tag.
    let missing = "660e8400-e29b-41d4-a716-446655440001".to_owned();
    let res = send(reqwest::Method::PATCH, "W/\"1\"", missing).await;
    assert_eq!(res.status, 404);
    // The strong tag of the same version applies.
    let res = send(reqwest::Method::PATCH, "\"1\"", id.clone()).await;
    assert_eq!(res.status, 200);
    assert_eq!(res.header("etag"), "\"2\"");
}

/// `If-None-Match` uses the weak comparison: `*`, the tag, or its weak form
/// answer 304; another version answers the session.
#[tokio::test]
async fn if_none_match_answers_304_only_for_the_current_version() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    app.patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    for (tag, status) in [
        ("\"2\"", 304),
        ("W/\"2\"", 304),
        ("*", 304),
        ("\"1\", \"2\"", 304),
        ("\"1\"", 200),
        ("W/\"3\"", 200),
    ] {
        let res = app
            .send(
                app.http
                    .get(app.at(&format!("/sessions/{id}")))
                    .header("if-none-match", tag),
            )
            .await;
        assert_eq!(res.status, status, "{tag}");
        assert_eq!(res.header("etag"), "\"2\"", "{tag}");
        if status == 304 {
            assert!(res.body.is_empty(), "{tag}");
        } else {
            assert_eq!(res.json()["version"], 2, "{tag}");
        }
    }
}

#[tokio::test]
async fn an_unsupported_content_type_names_the_header() {
    let app = TestApp::spawn().await;
    let p = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .header("content-type", "application/xml")
                .body("<a/>"),
        )
        .await
        .expect(415)
        .problem();
    assert_eq!(p.field.as_deref(), Some("Content-Type"), "{p:?}");
}

/// Retrying a create whose session was since deleted is a 409 that names
/// the key, not a second session.
#[tokio::test]
async fn a_key_whose_session_was_deleted_is_a_409_naming_the_key() {
    let app = TestApp::spawn().await;
    let body = json!({"agent_id": AGENT, "session_type": "task"});
    let create = || {
        app.send(
            app.http
                .post(app.at("/sessions/"))
                .header("idempotency-key", "gone-1")
                .json(&body),
        )
    };
    let first = create().await.expect(201).json();
    let id = id_of(&first);
    app.send(app.http.delete(app.at(&format!("/sessions/{id}"))))
        .await
        .expect(204);
    let p = create().await.expect(409).problem();
    assert_eq!(p.field.as_deref(), Some("Idempotency-Key"), "{p:?}");
    assert_eq!(
        app.counts().await,
        (0, 2),
        "created and deleted, nothing more"
    );
}
