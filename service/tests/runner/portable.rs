//! Portable sessions on the local backend, with the real CLI: the runner
//! ships the transcript to the service as the worker writes it, and a
//! paused session resumes with its whole history after its workspace is
//! gone, or on another runner with another workspace root.

use std::time::Duration;

use crate::support::app::{TestApp, id_of};
use crate::support::eventually;
use crate::support::fake_anthropic::{FakeAnthropic, Recorded};
use crate::support::runner::{InProcessRunner, runner_settings, temp_root, worker_env};
use serde_json::{Value, json};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);

fn worker_rec(s: &Value) -> &Value {
    &s["runtime_metadata"]["worker"]
}

async fn until_worker(api: &TestApp, id: &str, state: &str) -> Value {
    eventually(&format!("the worker to be {state}"), LIMIT, || async {
        let s = api.get(id).await;
        (worker_rec(&s)["state"] == state).then_some(s)
    })
    .await
}

/// The service's copy of the session's transcript.
async fn transcript(api: &TestApp, id: &str) -> String {
    api.fetch(&format!("/sessions/{id}/transcript"))
        .await
        .expect(200)
        .text()
}

async fn until_asked(fake: &FakeAnthropic, marker: &str) -> Recorded {
    eventually(
        &format!("a model request for {marker:?}"),
        LIMIT,
        || async {
            fake.requests()
                .into_iter()
                .rfind(|r| r.last_user_text().contains(marker))
        },
    )
    .await
}

fn history(r: &Recorded) -> String {
    r.conversation()
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A conversation that learned a code word, paused with its worker gone;
/// the transcript is in the service.
async fn learned_and_paused(api: &TestApp, runner: &InProcessRunner) -> String {
    let s = api
        .create_session(&json!({"agent_id": Uuid::new_v4(), "session_type": "chat",
            "runtime_backend": "local",
            "worker": {"prompt": "Remember: the code word is kiwi", "mode": "conversation"}}))
        .await;
    let id = id_of(&s);
    until_worker(api, &id, "idle").await;
    eventually("the transcript in the service", LIMIT, || async {
        let t = transcript(api, &id).await;
        t.contains("the code word is kiwi").then_some(())
    })
    .await;
    // Every line the service holds is a line of the CLI's own file.
    let local = std::fs::read_dir(runner.root.join(&id).join("claude/projects"))
        .expect("projects")
        .flatten()
        .map(|d| d.path().join(format!("{id}.jsonl")))
        .find(|p| p.is_file())
        .expect("the CLI's transcript");
    let held = transcript(api, &id).await;
    let file = std::fs::read_to_string(local).expect("transcript file");
    assert!(
        file.starts_with(&held),
        "the service holds a prefix of the file"
    );
    api.merge_patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    until_worker(api, &id, "exited").await;
    id
}

/// Resume a paused session, wait for its worker, send `text`: the model
/// request that carries it.
async fn resume_and_ask(api: &TestApp, fake: &FakeAnthropic, id: &str, text: &str) -> Recorded {
    api.merge_patch(id, &json!({"status": "active"}))
        .await
        .expect(200);
    until_worker(api, id, "idle").await;
    api.post(&format!("/sessions/{id}/input"), &json!({"text": text}))
        .await
        .expect(202);
    until_asked(fake, text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_session_resumes_with_its_history_after_its_workspace_is_lost() {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let root = temp_root();
    let runner = InProcessRunner::start(runner_settings(&api, &root), worker_env(&fake.url));
    let id = learned_and_paused(&api, &runner).await;

    std::fs::remove_dir_all(root.join(&id)).expect("remove the workspace");
    let r = resume_and_ask(&api, &fake, &id, "What is the code word?").await;
    assert!(
        history(&r).contains("the code word is kiwi"),
        "the model gets the earlier turns: {}",
        history(&r)
    );
    let s = api.get(&id).await;
    assert_eq!(worker_rec(&s)["generation"], 2);
    assert_eq!(worker_rec(&s)["launch"], "resume");
    runner.stop().await;
    fake.stop().await;
    api.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_runner_with_another_workspace_root_resumes_it() {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let first = InProcessRunner::start(runner_settings(&api, &temp_root()), worker_env(&fake.url));
    let id = learned_and_paused(&api, &first).await;
    first.stop().await;

    let second_root = temp_root();
    let second = InProcessRunner::start(runner_settings(&api, &second_root), worker_env(&fake.url));
    let r = resume_and_ask(&api, &fake, &id, "Say the code word").await;
    assert!(
        history(&r).contains("the code word is kiwi"),
        "{}",
        history(&r)
    );
    assert!(second_root.join(&id).join("claude/projects").is_dir());
    second.stop().await;
    fake.stop().await;
    api.teardown().await;
}

/// The first model request of the worker of session `id`.
async fn first_request_of(fake: &FakeAnthropic, id: &str) -> Recorded {
    eventually(&format!("a model request from {id}"), LIMIT, || async {
        fake.requests()
            .into_iter()
            .find(|r| r.session.as_deref() == Some(id))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_resumes_with_the_parents_history_up_to_its_version() {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let root = temp_root();
    let runner = InProcessRunner::start(runner_settings(&api, &root), worker_env(&fake.url));
    let s = api
        .create_session(&json!({"agent_id": Uuid::new_v4(), "session_type": "chat",
            "runtime_backend": "local",
            "worker": {"prompt": "First, alpha", "mode": "conversation"}}))
        .await;
    let parent = id_of(&s);
    until_worker(&api, &parent, "idle").await;
    // The version at which the transcript holds the first turn (answer included).
    let at_alpha = eventually("alpha in the transcript", LIMIT, || async {
        let v = api.get(&parent).await["version"].as_i64()?;
        let t = api
            .fetch(&format!("/sessions/{parent}/transcript?at_version={v}"))
            .await
            .expect(200)
            .text();
        (t.contains("First, alpha") && t.contains("\"type\":\"assistant\"")).then_some(v)
    })
    .await;
    api.post(
        &format!("/sessions/{parent}/input"),
        &json!({"text": "Then, beta"}),
    )
    .await
    .expect(202);
    eventually("beta in the transcript", LIMIT, || async {
        let t = transcript(&api, &parent).await;
        (t.matches("\"type\":\"assistant\"").count() >= 2 && t.contains("Then, beta")).then_some(())
    })
    .await;
    let parent_events = api
        .get_json(&format!("/sessions/{parent}/events?limit=500"))
        .await;
    let parent_transcript = transcript(&api, &parent).await;

    // At the latest version: the whole conversation.
    let latest = api
        .post(
            &format!("/sessions/{parent}/fork"),
            &json!({"status": "active"}),
        )
        .await
        .expect(201)
        .json();
    let child = id_of(&latest);
    assert_eq!(latest["parent_session_id"], parent.as_str());
    let r = first_request_of(&fake, &child).await;
    let h = history(&r);
    assert!(
        h.contains("First, alpha") && h.contains("Then, beta"),
        "{h}"
    );

    // At the version of the first turn: only that.
    let early = api
        .post(
            &format!("/sessions/{parent}/fork"),
            &json!({"at_version": at_alpha, "status": "active"}),
        )
        .await
        .expect(201)
        .json();
    let child2 = id_of(&early);
    assert_eq!(early["forked_from"]["version"], at_alpha);
    let r = first_request_of(&fake, &child2).await;
    let h = history(&r);
    assert!(h.contains("First, alpha"), "{h}");
    assert!(
        !h.contains("Then, beta"),
        "nothing after the fork's version: {h}"
    );

    // The parent: its transcript as it was, its events as they were plus
    // one `session.forked` each.
    assert_eq!(transcript(&api, &parent).await, parent_transcript);
    let after = api
        .get_json(&format!("/sessions/{parent}/events?limit=500"))
        .await;
    let before = parent_events.as_array().expect("events");
    let after = after.as_array().expect("events");
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "earlier events unchanged"
    );
    assert!(
        after[before.len()..]
            .iter()
            .filter(|e| e["event_type"] == "session.forked")
            .count()
            == 2
    );
    let children = api
        .get_json(&format!("/sessions/?parent_session_id={parent}"))
        .await;
    assert_eq!(children.as_array().map(Vec::len), Some(2));
    runner.stop().await;
    fake.stop().await;
    api.teardown().await;
}
