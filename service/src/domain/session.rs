//! A session's state, its status machine, and how commands change it.
//!
//! `SessionState::plan_update` turns a patch into the fields whose value
//! actually changes (nothing changed → no event), as a typed
//! `SessionChanges`; `SessionState::apply` applies one. The write path and
//! replay both go through `apply`, and an event's `changes` is a
//! `SessionChanges` serialised.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::json::check_storable;
use super::usage::Usage;
use super::worker::WorkerSpec;

/// Longest accepted `session_type`.
pub const MAX_SESSION_TYPE_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Active,
    Paused,
    Completed,
    Crashed,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 4] =
        [Self::Active, Self::Paused, Self::Completed, Self::Crashed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Crashed => "crashed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SessionStatus {
    /// active ⇄ paused; active|paused → completed|crashed; crashed → active.
    /// Staying put is always allowed (it is not a change).
    pub fn can_become(self, to: SessionStatus) -> bool {
        use SessionStatus::*;
        self == to
            || matches!(
                (self, to),
                (Active, Paused)
                    | (Paused, Active)
                    | (Active | Paused, Completed | Crashed)
                    | (Crashed, Active)
            )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeBackend {
    Local,
    Kubernetes,
    #[default]
    Unknown,
}

impl RuntimeBackend {
    pub const ALL: [RuntimeBackend; 3] = [Self::Local, Self::Kubernetes, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Kubernetes => "kubernetes",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{field}: {detail}")]
    InvalidField { field: String, detail: String },
    #[error("status cannot change from {from} to {to}")]
    IllegalTransition {
        from: SessionStatus,
        to: SessionStatus,
    },
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Where a forked session came from: its parent and the parent's version
/// it was copied as of. Set when the session is created, never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkedFrom {
    pub session_id: Uuid,
    pub version: i64,
}

/// The projection of one session, as stored in `sessions`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub session_type: String,
    pub status: SessionStatus,
    pub context: Map<String, Value>,
    pub checkpoint: Option<Map<String, Value>>,
    pub runtime_backend: RuntimeBackend,
    pub runtime_metadata: Map<String, Value>,
    /// The validated worker spec (defaults filled in), if the session has one.
    pub worker: Option<WorkerSpec>,
    /// Totals derived from the session's message log.
    pub usage: Usage,
    /// The parent, for a session made by a fork.
    pub forked_from: Option<ForkedFrom>,
    /// Number of events in the session's stream.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The new value of each field a change sets; `None` leaves a field as it
/// is. Serialised, it is the `changes` object of an event payload: only the
/// fields that are set, `null` for a cleared `checkpoint` or `worker`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionChanges {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Map<String, Value>>,
    /// `Some(None)` clears the checkpoint.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub checkpoint: Option<Option<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_backend: Option<RuntimeBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_metadata: Option<Map<String, Value>>,
    /// `Some(None)` removes the worker spec.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub worker: Option<Option<WorkerSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only in the `session.created` of a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkedFrom>,
}

/// A field that is present is `Some`, even when it is `null`.
fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl SessionChanges {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The names of the fields set, in name order (an event's `updates`).
    pub fn names(&self) -> Vec<&'static str> {
        let Self {
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
        } = self;
        [
            ("agent_id", agent_id.is_some()),
            ("checkpoint", checkpoint.is_some()),
            ("context", context.is_some()),
            ("forked_from", forked_from.is_some()),
            ("runtime_backend", runtime_backend.is_some()),
            ("runtime_metadata", runtime_metadata.is_some()),
            ("session_type", session_type.is_some()),
            ("status", status.is_some()),
            ("usage", usage.is_some()),
            ("worker", worker.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// A validated create command.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSession {
    pub agent_id: Uuid,
    pub session_type: String,
    pub status: SessionStatus,
    pub context: Map<String, Value>,
    pub checkpoint: Option<Map<String, Value>>,
    pub runtime_backend: RuntimeBackend,
    pub runtime_metadata: Map<String, Value>,
    pub worker: Option<WorkerSpec>,
    /// Set by a fork, never by a client's create.
    pub forked_from: Option<ForkedFrom>,
}

/// The fields a session is created with, as a stored session has them
/// (an import writes a session it did not create).
impl From<&SessionState> for CreateSession {
    fn from(s: &SessionState) -> Self {
        Self {
            agent_id: s.agent_id,
            session_type: s.session_type.clone(),
            status: s.status,
            context: s.context.clone(),
            checkpoint: s.checkpoint.clone(),
            runtime_backend: s.runtime_backend,
            runtime_metadata: s.runtime_metadata.clone(),
            worker: s.worker.clone(),
            forked_from: s.forked_from,
        }
    }
}

impl CreateSession {
    /// Validate the parts of a create request that types alone do not.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_id: Uuid,
        session_type: String,
        status: Option<SessionStatus>,
        context: Option<Map<String, Value>>,
        checkpoint: Option<Map<String, Value>>,
        runtime_backend: Option<RuntimeBackend>,
        runtime_metadata: Option<Map<String, Value>>,
        worker: Option<Value>,
    ) -> Result<Self, DomainError> {
        let status = status.unwrap_or(SessionStatus::Active);
        if !matches!(status, SessionStatus::Active | SessionStatus::Paused) {
            return Err(DomainError::invalid(
                "status",
                "a new session starts active or paused",
            ));
        }
        let session_type = check_session_type(session_type)?;
        let worker = worker.map(|w| parse_worker(&w)).transpose()?;
        let context = storable_object("context", Value::Object(context.unwrap_or_default()))?;
        let checkpoint = checkpoint
            .map(|c| storable_object("checkpoint", Value::Object(c)))
            .transpose()?;
        let runtime_metadata = storable_object(
            "runtime_metadata",
            Value::Object(runtime_metadata.unwrap_or_default()),
        )?;
        Ok(Self {
            agent_id,
            session_type,
            status,
            context,
            checkpoint,
            runtime_backend: runtime_backend.unwrap_or_default(),
            runtime_metadata,
            worker,
            forked_from: None,
        })
    }

    /// Every field of the new session, as carried in `session.created`.
    pub fn changes(&self) -> SessionChanges {
        SessionChanges {
            agent_id: Some(self.agent_id),
            session_type: Some(self.session_type.clone()),
            status: Some(self.status),
            context: Some(self.context.clone()),
            checkpoint: Some(self.checkpoint.clone()),
            runtime_backend: Some(self.runtime_backend),
            runtime_metadata: Some(self.runtime_metadata.clone()),
            worker: Some(self.worker.clone()),
            usage: None,
            forked_from: self.forked_from,
        }
    }
}

fn check_session_type(s: String) -> Result<String, DomainError> {
    let t = s.trim();
    if t.is_empty() || t.len() > MAX_SESSION_TYPE_LEN || t.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            "session_type",
            format!("must be 1 to {MAX_SESSION_TYPE_LEN} printable characters"),
        ));
    }
    Ok(t.to_owned())
}

fn storable(field: &str, v: &Value) -> Result<(), DomainError> {
    check_storable(v).map_err(|p| DomainError::invalid(field, p.to_string()))
}

/// A JSON object PostgreSQL can store, or the field's 422.
fn storable_object(field: &str, v: Value) -> Result<Map<String, Value>, DomainError> {
    storable(field, &v)?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(DomainError::invalid(field, "must be a JSON object")),
    }
}

fn parse_worker(v: &Value) -> Result<WorkerSpec, DomainError> {
    let spec = WorkerSpec::from_value(v).map_err(|p| DomainError::invalid(p.field, p.detail))?;
    storable("worker", v)?;
    Ok(spec)
}

/// How a PATCH body's object fields are combined with the stored ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchMode {
    /// `application/json`: each named field is replaced (the seed's behaviour).
    Replace,
    /// `application/merge-patch+json`: objects are merged per RFC 7396.
    Merge,
}

/// A PATCH body, read into the fields it may name but not yet checked
/// against the state. The object fields stay JSON: how they combine with
/// the stored value depends on `mode`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPatch {
    pub mode: PatchMode,
    pub status: Option<SessionStatus>,
    pub runtime_backend: Option<RuntimeBackend>,
    pub context: Option<Value>,
    /// `null` clears the checkpoint.
    pub checkpoint: Option<Value>,
    pub runtime_metadata: Option<Value>,
    /// `null` removes the worker spec.
    pub worker: Option<Value>,
}

/// Fields a PATCH may name.
pub const PATCHABLE: [&str; 6] = [
    "status",
    "context",
    "checkpoint",
    "runtime_backend",
    "runtime_metadata",
    "worker",
];

impl SessionPatch {
    /// Read a PATCH body. An unknown or immutable field, or a status or
    /// backend that is not one of the known values, is named in the error.
    pub fn parse(mode: PatchMode, fields: Map<String, Value>) -> Result<Self, DomainError> {
        let mut patch = Self {
            mode,
            status: None,
            runtime_backend: None,
            context: None,
            checkpoint: None,
            runtime_metadata: None,
            worker: None,
        };
        for (field, value) in fields {
            match field.as_str() {
                "status" => {
                    patch.status = Some(parse_enum(
                        &field,
                        &value,
                        SessionStatus::parse,
                        &SessionStatus::ALL.map(SessionStatus::as_str),
                    )?)
                }
                "runtime_backend" => {
                    patch.runtime_backend = Some(parse_enum(
                        &field,
                        &value,
                        RuntimeBackend::parse,
                        &RuntimeBackend::ALL.map(RuntimeBackend::as_str),
                    )?)
                }
                "context" => patch.context = Some(value),
                "checkpoint" => patch.checkpoint = Some(value),
                "runtime_metadata" => patch.runtime_metadata = Some(value),
                "worker" => patch.worker = Some(value),
                other => {
                    let detail = if matches!(
                        other,
                        "id" | "agent_id"
                            | "session_type"
                            | "version"
                            | "created_at"
                            | "updated_at"
                            | "usage"
                    ) {
                        "cannot be changed".to_owned()
                    } else {
                        format!(
                            "is not a session field; a PATCH may name {}",
                            PATCHABLE.join(", ")
                        )
                    };
                    return Err(DomainError::invalid(other, detail));
                }
            }
        }
        Ok(patch)
    }
}

impl SessionPatch {
    /// The change of a patch whose outcome does not depend on the stored
    /// state, with every field it names as if its value differed; `None`
    /// for any other patch. That is a plain (`application/json`) patch of
    /// `checkpoint`, `context`, `runtime_backend` and `runtime_metadata`
    /// only, each value valid: it replaces each named field, needs no state
    /// transition, and changes exactly the fields whose stored value differs
    /// (the store compares them where it writes). Any other patch, or one
    /// whose values [`SessionState::plan_update`] would refuse, is planned
    /// against the state as usual.
    pub fn blind_change(&self) -> Option<SessionChanges> {
        if self.mode != PatchMode::Replace || self.status.is_some() || self.worker.is_some() {
            return None;
        }
        let object = |field: &str, v: &Option<Value>| match v {
            None => Ok(None),
            Some(v) => storable_object(field, v.clone()).map(Some),
        };
        let changes = SessionChanges {
            checkpoint: match &self.checkpoint {
                None => None,
                Some(Value::Null) => Some(None),
                Some(v @ Value::Object(_)) => {
                    Some(Some(storable_object("checkpoint", v.clone()).ok()?))
                }
                Some(_) => return None,
            },
            context: object("context", &self.context).ok()?,
            runtime_backend: self.runtime_backend,
            runtime_metadata: object("runtime_metadata", &self.runtime_metadata).ok()?,
            ..SessionChanges::default()
        };
        (!changes.is_empty()).then_some(changes)
    }
}

impl SessionState {
    pub fn from_create(id: Uuid, cmd: &CreateSession, at: DateTime<Utc>) -> Self {
        let mut s = Self {
            id,
            agent_id: cmd.agent_id,
            session_type: String::new(),
            status: cmd.status,
            context: Map::new(),
            checkpoint: None,
            runtime_backend: RuntimeBackend::Unknown,
            runtime_metadata: Map::new(),
            worker: None,
            usage: Usage::default(),
            forked_from: None,
            version: 1,
            created_at: at,
            updated_at: at,
        };
        s.apply(&cmd.changes());
        s
    }

    /// The create command of a session forked from this state (the parent
    /// as of the fork's version): its context, checkpoint, runtime metadata
    /// (without the runner's `worker` record, which belongs to the parent's
    /// worker) and worker spec with `worker_patch` merged in (RFC 7396,
    /// validated like a create). Messages and usage start empty.
    pub fn fork_command(
        &self,
        runtime_backend: RuntimeBackend,
        worker_patch: Option<&Value>,
        status: SessionStatus,
        forked_from: ForkedFrom,
    ) -> Result<CreateSession, DomainError> {
        if !matches!(status, SessionStatus::Active | SessionStatus::Paused) {
            return Err(DomainError::invalid(
                "status",
                "a fork starts active or paused",
            ));
        }
        let worker = match worker_patch {
            None => self.worker.clone(),
            Some(patch) => {
                let current = match &self.worker {
                    Some(w) => serde_json::to_value(w)
                        .map_err(|e| DomainError::invalid("worker", e.to_string()))?,
                    None => Value::Null,
                };
                match combine(PatchMode::Merge, &current, patch) {
                    Value::Null => None,
                    w => Some(parse_worker(&w)?),
                }
            }
        };
        let mut runtime_metadata = self.runtime_metadata.clone();
        runtime_metadata.remove("worker");
        Ok(CreateSession {
            agent_id: self.agent_id,
            session_type: self.session_type.clone(),
            status,
            context: self.context.clone(),
            checkpoint: self.checkpoint.clone(),
            runtime_backend,
            runtime_metadata,
            worker,
            forked_from: Some(forked_from),
        })
    }

    /// The fields whose value a patch changes, with their new values, or
    /// `None` when the patch changes nothing. Fields are checked in name
    /// order, so the first bad one is the one reported.
    pub fn plan_update(&self, patch: &SessionPatch) -> Result<Option<SessionChanges>, DomainError> {
        let mode = patch.mode;
        let mut changes = SessionChanges::default();
        if let Some(value) = &patch.checkpoint {
            let current = self.checkpoint.clone().map_or(Value::Null, Value::Object);
            let new = match combine(mode, &current, value) {
                Value::Null => None,
                merged @ Value::Object(_) => Some(storable_object("checkpoint", merged)?),
                _ => {
                    return Err(DomainError::invalid(
                        "checkpoint",
                        "must be a JSON object or null",
                    ));
                }
            };
            if new != self.checkpoint {
                changes.checkpoint = Some(new);
            }
        }
        if let Some(value) = &patch.context {
            let new = merged_object("context", mode, &self.context, value)?;
            if new != self.context {
                changes.context = Some(new);
            }
        }
        if let Some(backend) = patch.runtime_backend
            && backend != self.runtime_backend
        {
            changes.runtime_backend = Some(backend);
        }
        if let Some(value) = &patch.runtime_metadata {
            let new = merged_object("runtime_metadata", mode, &self.runtime_metadata, value)?;
            if new != self.runtime_metadata {
                changes.runtime_metadata = Some(new);
            }
        }
        if let Some(to) = patch.status {
            if !self.status.can_become(to) {
                return Err(DomainError::IllegalTransition {
                    from: self.status,
                    to,
                });
            }
            if to != self.status {
                changes.status = Some(to);
            }
        }
        if let Some(value) = &patch.worker {
            let current = match &self.worker {
                Some(w) => serde_json::to_value(w)
                    .map_err(|e| DomainError::invalid("worker", e.to_string()))?,
                None => Value::Null,
            };
            let new = match combine(mode, &current, value) {
                Value::Null => None,
                w => Some(parse_worker(&w)?),
            };
            if new != self.worker {
                changes.worker = Some(new);
            }
        }
        Ok((!changes.is_empty()).then_some(changes))
    }

    /// Set each field named in `changes` to its value.
    pub fn apply(&mut self, changes: &SessionChanges) {
        let SessionChanges {
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
        } = changes;
        if let Some(v) = agent_id {
            self.agent_id = *v;
        }
        if let Some(v) = session_type {
            self.session_type.clone_from(v);
        }
        if let Some(v) = status {
            self.status = *v;
        }
        if let Some(v) = context {
            self.context.clone_from(v);
        }
        if let Some(v) = checkpoint {
            self.checkpoint.clone_from(v);
        }
        if let Some(v) = runtime_backend {
            self.runtime_backend = *v;
        }
        if let Some(v) = runtime_metadata {
            self.runtime_metadata.clone_from(v);
        }
        if let Some(v) = worker {
            self.worker.clone_from(v);
        }
        if let Some(v) = usage {
            self.usage.clone_from(v);
        }
        if let Some(v) = forked_from {
            self.forked_from = Some(*v);
        }
    }
}

/// An object field after a patch: replaced, or merged into the current one.
fn merged_object(
    field: &str,
    mode: PatchMode,
    current: &Map<String, Value>,
    patch: &Value,
) -> Result<Map<String, Value>, DomainError> {
    storable_object(field, combine(mode, &Value::Object(current.clone()), patch))
}

fn combine(mode: PatchMode, current: &Value, patch: &Value) -> Value {
    match mode {
        PatchMode::Replace => patch.clone(),
        PatchMode::Merge => {
            let mut doc = current.clone();
            json_patch::merge(&mut doc, patch);
            doc
        }
    }
}

fn parse_enum<T>(
    field: &str,
    value: &Value,
    parse: fn(&str) -> Option<T>,
    allowed: &[&str],
) -> Result<T, DomainError> {
    value.as_str().and_then(parse).ok_or_else(|| {
        DomainError::invalid(field, format!("must be one of {}", allowed.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> SessionState {
        let cmd = CreateSession::new(
            Uuid::nil(),
            "task".into(),
            None,
            Some(json!({"a": 1, "b": {"c": 2}}).as_object().unwrap().clone()),
            None,
            Some(RuntimeBackend::Local),
            None,
            None,
        )
        .unwrap();
        SessionState::from_create(Uuid::now_v7(), &cmd, Utc::now())
    }

    fn plan(
        s: &SessionState,
        mode: PatchMode,
        v: Value,
    ) -> Result<Option<SessionChanges>, DomainError> {
        s.plan_update(&SessionPatch::parse(mode, v.as_object().unwrap().clone())?)
    }

    #[test]
    fn transitions_follow_the_design() {
        use SessionStatus::*;
        assert!(Active.can_become(Paused) && Paused.can_become(Active));
        assert!(Crashed.can_become(Active));
        assert!(!Completed.can_become(Active));
        assert!(!Crashed.can_become(Paused));
        assert!(!Crashed.can_become(Completed));
    }

    #[test]
    fn illegal_transition_names_from_and_to() {
        let mut s = state();
        s.status = SessionStatus::Completed;
        let err = plan(&s, PatchMode::Replace, json!({"status": "active"})).unwrap_err();
        assert_eq!(
            err,
            DomainError::IllegalTransition {
                from: SessionStatus::Completed,
                to: SessionStatus::Active
            }
        );
    }

    #[test]
    fn replace_and_merge_differ_on_objects() {
        let s = state();
        let replaced = plan(&s, PatchMode::Replace, json!({"context": {"b": {"d": 3}}}))
            .unwrap()
            .unwrap();
        assert_eq!(
            replaced.context,
            json!({"b": {"d": 3}}).as_object().cloned()
        );
        let merged = plan(
            &s,
            PatchMode::Merge,
            json!({"context": {"a": null, "b": {"d": 3}}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            merged.context,
            json!({"b": {"c": 2, "d": 3}}).as_object().cloned()
        );
    }

    #[test]
    fn a_patch_that_changes_nothing_plans_nothing() {
        let s = state();
        let same = json!({"status": "active", "context": {"a": 1, "b": {"c": 2}}});
        assert_eq!(plan(&s, PatchMode::Replace, same).unwrap(), None);
    }

    #[test]
    fn apply_of_planned_changes_updates_only_those_fields() {
        let mut s = state();
        let before = s.clone();
        let changes = plan(
            &s,
            PatchMode::Replace,
            json!({"status": "paused", "checkpoint": {"step": 5}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(changes.names(), ["checkpoint", "status"]);
        s.apply(&changes);
        assert_eq!(s.status, SessionStatus::Paused);
        assert_eq!(
            s.checkpoint,
            Some(json!({"step": 5}).as_object().unwrap().clone())
        );
        assert_eq!(s.context, before.context);
    }

    #[test]
    fn clearing_a_checkpoint_or_worker_is_a_change_to_null() {
        let mut s = state();
        let set = plan(
            &s,
            PatchMode::Replace,
            json!({"checkpoint": {"step": 1}, "worker": {"prompt": "go"}}),
        )
        .unwrap()
        .unwrap();
        s.apply(&set);
        assert_eq!(s.worker.as_ref().map(|w| w.prompt.as_str()), Some("go"));
        let cleared = plan(
            &s,
            PatchMode::Merge,
            json!({"checkpoint": null, "worker": null}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::to_value(&cleared).unwrap(),
            json!({"checkpoint": null, "worker": null})
        );
        s.apply(&cleared);
        assert_eq!((s.checkpoint, s.worker), (None, None));
    }

    /// The serialised form is an event's `changes`: replay reads it back.
    #[test]
    fn changes_round_trip_through_their_json_form() {
        let cmd = CreateSession::new(
            Uuid::nil(),
            "task".into(),
            Some(SessionStatus::Paused),
            None,
            None,
            None,
            None,
            Some(json!({"prompt": "go", "max_budget_usd": 0.1})),
        )
        .unwrap();
        let changes = cmd.changes();
        let wire = serde_json::to_value(&changes).unwrap();
        assert_eq!(
            wire,
            json!({
                "agent_id": Uuid::nil(), "session_type": "task", "status": "paused",
                "context": {}, "checkpoint": null, "runtime_backend": "unknown",
                "runtime_metadata": {}, "worker": {"prompt": "go", "max_budget_usd": 0.1}
            })
        );
        let names: Vec<&str> = wire
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(changes.names(), names, "updates lists the keys in order");
        assert_eq!(
            serde_json::from_value::<SessionChanges>(wire).unwrap(),
            changes
        );
        assert!(serde_json::from_value::<SessionChanges>(json!({"colour": 1})).is_err());
        assert!(serde_json::from_value::<SessionChanges>(json!({"status": "running"})).is_err());
    }

    #[test]
    fn unknown_and_immutable_fields_are_named() {
        let s = state();
        let e = plan(&s, PatchMode::Replace, json!({"agent_id": "x"})).unwrap_err();
        assert!(matches!(e, DomainError::InvalidField { ref field, .. } if field == "agent_id"));
        let e = plan(&s, PatchMode::Replace, json!({"colour": 1})).unwrap_err();
        assert!(matches!(e, DomainError::InvalidField { ref field, .. } if field == "colour"));
    }

    #[test]
    fn wrong_types_are_refused() {
        let s = state();
        for body in [
            json!({"context": []}),
            json!({"checkpoint": 3}),
            json!({"status": "running"}),
            json!({"runtime_metadata": null}),
            json!({"worker": {"prompt": ""}}),
        ] {
            assert!(
                plan(&s, PatchMode::Replace, body.clone()).is_err(),
                "{body}"
            );
        }
    }
}
