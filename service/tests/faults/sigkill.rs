//! G4 across a crash of the service itself: `serve` is SIGKILLed under write
//! load and started again on the same port. What it acknowledged is kept, and
//! what committed is published (possibly twice: at least once).

use std::time::Instant;

use crate::Stage;
use crate::load::Writers;
use crate::support::serve::replay_verify;
use crate::verify::{await_delivery, lost_acks, secs};

#[tokio::test]
async fn serve_sigkill_under_load() {
    let Stage {
        db,
        channel,
        sub,
        mut serve,
    } = Stage::start().await;
    let writers = Writers::start(&serve.base(), 6);
    writers
        .wait_for_acks_since(Instant::now(), 200, 30, "load before the fault")
        .await;

    serve.sigkill();
    let killed_at = Instant::now();
    let acked_before = writers.acked();
    serve.spawn().await;
    let listening = killed_at.elapsed();
    writers
        .wait_for_acks_since(killed_at, 1, 30, "a write after the restart")
        .await;
    let first_write = writers.first_ack_since(killed_at).expect("an ack") - killed_at;
    writers
        .wait_for_acks_since(killed_at, 100, 30, "load after the restart")
        .await;
    let tally = writers.stop().await;

    let lost = lost_acks(&serve.api, &tally.acks).await;
    let committed = db.committed_events().await;
    let (delivery, waited) = await_delivery(&[&sub], &channel, &committed, 30).await;
    let (replay_ok, replay) = replay_verify(&db.url);

    eprintln!("serve_sigkill_under_load:");
    eprintln!(
        "  acknowledged writes {} ({acked_before} before the SIGKILL), lost {}",
        tally.acks.len(),
        lost.len()
    );
    eprintln!("  answers: {}", tally.statuses_line());
    eprintln!(
        "  after SIGKILL: the new process listened in {}, first write acknowledged in {}",
        secs(listening),
        secs(first_write)
    );
    eprintln!(
        "  {} (all in within {} after the load stopped)",
        delivery.line(),
        secs(waited)
    );
    eprintln!("  replay --verify: {replay}");

    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(
        tally.unexpected.is_empty() && !tally.statuses.keys().any(|s| *s >= 500),
        "no 5xx across a crash: {} {:?}",
        tally.statuses_line(),
        tally.unexpected
    );
    delivery.assert_complete();
    assert!(replay_ok, "replay --verify: {replay}");
}
