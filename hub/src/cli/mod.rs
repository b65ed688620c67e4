//! The `tessera-hub` command line: its commands, and where each is carried out.

mod audit;
mod import;
mod keys;
mod policy;
mod registry;
mod remote;
mod setup;
pub(crate) mod text;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use tessera_hub::config::{self, ConfigError, HubConfig};
use tessera_hub::policy::Policy;
use tessera_hub::store::{ClientKind, Sqlite};
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
    /// Print a Mosquitto ACL file matching the topic layout.
    BrokerAcl {
        /// MQTT user name the hub connects with.
        #[arg(long, default_value = "tessera-hub")]
        hub_user: String,
        /// Operator user names allowed to read the event stream.
        #[arg(long = "watcher")]
        watchers: Vec<String>,
    },
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Print the most recent audit log entries.
    Audit {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
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
    },
    /// As an operator, over MQTT: print the hub's live event stream.
    Watch {
        #[command(flatten)]
        who: Identity,
        /// Stop after this many events (default: run until interrupted).
        #[arg(long)]
        count: Option<usize>,
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
    /// Register many devices at once, all or none, from a CSV file: `id,role,groups,key`
    /// per line, groups separated by `;`, key the path of an SPKI PEM public key or empty
    /// for a one-time enrollment code (printed as `id,code` lines). Blank lines and lines
    /// starting with `#` are skipped.
    Import {
        /// The CSV file.
        file: PathBuf,
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
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// List signing keys.
    List,
    /// Create the next signing key: published now, used after the announce period; the
    /// current key is kept until its tokens have expired.
    Rotate,
}

pub(crate) async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { dir, hub_id } => setup::init(&dir, &hub_id).await,
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
        Command::BrokerAcl { hub_user, watchers } => {
            print!("{}", acl::mosquitto_acl(&hub_user, &watchers));
            Ok(())
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
        Command::Device(DeviceCmd::Import { file }) => import::import_devices(&config, &file).await,
        Command::App(RegisterCmd::Add { id, role, key }) => {
            registry::add_keyed(&config, &id, ClientKind::App, &role, &key).await
        }
        Command::Operator(RegisterCmd::Add { id, role, key }) => {
            registry::add_keyed(&config, &id, ClientKind::Operator, &role, &key).await
        }
        Command::Client(cmd) => registry::client_cmd(&config, cmd).await,
        Command::Policy(PolicyCmd::Check { file }) => policy::check(&config, file).await,
        Command::Policy(PolicyCmd::Force { file }) => policy::force(&config, file),
        Command::Policy(PolicyCmd::Explain { app, device, scope }) => {
            policy::explain(&config, &app, &device, &scope).await
        }
        Command::Keys(KeysCmd::List) => keys::list(&config).await,
        Command::Keys(KeysCmd::Rotate) => keys::rotate(&config).await,
        Command::Audit { limit } => audit::print(&config, limit).await,
        Command::Revoke(args) => remote::revoke(&config, args).await,
        Command::AccessToken { who, device, scope } => {
            remote::access_token(&config, &who, &device, &scope).await
        }
        Command::Watch { who, count } => remote::watch(&config, &who, count).await,
        Command::Init { .. }
        | Command::Default { .. }
        | Command::Keygen { .. }
        | Command::BrokerAcl { .. } => {
            unreachable!("handled before the config is loaded")
        }
    }
}

/// Opens the hub's existing database; never creates one (only `init` does).
pub(crate) fn open_store(config: &HubConfig) -> Result<Sqlite> {
    Ok(Sqlite::open_existing(&config.database)?)
}
