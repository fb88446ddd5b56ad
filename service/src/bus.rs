//! Redis: the connection the relay publishes on, wake-up hints and
//! readiness pings.
//!
//! Connections are made lazily and re-made after an error, so the service
//! starts and keeps serving writes while Redis is down.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{Mutex, mpsc};

use crate::contract::{WakeHint, hint_channel};
use crate::metrics::names;

/// Hints waiting to be published; beyond this they are dropped (a hint is
/// only a wake-up: the feed carries the event regardless).
const HINT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("an event does not serialise: {0}")]
    Encode(#[from] serde_json::Error),
}

pub struct Bus {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl Bus {
    pub fn new(url: &str) -> Result<Self, BusError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: Mutex::new(None),
            timeout: Duration::from_secs(2),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, BusError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| BusError::Timeout(self.timeout))??;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    /// Run a command; on any failure drop the connection so the next call reconnects.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        let mut c = self.connection().await?;
        self.settle(cmd.query_async::<T>(&mut c)).await
    }

    /// Pipelined commands, all or nothing from the caller's point of view.
    pub(crate) async fn run_pipeline(&self, pipe: &redis::Pipeline) -> Result<(), BusError> {
        let mut c = self.connection().await?;
        self.settle(pipe.query_async::<()>(&mut c)).await
    }

    /// Bound a request by the timeout; after any failure forget the
    /// connection, so the next request makes a new one.
    async fn settle<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget().await;
                Err(e.into())
            }
            Err(_) => {
                self.forget().await;
                Err(BusError::Timeout(self.timeout))
            }
        }
    }

    /// Publish each event on the session channel and its per-session channel,
    /// in order, in one pipeline.
    pub async fn publish_events(
        &self,
        prefix: &str,
        events: &[crate::store::FeedMessage],
    ) -> Result<(), BusError> {
        let all = format!("{prefix}events:session");
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("PUBLISH").arg(&all).arg(&e.json).ignore();
            pipe.cmd("PUBLISH")
                .arg(format!("{all}:{}", e.aggregate_id))
                .arg(&e.json)
                .ignore();
        }
        self.run_pipeline(&pipe).await
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        self.run::<String>(&redis::cmd("PING")).await.map(|_| ())
    }
}

/// The sending side of the hint publisher: never blocks, never fails the
/// write that sends it.
#[derive(Clone)]
pub struct Hints {
    tx: mpsc::Sender<WakeHint>,
}

impl Hints {
    /// Start the publisher task; it ends when every `Hints` is dropped.
    pub fn start(bus: Arc<Bus>, prefix: &str) -> Self {
        let (tx, rx) = mpsc::channel(HINT_QUEUE);
        tokio::spawn(publish_hints(bus, hint_channel(prefix), rx));
        Self { tx }
    }

    pub fn send(&self, hint: WakeHint) {
        if self.tx.try_send(hint).is_err() {
            metrics::counter!(names::HINTS_DROPPED).increment(1);
        }
    }
}

/// Publish whatever queued while the previous pipeline ran, in one pipeline.
async fn publish_hints(bus: Arc<Bus>, channel: String, mut rx: mpsc::Receiver<WakeHint>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut pipe = redis::pipe();
        for hint in &batch {
            if let Ok(body) = serde_json::to_string(hint) {
                pipe.cmd("PUBLISH").arg(&channel).arg(body).ignore();
            }
        }
        match bus.run_pipeline(&pipe).await {
            Ok(()) => metrics::counter!(names::HINTS_PUBLISHED).increment(batch.len() as u64),
            Err(e) => {
                metrics::counter!(names::HINTS_DROPPED).increment(batch.len() as u64);
                tracing::debug!(error = %e, dropped = batch.len(), "wake-up hints not published");
            }
        }
        batch.clear();
    }
}
