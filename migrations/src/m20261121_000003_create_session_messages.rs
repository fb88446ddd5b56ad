//! The message log a worker produced (its stream-json lines), and the usage
//! counters derived from it on the session.

const UP: &str = "ALTER TABLE sessions ADD COLUMN usage jsonb NOT NULL DEFAULT '{}'::jsonb;
                 CREATE TABLE session_messages (
                     session_id uuid        NOT NULL,
                     seq        bigint      NOT NULL CHECK (seq >= 1),
                     message    jsonb       NOT NULL,
                     created_at timestamptz NOT NULL,
                     PRIMARY KEY (session_id, seq)
                 );";

const DOWN: &str =
    "DROP TABLE IF EXISTS session_messages; ALTER TABLE sessions DROP COLUMN IF EXISTS usage;";

sql_migration!("m20261121_000003_create_session_messages", UP, DOWN);
