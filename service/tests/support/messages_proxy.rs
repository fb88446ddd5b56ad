//! A pass-through proxy in front of the API that records every batch the
//! runner posts to `POST /sessions/{id}/messages` (and forwards it), so a test
//! can compare what was posted line for line with the worker's output. It
//! can also hold posts back for a while, and refuse batches holding a chosen
//! line as an API that cannot take that line would.

use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::Value;
use tokio::sync::watch;

use super::app::TestApp;
use super::eventually;
use super::loopback::LoopbackServer;

type Log = Arc<Mutex<Vec<(String, Vec<Value>)>>>;
/// Each refused batch: its session, the status it got and its lines.
type Refusals = Arc<Mutex<Vec<(String, u16, Vec<Value>)>>>;

pub struct MessagesProxy {
    pub url: String,
    posted: Log,
    refused: Refusals,
    refuse: Arc<Mutex<Option<String>>>,
    held: watch::Sender<bool>,
    server: LoopbackServer,
}

struct State {
    upstream: String,
    http: reqwest::Client,
    posted: Log,
    refused: Refusals,
    refuse: Arc<Mutex<Option<String>>>,
    held: watch::Receiver<bool>,
}

async fn handle(req: HttpRequest, body: Bytes, st: web::Data<State>) -> HttpResponse {
    let path = req.path().trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').collect();
    if req.method() == actix_web::http::Method::POST
        && parts.len() == 4
        && parts[1] == "sessions"
        && parts[3] == "messages"
    {
        let _ = st.held.clone().wait_for(|held| !*held).await;
        let batch: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
        let needle = st.refuse.lock().unwrap().clone();
        if let Some(needle) = needle
            && batch.iter().any(|l| l.to_string().contains(&needle))
        {
            // Too large with other lines beside it; unprocessable alone.
            let status = if batch.len() > 1 { 413 } else { 422 };
            st.refused
                .lock()
                .unwrap()
                .push((parts[2].to_owned(), status, batch));
            return HttpResponse::build(StatusCode::from_u16(status).unwrap())
                .content_type("application/problem+json")
                .body(format!(
                    r#"{{"title":"refused by the test proxy","status":{status}}}"#
                ));
        }
        // Record the batch, then pass it on: the service stores it too.
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
        let refused: Refusals = Arc::default();
        let refuse: Arc<Mutex<Option<String>>> = Arc::default();
        let (held, held_rx) = watch::channel(false);
        let state = State {
            upstream: upstream.to_owned(),
            http: reqwest::Client::new(),
            posted: posted.clone(),
            refused: refused.clone(),
            refuse: refuse.clone(),
            held: held_rx,
        };
        let server = LoopbackServer::start("the proxy", state, handle);
        Self {
            url: server.url.clone(),
            posted,
            refused,
            refuse,
            held,
            server,
        }
    }

    /// Refuse every batch holding a line whose JSON contains `needle`: with
    /// 413 while other lines share the batch, with 422 once it is alone.
    pub fn refuse_lines_containing(&self, needle: &str) {
        *self.refuse.lock().unwrap() = Some(needle.to_owned());
    }

    /// Every batch refused for `session`, in order, with its status.
    pub fn refusals(&self, session: &str) -> Vec<(u16, Vec<Value>)> {
        self.refused
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _, _)| s == session)
            .map(|(_, status, b)| (*status, b.clone()))
            .collect()
    }

    /// The API comes to hold exactly `want` as the session's messages (the
    /// worker's lines but the refused one), and the refused line was first
    /// in a batch that the runner halved (413) until it stood alone and was
    /// skipped (422).
    pub async fn assert_refused_line_skipped(&self, api: &TestApp, session: &str, want: &[Value]) {
        let stored = eventually(
            "every line but the refused one to be stored",
            std::time::Duration::from_secs(20),
            || async {
                let got: Vec<Value> = api
                    .messages(session)
                    .await?
                    .as_array()?
                    .iter()
                    .map(|m| m["message"].clone())
                    .collect();
                (got.len() >= want.len()).then_some(got)
            },
        )
        .await;
        assert_eq!(stored, want, "in order, all but the refused line");
        let refusals = self.refusals(session);
        let statuses: Vec<u16> = refusals.iter().map(|(s, _)| *s).collect();
        // Split (413) until the line stands alone, then skipped (422); a
        // line that was posted alone is skipped at once.
        assert!(
            !statuses.is_empty()
                && statuses[..statuses.len() - 1].iter().all(|s| *s == 413)
                && statuses.last() == Some(&422),
            "split, then skipped: {statuses:?}"
        );
        assert_eq!(refusals.last().map(|(_, b)| b.len()), Some(1));
    }

    /// Keep posted batches waiting (unanswered) until `release`.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
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
