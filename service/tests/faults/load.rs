//! Load and observation during a fault: writers that keep creating and
//! updating sessions and record every acknowledged write and every answer,
//! and a probe that keeps asking `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::support::{AGENT, Explain, eventually};

/// Updates per session before a writer creates the next one.
const UPDATES_PER_SESSION: u32 = 5;
/// Pause after a failed request, so an outage is not a busy loop.
const AFTER_FAILURE: Duration = Duration::from_millis(50);

/// A write the service acknowledged (201 or 200) with the version it returned.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    pub session: String,
    pub version: i64,
    /// The `context` the write set: its event must carry it.
    pub context: Value,
    pub at: Instant,
}

/// Everything the writers were told.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub acks: Vec<Ack>,
    /// Answers by status code, with the time of each 503.
    pub statuses: BTreeMap<u16, u64>,
    /// The first 503 answers, as they came.
    pub unavailable_bodies: Vec<String>,
    pub unavailable_at: Vec<Instant>,
    /// 503s that did not say when to retry.
    pub unavailable_without_retry_after: u64,
    /// Connection refused or reset, timeouts, bodies cut short.
    pub transport_errors: u64,
    /// Of those, connections refused (nothing listening).
    pub refused: u64,
    /// Status and body of answers other than 200, 201 and 503.
    pub unexpected: Vec<String>,
}

impl Tally {
    pub(crate) fn statuses_line(&self) -> String {
        let by_status: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect();
        format!(
            "{}; transport errors {} ({} refused)",
            by_status.join(" "),
            self.transport_errors,
            self.refused
        )
    }
}

pub(crate) struct Writers {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Writers {
    pub(crate) fn start(base: &str, n: usize) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("client");
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|w| {
                tokio::spawn(write_loop(
                    w,
                    client.clone(),
                    base.to_owned(),
                    tally.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Self { tally, stop, tasks }
    }

    pub(crate) fn acked(&self) -> usize {
        self.tally.lock().unwrap().acks.len()
    }

    /// Acknowledged writes at or after `t`.
    pub(crate) fn acked_since(&self, t: Instant) -> usize {
        self.tally
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|a| a.at >= t)
            .count()
    }

    /// The first acknowledgement at or after `t`.
    pub(crate) fn first_ack_since(&self, t: Instant) -> Option<Instant> {
        self.tally
            .lock()
            .unwrap()
            .acks
            .iter()
            .map(|a| a.at)
            .filter(|at| *at >= t)
            .min()
    }

    pub(crate) fn unavailable_between(&self, from: Instant, to: Instant) -> usize {
        self.tally
            .lock()
            .unwrap()
            .unavailable_at
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .count()
    }

    /// Wait until `n` more writes were acknowledged after `t`.
    pub(crate) async fn wait_for_acks_since(&self, t: Instant, n: usize, secs: u64, what: &str) {
        let explain = Explain(|| {
            format!(
                "{what}: {n} writes acknowledged (got {}; {})",
                self.acked_since(t),
                self.tally.lock().unwrap().statuses_line()
            )
        });
        eventually(explain, Duration::from_secs(secs), || async {
            (self.acked_since(t) >= n).then_some(())
        })
        .await;
    }

    pub(crate) async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task");
        }
        Arc::try_unwrap(self.tally)
            .expect("writers stopped")
            .into_inner()
            .unwrap()
    }
}

/// Create a session, update it a few times, create the next, until stopped.
/// A write that was not acknowledged is not retried as such: the next
/// request carries a new `context`, so every acknowledged write is distinct.
async fn write_loop(
    w: usize,
    client: reqwest::Client,
    base: String,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let mut session: Option<(String, u32)> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let context = json!({"writer": w, "seq": seq});
        let request = match &session {
            Some((id, updates)) if *updates < UPDATES_PER_SESSION => client
                .patch(format!("{base}/sessions/{id}"))
                .json(&json!({ "context": context })),
            _ => client.post(format!("{base}/sessions/")).json(&json!({
                "agent_id": AGENT, "session_type": "fault-load", "context": context
            })),
        };
        let outcome = request.send().await;
        let answered = Instant::now();
        let res = match outcome {
            Ok(res) => res,
            Err(e) => {
                {
                    let mut t = tally.lock().unwrap();
                    t.transport_errors += 1;
                    t.refused += u64::from(e.is_connect());
                }
                tokio::time::sleep(AFTER_FAILURE).await;
                continue;
            }
        };
        let status = res.status().as_u16();
        let retry_after = res.headers().contains_key(RETRY_AFTER);
        let body = res.text().await;
        let acked = record(
            &mut tally.lock().unwrap(),
            status,
            retry_after,
            body,
            context,
            answered,
        );
        match acked {
            Some(id) => {
                session = Some(match session.take() {
                    Some((_, updates)) if status == 200 => (id, updates + 1),
                    _ => (id, 0),
                });
            }
            None => tokio::time::sleep(AFTER_FAILURE).await,
        }
    }
}

/// Count one answer; returns the session id when the write was acknowledged.
fn record(
    t: &mut Tally,
    status: u16,
    retry_after: bool,
    body: reqwest::Result<String>,
    context: Value,
    answered: Instant,
) -> Option<String> {
    *t.statuses.entry(status).or_default() += 1;
    let Ok(body) = body else {
        t.transport_errors += 1;
        return None;
    };
    match status {
        200 | 201 => {
            let v: Value = serde_json::from_str(&body).expect("a session");
            let id = v["id"].as_str().expect("id").to_owned();
            t.acks.push(Ack {
                session: id.clone(),
                version: v["version"].as_i64().expect("version"),
                context,
                at: answered,
            });
            return Some(id);
        }
        503 => {
            t.unavailable_at.push(answered);
            if t.unavailable_bodies.len() < 5 {
                t.unavailable_bodies.push(body);
            }
            if !retry_after {
                t.unavailable_without_retry_after += 1;
            }
        }
        _ => {
            if t.unexpected.len() < 5 {
                t.unexpected.push(format!("{status}: {body}"));
            }
        }
    }
    None
}

/// One `/readyz` answer.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub sent: Instant,
    pub received: Instant,
    /// None when no answer came at all.
    pub status: Option<u16>,
    pub body: Value,
}

/// Asks `/readyz` every 100 ms.
pub(crate) struct ReadyProbe {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl ReadyProbe {
    pub(crate) fn start(base: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let url = format!("{base}/readyz");
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                let (status, body) = match client.get(&url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (Some(status), r.json().await.unwrap_or(Value::Null))
                    }
                    Err(_) => (None, Value::Null),
                };
                sink.lock().unwrap().push(Sample {
                    sent,
                    received: Instant::now(),
                    status,
                    body,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { samples, task }
    }

    /// Answers to requests sent after `from` and answered before `to`.
    pub(crate) fn within(&self, from: Instant, to: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sent >= from && s.received <= to)
            .cloned()
            .collect()
    }

    /// How long after `t` the first request that found it ready was sent.
    pub(crate) fn ready_after(&self, t: Instant) -> Option<Duration> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.sent >= t && s.status == Some(200))
            .map(|s| s.sent - t)
    }

    pub(crate) async fn wait_ready_after(&self, t: Instant, secs: u64) -> Duration {
        eventually(
            "/readyz to answer 200",
            Duration::from_secs(secs),
            || async { self.ready_after(t) },
        )
        .await
    }

    /// Wait for an answer to a request sent after `t` that `unready` accepts.
    pub(crate) async fn wait_unready_after(
        &self,
        t: Instant,
        secs: u64,
        unready: impl Fn(&Sample) -> bool,
    ) {
        eventually(
            "/readyz to report the outage",
            Duration::from_secs(secs),
            || async {
                self.within(t, Instant::now())
                    .iter()
                    .any(&unready)
                    .then_some(())
            },
        )
        .await;
    }
}

impl Drop for ReadyProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
