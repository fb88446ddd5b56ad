//! Natural batching (`docs/design.md`, the store): concurrent writes run as
//! one statement, and a row that fails fails only its own request.
//!
//! The batch is made deterministically: a test transaction holds a lock the
//! lane's first statement needs (a session's row, an idempotency key), so
//! that statement waits; the requests under test queue behind it (the lane's
//! queued-commands gauge shows them all), the lock is released, and they run
//! as one batch. The app runs one drainer per lane, so the held statement
//! holds the whole write lane.

use std::time::Duration;

use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use serde_json::{Value, json};

use agent_sessions::domain::{CreateSession, EventMetadata};
use agent_sessions::store::{DatabaseOptions, IdempotencyRequest, Store};

use crate::support::app::{Reply, TestApp, id_of};
use crate::support::db::TestDatabase;
use crate::support::{AGENT, eventually};

const WAIT: Duration = Duration::from_secs(10);

/// A sample of `/metrics`: the value of `name{kind="…"}`.
async fn lane_metric(app: &TestApp, name: &str, kind: &str) -> f64 {
    let text = app.fetch("/metrics").await.expect(200).text();
    let prefix = format!("{name}{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn wait_queued(app: &TestApp, kind: &str, n: f64) {
    eventually(format!("{n} {kind} commands queued"), WAIT, async || {
        (lane_metric(app, "db_batch_queued_commands", kind).await == n).then_some(())
    })
    .await;
}

/// Wait until some backend of the test database waits for a lock.
async fn wait_lock_waiter(db: &DatabaseConnection) {
    eventually("a statement waiting for the held lock", WAIT, async || {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.datname = current_database()",
            ))
            .await
            .expect("pg_locks")?;
        (row.try_get::<i64>("", "n").expect("n") > 0).then_some(())
    })
    .await;
}

async fn exec(db: &impl ConnectionTrait, sql: &str) {
    db.execute_unprepared(sql).await.expect(sql);
}

/// (batches, commands) run so far by the lane of `kind`.
async fn lane_counts(app: &TestApp, kind: &str) -> (f64, f64) {
    (
        lane_metric(app, "db_batches_total", kind).await,
        lane_metric(app, "db_batch_commands_total", kind).await,
    )
}

/// Each session's event versions, in position order.
async fn versions(app: &TestApp, id: &str) -> Vec<i64> {
    app.db
        .committed_events()
        .await
        .into_iter()
        .filter(|(_, a, _)| a == id)
        .map(|(_, _, v)| v)
        .collect()
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

/// A trigger that refuses any row whose context holds `poison` with a data
/// exception (22023): a row PostgreSQL refuses, which fails its statement.
async fn install_poison(db: &DatabaseConnection) {
    exec(
        db,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.context ? 'poison' THEN RAISE EXCEPTION 'poisoned row' USING ERRCODE = '22023'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON sessions \
           FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
}

/// A store on `db` with `max_connections`, `batch_executors` write drainers
/// and `worker_reads` worker read lanes (the store-level tests of the lanes).
async fn lane_store(
    db: &TestDatabase,
    max_connections: u32,
    batch_executors: usize,
    worker_reads: usize,
) -> Store {
    Store::connect(&DatabaseOptions {
        url: db.url.clone(),
        max_connections,
        min_connections: 1,
        acquire_timeout: WAIT,
        statement_timeout: Duration::from_secs(30),
        idle_in_transaction_timeout: Duration::from_secs(30),
        batch_executors,
        worker_reads,
    })
    .await
    .unwrap()
}

/// A plain create of a session of the test agent.
fn new_session() -> CreateSession {
    CreateSession::new(
        uuid::Uuid::parse_str(AGENT).unwrap(),
        "task".into(),
        None,
        None,
        None,
        None,
        None,
        None,
    )
    .expect("valid create")
}

/// A transaction that holds idempotency key `held`, and a create with that
/// key, on a task of its own, that waits for it (its statement seen waiting
/// for the lock): the lane's place it took stays taken until the lock goes.
async fn create_behind_held_key(
    db: &DatabaseConnection,
    store: &Store,
) -> (
    DatabaseTransaction,
    tokio::task::JoinHandle<
        Result<agent_sessions::store::Created, agent_sessions::store::StoreError>,
    >,
) {
    let lock = db.begin().await.unwrap();
    exec(
        &lock,
        "INSERT INTO idempotency_keys (key, request_hash, session_id) \
         VALUES ('held', 'h', gen_random_uuid())",
    )
    .await;
    let task = tokio::spawn({
        let store = store.clone();
        async move {
            let key = IdempotencyRequest {
                key: "held".into(),
                request_hash: "h".into(),
                ttl: Duration::from_secs(3600),
            };
            store
                .create(&new_session(), &EventMetadata::default(), Some(&key))
                .await
        }
    });
    wait_lock_waiter(db).await;
    (lock, task)
}

#[tokio::test]
async fn one_failing_update_in_a_batch_fails_only_its_own_request() {
    let app = TestApp::spawn_with(|s| s.database.batch_executors = 1).await;
    let db = app.db.connect().await;
    install_poison(&db).await;
    let body = json!({"agent_id": AGENT, "session_type": "task", "context": {"n": 0}});
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(app.create_id(&body).await);
    }
    let [held, ok, raced, gone, poisoned, done] = <[String; 6]>::try_from(ids).unwrap();
    app.patch(&done, &json!({"status": "completed"}))
        .await
        .expect(200);

    // The drainer's batch of one waits for a row lock held here.
    let lock: DatabaseTransaction = db.begin().await.unwrap();
    exec(
        &lock,
        &format!("SELECT 1 FROM sessions WHERE id = '{held}' FOR UPDATE"),
    )
    .await;
    let first = tokio::spawn({
        let api = app.api.clone();
        let held = held.clone();
        async move { api.patch(&held, &json!({"context": {"n": 1}})).await }
    });
    wait_lock_waiter(&db).await;
    let (batches, commands) = lane_counts(&app, "update").await;

    // Queued behind it: a good row, two writers planned on the same version
    // with If-Match, a row deleted before its batch runs, a row PostgreSQL
    // refuses; and an illegal move, refused before it is queued.
    let if_match = |id: &str, n: i64| {
        app.http
            .patch(app.at(&format!("/sessions/{id}")))
            .header("If-Match", "\"1\"")
            .json(&json!({"context": {"n": n}}))
    };
    let queued = tokio::spawn({
        let api = app.api.clone();
        let (ok, gone, poisoned) = (ok.clone(), gone.clone(), poisoned.clone());
        let racers = [if_match(&raced, 1), if_match(&raced, 2)];
        async move {
            let [a, b] = racers;
            let (one, poison) = (
                json!({"context": {"n": 1}}),
                json!({"context": {"poison": true}}),
            );
            let (ok, racers, gone, poisoned) = tokio::join!(
                api.patch(&ok, &one),
                join_all([api.send(a), api.send(b)]),
                api.patch(&gone, &one),
                api.patch(&poisoned, &poison),
            );
            (ok, racers, gone, poisoned)
        }
    });
    wait_queued(&app, "update", 5.0).await;
    app.patch(&done, &json!({"status": "active"}))
        .await
        .expect(409);
    app.delete(&gone).await.expect(204);
    lock.rollback().await.unwrap();

    first.await.unwrap().expect(200);
    let (ok_reply, racers, gone_reply, poisoned_reply) = queued.await.unwrap();
    ok_reply.expect(200);
    let mut raced_statuses = statuses(&racers);
    raced_statuses.sort_unstable();
    assert_eq!(raced_statuses, [200, 412], "one If-Match writer wins");
    let loser = racers.iter().find(|r| r.status == 412).unwrap();
    assert_eq!(
        loser.problem().kind,
        "urn:agent-sessions:problem:version-mismatch"
    );
    gone_reply.expect(404);
    let refused = poisoned_reply.expect(422);
    assert_eq!(
        refused.problem().kind,
        "urn:agent-sessions:problem:validation"
    );

    // The five ran as one batch (the retries of the lost rows ran alone or
    // not at all), and exactly the winners' events are in the log.
    let (b, c) = lane_counts(&app, "update").await;
    assert_eq!((b - batches, c - commands), (1.0, 5.0));
    for id in [&held, &ok, &raced] {
        assert_eq!(versions(&app, id).await, [1, 2], "session {id}");
    }
    assert_eq!(versions(&app, &gone).await, [1, 2], "created, deleted");
    assert_eq!(versions(&app, &poisoned).await, [1]);
    assert_eq!(versions(&app, &done).await, [1, 2]);
    assert_eq!(app.get(&poisoned).await["version"], 1);
    assert_eq!(app.get(&ok).await["context"], json!({"n": 1}));
    db.close().await.ok();
    app.teardown().await;
}

#[tokio::test]
async fn one_failing_create_in_a_batch_fails_only_its_own_request() {
    let app = TestApp::spawn_with(|s| s.database.batch_executors = 1).await;
    let db = app.db.connect().await;
    install_poison(&db).await;
    let body = |n: i64| json!({"agent_id": AGENT, "session_type": "task", "context": {"n": n}});
    let create = |key: Option<&str>, body: Value| {
        let mut req = app.http.post(app.at("/sessions/")).json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        app.send(req)
    };
    let earlier = create(Some("earlier"), body(3)).await.expect(201).json();

    // The drainer's batch of one waits for an idempotency key inserted, not
    // yet committed, here (keys are scoped to the actor: "anonymous").
    let lock: DatabaseTransaction = db.begin().await.unwrap();
    exec(
        &lock,
        "INSERT INTO idempotency_keys (key, request_hash, session_id) \
         VALUES ('anonymous held', 'x', gen_random_uuid())",
    )
    .await;
    let api = app.api.clone();
    let first = tokio::spawn(async move {
        let req = api
            .http
            .post(api.at("/sessions/"))
            .header("Idempotency-Key", "held")
            .json(&json!({"agent_id": AGENT, "session_type": "task"}));
        api.send(req).await
    });
    wait_lock_waiter(&db).await;
    let (batches, commands) = lane_counts(&app, "create").await;

    // Queued behind it: a plain create, one key twice with the same body (in
    // one statement: one inserts the key, the other finds it), an earlier
    // key with its body and with another. (A row PostgreSQL refuses is the
    // update test's: a failed statement is retried row by row, whatever its
    // kind.)
    let (replies, _) = tokio::join!(
        join_all([
            create(None, body(1)),
            create(Some("twice"), body(2)),
            create(Some("twice"), body(2)),
            create(Some("earlier"), body(3)),
            create(Some("earlier"), body(4)),
        ]),
        async {
            wait_queued(&app, "create", 5.0).await;
            lock.rollback().await.unwrap();
        }
    );
    first.await.unwrap().expect(201);
    let [plain, twice_a, twice_b, earlier_same, earlier_other] =
        <[Reply; 5]>::try_from(replies).unwrap();
    plain.expect(201);
    let (twice_a, twice_b) = (twice_a.expect(201), twice_b.expect(201));
    assert_eq!(id_of(&twice_a.json()), id_of(&twice_b.json()));
    let replayed = [&twice_a, &twice_b]
        .iter()
        .filter(|r| r.header("Idempotent-Replayed") == "true")
        .count();
    assert_eq!(replayed, 1, "one of the two created, the other replayed");
    let same = earlier_same.expect(201);
    assert_eq!(same.header("Idempotent-Replayed"), "true");
    assert_eq!(id_of(&same.json()), id_of(&earlier));
    assert_eq!(
        earlier_other.expect(422).problem().kind,
        "urn:agent-sessions:problem:idempotency-key-reused"
    );

    let (b, c) = lane_counts(&app, "create").await;
    assert_eq!(
        (b - batches, c - commands),
        (1.0, 5.0),
        "the five ran as one batch"
    );
    // One session and one `session.created` per create that wrote: the
    // earlier one, the held one, the plain one and the key used twice.
    assert_eq!(app.counts().await, (4, 4));
    db.close().await.ok();
    app.teardown().await;
}

/// A plain patch of fields whose outcome does not depend on the stored
/// state (`checkpoint`, `context`, `runtime_backend`, `runtime_metadata`) is
/// written in one statement, without reading the session first; its answer
/// and its event are those of the same change planned against the state (a
/// merge patch), naming only the fields whose value changed. A patch that
/// changes nothing, a stale `If-Match` and an unknown session are answered
/// as before.
#[tokio::test]
async fn a_plain_patch_is_one_statement_with_the_planned_answer_and_event() {
    let app = TestApp::spawn().await;
    let body = json!({"agent_id": AGENT, "session_type": "task", "context": {"n": 0},
                      "checkpoint": {"step": 1}, "runtime_metadata": {"m": 1}});
    let (plain, merged) = (app.create_id(&body).await, app.create_id(&body).await);
    let change = json!({"context": {"n": 1}, "runtime_metadata": {"m": 1}, "checkpoint": null,
                        "runtime_backend": "local"});

    let reads = lane_counts(&app, "read").await.1;
    let one = app.patch(&plain, &change).await.expect(200).json();
    assert_eq!(
        lane_counts(&app, "read").await.1,
        reads,
        "no read before the write"
    );
    let planned = app.merge_patch(&merged, &change).await.expect(200).json();
    assert_eq!(lane_counts(&app, "read").await.1, reads + 1.0);

    let without = |mut v: Value, keys: &[&str]| {
        for k in keys {
            v.as_object_mut().unwrap().remove(*k);
        }
        v
    };
    let volatile = ["id", "created_at", "updated_at"];
    assert_eq!(without(one.clone(), &volatile), without(planned, &volatile));
    assert_eq!(one["version"], 2);
    assert_eq!(one["checkpoint"], Value::Null);
    let event = |id: String| {
        let app = &app;
        async move {
            let events = app.get_json(&format!("/sessions/{id}/events")).await;
            events.as_array().unwrap().last().unwrap().clone()
        }
    };
    let (a, b) = (event(plain.clone()).await, event(merged).await);
    assert_eq!(a["payload"], b["payload"]);
    assert_eq!(
        a["payload"],
        json!({"agent_id": AGENT, "status": "active",
               "updates": ["checkpoint", "context", "runtime_backend"],
               "changes": {"checkpoint": null, "context": {"n": 1}, "runtime_backend": "local"}})
    );
    assert_eq!(a["version"], 2);
    assert_eq!(a["event_type"], "session.updated");
    assert_eq!(a["metadata"]["actor"], b["metadata"]["actor"]);

    // Nothing to change: no event, the version stays.
    let same = app.patch(&plain, &change).await.expect(200).json();
    assert_eq!(same["version"], 2);
    assert_eq!(versions(&app, &plain).await, [1, 2]);
    // A stale If-Match, and an unknown session.
    let stale = app
        .send(
            app.http
                .patch(app.at(&format!("/sessions/{plain}")))
                .header("If-Match", "\"1\"")
                .json(&json!({"context": {"n": 2}})),
        )
        .await
        .expect(412);
    assert_eq!(
        stale.problem().kind,
        "urn:agent-sessions:problem:version-mismatch"
    );
    let fresh = app
        .send(
            app.http
                .patch(app.at(&format!("/sessions/{plain}")))
                .header("If-Match", "\"2\"")
                .json(&json!({"context": {"n": 2}})),
        )
        .await
        .expect(200);
    assert_eq!(fresh.json()["version"], 3);
    app.patch(&uuid::Uuid::now_v7().to_string(), &json!({"context": {}}))
        .await
        .expect(404);
    assert_eq!(versions(&app, &plain).await, [1, 2, 3]);
    app.teardown().await;
}

/// A write that finds its lane idle runs on its caller's task. When that
/// caller goes away mid-statement (here: its task is aborted while the
/// statement waits for an idempotency key another transaction holds), its
/// place passes to a drainer for the command that queued meanwhile, on a
/// new connection: that command is answered while the key is still held.
#[tokio::test]
async fn a_write_whose_caller_goes_away_hands_its_lane_on() {
    let test_db = TestDatabase::migrated().await;
    let db = test_db.connect().await;
    let store = lane_store(&test_db, 4, 1, 0).await;
    let meta = EventMetadata::default();
    // A first write runs through a drainer, which leaves its connection
    // with the lane: the next write on an idle lane runs on its caller.
    store
        .create(&new_session(), &meta, None)
        .await
        .expect("created");

    let (lock, abandoned) = create_behind_held_key(&db, &store).await;
    // The lane's one place is taken: one poll queues this command.
    let cmd = new_session();
    let mut queued = Box::pin(store.create(&cmd, &meta, None));
    assert!(futures_util::poll!(&mut queued).is_pending());
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());

    let created = tokio::time::timeout(WAIT, queued)
        .await
        .expect("the queued create is answered while the key is still held")
        .expect("created");
    assert!(store.get(created.session.id).await.unwrap().is_some());
    lock.rollback().await.unwrap();
    // The lane goes on: idle again, a write runs at once.
    store
        .create(&new_session(), &meta, None)
        .await
        .expect("created");
    store.close().await;
    db.close().await.ok();
}

/// The lanes keep a connection per drainer out of `max_connections` (the
/// total allowed stays what was configured) and open them as the store
/// starts, before any command, so the first requests find them.
#[tokio::test]
async fn the_lanes_open_their_connections_at_start_within_max_connections() {
    let test_db = TestDatabase::migrated().await;
    let store = lane_store(&test_db, 6, 2, 0).await;

    assert_eq!(store.pool_stats().max, 6);
    // Two write drainers and one read drainer: three connections, with no
    // command sent yet (the shared pool opens its own lazily).
    let opened = eventually("the lanes' connections", WAIT, || async {
        let s = store.pool_stats();
        (s.size >= 3).then_some(s)
    })
    .await;
    assert_eq!(opened.size, 3, "{opened:?}");
    assert!(opened.size <= opened.max);
    store.close().await;
}

/// With more than one write drainer, a batch held up by another
/// transaction's lock holds up only the commands it took: once it has run
/// past the lane's stuck mark, what queues behind it goes to another
/// drainer and is answered while the lock is still held.
#[tokio::test]
async fn a_write_held_by_a_lock_holds_up_only_its_own_batch() {
    let test_db = TestDatabase::migrated().await;
    let db = test_db.connect().await;
    let store = lane_store(&test_db, 6, 2, 0).await;
    let meta = EventMetadata::default();
    store
        .create(&new_session(), &meta, None)
        .await
        .expect("created");

    let (lock, held) = create_behind_held_key(&db, &store).await;

    // Several writes queue behind the held one; each is answered while the
    // key's lock is still held.
    let writes = join_all((0..4).map(|_| {
        let (store, cmd, meta) = (store.clone(), new_session(), meta.clone());
        async move { store.create(&cmd, &meta, None).await }
    }));
    let created = tokio::time::timeout(WAIT, writes)
        .await
        .expect("the writes behind the held one are answered while the key is held");
    for c in created {
        let c = c.expect("created");
        assert!(store.get(c.session.id).await.unwrap().is_some());
    }
    assert!(
        !held.is_finished(),
        "the held write waits for the key's lock"
    );
    lock.rollback().await.unwrap();
    tokio::time::timeout(WAIT, held)
        .await
        .expect("the held write is answered once the lock is gone")
        .unwrap()
        .expect("created with the key");
    store.close().await;
    db.close().await.ok();
}

/// An HTTP worker's read lane (`Store::open_worker_reads`): one connection,
/// opened as the worker starts and counted in `max_connections`; a second
/// call on the same thread opens nothing more. Four workers asked for, but
/// six connections less three for the shared lanes leave room for one (half
/// of what is left): a second thread reads through the shared read lane.
#[tokio::test]
async fn a_worker_read_lane_is_one_connection_within_max_connections() {
    let test_db = TestDatabase::migrated().await;
    let store = lane_store(&test_db, 6, 2, 4).await;
    assert_eq!(store.pool_stats().max, 6);
    let created = store
        .create(&new_session(), &EventMetadata::default(), None)
        .await
        .expect("created");
    let id = created.session.id;

    // The shared lanes' three connections (two write drainers, one read).
    let before = eventually("the shared lanes' connections", WAIT, || async {
        let s = store.pool_stats();
        (s.size >= 3).then_some(s.size)
    })
    .await;
    store.open_worker_reads();
    store.open_worker_reads();
    let opened = eventually("the worker lane's connection", WAIT, || async {
        let s = store.pool_stats();
        (s.size > before).then_some(s)
    })
    .await;
    assert_eq!(
        opened.size,
        before + 1,
        "one connection for the worker: {opened:?}"
    );
    assert!(opened.size <= opened.max, "{opened:?}");
    let lanes_only = opened.size;
    assert!(store.get(id).await.unwrap().is_some());

    // Another thread, its own runtime: no slot left, so no lane of its own;
    // its reads go through the shared lane.
    let other = store.clone();
    let found = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                other.open_worker_reads();
                other.get(id).await.unwrap().is_some()
            })
    })
    .join()
    .unwrap();
    assert!(found);
    assert_eq!(store.pool_stats().size, lanes_only, "no connection more");
    assert!(store.get(id).await.unwrap().is_some());
    store.close().await;
}

/// Reads by id that queue together run as one statement, the same session
/// asked for several times in it among them: each caller gets its own
/// answer, the parsed state (`get`, what a write plans against) and the
/// representation passed through (`get_listed`, what `GET` answers) agree
/// on every document, and an unknown id is answered as absent.
#[tokio::test]
async fn reads_of_one_session_in_one_batch_each_get_the_session() {
    let test_db = TestDatabase::migrated().await;
    let store = lane_store(&test_db, 4, 1, 0).await;
    let meta = EventMetadata::default();
    let doc = |v: &Value| v.as_object().cloned();
    let context = json!({"plan": ["a", "b"], "deep": {"n": 1.5, "ok": true, "s": "é\"\\"}});
    let with_docs = CreateSession::new(
        uuid::Uuid::parse_str(AGENT).unwrap(),
        "task".into(),
        None,
        doc(&context),
        doc(&json!({"step": 3})),
        None,
        doc(&json!({"host": "h1", "empty": {}})),
        None,
    )
    .expect("valid create");
    let a = store
        .create(&with_docs, &meta, None)
        .await
        .expect("created");
    let b = store
        .create(&new_session(), &meta, None)
        .await
        .expect("created");
    let (a, b) = (a.session.id, b.session.id);
    let missing = uuid::Uuid::new_v4();

    // On this one thread the first read runs alone and the others queue
    // behind it: they are the next batch, with `a` in it four times.
    let ids = [a, a, b, a, missing, a];
    let (states, listed) = futures_util::join!(
        join_all(ids.iter().step_by(2).map(|id| store.get(*id))),
        join_all(
            ids.iter()
                .skip(1)
                .step_by(2)
                .map(|id| store.get_listed(*id))
        ),
    );
    let states: Vec<_> = states.into_iter().map(|r| r.expect("read")).collect();
    let listed: Vec<_> = listed.into_iter().map(|r| r.expect("read")).collect();
    assert_eq!(
        states
            .iter()
            .map(|s| s.as_ref().map(|s| s.id))
            .collect::<Vec<_>>(),
        [Some(a), Some(b), None],
        "get: {ids:?} at 0, 2, 4"
    );
    assert_eq!(
        listed
            .iter()
            .map(|s| s.as_ref().map(|s| s.id))
            .collect::<Vec<_>>(),
        [Some(a), Some(a), Some(a)],
        "get_listed: {ids:?} at 1, 3, 5"
    );
    let state = states[0].as_ref().unwrap();
    assert_eq!(Value::Object(state.context.clone()), context);
    for l in listed.iter().flatten() {
        let parsed = |raw: &serde_json::value::RawValue| -> Value {
            serde_json::from_str(raw.get()).unwrap()
        };
        assert_eq!(parsed(&l.context), Value::Object(state.context.clone()));
        assert_eq!(
            l.checkpoint.as_deref().map(parsed),
            state.checkpoint.clone().map(Value::Object)
        );
        assert_eq!(
            parsed(&l.runtime_metadata),
            Value::Object(state.runtime_metadata.clone())
        );
        assert_eq!(l.version, state.version);
    }
    store.close().await;
}
