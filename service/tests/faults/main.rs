//! The fault suite (DESIGN §3: G4, G9): real `agent-sessions serve` processes
//! under write load while PostgreSQL restarts, Redis restarts, or `serve`
//! itself is SIGKILLed. Each test prints its figures (acknowledged writes
//! lost, events lost at a Redis subscriber, seconds to recover) and asserts
//! none are lost and the service recovers without being restarted.
//!
//! `regressions` keeps the inputs the fuzzer (`scripts/fuzz.sh`) found
//! breaking the service.

mod cluster;
mod load;
mod postgres;
mod redis_restart;
mod regressions;
mod service;
mod sigkill;
mod sigterm;
mod verify;

// The api suite's private Redis server, subscriber and polling helpers.
#[allow(dead_code)]
#[path = "../api/procs.rs"]
mod procs;

pub const AGENT: &str = "550e8400-e29b-41d4-a716-446655440000";
pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// Once per test process: the TLS provider reqwest is built without.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A channel prefix of its own, so tests can share one Redis.
pub fn channel_prefix() -> String {
    format!("faults:{}:", uuid::Uuid::new_v4().simple())
}
