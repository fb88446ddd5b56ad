//! The committed OpenAPI document matches what the service serves.

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn committed_openapi_matches_the_served_document() {
    let app = spawn_app().await;
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
    let app = spawn_app().await;
    let res = app.get("/docs").await;
    assert_eq!(res.status(), 200, "redirect followed to /docs/");
    let html = res.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "Swagger UI page");
    let init = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        init.contains("/openapi.json"),
        "points at the document: {init}"
    );
}

#[tokio::test]
async fn metrics_expose_requests_events_relay_and_pool() {
    let app = spawn_app().await;
    let id = app.create_default().await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.patch(&id, &serde_json::json!({"status": "paused"}))
        .await;
    assert_eq!(app.get("/sessions/not-a-session").await.status(), 404);
    let text = app.get("/metrics").await.text().await.unwrap();
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
    crate::procs::eventually(10, "relay lag gauges", || async {
        let t = app.get("/metrics").await.text().await.unwrap();
        t.contains("relay_lag_events")
            && t.contains("relay_lag_seconds")
            && t.contains("relay_published_total")
    })
    .await;
}
