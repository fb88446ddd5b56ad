//! Redis for tests: a private server on a free loopback port that a test
//! may stop and start (the machine's own is never touched), a subscriber
//! collecting what is published, and what it got against what committed.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::{eventually, free_port};

pub struct RedisServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("as-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Self {
            port,
            dir,
            child: None,
        };
        s.restart(true).await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)start on the same port; with `publish = false`, PUBLISH is refused
    /// until `allow_publish`, so a test can subscribe before a backlog flows.
    pub async fn restart(&mut self, publish: bool) {
        let conf = self.dir.join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "port {}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {}\nuser default on nopass ~* &* +@all {}\n",
                self.port,
                self.dir.display(),
                if publish { "" } else { "-publish" }
            ),
        )
        .unwrap();
        self.child = Some(
            Command::new("redis-server")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server"),
        );
        let url = self.url();
        eventually("redis to start", Duration::from_secs(10), || {
            let url = url.clone();
            async move { ping(&url).await.then_some(()) }
        })
        .await;
    }

    pub async fn allow_publish(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("+publish")
            .query_async(&mut c)
            .await
            .unwrap();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut c)
        .await
        .is_ok()
}

/// A Redis subscriber collecting every message on some channels.
pub struct Subscriber {
    pub messages: std::sync::Arc<tokio::sync::Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn start(redis_url: &str, channels: &[String]) -> Self {
        let client = redis::Client::open(redis_url).unwrap();
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        for c in channels {
            pubsub.subscribe(c).await.unwrap();
        }
        let messages = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let payload: String = msg.get_payload().unwrap();
                let v: Value = serde_json::from_str(&payload).expect("message is JSON");
                sink.lock()
                    .await
                    .push((msg.get_channel_name().to_owned(), v));
            }
        });
        Self { messages, task }
    }

    pub async fn on(&self, channel: &str) -> Vec<Value> {
        self.messages
            .lock()
            .await
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a subscriber got, against what committed.
#[derive(Debug)]
pub struct Delivery {
    pub committed: usize,
    pub received_unique: usize,
    pub duplicates: usize,
    /// Committed events never received.
    pub lost: usize,
    /// Sessions whose events first arrived out of version order.
    pub out_of_order: Vec<String>,
}

impl Delivery {
    /// Every committed event arrived, each session's in version order.
    pub fn assert_complete(&self) {
        assert_eq!(self.lost, 0, "events never published: {}", self.line());
        assert!(
            self.out_of_order.is_empty(),
            "sessions out of order: {:?}",
            self.out_of_order
        );
    }

    pub fn line(&self) -> String {
        format!(
            "events committed {}, received {} (+{} duplicates), lost {}, sessions out of order {}",
            self.committed,
            self.received_unique,
            self.duplicates,
            self.lost,
            self.out_of_order.len()
        )
    }
}

/// Compare messages (in arrival order, subscribers concatenated) with the
/// committed (event_id, session, version) rows, dropping duplicates by
/// `event_id` as a consumer would.
pub fn delivery(received: &[Value], committed: &[(String, String, i64)]) -> Delivery {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for m in received {
        if seen.insert(m["event_id"].as_str().unwrap().to_owned()) {
            versions
                .entry(m["aggregate_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(m["version"].as_i64().unwrap());
        } else {
            duplicates += 1;
        }
    }
    let out_of_order = versions
        .into_iter()
        .filter(|(_, v)| !v.windows(2).all(|w| w[0] < w[1]))
        .map(|(id, v)| format!("{id}: {v:?}"))
        .collect();
    Delivery {
        committed: committed.len(),
        received_unique: seen.len(),
        duplicates,
        lost: committed
            .iter()
            .filter(|(e, _, _)| !seen.contains(e))
            .count(),
        out_of_order,
    }
}
