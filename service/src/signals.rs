//! Signals, both ways: waiting for the ones that ask this process to stop
//! (SIGTERM from Kubernetes or systemd, SIGINT from a terminal; `serve` and
//! `runner` both end on the first of them), and sending them to a worker's
//! process group (the local runner backend).

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

/// Resolves on the first SIGTERM or SIGINT. A handler that cannot be
/// installed is logged and the other one still waited for.
pub(crate) async fn shutdown_requested() {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Ok(mut only), Err(e)) | (Err(e), Ok(mut only)) => {
            warn!(error = %e, "cannot install a signal handler; waiting for the other signal");
            only.recv().await;
        }
        (Err(e), Err(_)) => {
            warn!(error = %e, "cannot install signal handlers; waiting for Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Send `sig` to process group `pgid`; false when the group is gone (or
/// cannot be signalled, which is logged).
pub(crate) fn signal_group(pgid: i32, sig: Signal) -> bool {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            warn!(pgid, signal = %sig, error = %e, "cannot signal the process group");
            false
        }
    }
}

/// Is any process left in the group?
pub(crate) fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}
