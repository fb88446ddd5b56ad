//! Live sessions with the real CLI against the fake Anthropic API: one
//! worker process serving many turns, input delivered exactly once across a
//! runner `kill -9`, tool approvals (allowed, denied, timed out), interrupt
//! mid-stream, and the idle timeout that pauses a conversation until the
//! next input resumes it with its history.

use std::path::Path;
use std::time::Duration;

use crate::support::app::TestApp;
use crate::support::eventually;
use crate::support::fake_anthropic::{FIRST_PART, FakeAnthropic, Recorded, TOOL_SAID};
use crate::support::rig::Rig;
use crate::support::runner::{RunnerProcess, clean_root, temp_root};
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) fn worker_rec(s: &Value) -> &Value {
    &s["runtime_metadata"]["worker"]
}

/// Wait until the session's worker reports `state`; the session.
pub(crate) async fn until_worker(api: &TestApp, id: &str, state: &str, limit: Duration) -> Value {
    eventually(&format!("the worker to be {state}"), limit, || async {
        let s = api.get(id).await;
        (worker_rec(&s)["state"] == state).then_some(s)
    })
    .await
}

/// Send an input; its `seq`.
pub(crate) async fn say(api: &TestApp, id: &str, text: &str) -> i64 {
    let r = api
        .post(&format!("/sessions/{id}/input"), &json!({"text": text}))
        .await
        .expect(202)
        .json();
    r["seq"].as_i64().expect("seq")
}

/// The model requests whose latest user text contains `marker`.
pub(crate) fn asked(fake: &FakeAnthropic, marker: &str) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.last_user_text().contains(marker))
        .collect()
}

pub(crate) async fn until_asked(fake: &FakeAnthropic, marker: &str) -> Recorded {
    eventually(
        &format!("a model request for {marker:?}"),
        Duration::from_secs(30),
        || async { asked(fake, marker).pop() },
    )
    .await
}

/// Every user text the request sends the model, in order.
pub(crate) fn user_texts(r: &Recorded) -> Vec<String> {
    r.conversation()
        .into_iter()
        .filter(|(role, _)| role == "user")
        .map(|(_, t)| t)
        .collect()
}

pub(crate) fn mentions(r: &Recorded, text: &str) -> bool {
    user_texts(r).iter().any(|t| t.contains(text))
}

/// The session's event types, in order.
pub(crate) async fn event_types(api: &TestApp, id: &str) -> Vec<Value> {
    api.get_json(&format!("/sessions/{id}/events?limit=500"))
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub(crate) fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event_type"] == t).collect()
}

// The flows, shared with `kubernetes_live`: each takes the session once
// created with the prompt named, and asserts what holds on any backend.

/// The prompt of `three_turns`.
pub(crate) const TURN_ONE: &str = "Turn one: remember zebra";

/// Turns two and three of a conversation begun with [`TURN_ONE`] whose
/// worker is idle: each request carries the earlier turns, each input is
/// taken once, by the same first worker; the session after turn three.
pub(crate) async fn three_turns(api: &TestApp, fake: &FakeAnthropic, id: &str) -> Value {
    assert_eq!(say(api, id, "Turn two").await, 1);
    let two = until_asked(fake, "Turn two").await;
    assert!(mentions(&two, TURN_ONE), "{:?}", user_texts(&two));
    let s = eventually("turn two taken", Duration::from_secs(30), || async {
        let s = api.get(id).await;
        (worker_rec(&s)["input_seq"] == 1 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    assert_eq!(s["status"], "active", "a conversation stays active");

    assert_eq!(say(api, id, "Turn three").await, 2);
    let three = until_asked(fake, "Turn three").await;
    let texts = user_texts(&three);
    assert!(
        mentions(&three, "Turn one") && mentions(&three, "Turn two"),
        "each turn sends the earlier ones: {texts:?}"
    );
    let s = eventually("turn three taken", Duration::from_secs(30), || async {
        let s = api.get(id).await;
        (worker_rec(&s)["input_seq"] == 2 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    let w = worker_rec(&s);
    assert_eq!(w["generation"], 1, "{w}");
    assert!(w["turns"].as_u64().unwrap_or(0) >= 3, "{w}");
    assert!(w["cost_micro_usd"].as_u64().unwrap_or(0) > 0, "{w}");
    // Each input asked the model exactly once.
    assert_eq!(asked(fake, "Turn two").len(), 1);
    assert_eq!(asked(fake, "Turn three").len(), 1);
    let events = event_types(api, id).await;
    assert_eq!(of_type(&events, "session.input_received").len(), 2);
    // The inputs are in the message log as the worker echoed them.
    let log = api
        .get_json(&format!("/sessions/{id}/messages?limit=500"))
        .await;
    let echoed = log
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["message"]["isReplay"] == true)
        .count();
    assert_eq!(echoed, 3, "the prompt and two inputs");
    s
}

/// Completing the session stops the worker, recorded as such.
pub(crate) async fn complete_stops_the_worker(api: &TestApp, id: &str) {
    api.merge_patch(id, &json!({"status": "completed"}))
        .await
        .expect(200);
    let s = until_worker(api, id, "exited", Duration::from_secs(30)).await;
    let w = worker_rec(&s);
    assert_eq!(w["stop_reason"], "finished", "{w}");
    assert_eq!(w["stopped_by"], "anonymous", "{w}");
    assert_eq!(s["status"], "completed");
}

/// The prompt of `allow_then_deny`.
pub(crate) const ALLOWED: &str = "Make a file [tool:touch allowed.txt]";

/// A worker in `permission_mode: default` asked with [`ALLOWED`], in
/// `workdir`: the first tool call allowed runs there, a second one denied
/// does not and the model hears why.
pub(crate) async fn allow_then_deny(api: &TestApp, fake: &FakeAnthropic, id: &str, workdir: &Path) {
    // Allowed: the tool runs in the workspace.
    let s = until_worker(api, id, "awaiting_approval", Duration::from_secs(60)).await;
    assert_eq!(s["status"], "active");
    let pending = api
        .get_json(&format!("/sessions/{id}/approvals?status=pending"))
        .await;
    let a = &pending[0];
    assert_eq!(a["tool_name"], "Bash", "{pending}");
    assert_eq!(a["input"]["command"], "touch allowed.txt");
    let rid = a["request_id"].as_str().expect("request id").to_owned();
    assert!(
        !workdir.join("allowed.txt").exists(),
        "not before the decision"
    );
    api.post(
        &format!("/sessions/{id}/approvals/{rid}"),
        &json!({"decision": "allow"}),
    )
    .await
    .expect(200);
    eventually("the allowed file", Duration::from_secs(30), || async {
        workdir.join("allowed.txt").exists().then_some(())
    })
    .await;
    until_worker(api, id, "idle", Duration::from_secs(30)).await;
    let said = fake
        .requests()
        .into_iter()
        .filter_map(|r| r.tool_result())
        .collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(!said[0].1, "the tool succeeded: {said:?}");
    // A second decision on the same request is refused.
    api.post(
        &format!("/sessions/{id}/approvals/{rid}"),
        &json!({"decision": "deny"}),
    )
    .await
    .expect(409);

    // Denied: the tool does not run and the model hears why.
    say(api, id, "Another [tool:touch denied.txt]").await;
    until_worker(api, id, "awaiting_approval", Duration::from_secs(30)).await;
    let pending = api
        .get_json(&format!("/sessions/{id}/approvals?status=pending"))
        .await;
    let rid2 = pending[0]["request_id"].as_str().expect("id").to_owned();
    api.post(
        &format!("/sessions/{id}/approvals/{rid2}"),
        &json!({"decision": "deny", "message": "not this one"}),
    )
    .await
    .expect(200);
    let denied = eventually(
        "the denial reaches the model",
        Duration::from_secs(30),
        || async {
            fake.requests()
                .into_iter()
                .filter_map(|r| r.tool_result())
                .find(|(_, is_error)| *is_error)
        },
    )
    .await;
    assert!(denied.0.contains("not this one"), "{denied:?}");
    until_worker(api, id, "idle", Duration::from_secs(30)).await;
    assert!(
        !workdir.join("denied.txt").exists(),
        "a denied tool never runs"
    );

    let events = event_types(api, id).await;
    assert_eq!(of_type(&events, "session.approval_requested").len(), 2);
    let decided = of_type(&events, "session.approval_decided");
    assert_eq!(decided.len(), 2);
    assert_eq!(decided[0]["metadata"]["actor"], "anonymous");
    assert_eq!(decided[1]["payload"]["decision"], "deny");
    let answers: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.tool_result())
        .map(|(t, _)| t)
        .collect();
    assert!(answers.len() >= 2, "{answers:?}");
    let replies = api
        .get_json(&format!("/sessions/{id}/messages?limit=500"))
        .await;
    assert!(replies.to_string().contains(TOOL_SAID));
}

/// The worker spec of `decided_by_default`.
pub(crate) fn by_default_spec() -> Value {
    json!({"prompt": "Make a file [tool:touch by-default.txt]",
        "mode": "conversation", "permission_mode": "default",
        "approval_timeout_seconds": 1, "approval_default": "allow"})
}

/// A worker of [`by_default_spec`] working in `workdir`: nobody answers,
/// the timeout allows the tool.
pub(crate) async fn decided_by_default(api: &TestApp, id: &str, workdir: &Path) {
    eventually(
        "the file made by default",
        Duration::from_secs(60),
        || async { workdir.join("by-default.txt").exists().then_some(()) },
    )
    .await;
    let decided = api
        .get_json(&format!("/sessions/{id}/approvals?status=allowed"))
        .await;
    assert_eq!(decided[0]["reason"], "timeout", "{decided}");
    let events = event_types(api, id).await;
    let d = of_type(&events, "session.approval_decided");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["payload"]["reason"], "timeout");
}

/// The prompt of `interrupted_then_answered`.
pub(crate) const LONG_STORY: &str = "Tell a long story [slow:30]";

/// A worker asked [`LONG_STORY`]: interrupted mid-answer, it goes idle
/// with the session still active, and answers the next input with the
/// history. `worker_of` names the worker (from the session, or not): the
/// same one throughout.
pub(crate) async fn interrupted_then_answered(
    api: &TestApp,
    fake: &FakeAnthropic,
    id: &str,
    worker_of: impl Fn(&Value) -> Value,
) {
    eventually("the story under way", Duration::from_secs(60), || async {
        let log = api
            .get_json(&format!("/sessions/{id}/messages?limit=500"))
            .await;
        log.to_string().contains(FIRST_PART).then_some(())
    })
    .await;
    let worker = worker_of(&api.get(id).await);
    api.post(&format!("/sessions/{id}/interrupt"), &json!({}))
        .await
        .expect(202);
    let s = until_worker(api, id, "idle", Duration::from_secs(20)).await;
    assert_eq!(s["status"], "active", "the session stays");
    assert_eq!(worker_of(&s), worker, "and so does the worker");
    say(api, id, "Just the ending, please").await;
    let r = until_asked(fake, "Just the ending, please").await;
    assert!(mentions(&r, "Tell a long story"), "{:?}", user_texts(&r));
    let s = until_worker(api, id, "idle", Duration::from_secs(30)).await;
    assert_eq!(worker_of(&s), worker);
    assert_eq!(worker_rec(&s)["generation"], 1);
    let events = event_types(api, id).await;
    assert_eq!(of_type(&events, "session.interrupted").len(), 1);
}

/// The worker spec of `paused_when_idle`.
pub(crate) fn idle_spec() -> Value {
    json!({"prompt": "Remember the word zebra",
        "mode": "conversation", "idle_timeout_seconds": 1})
}

/// A worker of [`idle_spec`]: idle past its timeout, the runner stops it
/// and pauses the session.
pub(crate) async fn paused_when_idle(api: &TestApp, id: &str) {
    let s = eventually("the session paused", Duration::from_secs(60), || async {
        let s = api.get(id).await;
        (s["status"] == "paused").then_some(s)
    })
    .await;
    let s = if worker_rec(&s)["state"] == "exited" {
        s
    } else {
        until_worker(api, id, "exited", Duration::from_secs(30)).await
    };
    let w = worker_rec(&s);
    assert_eq!(w["paused_reason"], "idle", "{w}");
    assert_eq!(w["stop_reason"], "idle", "{w}");
    assert_eq!(w["stopped_by"], "runner", "{w}");
    assert!(w["crash_reason"].is_null(), "{w}");
}

/// The next input resumes a session `paused_when_idle`, no PATCH needed,
/// with the history, as the new worker's first message.
pub(crate) async fn input_resumes(api: &TestApp, fake: &FakeAnthropic, id: &str) {
    say(api, id, "What was the word?").await;
    let r = until_asked(fake, "What was the word?").await;
    assert!(mentions(&r, "zebra"), "{:?}", user_texts(&r));
    assert!(
        !mentions(&r, "Continue"),
        "the waiting input is the resumed worker's first message: {:?}",
        user_texts(&r)
    );
    let s = api.get(id).await;
    assert_eq!(s["status"], "active");
    assert_eq!(worker_rec(&s)["generation"], 2);
    assert_eq!(asked(fake, "What was the word?").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_runs_three_turns_in_one_worker() {
    let rig = Rig::start().await;
    let id = rig
        .create_local(json!({"prompt": TURN_ONE, "mode": "conversation"}))
        .await;
    let first = until_worker(&rig.api, &id, "idle", Duration::from_secs(60)).await;
    let pid = worker_rec(&first)["pid"].clone();
    assert!(pid.is_i64(), "{first}");
    let s = three_turns(&rig.api, &rig.fake, &id).await;
    let w = worker_rec(&s);
    assert_eq!(w["pid"], pid, "one worker process for every turn: {w}");
    complete_stops_the_worker(&rig.api, &id).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_sent_while_the_runner_was_down_is_delivered_once() {
    let api = TestApp::spawn().await;
    let fake = FakeAnthropic::start().await;
    let root = temp_root();
    let mut first = RunnerProcess::spawn(&api, &root, &fake.url, "runner-1.log");
    let s = api
        .create_session(&json!({"agent_id": Uuid::new_v4(), "session_type": "task",
            "runtime_backend": "local",
            "worker": {"prompt": "Hello there", "mode": "conversation"}}))
        .await;
    let id = crate::support::app::id_of(&s);
    let idle = until_worker(&api, &id, "idle", Duration::from_secs(60)).await;
    let pid = worker_rec(&idle)["pid"].clone();

    first.kill9();
    // Accepted with no runner to deliver it: kept.
    assert_eq!(say(&api, &id, "While you were away").await, 1);
    assert!(asked(&fake, "While you were away").is_empty());

    let mut second = RunnerProcess::spawn(&api, &root, &fake.url, "runner-2.log");
    let r = until_asked(&fake, "While you were away").await;
    assert!(mentions(&r, "Hello there"), "{:?}", user_texts(&r));
    let s = eventually("the input taken", Duration::from_secs(30), || async {
        let s = api.get(&id).await;
        (worker_rec(&s)["input_seq"] == 1 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    assert_eq!(worker_rec(&s)["pid"], pid, "the adopted worker took it");
    // A third runner after another kill -9 writes nothing again.
    second.kill9();
    let mut third = RunnerProcess::spawn(&api, &root, &fake.url, "runner-3.log");
    assert_eq!(say(&api, &id, "And now").await, 2);
    until_asked(&fake, "And now").await;
    eventually(
        "the second input taken",
        Duration::from_secs(30),
        || async {
            let s = api.get(&id).await;
            (worker_rec(&s)["input_seq"] == 2 && worker_rec(&s)["state"] == "idle").then_some(())
        },
    )
    .await;
    assert_eq!(
        asked(&fake, "While you were away").len(),
        1,
        "delivered exactly once across two restarts\n{}",
        third.log_text()
    );
    assert_eq!(asked(&fake, "And now").len(), 1);

    third.terminate();
    clean_root(&root);
    fake.stop().await;
    api.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_to_a_paused_session_waits_for_its_resume() {
    let rig = Rig::start().await;
    let id = rig
        .create_local(json!({"prompt": "Plan the trip", "mode": "conversation"}))
        .await;
    until_worker(&rig.api, &id, "idle", Duration::from_secs(60)).await;
    rig.api
        .merge_patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    let s = until_worker(&rig.api, &id, "exited", Duration::from_secs(30)).await;
    assert_eq!(worker_rec(&s)["stop_reason"], "paused");
    say(&rig.api, &id, "Add a day in Lyon").await;
    rig.runner.until_resyncs(1).await;
    assert!(
        asked(&rig.fake, "Add a day in Lyon").is_empty(),
        "kept while paused"
    );
    rig.api
        .merge_patch(&id, &json!({"status": "active"}))
        .await
        .expect(200);
    let r = until_asked(&rig.fake, "Add a day in Lyon").await;
    assert!(mentions(&r, "Plan the trip"), "resumed with its history");
    assert!(
        !mentions(&r, "Continue"),
        "the waiting input is the resumed worker's first message: {:?}",
        user_texts(&r)
    );
    let s = until_worker(&rig.api, &id, "idle", Duration::from_secs(30)).await;
    assert_eq!(worker_rec(&s)["generation"], 2);
    assert_eq!(asked(&rig.fake, "Add a day in Lyon").len(), 1);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_allow_and_deny() {
    let rig = Rig::start().await;
    let id = rig
        .create_local(json!({"prompt": ALLOWED,
            "mode": "conversation", "permission_mode": "default"}))
        .await;
    let workdir = rig.runner.root.join(&id).join("work");
    allow_then_deny(&rig.api, &rig.fake, &id, &workdir).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_approval_gets_the_default() {
    let rig = Rig::start().await;
    let id = rig.create_local(by_default_spec()).await;
    let workdir = rig.runner.root.join(&id).join("work");
    decided_by_default(&rig.api, &id, &workdir).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_ends_the_turn_and_the_next_input_is_answered() {
    let rig = Rig::start().await;
    let id = rig
        .create_local(json!({"prompt": LONG_STORY, "mode": "conversation"}))
        .await;
    interrupted_then_answered(&rig.api, &rig.fake, &id, |s| worker_rec(s)["pid"].clone()).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_conversation_pauses_and_the_next_input_resumes_it() {
    let rig = Rig::start().await;
    let id = rig.create_local(idle_spec()).await;
    paused_when_idle(&rig.api, &id).await;
    input_resumes(&rig.api, &rig.fake, &id).await;
    rig.stop().await;
}
