//! Redis: the connection the relay publishes on and readiness pings.
//!
//! Connections are made lazily and re-made after an error, so the service
//! starts and keeps serving writes while Redis is down.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
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

    pub fn client(&self) -> &redis::Client {
        &self.client
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
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BusError> {
        let mut c = self.connection().await?;
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut c)).await {
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

    /// Pipelined commands, all or nothing from the caller's point of view.
    pub async fn run_pipeline(&self, pipe: &redis::Pipeline) -> Result<(), BusError> {
        let mut c = self.connection().await?;
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut c)).await {
            Ok(Ok(())) => Ok(()),
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
        events: &[crate::store::StoredEvent],
    ) -> Result<(), BusError> {
        let all = format!("{prefix}events:session");
        let mut pipe = redis::pipe();
        for e in events {
            let body = serde_json::to_string(&e.envelope(false)).expect("envelope serialises");
            pipe.cmd("PUBLISH").arg(&all).arg(&body).ignore();
            pipe.cmd("PUBLISH")
                .arg(format!("{all}:{}", e.aggregate_id))
                .arg(&body)
                .ignore();
        }
        self.run_pipeline(&pipe).await
    }

    pub async fn ping(&self) -> Result<(), BusError> {
        self.run::<String>(&redis::cmd("PING")).await.map(|_| ())
    }
}
