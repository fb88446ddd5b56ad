//! Building the API application from settings, and running it with its
//! background tasks (the relay, the analytics consumer, the feed listeners
//! and the retention sweep) until a signal.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, middleware::from_fn, web};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::analytics::{AnalyticsConsumer, AnalyticsSettings};
use crate::api::{
    self, AppState, CommitEffects, auth::AuthState, body::BodyLimit, params::PageSizes,
};
use crate::bus::{Bus, Hints};
use crate::monitor::{self, FeedWatch};
use crate::relay::{self, FeedSignal, Relay, RelaySettings};
use crate::settings::Settings;
use crate::store::{DatabaseOptions, Store};

pub struct Application {
    port: u16,
    server: Server,
    store: Store,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Application {
    /// Bind the listener (port 0 picks a free port), build the server and
    /// start the background tasks.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        // The recorder first: the store registers its metrics as it starts.
        crate::metrics::handle();
        let workers = settings.http_workers();
        let store = Store::connect(&DatabaseOptions {
            worker_reads: workers,
            ..database_options(
                settings,
                settings.database.max_connections,
                settings.database.batch_executors,
            )
        })
        .await?;
        let bus = Arc::new(Bus::new(&settings.redis.url)?);
        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))?;
        let port = listener.local_addr()?.port();
        let shutdown = CancellationToken::new();
        let feed = FeedSignal::default();
        let relay_wake = Arc::new(Notify::new());
        // Tags this replica's `NOTIFY`s, so it ignores its own.
        let replica = uuid::Uuid::new_v4().to_string();

        let mut tasks = vec![
            tokio::spawn(relay::forward_local_commits(
                settings.database.url.clone(),
                replica.clone(),
                relay_wake.clone(),
                feed.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(relay::listen_for_commits(
                settings.database.url.clone(),
                replica,
                feed.clone(),
                shutdown.clone(),
            )),
        ];
        if settings.relay.enabled {
            // The relay has connections of its own: under write load it must
            // not queue behind requests for the shared pool. One for the
            // publish loop, one each for the cursor saver and the lag
            // measure, so the loop never waits for the other two. The
            // loop's is a pool of its own: from a shared pool it would at
            // times get a connection it had not used yet, and pay its cold
            // start (a new backend, its catalog caches, the statements
            // prepared again) in one read: 26–113 ms, seen as a stall of
            // the first updates published after a start.
            let relay_store = Store::connect(&database_options(settings, 1, 0)).await?;
            let relay_aux = Store::connect(&database_options(settings, 2, 0)).await?;
            let relay = Relay::new(
                relay_store,
                relay_aux,
                bus.clone(),
                RelaySettings {
                    database_url: settings.database.url.clone(),
                    channel_prefix: settings.redis.channel_prefix.clone(),
                    batch_size: settings.relay.batch_size,
                    poll_interval: Duration::from_millis(settings.relay.poll_interval_ms),
                    leader_check_interval: Duration::from_millis(
                        settings.relay.leader_check_interval_ms,
                    ),
                    lag_warn_after: Duration::from_secs(settings.relay.lag_warn_secs),
                    busy_interval: Duration::from_millis(settings.relay.busy_interval_ms),
                },
                feed.clone(),
            );
            tasks.push(tokio::spawn(relay.run(shutdown.clone())));
        }
        if settings.analytics.enabled {
            // Its own connections too, for the same reason.
            let analytics_store = Store::connect(&database_options(settings, 2, 0)).await?;
            let consumer = AnalyticsConsumer::new(
                analytics_store,
                AnalyticsSettings {
                    database_url: settings.database.url.clone(),
                    batch_size: settings.analytics.batch_size,
                    fold_interval: Duration::from_millis(settings.analytics.fold_interval_ms),
                    poll_interval: Duration::from_millis(settings.relay.poll_interval_ms),
                    leader_check_interval: Duration::from_millis(
                        settings.relay.leader_check_interval_ms,
                    ),
                },
                feed.clone(),
            );
            tasks.push(tokio::spawn(consumer.run(shutdown.clone())));
        }

        let hints = Hints::start(bus.clone(), &settings.redis.channel_prefix);
        let feed_watch = FeedWatch::default();
        tasks.push(tokio::spawn(monitor::watch_feed(
            store.clone(),
            feed_watch.clone(),
            Duration::from_secs(settings.relay.feed_held_warn_secs),
            shutdown.clone(),
        )));
        let commits = CommitEffects::new(relay_wake, hints);
        if settings.retention.sweep_interval_secs > 0 {
            tasks.push(tokio::spawn(crate::retention::sweep(
                store.clone(),
                settings.retention.clone(),
                settings.database.url.clone(),
                commits.clone(),
                shutdown.clone(),
            )));
        }
        let state = web::Data::new(AppState {
            store: store.clone(),
            bus,
            feed,
            shutdown: shutdown.clone(),
            sse_heartbeat: Duration::from_secs(settings.relay.sse_heartbeat_secs),
            max_wait: Duration::from_secs(settings.api.max_wait_secs),
            max_input_bytes: settings.api.max_input_bytes,
            max_transcript_bytes: settings.api.max_transcript_bytes,
            max_import_bytes: settings.api.max_import_bytes,
            pages: PageSizes {
                default: settings.api.default_page_size,
                max: settings.api.max_page_size,
            },
            commits,
            feed_watch,
            idempotency_ttl: settings.retention.idempotency_key_ttl(),
            delete_batch: settings.retention.batch_size,
        });
        let limit = web::Data::new(BodyLimit(
            settings.server.body_limit_bytes,
            settings.server.max_json_depth,
        ));
        let auth = web::Data::new(AuthState::from_settings(&settings.auth)?);
        let worker_store = store.clone();
        let server = HttpServer::new(move || {
            // Runs on each worker's thread, as the worker starts.
            worker_store.open_worker_reads();
            App::new()
                .app_data(state.clone())
                .app_data(limit.clone())
                .app_data(auth.clone())
                .wrap(from_fn(api::auth::authenticate))
                .wrap(from_fn(api::middleware::request_context))
                .configure(api::configure)
        })
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .workers(workers);
        tracing::info!(
            port,
            database = %settings.database_url_for_logs(),
            redis = %settings.redis.url,
            relay = settings.relay.enabled,
            "agent-sessions API listening"
        );
        Ok(Self {
            port,
            server: server.run(),
            store,
            shutdown,
            tasks,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that stops the server gracefully (what SIGTERM does).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            handle: self.server.handle(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Serve until `stopper().stop()` is called.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.store.close().await;
        tracing::info!("agent-sessions API stopped");
        result
    }

    /// Serve until SIGTERM or SIGINT, then drain in-flight requests, end
    /// streams and stop the relay.
    pub async fn run_until_signalled(self) -> std::io::Result<()> {
        let stopper = self.stopper();
        tokio::spawn(async move {
            crate::signals::shutdown_requested().await;
            tracing::info!("shutdown signal received: draining");
            stopper.stop().await;
        });
        self.run_until_stopped().await
    }
}

#[derive(Clone)]
pub struct Stopper {
    handle: ServerHandle,
    shutdown: CancellationToken,
}

impl Stopper {
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.handle.stop(true).await;
    }
}

/// `batch_executors`: executors per batched kind (`database.batch_executors`
/// for the API's store, 0 for the relay's, which writes nothing batched).
pub(crate) fn database_options(
    settings: &Settings,
    max_connections: u32,
    batch_executors: usize,
) -> DatabaseOptions {
    let db = &settings.database;
    DatabaseOptions {
        url: db.url.clone(),
        max_connections,
        min_connections: db.min_connections.min(max_connections),
        acquire_timeout: settings.acquire_timeout(),
        statement_timeout: Duration::from_millis(db.statement_timeout_ms),
        idle_in_transaction_timeout: Duration::from_millis(db.idle_in_transaction_timeout_ms),
        batch_executors,
        worker_reads: 0,
    }
}
