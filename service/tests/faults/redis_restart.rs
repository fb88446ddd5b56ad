//! G4 and G9: Redis dies under write load and comes back. Writes never
//! depend on Redis, so none fail; events committed meanwhile are published
//! when it returns; `/readyz` says Redis is down while it is.

use std::time::{Duration, Instant};

use crate::load::{ReadyProbe, Writers};
use crate::support::channel_prefix;
use crate::support::db::{SHARED_ADMIN_URL, TestDatabase};
use crate::support::redis_server::{RedisServer, Subscriber};
use crate::support::serve::{ServeProcess, migrate, replay_verify};
use crate::support::{eventually, init};
use crate::verify::{await_delivery, lost_acks, received, secs};

const DOWN_FOR: Duration = Duration::from_secs(2);

#[tokio::test]
async fn redis_restart_under_load() {
    init();
    let db = TestDatabase::create(SHARED_ADMIN_URL).await;
    migrate(&db.url);
    let mut redis = RedisServer::start().await;
    let prefix = channel_prefix();
    let channel = format!("{prefix}events:session");
    let before = Subscriber::start(&redis.url(), std::slice::from_ref(&channel)).await;
    let mut serve = ServeProcess::start(&db.url, &redis.url(), &prefix).await;
    let pid = serve.pid();
    let probe = ReadyProbe::start(&serve.base());
    let writers = Writers::start(&serve.base(), 6);
    writers
        .wait_for_acks_since(Instant::now(), 100, 30, "load before the fault")
        .await;
    eventually(
        "events to reach Redis before the fault",
        Duration::from_secs(10),
        || async { (before.on(&channel).await.len() >= 50).then_some(()) },
    )
    .await;

    redis.kill();
    let down_at = Instant::now();
    probe
        .wait_unready_after(down_at, 15, |s| {
            s.status == Some(503)
                && s.body["checks"]["redis"] != "ok"
                && s.body["checks"]["database"] == "ok"
        })
        .await;
    tokio::time::sleep(DOWN_FOR.saturating_sub(down_at.elapsed())).await;
    writers
        .wait_for_acks_since(down_at, 50, 30, "writes while Redis is down")
        .await;
    let acked_while_down = writers.acked_since(down_at);
    // Back, but refusing PUBLISH until a new subscriber listens: pub/sub
    // keeps nothing for subscribers that are not connected.
    let up_at = Instant::now();
    redis.restart(false).await;
    let after = Subscriber::start(&redis.url(), std::slice::from_ref(&channel)).await;
    redis.allow_publish().await;
    let publish_at = Instant::now();
    let during = probe.within(down_at, up_at);
    let ready_again = probe.wait_ready_after(publish_at, 30).await;
    let first_published = {
        eventually(
            "a publication after Redis returned",
            Duration::from_secs(30),
            || async { (!after.on(&channel).await.is_empty()).then_some(()) },
        )
        .await;
        publish_at.elapsed()
    };
    writers
        .wait_for_acks_since(Instant::now(), 50, 30, "load after the fault")
        .await;
    let tally = writers.stop().await;
    drop(probe);
    let still_running = serve.is_running() && serve.pid() == pid;

    let lost = lost_acks(&serve.api, &tally.acks).await;
    let committed = db.committed_events().await;
    let (delivery, waited) = await_delivery(&[&before, &after], &channel, &committed, 30).await;
    let (replay_ok, replay) = replay_verify(&db.url);
    let got_before = received(&[&before], &channel).await.len();

    eprintln!("redis_restart_under_load:");
    eprintln!(
        "  acknowledged writes {} ({} while Redis was down), lost {}",
        tally.acks.len(),
        acked_while_down,
        lost.len()
    );
    eprintln!("  answers: {}", tally.statuses_line());
    eprintln!(
        "  Redis down {}: /readyz 503 (redis down, database ok) on {} of {} probes; \
         after Redis returned: /readyz 200 in {}, first event published in {}",
        secs(up_at - down_at),
        during.iter().filter(|s| s.status == Some(503)).count(),
        during.len(),
        secs(ready_again),
        secs(first_published)
    );
    eprintln!(
        "  {} ({} before the fault, all in within {} after the load stopped)",
        delivery.line(),
        got_before,
        secs(waited)
    );
    eprintln!("  replay --verify: {replay}");
    eprintln!("  serve ran throughout without a restart: {still_running}");

    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(
        tally.statuses.keys().all(|s| *s == 200 || *s == 201) && tally.transport_errors == 0,
        "writes must not fail while only Redis is down: {} {:?}",
        tally.statuses_line(),
        tally.unexpected
    );
    assert!(
        during.iter().all(|s| s.status == Some(503)),
        "/readyz not 503 while Redis was down"
    );
    delivery.assert_complete();
    assert!(replay_ok, "replay --verify: {replay}");
    assert!(still_running, "serve must recover without a restart");
    drop(serve);
}
