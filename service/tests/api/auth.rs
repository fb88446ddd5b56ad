//! Issue 6, acceptance 1–2: every route but the open ones needs a token with
//! the right scope; JWTs are checked; the token's subject is the actor.

use agent_sessions::auth::hash_token;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::AGENT;
use crate::support::app::{Reply, TestApp, id_of};

const SECRET: &str = "test-jwt-secret";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "agent-sessions";

fn tokens() -> String {
    json!([
        {"subject": "admin", "sha256": hash_token("all-scopes"), "scopes": ["sessions:read", "sessions:write", "events:read"]},
        {"subject": "no-scope", "sha256": hash_token("no-scopes"), "scopes": []},
        {"subject": "reader", "sha256": hash_token("read-only"), "scopes": ["sessions:read", "events:read"]},
        {"subject": "writer", "sha256": hash_token("write-only"), "scopes": ["sessions:write"]},
        {"subject": "runner", "sha256": hash_token("run-only"), "scopes": ["sessions:run"]},
    ])
    .to_string()
}

async fn secured(rate: u32) -> TestApp {
    TestApp::spawn_with(move |s| {
        s.auth.enabled = true;
        s.auth.tokens_json = tokens();
        s.auth.jwt_hs256_secret = SECRET.into();
        s.auth.jwt_issuer = ISSUER.into();
        s.auth.jwt_audience = AUDIENCE.into();
        s.auth.rate_limit_per_second = rate;
        s.auth.rate_limit_burst = rate;
    })
    .await
}

fn jwt(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(exp_offset: i64) -> Value {
    json!({"sub": "svc-jwt", "iss": ISSUER, "aud": AUDIENCE, "exp": chrono::Utc::now().timestamp() + exp_offset,
           "scope": "sessions:read sessions:write events:read"})
}

/// The scope each documented operation needs (None: any valid token).
fn scope_of(method: &str, path: &str) -> Option<&'static str> {
    match (method, path) {
        (_, "/openapi.json") | (_, "/docs") => None,
        ("get", "/events") | ("get", "/events/stream") | ("get", "/sessions/{id}/events") => {
            Some("events:read")
        }
        ("get", _) => Some("sessions:read"),
        // The runner's own reports.
        ("post", "/sessions/{id}/messages")
        | ("post", "/sessions/{id}/approvals")
        | ("put", "/sessions/{id}/transcript") => Some("sessions:run"),
        _ => Some("sessions:write"),
    }
}

async fn call(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> Reply {
    let mut req = app.http.request(
        method.to_uppercase().parse::<Method>().unwrap(),
        app.at(path),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if method != "get" && method != "delete" {
        req = req.json(&json!([{"type": "x"}]));
    }
    app.send(req).await
}

#[tokio::test]
async fn every_route_but_the_open_ones_needs_a_token_with_its_scope() {
    let app = secured(10_000).await;
    let created = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .bearer_auth("all-scopes")
                .json(&json!({"agent_id": AGENT, "session_type": "t"})),
        )
        .await
        .expect(201)
        .json();
    let id = id_of(&created);
    let doc: Value = serde_json::from_str(include_str!("../../../openapi/openapi.json")).unwrap();
    let mut operations = vec![
        ("get".to_owned(), "/openapi.json".to_owned()),
        ("get".to_owned(), "/docs".to_owned()),
    ];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations.push((method.clone(), path.clone()));
        }
    }
    assert!(operations.len() >= 14, "{operations:?}");
    for (method, path) in &operations {
        let concrete = path.replace("{id}", &id);
        // /events/stream never ends: look at the status only.
        if ["/healthz", "/readyz", "/metrics"].contains(&path.as_str()) {
            let res = call(&app, method, &concrete, None).await;
            assert!(
                (200..300).contains(&res.status),
                "{method} {path} is open: {}",
                res.status
            );
            continue;
        }
        let res = call(&app, method, &concrete, None).await;
        assert_eq!(res.status, 401, "{method} {path} without a token");
        assert!(res.header("www-authenticate").starts_with("Bearer"));
        res.problem();
        let res = call(&app, method, &concrete, Some("not-a-token")).await;
        assert_eq!(res.status, 401, "{method} {path} with an unknown token");
        match scope_of(method, path) {
            None => {
                let res = call(&app, method, &concrete, Some("no-scopes")).await;
                assert!(
                    (200..300).contains(&res.status),
                    "{method} {path} with any valid token"
                );
            }
            Some(scope) => {
                let lacking = match scope {
                    "sessions:write" => "read-only",
                    "sessions:run" => "write-only",
                    _ => "write-only",
                };
                let res = call(&app, method, &concrete, Some(lacking)).await;
                assert_eq!(res.status, 403, "{method} {path} without {scope}");
                assert!(res.problem().detail.contains(scope));
            }
        }
    }
    // And the right scope gets through (the delete last).
    let res = call(&app, "get", &format!("/sessions/{id}"), Some("read-only")).await;
    assert_eq!(res.status, 200);
    let res = call(
        &app,
        "delete",
        &format!("/sessions/{id}"),
        Some("write-only"),
    )
    .await;
    assert_eq!(res.status, 204);
}

/// Only the runner's scope writes into a session's message log: a user's
/// token with `sessions:write` cannot.
#[tokio::test]
async fn only_sessions_run_appends_messages() {
    let app = secured(10_000).await;
    let created = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .bearer_auth("all-scopes")
                .json(&json!({"agent_id": AGENT, "session_type": "t"})),
        )
        .await
        .expect(201)
        .json();
    let path = format!("/sessions/{}/messages", id_of(&created));
    let lines = json!([{"type": "assistant"}]);
    for token in ["all-scopes", "write-only"] {
        let res = app
            .send(app.http.post(app.at(&path)).bearer_auth(token).json(&lines))
            .await
            .expect(403);
        assert!(res.problem().detail.contains("sessions:run"));
    }
    let res = app
        .send(
            app.http
                .post(app.at(&path))
                .bearer_auth("run-only")
                .json(&lines),
        )
        .await
        .expect(200);
    assert_eq!(res.json()["usage"]["message_count"], 1);
    // With authentication off, the anonymous caller holds every scope.
    let open = TestApp::spawn().await;
    let id = id_of(&open.create_default().await);
    open.post(&format!("/sessions/{id}/messages"), &lines)
        .await
        .expect(200);
}

#[tokio::test]
async fn jwts_are_checked_for_signature_expiry_and_audience() {
    let app = secured(10_000).await;
    let get = |token: String| {
        let app = &app;
        async move {
            app.send(app.http.get(app.at("/sessions/")).bearer_auth(token))
                .await
        }
    };
    assert_eq!(
        get(jwt(claims(600), SECRET)).await.status,
        200,
        "a valid JWT"
    );
    let res = get(jwt(claims(-3600), SECRET)).await;
    assert_eq!(res.status, 401, "expired");
    assert!(res.problem().detail.contains("expired"));
    assert_eq!(
        get(jwt(claims(600), "another-secret")).await.status,
        401,
        "wrongly signed"
    );
    let mut aud = claims(600);
    aud["aud"] = json!("someone-else");
    assert_eq!(get(jwt(aud, SECRET)).await.status, 401, "wrong audience");
    let mut iss = claims(600);
    iss["iss"] = json!("https://other.test");
    assert_eq!(get(jwt(iss, SECRET)).await.status, 401, "wrong issuer");
    let mut narrow = claims(600);
    narrow["scope"] = json!("sessions:read");
    let res = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .bearer_auth(jwt(narrow, SECRET))
                .json(&json!({"agent_id": AGENT, "session_type": "t"})),
        )
        .await;
    assert_eq!(res.status, 403, "a JWT without sessions:write");
}

#[tokio::test]
async fn events_record_the_token_subject_and_request_id() {
    let app = secured(10_000).await;
    let res = app
        .send(
            app.http
                .post(app.at("/sessions/"))
                .bearer_auth(jwt(claims(600), SECRET))
                .header("x-request-id", "req-from-platform-42")
                .json(&json!({"agent_id": AGENT, "session_type": "t"})),
        )
        .await;
    assert_eq!(res.header("x-request-id"), "req-from-platform-42");
    let id = res.json()["id"].as_str().unwrap().to_owned();
    let events = app
        .send(
            app.http
                .get(app.at(&format!("/sessions/{id}/events")))
                .bearer_auth("all-scopes"),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(
        events[0]["metadata"],
        json!({"actor": "svc-jwt", "request_id": "req-from-platform-42"})
    );
}

#[tokio::test]
async fn each_token_is_rate_limited_with_429_and_retry_after() {
    let app = secured(3).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let res = app
            .send(app.http.get(app.at("/sessions/")).bearer_auth("read-only"))
            .await;
        statuses.push(res.status);
        if res.status == 429 {
            assert!(res.headers.contains_key("retry-after"));
            res.problem();
        }
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst is allowed");
    assert!(statuses[3..].contains(&429), "then limited: {statuses:?}");
    // Another token has its own budget; probes are never limited.
    let res = app
        .send(app.http.get(app.at("/sessions/")).bearer_auth("all-scopes"))
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(app.fetch("/healthz").await.status, 200);
}
