//! A pass-through proxy in front of the API that records every batch the
//! runner posts to `POST /sessions/{id}/messages` (and forwards it), so a test
//! can compare what was posted line for line with the worker's output.

use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::Value;

use super::loopback::LoopbackServer;

type Log = Arc<Mutex<Vec<(String, Vec<Value>)>>>;

pub struct MessagesProxy {
    pub url: String,
    posted: Log,
    server: LoopbackServer,
}

struct State {
    upstream: String,
    http: reqwest::Client,
    posted: Log,
}

async fn handle(req: HttpRequest, body: Bytes, st: web::Data<State>) -> HttpResponse {
    let path = req.path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').collect();
    if req.method() == actix_web::http::Method::POST
        && parts.len() == 4
        && parts[1] == "sessions"
        && parts[3] == "messages"
    {
        // Record the batch, then pass it on: the service stores it too.
        let batch: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
        st.posted.lock().unwrap().push((parts[2].to_owned(), batch));
    }
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes()).unwrap();
    let mut out = st
        .http
        .request(method, format!("{}{}", st.upstream, req.uri()))
        .body(body.to_vec());
    for name in ["content-type", "if-match", "authorization"] {
        if let Some(v) = req.headers().get(name) {
            out = out.header(name, v.as_bytes());
        }
    }
    let res = match out.send().await {
        Ok(r) => r,
        Err(e) => return HttpResponse::BadGateway().body(e.to_string()),
    };
    let mut reply = HttpResponse::build(StatusCode::from_u16(res.status().as_u16()).unwrap());
    for name in ["content-type", "etag", "link", "location"] {
        if let Some(v) = res.headers().get(name) {
            reply.insert_header((name, v.as_bytes()));
        }
    }
    reply.body(res.bytes().await.unwrap_or_default())
}

impl MessagesProxy {
    pub async fn start(upstream: &str) -> Self {
        let posted: Log = Arc::default();
        let state = State {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            posted: posted.clone(),
        };
        let server = LoopbackServer::start("the proxy", state, handle);
        Self {
            url: server.url.clone(),
            posted,
            server,
        }
    }

    /// Every batch posted for `session`, in order.
    pub fn batches(&self, session: &str) -> Vec<Vec<Value>> {
        self.posted
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s == session)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}
