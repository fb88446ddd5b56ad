//! API + fake Anthropic API + in-process runner, wired together; optionally
//! with the runner talking to the API through a `MessagesProxy`.

use std::time::Duration;

use agent_sessions::settings::Settings;
use serde_json::{Value, json};
use uuid::Uuid;

use super::app::{TestApp, id_of};
use super::eventually;
use super::fake_anthropic::FakeAnthropic;
use super::messages_proxy::MessagesProxy;
use super::runner::{InProcessRunner, runner_settings, temp_root, worker_env};

pub struct Rig {
    pub api: TestApp,
    pub fake: FakeAnthropic,
    pub runner: InProcessRunner,
    pub proxy: Option<MessagesProxy>,
}

impl Rig {
    pub async fn start() -> Self {
        Self::start_with(false, |_| {}).await
    }

    /// `proxied`: the runner reaches the API through a `MessagesProxy`;
    /// `tune` adjusts the runner's settings.
    pub async fn start_with(proxied: bool, tune: impl FnOnce(&mut Settings)) -> Self {
        let api = TestApp::spawn().await;
        let fake = FakeAnthropic::start().await;
        let proxy = if proxied {
            Some(MessagesProxy::start(&api.url).await)
        } else {
            None
        };
        let root = temp_root();
        let mut settings = runner_settings(&api, &root);
        if let Some(p) = &proxy {
            settings.runner.api_url = p.url.clone();
        }
        tune(&mut settings);
        let runner = InProcessRunner::start(settings, worker_env(&fake.url));
        Self {
            api,
            fake,
            runner,
            proxy,
        }
    }

    pub async fn stop(self) {
        self.runner.stop().await;
        if let Some(p) = self.proxy {
            p.stop().await;
        }
        self.fake.stop().await;
        self.api.teardown().await;
    }

    /// A `local` session with this worker spec; its id.
    pub async fn create_local(&self, worker: Value) -> String {
        let s = self
            .api
            .create_session(&json!({
                "agent_id": Uuid::new_v4(), "session_type": "task",
                "runtime_backend": "local", "worker": worker,
            }))
            .await;
        id_of(&s)
    }

    /// Wait until the session's status is `status`; the session.
    pub async fn until_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        eventually(&format!("session {id} to be {status}"), limit, || async {
            let s = self.api.get(id).await;
            (s["status"] == status).then_some(s)
        })
        .await
    }

    /// The worker's pid once the runner has recorded it.
    pub async fn worker_pid(&self, id: &str) -> i32 {
        eventually("the worker to start", Duration::from_secs(30), || async {
            let s = self.api.get(id).await;
            s["runtime_metadata"]["worker"]["pid"].as_i64()
        })
        .await as i32
    }
}
