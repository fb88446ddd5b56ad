//! agent-sessions: an event-sourced store of AI-agent sessions.
//!
//! Layers, each importing only those below it:
//! `startup` → `api` → `store`, `bus` → `contract` → `domain`;
//! `runner` → `contract` → `domain` (the runner reaches the API over HTTP only).

pub mod api;
pub mod auth;
pub mod backoff;
pub mod bus;
pub mod cli;
pub mod contract;
pub mod domain;
pub mod metrics;
pub mod monitor;
pub mod relay;
pub mod runner;
pub mod settings;
pub mod signals;
pub mod startup;
pub mod store;
pub mod telemetry;
