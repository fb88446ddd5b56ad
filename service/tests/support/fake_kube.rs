//! A fake Kubernetes API server on loopback (plain HTTP) for the runner's
//! kubernetes backend: core/v1 pods (create, get, list, watch, delete),
//! pods/log (get, follow), pods/attach (stdin over a `v5.channel.k8s.io` or
//! v4 WebSocket) and persistentvolumeclaims (create, get, list, delete) in
//! one namespace, kept in memory.
//!
//! It answers as the real API server does where the backend can tell
//! (Status objects with reasons, 409 AlreadyExists, 404 NotFound, watch
//! events as JSON lines from a resourceVersion, a 400 for the log of a
//! container that has not started or an attach to one that does not run or
//! has no stdin), and it plays the kubelet in one of two ways:
//! - scripted (`start`): the test says what happens: schedule, run, print
//!   log lines, terminate, OOM-kill, evict. Deleting a running pod
//!   terminates its container (SIGTERM, exit 143) before the pod goes.
//!   Whatever an attach writes is kept (`stdin_of`).
//! - for real (`start_with_kubelet`, or `run_for_real` on a pod): the
//!   container's command runs as a local process (see [`KubeletConfig`]):
//!   its output lines become the pod log, attaches write its stdin, its exit
//!   terminates the container, and deleting the pod sends it SIGTERM (then
//!   SIGKILL after the grace period) before the pod goes.
//!
//! Every call is checked against the chart's `ci/expected-runner-rbac.json`:
//! anything else is refused with 403 and counted, as the Role would.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::stream;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};

use super::loopback::LoopbackServer;

pub const NAMESPACE: &str = "workers";

struct PodEntry {
    obj: Value,
    log: Vec<String>,
    log_closed: bool,
    /// Bumped on every new line, when the log closes and when the pod goes.
    log_tick: watch::Sender<u64>,
    /// Every byte attaches wrote to the container's stdin.
    stdin: Vec<u8>,
    /// Attach connections so far.
    attaches: usize,
    /// The container's process, in the real-kubelet mode, while it runs.
    process: Option<Process>,
}

impl PodEntry {
    fn new(obj: Value) -> Self {
        let (tick, _) = watch::channel(0);
        Self {
            obj,
            log: Vec::new(),
            log_closed: false,
            log_tick: tick,
            stdin: Vec::new(),
            attaches: 0,
            process: None,
        }
    }

    fn tick(&self) {
        self.log_tick.send_modify(|t| *t += 1);
    }

    fn container_spec(&self) -> &Value {
        &self.obj["spec"]["containers"][0]
    }
}

/// A container run for real: its process group and the way to its stdin
/// (`None` once closed: `stdinOnce` after the first attach, or no `stdin`).
struct Process {
    pgid: i32,
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

/// How the real-kubelet mode runs a pod's container on this machine.
#[derive(Debug, Clone, Default)]
pub struct KubeletConfig {
    /// Local command lines for the programs containers name (`claude` → the
    /// CLI's path), as the container's command and on its `PATH` (for the
    /// programs it starts); a program not listed runs as named (from `PATH`).
    pub programs: BTreeMap<String, Vec<String>>,
    /// What runs for a container with `args` but no `command` (the image's
    /// entrypoint).
    pub entrypoint: Vec<String>,
    /// Values of `secretKeyRef`s, by (Secret, key); a missing one that is not
    /// optional leaves the container waiting (`CreateContainerConfigError`).
    pub secrets: BTreeMap<(String, String), String>,
    /// The environment every container starts from (the image's), before
    /// the pod's own variables; nothing else of this process's leaks in.
    pub env: Vec<(String, String)>,
}

impl KubeletConfig {
    /// `PATH` from this process, nothing else; the worker image's
    /// `agent-sessions` (its `worker-shim` runs the container's command) is
    /// the binary under test.
    pub fn new() -> Self {
        let mut c = Self::default();
        if let Ok(path) = std::env::var("PATH") {
            c.env.push(("PATH".to_owned(), path));
        }
        c.program("agent-sessions", &[env!("CARGO_BIN_EXE_agent-sessions")])
    }

    pub fn program(mut self, name: &str, command: &[&str]) -> Self {
        self.programs.insert(
            name.to_owned(),
            command.iter().map(|c| (*c).to_owned()).collect(),
        );
        self
    }

    pub fn secret(mut self, secret: &str, key: &str, value: &str) -> Self {
        self.secrets
            .insert((secret.to_owned(), key.to_owned()), value.to_owned());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<String, PodEntry>,
    claims: BTreeMap<String, Value>,
    /// Every pod watch event so far: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Every call: (resource, verb, allowed).
    calls: Vec<(String, String, bool)>,
    /// Every pod body created, in order.
    created: Vec<Value>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<(u64, &'static str, Value)>,
    allowed: BTreeSet<(String, String)>,
    /// The real-kubelet mode: run every pod created.
    run_on_create: bool,
    kubelet: KubeletConfig,
    /// Claims' and pods' volumes as local directories.
    volumes: PathBuf,
    /// The test's runtime, where containers' processes are watched.
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub struct FakeKube {
    pub url: String,
    shared: Arc<Shared>,
    server: LoopbackServer,
}

/// The chart's runner Role as (resource, verb) pairs.
pub fn chart_rbac() -> BTreeSet<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/agent-sessions/ci/expected-runner-rbac.json"
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("expected RBAC")).expect("JSON");
    let mut set = BTreeSet::new();
    for rule in doc["rules"].as_array().expect("rules") {
        for r in rule["resources"].as_array().expect("resources") {
            for v in rule["verbs"].as_array().expect("verbs") {
                set.insert((
                    r.as_str().unwrap_or_default().to_owned(),
                    v.as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    set
}

fn status(code: u16, reason: &str, message: &str) -> HttpResponse {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code});
    HttpResponse::build(actix_web::http::StatusCode::from_u16(code).expect("status code"))
        .content_type("application/json")
        .body(body.to_string())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `a=b,c!=d,e` against an object's labels.
fn selects(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            let k = k.trim();
            let v = v.trim_start_matches('=').trim();
            labels[k].as_str() == Some(v)
        } else {
            labels.get(term.trim()).is_some()
        }
    })
}

fn container_started(pod: &Value) -> bool {
    let state = &pod["status"]["containerStatuses"][0]["state"];
    state.get("running").is_some() || state.get("terminated").is_some()
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Record a pod change and tell the watchers.
    fn emit(
        &mut self,
        events: &broadcast::Sender<(u64, &'static str, Value)>,
        kind: &'static str,
        name: &str,
    ) {
        let rv = self.bump();
        let obj = if kind == "DELETED" {
            self.pods.remove(name).map(|mut e| {
                e.log_closed = true;
                e.tick();
                e.obj
            })
        } else {
            self.pods.get_mut(name).map(|e| e.obj.clone())
        };
        let Some(mut obj) = obj else { return };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if let Some(e) = self.pods.get_mut(name) {
            e.obj = obj.clone();
        }
        self.history.push((rv, kind, obj.clone()));
        let _ = events.send((rv, kind, obj));
    }
}

async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Arc<Shared>>,
) -> HttpResponse {
    let path = req.path().trim_end_matches('/').to_owned();
    let query: BTreeMap<String, String> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // api / v1 / namespaces / {ns} / {resource} [/ {name} [/ log]]
    let (ns, resource, name, sub) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, r] => (*ns, *r, None, None),
        ["api", "v1", "namespaces", ns, r, n] => (*ns, *r, Some(*n), None),
        ["api", "v1", "namespaces", ns, r, n, s] => (*ns, *r, Some(*n), Some(*s)),
        _ => {
            return status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            );
        }
    };
    let method = req.method().as_str();
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method, name.is_some(), watching) {
        // Streaming subresources: SPDY POSTs and (since 1.30) WebSocket
        // GETs are both authorized as create.
        ("GET" | "POST", true, _) if matches!(sub, Some("attach" | "exec" | "portforward")) => {
            "create"
        }
        ("GET", false, true) => "watch",
        ("GET", false, false) => "list",
        ("GET", true, _) => "get",
        ("POST", false, _) => "create",
        ("DELETE", true, _) => "delete",
        _ => "unsupported",
    };
    let rbac_resource = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource.to_owned(),
    };
    let allowed = ns == NAMESPACE
        && shared
            .allowed
            .contains(&(rbac_resource.clone(), verb.to_owned()));
    shared
        .lock()
        .calls
        .push((rbac_resource.clone(), verb.to_owned(), allowed));
    if !allowed {
        return status(
            403,
            "Forbidden",
            &format!("{verb} {rbac_resource} in namespace {ns} is not granted to the runner"),
        );
    }
    if (resource, sub) == ("pods", Some("attach")) {
        return attach(&req, payload, &shared, name.unwrap_or_default(), &query);
    }
    let body = match payload.to_bytes().await {
        Ok(b) => b,
        Err(e) => return status(400, "BadRequest", &format!("cannot read the body: {e}")),
    };
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    match (resource, sub, verb) {
        ("pods", None, "create") => create_pod(&shared, &body),
        ("pods", None, "list") => {
            let st = shared.lock();
            let items: Vec<Value> = st
                .pods
                .values()
                .map(|e| e.obj.clone())
                .filter(|o| selects(&selector, o))
                .collect();
            HttpResponse::Ok().json(json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
        }
        ("pods", None, "watch") => watch_pods(&shared, &query, selector),
        ("pods", None, "get") => match shared.lock().pods.get(name.unwrap_or_default()) {
            Some(e) => HttpResponse::Ok().json(e.obj.clone()),
            None => status(
                404,
                "NotFound",
                &format!("pods \"{}\" not found", name.unwrap_or_default()),
            ),
        },
        ("pods", None, "delete") => delete_pod(&shared, name.unwrap_or_default()),
        ("pods", Some("log"), "get") => {
            let follow = query.get("follow").is_some_and(|f| f == "true");
            pod_log(&shared, name.unwrap_or_default(), follow)
        }
        ("persistentvolumeclaims", None, "create") => {
            let Ok(mut claim) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "not JSON");
            };
            let Some(n) = claim["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            let mut st = shared.lock();
            if st.claims.contains_key(&n) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("persistentvolumeclaims \"{n}\" already exists"),
                );
            }
            let rv = st.bump();
            claim["metadata"]["namespace"] = json!(NAMESPACE);
            claim["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            claim["metadata"]["resourceVersion"] = json!(rv.to_string());
            claim["metadata"]["creationTimestamp"] = json!(now());
            claim["status"] = json!({"phase": "Bound"});
            st.claims.insert(n, claim.clone());
            HttpResponse::Created().json(claim)
        }
        ("persistentvolumeclaims", None, "list") => {
            let st = shared.lock();
            let items: Vec<Value> = st
                .claims
                .values()
                .filter(|o| selects(&selector, o))
                .cloned()
                .collect();
            HttpResponse::Ok().json(
                json!({"kind": "PersistentVolumeClaimList", "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        ("persistentvolumeclaims", None, "get") => {
            match shared.lock().claims.get(name.unwrap_or_default()) {
                Some(c) => HttpResponse::Ok().json(c.clone()),
                None => status(404, "NotFound", "persistentvolumeclaims not found"),
            }
        }
        ("persistentvolumeclaims", None, "delete") => {
            let mut st = shared.lock();
            match st.claims.remove(name.unwrap_or_default()) {
                Some(c) => {
                    st.bump();
                    HttpResponse::Ok().json(c)
                }
                None => status(404, "NotFound", "persistentvolumeclaims not found"),
            }
        }
        _ => status(405, "MethodNotAllowed", "not served by the fake"),
    }
}

fn create_pod(shared: &Arc<Shared>, body: &[u8]) -> HttpResponse {
    let Ok(mut pod) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let Some(name) = pod["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    let mut st = shared.lock();
    st.created.push(pod.clone());
    if st.pods.contains_key(&name) {
        return status(
            409,
            "AlreadyExists",
            &format!("pods \"{name}\" already exists"),
        );
    }
    pod["metadata"]["namespace"] = json!(NAMESPACE);
    pod["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    pod["metadata"]["creationTimestamp"] = json!(now());
    pod["status"] = json!({"phase": "Pending", "qosClass": "Burstable"});
    st.pods.insert(name.clone(), PodEntry::new(pod));
    st.emit(&shared.events, "ADDED", &name);
    let obj = st.pods[&name].obj.clone();
    drop(st);
    if shared.run_on_create {
        schedule(shared, &name, "fake-node");
        start_container(shared, &name);
    }
    HttpResponse::Created().json(obj)
}

/// The kubelet's part of a delete: a running container gets SIGTERM and
/// ends (143); then the object goes. A container run for real gets SIGTERM
/// (SIGKILL after the grace period) and the pod goes once it has ended.
fn delete_pod(shared: &Shared, name: &str) -> HttpResponse {
    let mut st = shared.lock();
    let Some(e) = st.pods.get_mut(name) else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    if let Some(pgid) = e.process.as_ref().map(|p| p.pgid) {
        let first = e.obj["metadata"].get("deletionTimestamp").is_none();
        if first {
            let grace = e.obj["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30)
                .min(30);
            e.obj["metadata"]["deletionTimestamp"] = json!(now());
            e.obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            shared.runtime.spawn(async move {
                tokio::time::sleep(Duration::from_secs(grace)).await;
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            });
            st.emit(&shared.events, "MODIFIED", name);
        }
        return HttpResponse::Ok().json(st.pods[name].obj.clone());
    }
    e.obj["metadata"]["deletionTimestamp"] = json!(now());
    e.obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    let running = e.obj["status"]["containerStatuses"][0]["state"]
        .get("running")
        .is_some();
    if running {
        terminate_container(&mut e.obj, 143, "Error");
        e.obj["status"]["phase"] = json!("Failed");
    }
    st.emit(&shared.events, "MODIFIED", name);
    let last = st.pods[name].obj.clone();
    st.emit(&shared.events, "DELETED", name);
    HttpResponse::Ok().json(last)
}

fn terminate_container(pod: &mut Value, code: i32, reason: &str) {
    let started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].clone();
    pod["status"]["containerStatuses"] = json!([{
        "name": "claude", "image": pod["spec"]["containers"][0]["image"], "imageID": "",
        "ready": false, "restartCount": 0, "started": false,
        "state": {"terminated": {"exitCode": code, "reason": reason,
            "startedAt": started, "finishedAt": now()}}}]);
}

fn watch_pods(
    shared: &Arc<Shared>,
    query: &BTreeMap<String, String>,
    selector: String,
) -> HttpResponse {
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    // Subscribe while holding the lock, so nothing falls between the
    // history and the live events.
    let (backlog, rx) = {
        let st = shared.lock();
        let backlog: Vec<(u64, &'static str, Value)> = st
            .history
            .iter()
            .filter(|(rv, _, _)| *rv > since)
            .cloned()
            .collect();
        (backlog, shared.events.subscribe())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let line = |kind: &str, obj: Value| {
        let mut s = json!({"type": kind, "object": obj}).to_string();
        s.push('\n');
        Ok::<_, actix_web::Error>(Bytes::from(s))
    };
    let backlog = backlog
        .into_iter()
        .filter(|(_, _, o)| selects(&selector, o))
        .map(move |(_, k, o)| line(k, o))
        .collect::<Vec<_>>();
    let live = stream::unfold(
        (rx, selector, since),
        move |(mut rx, selector, since)| async move {
            loop {
                let next = tokio::time::timeout_at(deadline, rx.recv()).await;
                match next {
                    Ok(Ok((rv, kind, obj))) => {
                        if rv > since && selects(&selector, &obj) {
                            return Some((line(kind, obj), (rx, selector, since)));
                        }
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    _ => return None,
                }
            }
        },
    );
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(stream::StreamExt::chain(stream::iter(backlog), live))
}

fn pod_log(shared: &Arc<Shared>, name: &str, follow: bool) -> HttpResponse {
    let rx = {
        let st = shared.lock();
        let Some(e) = st.pods.get(name) else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        if !container_started(&e.obj) {
            return status(
                400,
                "BadRequest",
                &format!(
                    "container \"claude\" in pod \"{name}\" is waiting to start: ContainerCreating"
                ),
            );
        }
        if !follow {
            let text: String = e.log.iter().map(|l| format!("{l}\n")).collect();
            return HttpResponse::Ok().content_type("text/plain").body(text);
        }
        e.log_tick.subscribe()
    };
    let shared = shared.clone();
    let name = name.to_owned();
    let lines = stream::unfold((0usize, rx), move |(i, mut rx)| {
        let shared = shared.clone();
        let name = name.clone();
        async move {
            loop {
                {
                    let st = shared.lock();
                    let e = st.pods.get(&name)?;
                    if let Some(l) = e.log.get(i) {
                        let bytes = Bytes::from(format!("{l}\n"));
                        return Some((Ok::<_, actix_web::Error>(bytes), (i + 1, rx)));
                    }
                    if e.log_closed {
                        return None;
                    }
                }
                rx.changed().await.ok()?;
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/plain")
        .streaming(lines)
}

/// Change a pod and tell the watchers; `false` when there is no such pod.
fn change(shared: &Shared, name: &str, f: impl FnOnce(&mut PodEntry)) -> bool {
    let mut st = shared.lock();
    let Some(e) = st.pods.get_mut(name) else {
        return false;
    };
    f(e);
    st.emit(&shared.events, "MODIFIED", name);
    true
}

/// The scheduler bound the pod to `node`.
fn schedule(shared: &Shared, name: &str, node: &str) -> bool {
    change(shared, name, |e| {
        e.obj["spec"]["nodeName"] = json!(node);
        e.obj["status"]["conditions"] =
            json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]);
    })
}

fn mark_running(e: &mut PodEntry) {
    let image = e.container_spec()["image"].clone();
    e.obj["status"]["phase"] = json!("Running");
    e.obj["status"]["startTime"] = json!(now());
    e.obj["status"]["containerStatuses"] = json!([{
        "name": "claude", "image": image, "imageID": "", "ready": true,
        "restartCount": 0, "started": true,
        "state": {"running": {"startedAt": now()}}}]);
}

/// The container ended with `code`: terminated, its log closed; a pod
/// being deleted goes now.
fn container_exited(shared: &Shared, name: &str, code: i32, reason: &str) {
    let mut st = shared.lock();
    let Some(e) = st.pods.get_mut(name) else {
        return;
    };
    e.process = None;
    terminate_container(&mut e.obj, code, reason);
    e.obj["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
    e.log_closed = true;
    e.tick();
    let deleting = e.obj["metadata"].get("deletionTimestamp").is_some();
    st.emit(&shared.events, "MODIFIED", name);
    if deleting {
        st.emit(&shared.events, "DELETED", name);
    }
}

fn append_log(shared: &Shared, name: &str, line: String) {
    if let Some(e) = shared.lock().pods.get_mut(name) {
        e.log.push(line);
        e.tick();
    }
}

/// What the kubelet would run for a pod's container, on this machine.
struct Launch {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    stdin: bool,
}

/// The mount of `path` under local directories: `(mountPath, dir)`, the
/// longest mount first.
fn local_path(mounts: &[(String, PathBuf)], path: &str) -> String {
    for (m, dir) in mounts {
        if let Some(rest) = path.strip_prefix(m.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", dir.display());
        }
    }
    path.to_owned()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The container's command line, environment and directories with volumes
/// mapped to local directories; `Err` is why it cannot be created.
fn launch(
    cfg: &KubeletConfig,
    volumes: &Path,
    pod_name: &str,
    pod: &Value,
) -> Result<Launch, String> {
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let (Some(name), Some(at)) = (m["name"].as_str(), m["mountPath"].as_str()) else {
            continue;
        };
        let volume = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .ok_or_else(|| format!("volume {name:?} not found"))?;
        let dir = match volume["persistentVolumeClaim"]["claimName"].as_str() {
            Some(claim) => volumes.join("claims").join(claim),
            None => volumes.join("pods").join(pod_name).join(name),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        mounts.push((at.trim_end_matches('/').to_owned(), dir));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let command = strings(&c["command"]);
    let mut argv = match command.split_first() {
        Some((program, rest)) => {
            let mut argv = cfg
                .programs
                .get(program)
                .cloned()
                .unwrap_or_else(|| vec![program.clone()]);
            argv.extend(rest.iter().cloned());
            argv
        }
        None if cfg.entrypoint.is_empty() => {
            return Err("the image has no entrypoint (KubeletConfig::entrypoint)".to_owned());
        }
        None => cfg.entrypoint.clone(),
    };
    argv.extend(strings(&c["args"]).iter().map(|a| local_path(&mounts, a)));
    if argv.is_empty() {
        return Err("an empty command line".to_owned());
    }
    let mut env = cfg.env.clone();
    // The listed programs on the container's PATH, first.
    let bin = volumes.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for (name, command) in &cfg.programs {
        let quoted: Vec<String> = command
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let script = format!("#!/bin/sh\nexec {} \"$@\"\n", quoted.join(" "));
        let path = bin.join(name);
        let tmp = bin.join(format!(".{name}.{pod_name}"));
        std::fs::write(&tmp, script)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    match env.iter_mut().find(|(k, _)| k == "PATH") {
        Some((_, path)) => *path = format!("{}:{path}", bin.display()),
        None => env.push(("PATH".to_owned(), bin.display().to_string())),
    }
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        if let Some(v) = var["value"].as_str() {
            env.push((name, local_path(&mounts, v)));
        } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
            let key = (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["key"].as_str().unwrap_or_default().to_owned(),
            );
            match cfg.secrets.get(&key) {
                Some(v) => env.push((name, v.clone())),
                None if r["optional"] == true => {}
                None => return Err(format!("secret {:?} (key {:?}) not found", key.0, key.1)),
            }
        }
    }
    let cwd = match c["workingDir"].as_str() {
        Some(d) => PathBuf::from(local_path(&mounts, d)),
        None => volumes.join("pods").join(pod_name).join("root"),
    };
    std::fs::create_dir_all(&cwd).map_err(|e| format!("{}: {e}", cwd.display()))?;
    Ok(Launch {
        argv,
        env,
        cwd,
        stdin: c["stdin"] == true,
    })
}

/// The real kubelet's part: run the pod's container as a local process.
fn start_container(shared: &Arc<Shared>, name: &str) {
    let Some(pod) = shared.lock().pods.get(name).map(|e| e.obj.clone()) else {
        return;
    };
    let plan = match launch(&shared.kubelet, &shared.volumes, name, &pod) {
        Ok(p) => p,
        Err(message) => {
            change(shared, name, |e| {
                let image = e.container_spec()["image"].clone();
                e.obj["status"]["containerStatuses"] = json!([{
                    "name": "claude", "image": image, "imageID": "", "ready": false,
                    "restartCount": 0, "started": false,
                    "state": {"waiting": {"reason": "CreateContainerConfigError",
                        "message": message}}}]);
            });
            return;
        }
    };
    let _guard = shared.runtime.enter();
    let mut cmd = tokio::process::Command::new(&plan.argv[0]);
    cmd.args(&plan.argv[1..])
        .env_clear()
        .envs(plan.env.iter().cloned())
        .current_dir(&plan.cwd)
        .stdin(if plan.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            change(shared, name, mark_running);
            append_log(shared, name, format!("exec {}: {e}", plan.argv[0]));
            container_exited(shared, name, 128, "StartError");
            return;
        }
    };
    let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let stdin = child.stdin.take().map(|mut pipe| {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if pipe.write_all(&bytes).await.is_err() || pipe.flush().await.is_err() {
                    return;
                }
            }
        });
        tx
    });
    change(shared, name, |e| {
        mark_running(e);
        e.process = Some(Process { pgid, stdin });
    });
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|out| {
        let shared = shared.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match lines.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        append_log(
                            &shared,
                            &name,
                            line.trim_end_matches(['\n', '\r']).to_owned(),
                        );
                    }
                }
            }
        })
    })
    .collect();
    let shared = shared.clone();
    let name = name.to_owned();
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                st.code().or(st.signal().map(|s| 128 + s)).unwrap_or(255)
            }
            Err(_) => 255,
        };
        // The output the process left (its children may hold the pipes).
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        let reason = if code == 0 { "Completed" } else { "Error" };
        container_exited(&shared, &name, code, reason);
    });
}

/// `GET …/pods/{name}/attach?stdin=true…` as a WebSocket: stdin frames
/// (channel 0) go to the container; when it ends, a Status on channel 3.
fn attach(
    req: &HttpRequest,
    payload: web::Payload,
    shared: &Arc<Shared>,
    name: &str,
    query: &BTreeMap<String, String>,
) -> HttpResponse {
    let wants_stdin = query.get("stdin").is_some_and(|v| v == "true" || v == "1");
    let mut tick = {
        let st = shared.lock();
        let Some(e) = st.pods.get(name) else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        let running = e.obj["status"]["containerStatuses"][0]["state"]
            .get("running")
            .is_some();
        if !running {
            return status(
                400,
                "BadRequest",
                &format!("container claude in pod {name} is not running"),
            );
        }
        if wants_stdin && e.container_spec()["stdin"] != true {
            return status(
                400,
                "BadRequest",
                &format!("container claude in pod {name} was not created with stdin: true"),
            );
        }
        e.log_tick.subscribe()
    };
    let protocols = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
    let (response, mut session, mut messages) =
        match actix_ws::handle_with_protocols(req, payload, &protocols) {
            Ok(r) => r,
            Err(e) => return status(400, "BadRequest", &format!("Upgrade request required: {e}")),
        };
    let stdin_once = {
        let mut st = shared.lock();
        let Some(e) = st.pods.get_mut(name) else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        e.attaches += 1;
        e.container_spec()["stdinOnce"] == true
    };
    let shared = shared.clone();
    let name = name.to_owned();
    actix_web::rt::spawn(async move {
        let end_of_stdin = |shared: &Shared| {
            if stdin_once
                && let Some(p) = shared
                    .lock()
                    .pods
                    .get_mut(&name)
                    .and_then(|e| e.process.as_mut())
            {
                p.stdin = None;
            }
        };
        loop {
            tokio::select! {
                msg = messages.recv() => match msg {
                    Some(Ok(actix_ws::Message::Binary(b))) => match b.first() {
                        Some(0) => {
                            let mut st = shared.lock();
                            let Some(e) = st.pods.get_mut(&name) else { break };
                            e.stdin.extend_from_slice(&b[1..]);
                            if let Some(tx) = e.process.as_ref().and_then(|p| p.stdin.as_ref()) {
                                let _ = tx.send(b[1..].to_vec());
                            }
                        }
                        // v5: the client's stdin ended.
                        Some(255) if b.get(1) == Some(&0) => end_of_stdin(&shared),
                        _ => {}
                    },
                    Some(Ok(actix_ws::Message::Ping(p))) => {
                        if session.pong(&p).await.is_err() {
                            break;
                        }
                    }
                    // The connection broke: what it delivered before that
                    // still comes (then the end).
                    Some(Err(_)) => {}
                    Some(Ok(actix_ws::Message::Close(_))) | None => {
                        end_of_stdin(&shared);
                        break;
                    }
                    Some(Ok(_)) => {}
                },
                changed = tick.changed() => {
                    let over = {
                        let st = shared.lock();
                        match st.pods.get(&name) {
                            None => Some(255),
                            Some(e) => e.obj["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
                                .as_i64(),
                        }
                    };
                    if changed.is_err() || over.is_some() {
                        let code = over.unwrap_or(255);
                        let status = if code == 0 {
                            json!({"metadata": {}, "status": "Success"})
                        } else {
                            json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                                "message": format!("command terminated with non-zero exit code: {code}"),
                                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
                        };
                        let mut frame = vec![3u8];
                        frame.extend_from_slice(status.to_string().as_bytes());
                        let _ = session.binary(frame).await;
                        let _ = session.close(None).await;
                        return;
                    }
                }
            }
        }
        let _ = session.close(None).await;
    });
    response
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        for e in self.shared.lock().pods.values_mut() {
            if let Some(p) = e.process.take() {
                let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.shared.volumes);
    }
}

impl FakeKube {
    /// The scripted mode: the test plays the kubelet.
    pub async fn start() -> Self {
        Self::serve(false, KubeletConfig::new())
    }

    /// The real-kubelet mode: every pod created is scheduled (on
    /// `fake-node`) and its container run as a local process per `kubelet`.
    pub async fn start_with_kubelet(kubelet: KubeletConfig) -> Self {
        Self::serve(true, kubelet)
    }

    fn serve(run_on_create: bool, kubelet: KubeletConfig) -> Self {
        let (events, _) = broadcast::channel(4096);
        let volumes =
            std::env::temp_dir().join(format!("as-fake-kubelet-{}", uuid::Uuid::new_v4().simple()));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events,
            allowed: chart_rbac(),
            run_on_create,
            kubelet,
            volumes,
            runtime: tokio::runtime::Handle::current(),
        });
        let server = LoopbackServer::start("the fake Kubernetes API", shared.clone(), handle);
        Self {
            url: server.url.clone(),
            shared,
            server,
        }
    }

    /// Stop serving (then, as on any drop, kill the containers run for real
    /// and remove their volumes).
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// Where the real-kubelet mode keeps claim `claim`'s files.
    pub fn claim_dir(&self, claim: &str) -> PathBuf {
        self.shared.volumes.join("claims").join(claim)
    }

    /// The real kubelet's part for one pod (scheduled or not): run its
    /// container as a local process now.
    pub fn run_for_real(&self, name: &str) {
        assert!(self.pod(name).is_some(), "no pod {name}");
        schedule(&self.shared, name, "fake-node");
        start_container(&self.shared, name);
    }

    /// Every byte attaches wrote to the pod's stdin, and how many attaches
    /// there were.
    pub fn stdin_of(&self, name: &str) -> (Vec<u8>, usize) {
        self.shared
            .lock()
            .pods
            .get(name)
            .map(|e| (e.stdin.clone(), e.attaches))
            .unwrap_or_default()
    }

    /// The pod's log lines so far.
    pub fn log_of(&self, name: &str) -> Vec<String> {
        self.shared
            .lock()
            .pods
            .get(name)
            .map(|e| e.log.clone())
            .unwrap_or_default()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.shared.lock().pods.get(name).map(|e| e.obj.clone())
    }

    pub fn pod_names(&self) -> Vec<String> {
        self.shared.lock().pods.keys().cloned().collect()
    }

    pub fn claim(&self, name: &str) -> Option<Value> {
        self.shared.lock().claims.get(name).cloned()
    }

    pub fn claim_names(&self) -> Vec<String> {
        self.shared.lock().claims.keys().cloned().collect()
    }

    /// Every pod body the backend sent to create `name` (409s included).
    pub fn creations(&self, name: &str) -> Vec<Value> {
        self.shared
            .lock()
            .created
            .iter()
            .filter(|p| p["metadata"]["name"] == name)
            .cloned()
            .collect()
    }

    /// (resource, verb) of every call, and the refused ones.
    pub fn calls(&self) -> BTreeSet<(String, String)> {
        self.shared
            .lock()
            .calls
            .iter()
            .map(|(r, v, _)| (r.clone(), v.clone()))
            .collect()
    }

    pub fn refused(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(r, v, _)| (r.clone(), v.clone()))
            .collect()
    }

    fn change(&self, name: &str, f: impl FnOnce(&mut PodEntry)) {
        assert!(change(&self.shared, name, f), "no pod {name}");
    }

    /// A pod made by someone else (an earlier runner, say).
    pub fn insert_pod(&self, pod: Value) {
        let _ = create_pod(&self.shared, pod.to_string().as_bytes());
    }

    /// The scheduler bound it to `node`.
    pub fn schedule(&self, name: &str, node: &str) {
        assert!(schedule(&self.shared, name, node), "no pod {name}");
    }

    /// The kubelet started the container (scripted: nothing runs).
    pub fn run(&self, name: &str) {
        self.change(name, mark_running);
    }

    /// The container printed these lines.
    pub fn print(&self, name: &str, lines: &[&str]) {
        let mut st = self.shared.lock();
        let e = st
            .pods
            .get_mut(name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        e.log.extend(lines.iter().map(|l| (*l).to_owned()));
        e.tick();
    }

    /// The container exited with `code` (`reason` as the kubelet reports it).
    pub fn exit(&self, name: &str, code: i32, reason: &str) {
        self.change(name, |e| {
            terminate_container(&mut e.obj, code, reason);
            e.obj["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            e.log_closed = true;
            e.tick();
        });
    }

    /// The kernel's OOM killer ended the container.
    pub fn oom_kill(&self, name: &str) {
        self.exit(name, 137, "OOMKilled");
    }

    /// The kubelet evicted the pod (node pressure).
    pub fn evict(&self, name: &str) {
        self.change(name, |e| {
            terminate_container(&mut e.obj, 137, "Error");
            e.obj["status"]["phase"] = json!("Failed");
            e.obj["status"]["reason"] = json!("Evicted");
            e.obj["status"]["message"] =
                json!("The node was low on resource: memory. Container claude was using 3Gi.");
            e.log_closed = true;
            e.tick();
        });
    }
}
