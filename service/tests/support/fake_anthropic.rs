//! A fake Anthropic Messages API on loopback, for driving the real Claude
//! Code CLI in tests. `POST /v1/messages` answers as a streaming reply
//! (message_start, content_block_start, content_block_delta…,
//! content_block_stop, message_delta, message_stop) and records every request.
//!
//! The last user message picks the behaviour, so a resumed conversation
//! (whose last message is the resume prompt) gets a normal reply:
//! - contains `[api_error]`: 400 `invalid_request_error` (not retried by the CLI);
//! - contains `[slow:N]`: a first text block ([`FIRST_PART`]) at once, then a
//!   second one streamed in small deltas for N seconds;
//! - contains `[tool:COMMAND]`: a `tool_use` block asking to run COMMAND with
//!   the Bash tool; the request that carries its `tool_result` back gets a
//!   short text naming the result ([`TOOL_SAID`]);
//! - anything else: a short reply at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::{Value, json};

use super::loopback::LoopbackServer;

pub const REPLY: &str = "Hello from the fake model.";
/// A slow reply's first content block, complete at once: the CLI prints it
/// as an assistant line, so a test can tell the worker is mid-answer.
pub const FIRST_PART: &str = "First part, complete.";
/// The start of the reply to a tool result.
pub const TOOL_SAID: &str = "The tool said:";

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// `X-Claude-Code-Session-Id`, the CLI's session id.
    pub session: Option<String>,
    pub body: Value,
}

impl Recorded {
    /// (role, text) of every message, text blocks joined.
    pub fn conversation(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_owned(),
                            text_of(&m["content"]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every tool result the last user message carries (the CLI merges
    /// messages, so one may hold earlier results and new text too), in
    /// order: (tool_use_id, text, is_error).
    pub fn tool_results(&self) -> Vec<(String, String, bool)> {
        let Some(last) = self.body["messages"].as_array().and_then(|ms| ms.last()) else {
            return Vec::new();
        };
        if last["role"] != "user" {
            return Vec::new();
        }
        last["content"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .filter(|b| b["type"] == "tool_result")
                    .map(|b| {
                        let text = match &b["content"] {
                            Value::String(s) => s.clone(),
                            other => text_of(other),
                        };
                        (
                            b["tool_use_id"].as_str().unwrap_or_default().to_owned(),
                            text,
                            b["is_error"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The last tool result the request carries: (text, is_error).
    pub fn tool_result(&self) -> Option<(String, bool)> {
        self.tool_results().pop().map(|(_, t, e)| (t, e))
    }

    /// The last text block of the last user message: what the user just said
    /// (the CLI merges a resume prompt into the previous user message when
    /// the answer in between was an API error it does not send back).
    pub fn last_user_text(&self) -> String {
        let Some(last) = self.body["messages"]
            .as_array()
            .and_then(|ms| ms.iter().rev().find(|m| m["role"] == "user"))
        else {
            return String::new();
        };
        match &last["content"] {
            Value::String(s) => s.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .rev()
                .find_map(|b| b["text"].as_str())
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        }
    }
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

pub struct FakeAnthropic {
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    server: LoopbackServer,
}

fn sse(event: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

async fn messages(
    req: HttpRequest,
    body: web::Bytes,
    log: web::Data<Arc<Mutex<Vec<Recorded>>>>,
) -> HttpResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rec = Recorded {
        path: req.uri().to_string(),
        session: req
            .headers()
            .get("x-claude-code-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.clone(),
    };
    let last = rec.last_user_text();
    // Debugging aid: FAKE_ANTHROPIC_DUMP=<file> appends every request body.
    if let Ok(path) = std::env::var("FAKE_ANTHROPIC_DUMP") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{}", rec.body);
        }
    }
    log.lock().unwrap().push(rec);
    if !req.path().starts_with("/v1/messages") || req.path().contains("count_tokens") {
        return HttpResponse::NotFound().finish();
    }
    if last.contains("[api_error]") {
        return HttpResponse::BadRequest().json(json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "fake failure for the test"}
        }));
    }
    let model = body["model"].as_str().unwrap_or("claude-fake").to_owned();
    // A result for a tool call not answered yet: the model answers it.
    let fresh = rec_tool_results(&body)
        .into_iter()
        .rfind(|(id, _, _)| ANSWERED.lock().unwrap().insert(id.clone()));
    if let Some((_, text, is_error)) = fresh {
        return reply_now(&model, &format!("{TOOL_SAID} {text} (error: {is_error})"));
    }
    if let Some(command) = last
        .split("[tool:")
        .nth(1)
        .and_then(|r| r.split(']').next())
    {
        return tool_use(&model, command);
    }
    let slow_secs: u64 = last
        .split("[slow:")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut events = vec![
        sse(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 21, "output_tokens": 1}}}),
        ),
        sse(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let delta = |index: u32, t: &str| {
        sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}),
        )
    };
    let block = |kind: &str, index: u32| {
        let mut v = json!({"type": kind, "index": index});
        if kind == "content_block_start" {
            v["content_block"] = json!({"type": "text", "text": ""});
        }
        sse(kind, v)
    };
    let ticks = slow_secs * 4;
    let last_block = u32::from(ticks > 0);
    let tail = vec![
        block("content_block_stop", last_block),
        sse(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": 9}}),
        ),
        sse("message_stop", json!({"type": "message_stop"})),
    ];
    if ticks == 0 {
        events.push(delta(0, REPLY));
        events.extend(tail);
        let body: Vec<u8> = events.concat();
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .body(body);
    }
    // Slow: the first block and the head of the second at once, then a
    // delta every 250 ms, then the tail.
    events.push(delta(0, FIRST_PART));
    events.push(block("content_block_stop", 0));
    events.push(block("content_block_start", 1));
    let stream = futures_util::stream::unfold(
        (0u64, Some(events), Some(tail)),
        move |(i, head, tail)| async move {
            if let Some(h) = head {
                return Some((
                    Ok::<_, actix_web::Error>(Bytes::from(h.concat())),
                    (i, None, tail),
                ));
            }
            if i < ticks {
                tokio::time::sleep(Duration::from_millis(250)).await;
                return Some((Ok(delta(1, &format!("part {i}. "))), (i + 1, None, tail)));
            }
            let t = tail?;
            Some((Ok(Bytes::from(t.concat())), (i, None, None)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

/// Tool calls whose results the fake has answered (ids are unique).
static ANSWERED: std::sync::LazyLock<Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Mutex::default);

fn rec_tool_results(body: &Value) -> Vec<(String, String, bool)> {
    Recorded {
        path: String::new(),
        session: None,
        body: body.clone(),
    }
    .tool_results()
}

fn message_start(model: &str) -> Bytes {
    sse(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": 21, "output_tokens": 1}}}),
    )
}

fn message_end(stop_reason: &str) -> [Bytes; 2] {
    [
        sse(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": 9}}),
        ),
        sse("message_stop", json!({"type": "message_stop"})),
    ]
}

/// A short text reply, all at once.
fn reply_now(model: &str, text: &str) -> HttpResponse {
    let mut events = vec![
        message_start(model),
        sse(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ),
        sse(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    ];
    events.extend(message_end("end_turn"));
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .body(events.concat())
}

/// A reply asking to run `command` with the Bash tool.
fn tool_use(model: &str, command: &str) -> HttpResponse {
    let input = json!({"command": command, "description": "run what the test asked"});
    let mut events = vec![
        message_start(model),
        sse(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block":
                {"type": "tool_use", "id": format!("toolu_{}", uuid::Uuid::new_v4().simple()),
                 "name": "Bash", "input": {}}}),
        ),
        sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta":
                {"type": "input_json_delta", "partial_json": input.to_string()}}),
        ),
        sse(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    ];
    events.extend(message_end("tool_use"));
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .body(events.concat())
}

impl FakeAnthropic {
    pub async fn start() -> Self {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let server = LoopbackServer::start("the fake Anthropic API", requests.clone(), messages);
        Self {
            url: server.url.clone(),
            requests,
            server,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests whose conversation starts with a user message containing `marker`.
    pub fn requests_for(&self, marker: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.conversation()
                    .first()
                    .is_some_and(|(_, t)| t.contains(marker))
            })
            .collect()
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}
