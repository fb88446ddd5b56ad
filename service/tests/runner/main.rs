//! The runner's integration tests: the local backend with the real Claude
//! Code CLI against a fake Anthropic API (`local`, `policies`), the real
//! `agent-sessions runner` binary killed and restarted (`restart`), request
//! ids followed into the runner (`trace`), workers driven by wake-up hints
//! while the event feed is held (`wake`), live sessions (`live`: turns,
//! input, approvals, interrupt, idle timeout), and the Kubernetes backend
//! against a fake Kubernetes API (`kubernetes`), with live sessions there
//! too, the real CLI run as the pods' container (`kubernetes_live`), and
//! sessions whose transcript moves between backends (`portable`), and
//! workspaces removed when their session is deleted (`retention`); each
//! with the API service in-process on its own database.

// A test fails by panicking: unwrap and expect are how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod kubernetes;
mod kubernetes_live;
mod live;
mod local;
mod policies;
mod portable;
mod portable_kube;
mod restart;
mod retention;
#[path = "../support/mod.rs"]
mod support;
mod trace;
mod wake;
