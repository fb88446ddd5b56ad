//! One worker's conversation, the same on both backends: the backend's
//! supervisor feeds the worker's stdout lines in and hands over a writer to
//! its stdin; the driver writes the first message and then the session's
//! inputs in order, tells the API what the worker does (its state, the
//! inputs it took, what it spent, the tool approvals it asks for), posts
//! the lines as the session's messages, and lets the controller know when
//! the worker goes idle.
//!
//! Inputs are delivered at least once to the process and exactly once to
//! the model: each carries its own id as the stream-json `uuid`, the CLI
//! drops a second copy, and an input counts as taken only when the CLI says
//! it started it (or answered it, for an interrupt). The session records
//! the last input taken (`worker.input_seq`), so a restarted runner, or the
//! next worker, starts after it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::api::{ApiClient, ApiError};
use super::backend::Wake;
use super::claude::RunSummary;
use super::cost::{Prices, Spend};
use super::poster::Poster;
use super::protocol::{self, Heard};
use super::workers::lock;
use crate::contract::live::{
    ApprovalAnswer, ApprovalRequest, ApprovalStatus, DecisionReason, DecisionRequest, Input,
    InputKind,
};
use crate::contract::{ApprovalDecision, WorkerMode, WorkerPatch, WorkerRecord, WorkerState};

/// The stdin of a worker, wherever it runs.
pub type Stdin = Box<dyn AsyncWrite + Send + Unpin>;

/// Longest a write to a worker's stdin may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The message a worker starts with, written before any input. Its id is
/// fixed by the session and generation, so writing it again after a
/// runner restart is dropped by the CLI like any repeated input.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FirstMessage {
    pub id: Uuid,
    pub text: String,
}

impl FirstMessage {
    pub fn new(session_id: Uuid, generation: u64, text: String) -> Self {
        Self {
            id: first_message_id(session_id, generation),
            text,
        }
    }
}

/// A stable id for generation `generation`'s first message.
pub fn first_message_id(session_id: Uuid, generation: u64) -> Uuid {
    let mut b = *session_id.as_bytes();
    for (i, g) in generation.to_be_bytes().iter().enumerate() {
        b[8 + i] ^= g;
    }
    b[0] ^= 0x5a;
    b[6] = (b[6] & 0x0f) | 0x80; // version 8: custom
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    Uuid::from_bytes(b)
}

/// What the controller tells a live worker's driver (from the session, on
/// every reconcile).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    pub mode: WorkerMode,
    pub approval_timeout: Option<Duration>,
    pub approval_default: ApprovalDecision,
    /// The last input taken, as the session records it.
    pub input_seq: i64,
}

/// What the worker is doing, for the controller's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Starting, or in a turn.
    Busy,
    /// Waiting for a tool approval.
    AwaitingApproval,
    /// Between turns with nothing written that it has not taken; `ok` when
    /// the last turn succeeded.
    Idle { since: Instant, ok: bool },
}

/// Shared between a worker's driver and the controller.
pub struct Live {
    activity: Mutex<Activity>,
    config: Mutex<Option<LiveConfig>>,
    nudge: Notify,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            activity: Mutex::new(Activity::Busy),
            config: Mutex::new(None),
            nudge: Notify::new(),
        }
    }
}

impl Live {
    pub fn activity(&self) -> Activity {
        *lock(&self.activity)
    }

    /// The controller's latest view; wakes the driver to deliver inputs.
    pub fn nudge(&self, config: LiveConfig) {
        *lock(&self.config) = Some(config);
        self.nudge.notify_one();
    }

    pub async fn nudged(&self) {
        self.nudge.notified().await;
    }
}

/// Everything a driver needs that does not change while the worker runs.
pub struct Setup {
    pub api: ApiClient,
    pub session_id: Uuid,
    pub generation: u64,
    pub first: Option<FirstMessage>,
    /// What earlier workers of the session spent.
    pub before: Spend,
    pub prices: Arc<Prices>,
    pub message_batch: usize,
    pub wake: Wake,
    pub live: Arc<Live>,
    /// Output before this mark was posted by an earlier runner.
    pub posted_from: u64,
}

pub struct Driver {
    s: Setup,
    stdin: Option<Stdin>,
    poster: Poster,
    pub summary: RunSummary,
    spend: Spend,
    /// Message ids the worker took, and control requests it answered.
    taken: HashSet<Uuid>,
    answered: HashSet<String>,
    /// Input seqs written to this process, and the first message.
    written: BTreeSet<i64>,
    first_written: bool,
    /// Written messages (by id) the worker has not started yet.
    unstarted: HashSet<Uuid>,
    /// Inputs by id, for the ones written.
    seq_of: HashMap<Uuid, i64>,
    /// The last input taken, contiguous from the session's record.
    input_seq: i64,
    /// Pending approvals: request id → when asked.
    approvals: HashMap<String, Instant>,
    /// Approvals whose default the driver applied, awaiting their answer.
    defaulted: HashSet<String>,
    in_turn: bool,
    last_turn_ok: bool,
    /// The state last reported, and what it was reported with.
    reported: Option<(WorkerState, i64, u64)>,
    /// A report or delivery failed: try again on the next tick.
    retry: bool,
}

impl Driver {
    pub fn new(s: Setup) -> Self {
        let poster = Poster::new(s.api.clone(), s.session_id, s.message_batch);
        let first_written = s.first.is_none();
        Self {
            s,
            stdin: None,
            poster,
            summary: RunSummary::default(),
            spend: Spend::default(),
            taken: HashSet::new(),
            answered: HashSet::new(),
            written: BTreeSet::new(),
            first_written,
            unstarted: HashSet::new(),
            seq_of: HashMap::new(),
            input_seq: 0,
            approvals: HashMap::new(),
            defaulted: HashSet::new(),
            in_turn: true,
            last_turn_ok: false,
            reported: None,
            retry: false,
        }
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.s.live
    }

    /// The worker's stdin is there (again): write what it has not taken.
    pub async fn attach(&mut self, stdin: Stdin) {
        self.stdin = Some(stdin);
        self.written.clear();
        self.first_written = self.s.first.is_none();
        self.unstarted.clear();
        let init = protocol::control_request(&format!("init-{}", self.s.generation), "initialize");
        if self.write(init).await {
            self.sync().await;
        }
    }

    pub fn has_stdin(&self) -> bool {
        self.stdin.is_some()
    }

    /// One stdout line; `end` is where it ends in the worker's output.
    pub async fn hear(&mut self, line: Value, end: u64) {
        self.summary.observe(&line);
        match protocol::hear(&line) {
            Heard::Taken(id) => {
                self.taken.insert(id);
                self.unstarted.remove(&id);
                self.in_turn = true;
            }
            Heard::Queued(_) | Heard::Other => {}
            Heard::TurnStarted => self.in_turn = true,
            Heard::TurnEnded { ok } => {
                self.in_turn = false;
                self.last_turn_ok = ok;
                let model = self.summary.model.clone();
                self.spend
                    .add_result(&line, model.as_deref(), &self.s.prices);
            }
            Heard::Permission(t) => {
                if !self.approvals.contains_key(&t.request_id) {
                    self.approvals.insert(t.request_id.clone(), Instant::now());
                    self.ask(t).await;
                }
            }
            Heard::ControlAnswered { request_id } => {
                self.answered.insert(request_id);
            }
        }
        if end > self.s.posted_from {
            self.poster.push(line, end);
        }
    }

    /// After a batch of lines: post them, deliver, report.
    pub async fn settle(&mut self) -> Option<u64> {
        self.poster.flush(false).await;
        self.advance();
        self.report().await;
        self.poster.take_progress()
    }

    /// Report a tool approval the worker asks for.
    async fn ask(&mut self, t: protocol::ToolRequest) {
        let req = ApprovalRequest {
            request_id: t.request_id.clone(),
            tool_name: t.tool_name.clone(),
            input: t.input,
            generation: self.s.generation,
            tool_use_id: t.tool_use_id,
        };
        info!(request_id = %t.request_id, tool = %t.tool_name, "the worker asks to use a tool");
        match self.s.api.request_approval(self.s.session_id, &req).await {
            // Decided already (this is an earlier runner's output read
            // again): its answer is in the input queue, taken or to come.
            Ok(a) if a.status != ApprovalStatus::Pending => {
                self.approvals.remove(&t.request_id);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot record the approval request; will retry");
                self.approvals.remove(&t.request_id);
                self.retry = true;
            }
        }
    }

    /// Fetch the inputs after the last one taken and write those this
    /// process has not had yet, in order.
    pub async fn sync(&mut self) {
        let config = lock(&self.s.live.config).clone();
        if let Some(c) = &config {
            self.input_seq = self.input_seq.max(c.input_seq);
        }
        if self.stdin.is_none() {
            return;
        }
        if !self.first_written
            && let Some(first) = self.s.first.clone()
        {
            if self.taken.contains(&first.id) {
                self.first_written = true;
            } else {
                let line = protocol::user_message(self.s.session_id, first.id, &first.text);
                if !self.write(line).await {
                    return;
                }
                self.first_written = true;
                self.unstarted.insert(first.id);
            }
        }
        let inputs = match self.s.api.inputs(self.s.session_id, self.input_seq).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "cannot read the session's inputs; will retry");
                self.retry = true;
                return;
            }
        };
        for input in inputs {
            if self.written.contains(&input.seq) {
                continue;
            }
            self.seq_of.insert(input.id, input.seq);
            if self.was_taken(&input) {
                self.written.insert(input.seq);
                continue;
            }
            let Some(line) = self.line_for(&input) else {
                warn!(seq = input.seq, "an input the worker cannot take; skipped");
                self.written.insert(input.seq);
                self.taken.insert(input.id);
                continue;
            };
            if !self.write(line).await {
                return;
            }
            debug!(seq = input.seq, kind = input.kind.as_str(), "input written");
            self.written.insert(input.seq);
            match input.kind {
                InputKind::Message => {
                    self.unstarted.insert(input.id);
                }
                InputKind::Approval => {
                    // No acknowledgement comes for an answer: written is taken.
                    self.taken.insert(input.id);
                    if let Ok(a) = serde_json::from_value::<ApprovalAnswer>(input.body.clone()) {
                        self.approvals.remove(&a.request_id);
                        self.defaulted.remove(&a.request_id);
                    }
                }
                InputKind::Interrupt => {}
            }
        }
        self.advance();
        self.report().await;
    }

    fn was_taken(&self, input: &Input) -> bool {
        self.taken.contains(&input.id) || self.answered.contains(&input.id.to_string())
    }

    fn line_for(&self, input: &Input) -> Option<String> {
        match input.kind {
            InputKind::Message => {
                let text = input.body.get("text")?.as_str()?;
                Some(protocol::user_message(self.s.session_id, input.id, text))
            }
            InputKind::Interrupt => Some(protocol::control_request(
                &input.id.to_string(),
                "interrupt",
            )),
            InputKind::Approval => {
                let answer: ApprovalAnswer = serde_json::from_value(input.body.clone()).ok()?;
                Some(protocol::permission_answer(&answer, &input.actor))
            }
        }
    }

    async fn write(&mut self, line: String) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        let done = tokio::time::timeout(WRITE_TIMEOUT, async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        })
        .await;
        match done {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot write to the worker's stdin");
                self.stdin = None;
                false
            }
            Err(_) => {
                warn!("the worker's stdin did not take a line in time");
                self.stdin = None;
                false
            }
        }
    }

    /// Move `input_seq` over every input taken since, in order.
    fn advance(&mut self) {
        let mut by_seq: Vec<(i64, Uuid)> = self.seq_of.iter().map(|(id, s)| (*s, *id)).collect();
        by_seq.sort_unstable();
        for (seq, id) in by_seq {
            if seq <= self.input_seq {
                continue;
            }
            if seq != self.input_seq + 1 {
                break;
            }
            if self.taken.contains(&id) || self.answered.contains(&id.to_string()) {
                self.input_seq = seq;
            } else {
                break;
            }
        }
    }

    fn activity_now(&self) -> Activity {
        if !self.approvals.is_empty() {
            Activity::AwaitingApproval
        } else if self.in_turn || !self.unstarted.is_empty() || !self.first_written {
            Activity::Busy
        } else {
            match *lock(&self.s.live.activity) {
                idle @ Activity::Idle { .. } => idle,
                _ => Activity::Idle {
                    since: Instant::now(),
                    ok: self.last_turn_ok,
                },
            }
        }
    }

    /// The state as the session should show it; reported on a change.
    async fn report(&mut self) {
        let activity = self.activity_now();
        let changed = {
            let mut a = lock(&self.s.live.activity);
            let changed = std::mem::discriminant(&*a) != std::mem::discriminant(&activity);
            *a = activity;
            changed
        };
        let state = match activity {
            Activity::Busy => WorkerState::Running,
            Activity::AwaitingApproval => WorkerState::AwaitingApproval,
            Activity::Idle { .. } => WorkerState::Idle,
        };
        let now = (state, self.input_seq, self.spend.turns);
        if self.reported == Some(now) && !self.retry {
            if changed {
                let _ = self.s.wake.send(self.s.session_id);
            }
            return;
        }
        let total = self.totals();
        let patch = WorkerPatch::new(WorkerRecord {
            state: Some(state),
            input_seq: Some(self.input_seq),
            turns: Some(total.turns),
            input_tokens: Some(total.input_tokens),
            output_tokens: Some(total.output_tokens),
            cost_micro_usd: Some(total.cost_micro_usd),
            cost_usd: Some(total.cost_usd()),
            ..WorkerRecord::default()
        });
        match self
            .s
            .api
            .patch_worker(self.s.session_id, &patch, None)
            .await
        {
            Ok(_) => {
                self.reported = Some(now);
                self.retry = false;
            }
            Err(ApiError::NotFound) => self.reported = Some(now),
            Err(e) => {
                warn!(error = %e, "cannot report the worker's state; will retry");
                self.retry = true;
            }
        }
        // After the report, so the controller reads the session with it.
        if changed {
            let _ = self.s.wake.send(self.s.session_id);
        }
    }

    /// The last input the worker took, contiguous from the session's record.
    pub fn input_seq(&self) -> i64 {
        self.input_seq
    }

    /// Everything spent by the session's workers, this one included.
    pub fn totals(&self) -> Spend {
        self.spend.plus(self.s.before)
    }

    /// When `tick` has something to do next.
    pub fn next_due(&self) -> Option<Instant> {
        let mut due = self.poster.due_at();
        if self.retry {
            let soon = Instant::now() + Duration::from_secs(1);
            due = Some(due.map_or(soon, |d| d.min(soon)));
        }
        if let Some(timeout) = lock(&self.s.live.config)
            .as_ref()
            .and_then(|c| c.approval_timeout)
            && let Some(oldest) = self
                .approvals
                .iter()
                .filter(|(id, _)| !self.defaulted.contains(*id))
                .map(|(_, at)| at)
                .min()
        {
            let at = *oldest + timeout;
            due = Some(due.map_or(at, |d| d.min(at)));
        }
        due
    }

    /// Timers: retries, and approvals nobody answered in time.
    pub async fn tick(&mut self) -> Option<u64> {
        let config = lock(&self.s.live.config).clone();
        if let Some(c) = config
            && let Some(timeout) = c.approval_timeout
        {
            let expired: Vec<String> = self
                .approvals
                .iter()
                .filter(|(id, at)| !self.defaulted.contains(*id) && at.elapsed() >= timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                info!(request_id = %id, decision = ?c.approval_default, "approval timed out; applying the default");
                let d = DecisionRequest {
                    decision: c.approval_default,
                    message: Some(format!(
                        "no decision within {} s: {}",
                        timeout.as_secs(),
                        match c.approval_default {
                            ApprovalDecision::Allow => "allowed by default",
                            ApprovalDecision::Deny => "denied by default",
                        }
                    )),
                    updated_input: None,
                    reason: Some(DecisionReason::Timeout),
                };
                match self.s.api.decide(self.s.session_id, &id, &d).await {
                    // Decided (by us or a person first): the answer comes as an input.
                    Ok(()) | Err(ApiError::Conflict(_)) | Err(ApiError::NotFound) => {
                        self.defaulted.insert(id);
                    }
                    Err(e) => warn!(error = %e, "cannot apply the approval default; will retry"),
                }
            }
            self.sync().await;
        }
        if self.retry {
            self.sync().await;
        }
        self.settle().await
    }

    /// The worker ended: post the rest of its lines.
    pub async fn finish(&mut self) -> Option<u64> {
        self.poster.finish().await;
        self.poster.take_progress()
    }
}
