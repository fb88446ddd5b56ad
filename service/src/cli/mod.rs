//! The `agent-sessions` command line: one binary, one subcommand per role.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod sessions;

#[derive(Debug, Parser)]
#[command(
    name = "agent-sessions",
    version,
    about = "Agent sessions with an event log, and the runner that starts their workers"
)]
pub struct Cli {
    /// A TOML settings file (also `APP_CONFIG_FILE`); environment variables override it.
    #[arg(long, global = true, env = "APP_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Start, pause, resume and report Claude Code workers for sessions that ask for one.
    Runner,
    /// Apply or inspect database migrations.
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Print the SHA-256 of an API token read from stdin, for `auth.tokens_json`.
    HashToken,
    /// Rebuild from the event log: compare the sessions (`--verify`),
    /// rebuild the analytics projection (`--analytics`), or both.
    Replay {
        /// Compare the rebuilt sessions with the `sessions` table; exit 1 on any difference.
        #[arg(long)]
        verify: bool,
        /// Rebuild the analytics projection from the log (set-based SQL, one
        /// transaction; readers keep the old projection until it commits).
        #[arg(long)]
        analytics: bool,
    },
    /// A command-line client of the API: create, list, follow and change sessions.
    Sessions(Box<sessions::SessionsArgs>),
    /// A worker pod's entrypoint: take the framing the runner writes to stdin
    /// (a transcript to restore), run the command, report its transcript on stderr.
    WorkerShim {
        /// The command to run, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand, Clone, Copy)]
pub enum MigrateAction {
    /// Apply every pending migration (the default).
    Up,
    /// Roll back the last migration.
    Down,
    /// List migrations and whether each is applied.
    Status,
}
