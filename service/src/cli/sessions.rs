//! `agent-sessions sessions …`: a command-line client of the HTTP API. Each
//! verb is one request (or a page walk, or a followed stream); the answer is
//! printed for people (a table, `key: value` lines) or, with `--json`, as the
//! server sent it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::client::{Endpoint, install_tls_provider, link_next, problem_of};

/// Exit codes of `sessions` verbs (clap's usage errors exit 2).
pub mod exit {
    /// Any other error answer (4xx or 5xx), or a local error (a bad file).
    pub const ERROR: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    /// The session (or request) does not exist, or the server lacks the route.
    pub const NOT_FOUND: u8 = 4;
    /// 409 or 412: an illegal move, a taken id, a stale `--if-match`.
    pub const CONFLICT: u8 = 5;
    /// 401 or 403: no token, a bad one, or one without the scope.
    pub const UNAUTHORIZED: u8 = 6;
}

const EXIT_CODES: &str = "Exit codes: 0 ok; 1 any other error answer or local error; 2 usage; \
3 the server cannot be reached; 4 not found (404, also a route this server does not have); \
5 conflict (409, 412); 6 unauthorized or forbidden (401, 403).";

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct SessionsArgs {
    /// The API's base URL.
    #[arg(
        long,
        global = true,
        env = "API_URL",
        default_value = "http://127.0.0.1:8011"
    )]
    pub api_url: String,
    /// A bearer token for the API.
    #[arg(long, global = true, env = "API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answers (lists as one array, streams one item a line).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a session from flags, or from a JSON body (`--file`, `-` for stdin).
    Create {
        #[arg(long)]
        agent_id: Option<String>,
        /// The session type (conversation, development, task, batch …).
        #[arg(long = "type", default_value = "task")]
        session_type: String,
        /// The runtime backend (local, kubernetes …).
        #[arg(long)]
        backend: Option<String>,
        /// The context, a JSON object.
        #[arg(long)]
        context: Option<String>,
        /// The worker spec, a JSON object.
        #[arg(long)]
        worker: Option<String>,
        /// The worker's first prompt (sets `worker.prompt`).
        #[arg(long)]
        prompt: Option<String>,
        /// The whole request body from a file (`-`: stdin); other flags are ignored.
        #[arg(long, conflicts_with_all = ["agent_id", "backend", "context", "worker", "prompt"])]
        file: Option<PathBuf>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show one session.
    Get { id: String },
    /// List sessions, newest first.
    List {
        /// Statuses, comma separated.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent_id: Option<String>,
        #[arg(long = "type")]
        session_type: Option<String>,
        #[arg(long)]
        backend: Option<String>,
        /// Worker states, comma separated.
        #[arg(long)]
        worker_state: Option<String>,
        /// Only forks of this session.
        #[arg(long)]
        parent: Option<String>,
        /// Sessions per page.
        #[arg(long)]
        limit: Option<u32>,
        /// Follow every page, not just the first.
        #[arg(long)]
        all: bool,
    },
    /// Change a session with a JSON merge patch.
    Update {
        id: String,
        /// The merge patch, a JSON object.
        #[arg(long, required_unless_present = "file")]
        set: Option<String>,
        /// The merge patch from a file (`-`: stdin).
        #[arg(long, conflicts_with = "set")]
        file: Option<PathBuf>,
        /// Only if the session is still at this version.
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Pause a session.
    Pause(StatusArgs),
    /// Resume a paused (or crashed) session.
    Resume(StatusArgs),
    /// Complete a session.
    Complete(StatusArgs),
    /// Delete a session.
    Delete {
        id: String,
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Queue a message for the session's worker.
    Send {
        id: String,
        /// The text (`-`: read it from stdin).
        text: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Follow the session's messages (or its events) as they come, until interrupted.
    Watch {
        id: String,
        /// Start after this message `seq` (with `--events`: this feed position); 0 is the start.
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Follow the session's events on the feed instead of its messages.
        #[arg(long)]
        events: bool,
    },
    /// Print every message of the session.
    Logs { id: String },
    /// Decide a pending tool approval.
    Approve {
        id: String,
        request_id: String,
        #[arg(value_enum)]
        decision: Decision,
        /// Told to the model (with a denial above all).
        #[arg(long)]
        message: Option<String>,
    },
    /// List a session's tool approvals.
    Approvals {
        id: String,
        /// Statuses, comma separated (pending, allowed, denied).
        #[arg(long, default_value = "pending")]
        status: String,
    },
    /// Fork a session into a new one.
    Fork {
        id: String,
        /// The parent's version to fork as of (the latest by default).
        #[arg(long)]
        at_version: Option<i64>,
        /// Start the fork `active` (it is `paused` otherwise).
        #[arg(long)]
        start: bool,
    },
    /// Write a session's export document to stdout or `--out`.
    Export {
        id: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Recreate a session from an export document (`-`: stdin).
    Import {
        file: PathBuf,
        /// Give it a new id instead of the exported one.
        #[arg(long)]
        new_id: bool,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub id: String,
    /// Only if the session is still at this version.
    #[arg(long)]
    pub if_match: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Messages,
    Events,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Decision {
    Allow,
    Deny,
}

/// Why a verb failed, and so its exit code.
#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Answer { status: StatusCode, message: String },
    Local(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Unreachable(_) => exit::UNREACHABLE,
            Self::Local(_) => exit::ERROR,
            Self::Answer { status, .. } => match *status {
                StatusCode::NOT_FOUND => exit::NOT_FOUND,
                StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => exit::CONFLICT,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => exit::UNAUTHORIZED,
                _ => exit::ERROR,
            },
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Unreachable(m) | Self::Local(m) | Self::Answer { message: m, .. } => m,
        }
    }
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Self {
        if e.is_connect() || e.is_timeout() {
            Self::Unreachable(format!("cannot reach the API: {e}"))
        } else {
            Self::Local(format!("the API's answer could not be read: {e}"))
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::Local(e.to_string())
    }
}

/// Run one verb; print its answer; the exit code.
pub async fn run(args: SessionsArgs) -> ExitCode {
    install_tls_provider();
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("agent-sessions: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let cli = Client {
        endpoint: Endpoint::new(http, &args.api_url, args.token.clone()),
        json: args.json,
    };
    match cli.verb(args.verb).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("agent-sessions: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

struct Client {
    endpoint: Endpoint,
    json: bool,
}

/// A path segment, escaped.
fn seg(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn parse_json(what: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Local(format!("{what} is not JSON: {e}")))
}

/// A file's bytes, or stdin's for `-`.
fn read_input(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| Failure::Local(format!("{}: {e}", path.display())))
    }
}

/// The failure an error answer stands for, with the problem's title and detail.
async fn failure(res: reqwest::Response) -> Failure {
    let status = res.status();
    let body = res.bytes().await.unwrap_or_default();
    let problem = problem_of(&body);
    let message = match &problem {
        // Our own 404 for a path no route serves: a verb this server predates.
        Some(p) if status == StatusCode::NOT_FOUND && p.detail.starts_with("no route for") => {
            "not available on this server".to_owned()
        }
        None if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => {
            "not available on this server".to_owned()
        }
        Some(p) if status == StatusCode::METHOD_NOT_ALLOWED => {
            format!("not available on this server ({})", p.detail)
        }
        Some(p) => format!("{} ({}): {}", p.title, status.as_u16(), p.detail),
        None => format!(
            "the API answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
    };
    Failure::Answer { status, message }
}

impl Client {
    /// Send; the answer if it succeeded, else its failure.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let res = rb.send().await?;
        if res.status().is_success() {
            Ok(res)
        } else {
            Err(failure(res).await)
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let mut rb = self.endpoint.request(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        json_of(self.send(rb).await?).await
    }

    /// Every item of a paged list, following `Link: rel="next"` (only the
    /// first page unless `all`).
    async fn pages(&self, first: String, all: bool) -> Result<Vec<Value>, Failure> {
        let mut next = Some(first);
        let mut items = Vec::new();
        while let Some(path) = next.take() {
            let res = self.send(self.endpoint.request(Method::GET, &path)).await?;
            next = link_next(res.headers()).filter(|_| all);
            match json_of(res).await? {
                Value::Array(page) if !page.is_empty() => items.extend(page),
                _ => break,
            }
        }
        Ok(items)
    }

    async fn verb(&self, verb: Verb) -> Result<(), Failure> {
        match verb {
            Verb::Create {
                agent_id,
                session_type,
                backend,
                context,
                worker,
                prompt,
                file,
                idempotency_key,
            } => {
                let body = match file {
                    Some(f) => parse_json("the body", &String::from_utf8_lossy(&read_input(&f)?))?,
                    None => {
                        let mut b = Map::new();
                        if let Some(a) = agent_id {
                            b.insert("agent_id".into(), a.into());
                        }
                        b.insert("session_type".into(), session_type.into());
                        if let Some(x) = backend {
                            b.insert("runtime_backend".into(), x.into());
                        }
                        if let Some(c) = context {
                            b.insert("context".into(), parse_json("--context", &c)?);
                        }
                        let mut w = match worker {
                            Some(w) => Some(parse_json("--worker", &w)?),
                            None => None,
                        };
                        if let Some(p) = prompt {
                            let spec = w.get_or_insert_with(|| json!({}));
                            match spec.as_object_mut() {
                                Some(o) => o.insert("prompt".into(), p.into()),
                                None => {
                                    return Err(Failure::Local("--worker is not an object".into()));
                                }
                            };
                        }
                        if let Some(w) = w {
                            b.insert("worker".into(), w);
                        }
                        Value::Object(b)
                    }
                };
                let mut rb = self
                    .endpoint
                    .request(Method::POST, "/sessions/")
                    .json(&body);
                if let Some(k) = idempotency_key {
                    rb = rb.header("idempotency-key", k);
                }
                let s = json_of(self.send(rb).await?).await?;
                self.print_session(&s)
            }
            Verb::Get { id } => {
                let s = self
                    .call(Method::GET, &format!("/sessions/{}", seg(&id)), None)
                    .await?;
                self.print_session(&s)
            }
            Verb::List {
                status,
                agent_id,
                session_type,
                backend,
                worker_state,
                parent,
                limit,
                all,
            } => {
                let query: Vec<(&str, String)> = [
                    ("status", status),
                    ("agent_id", agent_id),
                    ("session_type", session_type),
                    ("runtime_backend", backend),
                    ("worker_state", worker_state),
                    ("parent_session_id", parent),
                    ("limit", limit.map(|l| l.to_string())),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect();
                let qs = serde_urlencoded::to_string(&query)
                    .map_err(|e| Failure::Local(e.to_string()))?;
                let items = self.pages(format!("/sessions/?{qs}"), all).await?;
                if self.json {
                    return print_json(&Value::Array(items));
                }
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|s| {
                        vec![
                            text(&s["id"]),
                            text(&s["status"]),
                            text(&s["session_type"]),
                            text(&s["runtime_metadata"]["worker"]["state"]),
                            text(&s["updated_at"]),
                        ]
                    })
                    .collect();
                print_table(&["ID", "STATUS", "TYPE", "WORKER", "UPDATED_AT"], &rows)
            }
            Verb::Update {
                id,
                set,
                file,
                if_match,
            } => {
                let patch = match (set, file) {
                    (Some(s), _) => parse_json("--set", &s)?,
                    (None, Some(f)) => {
                        parse_json("the patch", &String::from_utf8_lossy(&read_input(&f)?))?
                    }
                    (None, None) => return Err(Failure::Local("give --set or --file".into())),
                };
                self.patch(&id, &patch, if_match).await
            }
            Verb::Pause(a) => self.set_status(a, "paused").await,
            Verb::Resume(a) => self.set_status(a, "active").await,
            Verb::Complete(a) => self.set_status(a, "completed").await,
            Verb::Delete { id, if_match } => {
                let mut rb = self
                    .endpoint
                    .request(Method::DELETE, &format!("/sessions/{}", seg(&id)));
                if let Some(v) = if_match {
                    rb = rb.header(header::IF_MATCH, format!("\"{v}\""));
                }
                self.send(rb).await?;
                self.report(&json!({"id": id, "deleted": true}), || {
                    format!("deleted {id}")
                })
            }
            Verb::Send {
                id,
                text: t,
                idempotency_key,
            } => {
                let t = if t == "-" {
                    String::from_utf8_lossy(&read_input(std::path::Path::new("-"))?).into_owned()
                } else {
                    t
                };
                let mut rb = self
                    .endpoint
                    .request(Method::POST, &format!("/sessions/{}/input", seg(&id)))
                    .json(&json!({"text": t}));
                if let Some(k) = idempotency_key {
                    rb = rb.header("idempotency-key", k);
                }
                let a = json_of(self.send(rb).await?).await?;
                self.report(&a, || {
                    format!("queued input {} (seq {})", text(&a["id"]), text(&a["seq"]))
                })
            }
            Verb::Watch { id, from, events } => {
                let stream = if events {
                    Stream::Events
                } else {
                    Stream::Messages
                };
                self.watch(&id, from, stream).await
            }
            Verb::Logs { id } => {
                let items = self
                    .pages(format!("/sessions/{}/messages?limit=500", seg(&id)), true)
                    .await?;
                for m in &items {
                    self.print_message(m)?;
                }
                Ok(())
            }
            Verb::Approve {
                id,
                request_id,
                decision,
                message,
            } => {
                let mut body = json!({"decision": match decision {
                    Decision::Allow => "allow",
                    Decision::Deny => "deny",
                }});
                if let Some(m) = message {
                    body["message"] = m.into();
                }
                let path = format!("/sessions/{}/approvals/{}", seg(&id), seg(&request_id));
                let a = self.call(Method::POST, &path, Some(&body)).await?;
                self.report(&a, || {
                    format!("{} {}", text(&a["status"]), text(&a["request_id"]))
                })
            }
            Verb::Approvals { id, status } => {
                let path = format!("/sessions/{}/approvals?status={}", seg(&id), seg(&status));
                let a = self.call(Method::GET, &path, None).await?;
                if self.json {
                    return print_json(&a);
                }
                let rows: Vec<Vec<String>> = a
                    .as_array()
                    .map(|v| v.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|x| {
                        vec![
                            text(&x["request_id"]),
                            text(&x["tool_name"]),
                            text(&x["status"]),
                            text(&x["requested_at"]),
                        ]
                    })
                    .collect();
                print_table(&["REQUEST_ID", "TOOL", "STATUS", "REQUESTED_AT"], &rows)
            }
            Verb::Fork {
                id,
                at_version,
                start,
            } => {
                let mut body = json!({});
                if let Some(v) = at_version {
                    body["at_version"] = v.into();
                }
                if start {
                    body["status"] = "active".into();
                }
                let path = format!("/sessions/{}/fork", seg(&id));
                let s = self.call(Method::POST, &path, Some(&body)).await?;
                self.print_session(&s)
            }
            Verb::Export { id, out } => {
                let res = self
                    .send(
                        self.endpoint
                            .request(Method::GET, &format!("/sessions/{}/export", seg(&id))),
                    )
                    .await?;
                let bytes = res.bytes().await?;
                match out {
                    Some(path) => std::fs::write(&path, &bytes)
                        .map_err(|e| Failure::Local(format!("{}: {e}", path.display()))),
                    None => {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&bytes)?;
                        o.write_all(b"\n")?;
                        Ok(())
                    }
                }
            }
            Verb::Import { file, new_id } => {
                let body = read_input(&file)?;
                let path = if new_id {
                    "/sessions/import?new_id=true"
                } else {
                    "/sessions/import"
                };
                let rb = self
                    .endpoint
                    .request(Method::POST, path)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body);
                let s = json_of(self.send(rb).await?).await?;
                self.print_session(&s)
            }
        }
    }

    async fn patch(&self, id: &str, patch: &Value, if_match: Option<i64>) -> Result<(), Failure> {
        let mut rb = self
            .endpoint
            .request(Method::PATCH, &format!("/sessions/{}", seg(id)))
            .header(header::CONTENT_TYPE, "application/merge-patch+json")
            .body(patch.to_string());
        if let Some(v) = if_match {
            rb = rb.header(header::IF_MATCH, format!("\"{v}\""));
        }
        let s = json_of(self.send(rb).await?).await?;
        self.print_session(&s)
    }

    async fn set_status(&self, a: StatusArgs, status: &str) -> Result<(), Failure> {
        self.patch(&a.id, &json!({"status": status}), a.if_match)
            .await
    }

    /// Follow a stream, reconnecting with `Last-Event-ID` after the last
    /// item seen; ends only on an error answer (or a signal).
    async fn watch(&self, id: &str, from: i64, stream: Stream) -> Result<(), Failure> {
        let path = match stream {
            Stream::Messages => format!("/sessions/{}/messages/stream", seg(id)),
            Stream::Events => {
                // The feed does not say whether the session exists: ask first.
                self.call(Method::GET, &format!("/sessions/{}", seg(id)), None)
                    .await?;
                format!("/events/stream?session_id={}", seg(id))
            }
        };
        let mut last = from;
        let mut connected_once = false;
        let mut delay = Duration::from_millis(250);
        loop {
            let rb = self
                .endpoint
                .request(Method::GET, &path)
                .header(header::ACCEPT, "text/event-stream")
                .header("last-event-id", last.to_string());
            let res = match rb.send().await {
                Ok(r) => r,
                Err(e) if connected_once => {
                    eprintln!("agent-sessions: stream lost ({e}); reconnecting");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !res.status().is_success() {
                return Err(failure(res).await);
            }
            connected_once = true;
            delay = Duration::from_millis(250);
            let mut sse = SseParser::default();
            let mut res = res;
            loop {
                match res.chunk().await {
                    Ok(Some(bytes)) => {
                        for ev in sse.feed(&bytes) {
                            if let Some(seq) = ev.id.as_deref().and_then(|i| i.parse().ok()) {
                                last = seq;
                            }
                            let item = parse_json("a stream event", &ev.data)?;
                            match stream {
                                Stream::Messages => self.print_message(&item)?,
                                Stream::Events => self.print_event(&item)?,
                            }
                        }
                    }
                    Ok(None) => {
                        eprintln!("agent-sessions: the stream ended; reconnecting");
                        break;
                    }
                    Err(e) => {
                        eprintln!("agent-sessions: stream lost ({e}); reconnecting");
                        break;
                    }
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn print_message(&self, m: &Value) -> Result<(), Failure> {
        if self.json {
            return say(&m.to_string());
        }
        say(&format!("{} {}", text(&m["seq"]), m["message"]))
    }

    /// The answer as JSON, or one line for people.
    fn report(&self, answer: &Value, line: impl FnOnce() -> String) -> Result<(), Failure> {
        if self.json {
            print_json(answer)
        } else {
            say(&line())
        }
    }

    fn print_event(&self, e: &Value) -> Result<(), Failure> {
        if self.json {
            return say(&e.to_string());
        }
        say(&format!(
            "{} {} {} {}",
            text(&e["version"]),
            text(&e["event_type"]),
            text(&e["occurred_at"]),
            e["payload"]
        ))
    }

    fn print_session(&self, s: &Value) -> Result<(), Failure> {
        if self.json {
            return print_json(s);
        }
        let fields = [
            ("id", &s["id"]),
            ("status", &s["status"]),
            ("agent_id", &s["agent_id"]),
            ("session_type", &s["session_type"]),
            ("runtime_backend", &s["runtime_backend"]),
            ("worker_state", &s["runtime_metadata"]["worker"]["state"]),
            ("parent_session_id", &s["parent_session_id"]),
            ("version", &s["version"]),
            ("created_at", &s["created_at"]),
            ("updated_at", &s["updated_at"]),
            ("context", &s["context"]),
            ("worker", &s["worker"]),
        ];
        let mut out = String::new();
        for (k, v) in fields {
            if !v.is_null() {
                out.push_str(&format!("{k}: {}\n", text(v)));
            }
        }
        print!("{out}");
        Ok(())
    }
}

async fn json_of(res: reqwest::Response) -> Result<Value, Failure> {
    let bytes = res.bytes().await?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Local(format!("the API's answer is not JSON: {e}")))
}

/// A value for people: strings bare, `-` for nothing, JSON otherwise.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn say(line: &str) -> Result<(), Failure> {
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

fn print_json(v: &Value) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure::Local(e.to_string()))?;
    say(&s)
}

fn print_table(head: &[&str], rows: &[Vec<String>]) -> Result<(), Failure> {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    say(&out)
}

/// One Server-Sent Event.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    id: Option<String>,
    data: String,
}

/// Splits a byte stream into events (comments, `event` and `retry` dropped:
/// each stream here carries one kind of item).
#[derive(Debug, Default)]
struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut done = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.has_data {
                    done.push(std::mem::take(&mut self.current));
                }
                self.current = SseEvent::default();
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.current.id = Some(value.to_owned()),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\nid: 3\nevent: mess").is_empty());
        let evs = p.feed(b"age\ndata: {\"seq\":3}\n\nid: 4\ndata: a\ndata: b\r\n\r\n");
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    id: Some("3".into()),
                    data: "{\"seq\":3}".into()
                },
                SseEvent {
                    id: Some("4".into()),
                    data: "a\nb".into()
                },
            ]
        );
    }
}
