//! The objects the kubernetes backend creates (a worker pod, a workspace
//! claim) and what it reads back from a pod's status. Pure functions, so
//! the security settings and the outcome mapping are unit-tested here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerStateTerminated, EnvVar, EnvVarSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use uuid::Uuid;

use super::KubeConfig;
use crate::contract::PodPhase;
use crate::domain::worker::{CrashReason, Resources};
use crate::runner::backend::StartRequest;
use crate::runner::claude::{self, ExitInfo, Outcome, RunSummary};
use crate::runner::cost::Spend;
use crate::runner::driver::FirstMessage;
use crate::runner::reconcile::StopReason;

pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "agent-sessions";
pub const SESSION_LABEL: &str = "agent-sessions.io/session-id";
pub const GENERATION_LABEL: &str = "agent-sessions.io/generation";
pub const LAUNCH_ANNOTATION: &str = "agent-sessions.io/launch";
/// The worker's first message (JSON), for whoever supervises the pod.
pub const FIRST_MESSAGE_ANNOTATION: &str = "agent-sessions.io/first-message";
/// What the session's earlier workers spent (JSON).
pub const SPENT_BEFORE_ANNOTATION: &str = "agent-sessions.io/spent-before";
/// Set when the worker starts from a transcript the runner writes back
/// (the byte count), so a runner that adopts the pod before that happened
/// still does it.
pub const RESTORE_ANNOTATION: &str = "agent-sessions.io/restore";
/// The container's command: the worker image's `agent-sessions worker-shim`
/// in front of the CLI (see `crate::shim`), so the transcript comes and
/// goes through the pod's stdin and log.
pub const COMMAND: [&str; 4] = ["agent-sessions", "worker-shim", "--", "claude"];
/// The one container of a worker pod.
pub const CONTAINER: &str = "claude";
/// Where the session's claim is mounted: the worker's home and working tree.
pub const WORKSPACE: &str = "/workspace";
/// `CLAUDE_CONFIG_DIR` on the claim, so transcripts outlive the pod and
/// `--resume` finds them.
pub const CONFIG_DIR: &str = "/workspace/.claude";
/// The worker image's user (Dockerfile `worker` target); also the claim's
/// group owner, so the volume is writable.
const WORKER_UID: i64 = 10001;

/// Selects every object this backend made, in its namespace.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_KEY}={MANAGED_BY}")
}

pub fn pod_name(session_id: Uuid) -> String {
    format!("as-worker-{session_id}")
}

pub fn claim_name(session_id: Uuid) -> String {
    format!("as-ws-{session_id}")
}

fn labels(session_id: Uuid, generation: Option<u64>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (MANAGED_BY_KEY.to_owned(), MANAGED_BY.to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "agent-sessions-worker".to_owned(),
        ),
        (SESSION_LABEL.to_owned(), session_id.to_string()),
    ]);
    if let Some(g) = generation {
        l.insert(GENERATION_LABEL.to_owned(), g.to_string());
    }
    l
}

/// The session and worker generation a managed object is labelled with.
fn annotations(req: &StartRequest) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(LAUNCH_ANNOTATION.to_owned(), req.launch.as_str().to_owned())]);
    if let Some(first) = &req.first
        && let Ok(json) = serde_json::to_string(first)
    {
        a.insert(FIRST_MESSAGE_ANNOTATION.to_owned(), json);
    }
    if let Ok(json) = serde_json::to_string(&req.before) {
        a.insert(SPENT_BEFORE_ANNOTATION.to_owned(), json);
    }
    if let Some(bytes) = &req.restore {
        a.insert(RESTORE_ANNOTATION.to_owned(), bytes.len().to_string());
    }
    a
}

/// What a worker's driver needs from its pod: the first message and what
/// earlier workers spent (an adopted pod carries them for the next runner).
pub fn driver_state(meta: &ObjectMeta) -> (Option<FirstMessage>, Spend) {
    let get = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
    (
        get(FIRST_MESSAGE_ANNOTATION).and_then(|j| serde_json::from_str(j).ok()),
        get(SPENT_BEFORE_ANNOTATION)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default(),
    )
}

pub fn session_of(meta: &ObjectMeta) -> Option<(Uuid, Option<u64>)> {
    let l = meta.labels.as_ref()?;
    let id = Uuid::parse_str(l.get(SESSION_LABEL)?).ok()?;
    Some((id, l.get(GENERATION_LABEL).and_then(|g| g.parse().ok())))
}

fn quantities(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!m.is_empty()).then(|| {
        m.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..Default::default()
    }
}

/// The worker pod of `req`: the same command line as the local backend,
/// the claim at [`WORKSPACE`], the API key from a Secret reference, no
/// privileges, never restarted in place (the runner decides that).
pub fn worker_pod(cfg: &KubeConfig, req: &StartRequest) -> Pod {
    let id = req.session_id;
    let spec = &req.spec;
    let mut env_vars = vec![
        env("HOME", WORKSPACE),
        env("CLAUDE_CONFIG_DIR", CONFIG_DIR),
        env(crate::shim::SESSION_ID_ENV, &id.to_string()),
        EnvVar {
            name: "ANTHROPIC_API_KEY".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: cfg.api_key_secret.clone(),
                    key: cfg.api_key_secret_key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        },
        // The image pins the CLI; it must not replace itself.
        env("DISABLE_AUTOUPDATER", "1"),
    ];
    env_vars.extend(cfg.worker_env.iter().map(|(k, v)| env(k, v)));
    // Validated on the way in: none of these is a key the runner sets.
    env_vars.extend(spec.env.iter().map(|(k, v)| env(k, v)));
    let resources: Resources = spec
        .resources
        .clone()
        .unwrap_or_else(|| cfg.default_resources.clone());
    let working_dir = match spec.working_directory.as_deref() {
        Some(d) if !d.trim().is_empty() => format!("{WORKSPACE}/{}", d.trim_start_matches("./")),
        _ => WORKSPACE.to_owned(),
    };
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| cfg.worker_image.clone()),
        ),
        command: Some(COMMAND.map(str::to_owned).to_vec()),
        args: Some(claude::arguments(spec, id, &req.launch, cfg.bare)),
        working_dir: Some(working_dir),
        env: Some(env_vars),
        resources: Some(ResourceRequirements {
            requests: quantities(&resources.requests),
            limits: quantities(&resources.limits),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        // Its stdin stays open across attaches (the runner writes the
        // CLI's stream-json input there): never closed by a detach, no tty.
        stdin: Some(true),
        stdin_once: Some(false),
        tty: Some(false),
        volume_mounts: Some(vec![VolumeMount {
            name: "workspace".to_owned(),
            mount_path: WORKSPACE.to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(id)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels(id, Some(req.generation))),
            annotations: Some(annotations(req)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            active_deadline_seconds: Some(cfg.active_deadline_seconds),
            termination_grace_period_seconds: Some(cfg.termination_grace_seconds),
            // Workers never call the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                fs_group: Some(WORKER_UID),
                seccomp_profile: Some(runtime_default()),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: "workspace".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name(id),
                    read_only: Some(false),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The session's workspace claim: one writer at a time (one pod per session).
pub fn workspace_claim(cfg: &KubeConfig, session_id: Uuid) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(session_id)),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(labels(session_id, None)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: cfg.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(cfg.claim_size.clone()),
                )])),
                limits: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Where a pod is on its way, as reported on the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Pending,
    Scheduled { node: String },
    Running { node: Option<String> },
    Succeeded,
    Failed,
}

impl Progress {
    /// The phase as the worker record names it.
    pub fn phase(&self) -> PodPhase {
        match self {
            Self::Pending => PodPhase::Pending,
            Self::Scheduled { .. } => PodPhase::Scheduled,
            Self::Running { .. } => PodPhase::Running,
            Self::Succeeded => PodPhase::Succeeded,
            Self::Failed => PodPhase::Failed,
        }
    }

    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Scheduled { node } => Some(node),
            Self::Running { node } => node.as_deref(),
            _ => None,
        }
    }
}

pub fn progress(pod: &Pod) -> Progress {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    match phase {
        Some("Succeeded") => Progress::Succeeded,
        Some("Failed") => Progress::Failed,
        _ if container_started(pod) => Progress::Running { node },
        _ => match node {
            Some(node) => Progress::Scheduled { node },
            None => Progress::Pending,
        },
    }
}

/// The pod reached a phase it never leaves.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(progress(pod), Progress::Succeeded | Progress::Failed)
}

fn container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

/// The container ran (so it has a log): running now, or terminated.
pub fn container_started(pod: &Pod) -> bool {
    container_status(pod)
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

pub fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    container_status(pod)?.state.as_ref()?.terminated.as_ref()
}

/// What the container's end says as an exit status; a code above 128 is
/// the runtime's way of saying "killed by signal code − 128".
pub fn exit_info(pod: Option<&Pod>) -> ExitInfo {
    match pod.and_then(terminated) {
        Some(t) => ExitInfo {
            code: Some(t.exit_code),
            signal: t.signal.or_else(|| {
                (129..=192)
                    .contains(&t.exit_code)
                    .then(|| t.exit_code - 128)
            }),
            unknown: false,
        },
        None => ExitInfo {
            unknown: true,
            ..Default::default()
        },
    }
}

/// The verdict on a worker pod that is over: what Kubernetes says first
/// (eviction, deadline, OOM kill), then the CLI's own stream as the local
/// backend judges it.
pub fn outcome(
    pod: Option<&Pod>,
    summary: &RunSummary,
    stopping: Option<StopReason>,
) -> (Outcome, ExitInfo) {
    let exit = exit_info(pod);
    if stopping.is_some() {
        return (claude::classify(exit, summary, stopping), exit);
    }
    let status = pod.and_then(|p| p.status.as_ref());
    let message = status.and_then(|s| s.message.clone());
    let failed = |reason, default: &str| Outcome::Failed {
        reason,
        detail: message.clone().unwrap_or_else(|| default.to_owned()),
    };
    match status.and_then(|s| s.reason.as_deref()) {
        Some("Evicted") => return (failed(CrashReason::Evicted, "the pod was evicted"), exit),
        Some("DeadlineExceeded") => {
            return (
                failed(
                    CrashReason::Deadline,
                    "the pod ran past its active deadline",
                ),
                exit,
            );
        }
        _ => {}
    }
    if let Some(t) = pod.and_then(terminated)
        && t.reason.as_deref() == Some("OOMKilled")
    {
        let detail = format!(
            "out of memory: the container was OOMKilled (exit code {})",
            t.exit_code
        );
        return (
            Outcome::Failed {
                reason: CrashReason::Oom,
                detail,
            },
            exit,
        );
    }
    (claude::classify(exit, summary, None), exit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::WorkerSpec;
    use crate::runner::claude::Launch;
    use serde_json::json;

    fn cfg() -> KubeConfig {
        KubeConfig {
            namespace: "workers".into(),
            worker_image: "worker:1".into(),
            api_key_secret: "anthropic".into(),
            api_key_secret_key: "KEY".into(),
            storage_class: Some("fast".into()),
            claim_size: "2Gi".into(),
            active_deadline_seconds: 600,
            termination_grace_seconds: 10,
            delete_claim_on_completion: true,
            default_resources: Resources {
                requests: BTreeMap::from([("cpu".into(), "100m".into())]),
                limits: BTreeMap::from([("memory".into(), "1Gi".into())]),
            },
            bare: true,
            worker_env: vec![("ANTHROPIC_BASE_URL".into(), "http://llm".into())],
            message_batch: 100,
            prices: Default::default(),
            resync_interval: std::time::Duration::from_secs(30),
        }
    }

    fn req(launch: Launch) -> StartRequest {
        StartRequest {
            session_id: Uuid::nil(),
            generation: 3,
            spec: WorkerSpec::from_value(&json!({"prompt": "fix it", "env": {"A": "b"}})).unwrap(),
            launch,
            first: None,
            before: crate::runner::cost::Spend::default(),
            restore: None,
        }
    }

    #[test]
    fn the_worker_pod_is_locked_down_and_runs_the_cli() {
        let pod = worker_pod(&cfg(), &req(Launch::New));
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["metadata"]["name"], format!("as-worker-{}", Uuid::nil()));
        assert_eq!(v["metadata"]["labels"][GENERATION_LABEL], "3");
        assert_eq!(v["metadata"]["labels"][MANAGED_BY_KEY], "agent-sessions");
        let spec = &v["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["activeDeadlineSeconds"], 600);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &spec["containers"][0];
        assert_eq!(c["image"], "worker:1");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            c["command"],
            json!(["agent-sessions", "worker-shim", "--", "claude"])
        );
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "AGENT_SESSIONS_SESSION_ID", "value": Uuid::nil()}))
        );
        assert_eq!(
            (&c["stdin"], &c["stdinOnce"], &c["tty"]),
            (&json!(true), &json!(false), &json!(false))
        );
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(
            c["args"],
            json!(claude::arguments(
                &req(Launch::New).spec,
                Uuid::nil(),
                &Launch::New,
                true
            ))
        );
        assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
        let key = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "ANTHROPIC_API_KEY")
            .unwrap();
        assert!(key.get("value").is_none(), "{key}");
        assert_eq!(key["valueFrom"]["secretKeyRef"]["name"], "anthropic");
        assert_eq!(
            spec["volumes"][0]["persistentVolumeClaim"]["claimName"],
            format!("as-ws-{}", Uuid::nil())
        );
        assert!(c["env"].to_string().contains(CONFIG_DIR));
    }

    #[test]
    fn spec_image_and_resources_win_over_the_defaults() {
        let mut r = req(Launch::Resume {
            prompt: Some("go on".into()),
        });
        r.spec.image = Some("custom:2".into());
        r.spec.resources = Some(Resources {
            requests: BTreeMap::new(),
            limits: BTreeMap::from([("memory".into(), "8Gi".into())]),
        });
        let v = serde_json::to_value(worker_pod(&cfg(), &r)).unwrap();
        let c = &v["spec"]["containers"][0];
        assert_eq!(c["image"], "custom:2");
        assert_eq!(c["resources"]["limits"]["memory"], "8Gi");
        assert!(c["resources"].get("requests").is_none());
        assert!(c["args"].as_array().unwrap().contains(&json!("--resume")));
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": []}, "status": status}),
        )
        .unwrap()
    }

    fn terminated_with(reason: &str, code: i32, phase: &str) -> Pod {
        pod(json!({"phase": phase, "containerStatuses": [{
            "name": CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}}}]}))
    }

    #[test]
    fn kubernetes_reasons_map_to_crash_reasons() {
        let none = RunSummary::default();
        let reason = |p: &Pod| outcome(Some(p), &none, None).0.crash_reason();
        assert_eq!(
            reason(&terminated_with("OOMKilled", 137, "Failed")),
            Some(CrashReason::Oom)
        );
        let evicted =
            pod(json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}));
        assert_eq!(reason(&evicted), Some(CrashReason::Evicted));
        let late = pod(json!({"phase": "Failed", "reason": "DeadlineExceeded"}));
        assert_eq!(reason(&late), Some(CrashReason::Deadline));
        assert_eq!(
            reason(&terminated_with("Error", 1, "Failed")),
            Some(CrashReason::ExitCode)
        );
        let killed = terminated_with("Error", 137, "Failed");
        assert_eq!(exit_info(Some(&killed)).signal, Some(9));
        assert_eq!(reason(&killed), Some(CrashReason::Signal));
        // Gone without a trace and without a result: lost.
        assert_eq!(
            outcome(None, &none, None).0.crash_reason(),
            Some(CrashReason::Lost)
        );
        assert_eq!(
            outcome(None, &none, Some(StopReason::Paused)).0,
            Outcome::Stopped
        );
    }

    #[test]
    fn progress_follows_the_pod() {
        assert_eq!(
            progress(&pod(json!({"phase": "Pending"}))),
            Progress::Pending
        );
        let mut p = pod(json!({"phase": "Pending"}));
        p.spec.as_mut().unwrap().node_name = Some("n1".into());
        assert_eq!(progress(&p).phase(), PodPhase::Scheduled);
        assert_eq!(
            progress(&terminated_with("Completed", 0, "Succeeded")),
            Progress::Succeeded
        );
        assert!(is_terminal(&terminated_with("Error", 2, "Failed")));
    }
}
