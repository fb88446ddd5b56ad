//! The feed's horizon is held only by the service's own event writers, and
//! only as long as the statement timeout lets them run.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_sessions::domain::{CreateSession, EventMetadata};
use agent_sessions::store::{DatabaseOptions, FeedFilter, Store};
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use serde_json::{Map, json};
use uuid::Uuid;

use crate::support::app::{TestApp, id_of};
use crate::support::db::{SHARED_ADMIN_URL, TestDatabase};
use crate::support::redis_server::Subscriber;
use crate::support::{AGENT, SHARED_REDIS, eventually};

const SECS_10: Duration = Duration::from_secs(10);

/// The position the old, cluster-wide horizon would have allowed.
async fn cluster_horizon(app: &TestApp) -> i64 {
    app.db
        .sql_i64("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint * 1024")
        .await
}

/// A transaction that holds a transaction id until dropped.
struct Stranger {
    _tx: sea_orm::DatabaseTransaction,
}

async fn stranger_in(url: &str, setup: &str, write: &str) -> Stranger {
    let db = Database::connect(url).await.expect("stranger connection");
    db.execute_unprepared(setup).await.expect("stranger setup");
    let tx = db.begin().await.expect("begin");
    tx.execute_unprepared(write).await.expect("stranger write");
    Stranger { _tx: tx }
}

#[tokio::test]
async fn transactions_of_strangers_do_not_hold_the_feed() {
    let app = TestApp::spawn().await;
    let other_db = TestDatabase::create(SHARED_ADMIN_URL).await;
    {
        // One open transaction in another database of the cluster, one on an
        // unrelated table of the service's own database; both hold an xid.
        let _elsewhere = stranger_in(
            &other_db.url,
            "CREATE TABLE batch (n int)",
            "INSERT INTO batch VALUES (1)",
        )
        .await;
        let _beside = stranger_in(
            &app.db.url,
            "CREATE TABLE unrelated (n int)",
            "INSERT INTO unrelated VALUES (1)",
        )
        .await;
        let channel = format!("{}events:session", app.settings.redis.channel_prefix);
        let sub = Subscriber::start(SHARED_REDIS, std::slice::from_ref(&channel)).await;
        let mut sse = app.open(app.http.get(app.at("/events/stream"))).await;

        let id = id_of(&app.create_default().await);
        let res = app.patch(&id, &json!({"status": "paused"})).await;
        assert_eq!(res.status, 200);

        let feed = app.feed_with(2).await;
        let newest = feed.last().unwrap()["position"].as_i64().unwrap();
        assert!(
            cluster_horizon(&app).await <= newest,
            "the strangers would have held a cluster-wide horizon below the new events"
        );
        // SSE delivers both.
        let mut text = String::new();
        while text.matches("event: session.").count() < 2 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
                .await
                .expect("SSE delivers while strangers hold transactions")
                .unwrap()
                .expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains(&id));
        // Redis gets both.
        eventually("both events on Redis", SECS_10, || async {
            (sub.on(&channel).await.len() >= 2).then_some(())
        })
        .await;
    }
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.fetch("/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The writer is held until the statement timeout cuts it: 4 s here, or
/// `HELD_WRITER_TIMEOUT_MS` (the acceptance run uses 31000).
#[tokio::test]
async fn an_open_writer_of_ours_holds_the_feed_visibly_until_the_timeout_cuts_it() {
    let timeout_ms = std::env::var("HELD_WRITER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let app = TestApp::spawn_with(|s| {
        s.database.statement_timeout_ms = timeout_ms;
        s.relay.feed_held_warn_secs = 1;
    })
    .await;
    let a = id_of(&app.create_default().await);
    let b = id_of(&app.create_default().await);
    let db = app.db.connect().await;
    // Writer A, once its event row is being inserted (it has announced itself
    // and holds its transaction id), waits for a lock the test holds.
    db.execute_unprepared(&format!(
        "CREATE FUNCTION hold_a() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.aggregate_id = '{a}' THEN PERFORM pg_advisory_xact_lock(4243); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER hold_a BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION hold_a();"
    ))
    .await
    .unwrap();
    let head = app.feed_with(2).await.last().unwrap()["position"]
        .as_i64()
        .unwrap();
    let holder = app.db.connect().await;
    let lock = holder.begin().await.unwrap();
    lock.execute_unprepared("SELECT pg_advisory_xact_lock(4243)")
        .await
        .unwrap();

    let writer_a = {
        let (api, a) = (app.api.clone(), a.clone());
        tokio::spawn(async move {
            let res = api.patch(&a, &json!({"context": {"by": "A"}})).await;
            (res.status, res.headers.get("retry-after").cloned())
        })
    };
    eventually("writer A waiting inside its statement", SECS_10, || async {
        (app.db
            .sql_i64("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            .await
            > 0)
        .then_some(())
    })
    .await;
    let res = app.patch(&b, &json!({"context": {"by": "B"}})).await;
    assert_eq!(res.status, 200, "B commits while A is open");

    // The feed waits for A (G3), and says so.
    eventually("held-back metrics above zero", SECS_10, || async {
        (metric(&app, "feed_held_events").await >= 1.0
            && metric(&app, "feed_blocker_transaction_age_seconds").await > 0.0)
            .then_some(())
    })
    .await;
    let page = app.get_json(&format!("/events?after={head}")).await;
    assert_eq!(page, json!([]), "B waits behind A");
    let ready = app.get_json("/readyz").await;
    eventually("/readyz reporting the held feed", SECS_10, || async {
        let r = app.get_json("/readyz").await;
        (r["checks"]["feed"]["status"] == "held" && r["checks"]["feed"]["blocker_pid"].is_i64())
            .then_some(())
    })
    .await;
    assert_eq!(
        ready["status"], "ok",
        "a held feed is reported, not unready"
    );

    // The statement timeout cuts A: a 503 the client may retry, nothing of A
    // committed, and B released to the feed.
    let (status, retry_after) = writer_a.await.unwrap();
    eprintln!(
        "held: feed_held_events {} feed_held_seconds {} blocker age {} at the cut",
        metric(&app, "feed_held_events").await,
        metric(&app, "feed_held_seconds").await,
        metric(&app, "feed_blocker_transaction_age_seconds").await
    );
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    lock.commit().await.unwrap();
    let released = app
        .get_until(&format!("/events?after={head}"), |v| !v.is_empty())
        .await;
    let ids: Vec<&str> = released
        .iter()
        .map(|e| e["aggregate_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b.as_str()], "B is there, A never committed");
    let a_now = app.get(&a).await;
    assert_eq!(a_now["version"], 1);
    assert!(metric(&app, "db_statement_timeouts_total").await >= 1.0);
    eventually("the feed reported moving again", SECS_10, || async {
        (app.get_json("/readyz").await["checks"]["feed"]["status"] == "ok").then_some(())
    })
    .await;
}

/// A store on `url` whose statements run one by one (no batching), each
/// on a connection of its own pool of `connections`.
async fn unbatched_store(url: &str, connections: u32) -> Store {
    Store::connect(&DatabaseOptions {
        url: url.to_owned(),
        max_connections: connections,
        min_connections: 1,
        acquire_timeout: Duration::from_secs(30),
        statement_timeout: Duration::from_secs(30),
        idle_in_transaction_timeout: Duration::from_secs(30),
        batch_executors: 0,
        worker_reads: 0,
    })
    .await
    .unwrap()
}

fn command(n: usize) -> CreateSession {
    let mut context = Map::new();
    context.insert("n".into(), json!(n));
    CreateSession::new(
        Uuid::parse_str(AGENT).unwrap(),
        "task".into(),
        None,
        Some(context),
        None,
        None,
        None,
        None,
    )
    .expect("valid create")
}

/// Writers announce themselves and take their transaction ids while readers
/// compute horizons and read below them, with random stalls on both sides of
/// the id assignment. No reader ever passes an event that commits later.
#[tokio::test]
async fn readers_never_pass_an_announced_writer_over_ten_thousand_writes() {
    const WRITERS: usize = 16;
    const PER_WRITER: usize = 625;
    const READERS: usize = 3;
    let test_db = TestDatabase::migrated().await;
    let db_url = test_db.url.clone();
    let db = test_db.connect().await;
    // Stalls between announcing and taking the id (BEFORE INSERT on
    // sessions, before the row is written) and between taking it and
    // committing (BEFORE INSERT on events).
    db.execute_unprepared(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF random() < 0.2 THEN PERFORM pg_sleep(random() * 0.003); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER stall_before_xid BEFORE INSERT ON sessions FOR EACH ROW EXECUTE FUNCTION stall(); \
         CREATE TRIGGER stall_before_commit BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION stall();",
    )
    .await
    .unwrap();
    let store = unbatched_store(&db_url, (WRITERS + READERS) as u32).await;
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut seen: Vec<(i64, Uuid)> = Vec::new();
                let mut after = 0;
                let mut reads = 0u64;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    let page = store
                        .feed(after, 1000, &FeedFilter::default())
                        .await
                        .unwrap();
                    reads += 1;
                    if let Some(last) = page.last() {
                        after = last.position;
                    }
                    seen.extend(page.iter().map(|e| (e.position, e.event_id)));
                    if finished && page.is_empty() {
                        return (seen, reads);
                    }
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    store
                        .create(
                            &command(w * PER_WRITER + i),
                            &EventMetadata::default(),
                            None,
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let all = store
        .feed(0, 100_000, &FeedFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), WRITERS * PER_WRITER);
    let expected: Vec<(i64, Uuid)> = all.iter().map(|e| (e.position, e.event_id)).collect();
    for r in readers {
        let (seen, reads) = r.await.unwrap();
        assert!(reads > 10, "the reader interleaved with the writers");
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no event read twice");
        assert_eq!(
            seen, expected,
            "every event, in position order, none skipped"
        );
    }
}

/// Found by the fuzzer: a position at the top of the range reads nothing
/// (it used to overflow computing the bound), with or without a long-poll.
#[tokio::test]
async fn the_feed_after_the_largest_position_is_empty() {
    let app = TestApp::spawn_with(|s| s.api.max_wait_secs = 1).await;
    app.create_default().await;
    for path in [
        format!("/events?after={}", i64::MAX),
        format!("/events?after={}&wait=1", i64::MAX),
    ] {
        assert_eq!(
            app.fetch(&path).await.expect(200).json(),
            json!([]),
            "{path}"
        );
    }
    let page = app.fetch("/events?wait=60").await.expect(200).json();
    assert_eq!(page.as_array().map(Vec::len), Some(1), "{page}");
}

/// The relay's lag and the monitor's held count, counted along the log:
/// every committed event after the cursor and below the horizon, the oldest
/// of them first; none held while no writer is open.
#[tokio::test]
async fn the_lag_and_the_held_count_measure_the_log_after_a_position() {
    let test_db = TestDatabase::migrated().await;
    let store = unbatched_store(&test_db.url, 2).await;
    for n in 0..5 {
        store
            .create(&command(n), &EventMetadata::default(), None)
            .await
            .unwrap();
    }
    let log = store.feed(0, 100, &FeedFilter::default()).await.unwrap();
    assert_eq!(log.len(), 5);

    let all = store.relay_lag(0).await.unwrap();
    assert_eq!(all.events, 5);
    assert_eq!(all.oldest_unpublished, Some(log[0].occurred_at));
    let after_two = store.relay_lag(log[1].position).await.unwrap();
    assert_eq!(after_two.events, 3);
    assert_eq!(after_two.oldest_unpublished, Some(log[2].occurred_at));
    let none = store.relay_lag(log[4].position).await.unwrap();
    assert_eq!((none.events, none.oldest_unpublished), (0, None));

    let report = store.horizon_report().await.unwrap();
    assert!(report.horizon > log[4].position, "{report:?}");
    assert_eq!((report.held_events, report.oldest_held), (0, None));
    assert_eq!(report.blocker, None);
}

/// The feed functions run their statements with generic plans: left to
/// choose, PostgreSQL plans the relay's read again at every call (migration
/// 12). A later migration that replaces either function must keep this.
#[tokio::test]
async fn the_feed_functions_keep_generic_plans() {
    let db = TestDatabase::migrated().await;
    let generic = db
        .sql_i64(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('feed_after', 'feed_horizon') \
             AND 'plan_cache_mode=force_generic_plan' = ANY (proconfig)",
        )
        .await;
    assert_eq!(generic, 2);
}
