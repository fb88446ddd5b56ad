//! Building the API application from settings, and running it.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, middleware::from_fn, web};
use tokio::sync::Notify;

use crate::api::{self, AppState, body::BodyLimit, params::PageSizes};
use crate::bus::Bus;
use crate::settings::Settings;
use crate::store::{DatabaseOptions, Store};

pub struct Application {
    port: u16,
    server: Server,
    store: Store,
}

impl Application {
    /// Bind the listener (port 0 picks a free port) and build the server.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let store = Store::connect(&DatabaseOptions {
            url: settings.database.url.clone(),
            max_connections: settings.database.max_connections,
            min_connections: settings.database.min_connections,
            acquire_timeout: settings.acquire_timeout(),
        })
        .await?;
        let bus = Bus::new(&settings.redis.url)?;
        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(AppState {
            store: store.clone(),
            bus,
            pages: PageSizes {
                default: settings.api.default_page_size,
                max: settings.api.max_page_size,
            },
            relay_wake: Arc::new(Notify::new()),
        });
        let limit = web::Data::new(BodyLimit(settings.server.body_limit_bytes));
        crate::metrics::handle();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(limit.clone())
                .wrap(from_fn(api::middleware::request_context))
                .configure(api::configure)
        })
        .listen(listener)?
        .shutdown_timeout(settings.server.shutdown_timeout_secs);
        if let Some(w) = settings.server.workers {
            server = server.workers(w);
        }
        tracing::info!(
            port,
            database = %settings.database_url_for_logs(),
            redis = %settings.redis.url,
            "agent-sessions API listening"
        );
        Ok(Self {
            port,
            server: server.run(),
            store,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serve until SIGTERM/SIGINT (actix stops gracefully on both).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.store.close().await;
        tracing::info!("agent-sessions API stopped");
        result
    }
}
