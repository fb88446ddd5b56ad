//! The worker table both backends keep: one slot per session with a
//! worker, holding its generation, whether a stop is under way and, once it
//! ended, its exit until the controller has recorded it. What a backend
//! needs beyond that (a process group, a pod and its watch) rides along as
//! the slot's `handle`.
//!
//! Everything the controller asks a backend about its workers (`observe`,
//! `exit_of`, `running`, `sessions`) is answered here, the same way for
//! both.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::backend::WorkerExit;
use super::claude::{ExitInfo, Outcome, RunSummary};
use super::cost::Spend;
use super::driver::Live;
use super::reconcile::{StopReason, WorkerState};
use std::sync::Arc;

/// Lock a mutex whose data stays usable even if a holder panicked (a
/// panic while holding the lock leaves plain data behind; keep going).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Slot<H> {
    pub generation: u64,
    pub started_at: DateTime<Utc>,
    /// The stop under way, once the runner asked for one.
    pub stop: Option<StopReason>,
    pub exit: Option<WorkerExit>,
    /// Shared with the worker's driver.
    pub live: Arc<Live>,
    pub handle: H,
}

impl<H> Slot<H> {
    pub fn new(generation: u64, started_at: DateTime<Utc>, handle: H) -> Self {
        Self {
            generation,
            started_at,
            stop: None,
            exit: None,
            live: Arc::default(),
            handle,
        }
    }

    fn live(&self) -> bool {
        self.exit.is_none()
    }
}

/// How a worker ended, as its supervisor saw it.
pub struct Ended {
    pub outcome: Outcome,
    pub exit: ExitInfo,
    pub summary: RunSummary,
    /// Everything the session's workers spent, this one included.
    pub spend: Spend,
    /// The last input the worker took.
    pub input_seq: i64,
    pub pid: Option<i32>,
}

pub struct WorkerTable<H> {
    slots: Mutex<HashMap<Uuid, Slot<H>>>,
}

impl<H> Default for WorkerTable<H> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<H> WorkerTable<H> {
    /// The table itself, for what the methods below do not cover.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Slot<H>>> {
        lock(&self.slots)
    }

    pub fn state(&self, id: Uuid) -> WorkerState {
        match self.lock().get(&id) {
            None => WorkerState::None,
            Some(s) => match &s.exit {
                Some(e) => WorkerState::Exited {
                    generation: s.generation,
                    outcome: e.outcome.clone(),
                },
                None => WorkerState::Running {
                    generation: s.generation,
                    stopping: s.stop.is_some(),
                    activity: s.live.activity(),
                },
            },
        }
    }

    pub fn exit_of(&self, id: Uuid, generation: u64) -> Option<WorkerExit> {
        self.lock()
            .get(&id)
            .filter(|s| s.generation == generation)
            .and_then(|s| s.exit.clone())
    }

    pub fn running(&self) -> usize {
        self.lock().values().filter(|s| s.live()).count()
    }

    pub fn sessions(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    pub fn contains(&self, id: Uuid) -> bool {
        self.lock().contains_key(&id)
    }

    /// Take the session's slot for a new worker; `false` (and nothing
    /// changed) while a live worker holds it.
    pub fn claim(&self, id: Uuid, slot: Slot<H>) -> bool {
        let mut slots = self.lock();
        if slots.get(&id).is_some_and(Slot::live) {
            return false;
        }
        slots.insert(id, slot);
        true
    }

    /// Put a slot only where there is none (an adoption racing a start).
    pub fn insert_if_absent(&self, id: Uuid, slot: Slot<H>) -> bool {
        let mut slots = self.lock();
        if slots.contains_key(&id) {
            return false;
        }
        slots.insert(id, slot);
        true
    }

    pub fn remove(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    /// Mark the live worker as being stopped for `reason` and return what
    /// `pick` reads from its slot; `None` when there is none, or it is
    /// stopping already.
    pub fn begin_stop<T>(
        &self,
        id: Uuid,
        reason: StopReason,
        pick: impl FnOnce(&Slot<H>) -> T,
    ) -> Option<T> {
        let mut slots = self.lock();
        let s = slots.get_mut(&id)?;
        if s.stop.is_some() || !s.live() {
            return None;
        }
        s.stop = Some(reason);
        Some(pick(s))
    }

    /// A stop that could not be carried out: let the controller decide again.
    pub fn stop_failed(&self, id: Uuid) {
        if let Some(s) = self.lock().get_mut(&id) {
            s.stop = None;
        }
    }

    /// The stop the runner asked of the worker of `generation`, if any.
    pub fn stopping(&self, id: Uuid, generation: u64) -> Option<StopReason> {
        self.lock()
            .get(&id)
            .filter(|s| s.generation == generation)
            .and_then(|s| s.stop)
    }

    /// The live worker's shared state with its driver.
    pub fn live(&self, id: Uuid) -> Option<Arc<Live>> {
        self.lock()
            .get(&id)
            .filter(|s| s.live())
            .map(|s| s.live.clone())
    }

    /// Record the end of the worker of `generation`.
    pub fn ended(&self, id: Uuid, generation: u64, ended: Ended) {
        if let Some(s) = self
            .lock()
            .get_mut(&id)
            .filter(|s| s.generation == generation)
        {
            s.exit = Some(WorkerExit {
                generation,
                outcome: ended.outcome,
                exit: ended.exit,
                summary: ended.summary,
                spend: ended.spend,
                input_seq: ended.input_seq,
                pid: ended.pid,
                started_at: s.started_at,
                stopped_at: Utc::now(),
            });
        }
    }

    /// The exit of `generation` is on record: drop its slot and return it.
    pub fn forget(&self, id: Uuid, generation: u64) -> Option<Slot<H>> {
        let mut slots = self.lock();
        if slots
            .get(&id)
            .is_some_and(|s| s.generation == generation && !s.live())
        {
            slots.remove(&id)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended() -> Ended {
        Ended {
            outcome: Outcome::Succeeded,
            exit: ExitInfo::default(),
            summary: RunSummary::default(),
            spend: Spend::default(),
            input_seq: 0,
            pid: Some(7),
        }
    }

    #[test]
    fn one_live_worker_per_session_until_its_exit_is_forgotten() {
        let t: WorkerTable<()> = WorkerTable::default();
        let id = Uuid::new_v4();
        assert_eq!(t.state(id), WorkerState::None);
        assert!(t.claim(id, Slot::new(1, Utc::now(), ())));
        assert!(!t.claim(id, Slot::new(2, Utc::now(), ())), "still live");
        assert_eq!(t.running(), 1);
        assert_eq!(
            t.begin_stop(id, StopReason::Paused, |s| s.generation),
            Some(1)
        );
        assert_eq!(
            t.begin_stop(id, StopReason::Paused, |s| s.generation),
            None,
            "once"
        );
        assert_eq!(t.stopping(id, 1), Some(StopReason::Paused));
        assert_eq!(t.stopping(id, 2), None);
        t.ended(id, 2, ended());
        assert!(t.exit_of(id, 1).is_none(), "another generation's end");
        t.ended(id, 1, ended());
        assert_eq!(t.running(), 0);
        assert!(matches!(
            t.state(id),
            WorkerState::Exited { generation: 1, .. }
        ));
        assert_eq!(t.exit_of(id, 1).and_then(|e| e.pid), Some(7));
        assert!(t.forget(id, 2).is_none());
        assert!(t.forget(id, 1).is_some());
        assert_eq!(t.sessions(), Vec::<Uuid>::new());
    }
}
