//! G4 across a crash of the service itself: `serve` is SIGKILLed under write
//! load and started again on the same port. What it acknowledged is kept, and
//! what committed is published (possibly twice: at least once).

use std::time::Instant;

use crate::channel_prefix;
use crate::load::Writers;
use crate::support::db::{SHARED_ADMIN_URL, TestDatabase};
use crate::support::redis_server::Subscriber;
use crate::support::serve::{ServeProcess, migrate, replay_verify};
use crate::support::{SHARED_REDIS, init};
use crate::verify::{await_delivery, lost_acks, secs};

#[tokio::test]
async fn serve_sigkill_under_load() {
    init();
    let db = TestDatabase::create(SHARED_ADMIN_URL).await;
    migrate(&db.url);
    let prefix = channel_prefix();
    let channel = format!("{prefix}events:session");
    let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
    let mut serve = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
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
    assert_eq!(delivery.lost, 0, "events never published");
    assert!(
        delivery.out_of_order.is_empty(),
        "{:?}",
        delivery.out_of_order
    );
    assert!(replay_ok, "replay --verify: {replay}");
}
