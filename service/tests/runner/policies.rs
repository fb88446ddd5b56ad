//! The runner's rules beyond the happy path, each with the real CLI:
//! messages posted unmodified, a killed worker marked crashed within a
//! second (G8), the concurrency cap, the budget, and stale generations.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::rig::Rig;
use crate::support::{eventually, group_alive, processes_mentioning};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

fn worker_rec(s: &Value) -> &Value {
    &s["runtime_metadata"]["worker"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_posts_the_workers_stream_json_as_messages() {
    let rig = Rig::start_with(true, |s| s.runner.message_batch = 2).await;
    let id = rig
        .create_local(json!({"prompt": "Say hello [quick]"}))
        .await;
    rig.until_status(&id, "completed", Duration::from_secs(60))
        .await;
    let proxy = rig.proxy.as_ref().unwrap();
    let batches = proxy.batches(&id);
    assert!(
        batches.iter().all(|b| !b.is_empty() && b.len() <= 2),
        "{batches:?}"
    );
    let posted: Vec<Value> = batches.into_iter().flatten().collect();
    // Exactly the worker's stdout, line for line, unmodified.
    let out = std::fs::read_to_string(rig.runner.root.join(&id).join("runner/gen-1.jsonl"))
        .expect("worker output");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(posted, lines);
    let types: Vec<&str> = posted.iter().filter_map(|m| m["type"].as_str()).collect();
    for t in ["system", "assistant", "result"] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_marks_a_killed_worker_crashed_within_a_second() {
    let rig = Rig::start().await;
    let prompt = "Keep talking [slow:30]";
    let id = rig.create_local(json!({"prompt": prompt})).await;
    let pid = rig.worker_pid(&id).await;
    eventually("the model request", Duration::from_secs(30), || async {
        (!rig.fake.requests_for(prompt).is_empty()).then_some(())
    })
    .await;
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    let s = rig
        .until_status(&id, "crashed", Duration::from_secs(5))
        .await;
    let took = t0.elapsed();
    eprintln!("crashed {took:?} after SIGKILL");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let w = worker_rec(&s);
    assert_eq!(w["crash_reason"], "signal", "{w}");
    assert_eq!(w["signal"], 9, "{w}");
    assert!(!group_alive(pid));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_queues_sessions_beyond_max_workers() {
    let rig = Rig::start_with(false, |s| s.runner.max_workers = 1).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            rig.create_local(json!({"prompt": format!("Job {i} [slow:2]")}))
                .await,
        );
    }
    // The ones beyond the cap say so: `starting`, with no process yet.
    eventually(
        "two sessions listed as waiting",
        Duration::from_secs(30),
        || async {
            let page = rig.api.get_json("/sessions/?worker_state=starting").await;
            let waiting = page
                .as_array()?
                .iter()
                .filter(|s| {
                    ids.iter().any(|id| s["id"] == id.as_str())
                        && s["runtime_metadata"]["worker"]["pid"].is_null()
                })
                .count();
            (waiting == 2).then_some(())
        },
    )
    .await;
    let most = Mutex::new(0usize);
    let seen = Mutex::new(HashSet::new());
    eventually("all three to complete", Duration::from_secs(90), || async {
        let live: Vec<i32> = ids.iter().flat_map(|id| processes_mentioning(id)).collect();
        {
            let mut m = most.lock().unwrap();
            *m = (*m).max(live.len());
        }
        seen.lock().unwrap().extend(live);
        let mut done = 0;
        for id in &ids {
            if rig.api.get(id).await["status"] == "completed" {
                done += 1;
            }
        }
        (done == 3).then_some(())
    })
    .await;
    let most = *most.lock().unwrap();
    assert_eq!(most, 1, "never more than max_workers at once");
    assert_eq!(seen.lock().unwrap().len(), 3, "each ran, one after another");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_pauses_a_session_that_reaches_its_budget() {
    let rig = Rig::start().await;
    let prompt = "Spend a little [quick]";
    let id = rig
        .create_local(json!({"prompt": prompt, "max_budget_usd": 0.00001,
            "restart_policy": {"max_restarts": 3, "backoff_ms": 100}}))
        .await;
    let s = rig
        .until_status(&id, "paused", Duration::from_secs(60))
        .await;
    let w = worker_rec(&s);
    assert_eq!(w["paused_reason"], "budget", "{w}");
    assert!(w["cost_usd"].as_f64().unwrap() >= 0.00001, "{w}");
    assert_eq!(rig.fake.requests_for(prompt).len(), 1);
    // Resumed without raising the budget: paused again, no worker started.
    let code = rig
        .api
        .merge_patch(&id, &json!({"status": "active"}))
        .await
        .status;
    assert_eq!(code, 200);
    let s = rig
        .until_status(&id, "paused", Duration::from_secs(10))
        .await;
    assert_eq!(worker_rec(&s)["generation"], 1, "no second worker");
    assert_eq!(rig.fake.requests_for(prompt).len(), 1);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_stops_a_worker_of_an_older_generation() {
    let rig = Rig::start().await;
    let prompt = "Long job [slow:30]";
    let id = rig.create_local(json!({"prompt": prompt})).await;
    let old = rig.worker_pid(&id).await;
    eventually("the model request", Duration::from_secs(30), || async {
        (!rig.fake.requests_for(prompt).is_empty()).then_some(())
    })
    .await;
    // Someone else claims generation 5 (another runner, say).
    let code = rig
        .api
        .merge_patch(
            &id,
            &json!({"runtime_metadata": {"worker": {"generation": 5}}}),
        )
        .await
        .status;
    assert_eq!(code, 200);
    eventually(
        "the stale worker to be stopped",
        Duration::from_secs(10),
        || async { (!group_alive(old)).then_some(()) },
    )
    .await;
    // Then the session, still active, gets a worker of its own generation.
    let s = eventually(
        "a worker of generation 6",
        Duration::from_secs(30),
        || async {
            let s = rig.api.get(&id).await;
            (worker_rec(&s)["generation"] == 6 && worker_rec(&s)["pid"].is_i64()).then_some(s)
        },
    )
    .await;
    assert_ne!(worker_rec(&s)["pid"], old);
    assert_eq!(worker_rec(&s)["launch"], "resume");
    assert!(processes_mentioning(&id).len() <= 1);
    rig.until_status(&id, "completed", Duration::from_secs(60))
        .await;
    rig.stop().await;
}
