//! Every Kubernetes API call the backend makes, and the permissions they
//! need. [`RBAC`] is the one list of (resource, verb) pairs; each call
//! below names its [`Grant`], and a `Grant` can only be made (at compile
//! time) for a pair in that list. A test compares [`RBAC`] with the Helm
//! chart's `ci/expected-runner-rbac.json`, and the fake API server of the
//! integration tests refuses any other call, so the code, the list and the
//! chart's Role cannot drift apart.

use futures_util::Stream;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, AttachParams, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::watcher;
use tracing::debug;

use super::KubeError;
use super::attach::PodStdin;
use super::pod::{CONTAINER, managed_selector};

/// The (resource, verb) pairs of the core API group the backend uses, in its
/// namespace: exactly what the chart's runner Role grants.
pub const RBAC: &[(&str, &str)] = &[
    ("pods", "create"),
    ("pods", "get"),
    ("pods", "list"),
    ("pods", "watch"),
    ("pods", "delete"),
    ("pods/log", "get"),
    // The attach is a WebSocket upgrade of a GET, which API servers since
    // 1.30 authorize as `create` (as they do the POST of SPDY).
    ("pods/attach", "create"),
    ("persistentvolumeclaims", "create"),
    ("persistentvolumeclaims", "get"),
    ("persistentvolumeclaims", "list"),
    ("persistentvolumeclaims", "delete"),
];

/// A permission from [`RBAC`], by position.
#[derive(Debug, Clone, Copy)]
pub struct Grant(usize);

impl Grant {
    pub fn resource(self) -> &'static str {
        RBAC[self.0].0
    }
    pub fn verb(self) -> &'static str {
        RBAC[self.0].1
    }
    /// For errors and logs: `create pods`.
    pub fn describe(self) -> String {
        format!("{} {}", self.verb(), self.resource())
    }
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The grant for `(resource, verb)`; fails to compile if [`RBAC`] lacks it.
const fn grant(resource: &str, verb: &str) -> Grant {
    let mut i = 0;
    while i < RBAC.len() {
        if same(RBAC[i].0, resource) && same(RBAC[i].1, verb) {
            return Grant(i);
        }
        i += 1;
    }
    panic!("not in RBAC: add it there and to the chart's runner Role")
}

const CREATE_POD: Grant = grant("pods", "create");
const GET_POD: Grant = grant("pods", "get");
const LIST_PODS: Grant = grant("pods", "list");
const WATCH_PODS: Grant = grant("pods", "watch");
const DELETE_POD: Grant = grant("pods", "delete");
const READ_LOG: Grant = grant("pods/log", "get");
const ATTACH: Grant = grant("pods/attach", "create");
const CREATE_CLAIM: Grant = grant("persistentvolumeclaims", "create");
const GET_CLAIM: Grant = grant("persistentvolumeclaims", "get");
const LIST_CLAIMS: Grant = grant("persistentvolumeclaims", "list");
const DELETE_CLAIM: Grant = grant("persistentvolumeclaims", "delete");

/// What became of a create.
pub enum Created<K> {
    New(K),
    /// An object of that name was there already (HTTP 409).
    AlreadyExists,
}

/// The namespaced APIs, reachable only through the calls below.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    namespace: String,
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
}

fn failed(g: Grant) -> impl FnOnce(kube::Error) -> KubeError {
    move |source| KubeError::Api {
        call: g.describe(),
        source,
    }
}

fn is_status(e: &kube::Error, check: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if check(s))
}

/// What the calls below need of a kind of object.
trait Object:
    kube::Resource<Scope = kube::core::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
{
}

impl<K> Object for K where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
{
}

async fn create<K: Object>(api: &Api<K>, g: Grant, obj: &K) -> Result<Created<K>, KubeError> {
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => Ok(Created::New(o)),
        Err(e) if is_status(&e, kube::core::Status::is_already_exists) => {
            Ok(Created::AlreadyExists)
        }
        Err(e) => Err(failed(g)(e)),
    }
}

async fn list_managed<K: Object>(api: &Api<K>, g: Grant) -> Result<Vec<K>, KubeError> {
    let lp = ListParams::default().labels(&managed_selector());
    Ok(api.list(&lp).await.map_err(failed(g))?.items)
}

/// Delete; `false` when it was not there.
async fn delete<K: Object>(api: &Api<K>, g: Grant, name: &str) -> Result<bool, KubeError> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, kube::core::Status::is_not_found) => Ok(false),
        Err(e) => Err(failed(g)(e)),
    }
}

impl Kube {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            pods: Api::namespaced(client.clone(), namespace),
            claims: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
        }
    }

    fn call(&self, g: Grant, name: &str) {
        debug!(
            verb = g.verb(),
            resource = g.resource(),
            name,
            "kubernetes call"
        );
    }

    pub async fn create_pod(&self, pod: &Pod) -> Result<Created<Pod>, KubeError> {
        self.call(CREATE_POD, pod.metadata.name.as_deref().unwrap_or_default());
        create(&self.pods, CREATE_POD, pod).await
    }

    pub async fn get_pod(&self, name: &str) -> Result<Option<Pod>, KubeError> {
        self.call(GET_POD, name);
        self.pods.get_opt(name).await.map_err(failed(GET_POD))
    }

    pub async fn list_pods(&self) -> Result<Vec<Pod>, KubeError> {
        self.call(LIST_PODS, "");
        list_managed(&self.pods, LIST_PODS).await
    }

    /// The managed pods as they change: list, then watch (both granted).
    pub fn watch_pods(&self) -> impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> {
        self.call(LIST_PODS, "");
        self.call(WATCH_PODS, "");
        watcher(
            self.pods.clone(),
            watcher::Config::default().labels(&managed_selector()),
        )
    }

    /// Delete; `false` when it was not there.
    pub async fn delete_pod(&self, name: &str) -> Result<bool, KubeError> {
        self.call(DELETE_POD, name);
        delete(&self.pods, DELETE_POD, name).await
    }

    /// The worker container's log so far.
    pub async fn pod_log(&self, name: &str) -> Result<String, KubeError> {
        self.call(READ_LOG, name);
        let lp = LogParams {
            container: Some(CONTAINER.to_owned()),
            ..Default::default()
        };
        self.pods.logs(name, &lp).await.map_err(failed(READ_LOG))
    }

    /// The worker container's log from its start, followed until it ends.
    pub async fn follow_pod_log(
        &self,
        name: &str,
    ) -> Result<impl futures_util::AsyncBufRead + use<>, KubeError> {
        self.call(READ_LOG, name);
        let lp = LogParams {
            container: Some(CONTAINER.to_owned()),
            follow: true,
            ..Default::default()
        };
        self.pods
            .log_stream(name, &lp)
            .await
            .map_err(failed(READ_LOG))
    }

    /// A writer to the worker container's stdin: an attach with stdin only
    /// (the output is read from the log).
    pub async fn attach_stdin(&self, name: &str) -> Result<PodStdin, KubeError> {
        use kube::Resource;
        self.call(ATTACH, name);
        let ap = AttachParams {
            container: Some(CONTAINER.to_owned()),
            stdin: true,
            stdout: false,
            stderr: false,
            tty: false,
            ..Default::default()
        };
        let req = kube::core::Request::new(Pod::url_path(&(), Some(&self.namespace)))
            .attach(name, &ap)
            .map_err(|e| failed(ATTACH)(kube::Error::BuildRequest(e)))?;
        let conn = self.client.connect(req).await.map_err(failed(ATTACH))?;
        Ok(PodStdin::over(conn.into_stream(), name))
    }

    pub async fn create_claim(
        &self,
        claim: &PersistentVolumeClaim,
    ) -> Result<Created<PersistentVolumeClaim>, KubeError> {
        self.call(
            CREATE_CLAIM,
            claim.metadata.name.as_deref().unwrap_or_default(),
        );
        create(&self.claims, CREATE_CLAIM, claim).await
    }

    pub async fn get_claim(&self, name: &str) -> Result<Option<PersistentVolumeClaim>, KubeError> {
        self.call(GET_CLAIM, name);
        self.claims.get_opt(name).await.map_err(failed(GET_CLAIM))
    }

    pub async fn list_claims(&self) -> Result<Vec<PersistentVolumeClaim>, KubeError> {
        self.call(LIST_CLAIMS, "");
        list_managed(&self.claims, LIST_CLAIMS).await
    }

    /// Delete; `false` when it was not there.
    pub async fn delete_claim(&self, name: &str) -> Result<bool, KubeError> {
        self.call(DELETE_CLAIM, name);
        delete(&self.claims, DELETE_CLAIM, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The backend's permissions are exactly the chart's runner Role.
    #[test]
    fn rbac_matches_the_chart() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../helm/agent-sessions/ci/expected-runner-rbac.json"
        );
        let text = std::fs::read_to_string(path).expect("the chart's expected RBAC");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let mut chart = BTreeSet::new();
        for rule in doc["rules"].as_array().expect("rules") {
            assert_eq!(
                rule["apiGroups"],
                serde_json::json!([""]),
                "core group only"
            );
            for r in rule["resources"].as_array().expect("resources") {
                for v in rule["verbs"].as_array().expect("verbs") {
                    chart.insert((
                        r.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        let ours: BTreeSet<(String, String)> = RBAC
            .iter()
            .map(|(r, v)| ((*r).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(ours.len(), RBAC.len(), "RBAC lists a pair twice");
        assert_eq!(
            ours, chart,
            "the backend's calls and the chart's Role differ"
        );
        // Every granted pair is used by a call, and nothing else is.
        let used: BTreeSet<(String, String)> = [
            CREATE_POD,
            GET_POD,
            LIST_PODS,
            WATCH_PODS,
            DELETE_POD,
            READ_LOG,
            ATTACH,
            CREATE_CLAIM,
            GET_CLAIM,
            LIST_CLAIMS,
            DELETE_CLAIM,
        ]
        .iter()
        .map(|g| (g.resource().to_owned(), g.verb().to_owned()))
        .collect();
        assert_eq!(
            used, chart,
            "a granted verb is unused, or a call is not granted"
        );
    }
}
