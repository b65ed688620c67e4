//! `tessera-hub`: the hub service and its command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tessera_hub::client::{Answer, Client};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::{self, ConfigError, HubConfig};
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::mqtt::MqttConfig;
use tessera_hub::pipeline::Hub;
use tessera_hub::policy::{Policy, SharedPolicy};
use tessera_hub::server::{self, ServeConfig};
use tessera_hub::store::{ClientKind, ClientRecord, Sqlite, Store};
use tessera_hub::{acl, keyfile, policy_change};
use tessera_shared::crypto::{COSE_KEY_LEN, PublicKey, Signer};
use tessera_shared::message::{
    EnrollmentCode, IdList, MAX_REVOKE_LIST, RequestBody, RevokeTarget, validate_id,
};
use tessera_shared::scope::Scopes;

#[derive(Parser)]
#[command(
    name = "tessera-hub",
    version,
    about = "Tessera hub: scoped device tokens over MQTT"
)]
struct Cli {
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
    Revoke {
        #[command(flatten)]
        who: Identity,
        /// A token id (cti, hex).
        #[arg(long, group = "target")]
        token_id: Option<String>,
        /// A token hash (hex; SHA-256 of the token's canonical encoding, PROTOCOL.md §6.6).
        #[arg(long, group = "target")]
        token_hash: Option<String>,
        /// Every token issued to this device or app before now, and its refresh grants.
        #[arg(long, group = "target")]
        subject: Option<String>,
        /// A whole device: its tokens, grants and enrollment; it is told to wipe itself.
        #[arg(long, group = "target")]
        device: Option<String>,
        /// Every device in this group, each as --device.
        #[arg(long, group = "target")]
        group: Option<String>,
        /// Every client with this role: devices as --device, apps and operators as --subject.
        #[arg(long, group = "target")]
        role: Option<String>,
        /// Devices listed in a file, one id a line (blank lines and `#` comments skipped),
        /// each as --device. Up to 16384 ids go in one request.
        #[arg(long, group = "target")]
        devices_from: Option<PathBuf>,
    },
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

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The chain of causes on one line, for people, each said once. Many errors already show
/// their source in their own message (`{path}: {source}`), and `{:#}` would then print
/// that source a second time: a cause the message before it ends with is left out.
fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if !previous.is_empty() && previous.ends_with(text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(text);
        previous = text.to_owned();
    }
    message
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: escape codes garble a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { dir, hub_id } => init(&dir, &hub_id).await,
        Command::Default { what } => {
            match what.as_str() {
                "config" => print!("{}", config::DEFAULT_TOML),
                "policy" => print!("{}", Policy::DEFAULT_TOML),
                other => bail!("unknown default `{other}`: use `config` or `policy`"),
            }
            Ok(())
        }
        Command::Keygen { out } => {
            let signer = keys::generate_client_key()?;
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
    let clock = SystemClock;
    match command {
        Command::Serve {
            mqtt_host,
            mqtt_port,
        } => serve(config, mqtt_host, mqtt_port).await,
        Command::TrustAnchor => {
            let store = open_store(&config)?;
            let kek = Kek::load(config.kek_file.as_deref())?;
            let ring = KeyRing::load(&store, &kek, &config.hub_id, clock.now()).await?;
            print_trust_anchor(&ring.active(clock.now()).public_key());
            Ok(())
        }
        Command::Device(DeviceCmd::Add {
            id,
            role,
            groups,
            key,
            enrollment_code,
        }) => {
            let store = open_store(&config)?;
            let policy = Policy::load(&config.policy)?;
            check_id_is_free(&config, &policy, &id)?;
            check_role(&policy, &role, ClientKind::Device)?;
            for g in &groups {
                if policy.group(g).is_none() {
                    bail!("device group `{g}` is not declared in the policy's [groups]");
                }
            }
            let (public_key, code) = match (key, enrollment_code) {
                (Some(k), false) => (Some(keyfile::read_public(&k)?.to_sec1().to_vec()), None),
                (None, true) => (None, Some(new_enrollment_code()?)),
                _ => bail!("give the device's public key (--key) or ask for --enrollment-code"),
            };
            register(
                &store,
                &id,
                ClientKind::Device,
                &role,
                groups,
                public_key,
                code.as_deref(),
            )
            .await?;
            println!("registered device {id}");
            if let Some(code) = code {
                println!("one-time enrollment code: {code}");
            }
            Ok(())
        }
        Command::Device(DeviceCmd::Import { file }) => import_devices(&config, &file).await,
        Command::App(RegisterCmd::Add { id, role, key }) => {
            add_keyed(&config, &id, ClientKind::App, &role, &key).await
        }
        Command::Operator(RegisterCmd::Add { id, role, key }) => {
            add_keyed(&config, &id, ClientKind::Operator, &role, &key).await
        }
        Command::Client(cmd) => client_cmd(&config, cmd).await,
        Command::Policy(PolicyCmd::Check { file }) => {
            let file = file.unwrap_or_else(|| config.policy.clone());
            let policy = Policy::load(&file)?;
            // Against the registry too, when there is one to check against: what would
            // make the running hub refuse this file on SIGHUP.
            if config.database.exists() {
                let store = open_store(&config)?;
                check_audience_is_free(&store, &policy, &file).await?;
                let objections = policy_change::check(
                    &store,
                    &policy,
                    &config.reload_limits(),
                    SystemClock.now(),
                )
                .await?;
                if !objections.is_empty() {
                    for o in &objections {
                        eprintln!("{}: {o}", file.display());
                    }
                    bail!(
                        "{}: a running hub would refuse this policy; to apply it anyway, \
                         `tessera-hub policy force {}` (or `sha256sum {} > {}`), then SIGHUP",
                        file.display(),
                        file.display(),
                        file.display(),
                        tessera_hub::policy::force_marker(&file).display()
                    );
                }
            }
            println!(
                "{}: ok ({}, {}, {})",
                file.display(),
                counted(policy.roles().count(), "role", "roles"),
                counted(policy.groups().count(), "group", "groups"),
                counted(policy.rules().len(), "access rule", "access rules")
            );
            Ok(())
        }
        Command::Policy(PolicyCmd::Force { file }) => {
            let file = file.unwrap_or_else(|| config.policy.clone());
            let candidate = tessera_hub::policy::write_force_marker(&file)?;
            println!(
                "{}: the next reload applies this file (sha256 {}) whatever it revokes; \
                 send the hub SIGHUP",
                tessera_hub::policy::force_marker(&file).display(),
                hex::encode(candidate.digest)
            );
            Ok(())
        }
        Command::Policy(PolicyCmd::Explain { app, device, scope }) => {
            let store = open_store(&config)?;
            let policy = Policy::load(&config.policy)?;
            let app = store
                .client(&app)
                .await?
                .with_context(|| format!("no client `{app}`"))?;
            let device = store
                .client(&device)
                .await?
                .with_context(|| format!("no client `{device}`"))?;
            let scopes = Scopes::parse(&scope).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
            let explanation = policy.explain_access(&app, &device, &scopes);
            println!("{explanation}");
            // Like `grep`, the exit status answers the question, for scripts.
            if let Err(denial) = &explanation.verdict {
                bail!(
                    "denied ({}): {} would not get \"{scope}\" on {}",
                    denial.code,
                    app.id,
                    device.id
                );
            }
            Ok(())
        }
        Command::Keys(KeysCmd::List) => {
            let store = open_store(&config)?;
            for k in store.keys().await? {
                println!(
                    "{}  created {}  published {}  active from {}  retire after {}",
                    hex::encode(k.kid),
                    k.created_at,
                    k.published_at
                        .map_or("not yet".to_string(), |t| t.to_string()),
                    k.active_from,
                    k.retire_after.map_or("-".to_string(), |t| t.to_string())
                );
            }
            Ok(())
        }
        Command::Keys(KeysCmd::Rotate) => {
            let store = open_store(&config)?;
            let policy = Policy::load(&config.policy)?;
            let kek = Kek::load(config.kek_file.as_deref())?;
            let next = keys::rotate(
                &store,
                &kek,
                &config.hub_id,
                clock.now(),
                config.keys.rotation_announce_s,
                policy.longest_token_lifetime_s(),
                policy.leeway_s(),
            )
            .await?;
            println!(
                "next signing key {}: the running hub publishes it in its key set at its next \
                 heartbeat and signs with it {} s after that",
                hex::encode(next.kid()),
                config.keys.rotation_announce_s
            );
            Ok(())
        }
        Command::Audit { limit } => {
            let store = open_store(&config)?;
            for e in store.audit_tail(limit).await? {
                // An aggregated row (a flood of one client's identical refusals) says how
                // many decisions it stands for.
                let times = if e.count > 1 {
                    format!(" (x{})", e.count)
                } else {
                    String::new()
                };
                println!(
                    "{}  {:<12} {:<18} {:<16} {:<14} {}{times}",
                    e.at_ms, e.actor, e.action, e.target, e.outcome, e.reason
                );
            }
            Ok(())
        }
        Command::Revoke {
            who,
            token_id,
            token_hash,
            subject,
            device,
            group,
            role,
            devices_from,
        } => {
            let cti = token_id
                .map(|h| hex::decode(h).context("--token-id is not hex"))
                .transpose()?;
            let hash = token_hash
                .map(|h| -> Result<[u8; 32]> {
                    hex::decode(h)
                        .context("--token-hash is not hex")?
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("--token-hash must be 32 bytes"))
                })
                .transpose()?;
            let listed = devices_from.as_deref().map(read_device_list).transpose()?;
            let lists: Vec<Vec<&str>> = listed
                .iter()
                .flat_map(|ids| revoke_batches(ids, config.requests.max_revoke_request_bytes))
                .collect();
            let mut targets = Vec::new();
            match (&cti, hash, &subject, &device, &group, &role) {
                (Some(c), None, None, None, None, None) => {
                    targets.push(RevokeTarget::TokenId(c));
                }
                (None, Some(h), None, None, None, None) => targets.push(RevokeTarget::TokenHash(h)),
                (None, None, Some(s), None, None, None) => targets.push(RevokeTarget::Subject(s)),
                (None, None, None, Some(d), None, None) => targets.push(RevokeTarget::Device(d)),
                (None, None, None, None, Some(g), None) => targets.push(RevokeTarget::Group(g)),
                (None, None, None, None, None, Some(r)) => targets.push(RevokeTarget::Role(r)),
                (None, None, None, None, None, None) if !lists.is_empty() => {
                    targets.extend(lists.iter().map(|l| RevokeTarget::Devices(IdList::new(l))));
                }
                _ => bail!(
                    "give exactly one of --token-id, --token-hash, --subject, --device, --group, \
                     --role, --devices-from"
                ),
            }
            let (mut client, timeout) = connect_as(&config, &who).await?;
            let (mut revoked, mut entries, mut notified) = (0, 0, 0);
            let mut failure = None;
            for (i, target) in targets.iter().enumerate() {
                match client.request(RequestBody::Revoke(*target), timeout).await {
                    Ok(Answer::Revoked {
                        revoked: r,
                        entries: e,
                        notified: n,
                    }) => (revoked, entries, notified) = (revoked + r, entries + e, notified + n),
                    Ok(other) => {
                        failure = Some(anyhow::anyhow!("unexpected answer: {other:?}"));
                        break;
                    }
                    Err(e) if targets.len() > 1 => {
                        failure = Some(anyhow::anyhow!(
                            "request {} of {} failed ({revoked} revoked before it): {e}",
                            i + 1,
                            targets.len()
                        ));
                        break;
                    }
                    Err(e) => {
                        failure = Some(e.into());
                        break;
                    }
                }
            }
            client.close().await;
            if let Some(e) = failure {
                return Err(e);
            }
            println!(
                "revoked {revoked} (durable): {entries} revocation entries published, \
                 {notified} devices told on their control topic"
            );
            Ok(())
        }
        Command::AccessToken { who, device, scope } => {
            validate_id(&device).map_err(|_| anyhow::anyhow!("invalid device id `{device}`"))?;
            let scopes = Scopes::parse(&scope).map_err(|e| anyhow::anyhow!("scope: {e}"))?;
            let (mut client, timeout) = connect_as(&config, &who).await?;
            let answer = client
                .request(
                    RequestBody::AccessToken {
                        device: &device,
                        scope: scopes,
                    },
                    timeout,
                )
                .await;
            client.close().await;
            match answer? {
                Answer::Token { token, .. } => println!("{}", hex::encode(token)),
                other => bail!("unexpected answer: {other:?}"),
            }
            Ok(())
        }
        Command::Watch { who, count } => {
            let (mut client, _) = connect_as(&config, &who).await?;
            client.subscribe(tessera_shared::topic::EVENTS).await?;
            let mut seen = 0;
            while let Some(msg) = client.next_message().await {
                if msg.topic == tessera_shared::topic::EVENTS {
                    println!("{}", String::from_utf8_lossy(&msg.payload));
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        break;
                    }
                }
            }
            client.close().await;
            Ok(())
        }
        Command::Init { .. }
        | Command::Default { .. }
        | Command::Keygen { .. }
        | Command::BrokerAcl { .. } => {
            unreachable!("handled before the config is loaded")
        }
    }
}

/// Reads a device list: one id a line; blank lines and `#` comments are skipped and
/// repeated ids kept once. An invalid id is an error naming its line.
fn read_device_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the device list {}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        validate_id(id).map_err(|_| {
            anyhow::anyhow!(
                "{}:{}: `{id}` is not a valid device id (A-Z a-z 0-9 . _ -, 1..=64)",
                path.display(),
                n + 1
            )
        })?;
        if seen.insert(id.to_owned()) {
            ids.push(id.to_owned());
        }
    }
    if ids.is_empty() {
        bail!("{} lists no device", path.display());
    }
    Ok(ids)
}

/// Splits a device list into as few revoke requests as the protocol's limits allow: at
/// most [`MAX_REVOKE_LIST`] ids and about `max_request_bytes` each.
fn revoke_batches(ids: &[String], max_request_bytes: usize) -> Vec<Vec<&str>> {
    // The envelope, the other request fields and the signature take well under 1 KiB.
    let budget = max_request_bytes.saturating_sub(1024);
    let mut batches: Vec<Vec<&str>> = Vec::new();
    let mut used = 0;
    for id in ids {
        // A CBOR text: the id and a head of one or two bytes.
        let len = id.len() + 2;
        match batches.last_mut() {
            Some(batch) if batch.len() < MAX_REVOKE_LIST && used + len <= budget => {
                batch.push(id);
                used += len;
            }
            _ => {
                batches.push(vec![id]);
                used = len;
            }
        }
    }
    batches
}

/// `device import`: registers every device of a CSV file in one transaction.
async fn import_devices(config: &HubConfig, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let policy = Policy::load(&config.policy)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let now = SystemClock.now();
    let mut records = Vec::new();
    let mut codes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", file.display(), n + 1);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [id, role, groups, key] = fields[..] else {
            bail!(
                "{}: expected `id,role,groups,key` (4 fields), found {}",
                at(),
                fields.len()
            );
        };
        validate_id(id).map_err(|_| anyhow::anyhow!("{}: `{id}` is not a valid id", at()))?;
        check_id_is_free(config, &policy, id).with_context(at)?;
        check_role(&policy, role, ClientKind::Device).with_context(at)?;
        let groups: Vec<String> = groups
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        for g in &groups {
            if policy.group(g).is_none() {
                bail!("{}: device group `{g}` is not declared in the policy", at());
            }
        }
        let (public_key, code_key) = if key.is_empty() {
            let code = new_enrollment_code()?;
            let derived = EnrollmentCode::derive_key(&code);
            codes.push((id.to_owned(), code));
            (None, Some(derived))
        } else {
            let path = base.join(key);
            (
                Some(
                    keyfile::read_public(&path)
                        .with_context(at)?
                        .to_sec1()
                        .to_vec(),
                ),
                None,
            )
        };
        records.push(ClientRecord {
            id: id.to_owned(),
            kind: ClientKind::Device,
            public_key,
            role: role.to_owned(),
            groups,
            enrollment_code_key: code_key,
            enrolled_at: None,
            revoked_at: None,
            created_at: now,
        });
    }
    let count = records.len();
    open_store(config)?.add_clients(records).await?;
    eprintln!(
        "registered {} from {}",
        counted(count, "device", "devices"),
        file.display()
    );
    for (id, code) in codes {
        println!("{id},{code}");
    }
    Ok(())
}

/// Opens the hub's existing database; never creates one (only `init` does).
fn open_store(config: &HubConfig) -> Result<Sqlite> {
    Ok(Sqlite::open_existing(&config.database)?)
}

/// Refuses a client id the hub's tokens or connection already use: the policy's
/// `device_audience` (a client with that id would find itself the audience of every
/// device token of the fleet, and accept them all as its own), the hub's id (the issuer of
/// every token) and the hub's MQTT client id (a client connecting with it would knock the
/// hub off the broker).
fn check_id_is_free(config: &HubConfig, policy: &Policy, id: &str) -> Result<()> {
    if id == policy.device_audience() {
        bail!(
            "`{id}` is the policy's device_audience ({}): every device token is issued for \
             it, so a client with this id would accept every device token of the fleet as \
             its own; register it under another id",
            config.policy.display()
        );
    }
    if id == config.hub_id {
        bail!("`{id}` is the hub's own id (hub_id in the configuration); use another id");
    }
    if id == config.mqtt.client_id {
        bail!(
            "`{id}` is the hub's MQTT client id (mqtt.client_id in the configuration): a client \
             connecting with it would knock the hub off the broker; use another id"
        );
    }
    Ok(())
}

/// Refuses a policy whose `device_audience` is the id of a registered client: that client
/// would accept every device token of the fleet as its own.
async fn check_audience_is_free(store: &Sqlite, policy: &Policy, file: &Path) -> Result<()> {
    let audience = policy.device_audience();
    if let Some(client) = store.client(audience).await? {
        bail!(
            "{}: device_audience `{audience}` is the id of the registered {} `{audience}`, \
             which would accept every device token of the fleet as its own: choose another \
             device_audience, or remove that client (`tessera-hub client remove {audience}`) \
             and register it under another id",
            file.display(),
            client.kind.as_str()
        );
    }
    Ok(())
}

fn check_role(policy: &Policy, role: &str, kind: ClientKind) -> Result<()> {
    match policy.role(role) {
        None => bail!("role `{role}` is not defined in the policy"),
        Some(r) if r.kind() != kind => {
            bail!(
                "role `{role}` is {} role, not {} role",
                a_kind(r.kind()),
                a_kind(kind)
            )
        }
        Some(_) => Ok(()),
    }
}

/// `n` and the noun, singular for one: "1 group", "3 groups".
fn counted(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// A client kind with its article: "a device", "an app", "an operator".
fn a_kind(kind: ClientKind) -> &'static str {
    match kind {
        ClientKind::Device => "a device",
        ClientKind::App => "an app",
        ClientKind::Operator => "an operator",
    }
}

fn new_enrollment_code() -> Result<String> {
    // 20 base32 characters: 100 bits, enough that the code cannot be guessed from the
    // HMAC proof that crosses the broker.
    const ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let chars: Vec<u8> = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)])
        .collect();
    let s = String::from_utf8(chars).unwrap_or_default();
    Ok(format!(
        "{}-{}-{}-{}",
        &s[0..5],
        &s[5..10],
        &s[10..15],
        &s[15..20]
    ))
}

async fn register(
    store: &Sqlite,
    id: &str,
    kind: ClientKind,
    role: &str,
    groups: Vec<String>,
    public_key: Option<Vec<u8>>,
    code: Option<&str>,
) -> Result<()> {
    validate_id(id)
        .map_err(|_| anyhow::anyhow!("`{id}` is not a valid id (A-Z a-z 0-9 . _ -, 1..=64)"))?;
    store
        .add_client(ClientRecord {
            id: id.to_string(),
            kind,
            public_key,
            role: role.to_string(),
            groups,
            enrollment_code_key: code.map(EnrollmentCode::derive_key),
            enrolled_at: None,
            revoked_at: None,
            created_at: SystemClock.now(),
        })
        .await?;
    Ok(())
}

async fn add_keyed(
    config: &HubConfig,
    id: &str,
    kind: ClientKind,
    role: &str,
    key: &Path,
) -> Result<()> {
    let store = open_store(config)?;
    let policy = Policy::load(&config.policy)?;
    check_id_is_free(config, &policy, id)?;
    check_role(&policy, role, kind)?;
    let key = keyfile::read_public(key)?;
    register(
        &store,
        id,
        kind,
        role,
        Vec::new(),
        Some(key.to_sec1().to_vec()),
        None,
    )
    .await?;
    println!(
        "registered {} {id} (key {})",
        kind.as_str(),
        hex::encode(key.kid())
    );
    Ok(())
}

async fn client_cmd(config: &HubConfig, cmd: ClientCmd) -> Result<()> {
    let store = open_store(config)?;
    match cmd {
        ClientCmd::List { kind } => {
            let kind = kind
                .map(|k| ClientKind::parse(&k).with_context(|| format!("unknown kind `{k}`")))
                .transpose()?;
            for c in store.clients(kind).await? {
                let state = match (c.revoked_at, c.enrolled_at, &c.public_key) {
                    (Some(_), _, _) => "revoked",
                    (None, Some(_), _) => "enrolled",
                    (None, None, Some(_)) => "key registered",
                    (None, None, None) => "awaiting enrollment",
                };
                println!(
                    "{:<24} {:<8} role={:<14} groups={:<20} {state}",
                    c.id,
                    c.kind.as_str(),
                    c.role,
                    c.groups.join(",")
                );
            }
        }
        ClientCmd::Remove { id } => {
            if !store.remove_client(&id).await? {
                bail!("no client `{id}`");
            }
            println!("removed {id}");
        }
        ClientCmd::SetRole { id, role } => {
            let policy = Policy::load(&config.policy)?;
            let client = store
                .client(&id)
                .await?
                .with_context(|| format!("no client `{id}`"))?;
            check_role(&policy, &role, client.kind)?;
            match policy_change::change_role(&store, &policy, &client, &role, SystemClock.now())
                .await?
            {
                Some(out) => println!(
                    "role of {id} is now {role}; {} tokens it no longer allows are revoked \
                     ({} entries, {} devices told to refresh; published by the running hub)",
                    out.revoked,
                    out.entry_count(),
                    out.controls.len()
                ),
                None => println!("role of {id} is now {role}; no live token had to be revoked"),
            }
        }
    }
    Ok(())
}

async fn connect_as(config: &HubConfig, who: &Identity) -> Result<(Client, Duration)> {
    let signer = keyfile::read_private(&who.key)?;
    let anchor = keyfile::read_public(&who.trust_anchor)?;
    let mut mqtt: MqttConfig = config.mqtt.clone();
    mqtt.client_id = who.id.clone();
    // The config's credentials are the hub's own; a client brings its own, if any.
    mqtt.username = who.mqtt_username.clone();
    mqtt.password = who.mqtt_password.clone();
    if let Some(h) = &who.mqtt_host {
        mqtt.host = h.clone();
    }
    if let Some(p) = who.mqtt_port {
        mqtt.port = p;
    }
    let timeout = Duration::from_secs(who.timeout_s);
    let client = Client::connect(&mqtt, &who.id, signer, anchor, timeout)
        .await
        .with_context(|| format!("cannot reach the broker at {}:{}", mqtt.host, mqtt.port))?;
    Ok((client, timeout))
}

fn print_trust_anchor(key: &PublicKey) {
    let mut cose = [0u8; COSE_KEY_LEN];
    let n = key.to_cose_key(&mut cose).unwrap_or(0);
    println!("trust anchor (the hub's token-signing key)");
    println!("  kid:          {}", hex::encode(key.kid()));
    println!("  COSE_Key hex: {}", hex::encode(&cose[..n]));
    print!("{}", keyfile::public_to_pem(key));
}

/// The files `init` creates in a hub directory, besides the database.
const HUB_FILES: [&str; 4] = [
    config::DEFAULT_FILE,
    "policy.toml",
    "hub.kek",
    "trust-anchor.pem",
];

async fn init(dir: &Path, hub_id: &str) -> Result<()> {
    validate_id(hub_id).map_err(|_| anyhow::anyhow!("`{hub_id}` is not a valid hub id"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A hub serving this directory holds the lock: init would fail on its files anyway,
    // but this says why.
    let _lock = HubLock::acquire(&dir.join(config::DEFAULT_LOCK_FILE), "init")?;
    refuse_existing_hub(dir)?;
    let config_path = dir.join(config::DEFAULT_FILE);
    let config_text = config::DEFAULT_TOML.replacen(
        "hub_id = \"tessera-hub\"",
        &format!("hub_id = \"{hub_id}\""),
        1,
    );
    // 0600: an operator adds the hub's broker password to it.
    keyfile::write_new(&config_path, config_text.as_bytes(), 0o600)?;
    keyfile::write_new(
        &dir.join("policy.toml"),
        Policy::DEFAULT_TOML.as_bytes(),
        0o644,
    )?;
    let kek = Kek::generate()?;
    keyfile::write_new(&dir.join("hub.kek"), kek.as_bytes(), 0o600)?;
    let config = HubConfig::load(&config_path)?;
    let store = Sqlite::create(&config.database)?;
    let now = SystemClock.now();
    let anchor = keys::create_key(&store, &kek, &config.hub_id, now, now, Some(now)).await?;
    keyfile::write_new(
        &dir.join("trust-anchor.pem"),
        keyfile::public_to_pem(&anchor).as_bytes(),
        0o644,
    )?;
    println!(
        "created {} (config, policy.toml, hub.kek, database, trust-anchor.pem)",
        dir.display()
    );
    print_trust_anchor(&anchor);
    Ok(())
}

/// Refuses to `init` a directory that holds a hub, or part of one, saying what to do:
/// `init` never overwrites a hub's files, and a hub whose database was lost needs that
/// database back (its registry, revocations and the signing keys devices trust), not a new
/// one.
fn refuse_existing_hub(dir: &Path) -> Result<()> {
    let config_path = dir.join(config::DEFAULT_FILE);
    let database = match HubConfig::load(&config_path) {
        Ok(c) => c.database,
        Err(_) => dir.join(config::DEFAULT_DATABASE),
    };
    let existing: Vec<String> = HUB_FILES
        .iter()
        .map(|f| dir.join(f))
        .chain(std::iter::once(database.clone()))
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    if config_path.exists() && database.symlink_metadata().is_err() {
        bail!(
            "{} holds a hub whose database {} is missing: restore the database from a backup \
             and start the hub again (its signing keys are sealed under the key-encryption \
             secret that is still configured). `init` does not make a new database for an \
             existing hub: it would hold new signing keys no device trusts and no registered \
             client. To start a new hub instead, run `tessera-hub init --dir` with a new \
             directory",
            dir.display(),
            database.display()
        );
    }
    bail!(
        "{} already holds a hub ({}): `init` never overwrites one; to start a new hub, give \
         `--dir` a new directory",
        dir.display(),
        existing.join(", ")
    );
}

/// The single-instance lock of a hub: an exclusive advisory lock (`flock`) on a file
/// beside the database ([`HubConfig::lock_file`]), held by `serve` for its whole life and
/// by `init` while it creates the hub (the lock of the configuration it writes). The kernel releases it when the process exits, however it exits, so a crashed
/// hub never leaves a stale lock. Commands that change the database while a hub serves
/// (`keys rotate`, `client add`…) do not take it: every change is its own SQLite
/// transaction, which the serving hub sees.
struct HubLock {
    _file: std::fs::File,
}

impl HubLock {
    fn acquire(path: &Path, what: &str) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        let locked = file.try_lock();
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // Best effort: the pid is only for the message.
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                bail!(
                    "cannot {what}: another tessera-hub{holder} holds the lock {} of this hub \
                     (one `serve` per hub directory): stop it first",
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // Who holds it, for the message above; the lock itself is what counts.
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

async fn serve(mut config: HubConfig, host: Option<String>, port: Option<u16>) -> Result<()> {
    if let Some(h) = host {
        config.mqtt.host = h;
    }
    if let Some(p) = port {
        config.mqtt.port = p;
    }
    // A revoke request naming a list of devices is the largest message the hub takes.
    config.mqtt.max_incoming_packet_bytes =
        u32::try_from(config.requests.max_revoke_request_bytes + 4096).unwrap_or(u32::MAX);
    // Held until the process exits (a kill -9 too: the kernel drops the lock with it).
    let _lock = HubLock::acquire(&config.lock_file(), "serve")?;
    let store = open_store(&config)?;
    let policy = SharedPolicy::load(&config.policy)?;
    check_audience_is_free(&store, &policy.current(), &config.policy).await?;
    let kek = Arc::new(Kek::load(config.kek_file.as_deref())?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let keys = KeyRing::load(&store, &kek, &config.hub_id, clock.now()).await?;
    let hub = Arc::new(Hub {
        store,
        policy: policy.clone(),
        keys: tokio::sync::RwLock::new(keys),
        clock,
        config: config.pipeline(),
        rng: Arc::new(tessera_hub::rng::OsRng),
    });
    let serve_config = ServeConfig {
        mqtt: config.mqtt.clone(),
        shared_subscription: config.serve.shared_subscription,
        concurrency: config.serve.concurrency,
        queue: config.serve.queue,
        admission: config.admission(),
        drain: Duration::from_secs(config.serve.drain_s),
        heartbeat_s: config.serve.heartbeat_s,
        audit_retention_s: config.serve.audit_retention_days * 86_400,
        kek: Some(kek),
        rotation_announce_s: config.keys.rotation_announce_s,
    };
    // SIGHUP reloads the policy, reviewed against the store first (policy_change::reload);
    // installed before serving, so an early SIGHUP reloads rather than kills.
    tokio::spawn(
        server::reload_policy_on_hangup(hub.clone(), config.policy.clone(), config.reload_limits())
            .context("cannot handle SIGHUP")?,
    );
    // Installed before serving, so a SIGTERM from the first moment drains rather than kills.
    let shutdown = shutdown_signal()?;
    // Not logged here as well: `main` prints the error, to the same stderr as the log.
    server::run(hub, serve_config, shutdown).await?;
    Ok(())
}

/// Completes at the first SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}
