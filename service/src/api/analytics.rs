//! Session metrics (folded from one session's events on request) and
//! analytics (read from the analytics projection, never from the log).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::AppState;
use super::auth::{Authorized, SessionsRead};
use super::error::ApiError;
use super::params;
use crate::contract::metrics::{Analytics, GroupBy, SessionMetrics};
use crate::contract::{Problem, format_time};

/// The projection's feed position, on `GET /analytics`.
pub const PROJECTION_POSITION: &str = "x-projection-position";

/// Longest range `GET /analytics` sums, in days.
pub const MAX_RANGE_DAYS: u64 = 366;
/// The range when `from` is not given.
const DEFAULT_RANGE_DAYS: u64 = 30;
/// The opaque `cursor` of the next page: the last key walked.
fn encode_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("g1:{key}"))
}

fn decode_cursor(group_by: GroupBy, raw: &str) -> Result<String, ApiError> {
    let bad = || ApiError::parameter("cursor", "is not a cursor this service issued");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let key = text.strip_prefix("g1:").ok_or_else(bad)?;
    // Keys are stored text, which never holds a NUL.
    if key.contains('\0')
        || matches!(group_by, GroupBy::Day) && NaiveDate::parse_from_str(key, "%Y-%m-%d").is_err()
    {
        return Err(bad());
    }
    Ok(key.to_owned())
}

/// A session's figures, derived from its events.
#[utoipa::path(
    get, path = "/sessions/{id}/metrics", tag = "sessions", operation_id = "get_session_metrics",
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session's metrics, folded from its events (a deleted session's too, while its events are kept)", body = SessionMetrics),
        (status = 404, description = "No such session, now or ever", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn session_metrics(
    state: web::Data<AppState>,
    id: web::Path<String>,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("session {id} not found"));
    let sid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let tally = state
        .store
        .session_tally(sid)
        .await?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(SessionMetrics::new(&tally, Utc::now())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// First UTC day counted: `YYYY-MM-DD`, or an RFC 3339 instant at
    /// midnight UTC. Default: 30 days before `to`.
    #[param(value_type = Option<String>, format = Date)]
    pub from: Option<String>,
    /// First UTC day not counted (same forms). Default: tomorrow, so today
    /// is counted. At most 366 days after `from`.
    #[param(value_type = Option<String>, format = Date)]
    pub to: Option<String>,
    /// `status` (default), `agent_id`, `session_type` or `day`.
    #[param(value_type = Option<GroupBy>)]
    pub group_by: Option<String>,
    /// Keys walked in this page (for `day`: days with sessions), as the page size of the
    /// other lists (default 20, at most `api.max_page_size`, 500 by
    /// default). Only those with sessions in the range are answered, so a
    /// page may hold fewer groups; the `Link: rel="next"` header says
    /// whether there are more. A page costs two index probes per key walked.
    #[param(value_type = Option<i64>, minimum = 1)]
    pub limit: Option<String>,
    /// The opaque cursor from the previous page's `Link: rel="next"`.
    pub cursor: Option<String>,
}

/// A day boundary: a date, or an RFC 3339 instant that falls on midnight UTC.
fn day(field: &str, raw: &str) -> Result<NaiveDate, ApiError> {
    let bad = || {
        ApiError::parameter(
            field,
            "must be a UTC day: YYYY-MM-DD, or an RFC 3339 instant at 00:00:00 UTC",
        )
    };
    let d = match NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        Ok(d) => d,
        Err(_) => {
            let t = DateTime::parse_from_rfc3339(raw)
                .map_err(|_| bad())?
                .with_timezone(&Utc);
            if t.time() != NaiveTime::MIN {
                return Err(bad());
            }
            t.date_naive()
        }
    };
    // Years PostgreSQL's `date` and RFC 3339 both hold.
    if !(1..=9999).contains(&d.year()) {
        return Err(ApiError::parameter(
            field,
            "must be a day from year 1 to 9999",
        ));
    }
    Ok(d)
}

/// Live sessions created in `[from, to)`, grouped: counts, durations,
/// spend. Read from the analytics projection, which follows the event log;
/// its position is in the body and the `X-Projection-Position` header.
#[utoipa::path(
    get, path = "/analytics", tag = "sessions", operation_id = "get_analytics",
    params(AnalyticsQuery),
    responses(
        (status = 200, description = "One page of the groups of the sessions created in the range, by key, as the projection holds them at `position`", body = Analytics,
            headers(("X-Projection-Position" = i64, description = "The feed position the projection has folded up to"),
                    ("Link" = String, description = "`<…>; rel=\"next\"` while there are more keys to walk"))),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn analytics(
    state: web::Data<AppState>,
    req: HttpRequest,
    _auth: Authorized<SessionsRead>,
) -> Result<HttpResponse, ApiError> {
    let q: AnalyticsQuery = params::query(&req)?;
    let group_by = match q.group_by.as_deref() {
        None => GroupBy::Status,
        Some(g) => GroupBy::parse(g).ok_or_else(|| {
            ApiError::parameter("group_by", "must be status, agent_id, session_type or day")
        })?,
    };
    let now = Utc::now();
    let from = q.from.as_deref().map(|raw| day("from", raw)).transpose()?;
    let to = match q.to.as_deref() {
        Some(raw) => day("to", raw)?,
        None => now
            .date_naive()
            .checked_add_days(Days::new(1))
            .ok_or_else(|| ApiError::parameter("to", "out of range"))?,
    };
    let from = match from {
        Some(d) => d,
        None => to
            .checked_sub_days(Days::new(DEFAULT_RANGE_DAYS))
            .ok_or_else(|| ApiError::parameter("from", "out of range"))?,
    };
    if from >= to {
        return Err(ApiError::parameter("to", "must be a later day than from"));
    }
    if (to - from).num_days() > MAX_RANGE_DAYS as i64 {
        return Err(ApiError::parameter(
            "to",
            format!("the range may span at most {MAX_RANGE_DAYS} days"),
        ));
    }
    let limit = params::limit(&q.limit, &state.pages)?;
    let after = q
        .cursor
        .as_deref()
        .map(|c| decode_cursor(group_by, c))
        .transpose()?;
    let page = state
        .store
        .analytics(group_by, (from, to), now, after.as_deref(), limit)
        .await?;
    let (position, groups) = (page.position, page.groups);
    let mut res = HttpResponse::Ok();
    res.insert_header((PROJECTION_POSITION, position.to_string()));
    if let Some(next) = page.next {
        res.insert_header((
            header::LINK,
            params::link_next(&req, "/analytics", "cursor", &encode_cursor(&next)),
        ));
    }
    Ok(res.json(Analytics {
        from: from.to_string(),
        to: to.to_string(),
        group_by,
        as_of: format_time(&now),
        position,
        groups,
    }))
}
