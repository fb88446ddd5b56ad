//! Schema migrations for agent-sessions, applied by `agent-sessions migrate`.
//!
//! Each migration is plain SQL with a real `down`, so the schema can be read
//! in one place and rolled back step by step.

pub use sea_orm_migration::prelude::*;

/// The advisory lock key every event-writing statement takes, shared, before
/// it writes (PostgreSQL's two-int4 form: `pg_locks.classid`, `objid`,
/// `objsubid = 2`; "agse", "writ"). The feed's horizon functions
/// (migration 11) look for it; the store's writers take it.
pub const EVENT_WRITER_KEY: (i64, i64) = (0x6167_7365, 0x7772_6974);

/// A migration of plain SQL: `$up` applied by `up`, `$down` by `down`
/// (each migration module's whole Rust part).
macro_rules! sql_migration {
    ($name:literal, $up:expr, $down:expr) => {
        pub(crate) struct Migration;

        impl $crate::MigrationName for Migration {
            fn name(&self) -> &str {
                $name
            }
        }

        #[$crate::async_trait::async_trait]
        impl $crate::MigrationTrait for Migration {
            async fn up(&self, manager: &$crate::SchemaManager) -> Result<(), $crate::DbErr> {
                use $crate::ConnectionTrait as _;
                manager.get_connection().execute_unprepared($up).await?;
                Ok(())
            }

            async fn down(&self, manager: &$crate::SchemaManager) -> Result<(), $crate::DbErr> {
                use $crate::ConnectionTrait as _;
                manager.get_connection().execute_unprepared($down).await?;
                Ok(())
            }
        }
    };
}

mod m20261121_000001_create_sessions_and_events;
mod m20261121_000002_create_relay_cursors;
mod m20261121_000003_create_session_messages;
mod m20261129_000004_create_session_inputs_and_approvals;
mod m20261203_000005_create_session_transcripts_and_forks;
mod m20261230_000006_create_session_tombstones;
mod m20261230_000007_create_session_analytics;
mod m20261230_000008_list_indexes;
mod m20261230_000009_analytics_running_sums;
mod m20261231_000010_worker_state_indexes;
mod m20261231_000011_feed_functions;
mod m20261231_000012_feed_generic_plans;
mod m20261231_000013_analytics_worker_sums_numeric;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_create_sessions_and_events::Migration),
            Box::new(m20261121_000002_create_relay_cursors::Migration),
            Box::new(m20261121_000003_create_session_messages::Migration),
            Box::new(m20261129_000004_create_session_inputs_and_approvals::Migration),
            Box::new(m20261203_000005_create_session_transcripts_and_forks::Migration),
            Box::new(m20261230_000006_create_session_tombstones::Migration),
            Box::new(m20261230_000007_create_session_analytics::Migration),
            Box::new(m20261230_000008_list_indexes::Migration),
            Box::new(m20261230_000009_analytics_running_sums::Migration),
            Box::new(m20261231_000010_worker_state_indexes::Migration),
            Box::new(m20261231_000011_feed_functions::Migration),
            Box::new(m20261231_000012_feed_generic_plans::Migration),
            Box::new(m20261231_000013_analytics_worker_sums_numeric::Migration),
        ]
    }
}
