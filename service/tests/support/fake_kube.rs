//! A fake Kubernetes API server on loopback (plain HTTP) for the runner's
//! kubernetes backend: core/v1 pods (create, get, list, watch, delete),
//! pods/log (get, follow) and persistentvolumeclaims (create, get, list,
//! delete) in one namespace, kept in memory.
//!
//! It answers as the real API server does where the backend can tell
//! (Status objects with reasons, 409 AlreadyExists, 404 NotFound, watch
//! events as JSON lines from a resourceVersion, a 400 for the log of a
//! container that has not started), and it plays the kubelet when the test
//! says so: schedule, run, print log lines, terminate, OOM-kill, evict.
//! Deleting a running pod terminates its container (SIGTERM, exit 143)
//! before the pod goes.
//!
//! Every call is checked against the chart's `ci/expected-runner-rbac.json`:
//! anything else is refused with 403 and counted, as the Role would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::loopback::LoopbackServer;

pub const NAMESPACE: &str = "workers";

struct PodEntry {
    obj: Value,
    log: Vec<String>,
    log_closed: bool,
    /// Bumped on every new line and when the log closes.
    log_tick: watch::Sender<u64>,
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
                e.log_tick.send_modify(|t| *t += 1);
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

async fn handle(req: HttpRequest, body: Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
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

fn create_pod(shared: &Shared, body: &[u8]) -> HttpResponse {
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
    let (tick, _) = watch::channel(0);
    st.pods.insert(
        name.clone(),
        PodEntry {
            obj: pod,
            log: Vec::new(),
            log_closed: false,
            log_tick: tick,
        },
    );
    st.emit(&shared.events, "ADDED", &name);
    let obj = st.pods[&name].obj.clone();
    HttpResponse::Created().json(obj)
}

/// The kubelet's part of a delete: a running container gets SIGTERM and
/// ends (143); then the object goes.
fn delete_pod(shared: &Shared, name: &str) -> HttpResponse {
    let mut st = shared.lock();
    let Some(e) = st.pods.get_mut(name) else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
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

impl FakeKube {
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            events,
            allowed: chart_rbac(),
        });
        let server = LoopbackServer::start("the fake Kubernetes API", shared.clone(), handle);
        Self {
            url: server.url.clone(),
            shared,
            server,
        }
    }

    pub async fn stop(self) {
        self.server.stop().await;
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
        let mut st = self.shared.lock();
        let e = st
            .pods
            .get_mut(name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        f(e);
        st.emit(&self.shared.events, "MODIFIED", name);
    }

    /// A pod made by someone else (an earlier runner, say).
    pub fn insert_pod(&self, pod: Value) {
        let _ = create_pod(&self.shared, pod.to_string().as_bytes());
    }

    /// The scheduler bound it to `node`.
    pub fn schedule(&self, name: &str, node: &str) {
        self.change(name, |e| {
            e.obj["spec"]["nodeName"] = json!(node);
            e.obj["status"]["conditions"] =
                json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]);
        });
    }

    /// The kubelet started the container.
    pub fn run(&self, name: &str) {
        self.change(name, |e| {
            let image = e.obj["spec"]["containers"][0]["image"].clone();
            e.obj["status"]["phase"] = json!("Running");
            e.obj["status"]["startTime"] = json!(now());
            e.obj["status"]["containerStatuses"] = json!([{
                "name": "claude", "image": image, "imageID": "", "ready": true,
                "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": now()}}}]);
        });
    }

    /// The container printed these lines.
    pub fn print(&self, name: &str, lines: &[&str]) {
        let mut st = self.shared.lock();
        let e = st
            .pods
            .get_mut(name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        e.log.extend(lines.iter().map(|l| (*l).to_owned()));
        e.log_tick.send_modify(|t| *t += 1);
    }

    /// The container exited with `code` (`reason` as the kubelet reports it).
    pub fn exit(&self, name: &str, code: i32, reason: &str) {
        self.change(name, |e| {
            terminate_container(&mut e.obj, code, reason);
            e.obj["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            e.log_closed = true;
            e.log_tick.send_modify(|t| *t += 1);
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
            e.log_tick.send_modify(|t| *t += 1);
        });
    }
}
