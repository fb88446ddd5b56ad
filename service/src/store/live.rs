//! Live sessions in the store: the input queue (`session_inputs`) and tool
//! approvals (`session_approvals`).
//!
//! Each write is one statement in the shape of `sessions.rs`: announce the
//! writer, move the session on by one version (guarded by the version it
//! was planned against), write the input or approval row and append the one
//! event, all reading from the version update, so nothing is written unless
//! everything is. An input's `seq` is taken in the statement as one past the
//! session's last; two inputs cannot take the same one, since both would have
//! to move the session from the same version.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value as Param};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow};
use super::sessions::{Appended, Attempt, IdempotencyRequest};
use super::{Store, StoreError};
use crate::contract::ApprovalDecision;
use crate::contract::format_time;
use crate::contract::live::{
    Approval, ApprovalAnswer, ApprovalDecidedPayload, ApprovalRequest, ApprovalStatus,
    DecisionReason, DecisionRequest, Input, InputKind, InputReceivedPayload, InterruptedPayload,
};
use crate::domain::event;
use crate::domain::{EventKind, EventMetadata, SessionState, SessionStatus};

/// What a client queues for the worker.
#[derive(Debug, Clone, PartialEq)]
pub enum NewInput {
    Message { text: String },
    Interrupt,
}

/// An input as accepted, with the session's version after its event.
#[derive(Debug, Clone)]
pub struct InputWritten {
    pub input: Input,
    pub version: i64,
    /// True when an earlier request with the same idempotency key queued it.
    pub replayed: bool,
    /// `None` when replayed.
    pub appended: Option<Appended>,
}

/// An approval after a write, and the event that write appended (`None`
/// when it was already there).
#[derive(Debug, Clone)]
pub struct ApprovalWritten {
    pub approval: Approval,
    pub appended: Option<Appended>,
}

pub(crate) const INPUT_COLUMNS: &str = "seq, id, kind, body, actor, version, created_at";
pub(crate) const APPROVAL_COLUMNS: &str = "request_id, tool_name, input, generation, tool_use_id, status, \
     requested_at, decided_at, decided_by, message, updated_input, reason";

/// The next `seq` of session `$1`'s inputs.
const NEXT_SEQ: &str =
    "coalesce((SELECT max(seq) FROM session_inputs WHERE session_id = $1), 0) + 1";

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn json_param<T: Serialize>(v: &T) -> Result<Param, StoreError> {
    serde_json::to_value(v)
        .map(|v| Param::Json(Some(Box::new(v))))
        .map_err(|e| corrupt(format!("value does not serialise: {e}")))
}

fn object(v: Option<Value>, col: &str) -> Result<Option<Map<String, Value>>, StoreError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(corrupt(format!("{col} is not an object: {other}"))),
    }
}

pub(crate) fn input_row(r: &QueryResult) -> Result<(Input, i64), StoreError> {
    let kind: String = r.try_get("", "kind")?;
    let created_at: DateTime<Utc> = r.try_get("", "created_at")?;
    Ok((
        Input {
            seq: r.try_get("", "seq")?,
            id: r.try_get("", "id")?,
            kind: InputKind::parse(&kind).ok_or_else(|| corrupt(&kind))?,
            body: r.try_get("", "body")?,
            actor: r.try_get("", "actor")?,
            created_at: format_time(&created_at),
        },
        r.try_get("", "version")?,
    ))
}

pub(crate) fn approval_row(r: &QueryResult) -> Result<Approval, StoreError> {
    let status: String = r.try_get("", "status")?;
    let reason: Option<String> = r.try_get("", "reason")?;
    let generation: i64 = r.try_get("", "generation")?;
    Ok(Approval {
        request_id: r.try_get("", "request_id")?,
        tool_name: r.try_get("", "tool_name")?,
        input: object(r.try_get("", "input")?, "input")?.unwrap_or_default(),
        generation: u64::try_from(generation).map_err(corrupt)?,
        tool_use_id: r.try_get("", "tool_use_id")?,
        status: ApprovalStatus::parse(&status).ok_or_else(|| corrupt(&status))?,
        requested_at: format_time(&r.try_get::<DateTime<Utc>>("", "requested_at")?),
        decided_at: r
            .try_get::<Option<DateTime<Utc>>>("", "decided_at")?
            .map(|t| format_time(&t)),
        decided_by: r.try_get("", "decided_by")?,
        message: r.try_get("", "message")?,
        updated_input: object(r.try_get("", "updated_input")?, "updated_input")?,
        reason: reason
            .map(|r| serde_json::from_value::<DecisionReason>(Value::String(r)))
            .transpose()
            .map_err(corrupt)?,
    })
}

/// What keeps a live write from happening.
enum Guard<'a> {
    /// Only the version: `u` updates the session if it is still at `$2`
    /// and this further condition (may be empty) holds.
    Where(&'a str),
    /// A CTE `g` that locks the rows the write depends on (the session at
    /// `$2` among them) and yields one row when the write may go ahead.
    Lock(&'a str),
}

/// The statement of a live write: `u` moves session `$1` from version `$2`
/// when `guard` allows, `rows` are CTEs reading from `u` that write the
/// input or approval, and one event of `kind` with event id `$3`, metadata
/// `$4` and payload expression `payload` is appended.
fn live_statement(
    kind: EventKind,
    guard: Guard,
    rows: &str,
    payload: &str,
    select: &str,
) -> String {
    let event = EventRow {
        source: "u",
        kind,
        aggregate_id: "$1",
        version: "$2 + 1",
        event_id: "$3",
        payload,
        metadata: "$4",
        occurred_at: "u.updated_at",
    }
    .cte();
    let (g, from, condition) = match guard {
        Guard::Where(c) => (String::new(), "announce", c),
        Guard::Lock(g) => (format!("{g}, "), "g", ""),
    };
    format!(
        "WITH {ANNOUNCE}, {g}\
         u AS (UPDATE sessions SET version = $2 + 1, updated_at = now() FROM {from} \
               WHERE id = $1 AND version = $2{condition} RETURNING updated_at), \
         {rows}, {event} \
         SELECT {select} FROM u, e"
    )
}

/// The session after a live event: one version on, touched at `at`.
pub(crate) fn moved_on(current: &SessionState, at: DateTime<Utc>) -> SessionState {
    let mut next = current.clone();
    next.version += 1;
    next.updated_at = at;
    next
}

impl Store {
    fn stmt(sql: &str, values: Vec<Param>) -> Statement {
        Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
    }

    /// Queue a message or an interrupt. A message is refused (409) once the
    /// session is completed, an interrupt unless it is active. With an
    /// idempotency key, a retry answers the input queued first.
    #[instrument(skip(self, input, meta, idem), fields(session_id = %id))]
    pub async fn append_input(
        &self,
        id: Uuid,
        input: &NewInput,
        meta: &EventMetadata,
        idem: Option<&IdempotencyRequest>,
    ) -> Result<InputWritten, StoreError> {
        if let Some(k) = idem
            && let Some(replay) = self.input_by_key(id, k).await?
        {
            return Ok(replay);
        }
        let (kind, event_kind, body) = match input {
            NewInput::Message { text } => (
                InputKind::Message,
                EventKind::InputReceived,
                json!({ "text": text }),
            ),
            NewInput::Interrupt => (InputKind::Interrupt, EventKind::Interrupted, json!({})),
        };
        let (key_guard, key_cte) = match idem {
            Some(_) => (
                " AND NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = $10)",
                ", k AS (INSERT INTO idempotency_keys (key, request_hash, session_id, input_id) \
                        SELECT $10, $11, $1, $5 FROM u)",
            ),
            None => ("", ""),
        };
        let rows = format!(
            "i AS (INSERT INTO session_inputs (session_id, seq, id, kind, body, actor, version, created_at) \
                   SELECT $1, {NEXT_SEQ}, $5, $6, $7, $8, $2 + 1, u.updated_at FROM u RETURNING seq){key_cte}"
        );
        // The payload's `seq` is the one the statement takes.
        let sql = live_statement(
            event_kind,
            Guard::Where(key_guard),
            &rows,
            "(SELECT $9::jsonb || jsonb_build_object('seq', i.seq) FROM i)",
            "u.updated_at, (SELECT seq FROM i) AS seq",
        );
        self.on_version(id, None, async |current| {
            match (kind, current.status) {
                (InputKind::Message, SessionStatus::Completed) => {
                    return Err(StoreError::Refused(format!(
                        "session {id} is completed; it takes no more input"
                    )));
                }
                (InputKind::Interrupt, s) if s != SessionStatus::Active => {
                    return Err(StoreError::Refused(format!(
                        "session {id} is {}; only an active session can be interrupted",
                        s.as_str()
                    )));
                }
                _ => {}
            }
            let input_id = Uuid::new_v4();
            let payload = |seq: i64| {
                match input {
                    NewInput::Message { text } => serde_json::to_value(InputReceivedPayload {
                        seq,
                        input_id,
                        kind,
                        text: text.clone(),
                    }),
                    NewInput::Interrupt => {
                        serde_json::to_value(InterruptedPayload { seq, input_id })
                    }
                }
                .map_err(corrupt)
            };
            let mut values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                event::new_event_id().into(),
                json_param(meta)?,
                input_id.into(),
                kind.as_str().into(),
                json_param(&body)?,
                meta.actor.clone().into(),
                json_param(&payload(0)?)?,
            ];
            if let Some(k) = idem {
                values.push(k.key.clone().into());
                values.push(k.request_hash.clone().into());
            }
            let Some(row) = self.db.query_one_raw(Self::stmt(&sql, values)).await? else {
                // A twin with the same key may have won.
                if let Some(k) = idem
                    && let Some(replay) = self.input_by_key(id, k).await?
                {
                    return Ok(Attempt::Done(replay));
                }
                return Ok(Attempt::LostRace);
            };
            let at: DateTime<Utc> = row.try_get("", "updated_at")?;
            let seq: i64 = row.try_get("", "seq")?;
            let next = moved_on(&current, at);
            let appended = Appended::new(&next, event_kind, &payload(seq)?);
            Ok(Attempt::Done(InputWritten {
                input: Input {
                    seq,
                    id: input_id,
                    kind,
                    body: body.clone(),
                    actor: meta.actor.clone(),
                    created_at: format_time(&at),
                },
                version: next.version,
                replayed: false,
                appended: Some(appended),
            }))
        })
        .await
    }

    /// The input an idempotency key queued, if it did (422 when the key
    /// came with another request).
    async fn input_by_key(
        &self,
        id: Uuid,
        k: &IdempotencyRequest,
    ) -> Result<Option<InputWritten>, StoreError> {
        let Some(record) = self.key_record(k).await? else {
            return Ok(None);
        };
        if record.request_hash != k.request_hash {
            return Err(StoreError::IdempotencyKeyReused);
        }
        let input_id = record
            .input_id
            .ok_or_else(|| corrupt("an input's idempotency key names no input"))?;
        let sql = format!("SELECT {INPUT_COLUMNS} FROM session_inputs WHERE id = $1");
        match self
            .db
            .query_one_raw(Self::stmt(&sql, vec![input_id.into()]))
            .await?
        {
            Some(r) => {
                let (input, version) = input_row(&r)?;
                Ok(Some(InputWritten {
                    input,
                    version,
                    replayed: true,
                    appended: None,
                }))
            }
            // Deleted with its session.
            None => Err(StoreError::NotFound(id)),
        }
    }

    /// Inputs after `after_seq`, in order.
    pub async fn inputs(
        &self,
        id: Uuid,
        after_seq: i64,
        limit: u64,
    ) -> Result<Vec<Input>, StoreError> {
        let sql = format!(
            "SELECT {INPUT_COLUMNS} FROM session_inputs WHERE session_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        );
        self.db
            .query_all_raw(Self::stmt(
                &sql,
                vec![id.into(), after_seq.into(), (limit as i64).into()],
            ))
            .await?
            .iter()
            .map(|r| input_row(r).map(|(i, _)| i))
            .collect()
    }

    /// Store a pending approval the worker asks for; the same `request_id`
    /// again answers the stored one and appends nothing.
    #[instrument(skip(self, req, meta), fields(session_id = %id, request_id = %req.request_id))]
    pub async fn request_approval(
        &self,
        id: Uuid,
        req: &ApprovalRequest,
        meta: &EventMetadata,
    ) -> Result<ApprovalWritten, StoreError> {
        let generation = i64::try_from(req.generation)
            .map_err(|_| StoreError::Unstorable("generation is out of range".into()))?;
        let payload = serde_json::to_value(req).map_err(corrupt)?;
        let sql = live_statement(
            EventKind::ApprovalRequested,
            Guard::Where(
                " AND NOT EXISTS (SELECT 1 FROM session_approvals \
                   WHERE session_id = $1 AND request_id = $5)",
            ),
            "a AS (INSERT INTO session_approvals (session_id, request_id, tool_name, input, generation, \
                                                  tool_use_id, status, requested_at) \
                   SELECT $1, $5, $6, $7, $8, $9, 'pending', u.updated_at FROM u)",
            "$10",
            "u.updated_at",
        );
        self.on_version(id, None, async |current| {
            let values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                event::new_event_id().into(),
                json_param(meta)?,
                req.request_id.clone().into(),
                req.tool_name.clone().into(),
                json_param(&req.input)?,
                generation.into(),
                req.tool_use_id.clone().into(),
                json_param(&payload)?,
            ];
            if let Some(row) = self.db.query_one_raw(Self::stmt(&sql, values)).await? {
                let next = moved_on(&current, row.try_get("", "updated_at")?);
                let appended = Appended::new(&next, EventKind::ApprovalRequested, &payload);
                let approval = self
                    .approval(id, &req.request_id)
                    .await?
                    .ok_or_else(|| corrupt("an approval just stored is gone"))?;
                return Ok(Attempt::Done(ApprovalWritten {
                    approval,
                    appended: Some(appended),
                }));
            }
            Ok(match self.approval(id, &req.request_id).await? {
                Some(approval) => Attempt::Done(ApprovalWritten {
                    approval,
                    appended: None,
                }),
                None => Attempt::LostRace,
            })
        })
        .await
    }

    /// One approval of a session.
    pub async fn approval(
        &self,
        id: Uuid,
        request_id: &str,
    ) -> Result<Option<Approval>, StoreError> {
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM session_approvals WHERE session_id = $1 AND request_id = $2"
        );
        self.db
            .query_one_raw(Self::stmt(&sql, vec![id.into(), request_id.into()]))
            .await?
            .map(|r| approval_row(&r))
            .transpose()
    }

    /// A session's approvals in the order they were asked for, optionally
    /// only those in some statuses.
    pub async fn approvals(
        &self,
        id: Uuid,
        statuses: &[ApprovalStatus],
    ) -> Result<Vec<Approval>, StoreError> {
        let mut values: Vec<Param> = vec![id.into()];
        let mut cond = String::new();
        if !statuses.is_empty() {
            let marks: Vec<String> = statuses
                .iter()
                .map(|s| {
                    values.push(s.as_str().into());
                    format!("${}", values.len())
                })
                .collect();
            cond = format!(" AND status IN ({})", marks.join(", "));
        }
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM session_approvals WHERE session_id = $1{cond} \
             ORDER BY requested_at, request_id"
        );
        self.db
            .query_all_raw(Self::stmt(&sql, values))
            .await?
            .iter()
            .map(approval_row)
            .collect()
    }

    /// Decide a pending approval: in one statement the approval takes the
    /// decision, `session.approval_decided` is appended and the answer is
    /// queued for the worker as an `approval` input. Unknown: 404; already
    /// decided (also by a concurrent request): 409.
    #[instrument(skip(self, decision, meta), fields(session_id = %id, request_id = %request_id))]
    pub async fn decide_approval(
        &self,
        id: Uuid,
        request_id: &str,
        decision: &DecisionRequest,
        meta: &EventMetadata,
    ) -> Result<ApprovalWritten, StoreError> {
        let status = ApprovalStatus::of(decision.decision);
        // Locking both rows makes a concurrent second decision wait, then
        // find the approval decided (and the session moved): it writes nothing.
        let rows = format!(
            "a AS (UPDATE session_approvals SET status = $6, decided_at = u.updated_at, decided_by = $7, \
                          message = $8, updated_input = $9, reason = $10 \
                   FROM u WHERE session_id = $1 AND request_id = $5), \
             i AS (INSERT INTO session_inputs (session_id, seq, id, kind, body, actor, version, created_at) \
                   SELECT $1, {NEXT_SEQ}, $11, 'approval', $12, $7, $2 + 1, u.updated_at FROM u RETURNING seq)"
        );
        let sql = live_statement(
            EventKind::ApprovalDecided,
            Guard::Lock(
                "g AS (SELECT 1 FROM sessions s, session_approvals p, announce \
                       WHERE s.id = $1 AND s.version = $2 AND p.session_id = $1 \
                         AND p.request_id = $5 AND p.status = 'pending' FOR UPDATE OF s, p)",
            ),
            &rows,
            "(SELECT $13::jsonb || jsonb_build_object('input_seq', i.seq) FROM i)",
            "u.updated_at",
        );
        self.on_version(id, None, async |current| {
            let approval = self.approval(id, request_id).await?.ok_or_else(|| {
                StoreError::Missing(format!("session {id} has no approval {request_id}"))
            })?;
            if approval.status != ApprovalStatus::Pending {
                return Err(StoreError::Refused(format!(
                    "approval {request_id} is already {}",
                    approval.status.as_str()
                )));
            }
            let input_id = Uuid::new_v4();
            let answer = ApprovalAnswer {
                request_id: request_id.to_owned(),
                decision: decision.decision,
                message: decision.message.clone(),
                updated_input: match decision.decision {
                    ApprovalDecision::Allow => Some(
                        decision
                            .updated_input
                            .clone()
                            .unwrap_or_else(|| approval.input.clone()),
                    ),
                    ApprovalDecision::Deny => None,
                },
            };
            let payload = serde_json::to_value(ApprovalDecidedPayload {
                request_id: request_id.to_owned(),
                decision: decision.decision,
                message: decision.message.clone(),
                updated_input: decision.updated_input.clone(),
                reason: decision.reason,
                decided_by: meta.actor.clone(),
                input_seq: 0, // filled in by the statement
                input_id,
            })
            .map_err(corrupt)?;
            let reason = decision
                .reason
                .map(|r| serde_json::to_value(r).map_err(corrupt))
                .transpose()?
                .and_then(|v| v.as_str().map(str::to_owned));
            let values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                event::new_event_id().into(),
                json_param(meta)?,
                request_id.into(),
                status.as_str().into(),
                meta.actor.clone().into(),
                decision.message.clone().into(),
                match &decision.updated_input {
                    Some(m) => json_param(m)?,
                    None => Param::Json(None),
                },
                reason.into(),
                input_id.into(),
                json_param(&answer)?,
                json_param(&payload)?,
            ];
            let Some(row) = self.db.query_one_raw(Self::stmt(&sql, values)).await? else {
                // Decided meanwhile (the next attempt says so), or the
                // session moved on.
                return Ok(Attempt::LostRace);
            };
            let next = moved_on(&current, row.try_get("", "updated_at")?);
            let appended = Appended::new(&next, EventKind::ApprovalDecided, &payload);
            let approval = self
                .approval(id, request_id)
                .await?
                .ok_or_else(|| corrupt("an approval just decided is gone"))?;
            Ok(Attempt::Done(ApprovalWritten {
                approval,
                appended: Some(appended),
            }))
        })
        .await
    }
}
