//! Replay: fold the event log back into sessions and compare with the
//! projection (G2). Streams aggregates in id order, a page at a time, so it
//! runs on a live database of any size without holding it in memory.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as Param};
use serde_json::Map;
use uuid::Uuid;

use super::rows::{self, EVENT_COLUMNS, SESSION_COLUMNS};
use super::{Store, StoreError, StoredEvent};
use crate::domain::event::changes_of;
use crate::domain::{EventKind, RuntimeBackend, SessionState, SessionStatus};

const PAGE: i64 = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayDifference {
    pub session_id: Uuid,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub sessions_checked: u64,
    pub events_read: u64,
    pub differences: Vec<ReplayDifference>,
}

/// The session a stream of events (from version 1, in order) leaves, or
/// `None` when it ends deleted. Replay, fork and import all use this one fold.
pub(crate) fn fold(events: &[StoredEvent]) -> Result<Option<SessionState>, String> {
    let mut state: Option<SessionState> = None;
    for (i, e) in events.iter().enumerate() {
        if e.version != i as i64 + 1 {
            return Err(format!(
                "version {} found where {} was expected",
                e.version,
                i + 1
            ));
        }
        match (e.kind, state.as_mut()) {
            (EventKind::Created, None) if i == 0 => {
                let mut s = SessionState {
                    id: e.aggregate_id,
                    agent_id: Uuid::nil(),
                    session_type: String::new(),
                    status: SessionStatus::Active,
                    context: Map::new(),
                    checkpoint: None,
                    runtime_backend: RuntimeBackend::Unknown,
                    runtime_metadata: Map::new(),
                    worker: None,
                    usage: Default::default(),
                    forked_from: None,
                    version: 1,
                    created_at: e.occurred_at,
                    updated_at: e.occurred_at,
                };
                s.apply(&changes_of(&e.payload).map_err(|err| format!("session.created {err}"))?);
                state = Some(s);
            }
            (EventKind::Updated, Some(s)) => {
                s.apply(&changes_of(&e.payload).map_err(|err| format!("session.updated {err}"))?);
                s.version = e.version;
                s.updated_at = e.occurred_at;
            }
            (EventKind::Deleted, Some(_)) => state = None,
            // Inputs and approvals keep their rows elsewhere: the session
            // only moves on by a version.
            (kind, Some(s)) if kind.moves_version_only() => {
                s.version = e.version;
                s.updated_at = e.occurred_at;
            }
            (kind, _) => {
                return Err(format!(
                    "{} at version {} does not follow",
                    kind.as_str(),
                    e.version
                ));
            }
        }
    }
    Ok(state)
}

fn describe(expected: &SessionState, actual: &SessionState) -> String {
    let mut fields = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if expected.$f != actual.$f { fields.push(stringify!($f)); }
        )*};
    }
    cmp!(
        agent_id,
        session_type,
        status,
        context,
        checkpoint,
        runtime_backend,
        runtime_metadata,
        worker,
        usage,
        forked_from,
        version,
        created_at,
        updated_at
    );
    format!("projection differs from the log in: {}", fields.join(", "))
}

impl Store {
    pub async fn replay_verify(&self) -> Result<ReplayReport, StoreError> {
        let mut report = ReplayReport::default();
        let mut after = Uuid::nil();
        loop {
            let ids: Vec<Uuid> = self
                .db
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT aggregate_id FROM events WHERE version = 1 AND aggregate_id > $1 \
                     ORDER BY aggregate_id LIMIT $2",
                    vec![after.into(), PAGE.into()],
                ))
                .await?
                .iter()
                .map(|r| r.try_get("", "aggregate_id"))
                .collect::<Result<_, _>>()?;
            let Some(last) = ids.last().copied() else {
                break;
            };
            let first = ids[0];
            let events = self
                .db
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id BETWEEN $1 AND $2 \
                         ORDER BY aggregate_id, version"
                    ),
                    vec![first.into(), last.into()],
                ))
                .await?
                .iter()
                .map(rows::event)
                .collect::<Result<Vec<_>, _>>()?;
            let projected: HashMap<Uuid, SessionState> = self
                .db
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id BETWEEN $1 AND $2"),
                    vec![Param::from(first), Param::from(last)],
                ))
                .await?
                .iter()
                .map(|r| rows::session(r).map(|s| (s.id, s)))
                .collect::<Result<_, _>>()?;
            report.events_read += events.len() as u64;
            for chunk in events.chunk_by(|a, b| a.aggregate_id == b.aggregate_id) {
                let id = chunk[0].aggregate_id;
                report.sessions_checked += 1;
                let difference = match (fold(chunk), projected.get(&id)) {
                    (Err(e), _) => Some(format!("event stream is invalid: {e}")),
                    (Ok(None), Some(_)) => {
                        Some("deleted in the log but present in sessions".into())
                    }
                    (Ok(Some(_)), None) => {
                        Some("present in the log but missing from sessions".into())
                    }
                    (Ok(Some(expected)), Some(actual)) if &expected != actual => {
                        Some(describe(&expected, actual))
                    }
                    _ => None,
                };
                if let Some(detail) = difference {
                    report.differences.push(ReplayDifference {
                        session_id: id,
                        detail,
                    });
                }
            }
            // Rows in this id range whose stream does not start at version 1.
            for id in projected.keys() {
                if !events.iter().any(|e| e.aggregate_id == *id) {
                    report.differences.push(ReplayDifference {
                        session_id: *id,
                        detail: "present in sessions with no session.created event".into(),
                    });
                }
            }
            after = last;
        }
        // Rows outside every page: sessions with no events at all.
        let orphans = self
            .db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT id FROM sessions s WHERE NOT EXISTS \
                 (SELECT 1 FROM events e WHERE e.aggregate_id = s.id AND e.version = 1)",
            ))
            .await?;
        for r in orphans {
            let id: Uuid = r.try_get("", "id")?;
            if !report.differences.iter().any(|d| d.session_id == id) {
                report.differences.push(ReplayDifference {
                    session_id: id,
                    detail: "present in sessions with no session.created event".into(),
                });
            }
        }
        Ok(report)
    }
}
