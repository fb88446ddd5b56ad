//! Live sessions on the Kubernetes backend: the flows of `live` with the
//! runner in-process on the kubernetes backend, the fake API server in its
//! real-kubelet mode running the real Claude Code CLI as the pod's
//! container (stdin through `pods/attach`, output through the pod log), and
//! the fake Anthropic API as the model. One pod serves many turns; tool
//! approvals are allowed, denied or decided by the timeout; an interrupt
//! ends a turn and keeps the pod; the idle timeout deletes the pod, keeps
//! the claim, and the next input resumes the conversation in a new pod.

use std::time::Duration;

use crate::kubernetes::{KubeRig, args_of, claim_name, pod_name};
use crate::live::{
    asked, event_types, mentions, of_type, say, until_asked, until_worker, user_texts, worker_rec,
};
use crate::support::claude_bin;
use crate::support::eventually;
use crate::support::fake_anthropic::{FIRST_PART, FakeAnthropic, TOOL_SAID};
use crate::support::fake_kube::{FakeKube, KubeletConfig};
use crate::support::runner::worker_env;
use serde_json::{Value, json};

/// Long enough for the CLI to start in its pod and answer.
const CLI: Duration = Duration::from_secs(60);
const TURN: Duration = Duration::from_secs(30);

struct LiveKube {
    rig: KubeRig,
    model: FakeAnthropic,
}

impl LiveKube {
    async fn start() -> Self {
        let model = FakeAnthropic::start().await;
        let kubelet = KubeletConfig::new()
            .program("claude", &[&claude_bin()])
            .secret(
                "anthropic",
                "ANTHROPIC_API_KEY",
                "sk-ant-test-not-a-real-key",
            );
        let mut rig = KubeRig::prepare_on(FakeKube::start_with_kubelet(kubelet).await).await;
        // The runner passes the model's address on to its pods (the key
        // comes from the Secret).
        rig.start_runner_with(worker_env(&model.url));
        Self { rig, model }
    }

    async fn stop(self) {
        self.rig.stop().await;
        self.model.stop().await;
    }

    async fn create(&self, worker: Value) -> String {
        self.rig.create("kubernetes", Some(worker)).await
    }

    /// The session's pod as the fake API server holds it.
    fn pod(&self, id: &str) -> Value {
        self.rig.kube.pod(&pod_name(id)).expect("the worker pod")
    }

    /// Where the worker works: the pod's working directory (the claim's
    /// root, `/workspace`) as the fake kubelet maps it.
    fn workdir(&self, id: &str) -> std::path::PathBuf {
        assert_eq!(
            self.pod(id)["spec"]["containers"][0]["workingDir"],
            "/workspace"
        );
        self.rig.kube.claim_dir(&claim_name(id))
    }
}

fn uid(pod: &Value) -> Value {
    pod["metadata"]["uid"].clone()
}

fn running(pod: &Value) -> bool {
    pod["status"]["containerStatuses"][0]["state"]["running"].is_object()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_a_conversation_runs_three_turns_in_one_pod() {
    let t = LiveKube::start().await;
    let api = &t.rig.api;
    let id = t
        .create(json!({"prompt": "Turn one: remember zebra", "mode": "conversation"}))
        .await;
    let first = until_worker(api, &id, "idle", CLI).await;
    assert_eq!(worker_rec(&first)["pod"], pod_name(&id).as_str());
    let pod = uid(&t.pod(&id));

    assert_eq!(say(api, &id, "Turn two").await, 1);
    let two = until_asked(&t.model, "Turn two").await;
    assert!(
        mentions(&two, "Turn one: remember zebra"),
        "{:?}",
        user_texts(&two)
    );
    let s = eventually("turn two taken", TURN, || async {
        let s = api.get(&id).await;
        (worker_rec(&s)["input_seq"] == 1 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    assert_eq!(s["status"], "active", "a conversation stays active");

    assert_eq!(say(api, &id, "Turn three").await, 2);
    let three = until_asked(&t.model, "Turn three").await;
    let texts = user_texts(&three);
    assert!(
        mentions(&three, "Turn one") && mentions(&three, "Turn two"),
        "each turn sends the earlier ones: {texts:?}"
    );
    let s = eventually("turn three taken", TURN, || async {
        let s = api.get(&id).await;
        (worker_rec(&s)["input_seq"] == 2 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    let w = worker_rec(&s);
    // One pod for every turn, its container still running.
    let now = t.pod(&id);
    assert_eq!(uid(&now), pod, "the same pod: {w}");
    assert!(running(&now), "{now}");
    assert_eq!(t.rig.kube.creations(&pod_name(&id)).len(), 1);
    assert_eq!(w["generation"], 1, "{w}");
    assert_eq!(w["pod"], pod_name(&id).as_str(), "{w}");
    assert!(w["turns"].as_u64().unwrap_or(0) >= 3, "{w}");
    assert!(w["cost_micro_usd"].as_u64().unwrap_or(0) > 0, "{w}");
    // Each input asked the model exactly once.
    assert_eq!(asked(&t.model, "Turn two").len(), 1);
    assert_eq!(asked(&t.model, "Turn three").len(), 1);
    let events = event_types(api, &id).await;
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

    // Completing the session stops the worker (its pod goes), recorded as
    // such.
    api.merge_patch(&id, &json!({"status": "completed"}))
        .await
        .expect(200);
    let s = until_worker(api, &id, "exited", TURN).await;
    let w = worker_rec(&s);
    assert_eq!(w["stop_reason"], "finished", "{w}");
    assert_eq!(w["stopped_by"], "anonymous", "{w}");
    assert_eq!(s["status"], "completed");
    t.rig.until_no_pod(&pod_name(&id)).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_approvals_allow_and_deny() {
    let t = LiveKube::start().await;
    let api = &t.rig.api;
    let id = t
        .create(json!({"prompt": "Make a file [tool:touch allowed.txt]",
            "mode": "conversation", "permission_mode": "default"}))
        .await;

    // Allowed: the tool runs in the workspace, on the claim.
    let s = until_worker(api, &id, "awaiting_approval", CLI).await;
    assert_eq!(s["status"], "active");
    let workdir = t.workdir(&id);
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
    eventually("the allowed file", TURN, || async {
        workdir.join("allowed.txt").exists().then_some(())
    })
    .await;
    until_worker(api, &id, "idle", TURN).await;
    let said = t
        .model
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
    say(api, &id, "Another [tool:touch denied.txt]").await;
    until_worker(api, &id, "awaiting_approval", TURN).await;
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
    let denied = eventually("the denial reaches the model", TURN, || async {
        t.model
            .requests()
            .into_iter()
            .filter_map(|r| r.tool_result())
            .find(|(_, is_error)| *is_error)
    })
    .await;
    assert!(denied.0.contains("not this one"), "{denied:?}");
    until_worker(api, &id, "idle", TURN).await;
    assert!(
        !workdir.join("denied.txt").exists(),
        "a denied tool never runs"
    );

    let events = event_types(api, &id).await;
    assert_eq!(of_type(&events, "session.approval_requested").len(), 2);
    let decided = of_type(&events, "session.approval_decided");
    assert_eq!(decided.len(), 2);
    assert_eq!(decided[0]["metadata"]["actor"], "anonymous");
    assert_eq!(decided[1]["payload"]["decision"], "deny");
    let replies = api
        .get_json(&format!("/sessions/{id}/messages?limit=500"))
        .await;
    assert!(replies.to_string().contains(TOOL_SAID));
    // All of it in the one pod.
    assert_eq!(t.rig.kube.creations(&pod_name(&id)).len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_an_unanswered_approval_gets_the_default() {
    let t = LiveKube::start().await;
    let api = &t.rig.api;
    let id = t
        .create(json!({"prompt": "Make a file [tool:touch by-default.txt]",
            "mode": "conversation", "permission_mode": "default",
            "approval_timeout_seconds": 1, "approval_default": "allow"}))
        .await;
    let workdir = t.rig.kube.claim_dir(&claim_name(&id));
    eventually("the file made by default", CLI, || async {
        workdir.join("by-default.txt").exists().then_some(())
    })
    .await;
    let decided = api
        .get_json(&format!("/sessions/{id}/approvals?status=allowed"))
        .await;
    assert_eq!(decided[0]["reason"], "timeout", "{decided}");
    let events = event_types(api, &id).await;
    let d = of_type(&events, "session.approval_decided");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["payload"]["reason"], "timeout");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_interrupt_ends_the_turn_and_the_next_input_is_answered() {
    let t = LiveKube::start().await;
    let api = &t.rig.api;
    let id = t
        .create(json!({"prompt": "Tell a long story [slow:30]", "mode": "conversation"}))
        .await;
    eventually("the story under way", CLI, || async {
        let log = api
            .get_json(&format!("/sessions/{id}/messages?limit=500"))
            .await;
        log.to_string().contains(FIRST_PART).then_some(())
    })
    .await;
    let pod = uid(&t.pod(&id));
    api.post(&format!("/sessions/{id}/interrupt"), &json!({}))
        .await
        .expect(202);
    let s = until_worker(api, &id, "idle", Duration::from_secs(20)).await;
    assert_eq!(s["status"], "active", "the session stays");
    let now = t.pod(&id);
    assert_eq!(uid(&now), pod, "and so does the pod");
    assert!(running(&now), "{now}");
    say(api, &id, "Just the ending, please").await;
    let r = until_asked(&t.model, "Just the ending, please").await;
    assert!(mentions(&r, "Tell a long story"), "{:?}", user_texts(&r));
    let s = until_worker(api, &id, "idle", TURN).await;
    assert_eq!(worker_rec(&s)["generation"], 1);
    assert_eq!(uid(&t.pod(&id)), pod);
    assert_eq!(t.rig.kube.creations(&pod_name(&id)).len(), 1);
    let events = event_types(api, &id).await;
    assert_eq!(of_type(&events, "session.interrupted").len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_an_idle_conversation_pauses_and_the_next_input_resumes_it() {
    let t = LiveKube::start().await;
    let api = &t.rig.api;
    let id = t
        .create(json!({"prompt": "Remember the word zebra",
            "mode": "conversation", "idle_timeout_seconds": 1}))
        .await;
    let claim = eventually("the claim", CLI, || async {
        t.rig.kube.claim(&claim_name(&id))
    })
    .await;
    let s = eventually("the session paused", CLI, || async {
        let s = api.get(&id).await;
        (s["status"] == "paused").then_some(s)
    })
    .await;
    let s = if worker_rec(&s)["state"] == "exited" {
        s
    } else {
        until_worker(api, &id, "exited", TURN).await
    };
    let w = worker_rec(&s);
    assert_eq!(w["paused_reason"], "idle", "{w}");
    assert_eq!(w["stop_reason"], "idle", "{w}");
    assert_eq!(w["stopped_by"], "runner", "{w}");
    assert!(w["crash_reason"].is_null(), "{w}");
    // The pod goes, the claim (and the transcript on it) stays.
    t.rig.until_no_pod(&pod_name(&id)).await;
    let kept = t
        .rig
        .kube
        .claim(&claim_name(&id))
        .expect("the claim is kept");
    assert_eq!(uid(&kept), uid(&claim));

    // The next input resumes it, no PATCH needed, with the history, in a
    // new pod that resumes the CLI's session.
    say(api, &id, "What was the word?").await;
    let r = until_asked(&t.model, "What was the word?").await;
    assert!(mentions(&r, "zebra"), "{:?}", user_texts(&r));
    assert!(
        !mentions(&r, "Continue"),
        "the waiting input is the resumed worker's first message: {:?}",
        user_texts(&r)
    );
    let pod = t.rig.until_pod(&id, 2).await;
    let args = args_of(&pod);
    let at = args.iter().position(|a| a == "--resume").expect("--resume");
    assert_eq!(args[at + 1], id);
    let s = api.get(&id).await;
    assert_eq!(s["status"], "active");
    assert_eq!(worker_rec(&s)["generation"], 2);
    assert_eq!(asked(&t.model, "What was the word?").len(), 1);
    t.stop().await;
}
