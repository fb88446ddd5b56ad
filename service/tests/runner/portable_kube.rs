//! Portable sessions across backends, with the real CLI: its transcript reaches the service
//! from a pod (through the worker shim's lines in the pod log), and a
//! paused session moves local → kubernetes → local, each new worker
//! resuming from the service's copy (the one backend had none), the model
//! getting the whole history every time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kubernetes::{KubeRig, args_of, claim_name, cli_kubelet, kube_settings, pod_name};
use crate::live::{TURN_ONE, say, until_asked, until_worker, user_texts, worker_rec};
use crate::support::app::TestApp;
use crate::support::fake_anthropic::FakeAnthropic;
use crate::support::fake_kube::FakeKube;
use crate::support::runner::{InProcessRunner, worker_env};
use crate::support::{Explain, claude_bin, eventually};
use agent_sessions::settings::BackendChoice;
use serde_json::{Value, json};

/// Long enough for the CLI to start (in a pod or not) and answer.
const CLI: Duration = Duration::from_secs(60);

struct Portable {
    rig: KubeRig,
    model: FakeAnthropic,
}

impl Portable {
    /// The API, the fake cluster running the real CLI (behind the shim),
    /// the fake model, and one runner with both backends.
    async fn start() -> Self {
        let model = FakeAnthropic::start().await;
        let kube = FakeKube::start_with_kubelet(cli_kubelet()).await;
        let mut rig = KubeRig::prepare_on(kube).await;
        let mut settings = kube_settings(&rig.api, &rig.kube);
        settings.runner.api_url = rig.proxy.url.clone();
        settings.runner.backend = BackendChoice::Both;
        settings.runner.claude_bin = claude_bin();
        settings.runner.interrupt_grace_ms = 3000;
        settings.runner.terminate_grace_ms = 2000;
        rig.runner = Some(InProcessRunner::start(settings, worker_env(&model.url)));
        Self { rig, model }
    }

    fn api(&self) -> &TestApp {
        &self.rig.api
    }

    /// The local backend's directory for the session.
    fn local_workspace(&self, id: &str) -> PathBuf {
        self.rig.runner.as_ref().expect("runner").root.join(id)
    }

    async fn stop(self) {
        self.rig.stop().await;
        self.model.stop().await;
    }
}

/// The service's copy of the session's transcript.
async fn stored(api: &TestApp, id: &str) -> String {
    api.fetch(&format!("/sessions/{id}/transcript"))
        .await
        .expect(200)
        .text()
}

/// Until the service's transcript holds `text`.
async fn until_stored(api: &TestApp, id: &str, text: &str) -> String {
    eventually(
        format!("{text:?} in the service's transcript"),
        CLI,
        || async {
            let t = stored(api, id).await;
            t.contains(text).then_some(t)
        },
    )
    .await
}

/// The transcript file the CLI keeps under `config_dir`.
fn transcript_file(config_dir: &Path, id: &str) -> Option<PathBuf> {
    std::fs::read_dir(config_dir.join("projects"))
        .ok()?
        .flatten()
        .map(|d| d.path().join(format!("{id}.jsonl")))
        .find(|p| p.is_file())
}

async fn pause(api: &TestApp, id: &str) {
    api.merge_patch(id, &json!({"status": "paused"}))
        .await
        .expect(200);
    eventually("the session paused, its worker gone", CLI, || async {
        let s = api.get(id).await;
        (s["status"] == "paused" && worker_rec(&s)["state"] == "exited").then_some(())
    })
    .await;
}

/// Move the paused session to `backend`, say `text`, resume it; the model
/// request for `text`.
async fn resume_on(t: &Portable, id: &str, backend: &str, text: &str) -> Value {
    let api = t.api();
    api.merge_patch(id, &json!({"runtime_backend": backend}))
        .await
        .expect(200);
    say(api, id, text).await;
    api.merge_patch(id, &json!({"status": "active"}))
        .await
        .expect(200);
    let r = until_asked(&t.model, text).await;
    json!(user_texts(&r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portable_a_pods_transcript_reaches_the_service() {
    let t = Portable::start().await;
    let api = t.api();
    let id = t
        .rig
        .create(
            "kubernetes",
            Some(json!({"prompt": TURN_ONE, "mode": "conversation"})),
        )
        .await;
    until_worker(api, &id, "idle", CLI).await;
    // The service's copy is the claim's file, byte for byte, once the
    // shim has reported it.
    let config = t.rig.kube.claim_dir(&claim_name(&id)).join(".claude");
    let file = eventually("the transcript on the claim", CLI, || async {
        transcript_file(&config, &id)
    })
    .await;
    let same = eventually(
        Explain(|| {
            format!(
                "the service's transcript equal to the claim's file; the pod log: {:#?}",
                t.rig.kube.log_of(&pod_name(&id))
            )
        }),
        CLI,
        || async {
            let file = std::fs::read_to_string(&file).ok()?;
            let stored = stored(api, &id).await;
            (!stored.is_empty() && stored == file && stored.contains("remember zebra"))
                .then_some(stored)
        },
    )
    .await;
    for line in same.lines() {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        assert!(v.is_object(), "{line}");
    }
    // The shim's lines were the service's, not the session's messages.
    let messages = api
        .get_json(&format!("/sessions/{id}/messages?limit=500"))
        .await;
    assert!(
        !messages.to_string().contains("agent_sessions."),
        "{messages}"
    );
    assert!(
        messages.to_string().contains("remember zebra"),
        "the CLI's own lines still are: {messages}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portable_a_paused_session_moves_local_to_kubernetes_and_back_with_its_history() {
    let t = Portable::start().await;
    let api = t.api();
    let id = t
        .rig
        .create(
            "local",
            Some(json!({"prompt": TURN_ONE, "mode": "conversation"})),
        )
        .await;
    let s = until_worker(api, &id, "idle", CLI).await;
    assert!(worker_rec(&s)["pid"].is_i64(), "a local worker: {s}");
    until_stored(api, &id, "remember zebra").await;
    pause(api, &id).await;
    // All of it: the worker's last lines are sent before its exit is told.
    let first = stored(api, &id).await;

    // To the cluster: no claim there yet, so the pod gets the service's
    // transcript through its stdin before the CLI starts.
    let texts = resume_on(&t, &id, "kubernetes", "Turn two").await;
    assert!(
        texts.to_string().contains(TURN_ONE),
        "the pod's CLI sends the earlier turn: {texts}"
    );
    let pod = t.rig.kube.pod(&pod_name(&id)).expect("the worker pod");
    assert!(args_of(&pod).iter().any(|a| a == "--resume"), "{pod}");
    assert_eq!(
        pod["metadata"]["annotations"]["agent-sessions.io/restore"],
        first.len().to_string()
    );
    let (stdin, _) = t.rig.kube.stdin_of(&pod_name(&id));
    let frame = format!(
        "{{\"agent_sessions\":\"restore\",\"length\":{}}}\n{first}",
        first.len()
    );
    assert!(
        stdin.starts_with(frame.as_bytes()),
        "{}",
        String::from_utf8_lossy(&stdin)
    );
    let s = eventually("turn two taken in the pod", CLI, || async {
        let s = api.get(&id).await;
        (worker_rec(&s)["input_seq"] == 1 && worker_rec(&s)["state"] == "idle").then_some(s)
    })
    .await;
    assert_eq!(worker_rec(&s)["pod"], pod_name(&id).as_str(), "{s}");
    // What the pod's CLI added reaches the service after what it restored.
    until_stored(api, &id, "Turn two").await;
    pause(api, &id).await;
    t.rig.until_no_pod(&pod_name(&id)).await;
    let second = stored(api, &id).await;
    assert!(second.starts_with(&first), "appended, not rewritten");

    // Back to local, where the workspace is gone meanwhile.
    let ws = t.local_workspace(&id);
    assert!(ws.is_dir(), "{}", ws.display());
    std::fs::remove_dir_all(&ws).expect("remove the local workspace");
    let texts = resume_on(&t, &id, "local", "Turn three").await;
    assert!(
        texts.to_string().contains(TURN_ONE) && texts.to_string().contains("Turn two"),
        "the local CLI sends both earlier turns: {texts}"
    );
    let s = api.get(&id).await;
    assert!(worker_rec(&s)["pid"].is_i64(), "a local worker again: {s}");
    let third = until_stored(api, &id, "Turn three").await;
    assert!(third.starts_with(&second), "appended, not rewritten");
    t.stop().await;
}
