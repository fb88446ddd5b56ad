//! Query-string parsing shared by the list endpoints, and `Link` headers.

use actix_web::HttpRequest;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Page-size bounds, as app data.
#[derive(Debug, Clone, Copy)]
pub struct PageSizes {
    pub default: u64,
    pub max: u64,
}

pub fn query<T: DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::parameter("query", format!("invalid query string: {e}")))
}

/// An optional non-negative integer parameter (a position or sequence
/// number); absent means 0.
pub fn non_negative(field: &str, raw: &Option<String>) -> Result<i64, ApiError> {
    match raw.as_deref() {
        None => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::parameter(field, "must be a non-negative integer")),
    }
}

/// A comma-separated list of values `parse` knows (empty when absent);
/// `names` says which, for the 400.
pub fn one_of<T>(
    field: &str,
    raw: &Option<String>,
    parse: impl Fn(&str) -> Option<T>,
    names: &str,
) -> Result<Vec<T>, ApiError> {
    match raw.as_deref() {
        None | Some("") => Ok(Vec::new()),
        Some(s) => s
            .split(',')
            .map(|p| {
                parse(p.trim())
                    .ok_or_else(|| ApiError::parameter(field, format!("must be {names}")))
            })
            .collect(),
    }
}

pub fn limit(raw: &Option<String>, pages: &PageSizes) -> Result<u64, ApiError> {
    let Some(raw) = raw.as_deref() else {
        return Ok(pages.default);
    };
    match raw.parse::<u64>() {
        Ok(n) if (1..=pages.max).contains(&n) => Ok(n),
        _ => Err(ApiError::parameter(
            "limit",
            format!("must be an integer from 1 to {}", pages.max),
        )),
    }
}

/// `<path?…&key=value>; rel="next"`, keeping the request's other parameters.
pub fn link_next(req: &HttpRequest, path: &str, key: &str, value: &str) -> String {
    let mut pairs: Vec<(String, String)> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect();
    pairs.push((key.to_owned(), value.to_owned()));
    let qs = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    format!("<{path}?{qs}>; rel=\"next\"")
}
