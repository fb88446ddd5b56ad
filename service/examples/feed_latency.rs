//! Delivery latency on the three paths (Redis, SSE `/events/stream`, a
//! long-polling `/events` reader), before and while strangers hold
//! transaction ids: one transaction in another database of the same
//! PostgreSQL cluster and one on an unrelated table of the service's own
//! database. Each received event's latency is its receive time minus its
//! `occurred_at` (taken inside the writing statement).
//!
//!   feed_latency API_URL REDIS_URL PREFIX SERVICE_DB_URL [RATE] [BEFORE_S] [DURING_S]

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark tool: failing loudly is right

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use serde_json::{Value, json};

use common::Latencies;

type Samples = Arc<Mutex<Vec<(DateTime<Utc>, f64)>>>;

fn record(samples: &Samples, v: &Value) {
    if v["event_type"] != "session.updated" {
        return;
    }
    if let Some(t) = v["occurred_at"]
        .as_str()
        .and_then(|t| t.parse::<DateTime<Utc>>().ok())
    {
        let now = Utc::now();
        let ms = (now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        if let Ok(mut s) = samples.lock() {
            s.push((t, ms));
        }
    }
}

fn summary(name: &str, samples: &Samples, from: DateTime<Utc>, to: DateTime<Utc>) {
    let v: Vec<f64> = samples
        .lock()
        .map(|s| {
            s.iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, ms)| *ms)
                .collect()
        })
        .unwrap_or_default();
    let v = Latencies::new(v);
    println!(
        "  {name:<8} n {:>6}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        v.len(),
        v.pct(0.5),
        v.pct(0.99),
        v.max()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a: Vec<String> = std::env::args().collect();
    let api = a.get(1).cloned().unwrap_or("http://127.0.0.1:8011".into());
    let redis_url = a.get(2).cloned().unwrap_or("redis://127.0.0.1:6379".into());
    let prefix = a.get(3).cloned().unwrap_or_default();
    let db_url = a.get(4).cloned().unwrap_or_default();
    let rate: u64 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(200);
    let before: u64 = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(20);
    let during: u64 = a.get(7).and_then(|s| s.parse().ok()).unwrap_or(60);
    let client = reqwest::Client::new();
    let ids = common::create_sessions(&client, &api, 32).await?;
    let head: i64 = client
        .get(format!("{api}/events?after=0&limit=500"))
        .send()
        .await?
        .json::<Vec<Value>>()
        .await?
        .last()
        .and_then(|e| e["position"].as_i64())
        .unwrap_or(0);

    let (redis_s, sse_s, poll_s): (Samples, Samples, Samples) = Default::default();
    {
        let samples = redis_s.clone();
        let mut pubsub = redis::Client::open(redis_url)?.get_async_pubsub().await?;
        pubsub.subscribe(format!("{prefix}events:session")).await?;
        tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                if let Ok(v) =
                    serde_json::from_str::<Value>(&msg.get_payload::<String>().unwrap_or_default())
                {
                    record(&samples, &v);
                }
            }
        });
    }
    {
        let samples = sse_s.clone();
        let res = client
            .get(format!("{api}/events/stream?after={head}"))
            .send()
            .await?;
        tokio::spawn(async move {
            let mut body = res.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: "))
                        && let Ok(v) = serde_json::from_str::<Value>(data)
                    {
                        record(&samples, &v);
                    }
                }
            }
        });
    }
    {
        let (samples, client, api) = (poll_s.clone(), client.clone(), api.clone());
        tokio::spawn(async move {
            let mut after = head;
            loop {
                let Ok(res) = client
                    .get(format!("{api}/events?after={after}&limit=500&wait=25"))
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(page) = res.json::<Vec<Value>>().await else {
                    continue;
                };
                for e in &page {
                    record(&samples, e);
                }
                if let Some(p) = page.last().and_then(|e| e["position"].as_i64()) {
                    after = p;
                }
            }
        });
    }

    let write = |secs: u64| {
        let (client, api, ids) = (client.clone(), api.clone(), ids.clone());
        async move {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut n = 0u64;
            let mut tasks = Vec::new();
            while Instant::now() < end {
                ticker.tick().await;
                let (client, url) = (
                    client.clone(),
                    format!("{api}/sessions/{}", ids[n as usize % ids.len()]),
                );
                tasks.push(tokio::spawn(async move {
                    client
                        .patch(url)
                        .json(&json!({"context": {"n": n}}))
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false)
                }));
                n += 1;
            }
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap_or(false) as u64;
            }
            (n, ok)
        }
    };

    let t0 = Utc::now();
    let (n1, ok1) = write(before).await;
    let t1 = Utc::now();
    // The strangers: each holds a transaction id for the whole second phase.
    let admin_url = format!(
        "{}/postgres",
        db_url.rsplit_once('/').map(|(b, _)| b).unwrap_or("")
    );
    let admin = Database::connect(&admin_url).await?;
    admin
        .execute_unprepared("DROP DATABASE IF EXISTS feed_latency_stranger WITH (FORCE)")
        .await?;
    admin
        .execute_unprepared("CREATE DATABASE feed_latency_stranger")
        .await?;
    let elsewhere = Database::connect(format!(
        "{}/feed_latency_stranger",
        db_url.rsplit_once('/').map(|(b, _)| b).unwrap_or("")
    ))
    .await?;
    elsewhere
        .execute_unprepared("CREATE TABLE batch (n int)")
        .await?;
    let tx1 = elsewhere.begin().await?;
    tx1.execute_unprepared("INSERT INTO batch VALUES (1)")
        .await?;
    let own = Database::connect(&db_url).await?;
    own.execute_unprepared("CREATE TABLE IF NOT EXISTS unrelated (n int)")
        .await?;
    let tx2 = own.begin().await?;
    tx2.execute_unprepared("INSERT INTO unrelated VALUES (1)")
        .await?;
    let (n2, ok2) = write(during).await;
    let t2 = Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tx1.rollback().await?;
    tx2.rollback().await?;
    drop(elsewhere);
    admin
        .execute_unprepared("DROP DATABASE IF EXISTS feed_latency_stranger WITH (FORCE)")
        .await?;

    println!("before: {ok1} of {n1} writes acknowledged at {rate}/s");
    for (name, s) in [("redis", &redis_s), ("sse", &sse_s), ("events", &poll_s)] {
        summary(name, s, t0, t1);
    }
    println!(
        "during (a transaction id held in another database and on an unrelated table): {ok2} of {n2} writes acknowledged"
    );
    for (name, s) in [("redis", &redis_s), ("sse", &sse_s), ("events", &poll_s)] {
        summary(name, s, t1, t2);
    }
    Ok(())
}
