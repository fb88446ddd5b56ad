//! Issue 14: `agent-sessions sessions …`, the real binary against a running
//! service: every verb, tables and `--json`, the exit codes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use agent_sessions::auth::hash_token;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::support::AGENT;
use crate::support::app::{Api, TestApp, id_of};
use crate::support::db::TestDatabase;
use crate::support::serve::ServeProcess;
use crate::support::{SHARED_REDIS, channel_prefix};

const BIN: &str = env!("CARGO_BIN_EXE_agent-sessions");

/// What one run of the command said.
#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        self
    }

    fn fails(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.out, self.err
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out).unwrap_or_else(|e| panic!("{e}: {}", self.out))
    }

    /// The value of a `key: value` line.
    fn field(&self, key: &str) -> String {
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("no {key} in {}", self.out))
            .to_owned()
    }
}

fn command(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("sessions")
        .args(args)
        .env("API_URL", url)
        .env_remove("API_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn cli_with(url: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut c = command(url, args);
    if let Some(t) = token {
        c.env("API_TOKEN", t);
    }
    let o = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("the command ends")
        .expect("the command runs");
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

async fn cli(app: &TestApp, args: &[&str]) -> Run {
    cli_with(&app.url, None, args).await
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cli-test-{}-{name}", uuid::Uuid::new_v4()))
}

#[tokio::test]
async fn every_verb_answers_for_people_and_scripts() {
    let app = TestApp::spawn().await;

    // create from flags, for people
    let made = cli(
        &app,
        &[
            "create",
            "--agent-id",
            AGENT,
            "--type",
            "chat",
            "--context",
            r#"{"step": 1}"#,
        ],
    )
    .await
    .ok();
    let id = made.field("id");
    assert_eq!(made.field("status"), "active");
    assert_eq!(made.field("session_type"), "chat");
    assert_eq!(made.field("context"), r#"{"step":1}"#);

    // create from a file, for scripts
    let body = temp_file("create.json");
    std::fs::write(
        &body,
        json!({"agent_id": AGENT, "session_type": "task"}).to_string(),
    )
    .unwrap();
    let other = cli(
        &app,
        &["--json", "create", "--file", body.to_str().unwrap()],
    )
    .await
    .ok()
    .json();
    let other_id = id_of(&other);
    assert_eq!(other["session_type"], "task");

    // get
    let got = cli(&app, &["get", &id]).await.ok();
    assert_eq!(got.field("version"), "1");
    assert_eq!(
        cli(&app, &["get", &id, "--json"]).await.ok().json()["id"],
        id
    );

    // list: a table, pages followed with --all
    let table = cli(&app, &["list"]).await.ok().out;
    let mut lines = table.lines();
    let head = lines.next().unwrap();
    assert!(
        head.starts_with("ID ") && head.ends_with("UPDATED_AT"),
        "{table}"
    );
    for h in ["STATUS", "TYPE", "WORKER"] {
        assert!(head.contains(h), "{table}");
    }
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with(&id) && r.contains(" chat "))
    );
    let one = cli(&app, &["list", "--limit", "1", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    let all = cli(&app, &["list", "--limit", "1", "--all", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let tasks = cli(&app, &["list", "--type", "task", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    assert_eq!(tasks[0]["id"], other_id);

    // update, with and without a current --if-match
    let upd = cli(
        &app,
        &[
            "update",
            &id,
            "--set",
            r#"{"context": {"step": 2}}"#,
            "--if-match",
            "1",
        ],
    )
    .await
    .ok();
    assert_eq!(upd.field("version"), "2");
    let stale = cli(
        &app,
        &[
            "update",
            &id,
            "--set",
            r#"{"context": {"step": 3}}"#,
            "--if-match",
            "1",
        ],
    )
    .await
    .fails(5);
    assert!(stale.err.contains("412"), "{}", stale.err);

    // pause, resume, complete; a move out of completed is a conflict
    assert_eq!(
        cli(&app, &["pause", &id]).await.ok().field("status"),
        "paused"
    );
    let paused = cli(&app, &["list", "--status", "paused", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(paused.as_array().unwrap().len(), 1);
    assert_eq!(
        cli(&app, &["resume", &id]).await.ok().field("status"),
        "active"
    );

    // send, logs
    let queued = cli(
        &app,
        &["send", &id, "hello there", "--idempotency-key", "k1"],
    )
    .await
    .ok();
    assert!(queued.out.starts_with("queued input "), "{}", queued.out);
    assert!(queued.out.contains("(seq 1)"), "{}", queued.out);
    let again = cli(
        &app,
        &[
            "--json",
            "send",
            &id,
            "hello there",
            "--idempotency-key",
            "k1",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(again["seq"], 1, "the retry answers the first input");
    app.post(
        &format!("/sessions/{id}/messages"),
        &json!([{"type": "assistant", "n": 1}, {"type": "result", "n": 2}]),
    )
    .await
    .expect(200);
    let logs = cli(&app, &["logs", &id]).await.ok().out;
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "{logs}");
    assert!(
        lines[0].starts_with("1 {") && lines[0].contains("\"assistant\""),
        "{logs}"
    );
    assert!(lines[1].starts_with("2 {"), "{logs}");
    let first: Value = serde_json::from_str(
        cli(&app, &["logs", &id, "--json"])
            .await
            .ok()
            .out
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["message"]["n"], 1);

    // approvals and approve
    app.post(
        &format!("/sessions/{id}/approvals"),
        &json!({"request_id": "req-1", "tool_name": "Bash", "input": {"command": "ls"}, "generation": 1}),
    )
    .await
    .expect(201);
    let pending = cli(&app, &["approvals", &id]).await.ok().out;
    assert!(pending.starts_with("REQUEST_ID"), "{pending}");
    assert!(
        pending
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("req-1") && l.contains("Bash") && l.contains("pending")),
        "{pending}"
    );
    let decided = cli(&app, &["approve", &id, "req-1", "allow", "--message", "ok"])
        .await
        .ok();
    assert_eq!(decided.out.trim(), "allowed req-1");
    let twice = cli(&app, &["approve", &id, "req-1", "deny"]).await.fails(5);
    assert!(twice.err.contains("Conflict (409)"), "{}", twice.err);
    assert_eq!(
        cli(&app, &["approvals", &id, "--json"]).await.ok().json(),
        json!([])
    );
    cli(&app, &["approve", &id, "req-unknown", "deny"])
        .await
        .fails(4);

    // fork
    let fork = cli(&app, &["fork", &id, "--at-version", "2", "--start"])
        .await
        .ok();
    assert_eq!(fork.field("status"), "active");
    assert_eq!(fork.field("parent_session_id"), id);
    assert_eq!(fork.field("context"), r#"{"step":2}"#);
    let forks = cli(&app, &["list", "--parent", &id, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(forks.as_array().unwrap().len(), 1);

    // complete; completed is final
    assert_eq!(
        cli(&app, &["complete", &id]).await.ok().field("status"),
        "completed"
    );
    let illegal = cli(&app, &["resume", &id]).await.fails(5);
    assert!(
        illegal.err.contains("Illegal status transition (409)"),
        "{}",
        illegal.err
    );

    // export to a file and to stdout; import: the same id is taken, a new one is not
    let doc = temp_file("export.json");
    cli(&app, &["export", &id, "--out", doc.to_str().unwrap()])
        .await
        .ok();
    let exported: Value = serde_json::from_slice(&std::fs::read(&doc).unwrap()).unwrap();
    assert_eq!(exported["format"], "agent-sessions.export");
    let stdout_doc = cli(&app, &["export", &id]).await.ok().json();
    assert_eq!(stdout_doc["session"]["id"], id);
    let taken = cli(&app, &["import", doc.to_str().unwrap()]).await.fails(5);
    assert!(taken.err.contains("409"), "{}", taken.err);
    let copy = cli(&app, &["import", doc.to_str().unwrap(), "--new-id"])
        .await
        .ok();
    assert_ne!(copy.field("id"), id);
    assert_eq!(copy.field("status"), "completed");

    // delete; then it is not found
    assert_eq!(
        cli(&app, &["delete", &other_id]).await.ok().out.trim(),
        format!("deleted {other_id}")
    );
    let gone = cli(&app, &["get", &other_id]).await.fails(4);
    assert!(gone.err.contains("Not found (404)"), "{}", gone.err);
    cli(&app, &["delete", &other_id]).await.fails(4);

    for f in [body, doc] {
        let _ = std::fs::remove_file(f);
    }
}

#[tokio::test]
async fn errors_exit_with_their_codes() {
    let app = TestApp::spawn().await;
    // A route this server does not have.
    let missing = cli_with(
        &format!("{}/no-such-prefix", app.url),
        None,
        &["get", AGENT],
    )
    .await
    .fails(4);
    assert!(
        missing.err.contains("not available on this server"),
        "{}",
        missing.err
    );
    // The server's validation: a 4xx with the problem's detail.
    let invalid = cli(&app, &["create", "--type", "task"]).await.fails(1);
    assert!(
        invalid.err.contains("(422)") || invalid.err.contains("(400)"),
        "{}",
        invalid.err
    );
    // Local input that is not JSON.
    let bad = cli(&app, &["create", "--agent-id", AGENT, "--context", "{nope"])
        .await
        .fails(1);
    assert!(bad.err.contains("--context is not JSON"), "{}", bad.err);
    // Usage errors are clap's.
    cli(&app, &["approve", AGENT, "r", "maybe"]).await.fails(2);
    // Nobody listening.
    let port = crate::support::free_port();
    let down = cli_with(&format!("http://127.0.0.1:{port}"), None, &["list"])
        .await
        .fails(3);
    assert!(down.err.contains("cannot reach the API"), "{}", down.err);
}

#[tokio::test]
async fn a_missing_or_wrong_token_exits_6() {
    let app = TestApp::spawn_with(|s| {
        s.auth.enabled = true;
        s.auth.tokens_json = json!([
            {"subject": "admin", "sha256": hash_token("cli-token"), "scopes": ["sessions:read", "sessions:write"]},
            {"subject": "reader", "sha256": hash_token("read-token"), "scopes": ["sessions:read"]},
        ])
        .to_string();
    })
    .await;
    let none = cli_with(&app.url, None, &["list"]).await.fails(6);
    assert!(none.err.contains("(401)"), "{}", none.err);
    cli_with(&app.url, Some("wrong"), &["list"]).await.fails(6);
    let made = cli_with(
        &app.url,
        Some("cli-token"),
        &["create", "--agent-id", AGENT],
    )
    .await
    .ok();
    let id = made.field("id");
    // The flag wins over the environment.
    cli_with(
        &app.url,
        Some("wrong"),
        &["--token", "cli-token", "get", &id],
    )
    .await
    .ok();
    let forbidden = cli_with(&app.url, Some("read-token"), &["pause", &id])
        .await
        .fails(6);
    assert!(forbidden.err.contains("(403)"), "{}", forbidden.err);
}

#[tokio::test]
async fn watch_follows_the_message_stream() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    post_marker(&app, &id, 1).await;
    let mut child = command(&app.url, &["watch", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // What was there before it started, then what comes.
    let first = next_line(&mut lines).await;
    assert!(
        first.starts_with("1 ") && first.contains("\"m1\""),
        "{first}"
    );
    post_marker(&app, &id, 2).await;
    let second = next_line(&mut lines).await;
    assert!(
        second.starts_with("2 ") && second.contains("\"m2\""),
        "{second}"
    );
    child.kill().await.unwrap();

    // --from skips what was seen; --json prints the stream's records.
    let mut child = command(&app.url, &["--json", "watch", &id, "--from", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = next_line(&mut lines).await;
    let rec: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(rec["seq"], 2);
    assert_eq!(rec["message"]["marker"], "m2");
    child.kill().await.unwrap();

    // A session that does not exist: not found, at once.
    let gone = cli(&app, &["watch", AGENT]).await.fails(4);
    assert!(gone.err.contains("404"), "{}", gone.err);
}

#[tokio::test]
async fn watch_reconnects_after_the_server_restarts_without_repeating() {
    let db = TestDatabase::migrated().await;
    let mut serve = ServeProcess::start(&db.url, SHARED_REDIS, &channel_prefix()).await;
    let id = id_of(&serve.api.create_default().await);
    post_marker(&serve.api, &id, 1).await;
    let mut child = command(&serve.base(), &["watch", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(next_line(&mut lines).await.contains("\"m1\""));
    serve.sigkill();
    serve.spawn().await;
    post_marker(&serve.api, &id, 2).await;
    // The next line is the new message: the reconnect resumed after seq 1.
    let line = next_line(&mut lines).await;
    assert!(line.starts_with("2 ") && line.contains("\"m2\""), "{line}");
    child.kill().await.unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(err.contains("reconnecting"), "{err}");
}

#[tokio::test]
async fn watch_events_follows_the_session_on_the_feed() {
    let app = TestApp::spawn().await;
    let id = id_of(&app.create_default().await);
    let _other = app.create_default().await;
    let mut child = command(&app.url, &["watch", &id, "--events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let created = next_line(&mut lines).await;
    assert!(created.starts_with("1 session.created "), "{created}");
    app.patch(&id, &json!({"status": "paused"}))
        .await
        .expect(200);
    let paused = next_line(&mut lines).await;
    assert!(paused.starts_with("2 session."), "{paused}");
    assert!(paused.contains("paused"), "{paused}");
    child.kill().await.unwrap();
    cli(&app, &["watch", AGENT, "--events"]).await.fails(4);
}

async fn post_marker(app: &Api, id: &str, n: u32) {
    app.post(
        &format!("/sessions/{id}/messages"),
        &json!([{"type": "assistant", "marker": format!("m{n}")}]),
    )
    .await
    .expect(200);
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("watch still running")
}

/// The bash completion script completes the `sessions` verbs and their flags:
/// loaded into a real bash, asked as a shell would ask at `<TAB>`.
#[tokio::test]
async fn bash_completion_offers_the_verbs_and_flags() {
    let out = std::process::Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .expect("run completions");
    assert!(out.status.success());
    let script = temp_file("completion.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &str| {
        let cword = words.split(' ').count() - 1;
        let probe = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _agent__sessions agent-sessions \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &probe])
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let verbs = complete("agent-sessions sessions c");
    let verbs: Vec<&str> = verbs.lines().collect();
    assert!(
        ["create", "complete"].iter().all(|v| verbs.contains(v)),
        "{verbs:?}"
    );
    assert!(!verbs.contains(&"list"), "{verbs:?}");
    let flags = complete("agent-sessions sessions list --st");
    assert!(flags.lines().any(|f| f == "--status"), "{flags}");
}
