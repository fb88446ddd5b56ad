//! Prometheus metrics: one recorder per process, rendered at `/metrics`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Every metric name the service and the runner export, in one place.
pub(crate) mod names {
    // HTTP edge.
    pub(crate) const HTTP_REQUESTS: &str = "http_requests_total";
    pub(crate) const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";
    // Store.
    pub(crate) const EVENTS_APPENDED: &str = "events_appended_total";
    pub(crate) const DB_POOL_CONNECTIONS: &str = "db_pool_connections";
    pub(crate) const DB_POOL_MAX_CONNECTIONS: &str = "db_pool_max_connections";
    pub(crate) const DB_STATEMENT_TIMEOUTS: &str = "db_statement_timeouts_total";
    /// Commands waiting for a batch, and batches and commands run, by `kind`
    /// (`read`, `create`, `update`): commands / batches is the mean batch.
    pub(crate) const DB_BATCH_QUEUED: &str = "db_batch_queued_commands";
    pub(crate) const DB_BATCHES: &str = "db_batches_total";
    pub(crate) const DB_BATCH_COMMANDS: &str = "db_batch_commands_total";
    // Relay and feed.
    pub(crate) const RELAY_LEADER: &str = "relay_leader";
    pub(crate) const RELAY_PUBLISHED: &str = "relay_published_total";
    pub(crate) const RELAY_PUBLISH_FAILURES: &str = "relay_publish_failures_total";
    pub(crate) const RELAY_COMMIT_TO_PUBLISH: &str = "relay_commit_to_publish_seconds";
    pub(crate) const RELAY_LAG_EVENTS: &str = "relay_lag_events";
    pub(crate) const RELAY_LAG_SECONDS: &str = "relay_lag_seconds";
    pub(crate) const FEED_HELD_EVENTS: &str = "feed_held_events";
    pub(crate) const FEED_HELD_SECONDS: &str = "feed_held_seconds";
    pub(crate) const FEED_BLOCKER_AGE_SECONDS: &str = "feed_blocker_transaction_age_seconds";
    pub(crate) const HINTS_PUBLISHED: &str = "hints_published_total";
    pub(crate) const HINTS_DROPPED: &str = "hints_dropped_total";
    // Analytics projection.
    pub(crate) const ANALYTICS_LEADER: &str = "analytics_leader";
    pub(crate) const ANALYTICS_FOLDED: &str = "analytics_folded_events_total";
    pub(crate) const ANALYTICS_POSITION: &str = "analytics_position";
    /// Live sessions by status, read from the projection at each scrape.
    pub(crate) const SESSIONS: &str = "sessions";
    // Runner.
    pub(crate) const RUNNER_WORKERS: &str = "runner_workers";
    pub(crate) const RUNNER_MAX_WORKERS: &str = "runner_max_workers";
    pub(crate) const RUNNER_WORKER_STARTS: &str = "runner_worker_starts_total";
    pub(crate) const RUNNER_WORKER_START_FAILURES: &str = "runner_worker_start_failures_total";
    pub(crate) const RUNNER_WORKER_RESTARTS: &str = "runner_worker_restarts_total";
    pub(crate) const RUNNER_WORKER_EXITS: &str = "runner_worker_exits_total";
    pub(crate) const RUNNER_WORKER_CRASHES: &str = "runner_worker_crashes_total";
    pub(crate) const RUNNER_COST_USD: &str = "runner_cost_usd_total";
    pub(crate) const RUNNER_RESYNCS: &str = "runner_resyncs_total";
    pub(crate) const RUNNER_HINTS: &str = "runner_hints_total";
}

use names::*;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the recorder once; later calls return the same handle.
#[expect(
    clippy::expect_used,
    reason = "the bucket list is a non-empty constant"
)]
pub(crate) fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The request counter and duration histogram of one method, route and
/// status, registered once: a request then only bumps them.
struct HttpSeries {
    method: Box<str>,
    status: u16,
    count: Counter,
    duration: Histogram,
}

thread_local! {
    /// Per route pattern, the series seen on this thread (each actix
    /// worker has its own; the recorder holds the shared values).
    static HTTP_SERIES: RefCell<HashMap<Box<str>, Vec<HttpSeries>>> = RefCell::new(HashMap::new());
}

pub(crate) fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    HTTP_SERIES.with_borrow_mut(|routes| {
        if !routes.contains_key(route) {
            routes.insert(route.into(), Vec::new());
        }
        let Some(series) = routes.get_mut(route) else {
            return;
        };
        let at = match series
            .iter()
            .position(|s| s.status == status && &*s.method == method)
        {
            Some(at) => at,
            None => {
                let labels = [
                    ("method", method.to_owned()),
                    ("route", route.to_owned()),
                    ("status", status.to_string()),
                ];
                series.push(HttpSeries {
                    method: method.into(),
                    status,
                    count: metrics::counter!(HTTP_REQUESTS, &labels),
                    duration: metrics::histogram!(HTTP_REQUEST_DURATION, &labels),
                });
                series.len() - 1
            }
        };
        let s = &series[at];
        s.count.increment(1);
        s.duration.record(elapsed.as_secs_f64());
    });
}

pub(crate) fn event_appended(kind: &'static str) {
    metrics::counter!(EVENTS_APPENDED, "event_type" => kind).increment(1);
}
