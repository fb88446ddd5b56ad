//! Portable sessions in the store: the CLI transcript (append-only chunks
//! keyed by byte offset), forks, and export/import of a whole session.
//!
//! A transcript chunk appends no event and leaves the session's version
//! alone (the runner uploads as the file grows; an event per chunk would
//! flood the feed); it records the version the session had when it was
//! stored, which is how a transcript is cut "as of" a version. A fork is one
//! statement (the parent moves on by `session.forked`, the child is created
//! with its `session.created` and its copy of the transcript). An import is
//! one transaction of several statements.

use chrono::{DateTime, Utc};
use sea_orm::{
    AccessMode, ConnectionTrait, DbErr, IsolationLevel, SqlErr, TransactionTrait, Value as Param,
};
use serde_json::{Value, json};
use tracing::instrument;
use uuid::Uuid;

use super::append::{ANNOUNCE, EventRow, POSITION};
use super::live::{APPROVAL_COLUMNS, INPUT_COLUMNS, approval_row, input_row, moved_on};
use super::replay::fold;
use super::rows::{self, EVENT_COLUMNS, INSERT_COLUMNS, SESSION_COLUMNS};
use super::sessions::{Appended, Attempt, json, metadata, new_session_values, stmt, typed_json};
use super::{Store, StoreError, StoredEvent, StoredMessage};
use crate::contract::format_time;
use crate::contract::live::{Approval, Input};
use crate::domain::CreateSession;
use crate::domain::event;
use crate::domain::transcript::rename_session;
use crate::domain::{
    DomainError, EventKind, EventMetadata, ForkedFrom, SessionState, SessionStatus,
};

/// Attempts at a write that keeps losing to concurrent ones before 409.
const MAX_ATTEMPTS: usize = 64;

/// Events an import writes per transaction id (positions are the id × 1024
/// plus the index, so fewer than 1024).
const EVENTS_PER_ID: usize = 1000;

/// One stored piece of a transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptChunk {
    pub offset: i64,
    /// The session's version when it was stored.
    pub version: i64,
    pub bytes: Vec<u8>,
}

/// What a fork asks for.
#[derive(Debug, Clone)]
pub struct ForkPlan {
    /// The parent's version to fork as of; its current one when `None`.
    pub at_version: Option<i64>,
    /// Merged into the parent's worker spec (RFC 7396).
    pub worker: Option<Value>,
    pub status: SessionStatus,
}

/// A fork as committed: the child, and the two events (the child's
/// `session.created`, the parent's `session.forked`).
#[derive(Debug, Clone)]
pub struct Forked {
    pub child: SessionState,
    pub appended: [Appended; 2],
}

/// Everything of one session, read in one snapshot.
#[derive(Debug, Clone)]
pub struct SessionDump {
    pub session: SessionState,
    pub events: Vec<StoredEvent>,
    pub messages: Vec<StoredMessage>,
    pub inputs: Vec<Input>,
    pub approvals: Vec<Approval>,
    pub transcript: Vec<TranscriptChunk>,
}

/// A checked import: `session` is the fold of `events`, every row already
/// under the id it is imported as.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    pub session: SessionState,
    pub events: Vec<StoredEvent>,
    pub messages: Vec<StoredMessage>,
    /// Each with the session's version after the event that queued it.
    pub inputs: Vec<(Input, i64)>,
    pub approvals: Vec<Approval>,
    pub transcript: Vec<TranscriptChunk>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A session's chunks in offset order, those stored at or below
/// `at_version` when given.
async fn chunks(
    db: &impl ConnectionTrait,
    id: Uuid,
    at_version: Option<i64>,
) -> Result<Vec<TranscriptChunk>, StoreError> {
    db.query_all_raw(stmt(
        "SELECT start_offset, version, bytes FROM session_transcript_chunks \
         WHERE session_id = $1 AND version <= coalesce($2, version) ORDER BY start_offset",
        vec![id.into(), at_version.into()],
    ))
    .await?
    .iter()
    .map(|r| {
        Ok(TranscriptChunk {
            offset: r.try_get("", "start_offset")?,
            version: r.try_get("", "version")?,
            bytes: r.try_get("", "bytes")?,
        })
    })
    .collect()
}

/// A unique violation in an import is a concurrent import of the same
/// session or events: the client's 409, not our 500.
fn clash(e: DbErr) -> StoreError {
    match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(m)) => {
            StoreError::Refused(format!("the import clashes with stored data: {m}"))
        }
        _ => e.into(),
    }
}

impl Store {
    /// Store the bytes of `body` at byte `offset` of the session's
    /// transcript and return the stored length. Idempotent by offset: the
    /// part of `body` below the stored length must equal the stored bytes
    /// (a retry, a duplicate, an overlap) and only the rest is appended.
    /// An offset past the end is a gap (409 with the length); growing past
    /// `limit` bytes is refused (413); nothing is written then.
    #[instrument(skip(self, body), fields(session_id = %id, bytes = body.len()))]
    pub async fn append_transcript(
        &self,
        id: Uuid,
        offset: i64,
        body: &[u8],
        limit: i64,
    ) -> Result<i64, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let length: i64 = self
                .db
                .query_one_raw(stmt(
                    "SELECT coalesce((SELECT max(start_offset + octet_length(bytes)) \
                        FROM session_transcript_chunks WHERE session_id = $1), 0)::bigint AS length \
                     FROM sessions WHERE id = $1",
                    vec![id.into()],
                ))
                .await?
                .ok_or(StoreError::NotFound(id))?
                .try_get("", "length")?;
            if offset > length {
                return Err(StoreError::TranscriptConflict {
                    detail: format!(
                        "offset {offset} leaves a gap: the stored transcript has {length} bytes; \
                         send from offset {length}"
                    ),
                    length,
                });
            }
            let end = offset + body.len() as i64;
            let overlap = (end.min(length) - offset) as usize;
            if overlap > 0 {
                let stored = self
                    .transcript_range(id, offset, offset + overlap as i64)
                    .await?;
                if stored != body[..overlap] {
                    return Err(StoreError::TranscriptConflict {
                        detail: format!(
                            "bytes {offset} to {} conflict with the stored transcript",
                            offset + overlap as i64
                        ),
                        length,
                    });
                }
            }
            let new = &body[overlap..];
            if new.is_empty() {
                return Ok(length);
            }
            let grown = length + new.len() as i64;
            if grown > limit {
                return Err(StoreError::TooLarge(format!(
                    "the transcript would grow to {grown} bytes, over the limit of {limit} \
                     (api.max_transcript_bytes)"
                )));
            }
            // Appended only while `length` is still the end; a concurrent
            // upload at the same offset waits on the key, then stores
            // nothing, and the next attempt compares again.
            let stored = self
                .db
                .query_one_raw(stmt(
                    "INSERT INTO session_transcript_chunks (session_id, start_offset, bytes, version, created_at) \
                     SELECT s.id, $2, $3, s.version, now() \
                     FROM (SELECT id, version FROM sessions WHERE id = $1 FOR SHARE) s \
                     WHERE NOT EXISTS (SELECT 1 FROM session_transcript_chunks \
                                       WHERE session_id = $1 AND start_offset + octet_length(bytes) > $2) \
                     ON CONFLICT (session_id, start_offset) DO NOTHING RETURNING 1 AS one",
                    vec![id.into(), length.into(), Param::Bytes(Some(new.to_vec()))],
                ))
                .await?;
            if stored.is_some() {
                return Ok(grown);
            }
        }
        Err(StoreError::Contended(id))
    }

    /// The stored bytes in `from..to`.
    async fn transcript_range(&self, id: Uuid, from: i64, to: i64) -> Result<Vec<u8>, StoreError> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT start_offset, bytes FROM session_transcript_chunks \
                 WHERE session_id = $1 AND start_offset < $3 AND start_offset + octet_length(bytes) > $2 \
                 ORDER BY start_offset",
                vec![id.into(), from.into(), to.into()],
            ))
            .await?;
        let mut out = Vec::with_capacity((to - from) as usize);
        for r in rows {
            let start: i64 = r.try_get("", "start_offset")?;
            let bytes: Vec<u8> = r.try_get("", "bytes")?;
            let lo = (from - start).max(0) as usize;
            let hi = ((to - start) as usize).min(bytes.len());
            out.extend_from_slice(&bytes[lo..hi]);
        }
        Ok(out)
    }

    /// The session's transcript chunks (those stored at or below
    /// `at_version` when given), in order.
    pub async fn transcript(
        &self,
        id: Uuid,
        at_version: Option<i64>,
    ) -> Result<Vec<TranscriptChunk>, StoreError> {
        chunks(&self.db, id, at_version).await
    }

    /// Fork `parent` as of a version: in one statement the child is created
    /// (`session.created` with `forked_from`) with the parent's transcript
    /// up to that version under its own id, and the parent appends
    /// `session.forked`. Refused, writing nothing: an unknown parent (404),
    /// a version out of range or an invalid worker spec (422).
    #[instrument(skip(self, plan, meta), fields(session_id = %parent))]
    pub async fn fork(
        &self,
        parent: Uuid,
        plan: &ForkPlan,
        meta: &EventMetadata,
    ) -> Result<Forked, StoreError> {
        let child_event = EventRow {
            source: "s",
            kind: EventKind::Created,
            aggregate_id: "$6",
            version: "1",
            event_id: "$16",
            payload: "$17",
            metadata: "$4",
            occurred_at: "s.created_at",
        }
        .cte_as("ec", 0);
        let parent_event = EventRow {
            source: "u",
            kind: EventKind::Forked,
            aggregate_id: "$1",
            version: "$2 + 1",
            event_id: "$3",
            payload: "$5",
            metadata: "$4",
            occurred_at: "u.updated_at",
        }
        .cte_as("ep", 1);
        // The guard on the parent's transcript length as of the version
        // keeps a chunk stored meanwhile (at that same version) from being
        // left out of the copy.
        let sql = format!(
            "WITH {ANNOUNCE}, \
             u AS (UPDATE sessions SET version = $2 + 1, updated_at = now() FROM announce \
                   WHERE id = $1 AND version = $2 \
                     AND (SELECT coalesce(sum(octet_length(bytes)), 0)::bigint FROM session_transcript_chunks \
                          WHERE session_id = $1 AND version <= $15) = $18 \
                   RETURNING updated_at), \
             s AS (INSERT INTO sessions ({INSERT_COLUMNS}) \
                   SELECT $6, $7, $8, $9, $10, $11, $12, $13, $14, $1, $15, 1, u.updated_at, u.updated_at \
                   FROM u RETURNING created_at), \
             t AS (INSERT INTO session_transcript_chunks (session_id, start_offset, bytes, version, created_at) \
                   SELECT $6, 0, $19, 1, s.created_at FROM s WHERE octet_length($19) > 0), \
             {child_event}, {parent_event} \
             SELECT u.updated_at FROM u, s, ec, ep"
        );
        self.on_version(parent, None, async |current| {
            let n = plan.at_version.unwrap_or(current.version);
            if n < 1 || n > current.version {
                return Err(DomainError::invalid(
                    "at_version",
                    format!(
                        "must be between 1 and the session's version {}",
                        current.version
                    ),
                )
                .into());
            }
            let events = self.session_events(parent, 0, n as u64).await?;
            let as_of = fold(&events)
                .map_err(corrupt)?
                .ok_or_else(|| corrupt("a stored session's stream ends deleted"))?;
            let forked_from = ForkedFrom {
                session_id: parent,
                version: n,
            };
            let cmd = as_of.fork_command(
                current.runtime_backend,
                plan.worker.as_ref(),
                plan.status,
                forked_from,
            )?;
            let child = Uuid::now_v7();
            let copied = self.transcript(parent, Some(n)).await?;
            let copied_len: i64 = copied.iter().map(|c| c.bytes.len() as i64).sum();
            let whole: Vec<u8> = copied.into_iter().flat_map(|c| c.bytes).collect();
            let transcript = rename_session(&whole, &child.to_string());
            let created = event::created_payload(&cmd);
            let forked = event::forked_payload(&current, child, n);
            let mut values: Vec<Param> = vec![
                parent.into(),
                current.version.into(),
                event::new_event_id().into(),
                metadata(meta)?,
                json(forked.clone()),
                child.into(),
            ];
            values.extend(new_session_values(&cmd)?);
            values.extend([
                n.into(),
                event::new_event_id().into(),
                json(created.clone()),
                copied_len.into(),
                Param::Bytes(Some(transcript)),
            ]);
            let Some(row) = self.db.query_one_raw(stmt(&sql, values)).await? else {
                return Ok(Attempt::LostRace);
            };
            let at: DateTime<Utc> = row.try_get("", "updated_at")?;
            let child_state = SessionState::from_create(child, &cmd, at);
            let parent_state = moved_on(&current, at);
            Ok(Attempt::Done(Forked {
                appended: [
                    Appended::new(&child_state, EventKind::Created, &created),
                    Appended::new(&parent_state, EventKind::Forked, &forked),
                ],
                child: child_state,
            }))
        })
        .await
    }

    /// The session with its events, messages, inputs, approvals and
    /// transcript, read in one snapshot; `None` for an unknown session.
    #[instrument(skip(self))]
    pub async fn export(&self, id: Uuid) -> Result<Option<SessionDump>, StoreError> {
        let txn = self
            .db
            .begin_with_config(
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?;
        let one = |sql: String| stmt(&sql, vec![id.into()]);
        let Some(session) = txn
            .query_one_raw(one(format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
            )))
            .await?
        else {
            return Ok(None);
        };
        let session = rows::session(&session)?;
        let events = txn
            .query_all_raw(one(format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY version"
            )))
            .await?
            .iter()
            .map(rows::event)
            .collect::<Result<_, _>>()?;
        let messages = txn
            .query_all_raw(one(
                "SELECT seq, message, created_at FROM session_messages WHERE session_id = $1 \
                 ORDER BY seq"
                    .into(),
            ))
            .await?
            .iter()
            .map(rows::message)
            .collect::<Result<_, _>>()?;
        let inputs = txn
            .query_all_raw(one(format!(
                "SELECT {INPUT_COLUMNS} FROM session_inputs WHERE session_id = $1 ORDER BY seq"
            )))
            .await?
            .iter()
            .map(|r| input_row(r).map(|(i, _)| i))
            .collect::<Result<_, _>>()?;
        let approvals = txn
            .query_all_raw(one(format!(
                "SELECT {APPROVAL_COLUMNS} FROM session_approvals WHERE session_id = $1 \
                 ORDER BY requested_at, request_id"
            )))
            .await?
            .iter()
            .map(approval_row)
            .collect::<Result<_, _>>()?;
        let transcript = chunks(&txn, id, None).await?;
        txn.commit().await?;
        Ok(Some(SessionDump {
            session,
            events,
            messages,
            inputs,
            approvals,
            transcript,
        }))
    }

    /// Write a checked import in one transaction: the session row, its
    /// events (their ids, versions, payloads, metadata and `occurred_at` as
    /// given, new positions), messages, inputs, approvals and transcript.
    /// An id, or an event id, this database already holds is refused (409)
    /// and nothing is written.
    ///
    /// Positions: the first 1000 events take the transaction's id × 1024
    /// plus their index, as any write does. Each further 1000 are written in
    /// a subtransaction, whose own id (assigned when it first writes, and
    /// higher than the transaction's) gives them theirs. The transaction
    /// announced itself as a writer before it had an id, so the feed's
    /// horizon stays below all of them until it commits (docs/design.md,
    /// positions).
    #[instrument(skip_all, fields(session_id = %plan.session.id, events = plan.events.len()))]
    pub async fn import(&self, plan: &ImportPlan) -> Result<Appended, StoreError> {
        let s = &plan.session;
        let id = s.id;
        let first = plan
            .events
            .first()
            .ok_or_else(|| corrupt("an import without events"))?;
        let appended = Appended::new(s, EventKind::Created, &first.payload);
        let txn = self.db.begin().await?;
        let inserted = txn
            .query_one_raw(stmt(
                &format!(
                    "WITH {ANNOUNCE}, \
                     s AS (INSERT INTO sessions ({INSERT_COLUMNS}, usage) \
                           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15 \
                           FROM announce ON CONFLICT (id) DO NOTHING RETURNING id) \
                     SELECT id FROM s"
                ),
                std::iter::once(id.into())
                    .chain(new_session_values(&CreateSession::from(s))?)
                    .chain([
                        s.forked_from.map(|f| f.session_id).into(),
                        s.forked_from.map(|f| f.version).into(),
                        s.version.into(),
                        s.created_at.into(),
                        s.updated_at.into(),
                        typed_json(&s.usage)?,
                    ])
                    .collect(),
            ))
            .await
            .map_err(clash)?;
        if inserted.is_none() {
            return Err(StoreError::Refused(format!("session {id} already exists")));
        }
        let event_ids: Vec<Value> = plan.events.iter().map(|e| json!(e.event_id)).collect();
        let taken = txn
            .query_one_raw(stmt(
                "SELECT (SELECT count(*) FROM events WHERE aggregate_id = $1)::bigint \
                        + (SELECT count(*) FROM session_tombstones WHERE session_id = $1)::bigint AS stream, \
                        (SELECT count(*) FROM events WHERE event_id IN \
                           (SELECT x::uuid FROM jsonb_array_elements_text($2) x))::bigint AS ids",
                vec![id.into(), json(Value::Array(event_ids))],
            ))
            .await?
            .ok_or_else(|| corrupt("a count returned nothing"))?;
        if taken.try_get::<i64>("", "stream")? > 0 {
            return Err(StoreError::Refused(format!(
                "the event log already holds session {id} (it was deleted here); import it with new_id=true"
            )));
        }
        if taken.try_get::<i64>("", "ids")? > 0 {
            return Err(StoreError::Refused(
                "the event log already holds events of this document; import it with new_id=true"
                    .into(),
            ));
        }
        for (k, batch) in plan.events.chunks(EVENTS_PER_ID).enumerate() {
            let base = if k == 0 {
                POSITION.to_owned()
            } else {
                txn.execute_unprepared(&format!("SAVEPOINT import_{k}"))
                    .await?;
                let row = txn
                    .query_one_raw(stmt(
                        "UPDATE sessions SET updated_at = updated_at WHERE id = $1 \
                         RETURNING xmin::text::bigint AS sub, pg_current_xact_id()::text::bigint AS top",
                        vec![id.into()],
                    ))
                    .await?
                    .ok_or_else(|| corrupt("the imported session vanished"))?;
                let (sub, top): (i64, i64) = (row.try_get("", "sub")?, row.try_get("", "top")?);
                // `xmin` is the 32-bit id; give it the epoch of the top id
                // (it was assigned after it, so it is not below it).
                let mut full = (top >> 32 << 32) | sub;
                if full < top {
                    full += 1 << 32;
                }
                format!("{}", full * 1024)
            };
            let rows: Vec<Value> = batch
                .iter()
                .map(|e| {
                    json!({
                        "event_id": e.event_id,
                        "version": e.version,
                        "event_type": e.kind.as_str(),
                        "payload": e.payload,
                        "metadata": e.metadata,
                        "occurred_at": format_time(&e.occurred_at),
                    })
                })
                .collect();
            txn.execute_raw(stmt(
                &format!(
                    "INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
                                         event_type, payload, metadata, occurred_at) \
                     SELECT {base} + o.i - 1, (o.x->>'event_id')::uuid, '{agg}', $1, \
                            (o.x->>'version')::bigint, o.x->>'event_type', o.x->'payload', \
                            o.x->'metadata', (o.x->>'occurred_at')::timestamptz \
                     FROM jsonb_array_elements($2) WITH ORDINALITY AS o(x, i)",
                    agg = crate::domain::event::AGGREGATE_TYPE,
                ),
                vec![id.into(), json(Value::Array(rows))],
            ))
            .await
            .map_err(clash)?;
            if k > 0 {
                txn.execute_unprepared(&format!("RELEASE SAVEPOINT import_{k}"))
                    .await?;
            }
        }
        let messages: Vec<Value> = plan
            .messages
            .iter()
            .map(|m| json!({"seq": m.seq, "message": m.message, "created_at": format_time(&m.created_at)}))
            .collect();
        let inputs: Vec<Value> = plan
            .inputs
            .iter()
            .map(|(i, version)| {
                json!({"seq": i.seq, "id": i.id, "kind": i.kind.as_str(), "body": i.body,
                       "actor": i.actor, "version": version, "created_at": i.created_at})
            })
            .collect();
        let approvals = serde_json::to_value(&plan.approvals).map_err(corrupt)?;
        let mut whole = Vec::new();
        let mut layout = Vec::new();
        for c in &plan.transcript {
            layout.push(json!({"offset": c.offset, "length": c.bytes.len(), "version": c.version}));
            whole.extend_from_slice(&c.bytes);
        }
        txn.execute_raw(stmt(
            "WITH m AS (INSERT INTO session_messages (session_id, seq, message, created_at) \
                        SELECT $1, (x->>'seq')::bigint, x->'message', (x->>'created_at')::timestamptz \
                        FROM jsonb_array_elements($2) x), \
                  i AS (INSERT INTO session_inputs (session_id, seq, id, kind, body, actor, version, created_at) \
                        SELECT $1, (x->>'seq')::bigint, (x->>'id')::uuid, x->>'kind', x->'body', x->>'actor', \
                               (x->>'version')::bigint, (x->>'created_at')::timestamptz \
                        FROM jsonb_array_elements($3) x), \
                  a AS (INSERT INTO session_approvals (session_id, request_id, tool_name, input, generation, \
                            tool_use_id, status, requested_at, decided_at, decided_by, message, updated_input, reason) \
                        SELECT $1, x->>'request_id', x->>'tool_name', x->'input', (x->>'generation')::bigint, \
                               x->>'tool_use_id', x->>'status', (x->>'requested_at')::timestamptz, \
                               (x->>'decided_at')::timestamptz, x->>'decided_by', x->>'message', \
                               nullif(x->'updated_input', 'null'::jsonb), x->>'reason' \
                        FROM jsonb_array_elements($4) x) \
             INSERT INTO session_transcript_chunks (session_id, start_offset, bytes, version, created_at) \
             SELECT $1, (c->>'offset')::bigint, \
                    substring($5 FROM (c->>'offset')::int + 1 FOR (c->>'length')::int), \
                    (c->>'version')::bigint, now() \
             FROM jsonb_array_elements($6) c",
            vec![
                id.into(),
                json(Value::Array(messages)),
                json(Value::Array(inputs)),
                json(approvals),
                Param::Bytes(Some(whole)),
                json(Value::Array(layout)),
            ],
        ))
        .await
        .map_err(clash)?;
        txn.commit().await?;
        Ok(appended)
    }
}
