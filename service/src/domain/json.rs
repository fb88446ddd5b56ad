//! Checks on client JSON that PostgreSQL would otherwise reject with a 5xx.
//!
//! `jsonb` cannot hold the NUL character (`\u0000`) in a string or key, and
//! very deep documents are costly to store and to diff. Both are refused here,
//! before any write, with the path of the offending value.

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
