//! Store errors, classified so the edge can answer precisely: a lost race or
//! a value PostgreSQL refuses is the client's 4xx, an unreachable database is
//! a 503, anything else is our 500.

use sea_orm::{DbErr, RuntimeErr};
use uuid::Uuid;

use crate::domain::DomainError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session {0} not found")]
    NotFound(Uuid),
    #[error("session is at version {actual}, not {expected}")]
    VersionMismatch { expected: i64, actual: i64 },
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Something of a session other than the session itself is missing
    /// (an approval).
    #[error("{0}")]
    Missing(String),
    /// The session's state refuses the write (input to a completed session,
    /// a second decision).
    #[error("{0}")]
    Refused(String),
    /// An upload that does not fit the stored transcript (a gap, or bytes
    /// that differ from the stored ones); `length` is the stored length.
    #[error("{detail}")]
    TranscriptConflict { detail: String, length: i64 },
    /// Over a configured size limit.
    #[error("{0}")]
    TooLarge(String),
    #[error("idempotency key was used with a different request")]
    IdempotencyKeyReused,
    #[error("the session created under this idempotency key has been deleted")]
    IdempotentTargetGone(Uuid),
    #[error("too many concurrent updates to session {0}; retry")]
    Contended(Uuid),
    #[error("PostgreSQL refused the value: {0}")]
    Unstorable(String),
    #[error("database unavailable")]
    Unavailable(#[source] DbErr),
    /// Cancelled by `statement_timeout` (a lock wait, a stalled writer).
    #[error("statement cancelled after the statement timeout")]
    TimedOut(#[source] DbErr),
    /// Its text carries PostgreSQL's message, for the logs of the loops
    /// that retry (the relay, the analytics consumer); a request that
    /// meets it answers a bare 500 whatever the text.
    #[error("database error: {0}")]
    Database(DbErr),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        match &e {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Self::Unavailable(e),
            DbErr::Exec(RuntimeErr::SqlxError(s)) | DbErr::Query(RuntimeErr::SqlxError(s)) => {
                use sea_orm::sqlx::Error as X;
                match s.as_ref() {
                    X::Io(_) | X::PoolTimedOut | X::PoolClosed | X::WorkerCrashed | X::Tls(_) => {
                        Self::Unavailable(e)
                    }
                    X::Database(d) => match d.code().as_deref() {
                        // data_exception (22…) and program_limit_exceeded (54…):
                        // the value, not the service, is at fault.
                        Some(c) if c.starts_with("22") || c.starts_with("54") => {
                            Self::Unstorable(d.message().to_owned())
                        }
                        // query_canceled: our statement_timeout cut it.
                        Some("57014") => {
                            metrics::counter!(crate::metrics::names::DB_STATEMENT_TIMEOUTS)
                                .increment(1);
                            Self::TimedOut(e)
                        }
                        // admin shutdown, cannot connect now, crash shutdown.
                        Some("57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006") => {
                            Self::Unavailable(e)
                        }
                        _ => Self::Database(e),
                    },
                    _ => Self::Database(e),
                }
            }
            _ => Self::Database(e),
        }
    }
}
