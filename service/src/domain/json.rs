//! Checks on client JSON that PostgreSQL would otherwise reject with a 5xx.
//!
//! `jsonb` cannot hold the NUL character (`\u0000`) in a string or key, and
//! very deep documents are costly to store and to diff. Both are refused here,
//! before any write, with the path of the offending value.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deepest nesting accepted in a client document (serde_json stops at 128).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonProblem {
    #[error("contains a NUL character at {0}, which cannot be stored")]
    Nul(String),
    #[error("is nested deeper than {MAX_DEPTH} levels at {0}")]
    TooDeep(String),
}

/// Validate a document; the error carries a JSON-pointer-like path.
pub fn check_storable(value: &Value) -> Result<(), JsonProblem> {
    walk(value, &mut String::new(), 0)
}

fn walk(value: &Value, path: &mut String, depth: usize) -> Result<(), JsonProblem> {
    if depth > MAX_DEPTH {
        return Err(JsonProblem::TooDeep(display(path)));
    }
    match value {
        Value::String(s) if s.contains('\0') => Err(JsonProblem::Nul(display(path))),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                walk(item, path, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (k, v) in map {
                let len = path.len();
                path.push('/');
                path.push_str(k);
                if k.contains('\0') {
                    return Err(JsonProblem::Nul(display(path)));
                }
                walk(v, path, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A field that failed to deserialise: its dotted path, when it has one,
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: Option<String>,
    pub detail: String,
}

/// Deserialise `value`, naming the field at fault as a dotted path below
/// `root` (e.g. `worker.restart_policy.on[0]`). A missing field is reported
/// by serde at its parent, so its name is taken from the message.
pub fn read_at<T: DeserializeOwned>(value: Value, root: Option<&str>) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|prefix| {
                let name = inner.strip_prefix(prefix)?.split_once('`')?.0;
                let detail = if prefix.starts_with("missing") {
                    "is required".to_owned()
                } else {
                    inner.split_once(", ").map_or_else(
                        || "is not a known field".to_owned(),
                        |(_, expected)| format!("is not a known field; {expected}"),
                    )
                };
                Some((name.to_owned(), detail))
            });
        let join = |parts: &[&str]| {
            let mut field = String::new();
            for part in parts.iter().filter(|p| !p.is_empty()) {
                if !field.is_empty() && !part.starts_with('[') {
                    field.push('.');
                }
                field.push_str(part);
            }
            (!field.is_empty()).then_some(field)
        };
        let at = if path == "." { "" } else { path.as_str() };
        match named {
            // An unknown field's path already ends with it.
            Some((name, detail)) if at == name || at.ends_with(&format!(".{name}")) => FieldError {
                field: join(&[root.unwrap_or(""), at]),
                detail,
            },
            Some((name, detail)) => FieldError {
                field: join(&[root.unwrap_or(""), at, &name]),
                detail,
            },
            None => FieldError {
                field: join(&[root.unwrap_or(""), at]),
                detail: inner,
            },
        }
    })
}

fn display(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u8,
    }

    #[test]
    fn read_at_names_the_field_at_fault() {
        let field = |v: Value, root| read_at::<Outer>(v, root).unwrap_err().field;
        assert_eq!(field(json!({}), None).as_deref(), Some("name"));
        assert_eq!(field(json!({}), Some("w")).as_deref(), Some("w.name"));
        assert_eq!(
            field(json!({"name": "x", "colour": 1}), None).as_deref(),
            Some("colour")
        );
        assert_eq!(
            field(
                json!({"name": "x", "inner": [{"n": 1}, {"n": "two"}]}),
                Some("w")
            )
            .as_deref(),
            Some("w.inner[1].n")
        );
        assert_eq!(
            field(json!({"name": "x", "inner": [{}]}), None).as_deref(),
            Some("inner[0].n")
        );
        assert_eq!(field(json!([]), None), None);
        assert_eq!(field(json!([]), Some("w")).as_deref(), Some("w"));
        let e = read_at::<Outer>(json!({}), None).unwrap_err();
        assert_eq!(e.detail, "is required");
    }

    #[test]
    fn accepts_ordinary_documents() {
        assert_eq!(check_storable(&json!({"a": [1, {"b": "x"}]})), Ok(()));
    }

    #[test]
    fn refuses_nul_in_values_and_keys_with_the_path() {
        assert_eq!(
            check_storable(&json!({"a": [1, "x\u{0}y"]})),
            Err(JsonProblem::Nul("/a/1".into()))
        );
        assert_eq!(
            check_storable(&json!({"k\u{0}": 1})),
            Err(JsonProblem::Nul("/k\u{0}".into()))
        );
    }

    #[test]
    fn refuses_deep_nesting() {
        let mut v = json!(1);
        for _ in 0..=MAX_DEPTH {
            v = json!([v]);
        }
        assert!(matches!(check_storable(&v), Err(JsonProblem::TooDeep(_))));
    }
}
