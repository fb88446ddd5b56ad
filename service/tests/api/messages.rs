//! The worker message log and the usage totals derived from it.

use agent_sessions::store::Store;
use sea_orm::Database;
use serde_json::{Value, json};

use crate::support::app::{TestApp, id_of};

#[tokio::test]
async fn messages_are_stored_counted_readable_as_jsonl_and_replayed() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let batch = json!([
        {"type": "system", "subtype": "init", "session_id": id, "model": "claude-test"},
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "on it"},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls\u{0}"}}]}},
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a\u{0}b"}]}},
        {"type": "result", "subtype": "success", "num_turns": 2, "total_cost_usd": 0.0125,
         "usage": {"input_tokens": 120, "output_tokens": 30, "cache_read_input_tokens": 7}}
    ]);
    let s = app
        .post(&format!("/sessions/{id}/messages"), &batch)
        .await
        .expect(200)
        .json();
    assert_eq!(
        s["usage"],
        json!({"message_count": 4, "tool_call_count": 1, "turns": 2, "input_tokens": 120,
        "output_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 7, "total_cost_usd": 0.0125})
    );
    assert_eq!(s["version"], 2);
    let s = app
        .post(
            &format!("/sessions/{id}/messages"),
            &json!([{"type": "result", "num_turns": 1, "total_cost_usd": 0.5}]),
        )
        .await
        .json();
    assert_eq!(s["usage"]["message_count"], 5);
    assert_eq!(s["usage"]["total_cost_usd"], 0.5125);

    let listed = app
        .get_json(&format!("/sessions/{id}/messages?limit=2"))
        .await;
    assert_eq!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        listed[1]["message"]["message"]["content"][1]["input"]["command"], "ls\u{FFFD}",
        "NUL replaced"
    );
    let res = app
        .fetch(&format!("/sessions/{id}/messages?after=2&format=jsonl"))
        .await;
    assert_eq!(res.header("content-type"), "application/x-ndjson");
    let text = res.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["type"], "user");

    // The usage change is an event like any other: replay rebuilds it.
    let events = app.get_json(&format!("/sessions/{id}/events")).await;
    assert_eq!(events[1]["payload"]["updates"], json!(["usage"]));
    let store = Store::from_connection(Database::connect(&app.db.url).await.unwrap());
    assert_eq!(store.replay_verify().await.unwrap().differences, vec![]);

    for bad in [json!([]), json!({"type": "x"}), json!([1, 2])] {
        let res = app.post(&format!("/sessions/{id}/messages"), &bad).await;
        assert_eq!(res.status, 422, "{bad}");
        res.problem();
    }
    let res = app
        .post(
            "/sessions/660e8400-e29b-41d4-a716-446655440001/messages",
            &json!([{}]),
        )
        .await;
    assert_eq!(res.status, 404);
    assert_eq!(
        app.messages("660e8400-e29b-41d4-a716-446655440001").await,
        None
    );
    // Clients cannot write the derived totals.
    assert_eq!(app.patch(&id, &json!({"usage": {}})).await.status, 422);
}
