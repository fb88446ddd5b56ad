//! The `agent-sessions` command line: one binary, one subcommand per role.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Retention: delete the sessions the settings select, purge deleted
    /// sessions' streams after the grace period, remove expired idempotency keys.
    Retention {
        #[command(subcommand)]
        action: RetentionAction,
    },
    /// A command-line client of the API: create, list, follow and change sessions.
    Sessions(Box<sessions::SessionsArgs>),
    /// Print a shell completion script: `agent-sessions completions bash > /etc/bash_completion.d/agent-sessions`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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

#[derive(Debug, Subcommand, Clone, Copy)]
pub enum RetentionAction {
    /// One pass (what the sweep in `serve` does), printing what it did.
    Run {
        /// Print what the pass would delete, purge and remove; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The completion script of `shell` for the whole command line (every
/// subcommand, the `sessions` verbs and their flags).
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut command = Cli::command();
    let name = command.get_name().to_string();
    let mut script = Vec::new();
    // Into memory first: clap_complete panics when its writer fails (a closed pipe).
    clap_complete::generate(shell, &mut command, name, &mut script);
    if shell == clap_complete::Shell::Bash {
        // clap_complete (4.6) names the `case` arms of a binary whose name
        // has a `-` as if the part after it were a subcommand
        // (`agent__subcmd__sessions__…`), not as the names it assigns
        // (`agent__sessions__…`), so nothing below the first level
        // completed. Give the arms the assigned names.
        let text = String::from_utf8_lossy(&script).replace(
            "agent__subcmd__sessions__subcmd__",
            "agent__sessions__subcmd__",
        );
        return text.into_bytes();
    }
    script
}
