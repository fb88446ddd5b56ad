//! The feed's horizon as database functions, so a reader of the whole feed
//! learns the horizon and reads below it in one round trip
//! (docs/design.md, the feed horizon and G3).
//!
//! `feed_writers(snapshot)`: our event writers — transactions holding the
//! shared advisory lock every event-writing statement takes first
//! (`store/append.rs`, [`crate::EVENT_WRITER_KEY`]) — among the snapshot's running
//! transactions, with their full transaction ids.
//!
//! `feed_horizon()`: the exclusive upper bound of positions a reader may
//! pass, from snapshots of its own. It first takes the oldest transaction
//! running at all (any running transaction may be a writer of ours, so that
//! bound is safe, and the snapshot gives it for free); only when committed
//! events already wait past that bound does it look, in a later snapshot,
//! for the oldest of *our* writers (`pg_locks`, `pg_stat_activity`) — or the
//! snapshot's `xmax` when none is open — since the transaction holding them
//! may be a stranger's. At low load nothing waits and the horizon is two
//! index probes; a stranger's long transaction costs the full look per call
//! and never holds the feed back. It reads `pg_stat_activity`, which
//! PostgreSQL keeps as of its first read in a transaction: call it at most
//! once per transaction, and read the feed with a later statement.
//! PL/pgSQL rather than SQL: its plans are kept for the session (a SQL
//! function's body is planned again at every call, about a millisecond here).
//!
//! `feed_after(after, page)`: the events after `after` below the horizon, in
//! position order, at most `page` of them, in one call. It is VOLATILE, so
//! each of its statements takes a snapshot of its own, in order: the
//! horizon comes from statements earlier than the read, as G3 requires —
//! the same as statements sent one after the other.

/// The functions, for the writer key [`crate::EVENT_WRITER_KEY`].
static UP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let (class, obj) = crate::EVENT_WRITER_KEY;
    UP_TEMPLATE
        .replace("{class}", &class.to_string())
        .replace("{obj}", &obj.to_string())
});

const UP_TEMPLATE: &str = r#"
CREATE FUNCTION feed_writers(snap pg_snapshot)
RETURNS TABLE (xid bigint, pid integer, datname name, state text,
               xact_start timestamptz, query_start timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT x::text::bigint, a.pid, a.datname, a.state, a.xact_start, a.query_start
    FROM pg_snapshot_xip(snap) AS x
    JOIN pg_stat_activity a ON a.backend_xid::text::bigint = x::text::bigint % 4294967296
    JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
                   AND l.classid = {class} AND l.objid = {obj} AND l.objsubid = 2
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
$$;

CREATE FUNCTION feed_horizon() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon bigint;
BEGIN
    -- The oldest transaction running at this snapshot, ours or not: a safe
    -- bound that costs nothing to learn.
    SELECT LEAST(pg_snapshot_xmax(snap.s)::text::bigint,
                 (SELECT min(x::text::bigint) FROM pg_snapshot_xip(snap.s) x)) * 1024
      INTO horizon
      FROM (SELECT pg_current_snapshot() AS s) snap;
    -- Committed events wait past it: the transaction holding them may be
    -- none of ours, which only our writers can tell (a later snapshot).
    -- (ORDER BY ... LIMIT 1: an EXISTS here is planned as a scan of the
    -- table, and the newest events are at its end.)
    IF (SELECT e.position FROM events e WHERE e.position >= horizon
        ORDER BY e.position LIMIT 1) IS NOT NULL THEN
        horizon := GREATEST(horizon,
            (SELECT LEAST(pg_snapshot_xmax(snap.s)::text::bigint,
                          (SELECT min(w.xid) FROM feed_writers(snap.s) w)) * 1024
             FROM (SELECT pg_current_snapshot() AS s) snap));
    END IF;
    RETURN horizon;
END
$$;

CREATE FUNCTION feed_after(after bigint, page integer) RETURNS SETOF events
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    horizon bigint := feed_horizon();
BEGIN
    IF horizon - 1 > after THEN
        RETURN QUERY SELECT * FROM events e
            WHERE e.position > after AND e.position < horizon
            ORDER BY e.position LIMIT page;
    END IF;
END
$$;
"#;

const DOWN: &str = r#"
DROP FUNCTION IF EXISTS feed_after(bigint, integer);
DROP FUNCTION IF EXISTS feed_horizon();
DROP FUNCTION IF EXISTS feed_writers(pg_snapshot);
"#;

sql_migration!("m20261231_000011_feed_functions", &UP, DOWN);
