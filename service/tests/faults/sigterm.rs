//! A rolling restart: `serve` gets SIGTERM under write load, drains, exits
//! cleanly, and a new process takes over on the same port.

use std::time::Instant;

use crate::Stage;
use crate::load::Writers;
use crate::support::serve::replay_verify;
use crate::verify::{await_delivery, lost_acks, secs};

#[tokio::test]
async fn serve_sigterm_under_load() {
    let Stage {
        db,
        channel,
        sub,
        mut serve,
    } = Stage::start().await;
    let writers = Writers::start(&serve.base(), 6);
    writers
        .wait_for_acks_since(Instant::now(), 100, 30, "load before the fault")
        .await;

    let exit = serve.sigterm(15).await;
    let stopped_at = Instant::now();
    serve.spawn().await;
    writers
        .wait_for_acks_since(stopped_at, 50, 30, "load after the restart")
        .await;
    let first_write = writers.first_ack_since(stopped_at).expect("an ack") - stopped_at;
    let tally = writers.stop().await;

    let lost = lost_acks(&serve.api, &tally.acks).await;
    let committed = db.committed_events().await;
    let (delivery, waited) = await_delivery(&[&sub], &channel, &committed, 30).await;
    let (replay_ok, replay) = replay_verify(&db.url);

    eprintln!("serve_sigterm_under_load:");
    match exit {
        Some((status, took)) => eprintln!("  SIGTERM: exited with {status} after {}", secs(took)),
        None => eprintln!("  SIGTERM: still running after 15 s"),
    }
    eprintln!(
        "  acknowledged writes {}, lost {}",
        tally.acks.len(),
        lost.len()
    );
    eprintln!("  answers: {}", tally.statuses_line());
    eprintln!(
        "  the new process's first write acknowledged {} after the old one exited",
        secs(first_write)
    );
    eprintln!(
        "  {} (all in within {} after the load stopped)",
        delivery.line(),
        secs(waited)
    );
    eprintln!("  replay --verify: {replay}");

    let (status, _) = exit.expect("serve exits on SIGTERM");
    assert!(status.success(), "a drained serve exits 0, not {status}");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(
        tally.unexpected.is_empty() && !tally.statuses.keys().any(|s| *s >= 500),
        "no 5xx across a rolling restart: {} {:?} {:?}",
        tally.statuses_line(),
        tally.unexpected,
        tally.unavailable_bodies
    );
    delivery.assert_complete();
    assert!(replay_ok, "replay --verify: {replay}");
}
