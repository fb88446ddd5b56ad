//! Integration tests: the real service over HTTP against real PostgreSQL
//! (a fresh database per test) and Redis (a unique channel prefix per test).

// A test fails by panicking: unwrap and expect are how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod batching;
mod cli;
mod guarantees;
mod horizon;
mod live;
mod load;
mod messages;
mod metrics;
mod openapi;
mod portable;
mod relay;
mod retention;
mod sessions;
#[path = "../support/mod.rs"]
mod support;
