//! The seed-003 contract and its extensions, endpoint by endpoint.

use serde_json::{Value, json};

use crate::helpers::{AGENT, problem, spawn_app};

/// The seed's curl examples send `-d` bodies, which curl labels
/// `application/x-www-form-urlencoded`; some send no `-H` at all.
#[tokio::test]
async fn seed_examples_work_with_the_content_types_curl_sends() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/sessions/"))
        .header("content-type", "application/json")
        .body(r#"{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "development",
                 "context": {"working_directory": "/project", "files_open": ["SteamModal.tsx"]},
                 "runtime_backend": "local", "runtime_metadata": {"terminal_id": "term-123", "pid": 12345}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(res.headers()["etag"], "\"1\"");
    let s: Value = res.json().await.unwrap();
    assert_eq!(location, format!("/sessions/{}", s["id"].as_str().unwrap()));
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
            .client
            .patch(app.url(&format!("/sessions/{id}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{body}");
        let s: Value = res.json().await.unwrap();
        assert_eq!(s[check.0], check.1);
    }
    // And with no Content-Type header at all.
    let other = app.create_default().await;
    let res = app
        .client
        .patch(app.url(&format!("/sessions/{}", other["id"].as_str().unwrap())))
        .body(r#"{"status": "crashed"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Conversation example: no runtime_backend → unknown.
    let conv = app
        .create(json!({"agent_id": AGENT, "session_type": "conversation",
                       "context": {"user_id": "user-456", "topic": "code review", "message_count": 0}}))
        .await;
    assert_eq!(conv["runtime_backend"], "unknown");
    assert_eq!(conv["runtime_metadata"], json!({}));

    let list = app
        .get_json(&format!("/sessions/?agent_id={AGENT}&limit=10"))
        .await;
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[0]["id"], conv["id"], "newest first");
    let got = app.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(got["status"], "completed");
    assert_eq!(got["version"], 5);
}

#[tokio::test]
async fn plain_patch_replaces_and_merge_patch_merges() {
    let app = spawn_app().await;
    let s = app
        .create(
            json!({"agent_id": AGENT, "session_type": "task", "context": {"a": 1, "b": {"c": 2}}}),
        )
        .await;
    let id = s["id"].as_str().unwrap();
    let merged: Value = app
        .client
        .patch(app.url(&format!("/sessions/{id}")))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"context": {"a": null, "b": {"d": 3}}, "checkpoint": {"step": 1}}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(merged["context"], json!({"b": {"c": 2, "d": 3}}));
    assert_eq!(merged["checkpoint"], json!({"step": 1}));
    let replaced: Value = app
        .patch(id, &json!({"context": {"z": true}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replaced["context"], json!({"z": true}));
    assert_eq!(
        replaced["checkpoint"],
        json!({"step": 1}),
        "unnamed fields stay"
    );
    let cleared: Value = app
        .patch(id, &json!({"checkpoint": null}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["checkpoint"], Value::Null);
}

#[tokio::test]
async fn a_patch_that_changes_nothing_appends_no_event() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .patch(id, &json!({"status": "active", "context": {"n": 0}}))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"1\"");
    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    assert_eq!(events.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn illegal_transitions_are_409_naming_from_and_to() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(
        app.patch(id, &json!({"status": "completed"}))
            .await
            .status(),
        200
    );
    let res = app.patch(id, &json!({"status": "active"})).await;
    assert_eq!(res.status(), 409);
    let p = problem(res).await;
    assert_eq!(p["type"], "urn:agent-sessions:problem:illegal-transition");
    assert_eq!(p["field"], "status", "{p}");
    assert_eq!(p["errors"][0]["field"], "status", "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("completed") && detail.contains("active"),
        "{detail}"
    );
}

#[tokio::test]
async fn delete_appends_an_event_and_the_stream_stays_readable() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .client
        .delete(app.url(&format!("/sessions/{id}")))
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    let res = app
        .client
        .delete(app.url(&format!("/sessions/{id}/")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(app.get(&format!("/sessions/{id}")).await.status(), 404);
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
    let res = app
        .client
        .delete(app.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn list_filters_and_paginates_with_a_keyset_cursor() {
    let app = spawn_app().await;
    let other_agent = "11111111-2222-3333-4444-555555555555";
    let mut ids = Vec::new();
    for i in 0..7 {
        let s = app
            .create(
                json!({"agent_id": if i % 2 == 0 { AGENT } else { other_agent },
                           "session_type": if i < 4 { "task" } else { "batch" },
                           "runtime_backend": if i == 6 { "kubernetes" } else { "local" }}),
            )
            .await;
        ids.push(s["id"].as_str().unwrap().to_owned());
    }
    app.patch(&ids[1], &json!({"status": "paused"})).await;
    app.patch(&ids[2], &json!({"status": "crashed"})).await;

    // Page through everything, two at a time, following Link.
    let mut seen = Vec::new();
    let mut next = Some("/sessions/?limit=2".to_owned());
    while let Some(path) = next {
        let res = app.get(&path).await;
        assert_eq!(res.status(), 200);
        next = res.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with("; rel=\"next\""));
            l[1..l.find('>').unwrap()].to_owned()
        });
        let page: Vec<Value> = res.json().await.unwrap();
        seen.extend(
            page.into_iter()
                .map(|s| s["id"].as_str().unwrap().to_owned()),
        );
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
                .map(|s| s["id"].as_str().unwrap().to_owned())
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
        q("/sessions/?session_type=batch&runtime_backend=local").await,
        [ids[5].as_str(), ids[4].as_str()]
    );
    assert_eq!(
        q("/sessions/?runtime_backend=kubernetes").await,
        [ids[6].as_str()]
    );
    let mid = app.get_json(&format!("/sessions/{}", ids[3])).await;
    let t = mid["created_at"].as_str().unwrap().replace('+', "%2B");
    assert_eq!(
        q(&format!("/sessions/?created_before={t}")).await,
        [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]
    );
    assert_eq!(
        q(&format!("/sessions/?created_after={t}&limit=2")).await,
        [ids[6].as_str(), ids[5].as_str()]
    );
    let updated = app.get_json(&format!("/sessions/{}", ids[2])).await["updated_at"]
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
        let res = app.get(&format!("/sessions/?{bad}")).await;
        assert_eq!(res.status(), 400, "{bad}");
        let p = problem(res).await;
        assert!(p["field"].is_string(), "{bad}: {p}");
    }
}

#[tokio::test]
async fn get_supports_etags_and_unknown_ids_are_404_problems() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let res = app
        .client
        .get(app.url(&format!("/sessions/{id}")))
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    for path in [
        "/sessions/660e8400-e29b-41d4-a716-446655440001",
        "/sessions/not-a-uuid",
        "/nowhere",
        "/sessions/660e8400-e29b-41d4-a716-446655440001/events",
    ] {
        let res = app.get(path).await;
        assert_eq!(res.status(), 404, "{path}");
        problem(res).await;
    }
    let res = app.client.put(app.url("/sessions/")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    problem(res).await;
}

#[tokio::test]
async fn events_carry_the_seed_shape_plus_changes_and_metadata() {
    let app = spawn_app().await;
    let s = app
        .create(
            json!({"agent_id": AGENT, "session_type": "development", "runtime_backend": "local"}),
        )
        .await;
    let id = s["id"].as_str().unwrap();
    app.client
        .patch(app.url(&format!("/sessions/{id}")))
        .header("x-request-id", "req-abc-123")
        .json(&json!({"status": "paused", "checkpoint": {"step": 5}}))
        .send()
        .await
        .unwrap();
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
        assert_eq!(app.get(bad).await.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn worker_spec_is_validated_stored_and_returned() {
    let app = spawn_app().await;
    let s = app
        .create(json!({"agent_id": AGENT, "session_type": "task", "runtime_backend": "local",
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
        let res = app
            .post_json(
                "/sessions/",
                &json!({"agent_id": AGENT, "session_type": "task", "worker": worker}),
            )
            .await;
        assert_eq!(res.status(), 422, "{worker}");
        assert_eq!(problem(res).await["field"], field);
    }
    let res = app
        .client
        .patch(app.url(&format!("/sessions/{}", s["id"].as_str().unwrap())))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"worker": {"max_turns": 9}}"#)
        .send()
        .await
        .unwrap();
    let s: Value = res.json().await.unwrap();
    assert_eq!(s["worker"]["max_turns"], 9);
    assert_eq!(s["worker"]["prompt"], "fix it");
}

#[tokio::test]
async fn a_missing_required_field_is_named() {
    let app = spawn_app().await;
    for (body, field) in [
        (json!({"session_type": "task"}), "agent_id"),
        (json!({"agent_id": AGENT}), "session_type"),
    ] {
        let res = app.post_json("/sessions/", &body).await;
        assert_eq!(res.status(), 422, "{body}");
        let p = problem(res).await;
        assert_eq!(p["type"], "urn:agent-sessions:problem:validation");
        assert_eq!(p["field"], field, "{p}");
        assert_eq!(p["errors"][0]["field"], field, "{p}");
    }
    assert_eq!(app.counts().await, (0, 0), "nothing was written");
}

/// `If-Match` uses the strong comparison (RFC 9110): a weak tag never
/// matches, not even the session's own version.
#[tokio::test]
async fn a_weak_if_match_is_a_412_and_changes_nothing() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    let send = |method: reqwest::Method, tag: &'static str, target: String| {
        app.client
            .request(method, app.url(&format!("/sessions/{target}")))
            .header("if-match", tag)
            .json(&json!({"status": "paused"}))
            .send()
    };
    for method in [reqwest::Method::PATCH, reqwest::Method::DELETE] {
        let res = send(method.clone(), "W/\"1\"", id.to_owned())
            .await
            .unwrap();
        assert_eq!(res.status(), 412, "{method}");
        let p = problem(res).await;
        assert_eq!(p["type"], "urn:agent-sessions:problem:version-mismatch");
        assert_eq!(p["field"], "If-Match", "{p}");
    }
    let after = app.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(
        (after["version"].as_i64(), after["status"].as_str()),
        (Some(1), Some("active"))
    );
    assert_eq!(app.counts().await, (1, 1), "no event appended");

    // A session that does not exist stays a 404 whatever the tag.
    let missing = "660e8400-e29b-41d4-a716-446655440001".to_owned();
    let res = send(reqwest::Method::PATCH, "W/\"1\"", missing)
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    // The strong tag of the same version applies.
    let res = send(reqwest::Method::PATCH, "\"1\"", id.to_owned())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"2\"");
}

/// `If-None-Match` uses the weak comparison: `*`, the tag, or its weak form
/// answer 304; another version answers the session.
#[tokio::test]
async fn if_none_match_answers_304_only_for_the_current_version() {
    let app = spawn_app().await;
    let s = app.create_default().await;
    let id = s["id"].as_str().unwrap();
    app.patch(id, &json!({"status": "paused"})).await;
    for (tag, status) in [
        ("\"2\"", 304),
        ("W/\"2\"", 304),
        ("*", 304),
        ("\"1\", \"2\"", 304),
        ("\"1\"", 200),
        ("W/\"3\"", 200),
    ] {
        let res = app
            .client
            .get(app.url(&format!("/sessions/{id}")))
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{tag}");
        assert_eq!(res.headers()["etag"], "\"2\"", "{tag}");
        let body = res.bytes().await.unwrap();
        if status == 304 {
            assert!(body.is_empty(), "{tag}");
        } else {
            let s: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(s["version"], 2, "{tag}");
        }
    }
}

/// A header at fault is named like a body field.
#[tokio::test]
async fn an_unsupported_content_type_names_the_header() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/sessions/"))
        .header("content-type", "application/xml")
        .body("<a/>")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let p = problem(res).await;
    assert_eq!(p["field"], "Content-Type", "{p}");
}

/// Retrying a create whose session was since deleted is a 409 that names
/// the key, not a second session.
#[tokio::test]
async fn a_key_whose_session_was_deleted_is_a_409_naming_the_key() {
    let app = spawn_app().await;
    let body = json!({"agent_id": AGENT, "session_type": "task"});
    let create = || {
        app.client
            .post(app.url("/sessions/"))
            .header("idempotency-key", "gone-1")
            .json(&body)
            .send()
    };
    let first: Value = create().await.unwrap().json().await.unwrap();
    let id = first["id"].as_str().unwrap();
    let res = app
        .client
        .delete(app.url(&format!("/sessions/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = create().await.unwrap();
    assert_eq!(res.status(), 409);
    let p = problem(res).await;
    assert_eq!(p["field"], "Idempotency-Key", "{p}");
    assert_eq!(
        app.counts().await,
        (0, 2),
        "created and deleted, nothing more"
    );
}
