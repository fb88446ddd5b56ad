//! Spawning the real service for a test: a fresh PostgreSQL database, a
//! unique Redis channel prefix, the API on a free port. The database is
//! dropped when the `TestApp` goes away.

use std::sync::Once;

use agent_sessions::settings::Settings;
use agent_sessions::startup::Application;
use migration::{Migrator, MigratorTrait};
use reqwest::{Client, Response};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AGENT: &str = "550e8400-e29b-41d4-a716-446655440000";

pub struct TestApp {
    pub address: String,
    pub db_name: String,
    pub db_url: String,
    pub channel_prefix: String,
    pub client: Client,
}

pub fn init_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if std::env::var_os("TEST_LOG").is_some() {
            agent_sessions::telemetry::init(agent_sessions::settings::LogFormat::Pretty, "info");
        }
    });
}

/// Create and migrate a fresh database; returns its name and URL.
pub async fn fresh_database() -> (String, String) {
    init_process();
    let name = format!("test_{}", Uuid::new_v4().simple());
    let admin = Database::connect(ADMIN_URL)
        .await
        .expect("admin connection");
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    admin.close().await.ok();
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let db = Database::connect(&url).await.expect("test database");
    Migrator::up(&db, None).await.expect("migrations");
    db.close().await.ok();
    (name, url)
}

pub fn test_settings(db_url: &str, prefix: &str) -> Settings {
    let mut s = Settings::load(None).expect("default settings");
    s.server.port = 0;
    s.server.host = "127.0.0.1".into();
    s.server.workers = Some(2);
    s.server.shutdown_timeout_secs = 1;
    s.database.url = db_url.to_owned();
    s.database.max_connections = 6;
    s.redis.url = "redis://127.0.0.1:6379".into();
    s.redis.channel_prefix = prefix.to_owned();
    s.auth.enabled = false;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    init_process();
    let (db_name, db_url) = fresh_database().await;
    let prefix = format!("test:{}:", Uuid::new_v4().simple());
    let mut settings = test_settings(&db_url, &prefix);
    tweak(&mut settings);
    let app = Application::build(&settings).await.expect("build app");
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        db_name,
        db_url,
        channel_prefix: prefix,
        client: Client::builder().build().expect("client"),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        drop(DropDatabase(self.db_name.clone()));
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.db_url).await.expect("db")
    }

    pub async fn sql_i64(&self, sql: &str) -> i64 {
        let db = self.db().await;
        let row = db
            .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .expect("query")
            .expect("row");
        let v: i64 = row.try_get_by_index(0).expect("i64 column");
        db.close().await.ok();
        v
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn create(&self, body: Value) -> Value {
        let res = self.post_json("/sessions/", &body).await;
        assert_eq!(
            res.status(),
            201,
            "create failed: {}",
            res.text().await.unwrap_or_default()
        );
        res.json().await.expect("json")
    }

    pub async fn create_default(&self) -> Value {
        self.create(json!({"agent_id": AGENT, "session_type": "task", "context": {"n": 0}}))
            .await
    }

    pub async fn patch(&self, id: &str, body: &Value) -> Response {
        self.client
            .patch(self.url(&format!("/sessions/{id}")))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert!(res.status().is_success(), "GET {path}: {}", res.status());
        res.json().await.expect("json")
    }

    /// Every event in the feed, following `Link` pages.
    pub async fn whole_feed(&self) -> Vec<Value> {
        let mut after = 0i64;
        let mut all = Vec::new();
        loop {
            let page = self
                .get_json(&format!("/events?after={after}&limit=500"))
                .await;
            let page = page.as_array().expect("array").clone();
            if page.is_empty() {
                return all;
            }
            after = page.last().unwrap()["position"].as_i64().unwrap();
            all.extend(page);
        }
    }

    /// The whole feed once it holds at least `n` events. The feed only
    /// shows events below the oldest open write transaction on the whole
    /// PostgreSQL cluster, so other tests' transactions can delay (never
    /// drop) what a reader sees.
    pub async fn feed_with(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let feed = self.whole_feed().await;
            if feed.len() >= n {
                return feed;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "feed has {} of {n} events",
                feed.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// GET a JSON array until `ok` holds for it (see `feed_with`).
    pub async fn get_until(&self, path: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let v = self.get_json(path).await;
            let arr = v.as_array().expect("array").clone();
            if ok(&arr) {
                return arr;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "GET {path} never satisfied: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn counts(&self) -> (i64, i64) {
        (
            self.sql_i64("SELECT count(*) FROM sessions").await,
            self.sql_i64("SELECT count(*) FROM events").await,
        )
    }
}

/// A problem+json response: checks the media type and returns the body.
pub async fn problem(res: Response) -> Value {
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(ct, "application/problem+json", "status {}", res.status());
    let body: Value = res.json().await.expect("problem json");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:agent-sessions:problem:")
    );
    assert!(body["detail"].is_string());
    body
}

/// Drops a database created with `fresh_database` when it goes out of scope.
pub struct DropDatabase(pub String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = Database::connect(ADMIN_URL).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    admin.close().await.ok();
                }
            });
        })
        .join();
    }
}
