//! Session writes and reads.
//!
//! Each write is a single autocommit statement: a CTE that announces the
//! writer (`append.rs`), changes the `sessions` row only if it is still at the
//! version the change was planned against, and appends the event only if the
//! row changed. Losing that race re-plans against the new state, or answers
//! 412 when the client asked for a specific version ([`Store::on_version`]).
//! The transaction id, and so the event's position, is taken only after the
//! state it was planned on was read, so positions follow each session's
//! version order.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde::Serialize;
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow};
use super::rows::{self, INSERT_COLUMNS, SESSION_COLUMNS};
use super::{Store, StoreError};
use crate::contract::WakeHint;
use crate::domain::event;
use crate::domain::{
    CreateSession, EventKind, EventMetadata, SessionChanges, SessionPatch, SessionState,
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

pub(crate) fn metadata(meta: &EventMetadata) -> Result<Param, StoreError> {
    serde_json::to_value(meta)
        .map(json)
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
        for _ in 0..MAX_ATTEMPTS {
            let id = Uuid::now_v7();
            tracing::Span::current().record("session_id", tracing::field::display(id));
            let mut values: Vec<Param> = vec![id.into()];
            values.extend(new_session_values(cmd)?);
            values.extend([
                Uuid::new_v4().into(),
                json(payload.clone()),
                metadata(meta)?,
            ]);
            let (key_cte, from_key) = match idem {
                Some(k) => {
                    values.push(k.key.clone().into());
                    values.push(k.request_hash.clone().into());
                    (
                        "k AS (INSERT INTO idempotency_keys (key, request_hash, session_id) \
                         SELECT $13, $14, $1 FROM announce \
                         ON CONFLICT (key) DO NOTHING RETURNING session_id),",
                        "FROM k",
                    )
                }
                None => ("", "FROM announce"),
            };
            let event = EventRow {
                source: "s",
                kind: EventKind::Created,
                aggregate_id: "$1",
                version: "1",
                event_id: "$10",
                payload: "$11",
                metadata: "$12",
                occurred_at: "s.created_at",
            }
            .cte();
            let sql = format!(
                "WITH {ANNOUNCE}, {key_cte} \
                 s AS (INSERT INTO sessions ({INSERT_COLUMNS}) \
                       SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, 1, now(), now() {from_key} \
                       RETURNING created_at), \
                 {event} \
                 SELECT s.created_at FROM s, e"
            );
            if let Some(row) = self.db.query_one_raw(stmt(&sql, values)).await? {
                let at: DateTime<Utc> = row.try_get("", "created_at")?;
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
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1");
        self.db
            .query_one_raw(stmt(&sql, vec![id.into()]))
            .await?
            .map(|r| rows::session(&r))
            .transpose()
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
        let mut values: Vec<Param> = vec![
            current.id.into(),
            current.version.into(),
            Uuid::new_v4().into(),
            json(payload.clone()),
            metadata(meta)?,
        ];
        let mut sets = String::new();
        let mut set = |column: &str, param: Param| {
            values.push(param);
            sets.push_str(&format!("{column} = ${}, ", values.len()));
        };
        if let Some(s) = changes.status {
            set("status", s.as_str().into());
        }
        if let Some(b) = changes.runtime_backend {
            set("runtime_backend", b.as_str().into());
        }
        if let Some(c) = &changes.context {
            set("context", typed_json(c)?);
        }
        if let Some(m) = &changes.runtime_metadata {
            set("runtime_metadata", typed_json(m)?);
        }
        if let Some(c) = &changes.checkpoint {
            set("checkpoint", typed_json(c)?);
        }
        if let Some(w) = &changes.worker {
            set("worker", typed_json(w)?);
        }
        if changes.agent_id.is_some() || changes.session_type.is_some() || changes.usage.is_some() {
            return Err(StoreError::Corrupt(format!(
                "an update cannot set {:?}",
                changes.names()
            )));
        }
        let event = EventRow::updated("$4", "$5").cte();
        let sql = format!(
            "WITH {ANNOUNCE}, \
             u AS (UPDATE sessions SET {sets}version = $2 + 1, updated_at = now() FROM announce \
                   WHERE id = $1 AND version = $2 RETURNING updated_at), \
             {event} \
             SELECT u.updated_at FROM u, e"
        );
        match self.db.query_one_raw(stmt(&sql, values)).await? {
            Some(row) => Ok(Some(row.try_get("", "updated_at")?)),
            None => Ok(None),
        }
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
}
