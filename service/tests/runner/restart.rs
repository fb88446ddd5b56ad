//! G8 with the real binary: `agent-sessions runner` is killed with SIGKILL
//! while a real Claude Code worker runs; the next runner adopts the worker
//! instead of starting a second one, and the session still completes.

use std::time::{Duration, Instant};

use crate::support::app::{TestApp, id_of};
use crate::support::fake_anthropic::FakeAnthropic;
use crate::support::runner::{RunnerProcess, clean_root, temp_root};
use crate::support::{eventually, group_alive, processes_mentioning};
use serde_json::{Value, json};
use uuid::Uuid;

fn worker_rec(s: &Value) -> &Value {
    &s["runtime_metadata"]["worker"]
}

/// The API, the fake model and a runner process, with a local session whose
/// worker (on `prompt`) has started; its id and the worker's pid.
async fn running_worker(
    prompt: &str,
) -> (
    TestApp,
    FakeAnthropic,
    std::path::PathBuf,
    RunnerProcess,
    String,
    i32,
) {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let root = temp_root();
    let first = RunnerProcess::spawn(&api, &root, &fake.url, "runner-1.log");
    let s = api
        .create_session(&json!({"agent_id": Uuid::new_v4(), "session_type": "task",
            "runtime_backend": "local", "worker": {"prompt": prompt}}))
        .await;
    let id = id_of(&s);
    let pid = eventually("the worker to start", Duration::from_secs(30), || async {
        worker_rec(&api.get(&id).await)["pid"].as_i64()
    })
    .await as i32;
    (api, fake, root, first, id, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_survives_kill_9_with_exactly_one_worker() {
    let prompt = "A long job [slow:8]";
    let (api, fake, root, mut first, id, pid) = running_worker(prompt).await;
    eventually("the model request", Duration::from_secs(30), || async {
        (!fake.requests_for(prompt).is_empty()).then_some(())
    })
    .await;

    first.kill9();
    // The worker outlives its runner (its own process group, output to a file).
    assert!(group_alive(pid), "worker died with the runner");
    assert_eq!(processes_mentioning(&id), [pid]);

    let mut second = RunnerProcess::spawn(&api, &root, &fake.url, "runner-2.log");
    // Through start-up, two resyncs and the worker's end: never two workers.
    let t0 = Instant::now();
    let seen_max = std::sync::atomic::AtomicUsize::new(0);
    let done = eventually(
        "the session to complete",
        Duration::from_secs(60),
        || async {
            let procs = processes_mentioning(&id);
            seen_max.fetch_max(procs.len(), std::sync::atomic::Ordering::Relaxed);
            assert!(procs.len() <= 1, "two workers for one session: {procs:?}");
            assert!(
                procs.iter().all(|p| *p == pid),
                "a new worker {procs:?} beside {pid}"
            );
            let s = api.get(&id).await;
            (s["status"] != "active").then_some(s)
        },
    )
    .await;
    eprintln!(
        "completed {:?} after the restart; at most {} worker process",
        t0.elapsed(),
        seen_max.into_inner()
    );
    let log2 = second.log_text();
    assert_eq!(done["status"], "completed", "{done}\n{log2}");
    let w = worker_rec(&done);
    assert_eq!(
        w["generation"], 1,
        "the adopted worker finished the job: {w}"
    );
    assert_eq!(w["pid"], pid);
    assert!(w["turns"].as_u64().unwrap_or(0) >= 1, "{w}");
    assert_eq!(
        fake.requests_for(prompt).len(),
        1,
        "the model was asked once"
    );
    assert!(
        log2.contains("found a worker from an earlier runner"),
        "{log2}"
    );
    assert!(processes_mentioning(&id).is_empty());

    second.terminate();
    clean_root(&root);
    fake.stop().await;
    api.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_finishes_a_task_that_answered_while_no_runner_watched() {
    let prompt = "A short job [slow:2]";
    let (api, fake, root, mut first, id, pid) = running_worker(prompt).await;
    first.kill9();
    // The worker answers on its own, then waits for input: nothing ends it
    // but a runner (its stdin never closes).
    let output = root.join(&id).join("runner/gen-1.jsonl");
    eventually(
        "the orphaned worker's answer",
        Duration::from_secs(30),
        || async {
            let out = std::fs::read_to_string(&output).unwrap_or_default();
            out.contains("\"type\":\"result\"").then_some(())
        },
    )
    .await;
    assert!(group_alive(pid), "the worker waits for its runner");
    assert_eq!(
        api.get(&id).await["status"],
        "active",
        "nobody reported it yet"
    );

    let mut second = RunnerProcess::spawn(&api, &root, &fake.url, "runner-2.log");
    let done = eventually(
        "the session to complete",
        Duration::from_secs(30),
        || async {
            let s = api.get(&id).await;
            (s["status"] != "active").then_some(s)
        },
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}\n{}", second.log_text());
    let w = worker_rec(&done);
    assert_eq!(w["generation"], 1, "{w}");
    assert_eq!(w["pid"], pid, "the adopted worker: {w}");
    assert!(
        w["exit_code"].is_null(),
        "an adopted worker's exit code is unknown: {w}"
    );
    assert_eq!(w["state"], "exited", "{w}");
    assert_eq!(fake.requests_for(prompt).len(), 1);
    eventually(
        "the worker's group to go",
        Duration::from_secs(10),
        || async { (!group_alive(pid)).then_some(()) },
    )
    .await;

    second.terminate();
    clean_root(&root);
    fake.stop().await;
    api.teardown().await;
}
