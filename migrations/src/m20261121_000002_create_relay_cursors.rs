//! Durable cursors of event publishers: how far each has published the log.

const UP: &str = "CREATE TABLE relay_cursors (
                     name       text PRIMARY KEY,
                     position   bigint      NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now()
                 )";

const DOWN: &str = "DROP TABLE IF EXISTS relay_cursors";

sql_migration!("m20261121_000002_create_relay_cursors", UP, DOWN);
