//! Issue 6, acceptance 2: one request id follows a change from the HTTP call
//! that made it to the worker the runner starts for it — in the runner's
//! logs and in the events of the runner's own reports.

use std::time::Duration;

use crate::support::app::{TestApp, id_of};
use crate::support::eventually;
use crate::support::fake_anthropic::FakeAnthropic;
use crate::support::runner::{RunnerProcess, clean_root, temp_root};
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_follows_a_change_into_the_runner() {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let root = temp_root();
    let runner = RunnerProcess::spawn(&api, &root, &fake.url, "runner.log");
    let request_id = format!("req-trace-{}", Uuid::new_v4().simple());
    let created = api
        .send(
            api.http
                .post(api.at("/sessions/"))
                .header("x-request-id", &request_id)
                .json(&json!({"agent_id": Uuid::new_v4(), "session_type": "task",
                      "runtime_backend": "local", "worker": {"prompt": "Say hello"}})),
        )
        .await
        .expect(201)
        .json();
    let id = id_of(&created);

    let events: Vec<Value> = eventually(
        "the runner to report the start",
        Duration::from_secs(30),
        || async {
            let events: Vec<Value> = api
                .get_json(&format!("/sessions/{id}/events?limit=100"))
                .await
                .as_array()?
                .clone();
            events
                .iter()
                .any(|e| e["payload"]["changes"]["runtime_metadata"]["worker"]["pid"].is_i64())
                .then_some(events)
        },
    )
    .await;
    assert_eq!(
        events[0]["metadata"]["request_id"],
        request_id.as_str(),
        "the create"
    );
    let reports: Vec<&Value> = events[1..]
        .iter()
        .filter(|e| e["payload"]["updates"] == json!(["runtime_metadata"]))
        .take(2)
        .collect();
    assert_eq!(
        reports.len(),
        2,
        "the generation claim and the start report"
    );
    for r in reports {
        assert_eq!(
            r["metadata"]["request_id"],
            request_id.as_str(),
            "runner report {r}"
        );
    }
    let log = eventually("the runner's log line", Duration::from_secs(10), || async {
        let log = runner.log_text();
        log.lines()
            .any(|l| l.contains("starting worker") && l.contains(&request_id))
            .then_some(log)
    })
    .await;
    assert!(log.contains(&id));

    // The runner's own metrics count the start and the end.
    let text = eventually(
        "the runner to report the worker's end",
        Duration::from_secs(30),
        || async {
            let text = runner.metrics().await?;
            text.contains("runner_worker_exits_total").then_some(text)
        },
    )
    .await;
    for series in [
        "runner_worker_starts_total{backend=\"local\",launch=\"new\"} 1",
        "runner_workers{state=\"running\"}",
        "runner_max_workers",
        "runner_cost_usd_total",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    drop(runner);
    clean_root(&root);
}
