//! Durable cursors of event publishers: how far each has published the log.

use sea_orm_migration::prelude::*;

pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261121_000002_create_relay_cursors"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE TABLE relay_cursors (
                     name       text PRIMARY KEY,
                     position   bigint      NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS relay_cursors")
            .await?;
        Ok(())
    }
}
