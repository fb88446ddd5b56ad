//! The API service in-process, on port 0, against its own freshly created
//! and migrated PostgreSQL database (dropped again at the end) and its own
//! Redis channel prefix.

use agent_sessions::settings::Settings;
use agent_sessions::startup::Application;
use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;
use uuid::Uuid;

pub struct TestApi {
    pub url: String,
    pub settings: Settings,
    pub http: reqwest::Client,
    db_name: String,
    admin_url: String,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

async fn drop_database(admin_url: &str, db: &str) {
    if let Ok(admin) = Database::connect(admin_url).await {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await;
        let _ = admin.close().await;
    }
}

impl TestApi {
    pub async fn spawn() -> Self {
        agent_sessions::runner::api::install_tls_provider();
        // Shown by the test runner when a test fails.
        agent_sessions::telemetry::init(
            agent_sessions::settings::LogFormat::Pretty,
            "warn,agent_sessions::runner=debug",
        );
        // Tests talk to the API without tokens: switch auth off for the
        // instance under test (a section this build may not know is ignored).
        let file = std::env::temp_dir().join(format!("as-test-{}.toml", Uuid::new_v4().simple()));
        std::fs::write(&file, "[auth]\nenabled = false\n").expect("write test settings");
        let settings = Settings::load(Some(file.clone()));
        let _ = std::fs::remove_file(&file);
        let mut settings = settings.expect("settings load");
        let db_name = format!("as_test_{}", Uuid::new_v4().simple());
        let admin_url = replace_db(&settings.database.url, "postgres");
        let admin = Database::connect(&admin_url)
            .await
            .expect("connect as admin");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{db_name}\""))
            .await
            .expect("create test database");
        let _ = admin.close().await;
        settings.database.url = replace_db(&settings.database.url, &db_name);
        settings.database.max_connections = 5;
        settings.server.port = 0;
        settings.server.workers = Some(1);
        settings.server.shutdown_timeout_secs = 1;
        settings.redis.channel_prefix = format!("test-{}:", Uuid::new_v4().simple());
        let db = Database::connect(&settings.database.url)
            .await
            .expect("connect test database");
        Migrator::up(&db, None).await.expect("migrate");
        let _ = db.close().await;
        let app = Application::build(&settings).await.expect("build the API");
        let url = format!("http://127.0.0.1:{}", app.port());
        let server = tokio::spawn(app.run_until_stopped());
        Self {
            url,
            settings,
            http: reqwest::Client::new(),
            db_name,
            admin_url,
            server: Some(server),
        }
    }

    /// `POST /sessions/`; the created session.
    pub async fn create(&self, body: Value) -> Value {
        let res = self
            .http
            .post(format!("{}/sessions/", self.url))
            .json(&body)
            .send()
            .await
            .expect("POST /sessions/");
        assert_eq!(
            res.status(),
            201,
            "create: {}",
            res.text().await.unwrap_or_default()
        );
        res.json().await.expect("session JSON")
    }

    pub async fn get(&self, id: &str) -> Value {
        let res = self
            .http
            .get(format!("{}/sessions/{id}", self.url))
            .send()
            .await
            .expect("GET /sessions/{id}");
        assert_eq!(res.status(), 200);
        res.json().await.expect("session JSON")
    }

    /// Merge-patch a session; the response status and body.
    pub async fn patch(&self, id: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .patch(format!("{}/sessions/{id}", self.url))
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await
            .expect("PATCH /sessions/{id}");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// `GET /sessions/{id}/messages`, or `None` while the service has no such route.
    pub async fn messages(&self, id: &str) -> Option<Value> {
        let res = self
            .http
            .get(format!("{}/sessions/{id}/messages", self.url))
            .send()
            .await
            .ok()?;
        if res.status() == 404 {
            return None;
        }
        res.json().await.ok()
    }

    pub async fn teardown(mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        drop_database(&self.admin_url, &self.db_name).await;
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        // A failed test still drops its database.
        if self.server.is_some() {
            let (admin, db) = (self.admin_url.clone(), self.db_name.clone());
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Runtime::new() {
                    rt.block_on(drop_database(&admin, &db));
                }
            })
            .join();
        }
    }
}
