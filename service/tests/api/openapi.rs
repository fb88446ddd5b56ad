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
