//! Acceptance tests of the runner's local backend, driving the real Claude
//! Code CLI (`tools/claude`) against a fake Anthropic API, with the API
//! service in-process on its own database.

use std::time::{Duration, Instant};

use crate::support::app::id_of;
use crate::support::fake_anthropic::{FIRST_PART, REPLY};
use crate::support::rig::Rig;
use crate::support::{eventually, group_alive, processes_mentioning};
use serde_json::{Value, json};
use uuid::Uuid;

fn worker_rec(s: &Value) -> &Value {
    &s["runtime_metadata"]["worker"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_completes_a_local_session_with_the_real_cli() {
    let rig = Rig::start().await;
    let t0 = Instant::now();
    let id = rig
        .create_local(json!({"prompt": "Say hello [quick]"}))
        .await;
    let s = rig
        .until_status(&id, "completed", Duration::from_secs(60))
        .await;
    eprintln!("completed in {:?}", t0.elapsed());
    let w = worker_rec(&s);
    assert_eq!(w["claude_session_id"], id.as_str(), "{w}");
    assert_eq!(w["generation"], 1);
    assert_eq!(w["launch"], "new");
    assert_eq!(w["exit_code"], 0);
    assert!(w["pid"].as_i64().unwrap_or(0) > 0, "{w}");
    assert!(w["turns"].as_u64().unwrap_or(0) >= 1, "{w}");
    assert!(w["input_tokens"].as_u64().unwrap_or(0) > 0, "{w}");
    assert!(w["output_tokens"].as_u64().unwrap_or(0) > 0, "{w}");
    assert!(w["cost_usd"].as_f64().unwrap_or(0.0) > 0.0, "{w}");
    assert!(w["model"].is_string() && w["started_at"].is_string() && w["stopped_at"].is_string());
    assert!(w["crash_reason"].is_null(), "{w}");
    // The model saw the prompt, through the CLI.
    let reqs = rig.fake.requests_for("Say hello [quick]");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].session.as_deref(), Some(id.as_str()));
    // The worker's stream-json, once the service has the messages endpoint.
    match rig.api.messages(&id).await {
        Some(msgs) => {
            let text = msgs.to_string();
            assert!(
                text.contains(REPLY) && text.contains("\"result\""),
                "{text}"
            );
        }
        None => eprintln!("GET /sessions/{{id}}/messages is not served yet; skipped that check"),
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_pauses_mid_run_and_resumes_the_conversation() {
    let rig = Rig::start().await;
    let prompt = "Write a long essay [slow:60]";
    let id = rig.create_local(json!({"prompt": prompt})).await;
    // Running, and the model is streaming its (slow) answer.
    let pid = eventually("the worker to start", Duration::from_secs(30), || async {
        let s = rig.api.get(&id).await;
        worker_rec(&s)["pid"].as_i64()
    })
    .await as i32;
    // Mid-answer: the first block of the reply is out, the second streams.
    let output = rig.runner.root.join(&id).join("runner/gen-1.jsonl");
    eventually(
        "the first part of the answer",
        Duration::from_secs(30),
        || async {
            let out = std::fs::read_to_string(&output).unwrap_or_default();
            out.contains(FIRST_PART).then_some(())
        },
    )
    .await;
    assert!(group_alive(pid));

    let code = rig
        .api
        .merge_patch(&id, &json!({"status": "paused"}))
        .await
        .status;
    assert_eq!(code, 200);
    let t0 = Instant::now();
    eventually(
        "the worker's process group to be gone",
        Duration::from_secs(10),
        || async { (!group_alive(pid)).then_some(()) },
    )
    .await;
    eprintln!("process group gone {:?} after the pause", t0.elapsed());
    let s = eventually(
        "the stop to be reported",
        Duration::from_secs(10),
        || async {
            let s = rig.api.get(&id).await;
            worker_rec(&s)["stopped_at"].is_string().then_some(s)
        },
    )
    .await;
    assert_eq!(s["status"], "paused");
    assert!(processes_mentioning(&id).is_empty());
    let out = std::fs::read_to_string(rig.runner.root.join(&id).join("runner/gen-1.jsonl"))
        .unwrap_or_default();
    for line in out.lines().filter(|l| !l.contains("\"init\"")) {
        eprintln!("gen-1: {}", &line[..line.len().min(300)]);
    }

    let resume_prompt = "Please continue where you stopped";
    let code = rig
        .api
        .merge_patch(
            &id,
            &json!({"status": "active", "checkpoint": {"resume_prompt": resume_prompt}}),
        )
        .await
        .status;
    assert_eq!(code, 200);
    let s = rig
        .until_status(&id, "completed", Duration::from_secs(60))
        .await;
    let w = worker_rec(&s);
    assert_eq!(w["launch"], "resume", "{w}");
    assert_eq!(w["generation"], 2, "{w}");
    assert_ne!(w["pid"].as_i64(), Some(i64::from(pid)));

    // The resumed CLI sent the earlier conversation plus the resume prompt.
    let reqs = rig.fake.requests_for(prompt);
    assert_eq!(reqs.len(), 2, "one request per run");
    let convo = reqs[1].conversation();
    eprintln!("resumed conversation: {convo:?}");
    assert!(convo[0].1.contains(prompt));
    assert!(
        convo
            .iter()
            .any(|(r, t)| r == "assistant" && t.contains(FIRST_PART)),
        "the interrupted answer is part of the resumed conversation: {convo:?}"
    );
    assert_eq!(reqs[1].last_user_text(), resume_prompt);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_marks_api_errors_crashed_and_retries_by_policy() {
    let rig = Rig::start().await;
    let plain = rig
        .create_local(json!({"prompt": "Fail please [api_error] one"}))
        .await;
    let retried = rig
        .create_local(json!({
            "prompt": "Fail please [api_error] two",
            "restart_policy": {"max_restarts": 1, "backoff_ms": 300},
        }))
        .await;

    let s = rig
        .until_status(&plain, "crashed", Duration::from_secs(60))
        .await;
    let w = worker_rec(&s);
    assert_eq!(w["crash_reason"], "api_error", "{w}");
    assert!(
        w["last_error"].as_str().unwrap_or("").contains("400"),
        "{w}"
    );
    assert_eq!(w["state"], "exited", "{w}");

    // The retried one crashed once, was moved back to active and resumed;
    // the resume prompt gets a normal answer, so it completes.
    let s = rig
        .until_status(&retried, "completed", Duration::from_secs(60))
        .await;
    let w = worker_rec(&s);
    assert_eq!(w["restarts"], 1, "{w}");
    assert_eq!(w["generation"], 2, "{w}");
    assert_eq!(w["launch"], "resume", "{w}");
    // The CLI may retry a 400 within one run; what matters is that exactly
    // one resumed run followed, and that it said the default resume prompt.
    let reqs = rig.fake.requests_for("[api_error] two");
    let resumed: Vec<_> = reqs
        .iter()
        .filter(|r| r.last_user_text() == "Continue")
        .collect();
    assert_eq!(resumed.len(), 1, "one retry");
    assert_eq!(
        reqs.last().map(|r| r.last_user_text()).as_deref(),
        Some("Continue")
    );
    // Its history has the crash.
    let events: Vec<Value> = rig
        .api
        .fetch(&format!("/sessions/{retried}/events?limit=100"))
        .await
        .expect(200)
        .parse();
    let statuses: Vec<&str> = events
        .iter()
        .filter_map(|e| e["payload"]["changes"]["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        ["active", "crashed", "active", "completed"],
        "{statuses:?}"
    );

    // Without a policy it stays crashed, however often the runner looks.
    rig.runner.until_resyncs(2).await;
    assert_eq!(rig.api.get(&plain).await["status"], "crashed");
    assert!(
        rig.fake
            .requests_for("[api_error] one")
            .iter()
            .all(|r| r.last_user_text() != "Continue"),
        "never resumed"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_never_touches_sessions_without_a_worker_spec() {
    let rig = Rig::start().await;
    // The seed's kind of session, on each backend, and a spec for another backend.
    let mut untouched = Vec::new();
    for body in [
        json!({"agent_id": Uuid::new_v4(), "session_type": "conversation", "context": {"topic": "x"}}),
        json!({"agent_id": Uuid::new_v4(), "session_type": "development", "runtime_backend": "local"}),
        json!({"agent_id": Uuid::new_v4(), "session_type": "task", "runtime_backend": "kubernetes",
               "worker": {"prompt": "not for the local runner"}}),
    ] {
        let s = rig.api.create_session(&body).await;
        untouched.push(id_of(&s));
    }
    let managed = rig
        .create_local(json!({"prompt": "Say hello [quick]"}))
        .await;
    rig.until_status(&managed, "completed", Duration::from_secs(60))
        .await;
    // Whatever a resync would do to them has had two chances.
    rig.runner.until_resyncs(2).await;
    for id in &untouched {
        let s = rig.api.get(id).await;
        assert_eq!(s["version"], 1, "session {id} was written to: {s}");
        assert_eq!(s["status"], "active");
        assert!(!rig.runner.root.join(id).exists(), "no workspace for {id}");
    }
    assert_eq!(
        rig.fake.requests().len(),
        1,
        "only the managed session reached the model"
    );
    rig.stop().await;
}

/// The line the API refuses in the tests of a refused batch.
const REFUSED: &str = "\"type\":\"assistant\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_skips_a_refused_message_batch_and_posts_the_later_ones() {
    let rig = Rig::start_with(true, |_| {}).await;
    let proxy = rig.proxy.as_ref().expect("the rig's proxy");
    // The API takes no assistant line: a batch holding one is too large
    // (413) until the line stands alone, and then unprocessable (422).
    proxy.refuse_lines_containing(REFUSED);
    // Posts wait until the worker has printed its result, so the assistant
    // line shares a batch with the lines around it.
    proxy.hold();
    let id = rig
        .create_local(json!({"prompt": "Say hello [quick]"}))
        .await;
    let output = rig.runner.root.join(&id).join("runner/gen-1.jsonl");
    eventually(
        "the worker's result line",
        Duration::from_secs(60),
        || async {
            let out = std::fs::read_to_string(&output).unwrap_or_default();
            out.contains("\"type\":\"result\"").then_some(())
        },
    )
    .await;
    proxy.release();
    rig.until_status(&id, "completed", Duration::from_secs(60))
        .await;
    let printed: Vec<Value> = std::fs::read_to_string(&output)
        .expect("the worker's output")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let want: Vec<Value> = printed
        .iter()
        .filter(|l| !l.to_string().contains(REFUSED))
        .cloned()
        .collect();
    assert!(want.len() < printed.len(), "an assistant line was printed");
    let refused_at = printed
        .iter()
        .position(|l| l.to_string().contains(REFUSED))
        .expect("the refused line");
    assert!(
        printed[refused_at..].iter().any(|l| l["type"] == "result"),
        "the result comes after the refused line"
    );
    proxy
        .assert_refused_line_skipped(&rig.api, &id, &want)
        .await;
    rig.stop().await;
}
