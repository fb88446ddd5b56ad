//! Session writes and reads.
//!
//! Each write is a single autocommit statement: a CTE that announces the
//! writer (`append.rs`), changes the `sessions` row only if it is still at the
//! version the change was planned against, and appends the event only if the
//! row changed. Reads by id, creates and updates run batched with concurrent
//! ones (`batch.rs`, `session_batches.rs`): the same guards, per row. Losing that race re-plans against the new state, or answers
//! 412 when the client asked for a specific version ([`Store::on_version`]).
//! The transaction id, and so the event's position, is taken only after the
//! state it was planned on was read, so positions follow each session's
//! version order.

use base64::Engine as _;
use chrono::{DateTime, TimeZone, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde::Serialize;
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow};
use super::rows::{self, SESSION_COLUMNS};
use super::session_batches::{CreateOut, NewSession, ReadById, UpdateOut, UpdateRow};
use super::{Store, StoreError};
use crate::contract::{WakeHint, WorkerState};
use crate::domain::event;
use crate::domain::{
    CreateSession, EventKind, EventMetadata, RuntimeBackend, SessionChanges, SessionPatch,
    SessionState, SessionStatus,
};

/// Attempts at an update that keeps losing to concurrent writers before 409.
const MAX_ATTEMPTS: usize = 64;

/// `Idempotency-Key` of a create, scoped to its actor, and a hash of the body.
#[derive(Debug, Clone)]
pub struct IdempotencyRequest {
    pub key: String,
    pub request_hash: String,
}

/// What a committed write appended to the log: the input of the effects
/// that follow a commit (metrics, waking the relay, the wake-up hint).
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub session_id: Uuid,
    pub kind: EventKind,
    pub version: i64,
    pub hint: WakeHint,
}

impl Appended {
    /// `session` is the state after the write, `payload` the event's.
    pub(crate) fn new(session: &SessionState, kind: EventKind, payload: &Value) -> Self {
        let updates = payload
            .get("updates")
            .and_then(Value::as_array)
            .map(|u| {
                u.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let version = match kind {
            EventKind::Deleted => session.version + 1,
            _ => session.version,
        };
        Self {
            session_id: session.id,
            kind,
            version,
            hint: WakeHint {
                session_id: session.id,
                event_type: kind.into(),
                version,
                runtime_backend: session.runtime_backend.as_str().to_owned(),
                has_worker: session.worker.is_some() && kind != EventKind::Deleted,
                updates,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Created {
    pub session: SessionState,
    /// True when an earlier request with the same key created it.
    pub replayed: bool,
    /// `None` when replayed.
    pub appended: Option<Appended>,
}

/// The session after a write, and the event it appended (`None` when the
/// write changed nothing).
#[derive(Debug, Clone)]
pub struct Written {
    pub session: SessionState,
    pub appended: Option<Appended>,
}

/// One try of a write planned against a session's current state.
pub(crate) enum Attempt<T> {
    Done(T),
    /// The session moved on between reading and writing.
    LostRace,
}

/// Filters of `GET /sessions/`; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub agent_id: Option<Uuid>,
    pub status: Vec<SessionStatus>,
    pub session_type: Option<String>,
    pub runtime_backend: Option<RuntimeBackend>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    /// Only sessions with (true) or without (false) a worker spec.
    pub has_worker: Option<bool>,
    /// Only sessions whose worker the runner last reported in one of these
    /// states (`runtime_metadata.worker.state`).
    pub worker_state: Vec<WorkerState>,
    /// Only sessions forked from this one.
    pub parent_session_id: Option<Uuid>,
}

/// Keyset position in the newest-first list: the last row returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl ListCursor {
    pub fn encode(&self) -> String {
        let raw = format!(
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.id.simple()
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let raw = std::str::from_utf8(&raw).ok()?;
        let (micros, id) = raw.split_once('.')?;
        Some(Self {
            created_at: Utc.timestamp_micros(micros.parse().ok()?).single()?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

pub(crate) fn stmt(sql: &str, values: Vec<Param>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

pub(crate) fn json(v: Value) -> Param {
    Param::Json(Some(Box::new(v)))
}

pub(crate) fn nullable_json(v: Option<Value>) -> Param {
    Param::Json(v.filter(|v| !v.is_null()).map(Box::new))
}

/// A typed value as a `jsonb` parameter (`None` as SQL `NULL`).
pub(crate) fn typed_json<T: Serialize>(v: &T) -> Result<Param, StoreError> {
    serde_json::to_value(v)
        .map(|v| nullable_json(Some(v)))
        .map_err(|e| StoreError::Corrupt(format!("value does not serialise: {e}")))
}

/// The values of a new session's own columns, in `INSERT_COLUMNS` order
/// from `agent_id` to `worker` (a create, a fork and an import all write them).
pub(crate) fn new_session_values(cmd: &CreateSession) -> Result<[Param; 8], StoreError> {
    Ok([
        cmd.agent_id.into(),
        cmd.session_type.clone().into(),
        cmd.status.as_str().into(),
        json(Value::Object(cmd.context.clone())),
        nullable_json(cmd.checkpoint.clone().map(Value::Object)),
        cmd.runtime_backend.as_str().into(),
        json(Value::Object(cmd.runtime_metadata.clone())),
        typed_json(&cmd.worker)?,
    ])
}

/// A typed value as `jsonb` (`None` for SQL `NULL`).
fn to_json<T: Serialize>(v: &T) -> Result<Option<Value>, StoreError> {
    serde_json::to_value(v)
        .map(|v| Some(v).filter(|v| !v.is_null()))
        .map_err(|e| StoreError::Corrupt(format!("value does not serialise: {e}")))
}

pub(crate) fn metadata(meta: &EventMetadata) -> Result<Param, StoreError> {
    metadata_json(meta).map(json)
}

fn metadata_json(meta: &EventMetadata) -> Result<Value, StoreError> {
    serde_json::to_value(meta)
        .map_err(|e| StoreError::Corrupt(format!("event metadata does not serialise: {e}")))
}

impl Store {
    #[instrument(skip_all, fields(session_id = tracing::field::Empty, agent_id = %cmd.agent_id))]
    pub async fn create(
        &self,
        cmd: &CreateSession,
        meta: &EventMetadata,
        idem: Option<&IdempotencyRequest>,
    ) -> Result<Created, StoreError> {
        if cmd.forked_from.is_some() {
            return Err(StoreError::Corrupt(
                "a fork is created by Store::fork, not Store::create".into(),
            ));
        }
        let payload = event::created_payload(cmd);
        let metadata = metadata_json(meta)?;
        let worker = to_json(&cmd.worker)?;
        for _ in 0..MAX_ATTEMPTS {
            let id = Uuid::now_v7();
            tracing::Span::current().record("session_id", tracing::field::display(id));
            let row = NewSession {
                id,
                agent_id: cmd.agent_id,
                session_type: cmd.session_type.clone(),
                status: cmd.status.as_str(),
                context: Value::Object(cmd.context.clone()),
                checkpoint: cmd.checkpoint.clone().map(Value::Object),
                runtime_backend: cmd.runtime_backend.as_str(),
                runtime_metadata: Value::Object(cmd.runtime_metadata.clone()),
                worker: worker.clone(),
                event_id: Uuid::new_v4(),
                payload: payload.clone(),
                metadata: metadata.clone(),
                idempotency: idem.map(|k| (k.key.clone(), k.request_hash.clone())),
            };
            if let CreateOut::Created(at) = self.batched(row).await? {
                let session = SessionState::from_create(id, cmd, at);
                let appended = Appended::new(&session, EventKind::Created, &payload);
                return Ok(Created {
                    session,
                    replayed: false,
                    appended: Some(appended),
                });
            }
            // Only an idempotency key already taken inserts nothing.
            let Some(k) = idem else {
                return Err(StoreError::Corrupt("create inserted no row".into()));
            };
            let existing = self
                .db
                .query_one_raw(stmt(
                    "SELECT request_hash, session_id FROM idempotency_keys WHERE key = $1",
                    vec![k.key.clone().into()],
                ))
                .await?;
            let Some(row) = existing else {
                continue; // the other request rolled back: try again
            };
            let hash: String = row.try_get("", "request_hash")?;
            let session_id: Uuid = row.try_get("", "session_id")?;
            if hash != k.request_hash {
                return Err(StoreError::IdempotencyKeyReused);
            }
            return match self.get(session_id).await? {
                Some(session) => Ok(Created {
                    session,
                    replayed: true,
                    appended: None,
                }),
                None => Err(StoreError::IdempotentTargetGone(session_id)),
            };
        }
        Err(StoreError::Corrupt(
            "idempotent create did not settle".into(),
        ))
    }

    #[instrument(skip(self))]
    pub async fn get(&self, id: Uuid) -> Result<Option<SessionState>, StoreError> {
        self.batched(ReadById(id)).await?.transpose()
    }

    /// Run `attempt` against the session's current state until it wins the
    /// version race. With `expected_version`, a session at another version is
    /// refused (412), and so is losing the race; without, the write is
    /// re-planned against the newer state.
    pub(crate) async fn on_version<T>(
        &self,
        id: Uuid,
        expected_version: Option<i64>,
        mut attempt: impl AsyncFnMut(SessionState) -> Result<Attempt<T>, StoreError>,
    ) -> Result<T, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(id).await?.ok_or(StoreError::NotFound(id))?;
            let planned = current.version;
            if let Some(expected) = expected_version
                && expected != planned
            {
                return Err(StoreError::VersionMismatch {
                    expected,
                    actual: planned,
                });
            }
            match attempt(current).await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::LostRace if expected_version.is_some() => {
                    let actual = self.get(id).await?.ok_or(StoreError::NotFound(id))?.version;
                    return Err(StoreError::VersionMismatch {
                        expected: planned,
                        actual,
                    });
                }
                Attempt::LostRace => continue,
            }
        }
        Err(StoreError::Contended(id))
    }

    /// Apply a patch (see [`Store::on_version`] for `expected_version`).
    /// Returns the session after the change, or unchanged with no event.
    #[instrument(skip(self, patch, meta), fields(session_id = %id))]
    pub async fn update(
        &self,
        id: Uuid,
        patch: &SessionPatch,
        expected_version: Option<i64>,
        meta: &EventMetadata,
    ) -> Result<Written, StoreError> {
        self.on_version(id, expected_version, async |current| {
            let Some(changes) = current.plan_update(patch)? else {
                return Ok(Attempt::Done(Written {
                    session: current,
                    appended: None,
                }));
            };
            let mut next = current.clone();
            next.apply(&changes);
            next.version += 1;
            let payload = event::updated_payload(&next, &changes);
            Ok(
                match self
                    .write_update(&current, &changes, &payload, meta)
                    .await?
                {
                    Some(updated_at) => {
                        next.updated_at = updated_at;
                        let appended = Appended::new(&next, EventKind::Updated, &payload);
                        Attempt::Done(Written {
                            session: next,
                            appended: Some(appended),
                        })
                    }
                    None => Attempt::LostRace,
                },
            )
        })
        .await
    }

    async fn write_update(
        &self,
        current: &SessionState,
        changes: &SessionChanges,
        payload: &Value,
        meta: &EventMetadata,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        if changes.agent_id.is_some() || changes.session_type.is_some() || changes.usage.is_some() {
            return Err(StoreError::Corrupt(format!(
                "an update cannot set {:?}",
                changes.names()
            )));
        }
        let row = UpdateRow {
            id: current.id,
            version: current.version,
            status: changes.status.map(|s| s.as_str()),
            runtime_backend: changes.runtime_backend.map(|b| b.as_str()),
            context: changes.context.clone().map(Value::Object),
            runtime_metadata: changes.runtime_metadata.clone().map(Value::Object),
            checkpoint: changes.checkpoint.clone().map(|c| c.map(Value::Object)),
            worker: changes.worker.as_ref().map(to_json).transpose()?,
            event_id: Uuid::new_v4(),
            payload: payload.clone(),
            metadata: metadata_json(meta)?,
        };
        Ok(match self.batched(row).await? {
            UpdateOut::Written(at) => Some(at),
            UpdateOut::LostRace => None,
        })
    }

    /// Delete a session, appending `session.deleted`.
    #[instrument(skip(self, meta), fields(session_id = %id))]
    pub async fn delete(
        &self,
        id: Uuid,
        expected_version: Option<i64>,
        meta: &EventMetadata,
    ) -> Result<Written, StoreError> {
        let event = EventRow {
            source: "d",
            kind: EventKind::Deleted,
            aggregate_id: "$1",
            version: "$2 + 1",
            event_id: "$3",
            payload: "$4",
            metadata: "$5",
            occurred_at: "now()",
        }
        .cte();
        let sql = format!(
            "WITH {ANNOUNCE}, \
             d AS (DELETE FROM sessions USING announce WHERE id = $1 AND version = $2 RETURNING id), \
             m AS (DELETE FROM session_messages WHERE session_id IN (SELECT id FROM d)), \
             i AS (DELETE FROM session_inputs WHERE session_id IN (SELECT id FROM d)), \
             a AS (DELETE FROM session_approvals WHERE session_id IN (SELECT id FROM d)), \
             t AS (DELETE FROM session_transcript_chunks WHERE session_id IN (SELECT id FROM d)), \
             {event} \
             SELECT position FROM e"
        );
        self.on_version(id, expected_version, async |current| {
            let payload = event::deleted_payload(&current);
            let values: Vec<Param> = vec![
                id.into(),
                current.version.into(),
                Uuid::new_v4().into(),
                json(payload.clone()),
                metadata(meta)?,
            ];
            if self.db.query_one_raw(stmt(&sql, values)).await?.is_none() {
                return Ok(Attempt::LostRace);
            }
            let appended = Appended::new(&current, EventKind::Deleted, &payload);
            Ok(Attempt::Done(Written {
                session: current,
                appended: Some(appended),
            }))
        })
        .await
    }

    /// Newest first, `limit` rows after `cursor`.
    #[instrument(skip(self))]
    pub async fn list(
        &self,
        filter: &ListFilter,
        limit: u64,
        cursor: Option<ListCursor>,
    ) -> Result<Vec<SessionState>, StoreError> {
        let mut values: Vec<Param> = Vec::new();
        let mut cond: Vec<String> = Vec::new();
        fn push(values: &mut Vec<Param>, cond: &mut Vec<String>, expr: &str, v: Param) {
            values.push(v);
            cond.push(expr.replace('?', &format!("${}", values.len())));
        }
        /// `expr` equal to one of `these` (nothing when empty).
        fn push_any(values: &mut Vec<Param>, cond: &mut Vec<String>, expr: &str, these: &[&str]) {
            match these {
                [] => {}
                [one] => push(values, cond, &format!("{expr} = ?"), (*one).into()),
                many => {
                    let mut marks = Vec::new();
                    for s in many {
                        values.push((*s).into());
                        marks.push(format!("${}", values.len()));
                    }
                    cond.push(format!("{expr} IN ({})", marks.join(", ")));
                }
            }
        }
        if let Some(a) = filter.agent_id {
            push(&mut values, &mut cond, "agent_id = ?", a.into());
        }
        if let Some(p) = filter.parent_session_id {
            push(&mut values, &mut cond, "parent_session_id = ?", p.into());
        }
        let statuses: Vec<&str> = filter.status.iter().map(|s| s.as_str()).collect();
        push_any(&mut values, &mut cond, "status", &statuses);
        let states: Vec<&str> = filter.worker_state.iter().map(|s| s.as_str()).collect();
        push_any(
            &mut values,
            &mut cond,
            "(runtime_metadata -> 'worker' ->> 'state')",
            &states,
        );
        if let Some(t) = &filter.session_type {
            push(&mut values, &mut cond, "session_type = ?", t.clone().into());
        }
        if let Some(b) = filter.runtime_backend {
            push(
                &mut values,
                &mut cond,
                "runtime_backend = ?",
                b.as_str().into(),
            );
        }
        for (expr, v) in [
            ("created_at >= ?", filter.created_after),
            ("created_at < ?", filter.created_before),
            ("updated_at >= ?", filter.updated_after),
            ("updated_at < ?", filter.updated_before),
        ] {
            if let Some(t) = v {
                push(&mut values, &mut cond, expr, t.into());
            }
        }
        match filter.has_worker {
            Some(true) => cond.push("worker IS NOT NULL".into()),
            Some(false) => cond.push("worker IS NULL".into()),
            None => {}
        }
        if let Some(c) = cursor {
            values.push(c.created_at.into());
            values.push(c.id.into());
            let n = values.len();
            cond.push(format!("(created_at, id) < (${}, ${n})", n - 1));
        }
        values.push((limit as i64).into());
        let where_ = if cond.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", cond.join(" AND "))
        };
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions {where_} \
             ORDER BY created_at DESC, id DESC LIMIT ${}",
            values.len()
        );
        self.db
            .query_all_raw(stmt(&sql, values))
            .await?
            .iter()
            .map(rows::session)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = ListCursor {
            created_at: Utc.timestamp_micros(1_763_700_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(ListCursor::decode(&c.encode()), Some(c));
        for bad in ["", "!!", "bm90LWEtY3Vyc29y"] {
            assert_eq!(ListCursor::decode(bad), None);
        }
    }
}
