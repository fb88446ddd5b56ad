//! The fault suite (guarantees G4 and G9, `docs/design.md`): real
//! `agent-sessions serve` processes under write load while PostgreSQL
//! restarts, Redis restarts, or `serve` itself is SIGKILLed. Each test prints its figures (acknowledged writes
//! lost, events lost at a Redis subscriber, seconds to recover) and asserts
//! none are lost and the service recovers without being restarted.
//!
//! `regressions` keeps the inputs the fuzzer (`scripts/fuzz.sh`) found
//! breaking the service.

// A test fails by panicking: unwrap and expect are how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod load;
mod postgres;
mod redis_restart;
mod regressions;
mod sigkill;
mod sigterm;
#[path = "../support/mod.rs"]
mod support;
mod verify;

use support::db::{SHARED_ADMIN_URL, TestDatabase};
use support::redis_server::Subscriber;
use support::serve::{ServeProcess, migrate};
use support::{SHARED_REDIS, channel_prefix, init};

/// A migrated database of its own on the shared cluster, `serve` on it, and
/// a subscriber to its event channel on the shared Redis.
pub struct Stage {
    pub db: TestDatabase,
    pub channel: String,
    pub sub: Subscriber,
    pub serve: ServeProcess,
}

impl Stage {
    pub async fn start() -> Self {
        init();
        let db = TestDatabase::create(SHARED_ADMIN_URL).await;
        migrate(&db.url);
        let prefix = channel_prefix();
        let channel = format!("{prefix}events:session");
        let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
        let serve = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
        Self {
            db,
            channel,
            sub,
            serve,
        }
    }
}
