//! `agent-sessions`: parse the command, load settings, start telemetry, run.

use std::process::ExitCode;

use agent_sessions::cli::{Cli, Command, MigrateAction, RetentionAction};
use agent_sessions::settings::Settings;
use agent_sessions::startup::Application;
use agent_sessions::{api, store, telemetry};
use clap::Parser;
use migration::{Migrator, MigratorTrait};

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => {
            return match api::openapi::document() {
                Ok(doc) => {
                    print!("{doc}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agent-sessions: the OpenAPI document does not serialise: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::HashToken => {
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
                eprintln!("agent-sessions: give the token on stdin");
                return ExitCode::from(2);
            }
            println!("{}", agent_sessions::auth::hash_token(token.trim()));
            return ExitCode::SUCCESS;
        }
        Command::Completions { shell } => {
            let script = agent_sessions::cli::completions(shell);
            // A reader that stops early (`| head`) is not an error of ours.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &script);
            return ExitCode::SUCCESS;
        }
        Command::WorkerShim { command } => return agent_sessions::shim::run(command).await,
        Command::Sessions(args) => return agent_sessions::cli::sessions::run(*args).await,
        _ => {}
    }
    let settings = match Settings::load(cli.config.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agent-sessions: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(settings.log.format, &settings.log.filter);
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = ?e, "agent-sessions failed");
            eprintln!("agent-sessions: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            Application::build(&settings)
                .await?
                .run_until_signalled()
                .await?;
        }
        Command::Runner => agent_sessions::runner::run(&settings).await?,
        Command::Migrate { action } => {
            let mut opts = sea_orm::ConnectOptions::new(settings.database.url.clone());
            opts.sqlx_logging(false);
            let db = sea_orm::Database::connect(opts).await?;
            match action.unwrap_or(MigrateAction::Up) {
                MigrateAction::Up => Migrator::up(&db, None).await?,
                MigrateAction::Down => Migrator::down(&db, Some(1)).await?,
                MigrateAction::Status => Migrator::status(&db).await?,
            }
        }
        Command::Replay { verify, analytics } => {
            if !verify && !analytics {
                anyhow::bail!("say what to replay: `--verify` (sessions), `--analytics`, or both");
            }
            let mut opts = sea_orm::ConnectOptions::new(settings.database.url.clone());
            opts.sqlx_logging(false);
            let store = store::Store::from_connection(sea_orm::Database::connect(opts).await?);
            if analytics {
                let started = std::time::Instant::now();
                let r = store.rebuild_analytics().await?;
                println!(
                    "rebuilt the analytics projection: {} sessions, {} running rows, position {} ({:.1} s)",
                    r.sessions,
                    r.running_rows,
                    r.position,
                    started.elapsed().as_secs_f64()
                );
            }
            if verify {
                let report = store.replay_verify().await?;
                println!(
                    "replayed {} events into {} sessions: {} difference(s)",
                    report.events_read,
                    report.sessions_checked,
                    report.differences.len()
                );
                for d in &report.differences {
                    println!("  {}: {}", d.session_id, d.detail);
                }
                if !report.differences.is_empty() {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Retention {
            action: RetentionAction::Run { dry_run },
        } => {
            let report = agent_sessions::retention::run_once(&settings, dry_run).await?;
            println!("{report}");
        }
        Command::Openapi
        | Command::HashToken
        | Command::Completions { .. }
        | Command::WorkerShim { .. }
        | Command::Sessions(_) => {
            unreachable!("handled before settings are loaded")
        }
    }
    Ok(ExitCode::SUCCESS)
}
