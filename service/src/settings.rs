//! Typed settings: built-in defaults < optional TOML file < `APP__SECTION__KEY`
//! environment variables, plus the conventional `DATABASE_URL`, `REDIS_URL`
//! and `PORT`. This is the only module that reads the environment for
//! configuration; everything is validated once, at start-up.

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
    pub auth: AuthSettings,
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
    /// Seconds between SSE keep-alive comments.
    pub sse_heartbeat_secs: u64,
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

[redis]
url = "redis://127.0.0.1:6379"
channel_prefix = ""

[log]
format = "auto"
filter = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn"

[api]
default_page_size = 20
max_page_size = 500

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
sse_heartbeat_secs = 15
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
        if self.server.max_json_depth == 0 || self.server.max_json_depth > 64 {
            return bad("server.max_json_depth", "must be between 1 and 64");
        }
        if self.server.body_limit_bytes < 1024 {
            return bad("server.body_limit_bytes", "must be at least 1024");
        }
        if self.api.default_page_size == 0 || self.api.default_page_size > self.api.max_page_size {
            return bad(
                "api.default_page_size",
                "must be between 1 and api.max_page_size",
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
        if self.redis.channel_prefix.chars().any(char::is_whitespace) {
            return bad("redis.channel_prefix", "must not contain whitespace");
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

    /// Database URL with any password masked, for logs.
    pub fn database_url_for_logs(&self) -> String {
        mask_password(&self.database.url)
    }
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

    #[test]
    fn defaults_are_valid() {
        let s: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        s.validate().unwrap();
        assert_eq!(s.server.port, 8011);
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
