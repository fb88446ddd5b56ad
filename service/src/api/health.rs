//! Liveness, readiness and metrics.

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::domain::SessionStatus;
use crate::metrics::names;
use crate::monitor::FeedHealth;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` when a dependency is down.
    pub status: String,
    /// Each dependency: `ok` or what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    pub database: String,
    pub redis: String,
    /// Whether committed events are being released to readers; `held` when
    /// an open event writer has held them back longer than
    /// `relay.feed_held_warn_secs` (readiness stays true: another replica
    /// would not help).
    pub feed: FeedHealth,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok".into(),
        checks: None,
    })
}

/// Ready to serve: PostgreSQL and Redis both answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "A dependency is down", body = Health),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let timeout = std::time::Duration::from_secs(2);
    let (db, redis) = tokio::join!(
        tokio::time::timeout(timeout, state.store.ping()),
        tokio::time::timeout(timeout, state.bus.ping()),
    );
    let describe = |r: Result<Result<(), String>, _>| match r {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e,
        Err(_) => "timed out".to_owned(),
    };
    let database = describe(db.map(|r| r.map_err(|e| format!("{e}"))));
    let redis = describe(redis.map(|r| r.map_err(|e| format!("{e}"))));
    let ok = database == "ok" && redis == "ok";
    let body = Health {
        status: if ok { "ok" } else { "unavailable" }.into(),
        checks: Some(Checks {
            database,
            redis,
            feed: state.feed_watch.latest(),
        }),
    };
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Set the `sessions` gauge from the analytics projection, which every
/// replica shares, so each replica reports the same figures (aggregate them
/// with `max`, not `sum`). Read at each scrape; when PostgreSQL does not
/// answer in time the gauge keeps its last value.
async fn refresh_sessions_gauge(state: &AppState) {
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        state.store.sessions_by_status(),
    )
    .await;
    match read {
        Ok(Ok(counts)) => {
            for status in SessionStatus::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!(names::SESSIONS, "status" => status.as_str()).set(n as f64);
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "sessions gauge not refreshed"),
        Err(_) => tracing::debug!("sessions gauge not refreshed: timed out"),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    refresh_sessions_gauge(&state).await;
    let pool = state.store.pool_stats();
    let in_use = pool.size.saturating_sub(pool.idle);
    metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(pool.idle));
    metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!(names::DB_POOL_MAX_CONNECTIONS).set(f64::from(pool.max));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::handle().render())
}
