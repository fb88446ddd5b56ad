//! The API service in-process, on a free loopback port, against a freshly
//! created and migrated database of its own (dropped when the `TestApp`
//! goes) and a Redis channel prefix of its own; with request helpers that
//! read each answer whole (`Reply`) so tests assert on status, headers and
//! body without unwrapping a chain each time.

use agent_sessions::contract::Problem;
use agent_sessions::settings::Settings;
use agent_sessions::startup::Application;
use reqwest::RequestBuilder;
use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::db::TestDatabase;
use super::{AGENT, SHARED_REDIS, channel_prefix, init};

/// The API in-process; its request helpers are `Api`'s (`app.get(id)`,
/// `app.patch(...)`, … through `Deref`).
pub struct TestApp {
    pub api: Api,
    /// What the instance runs with (a runner under test starts from these).
    pub settings: Settings,
    pub db: TestDatabase,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

/// Request helpers against one service: the in-process `TestApp` and a
/// `serve` process (`ServeProcess::api`) alike. Paths are relative to `url`.
#[derive(Clone)]
pub struct Api {
    /// Base URL, `http://127.0.0.1:{port}`.
    pub url: String,
    pub http: reqwest::Client,
}

/// An answer read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub async fn read(res: reqwest::Response) -> Self {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.bytes().await.expect("response body").to_vec();
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: not JSON ({e}): {}", self.status, self.text()))
    }

    /// The body as a `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not a {} ({e}): {}",
                self.status,
                std::any::type_name::<T>(),
                self.text()
            )
        })
    }

    /// A header's value, `""` when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Assert the status (showing the body when it differs); the reply.
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "{}", self.text());
        self
    }

    /// An `application/problem+json` body with a problem type of ours and a
    /// detail.
    pub fn problem(&self) -> Problem {
        assert_eq!(
            self.header("content-type"),
            "application/problem+json",
            "status {}: {}",
            self.status,
            self.text()
        );
        let p: Problem = self.parse();
        assert!(
            p.kind.starts_with("urn:agent-sessions:problem:"),
            "{}",
            p.kind
        );
        assert!(!p.detail.is_empty(), "a problem says what went wrong");
        p
    }
}

/// A session's id.
pub fn id_of(session: &Value) -> String {
    session["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a session with an id: {session}"))
        .to_owned()
}

/// Settings for an instance under test on database `db_url`: a free port,
/// a small pool, authentication off (tests talk without tokens unless they
/// turn it on), a channel prefix of its own.
pub fn test_settings(db_url: &str) -> Settings {
    let mut s = Settings::load(None).expect("default settings");
    s.server.port = 0;
    s.server.host = "127.0.0.1".into();
    s.server.workers = Some(2);
    s.server.shutdown_timeout_secs = 1;
    s.database.url = db_url.to_owned();
    s.database.max_connections = 6;
    s.redis.url = SHARED_REDIS.into();
    s.redis.channel_prefix = channel_prefix();
    s.auth.enabled = false;
    s
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawn with settings adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        init();
        let db = TestDatabase::migrated().await;
        let mut settings = test_settings(&db.url);
        tweak(&mut settings);
        let app = Application::build(&settings).await.expect("build the API");
        let api = Api::new(&format!("http://127.0.0.1:{}", app.port()));
        let server = tokio::spawn(app.run_until_stopped());
        Self {
            api,
            settings,
            db,
            server,
        }
    }

    /// (sessions, events) rows in the database.
    pub async fn counts(&self) -> (i64, i64) {
        (
            self.db.sql_i64("SELECT count(*) FROM sessions").await,
            self.db.sql_i64("SELECT count(*) FROM events").await,
        )
    }

    /// Stop serving and drop the database (what dropping does, said aloud
    /// at the end of a test).
    pub async fn teardown(self) {
        drop(self);
    }
}

impl Api {
    pub fn new(url: &str) -> Self {
        init();
        Self {
            url: url.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// The absolute URL of `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Send a request built on `self.http`; the answer, read whole.
    pub async fn send(&self, req: RequestBuilder) -> Reply {
        Reply::read(self.open(req).await).await
    }

    /// Send a request without reading the body (a stream, read as it comes).
    pub async fn open(&self, req: RequestBuilder) -> reqwest::Response {
        req.send().await.expect("an answer")
    }

    /// `GET path`.
    pub async fn fetch(&self, path: &str) -> Reply {
        self.send(self.http.get(self.at(path))).await
    }

    /// `GET path`, which must succeed; its JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.fetch(path).await;
        assert!(
            (200..300).contains(&r.status),
            "GET {path}: {} {}",
            r.status,
            r.text()
        );
        r.json()
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(self.http.post(self.at(path)).json(body)).await
    }

    /// `POST /sessions/`, which must create; the session.
    pub async fn create_session(&self, body: &Value) -> Value {
        self.post("/sessions/", body).await.expect(201).json()
    }

    /// `POST /sessions/`, which must create; the new session's id.
    pub async fn create_id(&self, body: &Value) -> String {
        id_of(&self.create_session(body).await)
    }

    /// A task session of `AGENT` with context `{"n": 0}`.
    pub async fn create_default(&self) -> Value {
        self.create_session(
            &json!({"agent_id": AGENT, "session_type": "task", "context": {"n": 0}}),
        )
        .await
    }

    /// `GET /sessions/{id}`, which must exist; the session.
    pub async fn get(&self, id: &str) -> Value {
        self.fetch(&format!("/sessions/{id}"))
            .await
            .expect(200)
            .json()
    }

    /// `PATCH /sessions/{id}` as `application/json` (named fields replaced).
    pub async fn patch(&self, id: &str, body: &Value) -> Reply {
        self.send(
            self.http
                .patch(self.at(&format!("/sessions/{id}")))
                .json(body),
        )
        .await
    }

    /// `PATCH /sessions/{id}` as `application/merge-patch+json`.
    pub async fn merge_patch(&self, id: &str, body: &Value) -> Reply {
        self.send(
            self.http
                .patch(self.at(&format!("/sessions/{id}")))
                .header("content-type", "application/merge-patch+json")
                .body(body.to_string()),
        )
        .await
    }

    /// `DELETE /sessions/{id}`.
    pub async fn delete(&self, id: &str) -> Reply {
        self.send(self.http.delete(self.at(&format!("/sessions/{id}"))))
            .await
    }

    /// `GET /sessions/{id}/messages`, or `None` while the service has no such route.
    pub async fn messages(&self, id: &str) -> Option<Value> {
        let r = self.fetch(&format!("/sessions/{id}/messages")).await;
        (r.status != 404).then(|| r.json())
    }

    /// Every event in the feed, following pages.
    pub async fn whole_feed(&self) -> Vec<Value> {
        let mut after = 0i64;
        let mut all = Vec::new();
        loop {
            let page: Vec<Value> = self
                .fetch(&format!("/events?after={after}&limit=500"))
                .await
                .expect(200)
                .parse();
            let Some(last) = page.last() else {
                return all;
            };
            after = last["position"].as_i64().expect("position");
            all.extend(page);
        }
    }

    /// The whole feed once it holds at least `n` events. The feed only
    /// shows events below the oldest open write transaction on the whole
    /// PostgreSQL cluster, so other tests' transactions can delay (never
    /// drop) what a reader sees.
    pub async fn feed_with(&self, n: usize) -> Vec<Value> {
        super::eventually(
            &format!("{n} events in the feed"),
            std::time::Duration::from_secs(20),
            || async {
                let feed = self.whole_feed().await;
                (feed.len() >= n).then_some(feed)
            },
        )
        .await
    }

    /// GET a JSON array until `ok` holds for it (see `feed_with`).
    pub async fn get_until(&self, path: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        super::eventually(
            &format!("GET {path} to satisfy the test"),
            std::time::Duration::from_secs(20),
            || async {
                let page: Vec<Value> = self.fetch(path).await.expect(200).parse();
                ok(&page).then_some(page)
            },
        )
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stop serving before the database (a field) is dropped.
        self.server.abort();
    }
}

/// Read SSE frames until `n` events arrived; returns (id, data) pairs.
pub async fn read_sse(res: reqwest::Response, n: usize) -> Vec<(i64, Value)> {
    use futures_util::StreamExt;
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("SSE data in time")
            .expect("stream open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut id = None;
            let mut data: Option<Value> = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse().unwrap());
                }
                if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            if let (Some(i), Some(d)) = (id, data) {
                out.push((i, d));
            }
        }
    }
    out
}
