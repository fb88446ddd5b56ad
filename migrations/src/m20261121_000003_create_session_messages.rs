//! The message log a worker produced (its stream-json lines), and the usage
//! counters derived from it on the session.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261121_000003_create_session_messages"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE sessions ADD COLUMN usage jsonb NOT NULL DEFAULT '{}'::jsonb;
                 CREATE TABLE session_messages (
                     session_id uuid        NOT NULL,
                     seq        bigint      NOT NULL CHECK (seq >= 1),
                     message    jsonb       NOT NULL,
                     created_at timestamptz NOT NULL,
                     PRIMARY KEY (session_id, seq)
                 );",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP TABLE IF EXISTS session_messages; ALTER TABLE sessions DROP COLUMN IF EXISTS usage;",
            )
            .await?;
        Ok(())
    }
}
