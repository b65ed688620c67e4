//! `tessera-hub`: the hub service and its command line ([`cli`]).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::text::error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = cli::Cli::parse();
    init_logging(cli.log_format);
    let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    rt.block_on(cli::run(cli))
}

/// How log events are written to stderr (`--log-format`, `TESSERA_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`), for log
    /// collectors.
    Json,
}

fn init_logging(format: LogFormat) {
    let logger = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match format {
        // Colours only for a person at a terminal: escape codes garble a log file.
        LogFormat::Text => logger
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logger.json().with_ansi(false).init(),
    }
}
