//! The batched statements of the hot path: reads by id, creates and updates.
//!
//! Each takes its batch as arrays (`unnest(…) WITH ORDINALITY`), so its SQL
//! text is one static string, prepared once per connection and cached by the
//! driver. Writes open with the writers' announcement (`append.rs`) like every
//! event-writing statement, and a row's event takes the position
//! xid × 1024 + (its ordinal − 1) — distinct within the statement, below 1024
//! because a batch holds at most [`super::batch::MAX_BATCH`] commands.
//!
//! Updates are planned in Rust on a state read before the statement (the
//! state machine, the merge patches, the event payload) and guarded per row by
//! the planned version; a row that lost its race is answered as such and
//! re-planned by its caller, the others commit. The read takes no row lock on
//! purpose: a lock would assign the transaction id at the read, and a batch
//! that then waited for another writer of the same session could append that
//! session's next version at a lower position than the one before it.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sea_orm::QueryResult;
use sea_orm::sqlx::{self, PgConnection, Row, postgres::PgRow};
use serde_json::Value;
use uuid::Uuid;

use super::StoreError;
use super::append::{ANNOUNCE, EventRow};
use super::batch::{Batch, Job, Queued};
use super::rows::{self, INSERT_COLUMNS, SESSION_COLUMNS, SESSION_TEXT_COLUMNS, SessionRow};
use crate::domain::{EventKind, SessionState};

/// `GET` of one session by id.
pub(crate) struct ReadById(pub Uuid);

/// `None` when no such session.
pub(crate) type ReadOut = Option<Result<SessionRow, StoreError>>;

static READ_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {SESSION_TEXT_COLUMNS} FROM sessions WHERE id = ANY($1)"));

impl Batch for ReadById {
    const KIND: &'static str = "read";
    const WRITES: bool = false;

    fn queued(job: Job<Self>) -> Queued {
        Queued::Read(job)
    }
    type Out = ReadOut;

    async fn run(conn: &mut PgConnection, cmds: &[Self]) -> Result<Vec<ReadOut>, sqlx::Error> {
        let ids: Vec<Uuid> = cmds.iter().map(|c| c.0).collect();
        let found = sqlx::query(READ_SQL.as_str())
            .bind(&ids)
            .fetch_all(conn)
            .await?;
        let mut by_id: HashMap<Uuid, Result<SessionRow, StoreError>> =
            HashMap::with_capacity(found.len());
        for row in found {
            let id: Uuid = row.try_get("id")?;
            by_id.insert(id, rows::session_row(&QueryResult::from(row)));
        }
        // The last command asking for a session takes its row; any earlier
        // one (the same id asked for twice in one batch) gets a copy.
        let mut asked: HashMap<Uuid, usize> = HashMap::with_capacity(cmds.len());
        for c in cmds {
            *asked.entry(c.0).or_default() += 1;
        }
        let out = cmds
            .iter()
            .map(|c| {
                let left = asked.get_mut(&c.0).map(|n| {
                    *n -= 1;
                    *n
                });
                if left == Some(0) {
                    by_id.remove(&c.0)
                } else {
                    match by_id.get(&c.0) {
                        Some(Ok(s)) => Some(Ok(s.clone())),
                        Some(Err(e)) => Some(Err(StoreError::Corrupt(e.to_string()))),
                        None => None,
                    }
                }
            })
            .collect();
        Ok(out)
    }
}

/// A new session's row and its `session.created` event, with the
/// idempotency key it is created under.
pub(crate) struct NewSession {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub session_type: String,
    pub status: &'static str,
    pub context: Value,
    pub checkpoint: Option<Value>,
    pub runtime_backend: &'static str,
    pub runtime_metadata: Value,
    pub worker: Option<Value>,
    pub event_id: Uuid,
    pub payload: Value,
    pub metadata: Value,
    /// `(key, request_hash)`.
    pub idempotency: Option<(String, String)>,
}

pub(crate) enum CreateOut {
    Created(DateTime<Utc>),
    /// The idempotency key is another request's: nothing written.
    KeyTaken,
}

static CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    let event = EventRow {
        source: "s JOIN v ON v.id = s.id",
        kind: EventKind::Created,
        aggregate_id: "s.id",
        version: "1",
        event_id: "v.event_id",
        payload: "v.payload",
        metadata: "v.metadata",
        occurred_at: "s.created_at",
    }
    .cte_numbered("e", "v.ord - 1");
    format!(
        "WITH {ANNOUNCE}, \
         v AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[], \
                                    $6::jsonb[], $7::text[], $8::jsonb[], $9::jsonb[], $10::uuid[], \
                                    $11::jsonb[], $12::jsonb[], $13::text[], $14::text[]) \
               WITH ORDINALITY AS v(id, agent_id, session_type, status, context, checkpoint, \
                                    runtime_backend, runtime_metadata, worker, event_id, payload, \
                                    metadata, key, request_hash, ord)), \
         k AS (INSERT INTO idempotency_keys (key, request_hash, session_id) \
               SELECT v.key, v.request_hash, v.id FROM announce, v WHERE v.key IS NOT NULL \
               ON CONFLICT (key) DO NOTHING RETURNING session_id), \
         s AS (INSERT INTO sessions ({INSERT_COLUMNS}) \
               SELECT v.id, v.agent_id, v.session_type, v.status, v.context, v.checkpoint, \
                      v.runtime_backend, v.runtime_metadata, v.worker, NULL, NULL, 1, now(), now() \
               FROM announce, v WHERE v.key IS NULL OR v.id IN (SELECT session_id FROM k) \
               RETURNING id, created_at), \
         {event} \
         SELECT s.id, s.created_at FROM s"
    )
});

impl Batch for NewSession {
    const KIND: &'static str = "create";
    const WRITES: bool = true;

    fn queued(job: Job<Self>) -> Queued {
        Queued::Create(job)
    }
    type Out = CreateOut;

    async fn run(conn: &mut PgConnection, cmds: &[Self]) -> Result<Vec<CreateOut>, sqlx::Error> {
        let written = sqlx::query(CREATE_SQL.as_str())
            .bind(column(cmds, |c| c.id))
            .bind(column(cmds, |c| c.agent_id))
            .bind(column(cmds, |c| c.session_type.as_str()))
            .bind(column(cmds, |c| c.status))
            .bind(column(cmds, |c| &c.context))
            .bind(column(cmds, |c| c.checkpoint.as_ref()))
            .bind(column(cmds, |c| c.runtime_backend))
            .bind(column(cmds, |c| &c.runtime_metadata))
            .bind(column(cmds, |c| c.worker.as_ref()))
            .bind(column(cmds, |c| c.event_id))
            .bind(column(cmds, |c| &c.payload))
            .bind(column(cmds, |c| &c.metadata))
            .bind(column(cmds, |c| {
                c.idempotency.as_ref().map(|k| k.0.as_str())
            }))
            .bind(column(cmds, |c| {
                c.idempotency.as_ref().map(|k| k.1.as_str())
            }))
            .fetch_all(conn)
            .await?;
        let at = by_id(written, "created_at")?;
        Ok(cmds
            .iter()
            .map(|c| match at.get(&c.id) {
                Some(t) => CreateOut::Created(*t),
                None => CreateOut::KeyTaken,
            })
            .collect())
    }
}

/// A planned update of one session: the columns it changes (`None` keeps the
/// stored value) and its `session.updated` event, guarded by `version`.
pub(crate) struct UpdateRow {
    pub id: Uuid,
    /// The version the change was planned against.
    pub version: i64,
    pub status: Option<&'static str>,
    pub runtime_backend: Option<&'static str>,
    pub context: Option<Value>,
    pub runtime_metadata: Option<Value>,
    /// `Some(None)` clears the checkpoint.
    pub checkpoint: Option<Option<Value>>,
    /// `Some(None)` removes the worker spec.
    pub worker: Option<Option<Value>>,
    pub event_id: Uuid,
    pub payload: Value,
    pub metadata: Value,
}

pub(crate) enum UpdateOut {
    Written(DateTime<Utc>),
    /// The session moved on (or is gone) since the update was planned.
    LostRace,
}

static UPDATE_SQL: LazyLock<String> = LazyLock::new(|| {
    let event = EventRow {
        source: "u",
        kind: EventKind::Updated,
        aggregate_id: "u.id",
        version: "u.version",
        event_id: "u.event_id",
        payload: "u.payload",
        metadata: "u.metadata",
        occurred_at: "u.updated_at",
    }
    .cte_numbered("e", "u.ord - 1");
    format!(
        "WITH {ANNOUNCE}, \
         v AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::jsonb[], \
                                    $6::jsonb[], $7::bool[], $8::jsonb[], $9::bool[], $10::jsonb[], \
                                    $11::uuid[], $12::jsonb[], $13::jsonb[]) \
               WITH ORDINALITY AS v(id, version, status, runtime_backend, context, runtime_metadata, \
                                    set_checkpoint, checkpoint, set_worker, worker, event_id, \
                                    payload, metadata, ord)), \
         u AS (UPDATE sessions s SET \
                   status = coalesce(v.status, s.status), \
                   runtime_backend = coalesce(v.runtime_backend, s.runtime_backend), \
                   context = coalesce(v.context, s.context), \
                   runtime_metadata = coalesce(v.runtime_metadata, s.runtime_metadata), \
                   checkpoint = CASE WHEN v.set_checkpoint THEN v.checkpoint ELSE s.checkpoint END, \
                   worker = CASE WHEN v.set_worker THEN v.worker ELSE s.worker END, \
                   version = v.version + 1, updated_at = now() \
               FROM announce, v WHERE s.id = v.id AND s.version = v.version \
               RETURNING s.id, s.version, s.updated_at, v.ord, v.event_id, v.payload, v.metadata), \
         {event} \
         SELECT u.event_id, u.updated_at FROM u"
    )
});

impl Batch for UpdateRow {
    const KIND: &'static str = "update";
    const WRITES: bool = true;

    fn queued(job: Job<Self>) -> Queued {
        Queued::Update(job)
    }
    type Out = UpdateOut;

    async fn run(conn: &mut PgConnection, cmds: &[Self]) -> Result<Vec<UpdateOut>, sqlx::Error> {
        // Rows in id order, so that two batches touching the same sessions
        // lock them in the same order rather than deadlock.
        let mut order: Vec<&UpdateRow> = cmds.iter().collect();
        order.sort_by_key(|c| c.id);
        let written = sqlx::query(UPDATE_SQL.as_str())
            .bind(column(order.iter().copied(), |c| c.id))
            .bind(column(order.iter().copied(), |c| c.version))
            .bind(column(order.iter().copied(), |c| c.status))
            .bind(column(order.iter().copied(), |c| c.runtime_backend))
            .bind(column(order.iter().copied(), |c| c.context.as_ref()))
            .bind(column(order.iter().copied(), |c| {
                c.runtime_metadata.as_ref()
            }))
            .bind(column(order.iter().copied(), |c| c.checkpoint.is_some()))
            .bind(column(order.iter().copied(), |c| {
                c.checkpoint.as_ref().and_then(Option::as_ref)
            }))
            .bind(column(order.iter().copied(), |c| c.worker.is_some()))
            .bind(column(order.iter().copied(), |c| {
                c.worker.as_ref().and_then(Option::as_ref)
            }))
            .bind(column(order.iter().copied(), |c| c.event_id))
            .bind(column(order.iter().copied(), |c| &c.payload))
            .bind(column(order.iter().copied(), |c| &c.metadata))
            .fetch_all(conn)
            .await?;
        // Event ids are unique per command: they name the rows written.
        let mut at: HashMap<Uuid, DateTime<Utc>> = HashMap::with_capacity(written.len());
        for row in written {
            at.insert(row.try_get("event_id")?, row.try_get("updated_at")?);
        }
        Ok(cmds
            .iter()
            .map(|c| {
                at.get(&c.event_id)
                    .map_or(UpdateOut::LostRace, |t| UpdateOut::Written(*t))
            })
            .collect())
    }
}

/// An update whose outcome does not depend on the stored state
/// ([`crate::domain::SessionPatch::blind_change`]), written in one round
/// trip: each named field is set where its stored value differs, and the
/// session's next version and its `session.updated` are written when any
/// does. No row (the session is gone, at another version than `expected`,
/// moved on while the statement waited for its lock, or nothing differs)
/// writes nothing, and its caller plans the patch against the state as
/// usual, which answers each of those cases.
pub(crate) struct PatchRow {
    pub id: Uuid,
    /// `If-Match`: only at this version.
    pub expected: Option<i64>,
    pub context: Option<Value>,
    pub runtime_metadata: Option<Value>,
    /// `Some(None)` clears the checkpoint.
    pub checkpoint: Option<Option<Value>>,
    pub runtime_backend: Option<&'static str>,
    pub event_id: Uuid,
    pub metadata: Value,
}

/// The session after the write and its event's payload, or `None` when
/// nothing was written.
pub(crate) type PatchOut = Option<Result<(SessionState, Value), StoreError>>;

static PATCH_SQL: LazyLock<String> = LazyLock::new(|| {
    let event = EventRow {
        source: "u",
        kind: EventKind::Updated,
        aggregate_id: "u.id",
        version: "u.version",
        event_id: "u.event_id",
        payload: "u.payload",
        metadata: "u.metadata",
        occurred_at: "u.updated_at",
    }
    .cte_numbered("e", "u.ord - 1");
    let returned = SESSION_COLUMNS
        .split(',')
        .map(|c| format!("s.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ");
    // A field is changed when named and its stored value differs; the
    // payload is `event::updated_payload`'s, built from those flags
    // (`updates` in name order, `changes` holding the new values).
    format!(
        "WITH {ANNOUNCE}, \
         v AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bool[], $4::jsonb[], $5::bool[], \
                                    $6::jsonb[], $7::bool[], $8::jsonb[], $9::text[], $10::uuid[], \
                                    $11::jsonb[]) \
               WITH ORDINALITY AS v(id, expected, set_context, context, set_metadata, \
                                    runtime_metadata, set_checkpoint, checkpoint, runtime_backend, \
                                    event_id, metadata, ord)), \
         d AS (SELECT v.*, s.version AS planned, \
                      v.set_checkpoint AND s.checkpoint IS DISTINCT FROM v.checkpoint AS dk, \
                      v.set_context AND s.context IS DISTINCT FROM v.context AS dc, \
                      v.runtime_backend IS NOT NULL \
                        AND s.runtime_backend IS DISTINCT FROM v.runtime_backend AS db, \
                      v.set_metadata AND s.runtime_metadata IS DISTINCT FROM v.runtime_metadata AS dm \
               FROM v JOIN sessions s ON s.id = v.id \
               WHERE v.expected IS NULL OR s.version = v.expected), \
         u AS (UPDATE sessions s SET \
                   checkpoint = CASE WHEN d.dk THEN d.checkpoint ELSE s.checkpoint END, \
                   context = CASE WHEN d.dc THEN d.context ELSE s.context END, \
                   runtime_backend = CASE WHEN d.db THEN d.runtime_backend ELSE s.runtime_backend END, \
                   runtime_metadata = CASE WHEN d.dm THEN d.runtime_metadata ELSE s.runtime_metadata END, \
                   version = d.planned + 1, updated_at = now() \
               FROM announce, d \
               WHERE s.id = d.id AND s.version = d.planned AND (d.dk OR d.dc OR d.db OR d.dm) \
               RETURNING {returned}, d.ord, d.event_id, d.metadata, \
                   jsonb_build_object( \
                       'agent_id', s.agent_id, 'status', s.status, \
                       'updates', to_jsonb(array_remove(ARRAY[ \
                           CASE WHEN d.dk THEN 'checkpoint' END, CASE WHEN d.dc THEN 'context' END, \
                           CASE WHEN d.db THEN 'runtime_backend' END, \
                           CASE WHEN d.dm THEN 'runtime_metadata' END]::text[], NULL)), \
                       'changes', \
                           CASE WHEN d.dk THEN jsonb_build_object('checkpoint', d.checkpoint) ELSE '{{}}'::jsonb END \
                        || CASE WHEN d.dc THEN jsonb_build_object('context', d.context) ELSE '{{}}'::jsonb END \
                        || CASE WHEN d.db THEN jsonb_build_object('runtime_backend', d.runtime_backend) ELSE '{{}}'::jsonb END \
                        || CASE WHEN d.dm THEN jsonb_build_object('runtime_metadata', d.runtime_metadata) ELSE '{{}}'::jsonb END \
                   ) AS payload), \
         {event} \
         SELECT u.* FROM u"
    )
});

impl Batch for PatchRow {
    /// Counted with the planned updates: the same request, one round trip.
    const KIND: &'static str = "update";
    const WRITES: bool = true;

    fn queued(job: Job<Self>) -> Queued {
        Queued::Patch(job)
    }
    type Out = PatchOut;

    async fn run(conn: &mut PgConnection, cmds: &[Self]) -> Result<Vec<PatchOut>, sqlx::Error> {
        // Rows in id order, so that two batches touching the same sessions
        // lock them in the same order rather than deadlock.
        let mut order: Vec<&PatchRow> = cmds.iter().collect();
        order.sort_by_key(|c| c.id);
        let written = sqlx::query(PATCH_SQL.as_str())
            .bind(column(order.iter().copied(), |c| c.id))
            .bind(column(order.iter().copied(), |c| c.expected))
            .bind(column(order.iter().copied(), |c| c.context.is_some()))
            .bind(column(order.iter().copied(), |c| c.context.as_ref()))
            .bind(column(order.iter().copied(), |c| {
                c.runtime_metadata.is_some()
            }))
            .bind(column(order.iter().copied(), |c| {
                c.runtime_metadata.as_ref()
            }))
            .bind(column(order.iter().copied(), |c| c.checkpoint.is_some()))
            .bind(column(order.iter().copied(), |c| {
                c.checkpoint.as_ref().and_then(Option::as_ref)
            }))
            .bind(column(order.iter().copied(), |c| c.runtime_backend))
            .bind(column(order.iter().copied(), |c| c.event_id))
            .bind(column(order.iter().copied(), |c| &c.metadata))
            .fetch_all(conn)
            .await?;
        // Event ids are unique per command: they name the rows written.
        let mut by_event: HashMap<Uuid, Result<(SessionState, Value), StoreError>> =
            HashMap::with_capacity(written.len());
        for row in written {
            let event_id: Uuid = row.try_get("event_id")?;
            let payload: Value = row.try_get("payload")?;
            let session = rows::session(&QueryResult::from(row));
            by_event.insert(event_id, session.map(|s| (s, payload)));
        }
        Ok(cmds.iter().map(|c| by_event.remove(&c.event_id)).collect())
    }
}

/// One column of a batch, for an array parameter (`unnest`).
pub(super) fn column<'a, T: 'a, U>(
    rows: impl IntoIterator<Item = &'a T>,
    f: impl Fn(&'a T) -> U,
) -> Vec<U> {
    rows.into_iter().map(f).collect()
}

fn by_id(rows: Vec<PgRow>, column: &str) -> Result<HashMap<Uuid, DateTime<Utc>>, sqlx::Error> {
    rows.iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get(column)?)))
        .collect()
}
