//! `tessera-hub`: the hub service and its command line ([`cli`]).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;

fn main() -> std::process::ExitCode {
    exit_quietly_on_a_closed_pipe();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::text::error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A reader that stops early (`| head`) closes stdout: that ends the command quietly, with
/// the status a shell gives a process SIGPIPE stops (128 + 13), not with a panic and a
/// backtrace. `print!` panics on a write error; the hook sees which.
fn exit_quietly_on_a_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
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
