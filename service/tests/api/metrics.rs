//! Session metrics and analytics: `GET /sessions/{id}/metrics` against the
//! times of the session's own events, `GET /analytics` against the
//! `sessions` table over a mixed workload, the projection rebuilt by
//! `replay --analytics`, the `sessions` gauge, and bad parameters.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Days, Utc};
use futures_util::StreamExt;
use futures_util::stream;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};

use crate::support::app::{Api, TestApp, id_of};
use crate::support::serve::replay;
use crate::support::{AGENT, eventually};

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a time"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// Seconds between two instants, as the API computes them (whole
/// microseconds / 10^6).
fn secs(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_microseconds().expect("micros")
}

fn s(us: i64) -> f64 {
    us as f64 / 1e6
}

async fn events_of(app: &Api, id: &str) -> Vec<Value> {
    app.fetch(&format!("/sessions/{id}/events?limit=500"))
        .await
        .expect(200)
        .parse()
}

#[tokio::test]
async fn session_metrics_match_the_times_of_its_events() {
    let app = TestApp::spawn().await;
    let id = app
        .create_id(&json!({"agent_id": AGENT, "session_type": "task"}))
        .await;
    app.patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    app.patch(&id, &json!({"status": "active"}))
        .await
        .expect(200);
    app.merge_patch(
        &id,
        &json!({"runtime_metadata": {"worker": {"generation": 2, "restarts": 1, "turns": 3,
            "input_tokens": 40, "output_tokens": 7, "cost_micro_usd": 1234}}}),
    )
    .await
    .expect(200);
    app.patch(&id, &json!({"status": "completed"}))
        .await
        .expect(200);

    let events = events_of(&app, &id).await;
    let at: Vec<DateTime<Utc>> = events.iter().map(|e| time(&e["occurred_at"])).collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    let (created, paused, resumed, completed) = (at[0], at[1], at[2], at[4]);

    let m = app.get_json(&format!("/sessions/{id}/metrics")).await;
    assert_eq!(m["session_id"], json!(id));
    assert_eq!(m["status"], "completed");
    assert_eq!(m["deleted"], false);
    assert_eq!(time(&m["first_activity_at"]), created);
    assert_eq!(time(&m["last_activity_at"]), completed);
    assert_eq!(time(&m["ended_at"]), completed);
    assert_eq!(m["duration_seconds"], json!(s(secs(created, completed))));
    let active = secs(created, paused) + secs(resumed, completed);
    assert_eq!(m["time_in_status_seconds"]["active"], json!(s(active)));
    assert_eq!(
        m["time_in_status_seconds"]["paused"],
        json!(s(secs(paused, resumed)))
    );
    assert_eq!(m["time_in_status_seconds"]["crashed"], json!(0.0));
    for (field, n) in [
        ("pauses", 1),
        ("resumes", 1),
        ("crashes", 0),
        ("recoveries", 0),
        ("worker_generations", 2),
        ("restarts", 1),
        ("turns", 3),
        ("input_tokens", 40),
        ("output_tokens", 7),
        ("cost_micro_usd", 1234),
    ] {
        assert_eq!(m[field], json!(n), "{field}: {m}");
    }

    // A live session counts its open stretch up to `as_of`; a deleted one
    // ends at its deletion, and its metrics stay readable from its events.
    let live = app
        .create_id(&json!({"agent_id": AGENT, "session_type": "task"}))
        .await;
    let m = app.get_json(&format!("/sessions/{live}/metrics")).await;
    let created = time(&events_of(&app, &live).await[0]["occurred_at"]);
    let open = secs(created, time(&m["as_of"]));
    assert!(m["ended_at"].is_null(), "{m}");
    assert_eq!(m["duration_seconds"], json!(s(open)));
    assert_eq!(m["time_in_status_seconds"]["active"], json!(s(open)));
    app.delete(&live).await.expect(204);
    let deleted_at = time(&events_of(&app, &live).await[1]["occurred_at"]);
    let m = app.get_json(&format!("/sessions/{live}/metrics")).await;
    assert_eq!(m["deleted"], true);
    assert_eq!(time(&m["ended_at"]), deleted_at);
    assert_eq!(m["duration_seconds"], json!(s(secs(created, deleted_at))));

    for path in [
        format!("/sessions/{}/metrics", uuid::Uuid::new_v4()),
        "/sessions/not-a-uuid/metrics".to_owned(),
    ] {
        let r = app.fetch(&path).await.expect(404);
        r.problem();
    }
    app.teardown().await;
}

/// The projection's position, once it has folded everything up to `target`.
async fn projection_reaches(app: &Api, target: i64) -> i64 {
    eventually(
        format!("the analytics projection to reach position {target}"),
        Duration::from_secs(60),
        || async {
            let r = app.fetch("/analytics").await.expect(200);
            let p: i64 = r.header("x-projection-position").parse().expect("position");
            assert_eq!(r.json()["position"], json!(p));
            (p >= target).then_some(p)
        },
    )
    .await
}

async fn rows(app: &TestApp, sql: &str) -> Vec<sea_orm::QueryResult> {
    let db = app.db.connect().await;
    let rows = db
        .query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("query");
    db.close().await.ok();
    rows
}

/// Per group key: (sessions, [active, paused, completed, crashed], cost, turns).
type Expected = BTreeMap<String, (i64, [i64; 4], i64, i64)>;

/// Where a group's figures come from: the `sessions` table, or the
/// projection's own per-session summaries.
#[derive(Clone, Copy)]
enum Truth {
    Sessions,
    Summaries,
}

/// What each group should hold, summed per session from `truth` over the
/// sessions created in `[from, to)` (UTC days).
async fn expected_from(app: &TestApp, truth: Truth, key: &str, from: &str, to: &str) -> Expected {
    let (table, cost, turns) = match truth {
        Truth::Sessions => (
            "sessions",
            "(runtime_metadata #>> '{worker,cost_micro_usd}')::bigint",
            "(runtime_metadata #>> '{worker,turns}')::bigint",
        ),
        Truth::Summaries => ("analytics_sessions", "cost_micro_usd", "turns"),
    };
    let sql = format!(
        "SELECT {key} AS key, count(*) AS n, \
           count(*) FILTER (WHERE status = 'active') AS a, \
           count(*) FILTER (WHERE status = 'paused') AS p, \
           count(*) FILTER (WHERE status = 'completed') AS c, \
           count(*) FILTER (WHERE status = 'crashed') AS x, \
           coalesce(sum({cost}), 0)::bigint AS cost, coalesce(sum({turns}), 0)::bigint AS turns \
         FROM {table} \
         WHERE created_at >= '{from}T00:00:00Z' AND created_at < '{to}T00:00:00Z' GROUP BY 1"
    );
    rows(app, &sql)
        .await
        .iter()
        .map(|r| {
            let g = |c: &str| r.try_get::<i64>("", c).unwrap();
            (
                r.try_get::<String>("", "key").unwrap(),
                (
                    g("n"),
                    [g("a"), g("p"), g("c"), g("x")],
                    g("cost"),
                    g("turns"),
                ),
            )
        })
        .collect()
}

async fn expected(app: &TestApp, key: &str, from: &str, to: &str) -> Expected {
    expected_from(app, Truth::Sessions, key, from, to).await
}

fn answered(body: &Value) -> Expected {
    body["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            let n = |v: &Value| v.as_i64().expect("a count");
            let b = &g["by_status"];
            (
                g["key"].as_str().unwrap().to_owned(),
                (
                    n(&g["sessions"]),
                    [
                        n(&b["active"]),
                        n(&b["paused"]),
                        n(&b["completed"]),
                        n(&b["crashed"]),
                    ],
                    n(&g["cost_micro_usd"]),
                    n(&g["turns"]),
                ),
            )
        })
        .collect()
}

/// Every row of the projection's tables, as text, in a fixed order.
async fn projection(app: &TestApp) -> Vec<String> {
    rows(
        app,
        "SELECT t FROM (SELECT 1 AS k, session_id::text AS o, to_jsonb(s)::text AS t \
                        FROM analytics_sessions s \
                        UNION ALL SELECT 2, concat_ws('/', dimension, value, status, day), to_jsonb(r)::text \
                        FROM analytics_running r \
                        UNION ALL SELECT 3, concat_ws('/', dimension, value, status), to_jsonb(k)::text \
                        FROM analytics_keys k) x ORDER BY k, o",
    )
    .await
    .iter()
    .map(|r| r.try_get::<String>("", "t").unwrap())
    .collect()
}

/// Rebuild the projection from the log (`replay --analytics`) and check it
/// equals, row for row, the one the fold kept; what the replay printed.
async fn rebuild_matches_the_fold(app: &TestApp) -> String {
    let incremental = projection(app).await;
    let (ok, out) = replay(&app.db.url, &["--analytics"]);
    assert!(ok, "replay --analytics: {out}");
    let rebuilt = projection(app).await;
    assert!(
        rebuilt == incremental,
        "{}",
        differences(&incremental, &rebuilt)
    );
    out
}

/// The rows that differ, for a readable failure.
fn differences(a: &[String], b: &[String]) -> String {
    let mut out: Vec<String> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .take(3)
        .map(|(x, y)| format!("kept    {x}\nrebuilt {y}"))
        .collect();
    out.push(format!("{} rows kept, {} rebuilt", a.len(), b.len()));
    out.join("\n")
}

async fn max_position(app: &TestApp) -> i64 {
    app.db
        .sql_i64("SELECT coalesce(max(position), 0) FROM events")
        .await
}

#[tokio::test]
async fn analytics_match_the_sessions_table_and_replay_rebuilds_the_same_projection() {
    let app = TestApp::spawn().await;
    let agents: Vec<String> = (0..7).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let types = ["conversation", "development", "task", "batch"];
    // 1,000 sessions, created 32 at a time, each then moved by its index:
    // paused, completed, crashed, paused and resumed, or left active; a third
    // get a worker record with spend; every eleventh is deleted. Every
    // other one has its context edited before and after its moves: updates
    // a tally ignores, folded in the same pages as the ones it reads.
    let done: Vec<()> = stream::iter(0..1000usize)
        .map(|i| {
            let api = app.api.clone();
            let body = json!({"agent_id": agents[i % agents.len()], "session_type": types[i % types.len()]});
            async move {
                let id = id_of(&api.post("/sessions/", &body).await.expect(201).json());
                let moves: &[&str] = match i % 5 {
                    1 => &["paused"],
                    2 => &["completed"],
                    3 => &["crashed"],
                    4 => &["paused", "active"],
                    _ => &[],
                };
                let edit = |n: usize| json!({"context": {"edit": n}});
                if i % 2 == 0 {
                    api.patch(&id, &edit(1)).await.expect(200);
                }
                for m in moves {
                    api.patch(&id, &json!({"status": m})).await.expect(200);
                }
                if i % 2 == 0 {
                    api.patch(&id, &edit(2)).await.expect(200);
                }
                if i % 3 == 0 {
                    api.merge_patch(
                        &id,
                        &json!({"runtime_metadata": {"worker": {"generation": 1,
                            "turns": i % 13, "cost_micro_usd": i * 10}}}),
                    )
                    .await
                    .expect(200);
                }
                if i % 11 == 0 {
                    api.delete(&id).await.expect(204);
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(done.len(), 1000);
    assert_eq!(
        app.db.sql_i64("SELECT count(*) FROM sessions").await,
        1000 - 91
    );

    let position = projection_reaches(&app, max_position(&app).await).await;
    let today = Utc::now().date_naive();
    // A day either side: the workload may straddle midnight.
    let (from, to) = (
        today.checked_sub_days(Days::new(1)).unwrap().to_string(),
        today.checked_add_days(Days::new(2)).unwrap().to_string(),
    );
    let by = [
        ("status", "status"),
        ("agent_id", "agent_id::text"),
        ("session_type", "session_type"),
        (
            "day",
            "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        ),
    ];
    let mut first_answers = Vec::new();
    for (group_by, key) in by {
        let r = app
            .fetch(&format!(
                "/analytics?from={from}&to={to}&group_by={group_by}"
            ))
            .await
            .expect(200);
        let body = r.json();
        assert_eq!(body["group_by"], group_by);
        assert!(body["position"].as_i64().unwrap() >= position);
        let want = expected(&app, key, &from, &to).await;
        assert_eq!(want.values().map(|v| v.0).sum::<i64>(), 909);
        assert_eq!(answered(&body), want, "group_by={group_by}");
        first_answers.push(answered(&body));
    }

    // Durations: a completed session's runs from creation to the event that
    // completed it (later updates do not extend it); the others run to `as_of`.
    let r = app
        .fetch(&format!("/analytics?from={from}&to={to}&group_by=status"))
        .await
        .expect(200)
        .json();
    let completed = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "completed")
        .expect("completed sessions")
        .clone();
    let want_us = app
        .db
        .sql_i64(
            "SELECT (sum(extract(epoch FROM e.occurred_at) - extract(epoch FROM s.created_at)) * 1000000)::bigint \
             FROM sessions s JOIN events e ON e.aggregate_id = s.id \
               AND e.payload #>> '{changes,status}' = 'completed' \
             WHERE s.status = 'completed'",
        )
        .await;
    let got = completed["duration_seconds"].as_f64().unwrap();
    assert!(
        (got - s(want_us)).abs() < 1e-3,
        "completed durations {got} s, sessions table {} s",
        s(want_us)
    );

    // The gauge, from the projection.
    let text = app.fetch("/metrics").await.expect(200).text();
    for status in ["active", "paused", "completed", "crashed"] {
        let want = app
            .db
            .sql_i64(&format!(
                "SELECT count(*) FROM sessions WHERE status = '{status}'"
            ))
            .await;
        let line = format!("sessions{{status=\"{status}\"}} {want}");
        assert!(text.lines().any(|l| l == line), "no `{line}` in /metrics");
    }

    // The rebuild from the log gives the same rows.
    let out = rebuild_matches_the_fold(&app).await;
    assert!(out.contains("909 sessions"), "{out}");

    // And the consumer carries on from the rebuilt position.
    let extra = app
        .create_id(&json!({"agent_id": agents[0], "session_type": "task"}))
        .await;
    app.patch(&extra, &json!({"status": "crashed"}))
        .await
        .expect(200);
    projection_reaches(&app, max_position(&app).await).await;
    let after = app
        .fetch(&format!("/analytics?from={from}&to={to}&group_by=agent_id"))
        .await
        .expect(200)
        .json();
    assert_eq!(
        answered(&after),
        expected(&app, "agent_id::text", &from, &to).await
    );
    assert_ne!(answered(&after), first_answers[1]);
    app.teardown().await;
}

/// The fold, a session's own metrics (whole payloads, in Rust) and the
/// rebuild (in SQL) each read the worker record: records of every odd shape
/// (none, null, not an object, fields of the wrong type or out of range)
/// count the same all three ways, and figures at the top of their range
/// (2^64 − 1, summed over two sessions) do not stop the fold.
#[tokio::test]
async fn the_fold_reads_odd_worker_records_as_session_metrics_and_the_rebuild_do() {
    let app = TestApp::spawn().await;
    let shapes = [
        json!({}),
        json!({"note": "no worker here"}),
        json!({"worker": null}),
        json!({"worker": [1, 2]}),
        json!({"worker": "busy"}),
        json!({"worker": {"generation": 2, "turns": "many", "cost_micro_usd": 7}}),
        json!({"worker": {"generation": 1, "turns": -3, "input_tokens": 1.5, "output_tokens": 9}}),
        json!({"worker": {"generation": 3, "restarts": 70000, "turns": 4,
            "cost_micro_usd": 18446744073709551615u64}}),
        json!({"worker": {"generation": 5, "restarts": 2, "turns": 11, "input_tokens": 300,
            "output_tokens": 40, "cost_micro_usd": 1234}}),
    ];
    let mut ids = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let id = app
            .create_id(&json!({"agent_id": AGENT, "session_type": "task"}))
            .await;
        app.patch(&id, &json!({"runtime_metadata": shape}))
            .await
            .expect(200);
        if i % 2 == 1 {
            app.patch(&id, &json!({"status": "paused"}))
                .await
                .expect(200);
        }
        ids.push(id);
    }
    projection_reaches(&app, max_position(&app).await).await;

    let figures = [
        "worker_generations",
        "restarts",
        "turns",
        "input_tokens",
        "output_tokens",
        "cost_micro_usd",
    ];
    let mut counted = 0;
    for id in &ids {
        let metrics = app
            .fetch(&format!("/sessions/{id}/metrics"))
            .await
            .expect(200)
            .json();
        let summary = rows(
            &app,
            &format!(
                "SELECT status, {} FROM analytics_sessions WHERE session_id = '{id}'",
                figures.join(", ")
            ),
        )
        .await;
        let summary = summary.first().expect("a summary per session");
        assert_eq!(
            metrics["status"].as_str().unwrap(),
            summary.try_get::<String>("", "status").unwrap(),
            "{id}"
        );
        for f in figures {
            let folded = summary.try_get::<i64>("", f).unwrap();
            assert_eq!(metrics[f].as_i64(), Some(folded), "{f} of {id}: {metrics}");
            counted += usize::from(folded != 0);
        }
    }
    assert!(counted >= 10, "only {counted} worker figures counted");

    rebuild_matches_the_fold(&app).await;
}

/// A session created in the page being folded has no summary yet, so its
/// summary is inserted without an upsert; should one be there all the same
/// (here: the projection's position moved back by hand behind a creation
/// it had folded), the insert fails and the page is folded again with
/// upserts: the projection moves on (a fold that failed on that page would
/// retry it forever), and the summary is written again as it was.
#[tokio::test]
async fn a_summary_already_there_for_a_new_session_does_not_stop_the_fold() {
    let app = TestApp::spawn().await;
    let before = app
        .create_id(&json!({"agent_id": AGENT, "session_type": "task"}))
        .await;
    app.patch(&before, &json!({"status": "paused"}))
        .await
        .expect(200);
    projection_reaches(&app, max_position(&app).await).await;
    let summary_of = |id: String| {
        let app = &app;
        async move {
            rows(
                app,
                &format!(
                    "SELECT to_jsonb(s)::text AS t FROM analytics_sessions s \
                     WHERE session_id = '{id}'"
                ),
            )
            .await
            .iter()
            .map(|r| r.try_get::<String>("", "t").unwrap())
            .collect::<Vec<_>>()
        }
    };
    let kept = summary_of(before.clone()).await;
    assert_eq!(kept.len(), 1, "{kept:?}");

    let created_at: i64 = app
        .db
        .sql_i64(&format!(
            "SELECT position FROM events WHERE aggregate_id = '{before}' \
             AND event_type = 'session.created'"
        ))
        .await;
    let db = app.db.connect().await;
    db.execute_unprepared(&format!(
        "UPDATE relay_cursors SET position = {} WHERE name = 'analytics'",
        created_at - 1
    ))
    .await
    .expect("position moved back");
    db.close().await.ok();
    // A new write wakes the consumer, which finds its position moved and
    // folds from there: the creation of `before` again, then this one.
    let after = app
        .create_id(&json!({"agent_id": AGENT, "session_type": "task"}))
        .await;
    projection_reaches(&app, max_position(&app).await).await;
    assert_eq!(summary_of(before).await, kept);
    assert_eq!(summary_of(after).await.len(), 1);
    app.teardown().await;
}

/// What each group should hold, from the projection's own per-session
/// summaries (checked against the `sessions` table above): the running
/// sums over days must add up to them for any range.
async fn expected_from_summaries(app: &TestApp, key: &str, from: &str, to: &str) -> Expected {
    expected_from(app, Truth::Summaries, key, from, to).await
}

/// Every page of `path`, following `Link: rel="next"`: the groups, in
/// order, after checking each page holds at most `limit` and keys only grow.
async fn all_pages(app: &Api, path: &str, limit: usize) -> Vec<Value> {
    let mut groups: Vec<Value> = Vec::new();
    let mut next = Some(format!("{path}&limit={limit}"));
    let mut pages = 0;
    while let Some(url) = next.take() {
        pages += 1;
        assert!(pages < 1000, "{path}: pages never end");
        let r = app.fetch(&url).await.expect(200);
        let link = r.header("link").to_owned();
        let body = r.json();
        let page = body["groups"].as_array().expect("groups").clone();
        assert!(page.len() <= limit, "{url}: {} groups", page.len());
        for g in page {
            if let Some(last) = groups.last() {
                assert!(
                    last["key"].as_str() < g["key"].as_str(),
                    "{url}: {} after {}",
                    g["key"],
                    last["key"]
                );
            }
            groups.push(g);
        }
        if !link.is_empty() {
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(t, _)| t.to_owned())
                .unwrap_or_else(|| panic!("{url}: Link {link}"));
            next = Some(target);
        }
    }
    groups
}

/// Copy every event of the log, `k` days back for each `k` of `days`,
/// under new session ids (one transaction per copy, positions from its
/// transaction id as the service writes them): sessions created on many
/// past days, with the payloads the service writes.
async fn copy_back_in_time(app: &TestApp, days: &[u32]) {
    let originals = max_position(app).await;
    let db = app.db.connect().await;
    for k in days {
        db.execute_unprepared(&format!(
            "BEGIN; \
             INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
                                 event_type, payload, metadata, occurred_at) \
             SELECT pg_current_xact_id()::text::bigint * 1024 + row_number() OVER (ORDER BY position), \
                    gen_random_uuid(), aggregate_type, md5(aggregate_id::text || '/{k}')::uuid, \
                    version, event_type, payload, metadata, occurred_at - interval '{k} days' \
             FROM events WHERE position <= {originals} \
               AND event_type IN ('session.created', 'session.updated'); \
             COMMIT;"
        ))
        .await
        .expect("copy events");
    }
    db.close().await.ok();
}

#[tokio::test]
async fn analytics_over_many_days_pages_and_matches_the_summaries() {
    let app = TestApp::spawn().await;
    let agents: Vec<String> = (0..5).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let types = ["conversation", "task", "batch"];
    for i in 0..24usize {
        let body =
            json!({"agent_id": agents[i % agents.len()], "session_type": types[i % types.len()]});
        let id = app.create_id(&body).await;
        let moves: &[&str] = match i % 4 {
            1 => &["paused"],
            2 => &["completed"],
            3 => &["crashed", "active"],
            _ => &[],
        };
        for m in moves {
            app.patch(&id, &json!({"status": m})).await.expect(200);
        }
        if i % 3 == 0 {
            app.merge_patch(
                &id,
                &json!({"runtime_metadata": {"worker": {"generation": 1, "turns": i, "cost_micro_usd": i * 7}}}),
            )
            .await
            .expect(200);
        }
    }
    // The same sessions created 1 to 40 days ago (not every day), then
    // every copy 13 days back deleted: its day empties again.
    let days: Vec<u32> = (1..=40).filter(|d| d % 3 != 0).collect();
    copy_back_in_time(&app, &days).await;
    projection_reaches(&app, max_position(&app).await).await;
    let db = app.db.connect().await;
    db.execute_unprepared(
        "BEGIN; \
         INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
                             event_type, payload, metadata, occurred_at) \
         SELECT pg_current_xact_id()::text::bigint * 1024 + row_number() OVER (ORDER BY aggregate_id), \
                gen_random_uuid(), 'session', aggregate_id, max(version) + 1, 'session.deleted', \
                jsonb_build_object('changes', '{}'::jsonb), '{}'::jsonb, now() \
         FROM events GROUP BY aggregate_id \
         HAVING (min(occurred_at) AT TIME ZONE 'UTC')::date \
                = ((now() AT TIME ZONE 'UTC') - interval '13 days')::date; \
         COMMIT;",
    )
    .await
    .expect("delete a day's copies");
    db.close().await.ok();
    projection_reaches(&app, max_position(&app).await).await;
    let summaries = app
        .db
        .sql_i64("SELECT count(*) FROM analytics_sessions")
        .await;
    assert!(summaries > 24 * 20, "{summaries} summaries");

    let today = Utc::now().date_naive();
    let day = |back: u64| today.checked_sub_days(Days::new(back)).unwrap().to_string();
    let tomorrow = today.checked_add_days(Days::new(1)).unwrap().to_string();
    let by = [
        ("status", "status"),
        ("agent_id", "agent_id::text"),
        ("session_type", "session_type"),
        (
            "day",
            "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        ),
    ];
    // A day, a week, a month, a range starting before the first session,
    // one holding only the emptied day, and one ending before today.
    let ranges = [
        (day(5), day(4)),
        (day(9), day(2)),
        (day(30), tomorrow.clone()),
        (day(60), tomorrow.clone()),
        (day(13), day(12)),
        (day(41), day(20)),
    ];
    for (from, to) in &ranges {
        for (group_by, key) in by {
            let path = format!("/analytics?from={from}&to={to}&group_by={group_by}");
            let want = expected_from_summaries(&app, key, from, to).await;
            let whole = app
                .fetch(&format!("{path}&limit=500"))
                .await
                .expect(200)
                .json();
            assert_eq!(answered(&whole), want, "{path}");
            for limit in [1, 2, 3] {
                let paged = json!({"groups": all_pages(&app.api, &path, limit).await});
                assert_eq!(answered(&paged), want, "{path} in pages of {limit}");
            }
        }
    }
    assert!(
        expected_from_summaries(&app, "status", &day(13), &day(12))
            .await
            .is_empty(),
        "the emptied day still has sessions"
    );

    // Kept and rebuilt agree row for row (no row left for the emptied day).
    rebuild_matches_the_fold(&app).await;

    // A cursor from another grouping or made up is refused.
    let r = app
        .fetch("/analytics?group_by=day&cursor=bm90LWEtY3Vyc29y")
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    app.teardown().await;
}

#[tokio::test]
async fn analytics_refuses_bad_parameters_with_a_problem() {
    let app = TestApp::spawn().await;
    for (query, field) in [
        ("group_by=agent", "group_by"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=zz", "cursor"),
        // "g1:a\0b": a key with a NUL, which no stored key holds.
        ("group_by=session_type&cursor=ZzE6YQBi", "cursor"),
        ("group_by=", "group_by"),
        ("from=yesterday", "from"),
        ("from=2026-11-29T10:00:00Z&to=2026-11-30", "from"),
        ("from=2026-11-29&to=2026-13-01", "to"),
        ("from=2026-11-29&to=2026-11-29", "to"),
        ("from=2026-11-30&to=2026-11-29", "to"),
        ("from=2020-01-01&to=2026-01-01", "to"),
    ] {
        let r = app.fetch(&format!("/analytics?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert_eq!(r.problem().field.as_deref(), Some(field), "{query}");
    }
    // Out of what a date column holds: refused, never a 5xx.
    let r = app
        .fetch("/analytics?from=-200000-01-01&to=-200000-06-01")
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.problem().field.as_deref(), Some("from"));
    // Midnight UTC in any offset is a day boundary.
    let r = app
        .fetch("/analytics?from=2026-11-29T01:00:00%2B01:00&to=2026-11-30&group_by=day")
        .await
        .expect(200);
    assert_eq!(r.json()["from"], "2026-11-29");
    assert_eq!(r.json()["groups"], json!([]));
    app.teardown().await;
}
