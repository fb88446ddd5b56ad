//! The one way an event enters the log, shared by every write statement.
//!
//! Every statement that appends an event opens with [`ANNOUNCE`]: a shared,
//! transaction-level advisory lock on a key of our own. The statement's
//! modifying parts read from that CTE, so the lock is held before the
//! transaction's id is assigned (ids are assigned lazily, at the first row
//! written) and until it commits or rolls back. Readers bound the feed by the
//! oldest *announced* writer (see `horizon.rs`), so a transaction of anyone
//! else, in this database or another one of the cluster, never holds the feed
//! back. Shared locks never wait for each other: writers do not serialise.

use crate::domain::EventKind;
use crate::domain::event::AGGREGATE_TYPE;

/// The CTE every event-writing statement starts with (the lock on
/// `migration::EVENT_WRITER_KEY`, which the schema's feed functions look
/// for); modifying CTEs select
/// `FROM announce` (or from a CTE that did), never from nothing.
pub(crate) const ANNOUNCE: &str = "announce AS MATERIALIZED \
     (SELECT pg_advisory_xact_lock_shared(1634169701, 2003986804)::text AS held)";

/// An event's position: the writing transaction's id × 1024 (plus its
/// index when a transaction writes several).
pub(crate) const POSITION: &str = "pg_current_xact_id()::text::bigint * 1024";

/// The `e` CTE: one `events` row per row of `source`, whose `version` and
/// `occurred_at` are expressions over it. `$id`, `$event_id`, `$payload` and
/// `$metadata` name the statement's parameters.
pub(crate) struct EventRow<'a> {
    pub source: &'a str,
    pub kind: EventKind,
    pub aggregate_id: &'a str,
    pub version: &'a str,
    pub event_id: &'a str,
    pub payload: &'a str,
    pub metadata: &'a str,
    pub occurred_at: &'a str,
}

impl<'a> EventRow<'a> {
    /// A `session.updated` event for the row the `u` CTE updated (returning
    /// `updated_at`), where `$1` is the session id, `$2` the version planned
    /// against and `$3` the event id.
    pub(crate) fn updated(payload: &'a str, metadata: &'a str) -> Self {
        Self {
            source: "u",
            kind: EventKind::Updated,
            aggregate_id: "$1",
            version: "$2 + 1",
            event_id: "$3",
            payload,
            metadata,
            occurred_at: "u.updated_at",
        }
    }

    /// The CTE `e`: the statement's only event.
    pub(crate) fn cte(&self) -> String {
        self.cte_as("e", 0)
    }

    /// The CTE `name` holding the statement's event number `index` (0, 1 …
    /// within the transaction, below 1024): its position is the
    /// transaction's id × 1024 + `index`.
    pub(crate) fn cte_as(&self, name: &str, index: u16) -> String {
        self.cte_numbered(name, &index.to_string())
    }

    /// The CTE `name` writing one event per row of `source`, the row's
    /// number within the transaction (below 1024) being the expression
    /// `index` (a statement that appends a batch of events numbers them).
    pub(crate) fn cte_numbered(&self, name: &str, index: &str) -> String {
        format!(
            "{name} AS (INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
                                      event_type, payload, metadata, occurred_at) \
                   SELECT {POSITION} + ({index}), {event_id}, '{AGGREGATE_TYPE}', {aggregate_id}, {version}, \
                          '{kind}', {payload}, {metadata}, {occurred_at} \
                   FROM {source} RETURNING position)",
            event_id = self.event_id,
            aggregate_id = self.aggregate_id,
            version = self.version,
            kind = self.kind.as_str(),
            payload = self.payload,
            metadata = self.metadata,
            occurred_at = self.occurred_at,
            source = self.source,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announce_cte_locks_the_writer_key() {
        let (a, b) = migration::EVENT_WRITER_KEY;
        assert!(ANNOUNCE.contains(&format!("pg_advisory_xact_lock_shared({a}, {b})")));
    }
}
