//! Session metrics: what a session's events say about its life (time in
//! each status, pauses, crashes, worker generations, spend), folded one
//! event at a time.
//!
//! One fold serves both readers: `GET /sessions/{id}/metrics` folds a
//! session's whole stream, and the analytics consumer folds each new event
//! into the summary it keeps per session. Only the three events that change
//! the session's fields move a tally; the others (inputs, approvals, forks)
//! only move `last_event_at`. docs/design.md (9.5) defines each figure.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::event::EventKind;
use super::session::SessionStatus;

/// The runner's cumulative totals, as one event's
/// `changes.runtime_metadata.worker` records them (absent fields are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerTotals {
    pub generation: i64,
    pub restarts: i64,
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micro_usd: i64,
}

/// What one event says that a tally reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TallyChange {
    pub agent_id: Option<Uuid>,
    pub session_type: Option<String>,
    pub status: Option<SessionStatus>,
    /// `Some` when the event set `runtime_metadata` (the worker record in
    /// it, all zero when there is none).
    pub worker: Option<WorkerTotals>,
}

impl TallyChange {
    /// Whether the event says nothing a tally reads (an update of
    /// `context` or `checkpoint` alone): folded, it changes no tally.
    /// Compared with the default as a whole, so a field added later counts
    /// without this having to know of it.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A session's figures as of its last folded event. Times in microseconds.
/// Less its last event's time and its deletion, it is a row of the
/// analytics projection (deleted sessions leave it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub session_id: Uuid,
    pub agent_id: Uuid,
    pub session_type: String,
    pub status: SessionStatus,
    pub created_at: DateTime<Utc>,
    /// When the current status began (for `completed`, when the session ended).
    pub status_since: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Closed stretches per status: `active`, `paused`, `crashed`.
    pub active_us: i64,
    pub paused_us: i64,
    pub crashed_us: i64,
    /// Moves into `paused`.
    pub pauses: i64,
    /// Moves `paused` → `active`.
    pub resumes: i64,
    /// Moves `crashed` → `active`.
    pub recoveries: i64,
    /// Moves into `crashed`.
    pub crashes: i64,
    /// The highest worker generation recorded.
    pub worker_generations: i64,
    /// The rest, as the latest worker record holds them.
    pub restarts: i64,
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micro_usd: i64,
}

/// Microseconds from `a` to `b`.
pub fn micros_between(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX)
}

impl Tally {
    /// The tally a `session.created` starts.
    pub fn created(session_id: Uuid, at: DateTime<Utc>, change: &TallyChange) -> Self {
        let worker = change.worker.unwrap_or_default();
        Self {
            session_id,
            agent_id: change.agent_id.unwrap_or_default(),
            session_type: change.session_type.clone().unwrap_or_default(),
            status: change.status.unwrap_or(SessionStatus::Active),
            created_at: at,
            status_since: at,
            last_event_at: at,
            deleted_at: None,
            active_us: 0,
            paused_us: 0,
            crashed_us: 0,
            pauses: 0,
            resumes: 0,
            recoveries: 0,
            crashes: 0,
            worker_generations: worker.generation,
            restarts: worker.restarts,
            turns: worker.turns,
            input_tokens: worker.input_tokens,
            output_tokens: worker.output_tokens,
            cost_micro_usd: worker.cost_micro_usd,
        }
    }

    /// Fold an event that follows the ones folded so far.
    pub fn apply(&mut self, kind: EventKind, at: DateTime<Utc>, change: &TallyChange) {
        self.last_event_at = at;
        match kind {
            EventKind::Updated => {
                if let Some(id) = change.agent_id {
                    self.agent_id = id;
                }
                if let Some(t) = &change.session_type {
                    self.session_type.clone_from(t);
                }
                if let Some(to) = change.status.filter(|s| *s != self.status) {
                    self.close_stretch(at);
                    match (self.status, to) {
                        (SessionStatus::Paused, SessionStatus::Active) => self.resumes += 1,
                        (SessionStatus::Crashed, SessionStatus::Active) => self.recoveries += 1,
                        (_, SessionStatus::Paused) => self.pauses += 1,
                        (_, SessionStatus::Crashed) => self.crashes += 1,
                        _ => {}
                    }
                    self.status = to;
                    self.status_since = at;
                }
                if let Some(w) = change.worker {
                    self.worker_generations = self.worker_generations.max(w.generation);
                    self.restarts = w.restarts;
                    self.turns = w.turns;
                    self.input_tokens = w.input_tokens;
                    self.output_tokens = w.output_tokens;
                    self.cost_micro_usd = w.cost_micro_usd;
                }
            }
            EventKind::Deleted => {
                self.close_stretch(at);
                self.status_since = at;
                self.deleted_at = Some(at);
            }
            _ => {}
        }
    }

    /// Add the stretch in the current status up to `at` to its total
    /// (`completed` is final and counts no time).
    fn close_stretch(&mut self, at: DateTime<Utc>) {
        let us = micros_between(self.status_since, at);
        match self.status {
            SessionStatus::Active => self.active_us = self.active_us.saturating_add(us),
            SessionStatus::Paused => self.paused_us = self.paused_us.saturating_add(us),
            SessionStatus::Crashed => self.crashed_us = self.crashed_us.saturating_add(us),
            SessionStatus::Completed => {}
        }
    }

    /// Whether the session's life is over: completed or deleted.
    pub fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.deleted_at
            .or((self.status == SessionStatus::Completed).then_some(self.status_since))
    }

    /// Time spent in each status (`active`, `paused`, `crashed`) up to the
    /// end of the session, or up to `as_of` while it lives.
    pub fn time_in_status_us(&self, as_of: DateTime<Utc>) -> [i64; 3] {
        let mut t = [self.active_us, self.paused_us, self.crashed_us];
        if self.ended_at().is_none() {
            let open = micros_between(self.status_since, as_of).max(0);
            match self.status {
                SessionStatus::Active => t[0] = t[0].saturating_add(open),
                SessionStatus::Paused => t[1] = t[1].saturating_add(open),
                SessionStatus::Crashed => t[2] = t[2].saturating_add(open),
                SessionStatus::Completed => {}
            }
        }
        t
    }

    /// From creation to the end of the session, or to `as_of` while it lives.
    pub fn duration_us(&self, as_of: DateTime<Utc>) -> i64 {
        micros_between(self.created_at, self.ended_at().unwrap_or(as_of)).max(0)
    }
}

/// Fold a whole stream, from its `session.created`. `None` when the stream
/// does not start with one.
pub fn tally<'a>(
    session_id: Uuid,
    events: impl IntoIterator<Item = (EventKind, DateTime<Utc>, &'a TallyChange)>,
) -> Option<Tally> {
    let mut events = events.into_iter();
    let (kind, at, change) = events.next()?;
    if kind != EventKind::Created {
        return None;
    }
    let mut t = Tally::created(session_id, at, change);
    for (kind, at, change) in events {
        t.apply(kind, at, change);
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn status(s: SessionStatus) -> TallyChange {
        TallyChange {
            status: Some(s),
            ..TallyChange::default()
        }
    }

    #[test]
    fn only_a_change_of_what_a_tally_reads_is_not_empty() {
        use crate::contract::metrics::tally_change;
        use serde_json::json;
        let update = |changes: serde_json::Value| {
            tally_change(EventKind::Updated, &json!({"changes": changes}))
        };
        // What the analytics read leaves of a context or checkpoint edit.
        assert!(update(json!({})).is_empty());
        assert!(!update(json!({"status": "paused"})).is_empty());
        assert!(!update(json!({"session_type": "task"})).is_empty());
        assert!(!update(json!({"runtime_metadata": {}})).is_empty());
        assert!(!status(SessionStatus::Active).is_empty());
    }

    #[test]
    fn stretches_and_moves_are_counted_per_status() {
        use SessionStatus::*;
        let none = TallyChange::default();
        let created = status(Active);
        let (p, a, c, d) = (
            status(Paused),
            status(Active),
            status(Crashed),
            status(Completed),
        );
        let events = [
            (EventKind::Created, at(0), &created),
            (EventKind::Updated, at(10), &p),
            (EventKind::InputReceived, at(12), &none),
            (EventKind::Updated, at(15), &a),
            (EventKind::Updated, at(20), &c),
            (EventKind::Updated, at(26), &a),
            (EventKind::Updated, at(30), &d),
        ];
        let t = tally(Uuid::nil(), events).unwrap();
        assert_eq!((t.pauses, t.resumes, t.crashes, t.recoveries), (1, 1, 1, 1));
        let s = 1_000_000;
        assert_eq!(t.time_in_status_us(at(1000)), [19 * s, 5 * s, 6 * s]);
        assert_eq!(t.duration_us(at(1000)), 30 * s);
        assert_eq!(t.ended_at(), Some(at(30)));
        assert_eq!(t.last_event_at, at(30));
    }

    #[test]
    fn a_live_session_counts_up_to_as_of_and_a_deleted_one_up_to_its_deletion() {
        let created = status(SessionStatus::Paused);
        let mut t = Tally::created(Uuid::nil(), at(0), &created);
        assert_eq!(t.pauses, 0, "created paused is not a pause");
        let later = at(0) + Duration::microseconds(2_500_001);
        assert_eq!(t.time_in_status_us(later), [0, 2_500_001, 0]);
        assert_eq!(t.duration_us(later), 2_500_001);
        t.apply(EventKind::Deleted, at(7), &TallyChange::default());
        assert_eq!(t.time_in_status_us(at(100)), [0, 7_000_000, 0]);
        assert_eq!(t.duration_us(at(100)), 7_000_000);
    }

    #[test]
    fn spend_follows_the_latest_worker_record_and_generations_their_highest() {
        let created = TallyChange::default();
        let mut t = Tally::created(Uuid::nil(), at(0), &created);
        let w = |generation, cost| TallyChange {
            worker: Some(WorkerTotals {
                generation,
                cost_micro_usd: cost,
                turns: 2,
                ..WorkerTotals::default()
            }),
            ..TallyChange::default()
        };
        t.apply(EventKind::Updated, at(1), &w(2, 500));
        t.apply(EventKind::Updated, at(2), &w(0, 700));
        assert_eq!(
            (t.worker_generations, t.cost_micro_usd, t.turns),
            (2, 700, 2)
        );
    }

    #[test]
    fn a_stream_must_start_with_its_creation() {
        let c = TallyChange::default();
        assert!(tally(Uuid::nil(), [(EventKind::Updated, at(0), &c)]).is_none());
    }
}
