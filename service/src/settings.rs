//! Typed settings: built-in defaults < optional TOML file < `APP__SECTION__KEY`
//! environment variables, plus the conventional `DATABASE_URL`, `REDIS_URL`
//! and `PORT`. This is the only module that reads the environment for
//! configuration; everything is validated once, at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub log: LogSettings,
    pub api: ApiSettings,
    pub relay: RelayConfig,
    pub analytics: AnalyticsConfig,
    pub auth: AuthSettings,
    pub runner: RunnerSettings,
    pub retention: RetentionSettings,
}

/// Which sessions go and when (docs/design.md, retention). Off by default:
/// without `delete_after_secs` no session is deleted by retention, and
/// without `purge_after_secs` the events of deleted sessions are kept.
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    /// Seconds between two sweeps inside `serve` (one replica at a time);
    /// 0 runs none (`agent-sessions retention run` from a scheduler then).
    pub sweep_interval_secs: u64,
    /// Statuses of the sessions retention deletes, separated by commas, of
    /// `completed`, `crashed` and `paused` (an active session is never
    /// deleted by retention).
    pub delete_statuses: String,
    /// Delete sessions of those statuses not updated for this many seconds
    /// (2592000: 30 days). Unset: retention deletes no session.
    #[serde(default)]
    pub delete_after_secs: Option<u64>,
    /// Purge the events of a deleted session this many seconds after its
    /// deletion (the grace period; 604800: 7 days). Unset: never. Give every
    /// reader of the feed that long to catch up.
    #[serde(default)]
    pub purge_after_secs: Option<u64>,
    /// An idempotency key is honoured this long (24 h by default), then
    /// removed by the sweep and never honoured again.
    pub idempotency_key_ttl_secs: u64,
    /// Sessions deleted, streams purged or keys removed per statement
    /// (1 to 1000), so a sweep never holds a long transaction.
    pub batch_size: u64,
}

impl RetentionSettings {
    /// `delete_statuses`, read.
    pub fn statuses(&self) -> Option<Vec<crate::domain::SessionStatus>> {
        self.delete_statuses
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(crate::domain::SessionStatus::parse)
            .collect()
    }

    pub fn idempotency_key_ttl(&self) -> Duration {
        Duration::from_secs(self.idempotency_key_ttl_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    /// On unless explicitly switched off; off logs a warning at start-up.
    pub enabled: bool,
    /// Serve `/metrics` without a token.
    pub metrics_public: bool,
    /// Serve `/openapi.json` and `/docs` without a token.
    pub docs_public: bool,
    /// Static API tokens: a JSON list of `{"subject", "sha256", "scopes"}`;
    /// only hashes are stored (`agent-sessions hash-token`).
    pub tokens_json: String,
    /// HS256 shared secret; give it through the environment, never a file.
    pub jwt_hs256_secret: String,
    /// PEM public key (RSA for RS256, EC for ES256).
    pub jwt_public_key_file: String,
    /// A JWKS file; keys are chosen by the token's `kid`.
    pub jwks_file: String,
    /// Required `iss` when set.
    pub jwt_issuer: String,
    /// Required `aud` when set.
    pub jwt_audience: String,
    /// Requests per second allowed per token (0: no limit).
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelayConfig {
    /// Run the Redis relay in this process (one replica publishes at a time).
    pub enabled: bool,
    /// Events per read and publish pipeline.
    pub batch_size: u64,
    /// Fallback poll when no commit signal arrives.
    pub poll_interval_ms: u64,
    /// How often the leader checks it still holds its lock; also how soon a
    /// standby tries to take over.
    pub leader_check_interval_ms: u64,
    /// Log a warning when the oldest unpublished event is older than this.
    pub lag_warn_secs: u64,
    /// A feed held back longer than this by an open event writer is logged
    /// (with the writer's pid, database, state and times) and shown by
    /// `/readyz`.
    pub feed_held_warn_secs: u64,
    /// Seconds between SSE keep-alive comments.
    pub sse_heartbeat_secs: u64,
    /// Under sustained load (reads finding [`crate::relay::BUSY_EVENTS`]
    /// events or more, on average), start a read at most this often
    /// (milliseconds; 0: read again as soon as a publish is done). Under
    /// load each read also costs the database a scan of `pg_locks` and
    /// `pg_stat_activity` (the horizon, while events wait behind the writes
    /// in flight), so fewer, larger reads leave more of it to the writes; at
    /// low load the relay still reads at every commit.
    pub busy_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AnalyticsConfig {
    /// Keep the analytics projection in this process (one replica folds at
    /// a time; it waits and polls like the relay, `relay.poll_interval_ms`
    /// and `relay.leader_check_interval_ms`).
    pub enabled: bool,
    /// Events folded per transaction.
    pub batch_size: u64,
    /// Once caught up, fold at most this often (milliseconds; 0: at every
    /// commit). A backlog is folded page after page without waiting. The
    /// projection is read by `/analytics` and the `sessions` gauge, not by
    /// the write path: folding every commit on its own under write load
    /// cost as much database time as the writes themselves.
    pub fold_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    /// Address to bind; `0.0.0.0` in containers.
    pub host: String,
    /// 8011, the seed's port.
    pub port: u16,
    /// HTTP worker threads; defaults to the number of cores.
    pub workers: Option<usize>,
    /// Largest request body accepted, in bytes (413 beyond).
    pub body_limit_bytes: usize,
    /// Deepest JSON nesting accepted in a request body (400 beyond).
    pub max_json_depth: usize,
    /// Seconds in-flight requests get to finish on SIGTERM.
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub min_connections: u32,
    /// How long a request waits for a pooled connection before 503.
    pub acquire_timeout_ms: u64,
    /// `statement_timeout` of the service's connections: a statement that
    /// runs (or waits for a lock) longer is cancelled and answered 503. An
    /// event writer holds the feed back while it runs, so this bounds how long
    /// any writer of ours can hold it.
    pub statement_timeout_ms: u64,
    /// `idle_in_transaction_session_timeout` of the service's connections.
    pub idle_in_transaction_timeout_ms: u64,
    /// Drainers (statements at once) of the lane of batched writes
    /// (creates and updates), each holding one connection of the pool:
    /// concurrent commands of a kind run as one statement per drainer
    /// (natural batching). Two or more, so that a write waiting for a lock
    /// holds up only its own batch. The lane of reads by id has one drainer
    /// (a read waits for no lock). 0 runs every command alone.
    pub batch_executors: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    pub url: String,
    /// Prepended to every channel name, so deployments can share one Redis.
    pub channel_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiSettings {
    pub default_page_size: u64,
    /// Larger `limit`s are refused with 400.
    pub max_page_size: u64,
    /// Longest a long-poll of `GET /events` is held, in seconds (1 to 60): a
    /// larger `wait` (up to the documented 60) is shortened to this.
    pub max_wait_secs: u64,
    /// Largest `text` of one `POST /sessions/{id}/input`, in bytes; larger
    /// is refused with 413 (the body as a whole is bounded by
    /// `server.body_limit_bytes`).
    pub max_input_bytes: usize,
    /// Largest CLI transcript kept per session, in bytes; an upload that
    /// would grow it further is refused with 413 and stores nothing.
    pub max_transcript_bytes: usize,
    /// Largest body of `POST /sessions/import`, in bytes (413 beyond). This
    /// route alone reads bodies past `server.body_limit_bytes`, as does the
    /// transcript upload (up to `max_transcript_bytes`).
    pub max_import_bytes: usize,
}

/// The `runner` subcommand (docs/design.md, the runner). `API_URL`, `WORKSPACE_ROOT` and
/// `CLAUDE_BIN` override the matching keys; the rest are `APP__RUNNER__*`.
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerSettings {
    /// Base URL of the API service; the runner talks to nothing else.
    pub api_url: String,
    /// Each session gets `<workspace_root>/<session id>/`; created if missing.
    pub workspace_root: PathBuf,
    /// The Claude Code CLI: a path, or a name looked up on `PATH`.
    pub claude_bin: String,
    /// Workers running at once; sessions beyond it wait in a queue.
    pub max_workers: usize,
    /// Full resync of every managed session, in seconds.
    pub resync_interval_secs: u64,
    /// Longest wait of one long-poll of `/events` (`wait` parameter), in
    /// seconds; Redis hints wake sessions sooner.
    pub feed_wait_secs: u64,
    /// Grace after SIGINT, then after SIGTERM, before the group gets SIGKILL.
    pub interrupt_grace_ms: u64,
    pub terminate_grace_ms: u64,
    /// Stream-json lines posted to `/sessions/{id}/messages` per request at most.
    pub message_batch: usize,
    /// Sessions reconciled concurrently.
    pub reconcile_concurrency: usize,
    /// Start workers with `--bare` (no hooks, plugins, CLAUDE.md discovery;
    /// API-key auth only).
    pub bare: bool,
    /// Which backends this runner serves (`local`, `kubernetes` or `both`;
    /// anything else is refused when the settings load): each gets its own
    /// controller.
    pub backend: BackendChoice,
    /// Kubernetes backend: namespace of worker pods and their claims (the
    /// runner's Role is granted there).
    pub namespace: String,
    /// Image of worker pods when the session's `worker.image` names none.
    pub worker_image: String,
    /// Name of the Secret holding the Anthropic API key, and its key: pods
    /// reference it (`secretKeyRef`); the runner never reads the value.
    pub api_key_secret: String,
    pub api_key_secret_key: String,
    /// StorageClass of workspace claims; the cluster's default when unset.
    pub storage_class: Option<String>,
    /// Size of each session's workspace claim (a Kubernetes quantity).
    pub claim_size: String,
    /// A worker pod running longer than this is stopped by the kubelet
    /// (crash reason `deadline`).
    pub active_deadline_seconds: i64,
    /// Delete a session's claim once it is completed; keep it otherwise
    /// (paused and crashed sessions may resume). A deleted session's claim
    /// is deleted either way.
    pub delete_claim_on_completion: bool,
    /// Worker pod resources when the session's `worker.resources` is unset.
    pub default_requests: BTreeMap<String, String>,
    pub default_limits: BTreeMap<String, String>,
    /// Kubernetes API URL (tests: a fake on loopback, plain HTTP); unset
    /// means kubeconfig or the in-cluster service account.
    pub kube_api_url: Option<String>,
    /// Where the runner serves `/metrics` and `/healthz` (empty: nowhere).
    pub metrics_listen: String,
    /// USD per million tokens by model (an exact name, a prefix ending in
    /// `*`, or `default`): what a worker's turns cost. A model it does not
    /// price is charged what the CLI reports.
    #[serde(default)]
    pub prices: BTreeMap<String, crate::runner::cost::Price>,
}

/// `runner.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Local,
    Kubernetes,
    Both,
}

impl BackendChoice {
    pub fn local(self) -> bool {
        matches!(self, Self::Local | Self::Both)
    }
    pub fn kubernetes(self) -> bool {
        matches!(self, Self::Kubernetes | Self::Both)
    }
}

impl RunnerSettings {
    pub fn resync_interval(&self) -> Duration {
        Duration::from_secs(self.resync_interval_secs)
    }
    pub fn feed_wait(&self) -> Duration {
        Duration::from_secs(self.feed_wait_secs)
    }
    /// `storage_class`, an empty value meaning unset.
    pub fn storage_class(&self) -> Option<&str> {
        self.storage_class
            .as_deref()
            .filter(|s| !s.trim().is_empty())
    }
    /// `kube_api_url`, an empty value meaning unset.
    pub fn kube_api_url(&self) -> Option<&str> {
        self.kube_api_url
            .as_deref()
            .filter(|s| !s.trim().is_empty())
    }
}

/// Environment the runner hands to every worker from its own environment,
/// and never takes from a session (`worker.env` refuses these keys).
pub const WORKER_PASSTHROUGH_ENV: [&str; 3] = [
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
];

/// Plain process environment a worker inherits (everything else is cleared,
/// so the runner's own `API_TOKEN` or `DATABASE_URL` never reach it).
pub const WORKER_INHERITED_ENV: [&str; 6] = ["PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM"];

/// Secrets and pass-through values for the runner, read from the environment
/// here (the only module that reads it) and never printed.
#[derive(Clone, Default)]
pub struct RunnerSecrets {
    /// `API_TOKEN`, sent as a bearer token when set.
    pub api_token: Option<String>,
    /// [`WORKER_INHERITED_ENV`] and [`WORKER_PASSTHROUGH_ENV`] entries that are set.
    pub worker_env: Vec<(String, String)>,
}

impl RunnerSecrets {
    pub fn from_env() -> Self {
        Self {
            api_token: std::env::var("API_TOKEN").ok().filter(|t| !t.is_empty()),
            worker_env: WORKER_INHERITED_ENV
                .iter()
                .chain(WORKER_PASSTHROUGH_ENV.iter())
                .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
                .collect(),
        }
    }
}

impl std::fmt::Debug for RunnerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.worker_env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("RunnerSecrets")
            .field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("worker_env", &names)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

const DEFAULTS: &str = r#"
[server]
host = "127.0.0.1"
port = 8011
body_limit_bytes = 1048576
max_json_depth = 32
shutdown_timeout_secs = 30

[database]
url = "postgres://postgres@127.0.0.1:5432/agent_sessions"
max_connections = 16
min_connections = 1
acquire_timeout_ms = 3000
statement_timeout_ms = 15000
idle_in_transaction_timeout_ms = 15000
batch_executors = 2

[redis]
url = "redis://127.0.0.1:6379"
channel_prefix = ""

[log]
format = "auto"
filter = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn"

[api]
default_page_size = 20
max_page_size = 500
max_wait_secs = 60
max_input_bytes = 262144
max_transcript_bytes = 67108864
max_import_bytes = 67108864

[auth]
enabled = true
metrics_public = true
docs_public = false
tokens_json = ""
jwt_hs256_secret = ""
jwt_public_key_file = ""
jwks_file = ""
jwt_issuer = ""
jwt_audience = ""
rate_limit_per_second = 200
rate_limit_burst = 400

[relay]
enabled = true
batch_size = 500
poll_interval_ms = 100
leader_check_interval_ms = 1000
lag_warn_secs = 5
feed_held_warn_secs = 10
sse_heartbeat_secs = 15
busy_interval_ms = 4

[retention]
sweep_interval_secs = 3600
delete_statuses = "completed,crashed"
idempotency_key_ttl_secs = 86400
batch_size = 200

[analytics]
enabled = true
batch_size = 1000
fold_interval_ms = 200

[runner]
api_url = "http://127.0.0.1:8011"
metrics_listen = "127.0.0.1:9464"
workspace_root = "/var/lib/agent-sessions/workspaces"
claude_bin = "claude"
max_workers = 16
resync_interval_secs = 30
feed_wait_secs = 25
interrupt_grace_ms = 5000
terminate_grace_ms = 5000
message_batch = 100
reconcile_concurrency = 8
bare = true
backend = "local"
namespace = "default"
worker_image = "agent-sessions-worker:0.1.0"
api_key_secret = "agent-sessions-anthropic"
api_key_secret_key = "ANTHROPIC_API_KEY"
claim_size = "1Gi"
active_deadline_seconds = 86400
delete_claim_on_completion = true

[runner.default_requests]
cpu = "250m"
memory = "512Mi"

[runner.default_limits]
memory = "2Gi"

[runner.prices."claude-opus*"]
input = 15.0
output = 75.0
cache_write = 18.75
cache_read = 1.5

[runner.prices."claude-sonnet*"]
input = 3.0
output = 15.0
cache_write = 3.75
cache_read = 0.3

[runner.prices."claude-haiku*"]
input = 1.0
output = 5.0
cache_write = 1.25
cache_read = 0.1
"#;

impl Settings {
    /// Load from the layers; `file` defaults to `$APP_CONFIG_FILE` if set.
    pub fn load(file: Option<PathBuf>) -> Result<Self, SettingsError> {
        let file = file.or_else(|| std::env::var_os("APP_CONFIG_FILE").map(PathBuf::from));
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("APP")
                .prefix_separator("__")
                .separator("__"),
        );
        for (var, key) in [
            ("DATABASE_URL", "database.url"),
            ("REDIS_URL", "redis.url"),
            ("PORT", "server.port"),
            ("API_URL", "runner.api_url"),
            ("WORKSPACE_ROOT", "runner.workspace_root"),
            ("CLAUDE_BIN", "runner.claude_bin"),
        ] {
            let app_var = format!("APP__{}", key.to_uppercase().replace('.', "__"));
            if std::env::var_os(&app_var).is_none()
                && let Ok(v) = std::env::var(var)
            {
                builder = builder.set_override(key, v)?;
            }
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The HTTP workers `serve` runs: `server.workers`, else one per core
    /// (as actix-web would choose).
    pub fn http_workers(&self) -> usize {
        self.server.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |key, reason: &str| {
            Err(SettingsError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return bad("database.url", "must be a postgres:// or postgresql:// URL");
        }
        if !["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|p| self.redis.url.starts_with(p))
        {
            return bad("redis.url", "must be a redis://, rediss:// or unix:// URL");
        }
        if self.database.max_connections == 0
            || self.database.min_connections > self.database.max_connections
        {
            return bad(
                "database.max_connections",
                "must be at least 1 and at least min_connections",
            );
        }
        if self.database.batch_executors + 1 >= self.database.max_connections as usize {
            return bad(
                "database.batch_executors",
                "the lanes' drainers (these and the read lane's one) must leave the pool at least one connection",
            );
        }
        if self.server.max_json_depth == 0 || self.server.max_json_depth > 64 {
            return bad("server.max_json_depth", "must be between 1 and 64");
        }
        if self.server.body_limit_bytes < 1024 {
            return bad("server.body_limit_bytes", "must be at least 1024");
        }
        if self.api.max_transcript_bytes == 0 {
            return bad("api.max_transcript_bytes", "must be at least 1");
        }
        if self.api.max_import_bytes < 1024 {
            return bad("api.max_import_bytes", "must be at least 1024");
        }
        if self.api.max_input_bytes == 0 {
            return bad("api.max_input_bytes", "must be at least 1");
        }
        if !(1..=60).contains(&self.api.max_wait_secs) {
            return bad("api.max_wait_secs", "must be between 1 and 60");
        }
        if self.api.default_page_size == 0 || self.api.default_page_size > self.api.max_page_size {
            return bad(
                "api.default_page_size",
                "must be between 1 and api.max_page_size",
            );
        }
        if self.database.statement_timeout_ms < 100
            || self.database.idle_in_transaction_timeout_ms < 100
        {
            return bad(
                "database.statement_timeout_ms",
                "statement_timeout_ms and idle_in_transaction_timeout_ms must be at least 100",
            );
        }
        if self.relay.batch_size == 0
            || self.relay.poll_interval_ms == 0
            || self.relay.sse_heartbeat_secs == 0
        {
            return bad(
                "relay",
                "batch_size, poll_interval_ms and sse_heartbeat_secs must be positive",
            );
        }
        if self.relay.busy_interval_ms > 1_000 {
            return bad("relay.busy_interval_ms", "must be at most 1000");
        }
        if !(1..=10_000).contains(&self.analytics.batch_size) {
            return bad("analytics.batch_size", "must be between 1 and 10000");
        }
        if self.analytics.fold_interval_ms > 60_000 {
            return bad("analytics.fold_interval_ms", "must be at most 60000");
        }
        if self.redis.channel_prefix.chars().any(char::is_whitespace) {
            return bad("redis.channel_prefix", "must not contain whitespace");
        }
        let ret = &self.retention;
        match ret.statuses() {
            Some(st) if !st.is_empty() && !st.contains(&crate::domain::SessionStatus::Active) => {}
            _ => {
                return bad(
                    "retention.delete_statuses",
                    "must be one or more of completed, crashed and paused, separated by commas",
                );
            }
        }
        if ret.delete_after_secs == Some(0) {
            return bad("retention.delete_after_secs", "must be at least 1 when set");
        }
        if ret.idempotency_key_ttl_secs == 0 {
            return bad("retention.idempotency_key_ttl_secs", "must be at least 1");
        }
        if !(1..=1000).contains(&ret.batch_size) {
            return bad("retention.batch_size", "must be between 1 and 1000");
        }
        let r = &self.runner;
        if !(r.api_url.starts_with("http://") || r.api_url.starts_with("https://")) {
            return bad("runner.api_url", "must be an http:// or https:// URL");
        }
        if r.claude_bin.trim().is_empty() || r.workspace_root.as_os_str().is_empty() {
            return bad(
                "runner.claude_bin",
                "claude_bin and workspace_root must be set",
            );
        }
        if r.max_workers == 0 || r.reconcile_concurrency == 0 {
            return bad(
                "runner.max_workers",
                "max_workers and reconcile_concurrency must be at least 1",
            );
        }
        for (model, p) in &r.prices {
            let fine = [p.input, p.output, p.cache_write, p.cache_read]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0 && *x <= 1_000_000.0);
            if !fine {
                return bad(
                    "runner.prices",
                    &format!(
                        "`{model}`: prices are numbers from 0 to 1000000 (USD per million tokens)"
                    ),
                );
            }
        }
        if !(1..=1000).contains(&r.message_batch) {
            return bad("runner.message_batch", "must be between 1 and 1000");
        }
        if !(1..=60).contains(&r.feed_wait_secs) || r.resync_interval_secs == 0 {
            return bad(
                "runner.feed_wait_secs",
                "feed_wait_secs must be between 1 and 60, resync_interval_secs at least 1",
            );
        }
        if r.backend.kubernetes() {
            if !is_dns_label(&r.namespace) {
                return bad("runner.namespace", "must be a DNS label (a namespace name)");
            }
            if r.worker_image.trim().is_empty() {
                return bad("runner.worker_image", "must name an image");
            }
            if !is_dns_subdomain(&r.api_key_secret) || r.api_key_secret_key.trim().is_empty() {
                return bad(
                    "runner.api_key_secret",
                    "api_key_secret must be a Secret name and api_key_secret_key a key",
                );
            }
            if r.claim_size.trim().is_empty() {
                return bad("runner.claim_size", "must be a quantity such as 1Gi");
            }
            if r.active_deadline_seconds < 1 {
                return bad("runner.active_deadline_seconds", "must be at least 1");
            }
            if r.kube_api_url()
                .is_some_and(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                return bad("runner.kube_api_url", "must be an http:// or https:// URL");
            }
        }
        Ok(())
    }

    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.database.acquire_timeout_ms)
    }

    /// The Redis channel carrying every session event.
    pub fn session_channel(&self) -> String {
        format!("{}events:session", self.redis.channel_prefix)
    }

    /// The Redis channel of wake-up hints (see `contract::WakeHint`).
    pub fn hint_channel(&self) -> String {
        crate::contract::hint_channel(&self.redis.channel_prefix)
    }

    /// Database URL with any password masked, for logs.
    pub fn database_url_for_logs(&self) -> String {
        mask_password(&self.database.url)
    }
}

/// RFC 1123 label: what a namespace name must be.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what a Secret name must be.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***@{}", &url[..s], &url[at + 1..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in defaults alone.
    fn defaults() -> Settings {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let s: Settings = defaults();
        s.validate().unwrap();
        assert_eq!(s.server.port, 8011);
        assert_eq!(s.runner.backend, BackendChoice::Local);
        assert_eq!(s.runner.claim_size, "1Gi");
        assert_eq!(s.runner.storage_class(), None);
        assert_eq!(s.runner.default_requests["memory"], "512Mi");
    }

    /// The chart's variables (and the README's) land where the backend reads them.
    #[test]
    fn kubernetes_runner_settings_come_from_app_variables() {
        let env: std::collections::HashMap<String, String> = [
            ("APP__RUNNER__BACKEND", "kubernetes"),
            ("APP__RUNNER__NAMESPACE", "agents"),
            ("APP__RUNNER__WORKER_IMAGE", "reg/worker:1"),
            ("APP__RUNNER__API_KEY_SECRET", "anthropic"),
            ("APP__RUNNER__API_KEY_SECRET_KEY", "KEY"),
            ("APP__RUNNER__STORAGE_CLASS", "fast"),
            ("APP__RUNNER__CLAIM_SIZE", "5Gi"),
            ("APP__RUNNER__DELETE_CLAIM_ON_COMPLETION", "false"),
            ("APP__RUNNER__DEFAULT_LIMITS__MEMORY", "4Gi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(env)),
            )
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        s.validate().unwrap();
        let r = &s.runner;
        assert_eq!(r.backend, BackendChoice::Kubernetes);
        assert_eq!(
            (r.namespace.as_str(), r.worker_image.as_str()),
            ("agents", "reg/worker:1")
        );
        assert_eq!(
            (r.api_key_secret.as_str(), r.api_key_secret_key.as_str()),
            ("anthropic", "KEY")
        );
        assert_eq!(
            (r.storage_class(), r.claim_size.as_str()),
            (Some("fast"), "5Gi")
        );
        assert!(!r.delete_claim_on_completion);
        assert_eq!(r.default_limits["memory"], "4Gi");
        assert_eq!(r.default_requests["cpu"], "250m");
    }

    #[test]
    fn kubernetes_runner_settings_are_checked() {
        let mut s: Settings = defaults();
        s.runner.backend = BackendChoice::Kubernetes;
        s.validate().unwrap();
        s.runner.namespace = "Not_A_Namespace".into();
        assert!(s.validate().is_err());
        s.runner.namespace = "workers".into();
        s.runner.kube_api_url = Some("127.0.0.1:6443".into());
        assert!(s.validate().is_err());
        s.runner.kube_api_url = Some(String::new());
        s.validate().unwrap();
        s.runner.api_key_secret = String::new();
        assert!(s.validate().is_err());
    }

    #[test]
    fn retention_settings_are_checked() {
        let mut s: Settings = defaults();
        assert_eq!(s.retention.delete_after_secs, None, "off by default");
        assert_eq!(s.retention.purge_after_secs, None, "off by default");
        assert_eq!(
            s.retention.idempotency_key_ttl(),
            Duration::from_secs(86_400)
        );
        for bad in ["", "active", "completed,active", "done"] {
            s.retention.delete_statuses = bad.into();
            assert!(s.validate().is_err(), "{bad:?}");
        }
        s.retention.delete_statuses = " paused , crashed".into();
        s.validate().unwrap();
        s.retention.delete_after_secs = Some(0);
        assert!(s.validate().is_err());
        s.retention.delete_after_secs = Some(60);
        s.retention.batch_size = 1001;
        assert!(s.validate().is_err());
        s.retention.batch_size = 1000;
        s.retention.idempotency_key_ttl_secs = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn relay_pacing_is_bounded() {
        let mut s: Settings = defaults();
        assert_eq!(s.relay.busy_interval_ms, 4);
        s.relay.busy_interval_ms = 0;
        s.validate().unwrap();
        s.relay.busy_interval_ms = 1_001;
        assert!(s.validate().is_err());
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(mask_password("postgres://h/db"), "postgres://h/db");
    }
}
