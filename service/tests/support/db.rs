//! A PostgreSQL database of a test's own, created on some cluster and
//! dropped (with its connections) when the guard goes, panics included.

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// The machine's own cluster, for tests that do not restart PostgreSQL.
pub const SHARED_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// An empty database on the cluster `admin_url` connects to.
    pub async fn create(admin_url: &str) -> Self {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(admin_url)
            .await
            .expect("admin connection");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').expect("URL with a database").0;
        Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// A database on the shared cluster with every migration applied.
    pub async fn migrated() -> Self {
        let db = Self::create(SHARED_ADMIN_URL).await;
        let conn = db.connect().await;
        Migrator::up(&conn, None).await.expect("migrations");
        conn.close().await.ok();
        db
    }

    pub async fn connect(&self) -> DatabaseConnection {
        Database::connect(&self.url).await.expect("test database")
    }

    /// The first column of the first row of `sql`, as a number.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        self.sql_opt_i64(sql).await.expect("a row")
    }

    /// The first column of the first row of `sql`, if there is a row.
    pub async fn sql_opt_i64(&self, sql: &str) -> Option<i64> {
        let db = self.connect().await;
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .expect("query");
        db.close().await.ok();
        row.map(|r| r.try_get_by_index::<i64>(0).expect("an i64 column"))
    }

    /// Every committed event as (event_id, session id, version), in position
    /// order, straight from the table: the ground truth a subscriber is
    /// compared with.
    pub async fn committed_events(&self) -> Vec<(String, String, i64)> {
        let db = self.connect().await;
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT event_id::text AS e, aggregate_id::text AS a, version \
                 FROM events ORDER BY position",
            ))
            .await
            .expect("events");
        db.close().await.ok();
        rows.iter()
            .map(|r| {
                (
                    r.try_get("", "e").expect("event_id"),
                    r.try_get("", "a").expect("aggregate_id"),
                    r.try_get("", "version").expect("version"),
                )
            })
            .collect()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: do the async work on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = Database::connect(&admin_url).await {
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
