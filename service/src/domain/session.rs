//! A session's state, its status machine, and how commands change it.
//!
//! `SessionState::plan_update` turns a patch into the set of fields whose value
//! actually changes (nothing changed → no event); `SessionState::apply` applies
//! such a change set. The write path and replay both go through `apply`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::json::check_storable;
use super::usage::Usage;
use super::worker::WorkerSpec;

/// Longest accepted `session_type`.
pub const MAX_SESSION_TYPE_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
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
    /// The normalised worker spec (defaults filled in), if the session has one.
    pub worker: Option<Value>,
    /// Totals derived from the session's message log.
    pub usage: Usage,
    /// Number of events in the session's stream.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
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
    pub worker: Option<Value>,
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
        let cmd = Self {
            agent_id,
            session_type: check_session_type(session_type)?,
            status,
            context: context.unwrap_or_default(),
            checkpoint,
            runtime_backend: runtime_backend.unwrap_or_default(),
            runtime_metadata: runtime_metadata.unwrap_or_default(),
            worker: worker.map(|w| normalise_worker(&w)).transpose()?,
        };
        storable("context", &Value::Object(cmd.context.clone()))?;
        if let Some(c) = &cmd.checkpoint {
            storable("checkpoint", &Value::Object(c.clone()))?;
        }
        storable(
            "runtime_metadata",
            &Value::Object(cmd.runtime_metadata.clone()),
        )?;
        Ok(cmd)
    }

    /// Every field of the new session, as carried in `session.created`.
    pub fn changes(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("agent_id".into(), Value::String(self.agent_id.to_string()));
        m.insert(
            "session_type".into(),
            Value::String(self.session_type.clone()),
        );
        m.insert("status".into(), Value::String(self.status.as_str().into()));
        m.insert("context".into(), Value::Object(self.context.clone()));
        m.insert(
            "checkpoint".into(),
            self.checkpoint.clone().map_or(Value::Null, Value::Object),
        );
        m.insert(
            "runtime_backend".into(),
            Value::String(self.runtime_backend.as_str().into()),
        );
        m.insert(
            "runtime_metadata".into(),
            Value::Object(self.runtime_metadata.clone()),
        );
        m.insert("worker".into(), self.worker.clone().unwrap_or(Value::Null));
        m
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

fn normalise_worker(v: &Value) -> Result<Value, DomainError> {
    let spec = WorkerSpec::from_value(v).map_err(|p| DomainError::invalid(p.field, p.detail))?;
    storable("worker", v)?;
    Ok(serde_json::to_value(spec).expect("a worker spec always serialises"))
}

/// How a PATCH body's object fields are combined with the stored ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchMode {
    /// `application/json`: each named field is replaced (the seed's behaviour).
    Replace,
    /// `application/merge-patch+json`: objects are merged per RFC 7396.
    Merge,
}

/// A PATCH body: the fields it names, not yet checked against the state.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPatch {
    pub mode: PatchMode,
    pub fields: Map<String, Value>,
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

impl SessionState {
    pub fn from_create(
        id: Uuid,
        cmd: &CreateSession,
        at: DateTime<Utc>,
    ) -> Result<Self, DomainError> {
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
            version: 1,
            created_at: at,
            updated_at: at,
        };
        s.apply(&cmd.changes())?;
        Ok(s)
    }

    /// The fields whose value a patch changes, with their new values, or
    /// `None` when the patch changes nothing.
    pub fn plan_update(
        &self,
        patch: &SessionPatch,
    ) -> Result<Option<Map<String, Value>>, DomainError> {
        let mut changes = Map::new();
        for (field, value) in &patch.fields {
            let new = match field.as_str() {
                "status" => {
                    let to = parse_enum(
                        field,
                        value,
                        SessionStatus::parse,
                        &SessionStatus::ALL.map(|s| s.as_str()),
                    )?;
                    if !self.status.can_become(to) {
                        return Err(DomainError::IllegalTransition {
                            from: self.status,
                            to,
                        });
                    }
                    Value::String(to.as_str().into())
                }
                "runtime_backend" => {
                    let b = parse_enum(
                        field,
                        value,
                        RuntimeBackend::parse,
                        &RuntimeBackend::ALL.map(|s| s.as_str()),
                    )?;
                    Value::String(b.as_str().into())
                }
                "context" | "runtime_metadata" => {
                    let current =
                        Value::Object(self.object_field(field).cloned().unwrap_or_default());
                    let merged = combine(patch.mode, &current, value);
                    if !merged.is_object() {
                        return Err(DomainError::invalid(
                            field.as_str(),
                            "must be a JSON object",
                        ));
                    }
                    merged
                }
                "checkpoint" => {
                    let current = self.checkpoint.clone().map_or(Value::Null, Value::Object);
                    let merged = combine(patch.mode, &current, value);
                    if !(merged.is_object() || merged.is_null()) {
                        return Err(DomainError::invalid(
                            "checkpoint",
                            "must be a JSON object or null",
                        ));
                    }
                    merged
                }
                "worker" => {
                    let current = self.worker.clone().unwrap_or(Value::Null);
                    match combine(patch.mode, &current, value) {
                        Value::Null => Value::Null,
                        w => normalise_worker(&w)?,
                    }
                }
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
            };
            storable(field, &new)?;
            if self.field_value(field) != new {
                changes.insert(field.clone(), new);
            }
        }
        Ok((!changes.is_empty()).then_some(changes))
    }

    /// Set each field named in `changes` to its value.
    pub fn apply(&mut self, changes: &Map<String, Value>) -> Result<(), DomainError> {
        for (field, value) in changes {
            match field.as_str() {
                "agent_id" => {
                    self.agent_id = value
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| DomainError::invalid("agent_id", "must be a UUID"))?
                }
                "session_type" => {
                    self.session_type = value
                        .as_str()
                        .ok_or_else(|| DomainError::invalid("session_type", "must be a string"))?
                        .to_owned()
                }
                "status" => {
                    self.status = parse_enum(field, value, SessionStatus::parse, &[])?;
                }
                "runtime_backend" => {
                    self.runtime_backend = parse_enum(field, value, RuntimeBackend::parse, &[])?;
                }
                "context" | "runtime_metadata" => {
                    let Value::Object(m) = value else {
                        return Err(DomainError::invalid(
                            field.as_str(),
                            "must be a JSON object",
                        ));
                    };
                    if field == "context" {
                        self.context = m.clone();
                    } else {
                        self.runtime_metadata = m.clone();
                    }
                }
                "checkpoint" => {
                    self.checkpoint = match value {
                        Value::Null => None,
                        Value::Object(m) => Some(m.clone()),
                        _ => {
                            return Err(DomainError::invalid(
                                "checkpoint",
                                "must be an object or null",
                            ));
                        }
                    }
                }
                "worker" => self.worker = (!value.is_null()).then(|| value.clone()),
                "usage" => {
                    self.usage = serde_json::from_value(value.clone())
                        .map_err(|e| DomainError::invalid("usage", e.to_string()))?
                }
                other => return Err(DomainError::invalid(other, "is not a session field")),
            }
        }
        Ok(())
    }

    fn object_field(&self, field: &str) -> Option<&Map<String, Value>> {
        match field {
            "context" => Some(&self.context),
            "runtime_metadata" => Some(&self.runtime_metadata),
            "checkpoint" => self.checkpoint.as_ref(),
            _ => None,
        }
    }

    fn field_value(&self, field: &str) -> Value {
        match field {
            "status" => Value::String(self.status.as_str().into()),
            "runtime_backend" => Value::String(self.runtime_backend.as_str().into()),
            "context" => Value::Object(self.context.clone()),
            "runtime_metadata" => Value::Object(self.runtime_metadata.clone()),
            "checkpoint" => self.checkpoint.clone().map_or(Value::Null, Value::Object),
            "worker" => self.worker.clone().unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// The typed worker spec, if the session has one.
    pub fn worker_spec(&self) -> Option<WorkerSpec> {
        self.worker
            .as_ref()
            .and_then(|w| serde_json::from_value(w.clone()).ok())
    }
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
        SessionState::from_create(Uuid::now_v7(), &cmd, Utc::now()).unwrap()
    }

    fn patch(mode: PatchMode, v: Value) -> SessionPatch {
        SessionPatch {
            mode,
            fields: v.as_object().unwrap().clone(),
        }
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
        let err = s
            .plan_update(&patch(PatchMode::Replace, json!({"status": "active"})))
            .unwrap_err();
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
        let replaced = s
            .plan_update(&patch(
                PatchMode::Replace,
                json!({"context": {"b": {"d": 3}}}),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(replaced["context"], json!({"b": {"d": 3}}));
        let merged = s
            .plan_update(&patch(
                PatchMode::Merge,
                json!({"context": {"a": null, "b": {"d": 3}}}),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(merged["context"], json!({"b": {"c": 2, "d": 3}}));
    }

    #[test]
    fn a_patch_that_changes_nothing_plans_nothing() {
        let s = state();
        let same = patch(
            PatchMode::Replace,
            json!({"status": "active", "context": {"a": 1, "b": {"c": 2}}}),
        );
        assert_eq!(s.plan_update(&same).unwrap(), None);
    }

    #[test]
    fn apply_of_planned_changes_updates_only_those_fields() {
        let mut s = state();
        let before = s.clone();
        let changes = s
            .plan_update(&patch(
                PatchMode::Replace,
                json!({"status": "paused", "checkpoint": {"step": 5}}),
            ))
            .unwrap()
            .unwrap();
        s.apply(&changes).unwrap();
        assert_eq!(s.status, SessionStatus::Paused);
        assert_eq!(
            s.checkpoint,
            Some(json!({"step": 5}).as_object().unwrap().clone())
        );
        assert_eq!(s.context, before.context);
    }

    #[test]
    fn unknown_and_immutable_fields_are_named() {
        let s = state();
        let e = s
            .plan_update(&patch(PatchMode::Replace, json!({"agent_id": "x"})))
            .unwrap_err();
        assert!(matches!(e, DomainError::InvalidField { ref field, .. } if field == "agent_id"));
        let e = s
            .plan_update(&patch(PatchMode::Replace, json!({"colour": 1})))
            .unwrap_err();
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
        ] {
            assert!(
                s.plan_update(&patch(PatchMode::Replace, body.clone()))
                    .is_err(),
                "{body}"
            );
        }
    }
}
