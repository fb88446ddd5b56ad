//! Portable sessions: the CLI transcript each session's worker writes, kept
//! as append-only chunks keyed by byte offset, and where a forked session
//! came from.
//!
//! Transcript chunks hang off a session like `session_messages`: the
//! statement that deletes a session deletes them too. A chunk records the
//! session's version when it was stored, which is how a transcript is cut
//! "as of" a version (fork, `GET …/transcript?at_version=`).

const UP: &str = r#"
CREATE TABLE session_transcript_chunks (
    session_id   uuid        NOT NULL,
    start_offset bigint      NOT NULL CHECK (start_offset >= 0),
    bytes        bytea       NOT NULL CHECK (octet_length(bytes) > 0),
    -- The session's version when the chunk was stored (appending a chunk
    -- appends no event and leaves the version alone).
    version      bigint      NOT NULL CHECK (version >= 1),
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (session_id, start_offset)
);

ALTER TABLE sessions ADD COLUMN parent_session_id uuid;
ALTER TABLE sessions ADD COLUMN forked_from_version bigint;
ALTER TABLE sessions ADD CONSTRAINT sessions_forked_from_both
    CHECK ((parent_session_id IS NULL) = (forked_from_version IS NULL));

CREATE INDEX sessions_parent_created_idx
    ON sessions (parent_session_id, created_at DESC, id DESC)
    WHERE parent_session_id IS NOT NULL;
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS sessions_parent_created_idx;
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_forked_from_both;
ALTER TABLE sessions DROP COLUMN IF EXISTS forked_from_version;
ALTER TABLE sessions DROP COLUMN IF EXISTS parent_session_id;
DROP TABLE IF EXISTS session_transcript_chunks;
"#;

sql_migration!(
    "m20261203_000005_create_session_transcripts_and_forks",
    UP,
    DOWN
);
