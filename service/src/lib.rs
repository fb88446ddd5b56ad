//! agent-sessions: an event-sourced store of AI-agent sessions.
//!
//! Layers, each importing only those below it:
//! `startup`, `retention` → `api` → `store`, `bus` → `contract` → `domain`;
//! `runner`, `cli` → `client` → `contract` → `domain` (the runner and the
//! command-line client reach the API over HTTP only).

mod analytics;
pub mod api;
pub mod auth;
mod backoff;
mod bus;
pub mod cli;
pub mod client;
pub mod contract;
pub mod domain;
mod leader;
mod metrics;
mod monitor;
mod relay;
pub mod retention;
pub mod runner;
pub mod settings;
pub mod shim;
mod signals;
pub mod startup;
pub mod store;
pub mod telemetry;
