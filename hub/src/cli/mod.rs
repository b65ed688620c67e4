//! The `tessera-hub` command line: its commands, and where each is carried out.

mod audit;
mod backup;
mod dashboard;
mod import;
mod inspect;
mod keys;
mod policy;
mod present;
mod registry;
mod remote;
mod revocations;
mod setup;
pub(crate) mod text;
mod when;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use tessera_hub::config::{self, ConfigError, HubConfig};
use tessera_hub::policy::Policy;
use tessera_hub::store::{AnyStore, ClientKind};
use tessera_hub::{acl, keyfile, keys as hub_keys};
use tessera_shared::crypto::Signer;

#[derive(Parser)]
#[command(
    name = "tessera-hub",
    version,
    about = "Tessera hub: scoped device tokens over MQTT"
)]
pub(crate) struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "TESSERA_HUB_CONFIG",
        default_value = "tessera-hub.toml"
    )]
    config: PathBuf,
    /// Log format on stderr: `text` (one line per event) or `json` (one JSON object per
    /// line, for log collectors).
    #[arg(
        long,
        global = true,
        env = "TESSERA_LOG_FORMAT",
        value_enum,
        default_value_t = crate::LogFormat::Text
    )]
    pub(crate) log_format: crate::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a hub directory: config, policy, key-encryption secret, database, first
    /// signing key; print the trust anchor devices need.
    Init {
        /// Directory to create the files in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The hub's id (`iss` of its tokens).
        #[arg(long, default_value = "tessera-hub")]
        hub_id: String,
        /// The hub's database: an SQLite file (default: `tessera-hub.db` in `--dir`), or a
        /// `postgres://` URL of an existing, empty PostgreSQL database.
        #[arg(long)]
        database: Option<String>,
    },
    /// Serve requests over MQTT until SIGINT or SIGTERM; SIGHUP reloads the policy.
    Serve {
        /// Broker host (overrides the config file).
        #[arg(long, env = "TESSERA_HUB_MQTT_HOST")]
        mqtt_host: Option<String>,
        /// Broker port (overrides the config file).
        #[arg(long, env = "TESSERA_HUB_MQTT_PORT")]
        mqtt_port: Option<u16>,
    },
    /// Print the trust anchor (the active signing key) in every format.
    TrustAnchor,
    /// Print the commented default configuration or policy.
    Default {
        /// `config` or `policy`.
        what: String,
    },
    /// Generate a P-256 key pair for a device, app or operator (PKCS#8 PEM, mode 0600;
    /// the public key goes to `<out>.pub` as SPKI PEM).
    Keygen {
        /// Private key file to create.
        out: PathBuf,
    },
    /// Back the database up into a new file (mode 0600), safely while `serve` runs, and
    /// check the copy; keep the key-encryption secret (hub.kek) too, stored apart.
    Backup {
        /// The backup file to create (never overwritten).
        file: PathBuf,
    },
    /// Put a backup in place of the database, while no hub serves it: checks the backup
    /// (integrity, schema, signing keys open with this hub's secret) first, and sets the
    /// replaced database aside.
    Restore {
        /// The backup file.
        file: PathBuf,
    },
    /// Register and manage devices.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Register control apps.
    #[command(subcommand)]
    App(RegisterCmd),
    /// Register operators.
    #[command(subcommand)]
    Operator(RegisterCmd),
    /// List, remove and re-role any client.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Check the policy file or explain a decision.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Print a Mosquitto ACL file matching the topic layout. It is safe only with the
    /// mosquitto.conf lines its header names (`--mosquitto-conf` prints them): client ids
    /// bound to authenticated user names.
    BrokerAcl {
        /// MQTT user name the hub connects with; repeat it for replicas, one user each.
        #[arg(long = "hub-user", default_value = "tessera-hub")]
        hub_users: Vec<String>,
        /// Operator user names allowed to read the event stream.
        #[arg(long = "watcher")]
        watchers: Vec<String>,
        /// Print the mosquitto.conf lines the ACL relies on instead of the ACL.
        #[arg(long, conflicts_with_all = ["hub_users", "watchers"])]
        mosquitto_conf: bool,
    },
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Print the most recent audit log entries, filtered by client, device, action and
    /// time (in the database, however long the log).
    Audit(audit::AuditArgs),
    /// Tokens: `token inspect` decodes one and checks it (claims, signature against the
    /// hub's keys or --trust-anchor, expiry, revocation); exits non-zero for a token a
    /// verifier would refuse.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print the live revocation list: every stream and the entries in force on it.
    Revocations {
        /// One JSON array on stdout, one object per stream.
        #[arg(long)]
        json: bool,
    },
    /// As an operator, over MQTT: revoke a token, a subject, a device, a group, a role or a
    /// list of devices, in one signed request; prints once it is durable.
    Revoke(remote::RevokeArgs),
    /// As a control app, over MQTT: get an access token for a device; prints it in hex.
    AccessToken {
        #[command(flatten)]
        who: Identity,
        /// The device.
        #[arg(long)]
        device: String,
        /// Space-separated scopes.
        #[arg(long)]
        scope: String,
        /// One JSON object on stdout: the token in hex and its claims.
        #[arg(long)]
        json: bool,
    },
    /// As an operator, over MQTT: print the hub's live event stream (or its alerts).
    Watch {
        #[command(flatten)]
        who: Identity,
        /// Stop after this many messages (default: run until interrupted).
        #[arg(long)]
        count: Option<usize>,
        /// Print the anomaly alerts, quarantines and their end (`tessera/v1/hub/alerts`)
        /// instead of the events.
        #[arg(long)]
        alerts: bool,
    },
    /// As an operator whose role may revoke, over MQTT: lift a client's quarantine
    /// (docs/OPERATING.md, "Alerts and quarantine").
    LiftQuarantine {
        #[command(flatten)]
        who: Identity,
        /// The quarantined client.
        client: String,
    },
    /// As a control app: sign a proof-of-possession presentation of an access token for a
    /// device (PROTOCOL.md §13); prints it in hex for the device's `tessera-agent verify`.
    Present(present::PresentArgs),
    /// Give an operator a password for the dashboard (`[http.dashboard]`): prints a new
    /// random one once and keeps only its SHA-256; replaces the one it had, ending its
    /// sessions.
    DashboardPassword {
        /// The operator (its role must list `watch`).
        operator: String,
        /// Take the operator's password away instead.
        #[arg(long)]
        remove: bool,
    },
    /// Print a shell completion script: `tessera-hub completions bash > …`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Who a client command acts as, and how it reaches the broker.
#[derive(Args)]
struct Identity {
    /// Client id to act as.
    #[arg(long = "as")]
    id: String,
    /// Its private key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// The hub's trust anchor (SPKI PEM, as `init` wrote it).
    #[arg(long)]
    trust_anchor: PathBuf,
    /// Broker host (default: the config file's).
    #[arg(long)]
    mqtt_host: Option<String>,
    /// Broker port (default: the config file's).
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// Broker user name (when the broker authenticates clients; the ACL's `user` lines).
    #[arg(long, env = "TESSERA_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// Broker password.
    #[arg(long, env = "TESSERA_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// Seconds to wait for the hub.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register many devices at once, all or none, in one transaction, from a CSV file
    /// whose first line is the header `id,role,group,key`: group holds groups separated by
    /// `;` (or is empty), key the path of the device's SPKI PEM public key relative to the
    /// file, or is empty for a one-time enrollment code. Blank lines and lines starting
    /// with `#` are skipped. Every bad row is reported, and then nothing is registered.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// New file (mode 0600, never overwritten) for the one-time enrollment codes, as
        /// `id,code` lines; required when a row has no key. Codes are never printed.
        #[arg(long)]
        codes: Option<PathBuf>,
    },
    /// Provision a revoked device again (or one that never enrolled), with a new public
    /// key or a new one-time enrollment code; it keeps its id, role and groups, and must
    /// enroll again. The key it had is never accepted again.
    Reprovision {
        /// Device id.
        id: String,
        /// The device's new public key (SPKI PEM).
        #[arg(long, conflicts_with = "enrollment_code")]
        key: Option<PathBuf>,
        /// Print a new one-time enrollment code (the agent makes a new key when it enrolls).
        #[arg(long)]
        enrollment_code: bool,
    },
    /// Register a device, with its public key or a one-time enrollment code.
    Add {
        /// Device id.
        id: String,
        /// Device role in the policy.
        #[arg(long)]
        role: String,
        /// Device groups.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The device's public key (SPKI PEM).
        #[arg(long, conflicts_with = "enrollment_code")]
        key: Option<PathBuf>,
        /// Print a one-time enrollment code for a device that makes its key on first boot.
        #[arg(long)]
        enrollment_code: bool,
    },
}

#[derive(Subcommand)]
enum RegisterCmd {
    /// Register with a role and a public key.
    Add {
        /// Client id.
        id: String,
        /// Role in the policy.
        #[arg(long)]
        role: String,
        /// Public key (SPKI PEM).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClientCmd {
    /// List registered clients.
    List {
        /// Only this kind (device, app, operator).
        #[arg(long)]
        kind: Option<String>,
        /// One JSON array on stdout, one object per client.
        #[arg(long)]
        json: bool,
    },
    /// Remove a client from the registry (revoke it first to cut its live tokens).
    Remove {
        /// Client id.
        id: String,
    },
    /// Change a client's role and revoke its tokens the new role no longer allows.
    SetRole {
        /// Client id.
        id: String,
        /// New role.
        role: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file (default: the configured one), and check it against the
    /// registered clients and live tokens as a running hub would on SIGHUP.
    Check {
        /// Policy file.
        file: Option<PathBuf>,
    },
    /// Force the next reload of a policy file (default: the configured one) past the
    /// reload checks: writes `<file>.force` naming its SHA-256. It forces exactly these
    /// contents, once.
    Force {
        /// Policy file.
        file: Option<PathBuf>,
    },
    /// Explain whether an app would get scopes on a device, and why.
    Explain {
        /// The app.
        #[arg(long)]
        app: String,
        /// The device.
        #[arg(long)]
        device: String,
        /// Space-separated scopes.
        #[arg(long)]
        scope: String,
        /// One JSON object on stdout: the verdict, the grant or denial, and each step.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Decode and check a token (hex, or a file holding hex or raw CBOR).
    Inspect(inspect::InspectArgs),
}

#[derive(Subcommand)]
enum KeysCmd {
    /// List signing keys.
    List {
        /// One JSON array on stdout, one object per key.
        #[arg(long)]
        json: bool,
    },
    /// Create the next signing key: published now, used after the announce period; the
    /// current key is kept until its tokens have expired.
    Rotate,
}

pub(crate) async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
            hub_id,
            database,
        } => setup::init_with_database(&dir, &hub_id, database.as_deref()).await,
        Command::Default { what } => {
            match what.as_str() {
                "config" => print!("{}", config::DEFAULT_TOML),
                "policy" => print!("{}", Policy::DEFAULT_TOML),
                other => bail!("unknown default `{other}`: use `config` or `policy`"),
            }
            Ok(())
        }
        Command::Keygen { out } => {
            let signer = hub_keys::generate_client_key()?;
            keyfile::write_private(&out, &signer)?;
            let public = keyfile::public_to_pem(&signer.public_key());
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            keyfile::write_new(&pub_path, public.as_bytes(), 0o644)?;
            println!(
                "private key: {}\npublic key:  {}",
                out.display(),
                pub_path.display()
            );
            print!("{public}");
            Ok(())
        }
        // Needs nothing of the hub's files: an operator may write the broker's ACL first.
        Command::BrokerAcl {
            hub_users,
            watchers,
            mosquitto_conf,
        } => {
            if mosquitto_conf {
                print!("{}", acl::mosquitto_conf());
            } else {
                print!("{}", acl::mosquitto_acl(&hub_users, &watchers));
            }
            Ok(())
        }
        Command::Present(args) => present::present(&args),
        // Loads the hub's configuration itself, unless told to check with a trust anchor.
        Command::Token(TokenCmd::Inspect(args)) => inspect::token(&cli.config, args).await,
        Command::Completions { shell } => {
            // Into a buffer first: `generate` panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "tessera-hub", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(())
        }
        // A policy file can be checked before there is a hub to check it against.
        Command::Policy(PolicyCmd::Check { file: Some(file) }) if !cli.config.exists() => {
            policy::check(None, Some(file)).await
        }
        command => with_config(&cli.config, command).await,
    }
}

async fn with_config(path: &Path, command: Command) -> Result<()> {
    let config = HubConfig::load(path).map_err(|e| {
        // `init` is the advice for a missing file only: a file that exists but does not
        // parse needs fixing where the error points, and `init` would refuse to overwrite
        // it anyway.
        let missing = matches!(&e, ConfigError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(e);
        if missing {
            e.context(
                "cannot load the hub configuration (use --config, or create a hub with \
                 `tessera-hub init`)",
            )
        } else {
            e.context("cannot load the hub configuration")
        }
    })?;
    match command {
        Command::Serve {
            mqtt_host,
            mqtt_port,
        } => setup::serve(config, mqtt_host, mqtt_port).await,
        Command::TrustAnchor => keys::trust_anchor(&config).await,
        Command::Device(DeviceCmd::Add {
            id,
            role,
            groups,
            key,
            enrollment_code,
        }) => registry::add_device(&config, &id, &role, groups, key, enrollment_code).await,
        Command::Device(DeviceCmd::Reprovision {
            id,
            key,
            enrollment_code,
        }) => registry::reprovision_device(&config, &id, key, enrollment_code).await,
        Command::Device(DeviceCmd::Import { file, codes }) => {
            import::import_devices(&config, &file, codes.as_deref()).await
        }
        Command::Backup { file } => backup::backup(&config, &file),
        Command::Restore { file } => backup::restore(&config, &file).await,
        Command::App(RegisterCmd::Add { id, role, key }) => {
            registry::add_keyed(&config, &id, ClientKind::App, &role, &key).await
        }
        Command::Operator(RegisterCmd::Add { id, role, key }) => {
            registry::add_keyed(&config, &id, ClientKind::Operator, &role, &key).await
        }
        Command::Client(cmd) => registry::client_cmd(&config, cmd).await,
        Command::Policy(PolicyCmd::Check { file }) => policy::check(Some(&config), file).await,
        Command::Policy(PolicyCmd::Force { file }) => policy::force(&config, file),
        Command::Policy(PolicyCmd::Explain {
            app,
            device,
            scope,
            json,
        }) => policy::explain(&config, &app, &device, &scope, json).await,
        Command::Keys(KeysCmd::List { json }) => keys::list(&config, json).await,
        Command::Keys(KeysCmd::Rotate) => keys::rotate(&config).await,
        Command::Audit(args) => audit::print(&config, args).await,
        Command::Revocations { json } => revocations::list(&config, json).await,
        Command::Revoke(args) => remote::revoke(&config, args).await,
        Command::AccessToken {
            who,
            device,
            scope,
            json,
        } => remote::access_token(&config, &who, &device, &scope, json).await,
        Command::Watch { who, count, alerts } => {
            let topic = if alerts {
                tessera_shared::topic::ALERTS
            } else {
                tessera_shared::topic::EVENTS
            };
            remote::watch(&config, &who, topic, count).await
        }
        Command::LiftQuarantine { who, client } => {
            remote::lift_quarantine(&config, &who, &client).await
        }
        Command::DashboardPassword { operator, remove } => {
            dashboard::password(&config, &operator, remove).await
        }
        Command::Init { .. }
        | Command::Default { .. }
        | Command::Keygen { .. }
        | Command::BrokerAcl { .. }
        | Command::Present(_)
        | Command::Token(_)
        | Command::Completions { .. } => {
            unreachable!("handled before the config is loaded")
        }
    }
}

/// Opens the hub's existing database; never creates one (only `init` does).
pub(crate) fn open_store(config: &HubConfig) -> Result<AnyStore> {
    Ok(AnyStore::open_existing(&config.database)?)
}
