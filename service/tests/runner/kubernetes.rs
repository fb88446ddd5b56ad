//! The runner's kubernetes backend against a fake Kubernetes API server on
//! loopback (`support::fake_kube`), with the API service in-process on its
//! own database. The test plays the scheduler and the kubelet: it moves pod
//! phases and container states and prints the worker's stream-json (lines
//! captured from the real CLI, `src/runner/testdata`) into the pod log.
//! Every Kubernetes call must be one the chart's runner Role grants: the
//! fake refuses anything else, and each test checks nothing was refused.
//!
//! The attach tests run the fake in its real-kubelet mode: the pod's
//! container is a local process (`cat`, or the real Claude Code CLI against
//! the fake Anthropic API) whose stdin the runner writes through
//! `pods/attach` and whose output comes back through the pod log.

use std::time::{Duration, Instant};

use crate::support::app::{TestApp, id_of};
use crate::support::fake_anthropic::{FakeAnthropic, REPLY};
use crate::support::fake_kube::{FakeKube, KubeletConfig, NAMESPACE, chart_rbac};
use crate::support::messages_proxy::MessagesProxy;
use crate::support::runner::{InProcessRunner, temp_root};
use crate::support::{Explain, claude_bin, eventually};
use agent_sessions::domain::WorkerSpec;
use agent_sessions::runner::api::ApiClient;
use agent_sessions::runner::backend::{Backend, StartRequest};
use agent_sessions::runner::claude::Launch;
use agent_sessions::runner::kubernetes::{self, KubeConfig, KubernetesBackend};
use agent_sessions::settings::{BackendChoice, Settings};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);

/// A fixture's lines, as the worker of session `id` would print them.
fn lines(fixture: &str, id: &str) -> Vec<String> {
    let fixture_id = fixture
        .split("\"session_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a session id in the fixture");
    fixture
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.replace(fixture_id, id))
        .collect()
}

const SUCCESS: &str = include_str!("../../src/runner/testdata/success.jsonl");
const INTERRUPTED: &str = include_str!("../../src/runner/testdata/interrupted.jsonl");

pub(crate) fn pod_name(id: &str) -> String {
    format!("as-worker-{id}")
}

pub(crate) fn claim_name(id: &str) -> String {
    format!("as-ws-{id}")
}

pub(crate) fn kube_settings(api: &TestApp, kube: &FakeKube) -> Settings {
    let mut s = api.settings.clone();
    s.runner.api_url = api.url.clone();
    s.runner.workspace_root = temp_root();
    s.runner.backend = BackendChoice::Kubernetes;
    s.runner.kube_api_url = Some(kube.url.clone());
    s.runner.namespace = NAMESPACE.to_owned();
    s.runner.worker_image = "agent-sessions-worker:test".to_owned();
    s.runner.api_key_secret = "anthropic".to_owned();
    s.runner.api_key_secret_key = "ANTHROPIC_API_KEY".to_owned();
    s.runner.resync_interval_secs = 1;
    s.runner.delete_claim_on_completion = true;
    s
}

/// A backend of its own on the fake cluster, for attaching to pods (the
/// runner under test does not hand out its backend).
async fn attacher(settings: &Settings) -> KubernetesBackend {
    let client = kubernetes::client(&settings.runner)
        .await
        .expect("kube client");
    let cfg = KubeConfig::from_settings(&settings.runner, &[]);
    let api = ApiClient::new(&settings.runner.api_url, None).expect("API client");
    let (wake, _) = tokio::sync::mpsc::unbounded_channel();
    KubernetesBackend::new(cfg, client, api, wake)
}

/// Write `text` to the pod's stdin through a fresh attach, flush, detach.
async fn write_stdin(backend: &KubernetesBackend, pod: &str, text: &str) {
    let mut stdin = backend.attach_stdin(pod).await.expect("attach");
    stdin.write_all(text.as_bytes()).await.expect("write");
    stdin.flush().await.expect("flush");
}

pub(crate) struct KubeRig {
    pub(crate) api: TestApp,
    pub(crate) kube: FakeKube,
    /// The runner reaches the API through it; it records posted messages.
    pub(crate) proxy: MessagesProxy,
    pub(crate) runner: Option<InProcessRunner>,
}

impl KubeRig {
    /// The API and the fake cluster, without a runner yet.
    async fn prepare() -> Self {
        Self::prepare_on(FakeKube::start().await).await
    }

    pub(crate) async fn prepare_on(kube: FakeKube) -> Self {
        let api = TestApp::spawn().await;
        let proxy = MessagesProxy::start(&api.url).await;
        Self {
            api,
            kube,
            proxy,
            runner: None,
        }
    }

    fn start_runner(&mut self) {
        // What the runner's own environment passes on: not the key.
        self.start_runner_with(vec![
            (
                "ANTHROPIC_BASE_URL".to_owned(),
                "http://llm.example:8080".to_owned(),
            ),
            (
                "ANTHROPIC_API_KEY".to_owned(),
                "sk-ant-must-not-reach-a-pod".to_owned(),
            ),
        ]);
    }

    /// The runner, with `env` as its own environment (what it may pass on
    /// to workers).
    pub(crate) fn start_runner_with(&mut self, env: Vec<(String, String)>) {
        let mut settings = kube_settings(&self.api, &self.kube);
        settings.runner.api_url = self.proxy.url.clone();
        self.runner = Some(InProcessRunner::start(settings, env));
    }

    async fn start() -> Self {
        let mut rig = Self::prepare().await;
        rig.start_runner();
        rig
    }

    pub(crate) async fn stop(self) {
        let refused = self.kube.refused();
        if let Some(r) = self.runner {
            r.stop().await;
        }
        self.proxy.stop().await;
        self.kube.stop().await;
        self.api.teardown().await;
        assert!(
            refused.is_empty(),
            "calls the chart's Role does not grant: {refused:?}"
        );
    }

    pub(crate) async fn create(&self, backend: &str, worker: Option<Value>) -> String {
        let mut body = json!({"agent_id": Uuid::new_v4(), "session_type": "task",
            "runtime_backend": backend});
        if let Some(w) = worker {
            body["worker"] = w;
        }
        let s = self.api.create_session(&body).await;
        id_of(&s)
    }

    async fn create_managed(&self) -> String {
        self.create("kubernetes", Some(json!({"prompt": "Say hello"})))
            .await
    }

    pub(crate) async fn until_status(&self, id: &str, status: &str) -> Value {
        eventually(&format!("session {id} to be {status}"), LIMIT, || async {
            let s = self.api.get(id).await;
            (s["status"] == status).then_some(s)
        })
        .await
    }

    /// The worker record once `check` holds for it.
    async fn until_worker(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(what, LIMIT, || async {
            let s = self.api.get(id).await;
            let w = s["runtime_metadata"]["worker"].clone();
            check(&w).then_some(w)
        })
        .await
    }

    /// The session's pod once it exists with `generation`.
    pub(crate) async fn until_pod(&self, id: &str, generation: u64) -> Value {
        let name = pod_name(id);
        eventually(
            &format!("pod {name} of generation {generation}"),
            LIMIT,
            || async {
                self.kube.pod(&name).filter(|p| {
                    p["metadata"]["labels"]["agent-sessions.io/generation"]
                        .as_str()
                        .and_then(|g| g.parse::<u64>().ok())
                        == Some(generation)
                })
            },
        )
        .await
    }

    pub(crate) async fn until_no_pod(&self, name: &str) {
        eventually(&format!("pod {name} to be deleted"), LIMIT, || async {
            self.kube.pod(name).is_none().then_some(())
        })
        .await;
    }

    async fn until_no_claim(&self, name: &str) {
        eventually(&format!("claim {name} to be deleted"), LIMIT, || async {
            self.kube.claim(name).is_none().then_some(())
        })
        .await;
    }

    /// Pause the session; once its pod is gone and the stop recorded, the
    /// worker record.
    async fn pause(&self, id: &str) -> Value {
        let code = self
            .api
            .merge_patch(id, &json!({"status": "paused"}))
            .await
            .status;
        assert_eq!(code, 200);
        self.until_no_pod(&pod_name(id)).await;
        self.until_worker(id, "the stop to be recorded", |w| {
            w["stopped_at"].is_string()
        })
        .await
    }

    /// Schedule and start the container, as the scheduler and kubelet would.
    async fn run_pod(&self, id: &str) {
        let name = pod_name(id);
        self.kube.schedule(&name, "node-a");
        self.until_worker(id, "the pod to be reported scheduled", |w| {
            w["pod_phase"] == "scheduled" && w["node"] == "node-a"
        })
        .await;
        self.kube.run(&name);
        self.until_worker(id, "the pod to be reported running", |w| {
            w["pod_phase"] == "running"
        })
        .await;
    }

    /// Until the runner's driver has written the prompt of a session
    /// `create_managed` made to its pod's stdin.
    async fn until_prompt_at_the_pod(&self, id: &str) {
        eventually("the prompt at the pod", LIMIT, || async {
            let (bytes, _) = self.kube.stdin_of(&pod_name(id));
            String::from_utf8_lossy(&bytes)
                .contains("Say hello")
                .then_some(())
        })
        .await;
    }

    async fn attacher(&self) -> KubernetesBackend {
        attacher(&kube_settings(&self.api, &self.kube)).await
    }

    fn print(&self, id: &str, fixture_lines: &[String]) {
        let refs: Vec<&str> = fixture_lines.iter().map(String::as_str).collect();
        self.kube.print(&pod_name(id), &refs);
    }
}

pub(crate) fn args_of(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_start_creates_a_locked_down_pod_over_its_claim() {
    let rig = KubeRig::start().await;
    let t0 = Instant::now();
    let id = rig.create_managed().await;
    let pod = rig.until_pod(&id, 1).await;
    eprintln!("pod created {:?} after the session", t0.elapsed());
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels["agent-sessions.io/session-id"], id.as_str());
    assert_eq!(labels["app.kubernetes.io/managed-by"], "agent-sessions");
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["activeDeadlineSeconds"], 86400);
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "agent-sessions-worker:test");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["resources"]["requests"]["memory"], "512Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "2Gi");
    // The CLI behind the worker image's shim, which knows the session.
    assert_eq!(
        c["command"],
        json!(["agent-sessions", "worker-shim", "--", "claude"])
    );
    assert!(
        c["env"]
            .as_array()
            .expect("env")
            .contains(&json!({"name": "AGENT_SESSIONS_SESSION_ID", "value": id}))
    );
    // Its stdin stays open across attaches; no tty.
    assert_eq!(
        (&c["stdin"], &c["stdinOnce"], &c["tty"]),
        (&json!(true), &json!(false), &json!(false))
    );
    let args = args_of(&pod);
    assert_eq!(
        &args[..11],
        [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--replay-user-messages",
            "--permission-prompt-tool",
            "stdio",
            "--session-id",
            &id,
        ]
    );
    // The prompt goes to the worker's stdin; the pod carries it for
    // whichever runner supervises it.
    let first: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["agent-sessions.io/first-message"]
            .as_str()
            .expect("first message annotation"),
    )
    .expect("JSON");
    assert_eq!(first["text"], "Say hello");
    // The key only as a Secret reference; the runner's own never leaks.
    let env = c["env"].as_array().expect("env");
    let key = env
        .iter()
        .find(|e| e["name"] == "ANTHROPIC_API_KEY")
        .expect("key");
    assert_eq!(
        key["valueFrom"]["secretKeyRef"],
        json!({"name": "anthropic", "key": "ANTHROPIC_API_KEY", "optional": false})
    );
    assert!(!pod.to_string().contains("sk-ant-must-not-reach-a-pod"));
    assert!(env.iter().any(|e| e["name"] == "ANTHROPIC_BASE_URL"));
    assert!(
        env.iter()
            .any(|e| e["name"] == "CLAUDE_CONFIG_DIR" && e["value"] == "/workspace/.claude")
    );
    // The workspace claim, mounted at /workspace.
    let claim = rig.kube.claim(&claim_name(&id)).expect("the claim");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert_eq!(
        spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
        claim_name(&id)
    );
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/workspace");
    // Recorded on the session, then its progress.
    let w = rig
        .until_worker(&id, "the pod name on the session", |w| {
            w["pod"] == pod_name(&id).as_str()
        })
        .await;
    assert_eq!(w["generation"], 1);
    assert_eq!(w["launch"], "new");
    // No attach before the container runs (the API server says 400).
    let attach = rig.attacher().await;
    assert!(attach.attach_stdin(&pod_name(&id)).await.is_err());
    rig.run_pod(&id).await;
    assert_eq!(rig.api.get(&id).await["status"], "active");
    // Then the stdin is the runner's to write: the shim's start frame (no
    // transcript to restore), its driver's initialize and the prompt,
    // through an attach of its own...
    rig.until_prompt_at_the_pod(&id).await;
    let (bytes, _) = rig.kube.stdin_of(&pod_name(&id));
    assert!(
        bytes.starts_with(b"{\"agent_sessions\":\"start\",\"offset\":0}\n{\"request\":{\"subtype\":\"initialize\"}"),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    // ...and what comes after, through another (the bytes of two attaches
    // written at once may arrive in either order).
    write_stdin(&attach, &pod_name(&id), "{\"type\":\"user\"}\n").await;
    eventually("the bytes at the pod", LIMIT, || async {
        let (bytes, attaches) = rig.kube.stdin_of(&pod_name(&id));
        (bytes.ends_with(b"{\"type\":\"user\"}\n") && attaches >= 2).then_some(())
    })
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_completion_records_usage_from_the_log_and_deletes_pod_and_claim() {
    let rig = KubeRig::start().await;
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    rig.print(&id, &lines(SUCCESS, &id));
    let t0 = Instant::now();
    rig.kube.exit(&pod_name(&id), 0, "Completed");
    let s = rig.until_status(&id, "completed").await;
    eprintln!("completed {:?} after the container exited", t0.elapsed());
    let w = &s["runtime_metadata"]["worker"];
    assert_eq!(w["exit_code"], 0, "{w}");
    assert!(w["crash_reason"].is_null(), "{w}");
    assert_eq!(w["claude_session_id"], id.as_str());
    assert_eq!(w["model"], "claude-opus-5-5");
    assert_eq!(
        (
            w["turns"].as_u64(),
            w["input_tokens"].as_u64(),
            w["output_tokens"].as_u64()
        ),
        (Some(1), Some(12), Some(7)),
        "{w}"
    );
    // Priced by the runner's table (12 × $15 + 7 × $75 per million
    // tokens), not the CLI's own total.
    assert_eq!(w["cost_micro_usd"].as_u64(), Some(705), "{w}");
    assert_eq!(w["cost_usd"].as_f64(), Some(0.000705), "{w}");
    assert_eq!(w["pod"], pod_name(&id).as_str());
    assert!(w["started_at"].is_string() && w["stopped_at"].is_string());
    rig.until_no_pod(&pod_name(&id)).await;
    rig.until_no_claim(&claim_name(&id)).await;
    eprintln!("pod and claim gone {:?} after the exit", t0.elapsed());
    // The log's stream-json, as the session's messages (posted in batches,
    // so possibly just after the status).
    eventually("the messages to arrive", LIMIT, || async {
        let text = rig.api.messages(&id).await?.to_string();
        (text.contains("Hello from fake") && text.contains("\"result\"")).then_some(())
    })
    .await;
    rig.stop().await;
}

/// A deleted session can never resume: its claim goes even where claims
/// are kept (`delete_claim_on_completion = false`), once its pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_deleting_a_session_deletes_its_claim_even_where_claims_are_kept() {
    let mut rig = KubeRig::prepare().await;
    let mut settings = kube_settings(&rig.api, &rig.kube);
    settings.runner.api_url = rig.proxy.url.clone();
    settings.runner.delete_claim_on_completion = false;
    rig.runner = Some(InProcessRunner::start(settings, Vec::new()));
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    rig.print(&id, &lines(SUCCESS, &id)[..3]);
    rig.pause(&id).await;
    assert!(
        rig.kube.claim(&claim_name(&id)).is_some(),
        "a paused session keeps its claim"
    );
    rig.api.delete(&id).await.expect(204);
    rig.until_no_claim(&claim_name(&id)).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pause_deletes_the_pod_keeps_the_claim_and_resume_recreates_it() {
    let rig = KubeRig::start().await;
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    // The CLI began its transcript (system/init) and is working.
    let all = lines(SUCCESS, &id);
    rig.print(&id, &all[..3]);
    let claim_uid = rig.kube.claim(&claim_name(&id)).expect("claim")["metadata"]["uid"].clone();

    let t0 = Instant::now();
    let w = rig.pause(&id).await;
    eprintln!(
        "pod deleted and the stop recorded {:?} after the pause",
        t0.elapsed()
    );
    assert!(w["crash_reason"].is_null(), "a pause is no crash: {w}");
    assert_eq!(rig.api.get(&id).await["status"], "paused");
    let claim = rig.kube.claim(&claim_name(&id)).expect("the claim is kept");
    assert_eq!(claim["metadata"]["uid"], claim_uid);

    let t1 = Instant::now();
    let code = rig
        .api
        .merge_patch(
            &id,
            &json!({"status": "active", "checkpoint": {"resume_prompt": "Pick up at step 2"}}),
        )
        .await
        .status;
    assert_eq!(code, 200);
    let pod = rig.until_pod(&id, 2).await;
    eprintln!("pod recreated {:?} after the resume", t1.elapsed());
    let args = args_of(&pod);
    let at = args.iter().position(|a| a == "--resume").expect("--resume");
    assert_eq!(args[at + 1], id);
    assert!(!args.contains(&"--session-id".to_owned()));
    assert!(
        pod["metadata"]["annotations"]["agent-sessions.io/first-message"]
            .as_str()
            .is_some_and(|m| m.contains("Pick up at step 2")),
        "{pod}"
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        claim_name(&id)
    );
    assert_eq!(
        rig.kube.claim(&claim_name(&id)).expect("claim")["metadata"]["uid"],
        claim_uid,
        "the same claim, so the same transcript"
    );
    assert_eq!(rig.kube.claim_names().len(), 1);
    let w = rig
        .until_worker(&id, "generation 2 recorded", |w| {
            w["pod"].is_string() && w["generation"] == 2
        })
        .await;
    assert_eq!(w["launch"], "resume");
    // The resumed worker finishes the job.
    rig.run_pod(&id).await;
    rig.print(&id, &all);
    rig.kube.exit(&pod_name(&id), 0, "Completed");
    rig.until_status(&id, "completed").await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_failed_pod_crashes_the_session_with_its_exit_code() {
    let rig = KubeRig::start().await;
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    rig.print(&id, &lines(INTERRUPTED, &id));
    rig.kube.print(
        &pod_name(&id),
        &["Error: something went wrong (stderr, not JSON)"],
    );
    let t0 = Instant::now();
    rig.kube.exit(&pod_name(&id), 1, "Error");
    let s = rig.until_status(&id, "crashed").await;
    eprintln!("crashed {:?} after the container failed", t0.elapsed());
    let w = &s["runtime_metadata"]["worker"];
    assert_eq!(w["crash_reason"], "exit_code", "{w}");
    assert_eq!(w["exit_code"], 1, "{w}");
    assert!(
        w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("exited with code 1")),
        "{w}"
    );
    // The ended pod goes once recorded; the claim stays for a recovery.
    rig.until_no_pod(&pod_name(&id)).await;
    assert!(rig.kube.claim(&claim_name(&id)).is_some());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_oom_killed_pod_crashes_the_session_as_oom() {
    let rig = KubeRig::start().await;
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    rig.print(&id, &lines(SUCCESS, &id)[..3]);
    rig.kube.oom_kill(&pod_name(&id));
    let s = rig.until_status(&id, "crashed").await;
    let w = &s["runtime_metadata"]["worker"];
    assert_eq!(w["crash_reason"], "oom", "{w}");
    assert_eq!(w["exit_code"], 137, "{w}");
    assert!(
        w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("OOMKilled")),
        "{w}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_evicted_pod_crashes_the_session_as_evicted() {
    let rig = KubeRig::start().await;
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    rig.kube.evict(&pod_name(&id));
    let s = rig.until_status(&id, "crashed").await;
    let w = &s["runtime_metadata"]["worker"];
    assert_eq!(w["crash_reason"], "evicted", "{w}");
    assert!(
        w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("low on resource")),
        "{w}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_skips_a_refused_message_batch_and_posts_the_later_ones() {
    let rig = KubeRig::start().await;
    // The API takes no assistant line: a batch holding one is too large
    // (413) until the line stands alone, and then unprocessable (422).
    let refused = "\"type\":\"assistant\"";
    rig.proxy.refuse_lines_containing(refused);
    let id = rig.create_managed().await;
    rig.until_pod(&id, 1).await;
    rig.run_pod(&id).await;
    let all = lines(SUCCESS, &id);
    let at = all
        .iter()
        .position(|l| l.contains(refused))
        .expect("an assistant line");
    assert!(at > 0 && at + 1 < all.len(), "lines before and after it");
    // Up to the refused line, together (one batch), then wait for its fate.
    rig.print(&id, &all[..=at]);
    eventually("the refused line to be skipped", LIMIT, || async {
        rig.proxy
            .refusals(&id)
            .iter()
            .any(|(status, _)| *status == 422)
            .then_some(())
    })
    .await;
    // The session's later lines still arrive.
    rig.print(&id, &all[at + 1..]);
    rig.kube.exit(&pod_name(&id), 0, "Completed");
    rig.until_status(&id, "completed").await;
    let want: Vec<Value> = all
        .iter()
        .filter(|l| !l.contains(refused))
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    rig.proxy
        .assert_refused_line_skipped(&rig.api, &id, &want)
        .await;
    rig.stop().await;
}

/// A pod as an earlier runner (or anyone) left it.
fn stray_pod(session: &str, generation: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(session), "labels": {
            "app.kubernetes.io/managed-by": "agent-sessions",
            "agent-sessions.io/session-id": session,
            "agent-sessions.io/generation": generation.to_string()}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "claude", "image": "w"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_orphan_pods_are_deleted_on_resync() {
    let rig = KubeRig::start().await;
    // No session at all; a session no runner manages; one of another
    // backend; and a managed one that is paused.
    let gone = Uuid::new_v4().to_string();
    let unmanaged = rig.create("kubernetes", None).await;
    let local = rig
        .create("local", Some(json!({"prompt": "elsewhere"})))
        .await;
    let paused = rig.create_managed().await;
    rig.until_pod(&paused, 1).await;
    rig.api
        .merge_patch(&paused, &json!({"status": "paused"}))
        .await;
    rig.until_no_pod(&pod_name(&paused)).await;
    rig.until_worker(&paused, "the pause recorded", |w| {
        w["stopped_at"].is_string()
    })
    .await;
    let t0 = Instant::now();
    for (s, g) in [(&gone, 1), (&unmanaged, 1), (&local, 1), (&paused, 1)] {
        rig.kube.insert_pod(stray_pod(s, g));
    }
    for s in [&gone, &unmanaged, &local, &paused] {
        rig.until_no_pod(&pod_name(s)).await;
    }
    eprintln!("4 orphans deleted {:?} after they appeared", t0.elapsed());
    // Nobody was started or recorded for them meanwhile.
    assert_eq!(rig.api.get(&paused).await["status"], "paused");
    assert!(rig.api.get(&unmanaged).await["runtime_metadata"]["worker"].is_null());
    assert!(rig.kube.pod_names().is_empty());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_runner_adopts_the_pod_of_an_active_session() {
    let mut rig = KubeRig::prepare().await;
    let id = rig.create_managed().await;
    // An earlier runner claimed generation 1 and started its pod, then died.
    rig.api
        .merge_patch(
            &id,
            &json!({"runtime_metadata": {"worker": {"generation": 1, "launch": "new"}}}),
        )
        .await;
    rig.kube.insert_pod(stray_pod(&id, 1));
    rig.kube.run(&pod_name(&id));
    let all = lines(SUCCESS, &id);
    rig.print(&id, &all[..2]);
    rig.start_runner();
    // Taken over, not replaced: still generation 1, one pod.
    rig.until_worker(&id, "the adopted pod's progress", |w| {
        w["pod_phase"] == "running"
    })
    .await;
    assert_eq!(rig.kube.creations(&pod_name(&id)).len(), 1);
    rig.print(&id, &all[2..]);
    rig.kube.exit(&pod_name(&id), 0, "Completed");
    let s = rig.until_status(&id, "completed").await;
    let w = &s["runtime_metadata"]["worker"];
    assert_eq!(w["generation"], 1);
    // The whole log counts for the usage, the lines before the adoption too.
    assert_eq!(w["turns"], 1, "{w}");
    assert_eq!(w["output_tokens"], 7, "{w}");
    rig.until_no_pod(&pod_name(&id)).await;
    // The lines printed before the adoption were the earlier runner's to
    // post; the ones after are this runner's.
    let posted: Vec<Value> = rig.proxy.batches(&id).into_iter().flatten().collect();
    let after: Vec<Value> = all[2..]
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(posted, after);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_creating_the_pod_twice_is_harmless() {
    let api = TestApp::spawn().await;
    let kube = FakeKube::start().await;
    let settings = kube_settings(&api, &kube);
    let id = Uuid::parse_str(
        api.create_session(&json!({"agent_id": Uuid::new_v4(), "session_type": "task",
            "runtime_backend": "kubernetes"}))
            .await["id"]
            .as_str()
            .expect("id"),
    )
    .expect("uuid");
    let client = kubernetes::client(&settings.runner)
        .await
        .expect("kube client");
    let cfg = KubeConfig::from_settings(&settings.runner, &[]);
    let api_client = ApiClient::new(&api.url, None).expect("API client");
    let (wake, _woken) = tokio::sync::mpsc::unbounded_channel();
    // Two backends, as two runners (or a retry after a lost answer) would be.
    let backend = || {
        KubernetesBackend::new(
            cfg.clone(),
            client.clone(),
            api_client.clone(),
            wake.clone(),
        )
    };
    let req = |generation| StartRequest {
        session_id: id,
        generation,
        spec: WorkerSpec::from_value(&json!({"prompt": "p"})).expect("spec"),
        launch: Launch::New,
        first: None,
        before: Default::default(),
        restore: None,
    };
    let (first, second) = (backend(), backend());
    let a = first.start(req(1)).await.expect("first create");
    let b = second
        .start(req(1))
        .await
        .expect("second create: 409 of the same generation");
    let name = format!("as-worker-{id}");
    assert_eq!(a.pod.as_deref(), Some(name.as_str()));
    assert_eq!(b.pod, a.pod);
    assert_eq!(kube.creations(&name).len(), 2, "both asked");
    assert_eq!(kube.pod_names(), std::slice::from_ref(&name), "one pod");
    assert_eq!(kube.claim_names().len(), 1, "one claim");
    let uid = kube.pod(&name).expect("pod")["metadata"]["uid"].clone();
    // A newer generation finds the old pod in the way: it replaces it.
    let third = backend();
    third.start(req(2)).await.expect("generation 2");
    let pod = kube.pod(&name).expect("pod");
    assert_eq!(
        pod["metadata"]["labels"]["agent-sessions.io/generation"],
        "2"
    );
    assert_ne!(pod["metadata"]["uid"], uid);
    assert_eq!(kube.pod_names().len(), 1);
    // Everything asked of the API server is in the chart's Role, and this
    // test used every verb of pods the Role grants but watch and list.
    assert!(kube.refused().is_empty(), "{:?}", kube.refused());
    let used = kube.calls();
    assert!(used.is_subset(&chart_rbac()));
    for verb in ["create", "get", "delete"] {
        assert!(
            used.contains(&("pods".to_owned(), verb.to_owned())),
            "{verb}"
        );
    }
    kube.stop().await;
    api.teardown().await;
}

/// A stream-json user message as the CLI reads it on stdin.
fn user_line(session: &str, text: &str) -> String {
    let mut line = json!({"type": "user",
        "message": {"role": "user", "content": [{"type": "text", "text": text}]},
        "parent_tool_use_id": null, "session_id": session, "uuid": Uuid::new_v4()})
    .to_string();
    line.push('\n');
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_attach_writes_the_pods_stdin_and_a_later_attach_still_can() {
    // The worker image's `claude` is `cat` here: stdin echoed to the log.
    let kubelet = KubeletConfig::new()
        .program("claude", &["sh", "-c", "exec cat"])
        .secret(
            "anthropic",
            "ANTHROPIC_API_KEY",
            "sk-ant-test-not-a-real-key",
        );
    let mut rig = KubeRig::prepare_on(FakeKube::start_with_kubelet(kubelet).await).await;
    rig.start_runner();
    let id = rig.create_managed().await;
    let name = pod_name(&id);
    rig.until_pod(&id, 1).await;
    rig.until_worker(&id, "the pod to run", |w| w["pod_phase"] == "running")
        .await;
    let attach = rig.attacher().await;
    // After the runner's own writes (the bytes of two attaches at once may
    // arrive in either order), each through an attach of its own, the one
    // before it gone: the container's stdin stays open.
    rig.until_prompt_at_the_pod(&id).await;
    let mut written = String::new();
    for word in ["first", "second"] {
        let line = user_line(&id, word);
        let t0 = Instant::now();
        write_stdin(&attach, &name, &line).await;
        eventually(format!("the {word} line in the pod log"), LIMIT, || async {
            rig.kube
                .log_of(&name)
                .contains(&line.trim_end().to_owned())
                .then_some(())
        })
        .await;
        eprintln!("{word}: stdin to log in {:?}", t0.elapsed());
        written.push_str(&line);
    }
    // After what the runner's own driver wrote (initialize, the prompt),
    // through attaches of its own.
    let (bytes, attaches) = rig.kube.stdin_of(&name);
    assert!(
        bytes.ends_with(written.as_bytes()),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(attaches >= 3, "{attaches}");
    // The runner follows that log like any worker's.
    eventually("the echoed lines among the messages", LIMIT, || async {
        let text = rig.api.messages(&id).await?.to_string();
        (text.contains("first") && text.contains("second")).then_some(())
    })
    .await;
    let used = rig.kube.calls();
    assert!(used.contains(&("pods/attach".to_owned(), "create".to_owned())));
    // A pause deletes the pod: the process gets SIGTERM, then the pod goes.
    rig.api.merge_patch(&id, &json!({"status": "paused"})).await;
    rig.until_no_pod(&name).await;
    rig.until_status(&id, "paused").await;
    rig.stop().await;
}

/// The worker pod the backend builds, running the CLI with its input as
/// stream-json on stdin (the live-session command line).
fn live_worker_pod(cfg: &KubeConfig, id: Uuid) -> Value {
    let req = StartRequest {
        session_id: id,
        generation: 1,
        spec: WorkerSpec::from_value(&json!({"prompt": "unused"})).expect("spec"),
        launch: Launch::New,
        first: None,
        before: Default::default(),
        restore: None,
    };
    let mut pod = serde_json::to_value(kubernetes::pod::worker_pod(cfg, &req)).expect("JSON");
    let mut args = args_of(&pod);
    if !args.iter().any(|a| a == "--input-format") {
        let p = args.iter().position(|a| a == "-p").expect("-p");
        args.remove(p + 1);
        args.splice(
            p + 1..p + 1,
            ["--input-format", "stream-json"].map(String::from),
        );
    }
    if !args.iter().any(|a| a == "--replay-user-messages") {
        args.push("--replay-user-messages".to_owned());
    }
    pod["spec"]["containers"][0]["args"] = json!(args);
    pod
}

/// The fake kubelet running the worker image's `claude` as the real CLI,
/// with the API key Secret the pods name.
pub(crate) fn cli_kubelet() -> KubeletConfig {
    KubeletConfig::new()
        .program("claude", &[&claude_bin()])
        .secret(
            "anthropic",
            "ANTHROPIC_API_KEY",
            "sk-ant-test-not-a-real-key",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_the_real_cli_in_a_pod_answers_what_is_written_to_its_stdin() {
    const CLI: Duration = Duration::from_secs(60);
    let anthropic = FakeAnthropic::start().await;
    let kube = FakeKube::start_with_kubelet(cli_kubelet()).await;
    let mut settings = Settings::load(None).expect("default settings");
    settings.runner.kube_api_url = Some(kube.url.clone());
    settings.runner.namespace = NAMESPACE.to_owned();
    settings.runner.api_key_secret = "anthropic".to_owned();
    settings.runner.api_key_secret_key = "ANTHROPIC_API_KEY".to_owned();
    settings.runner.api_url = "http://127.0.0.1:9".to_owned();
    let id = Uuid::new_v4();
    let cfg = KubeConfig::from_settings(
        &settings.runner,
        &[
            ("ANTHROPIC_BASE_URL".to_owned(), anthropic.url.clone()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_owned(),
                "1".to_owned(),
            ),
        ],
    );
    kube.insert_pod(live_worker_pod(&cfg, id));
    let name = format!("as-worker-{id}");
    let backend = attacher(&settings).await;
    let results = |n: usize| {
        let kube = &kube;
        let name = &name;
        move || async move {
            let log = kube.log_of(name);
            let done = log
                .iter()
                .filter(|l| l.contains("\"type\":\"result\""))
                .count();
            (done >= n).then_some(log)
        }
    };
    let t0 = Instant::now();
    let init = json!({"type": "control_request", "request_id": "init1",
        "request": {"subtype": "initialize"}});
    let id = id.to_string();
    // The shim's framing first (nothing to restore), then the CLI's input.
    write_stdin(
        &backend,
        &name,
        &format!(
            "{{\"agent_sessions\":\"start\"}}\n{init}\n{}",
            user_line(&id, "Say hello")
        ),
    )
    .await;
    let explain = |what: &'static str| {
        let kube = &kube;
        let name = &name;
        Explain(move || {
            format!(
                "{what}; the pod log: {:#?}; stdin: {:?}; the pod: {}",
                kube.log_of(name),
                kube.stdin_of(name),
                kube.pod(name)
                    .map(|p| p["spec"].to_string())
                    .unwrap_or_default()
            )
        })
    };
    let log = eventually(explain("the CLI's first result"), CLI, results(1)).await;
    eprintln!("first turn in {:?}", t0.elapsed());
    assert!(
        log.iter()
            .any(|l| l.contains("\"type\":\"assistant\"") && l.contains(REPLY)),
        "{log:#?}"
    );
    // A second turn, through a second attach, in the same process.
    write_stdin(&backend, &name, &user_line(&id, "And again")).await;
    let log = eventually(explain("the CLI's second result"), CLI, results(2)).await;
    assert!(log.iter().any(|l| l.contains("And again")), "{log:#?}");
    let pod = kube.pod(&name).expect("pod");
    assert!(
        pod["status"]["containerStatuses"][0]["state"]["running"].is_object(),
        "the CLI still runs, waiting for input: {pod}"
    );
    assert!(anthropic.requests().len() >= 2);
    // The transcript went to the claim (CLAUDE_CONFIG_DIR on /workspace).
    let projects = kube
        .claim_dir(&format!("as-ws-{id}"))
        .join(".claude/projects");
    assert!(projects.is_dir(), "{}", projects.display());
    assert!(kube.refused().is_empty(), "{:?}", kube.refused());
    kube.stop().await;
    anthropic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_bytes_written_through_successive_attaches_all_arrive_in_order() {
    // Scripted: no process; the fake keeps what the attaches wrote.
    let kube = FakeKube::start().await;
    let mut settings = Settings::load(None).expect("default settings");
    settings.runner.kube_api_url = Some(kube.url.clone());
    settings.runner.namespace = NAMESPACE.to_owned();
    settings.runner.api_url = "http://127.0.0.1:9".to_owned();
    let id = Uuid::new_v4().to_string();
    let name = pod_name(&id);
    let mut pod = stray_pod(&id, 1);
    pod["spec"]["containers"][0]["stdin"] = json!(true);
    kube.insert_pod(pod);
    kube.run(&name);
    let backend = attacher(&settings).await;
    let mut want = String::new();
    // Each one written, flushed and dropped at once.
    for i in 0..30 {
        let line = format!("line {i}\n");
        write_stdin(&backend, &name, &line).await;
        want.push_str(&line);
    }
    let want = (want.into_bytes(), 30);
    eventually(
        Explain(|| format!("every line at the pod: {:?}", kube.stdin_of(&name))),
        LIMIT,
        || async { (kube.stdin_of(&name) == want).then_some(()) },
    )
    .await;
    // A pod whose container was made without stdin cannot be attached to.
    let other = Uuid::new_v4().to_string();
    kube.insert_pod(stray_pod(&other, 1));
    kube.run(&pod_name(&other));
    assert!(backend.attach_stdin(&pod_name(&other)).await.is_err());
    assert!(kube.refused().is_empty(), "{:?}", kube.refused());
    kube.stop().await;
}
