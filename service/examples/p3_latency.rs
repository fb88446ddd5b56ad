//! P3 (docs/design.md, performance targets): commit-to-subscriber latency at a fixed write rate.
//!
//! Writes PATCHes at `RATE` per second for `WARMUP` + `SECONDS` against a running
//! service, subscribes to its Redis channel, and for each received event
//! measures receive time minus the event's `occurred_at` (taken inside the
//! writing statement, so just before commit: a conservative start). Same
//! machine, same clock. Prints p50/p90/p99/max and how many arrived.
//!
//!   cargo run --release --example p3_latency -- http://127.0.0.1:18012 redis://127.0.0.1:6379 bench:p3:

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark tool: failing loudly is right

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{Value, json};

use common::Latencies;

const RATE: u64 = 1000;
const SECONDS: u64 = 10;
/// Seconds written first and not measured (`P3_WARMUP` overrides): a
/// freshly started service opens its pool's connections and prepares its
/// statements on the first writes (one stall of about 150 ms at the start
/// of a run, seen with P3_SLOW).
const WARMUP: u64 = 2;
const SESSIONS: usize = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let (api, redis_url, prefix) = (
        args.get(1)
            .cloned()
            .unwrap_or("http://127.0.0.1:8011".into()),
        args.get(2)
            .cloned()
            .unwrap_or("redis://127.0.0.1:6379".into()),
        args.get(3).cloned().unwrap_or_default(),
    );
    let client = reqwest::Client::new();
    let ids = common::create_sessions(&client, &api, SESSIONS).await?;

    // The subscriber gets an OS thread and runtime of its own, so the
    // writer's tasks cannot delay when a message is seen.
    let channel = format!("{prefix}events:session");
    let warmup_secs: u64 = std::env::var("P3_WARMUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WARMUP);
    let measured_from = Utc::now() + chrono::Duration::seconds(warmup_secs as i64);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut pubsub = redis::Client::open(redis_url)
                .expect("redis url")
                .get_async_pubsub()
                .await
                .expect("pubsub");
            pubsub.subscribe(channel).await.expect("subscribe");
            ready_tx.send(()).expect("ready");
            let mut latencies = Vec::new();
            let mut received = 0_u64;
            // P3_SLOW=<file>: each event slower than 10 ms, as
            // `<received at> <ms> <position>`, to see when the tail happens.
            let mut slow = std::env::var_os("P3_SLOW")
                .map(|p| std::fs::File::create(p).expect("P3_SLOW file"));
            let mut stream = pubsub.into_on_message();
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs(warmup_secs + SECONDS + 5);
            while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, stream.next()).await {
                let now = Utc::now();
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&payload) else {
                    continue;
                };
                if v["event_type"] != "session.updated" {
                    continue;
                }
                received += 1;
                if let Some(t) = v["occurred_at"]
                    .as_str()
                    .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                    .filter(|t| *t >= measured_from)
                {
                    let ms = (now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                    if let Some(out) = &mut slow
                        && ms > 10.0
                    {
                        use std::io::Write as _;
                        let _ = writeln!(out, "{} {ms:.2} {}", now.to_rfc3339(), v["position"]);
                    }
                    latencies.push(ms);
                }
            }
            (received, latencies)
        })
    });
    ready_rx.recv()?;

    // Open-loop writer: one request every 1/RATE s, each on its own task.
    let start = Instant::now();
    let total = RATE * (warmup_secs + SECONDS);
    let warmup = RATE * warmup_secs;
    let inflight = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(total as usize);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        ticker.tick().await;
        let (client, url) = (
            client.clone(),
            format!("{api}/sessions/{}", ids[i as usize % SESSIONS]),
        );
        let permit = inflight.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = client
                .patch(url)
                .json(&json!({"context": {"i": i}}))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            drop(permit);
            (ok, sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut ok = 0;
    let mut lat_w = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (good, ms) = t.await.unwrap_or((false, 0.0));
        ok += good as u64;
        if i as u64 >= warmup {
            lat_w.push(ms);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (received, lat) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("subscriber thread panicked"))?;
    lat_w.sort_by(|a, b| a.total_cmp(b));
    println!(
        "PATCH round trip ms: p50 {:.2}  p99 {:.2}",
        lat_w[lat_w.len() / 2],
        lat_w[(lat_w.len() * 99 / 100).min(lat_w.len() - 1)]
    );
    let lat = Latencies::new(lat);
    let pct = |p: f64| lat.pct(p);
    println!(
        "writes: {ok} acknowledged of {total} in {elapsed:.1} s ({:.0}/s)",
        ok as f64 / elapsed
    );
    println!(
        "received: {received} events ({} measured, after {warmup_secs} s of warm-up)",
        lat.len()
    );
    println!(
        "commit→subscriber ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat.max()
    );
    Ok(())
}
