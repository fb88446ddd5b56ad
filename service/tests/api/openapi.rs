//! The committed OpenAPI document matches what the service serves.

use serde_json::Value;

use crate::support::app::{TestApp, id_of};
use crate::support::eventually;

#[tokio::test]
async fn committed_openapi_matches_the_served_document() {
    let app = TestApp::spawn().await;
    let served: Value = app.get_json("/openapi.json").await;
    let committed: Value = serde_json::from_str(include_str!("../../../openapi/openapi.json"))
        .expect("openapi/openapi.json is JSON");
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(
        served, committed,
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
    );
    for path in [
        "/sessions/",
        "/sessions/{id}",
        "/sessions/{id}/events",
        "/events",
    ] {
        assert!(served["paths"][path].is_object(), "{path} documented");
    }
}

#[tokio::test]
async fn docs_page_renders_the_document() {
    let app = TestApp::spawn().await;
    let res = app.fetch("/docs").await;
    assert_eq!(res.status, 200, "redirect followed to /docs/");
    let html = res.text();
    assert!(html.contains("swagger-ui"), "Swagger UI page");
    let init = app.fetch("/docs/swagger-initializer.js").await.text();
    assert!(
        init.contains("/openapi.json"),
        "points at the document: {init}"
    );
}

#[tokio::test]
async fn metrics_expose_requests_events_relay_and_pool() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    app.patch(&id, &serde_json::json!({"status": "paused"}))
        .await;
    assert_eq!(app.fetch("/sessions/not-a-session").await.status, 404);
    let text = app.fetch("/metrics").await.text();
    for series in [
        "http_requests_total{method=\"POST\",route=\"/sessions\",status=\"201\"}",
        "http_requests_total{method=\"GET\",route=\"/sessions/{id}\",status=\"404\"}",
        "http_request_duration_seconds_bucket{method=\"PATCH\",route=\"/sessions/{id}\",status=\"200\",le=",
        "events_appended_total{event_type=\"session.created\"}",
        "events_appended_total{event_type=\"session.updated\"}",
        "db_pool_connections{state=\"idle\"}",
        "db_pool_max_connections",
        "relay_leader",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    // The relay reports its lag once it leads.
    eventually(
        "relay lag gauges",
        std::time::Duration::from_secs(10),
        || async {
            let t = app.fetch("/metrics").await.text();
            (t.contains("relay_lag_events")
                && t.contains("relay_lag_seconds")
                && t.contains("relay_published_total"))
            .then_some(())
        },
    )
    .await;
}
