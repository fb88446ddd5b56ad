//! G9: PostgreSQL goes away under write load, twice (a fast shutdown, then a
//! crash recovered from WAL), and comes back; `serve` is never restarted.

use std::time::{Duration, Instant};

use crate::cluster::PrivatePostgres;
use crate::load::{ReadyProbe, Writers};
use crate::support::channel_prefix;
use crate::support::db::TestDatabase;
use crate::support::redis_server::Subscriber;
use crate::support::serve::{ServeProcess, migrate, replay_verify};
use crate::support::{SHARED_REDIS, eventually, init};
use crate::verify::{await_delivery, lost_acks, secs};

/// How long PostgreSQL stays down each time: longer than the pool's acquire
/// timeout (3 s by default), so requests time out waiting, not only fail on
/// connections that broke.
const DOWN_FOR: Duration = Duration::from_secs(4);

struct Outage {
    mode: &'static str,
    down_at: Instant,
    /// From `pg_ctl stop` returning to `pg_ctl start` returning (recovery included).
    down_for: Duration,
    /// 503s from the start of this outage to the start of the next.
    unavailable: usize,
    ready_probes: usize,
    untruthful_probes: usize,
    first_write: Duration,
    ready_again: Duration,
    first_published: Duration,
}

#[tokio::test]
async fn postgres_restart_under_load() {
    init();
    let pg = PrivatePostgres::start();
    let db = TestDatabase::create(&pg.admin_url()).await;
    migrate(&db.url);
    let prefix = channel_prefix();
    let channel = format!("{prefix}events:session");
    let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
    let mut serve = ServeProcess::start(&db.url, SHARED_REDIS, &prefix).await;
    let pid = serve.pid();
    let probe = ReadyProbe::start(&serve.base());
    let writers = Writers::start(&serve.base(), 6);
    writers
        .wait_for_acks_since(Instant::now(), 100, 30, "load before the fault")
        .await;

    let mut outages = Vec::new();
    for mode in ["fast", "immediate"] {
        pg.stop(mode);
        let down_at = Instant::now();
        probe
            .wait_unready_after(down_at, 15, |s| {
                s.status == Some(503) && s.body["checks"]["database"] != "ok"
            })
            .await;
        let rest = DOWN_FOR.saturating_sub(down_at.elapsed());
        tokio::time::sleep(rest).await;
        let up_at = Instant::now();
        pg.start_again();
        let back_at = Instant::now();
        writers
            .wait_for_acks_since(up_at, 1, 30, "a write after PostgreSQL returned")
            .await;
        // `pg_ctl start -w` polls: the first write may come just before it returns.
        let first = writers.first_ack_since(up_at).expect("an ack");
        let ready_again = probe.wait_ready_after(back_at, 30).await;
        let first_published = published_after(&sub, &channel, &db, back_at).await;
        let during = probe.within(down_at, up_at);
        outages.push(Outage {
            mode,
            down_at,
            down_for: back_at - down_at,
            unavailable: 0,
            ready_probes: during.len(),
            untruthful_probes: during.iter().filter(|s| s.status != Some(503)).count(),
            first_write: first.saturating_duration_since(back_at),
            ready_again,
            first_published,
        });
    }
    writers
        .wait_for_acks_since(Instant::now(), 50, 30, "load after the faults")
        .await;
    let ends: Vec<Instant> = outages.iter().skip(1).map(|o| o.down_at).collect();
    for (o, end) in outages
        .iter_mut()
        .zip(ends.into_iter().chain([Instant::now()]))
    {
        o.unavailable = writers.unavailable_between(o.down_at, end);
    }
    let tally = writers.stop().await;
    drop(probe);
    let still_running = serve.is_running() && serve.pid() == pid;

    let lost = lost_acks(&serve.api, &tally.acks).await;
    let committed = db.committed_events().await;
    let (delivery, waited) = await_delivery(&[&sub], &channel, &committed, 30).await;
    let (replay_ok, replay) = replay_verify(&db.url);

    eprintln!("postgres_restart_under_load:");
    eprintln!(
        "  acknowledged writes {}, lost {}",
        tally.acks.len(),
        lost.len()
    );
    eprintln!(
        "  answers: {}; 503 without Retry-After {}",
        tally.statuses_line(),
        tally.unavailable_without_retry_after
    );
    for o in &outages {
        eprintln!(
            "  outage `pg_ctl stop -m {}`, down {}: writers got {} × 503, /readyz 503 on {} of {} probes; \
             after PostgreSQL was up: first write in {}, /readyz 200 in {}, \
             first event committed since published in {}",
            o.mode,
            secs(o.down_for),
            o.unavailable,
            o.ready_probes - o.untruthful_probes,
            o.ready_probes,
            secs(o.first_write),
            secs(o.ready_again),
            secs(o.first_published)
        );
    }
    eprintln!(
        "  {} (all in within {} after the load stopped)",
        delivery.line(),
        secs(waited)
    );
    eprintln!("  replay --verify: {replay}");
    eprintln!("  serve ran throughout without a restart: {still_running}");

    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(
        tally.unexpected.is_empty() && tally.transport_errors == 0,
        "only 200, 201 and 503 expected: {:?}, transport errors {}",
        tally.unexpected,
        tally.transport_errors
    );
    assert_eq!(
        tally.unavailable_without_retry_after, 0,
        "503 without Retry-After"
    );
    for o in &outages {
        assert!(o.unavailable > 0, "writers never saw the {} outage", o.mode);
        assert_eq!(
            o.untruthful_probes, 0,
            "/readyz not 503 while PostgreSQL was down ({})",
            o.mode
        );
    }
    delivery.assert_complete();
    assert!(replay_ok, "replay --verify: {replay}");
    assert!(still_running, "serve must recover without a restart");
    drop(serve);
}

/// How long after `t` the subscriber first got an event committed after `t`.
async fn published_after(
    sub: &Subscriber,
    channel: &str,
    db: &TestDatabase,
    t: Instant,
) -> Duration {
    let known: std::collections::HashSet<String> = db
        .committed_events()
        .await
        .into_iter()
        .map(|(e, _, _)| e)
        .collect();
    eventually("a new event published", Duration::from_secs(30), || async {
        sub.on(channel)
            .await
            .iter()
            .any(|m| !known.contains(m["event_id"].as_str().unwrap()))
            .then_some(())
    })
    .await;
    t.elapsed()
}
