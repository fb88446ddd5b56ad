//! An HTTP server on a free loopback port answering every request with one
//! handler: what the fake Anthropic API, the fake Kubernetes API and the
//! messages proxy are built on.

use actix_web::dev::ServerHandle;
use actix_web::{App, FromRequest, Handler, HttpServer, Responder, web};

pub struct LoopbackServer {
    /// `http://127.0.0.1:{port}`.
    pub url: String,
    handle: ServerHandle,
}

impl LoopbackServer {
    /// Serve `handler` (which reads `state` as `web::Data<S>`) with one
    /// worker, bodies up to 32 MiB; `what` names it in a bind failure.
    pub fn start<S, F, Args>(what: &str, state: S, handler: F) -> Self
    where
        S: Send + Sync + 'static,
        F: Handler<Args> + Send,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        let data = web::Data::new(state);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(32 * 1024 * 1024))
                .default_service(web::to(handler.clone()))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("bind {what}: {e}"));
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}"),
            handle,
        }
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}
