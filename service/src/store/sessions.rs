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

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};

use super::list::{ListCursor, ListFilter};
use serde::Serialize;
use serde_json::Value;
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow};
use super::rows::SessionRow;
use super::session_batches::{CreateOut, NewSession, PatchRow, ReadById, UpdateOut, UpdateRow};
use super::{Store, StoreError};
use crate::contract::{ListedSession, WakeHint};
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
    /// How long a stored key is honoured (`retention.idempotency_key_ttl_secs`):
    /// an older one is removed when met, and the request runs as a new one.
    pub ttl: Duration,
}

/// What an idempotency key that is still honoured recorded.
#[derive(Debug, Clone)]
pub(crate) struct KeyRecord {
    pub request_hash: String,
    pub session_id: Uuid,
    pub input_id: Option<Uuid>,
}

/// What a bulk delete found and deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkDeleted {
    /// Sessions that matched the filter when read.
    pub matched: u64,
    /// Those deleted (the others changed in between, so were left alone).
    pub deleted: u64,
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
                event_id: event::new_event_id(),
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
            let Some(record) = self.key_record(k).await? else {
                continue; // the other request rolled back, or the key expired: try again
            };
            if record.request_hash != k.request_hash {
                return Err(StoreError::IdempotencyKeyReused);
            }
            let session_id = record.session_id;
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
        self.batched(ReadById(id))
            .await?
            .map(|r| r.and_then(SessionRow::into_state))
            .transpose()
    }

    /// The session as `GET /sessions/{id}` answers it: the same read as
    /// [`Store::get`], its JSON documents passed through unparsed.
    #[instrument(skip(self))]
    pub async fn get_listed(&self, id: Uuid) -> Result<Option<ListedSession>, StoreError> {
        self.batched(ReadById(id))
            .await?
            .map(|r| r.map(SessionRow::into_listed))
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
        if let Some(changes) = patch.blind_change() {
            // One round trip when it writes; when it does not, the patch is
            // planned against the state below, which tells why.
            let row = PatchRow {
                id,
                expected: expected_version,
                context: changes.context.map(Value::Object),
                runtime_metadata: changes.runtime_metadata.map(Value::Object),
                checkpoint: changes.checkpoint.map(|c| c.map(Value::Object)),
                runtime_backend: changes.runtime_backend.map(|b| b.as_str()),
                event_id: event::new_event_id(),
                metadata: metadata_json(meta)?,
            };
            if let Some((session, payload)) = self.batched(row).await?.transpose()? {
                let appended = Appended::new(&session, EventKind::Updated, &payload);
                return Ok(Written {
                    session,
                    appended: Some(appended),
                });
            }
        }
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
            event_id: event::new_event_id(),
            payload: payload.clone(),
            metadata: metadata_json(meta)?,
        };
        Ok(match self.batched(row).await? {
            UpdateOut::Written(at) => Some(at),
            UpdateOut::LostRace => None,
        })
    }

    /// The record of an idempotency key while it is honoured. A key older
    /// than its `ttl` is removed here (the retention sweep removes the rest
    /// in batches), so it is never honoured even before a sweep runs.
    pub(crate) async fn key_record(
        &self,
        k: &IdempotencyRequest,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let ttl = k.ttl.as_secs_f64();
        let Some(row) = self
            .db
            .query_one_raw(stmt(
                "SELECT request_hash, session_id, input_id, \
                        created_at > now() - make_interval(secs => $2) AS live \
                 FROM idempotency_keys WHERE key = $1",
                vec![k.key.clone().into(), ttl.into()],
            ))
            .await?
        else {
            return Ok(None);
        };
        if !row.try_get::<bool>("", "live")? {
            self.db
                .execute_raw(stmt(
                    "DELETE FROM idempotency_keys \
                     WHERE key = $1 AND created_at <= now() - make_interval(secs => $2)",
                    vec![k.key.clone().into(), ttl.into()],
                ))
                .await?;
            return Ok(None);
        }
        Ok(Some(KeyRecord {
            request_hash: row.try_get("", "request_hash")?,
            session_id: row.try_get("", "session_id")?,
            input_id: row.try_get("", "input_id")?,
        }))
    }

    /// Delete a session, appending `session.deleted`.
    #[instrument(skip(self, meta), fields(session_id = %id))]
    pub async fn delete(
        &self,
        id: Uuid,
        expected_version: Option<i64>,
        meta: &EventMetadata,
    ) -> Result<Written, StoreError> {
        self.on_version(id, expected_version, async |current| {
            let mut appended = self
                .delete_many(std::slice::from_ref(&current), meta)
                .await?;
            Ok(match appended.pop() {
                Some(a) => Attempt::Done(Written {
                    session: current,
                    appended: Some(a),
                }),
                None => Attempt::LostRace,
            })
        })
        .await
    }

    /// Delete each of `sessions` that is still at the version it was read
    /// at, in one statement: its row, its messages, inputs, approvals and
    /// transcript, a tombstone (`session_tombstones`, kept after a purge so
    /// the id is never taken again), and one `session.deleted` event each.
    /// Returns the events of those deleted; one that moved on meanwhile is
    /// left alone. At most 1000 sessions (the events' numbers within the
    /// transaction stay below 1024).
    pub(crate) async fn delete_many(
        &self,
        sessions: &[SessionState],
        meta: &EventMetadata,
    ) -> Result<Vec<Appended>, StoreError> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        if sessions.len() > 1000 {
            return Err(StoreError::Corrupt(format!(
                "a delete of {} sessions in one statement (at most 1000)",
                sessions.len()
            )));
        }
        let payloads: Vec<Value> = sessions.iter().map(event::deleted_payload).collect();
        let rows: Vec<Value> = sessions
            .iter()
            .zip(&payloads)
            .map(|(s, payload)| {
                serde_json::json!({
                    "id": s.id, "version": s.version,
                    "event_id": event::new_event_id(), "payload": payload,
                })
            })
            .collect();
        let event = EventRow {
            source: "d JOIN p ON p.id = d.id",
            kind: EventKind::Deleted,
            aggregate_id: "d.id",
            version: "d.version + 1",
            event_id: "p.event_id",
            payload: "p.payload",
            metadata: "$2",
            occurred_at: "now()",
        }
        .cte_numbered("e", "p.n - 1");
        let sql = format!(
            "WITH {ANNOUNCE}, \
             p AS (SELECT (o.x->>'id')::uuid AS id, (o.x->>'version')::bigint AS version, \
                          (o.x->>'event_id')::uuid AS event_id, o.x->'payload' AS payload, o.n \
                   FROM jsonb_array_elements($1) WITH ORDINALITY AS o(x, n)), \
             d AS (DELETE FROM sessions s USING announce, p \
                   WHERE s.id = p.id AND s.version = p.version RETURNING s.id, s.version), \
             dm AS (DELETE FROM session_messages WHERE session_id IN (SELECT id FROM d)), \
             di AS (DELETE FROM session_inputs WHERE session_id IN (SELECT id FROM d)), \
             da AS (DELETE FROM session_approvals WHERE session_id IN (SELECT id FROM d)), \
             dt AS (DELETE FROM session_transcript_chunks WHERE session_id IN (SELECT id FROM d)), \
             tb AS (INSERT INTO session_tombstones (session_id, deleted_at) \
                    SELECT id, now() FROM d ON CONFLICT (session_id) DO NOTHING), \
             {event} \
             SELECT id FROM d"
        );
        let deleted: std::collections::HashSet<Uuid> = self
            .db
            .query_all_raw(stmt(&sql, vec![json(Value::Array(rows)), metadata(meta)?]))
            .await?
            .iter()
            .map(|r| r.try_get::<Uuid>("", "id"))
            .collect::<Result<_, _>>()?;
        Ok(sessions
            .iter()
            .zip(&payloads)
            .filter(|(s, _)| deleted.contains(&s.id))
            .map(|(s, payload)| Appended::new(s, EventKind::Deleted, payload))
            .collect())
    }

    /// Delete every session `filter` matches, `batch` at a time (each batch
    /// one statement, so no sweep holds a long transaction), each with its
    /// own `session.deleted`. A session is deleted at the version it matched
    /// at; one changed in between is left alone. `committed` sees each
    /// batch's events once it has committed.
    #[instrument(skip(self, meta, committed))]
    pub async fn delete_matching(
        &self,
        filter: &ListFilter,
        batch: u64,
        meta: &EventMetadata,
        mut committed: impl FnMut(&[Appended]),
    ) -> Result<BulkDeleted, StoreError> {
        let batch = batch.clamp(1, 1000);
        let mut done = BulkDeleted::default();
        let mut cursor = None;
        loop {
            let page = self.list(filter, batch, cursor).await?;
            let Some(last) = page.last() else {
                return Ok(done);
            };
            cursor = Some(ListCursor {
                created_at: last.created_at,
                id: last.id,
            });
            let appended = self.delete_many(&page, meta).await?;
            committed(&appended);
            done.matched += page.len() as u64;
            done.deleted += appended.len() as u64;
            if (page.len() as u64) < batch {
                return Ok(done);
            }
        }
    }

    /// How many sessions `filter` matches now (the list's statement, every
    /// row of it).
    #[instrument(skip(self))]
    pub async fn count(&self, filter: &ListFilter) -> Result<u64, StoreError> {
        let (sql, values) = super::list::list_statement(filter, i64::MAX as u64, None, "id");
        let sql = format!("SELECT count(*) AS n FROM ({sql}) matching");
        let row = self
            .db
            .query_one_raw(stmt(&sql, values))
            .await?
            .ok_or_else(|| StoreError::Corrupt("a count returned nothing".into()))?;
        Ok(row.try_get::<i64>("", "n")?.max(0) as u64)
    }
}
