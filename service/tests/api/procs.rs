//! Real processes for fault tests: a private Redis server and `agent-sessions
//! serve` binaries, each on a free loopback port, killed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `check` every 20 ms until it holds or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
        eventually(10, "redis to start", || {
            let url = url.clone();
            async move { ping(&url).await }
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

/// A real `agent-sessions serve` process.
pub struct Serve {
    pub port: u16,
    child: Child,
}

impl Serve {
    pub async fn start(db_url: &str, redis_url: &str, prefix: &str) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_agent-sessions"))
            .arg("serve")
            .env("DATABASE_URL", db_url)
            .env("REDIS_URL", redis_url)
            .env("PORT", port.to_string())
            .env("APP__REDIS__CHANNEL_PREFIX", prefix)
            .env("APP__RELAY__LEADER_CHECK_INTERVAL_MS", "200")
            .env("APP__DATABASE__MAX_CONNECTIONS", "6")
            .env("APP__SERVER__WORKERS", "2")
            .env("APP__AUTH__ENABLED", "false")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent-sessions serve");
        let s = Self { port, child };
        let url = s.url("/healthz");
        let client = reqwest::Client::new();
        eventually(20, "serve to listen", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether this process's relay holds the leader lock (from /metrics).
    pub async fn is_relay_leader(&self, client: &reqwest::Client) -> bool {
        let Ok(res) = client.get(self.url("/metrics")).send().await else {
            return false;
        };
        let text = res.text().await.unwrap_or_default();
        text.lines().any(|l| l.trim() == "relay_leader 1")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.sigkill();
    }
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
