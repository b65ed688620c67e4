//! `tessera-agent`: the device agent's command line. See `docs/DEVICE.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tessera_agent::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_TOML, Overrides};
use tessera_agent::local::{self, Asked, Command as Request, Reply};
use tessera_agent::shell::{self, Ended, Inspected};
use tessera_agent::status::Status;
use tessera_agent::{Error, exit, identity, store};
use tessera_shared::crypto::Signer;
use zeroize::Zeroizing;

/// How long the `token`, `verify` and `status` commands wait for the running agent.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "tessera-agent",
    version,
    about = "Tessera device agent: keeps a valid device token, encrypted at rest, and checks \
             the tokens apps present to this device"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, env = "TESSERA_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// This device's id (overrides `device_id`).
    #[arg(long, global = true, env = "TESSERA_AGENT_DEVICE_ID")]
    device_id: Option<String>,
    /// Broker host (overrides `[mqtt] host`).
    #[arg(long, global = true, env = "TESSERA_AGENT_MQTT_HOST")]
    mqtt_host: Option<String>,
    /// Broker port (overrides `[mqtt] port`).
    #[arg(long, global = true, env = "TESSERA_AGENT_MQTT_PORT")]
    mqtt_port: Option<u16>,
    /// Store directory (overrides `[store] dir`).
    #[arg(long, global = true, env = "TESSERA_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Local socket (overrides `socket`).
    #[arg(long, global = true, env = "TESSERA_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// Whether the local clock is trusted (overrides `trust_local_clock`).
    #[arg(long, global = true, env = "TESSERA_AGENT_TRUST_LOCAL_CLOCK")]
    trust_local_clock: Option<bool>,
    /// Log format on stderr: `text` (one line per event) or `json` (one JSON object per
    /// line, for log collectors).
    #[arg(long, global = true, env = "TESSERA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the fully commented default configuration.
    DefaultConfig,
    /// Create the device key if there is none, and print its public key (SPKI PEM) for
    /// `tessera-hub device add ID --key`.
    Keygen,
    /// Enroll with the hub (creating the device key and store if needed) and fetch the
    /// first device token.
    Enroll {
        /// The one-time enrollment code from `tessera-hub device add ID --enrollment-code`
        /// (overrides `enrollment_code`). Only the key derived from it is kept, in memory.
        #[arg(long, env = "TESSERA_AGENT_ENROLLMENT_CODE", hide_env_values = true)]
        code: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// Keep a valid device token until stopped or revoked; serve the local socket.
    Run,
    /// Print the current device token (hex), from the running agent or else the store.
    Token,
    /// Check an app's presentation (COSE_Sign1, hex) for a scope, with the running agent.
    Verify {
        /// The scope the requested action needs, for example `door:open`.
        #[arg(long)]
        scope: String,
        /// The presentation in hex.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        presentation: Option<String>,
        /// A file holding the presentation, raw or hex.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Show the token expiry, next refresh, revocation freshness, last error and state.
    Status {
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print Prometheus metrics instead of text (docs/METRICS.md, "Agent").
        #[arg(long)]
        prometheus: bool,
    },
    /// Print a shell completion script: `tessera-agent completions bash > …`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
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

fn main() -> ExitCode {
    exit_quietly_on_a_closed_pipe();
    let cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Token
            | Command::Verify { .. }
            | Command::Status { .. }
            | Command::DefaultConfig
            | Command::Completions { .. }
    );
    init_logging(cli.log_format, quiet);
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .downcast_ref::<Error>()
                .map_or(exit::FAILURE, Error::exit_code);
            eprintln!("error: {}", error_message(&e));
            ExitCode::from(code)
        }
    }
}

/// Logs to stderr at the level `RUST_LOG` names (`warn`, `info`, `tessera_agent=debug,info`:
/// a default level and per-target levels; `info`, or `warn` for the `quiet` commands, when
/// unset or unreadable). The filter is `tracing_subscriber`'s `Targets`, not its
/// `EnvFilter`, which would bring a regular-expression engine into the device binary.
fn init_logging(format: LogFormat, quiet: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let default = if quiet { "warn" } else { "info" };
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| default.parse().unwrap_or_default());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // Colours only on a terminal: journald and log files get plain text.
        LogFormat::Text => registry
            .with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => registry.with(layer.json().with_ansi(false)).init(),
    }
}

/// The chain of causes on one line, each said once: an error that shows its source in its
/// own message (`{what}: {source}`) is not followed by that source again, as `{:#}` would.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if message.ends_with(text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(text);
    }
    message
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    if let Command::DefaultConfig = cli.command {
        print!("{DEFAULT_TOML}");
        return Ok(exit::OK);
    }
    if let Command::Completions { shell } = cli.command {
        // Into a buffer first: `generate` panics on a failed write (a closed pipe).
        let mut script = Vec::new();
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "tessera-agent", &mut script);
        std::io::Write::write_all(&mut std::io::stdout(), &script)?;
        return Ok(exit::OK);
    }
    let overrides = Overrides {
        device_id: cli.device_id,
        mqtt_host: cli.mqtt_host,
        mqtt_port: cli.mqtt_port,
        state_dir: cli.state_dir,
        socket: cli.socket,
        trust_local_clock: cli.trust_local_clock,
    };
    let loaded = Config::load(&cli.config, &overrides);
    // Device programs may ask the running agent with just `--socket`, without the right to
    // read its configuration; only reading the store needs it.
    if matches!(
        cli.command,
        Command::Token | Command::Verify { .. } | Command::Status { .. }
    ) {
        let socket = match (&loaded, &overrides.socket) {
            (Ok(c), _) => c.socket.clone(),
            (Err(_), Some(socket)) => socket.clone(),
            (Err(_), None) => {
                return Err(loaded
                    .err()
                    .map_or_else(|| anyhow::anyhow!("no configuration"), Into::into));
            }
        };
        let access = Access {
            socket,
            config: loaded,
        };
        return match cli.command {
            Command::Verify {
                scope,
                presentation,
                file,
            } => verify(&access, scope, presentation, file),
            Command::Status { json, prometheus } => status(&access, json, prometheus),
            _ => token(&access),
        };
    }
    let config = loaded?;
    match cli.command {
        Command::DefaultConfig
        | Command::Completions { .. }
        | Command::Token
        | Command::Verify { .. }
        | Command::Status { .. } => Ok(exit::OK),
        Command::Keygen => keygen(&config),
        Command::Enroll { code, timeout_s } => {
            let code = code.map(Zeroizing::new);
            let enrolled = runtime()?.block_on(shell::enroll(
                &config,
                code,
                Duration::from_secs(timeout_s),
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            ))?;
            println!(
                "enrolled {} at {}; device token valid until {}",
                config.device_id,
                enrolled.enrolled_at.map_or("?".into(), |t| t.to_string()),
                enrolled
                    .token_expires_at
                    .map_or("?".into(), |t| t.to_string()),
            );
            println!(
                "device key {} ({}); encrypted store {}",
                enrolled.key_file.display(),
                if enrolled.key_created {
                    "created"
                } else {
                    "existing"
                },
                enrolled.record.display()
            );
            Ok(exit::OK)
        }
        Command::Run => match runtime()?.block_on(shell::run(&config, shutdown_signal()))? {
            Ended::Stopped => Ok(exit::OK),
            Ended::Revoked => {
                eprintln!(
                    "error: {}",
                    shell::revoked_error("the hub revoked it; its store is wiped")
                );
                Ok(exit::REVOKED)
            }
        },
    }
}

/// How `token`, `verify` and `status` reach the agent: its socket, and the configuration
/// if it could be read (to read the store when the agent is not running).
struct Access {
    socket: PathBuf,
    config: Result<Config, Error>,
}

impl Access {
    fn config(&self) -> anyhow::Result<&Config> {
        self.config.as_ref().map_err(|e| {
            anyhow::anyhow!(
                "the agent is not running (no answer on {}), and reading its store needs its \
                 configuration: {e}",
                self.socket.display()
            )
        })
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

fn keygen(config: &Config) -> anyhow::Result<u8> {
    if let Some(dir) = config.key_file.parent() {
        store::ensure_private_dir(dir)?;
    }
    let (signer, created) = identity::device_key_or_create(&config.key_file)?;
    eprintln!(
        "device key {} ({}), kid {}",
        config.key_file.display(),
        if created { "created" } else { "existing" },
        hex::encode(signer.kid())
    );
    print!("{}", identity::public_to_pem(&signer.public_key())?);
    Ok(exit::OK)
}

/// Exit code for a refusal the running agent sent.
fn refusal_code(reason: &str) -> u8 {
    if reason.starts_with("revoked") {
        exit::REVOKED
    } else {
        exit::FAILURE
    }
}

fn token(access: &Access) -> anyhow::Result<u8> {
    match local::ask(&access.socket, &Request::Token, SOCKET_TIMEOUT)? {
        Asked::Answer(Reply::Ok(hex)) => {
            println!("{hex}");
            Ok(exit::OK)
        }
        Asked::Answer(Reply::Err(reason)) => {
            eprintln!("error: {reason}");
            Ok(refusal_code(&reason))
        }
        // Not running: read the store (needs the agent user's rights).
        Asked::NotRunning => match shell::inspect(access.config()?)? {
            Inspected::Enrolled { token: Ok(hex), .. } => {
                println!("{hex}");
                Ok(exit::OK)
            }
            Inspected::Enrolled {
                token: Err(reason), ..
            } => {
                eprintln!("error: {reason} (the agent is not running)");
                Ok(exit::FAILURE)
            }
            Inspected::NotEnrolled => {
                Err(Error::NotEnrolled(access.config()?.store.record.clone()).into())
            }
            Inspected::Revoked(note) => Err(shell::revoked_error(&note).into()),
        },
    }
}

fn verify(
    access: &Access,
    scope: String,
    presentation: Option<String>,
    file: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let bytes = match (presentation, file) {
        (Some(text), _) => hex::decode(text.trim()).context("the presentation is not hex")?,
        (None, Some(path)) => {
            let raw =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let text = String::from_utf8_lossy(&raw);
            let compact: String = text.split_whitespace().collect();
            match hex::decode(&compact) {
                Ok(bytes) if !compact.is_empty() => bytes,
                _ => raw,
            }
        }
        (None, None) => anyhow::bail!("give the presentation in hex or --file"),
    };
    let request = Request::Verify {
        scope,
        presentation: bytes,
    };
    match local::ask(&access.socket, &request, SOCKET_TIMEOUT)? {
        Asked::Answer(Reply::Ok(subject)) => {
            println!("accepted: presented by {subject}");
            Ok(exit::OK)
        }
        Asked::Answer(Reply::Err(reason)) => {
            println!("refused: {reason}");
            Ok(exit::FAILURE)
        }
        Asked::NotRunning => anyhow::bail!(
            "the agent is not running (no answer on {}): verifying needs its current key set \
             and revocation list",
            access.socket.display()
        ),
    }
}

fn status(access: &Access, json: bool, prometheus: bool) -> anyhow::Result<u8> {
    let now = tessera_agent::system::now_ms();
    let (status, code) = match local::ask(&access.socket, &Request::Status, SOCKET_TIMEOUT)? {
        Asked::Answer(Reply::Ok(text)) => {
            let status: Status = serde_json::from_str(&text)
                .context("the agent sent a status that does not parse")?;
            let code = match status.state.as_str() {
                "revoked" => exit::REVOKED,
                _ if status.token_valid => exit::OK,
                _ => exit::FAILURE,
            };
            (status, code)
        }
        Asked::Answer(Reply::Err(reason)) => anyhow::bail!("the agent refused: {reason}"),
        Asked::NotRunning => {
            let config = access.config()?;
            match shell::inspect(config) {
                Ok(Inspected::Enrolled { status, .. }) => {
                    let code = if status.token_valid {
                        exit::OK
                    } else {
                        exit::FAILURE
                    };
                    (*status, code)
                }
                Ok(Inspected::NotEnrolled) => (
                    Status::without_store(
                        &config.device_id,
                        "not_enrolled",
                        Some(format!("no store at {}", config.store.record.display())),
                        now,
                        config.trust_local_clock,
                    ),
                    exit::NOT_ENROLLED,
                ),
                Ok(Inspected::Revoked(note)) => (
                    Status::without_store(
                        &config.device_id,
                        "revoked",
                        Some(note),
                        now,
                        config.trust_local_clock,
                    ),
                    exit::REVOKED,
                ),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else if prometheus {
        print!("{}", tessera_agent::metrics::render(&status));
    } else {
        print!("{}", status.render());
    }
    Ok(code)
}
