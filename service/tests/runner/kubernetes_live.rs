//! Live sessions on the Kubernetes backend: the flows of `live` with the
//! runner in-process on the kubernetes backend, the fake API server in its
//! real-kubelet mode running the real Claude Code CLI as the pod's
//! container (stdin through `pods/attach`, output through the pod log), and
//! the fake Anthropic API as the model. One pod serves many turns; tool
//! approvals are allowed, denied or decided by the timeout; an interrupt
//! ends a turn and keeps the pod; the idle timeout deletes the pod, keeps
//! the claim, and the next input resumes the conversation in a new pod.

use std::path::PathBuf;
use std::time::Duration;

use crate::kubernetes::{KubeRig, args_of, claim_name, cli_kubelet, pod_name};
use crate::live::{
    ALLOWED, LONG_STORY, TURN_ONE, allow_then_deny, by_default_spec, complete_stops_the_worker,
    decided_by_default, idle_spec, input_resumes, interrupted_then_answered, paused_when_idle,
    three_turns, until_worker, worker_rec,
};
use crate::support::eventually;
use crate::support::fake_anthropic::FakeAnthropic;
use crate::support::fake_kube::FakeKube;
use crate::support::runner::worker_env;
use serde_json::{Value, json};

/// Long enough for the CLI to start in its pod and answer.
const CLI: Duration = Duration::from_secs(60);

struct LiveKube {
    rig: KubeRig,
    model: FakeAnthropic,
}

impl LiveKube {
    async fn start() -> Self {
        let model = FakeAnthropic::start().await;
        let kube = FakeKube::start_with_kubelet(cli_kubelet()).await;
        let mut rig = KubeRig::prepare_on(kube).await;
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
    /// root, `/workspace`), as the fake kubelet maps it.
    fn workdir(&self, id: &str) -> PathBuf {
        self.rig.kube.claim_dir(&claim_name(id))
    }

    /// The session's first and only pod, its container still running.
    fn one_running_pod(&self, id: &str) -> Value {
        let pod = self.pod(id);
        assert!(running(&pod), "{pod}");
        assert_eq!(pod["spec"]["containers"][0]["workingDir"], "/workspace");
        assert_eq!(self.rig.kube.creations(&pod_name(id)).len(), 1);
        pod
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
        .create(json!({"prompt": TURN_ONE, "mode": "conversation"}))
        .await;
    let first = until_worker(api, &id, "idle", CLI).await;
    assert_eq!(worker_rec(&first)["pod"], pod_name(&id).as_str());
    let pod = uid(&t.pod(&id));
    let s = three_turns(api, &t.model, &id).await;
    let w = worker_rec(&s);
    assert_eq!(w["pod"], pod_name(&id).as_str(), "{w}");
    assert_eq!(uid(&t.one_running_pod(&id)), pod, "one pod for every turn");
    complete_stops_the_worker(api, &id).await;
    t.rig.until_no_pod(&pod_name(&id)).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_approvals_allow_and_deny() {
    let t = LiveKube::start().await;
    let id = t
        .create(json!({"prompt": ALLOWED,
            "mode": "conversation", "permission_mode": "default"}))
        .await;
    allow_then_deny(&t.rig.api, &t.model, &id, &t.workdir(&id)).await;
    t.one_running_pod(&id);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_an_unanswered_approval_gets_the_default() {
    let t = LiveKube::start().await;
    let id = t.create(by_default_spec()).await;
    decided_by_default(&t.rig.api, &id, &t.workdir(&id)).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_interrupt_ends_the_turn_and_the_next_input_is_answered() {
    let t = LiveKube::start().await;
    let id = t
        .create(json!({"prompt": LONG_STORY, "mode": "conversation"}))
        .await;
    interrupted_then_answered(&t.rig.api, &t.model, &id, |_| uid(&t.pod(&id))).await;
    t.one_running_pod(&id);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_an_idle_conversation_pauses_and_the_next_input_resumes_it() {
    let t = LiveKube::start().await;
    let id = t.create(idle_spec()).await;
    let claim = eventually("the claim", CLI, || async {
        t.rig.kube.claim(&claim_name(&id))
    })
    .await;
    paused_when_idle(&t.rig.api, &id).await;
    // The pod goes, the claim (and the transcript on it) stays.
    t.rig.until_no_pod(&pod_name(&id)).await;
    let kept = t
        .rig
        .kube
        .claim(&claim_name(&id))
        .expect("the claim is kept");
    assert_eq!(uid(&kept), uid(&claim));
    input_resumes(&t.rig.api, &t.model, &id).await;
    // In a new pod that resumes the CLI's session.
    let pod = t.rig.until_pod(&id, 2).await;
    let args = args_of(&pod);
    let at = args.iter().position(|a| a == "--resume").expect("--resume");
    assert_eq!(args[at + 1], id);
    t.stop().await;
}
