//! The analytics projection keeps running sums instead of day buckets, so
//! that `GET /analytics` reads the same number of rows for a range of one
//! day or of a year (docs/design.md, analytics).
//!
//! `analytics_running` holds, per key (dimension, value, status) and per UTC
//! day on which a session of that key was created, the sums over every
//! session of the key created on or before that day. The figures of a range
//! `[from, to)` are the row at the last day before `to` minus the row at the
//! last day before `from`: two index probes per key. `analytics_keys` lists
//! the keys of each dimension, so a query walks them without scanning days.
//! The existing buckets are turned into running sums here, so no rebuild is
//! needed after the upgrade; `down` turns them back.

/// The summed columns, in the order of the tables.
const SUMS: [&str; 23] = [
    "sessions",
    "n_active",
    "n_paused",
    "n_completed",
    "n_crashed",
    "created_us",
    "ended_us",
    "active_since_us",
    "paused_since_us",
    "crashed_since_us",
    "active_us",
    "paused_us",
    "crashed_us",
    "pauses",
    "resumes",
    "recoveries",
    "crashes",
    "worker_generations",
    "restarts",
    "turns",
    "input_tokens",
    "output_tokens",
    "cost_micro_usd",
];

/// Columns whose sums need `numeric`: Σ of epoch microseconds, and what
/// grows over every session of a key (counts stay within `bigint` far
/// beyond any real deployment, the instants do not).
fn sql_type(column: &str) -> &'static str {
    match column {
        "created_us" | "ended_us" | "active_since_us" | "paused_since_us" | "crashed_since_us" => {
            "numeric"
        }
        _ => "bigint",
    }
}

fn columns(f: impl Fn(&str) -> String) -> String {
    SUMS.iter().map(|c| f(c)).collect::<Vec<_>>().join(", ")
}

fn up() -> String {
    let defs = columns(|c| format!("{c} {} NOT NULL", sql_type(c)));
    let names = columns(str::to_owned);
    let running = columns(|c| {
        format!(
            "sum({c}) OVER (PARTITION BY dimension, value, status ORDER BY day)::{}",
            sql_type(c)
        )
    });
    format!(
        r#"
CREATE TABLE analytics_running (
    dimension text NOT NULL CHECK (dimension IN ('all', 'agent_id', 'session_type')),
    -- Byte order (`C`): cheaper to compare, and the order pages follow.
    value     text COLLATE "C" NOT NULL,
    -- The sessions' status for `all`; '' for the other dimensions.
    status    text COLLATE "C" NOT NULL,
    day       date NOT NULL,
    {defs},
    PRIMARY KEY (dimension, value, status, day)
);

CREATE TABLE analytics_keys (
    dimension text NOT NULL,
    value     text COLLATE "C" NOT NULL,
    status    text COLLATE "C" NOT NULL,
    PRIMARY KEY (dimension, value, status)
);

INSERT INTO analytics_running (dimension, value, status, day, {names})
SELECT dimension, value, status, day, {running} FROM analytics_buckets;
INSERT INTO analytics_keys (dimension, value, status)
SELECT DISTINCT dimension, value, status FROM analytics_running;
DROP TABLE analytics_buckets;
"#
    )
}

fn down() -> String {
    let defs = columns(|c| format!("{c} {} NOT NULL", sql_type(c)));
    let names = columns(str::to_owned);
    let daily = columns(|c| {
        format!(
            "{c} - coalesce(lag({c}) OVER (PARTITION BY dimension, value, status ORDER BY day), 0)"
        )
    });
    format!(
        r#"
CREATE TABLE analytics_buckets (
    dimension text NOT NULL CHECK (dimension IN ('all', 'agent_id', 'session_type')),
    day       date NOT NULL,
    value     text NOT NULL,
    status    text NOT NULL,
    {defs},
    PRIMARY KEY (dimension, day, value, status)
);
INSERT INTO analytics_buckets (dimension, day, value, status, {names})
SELECT dimension, day, value, status, {names}
FROM (SELECT dimension, day, value, status, {daily} FROM analytics_running)
     d(dimension, day, value, status, {names})
WHERE sessions <> 0;
DROP TABLE analytics_keys;
DROP TABLE analytics_running;
"#
    )
}

sql_migration!("m20261230_000009_analytics_running_sums", &up(), &down());
