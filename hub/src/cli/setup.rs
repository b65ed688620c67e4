//! Creating and running a hub: `init`, `serve`, and the single-instance lock they take.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::{self, HubConfig};
use tessera_hub::keyfile;
use tessera_hub::keys::{self, Kek, KeyRing};
use tessera_hub::pipeline::Hub;
use tessera_hub::policy::Policy;
use tessera_hub::policy_change;
use tessera_hub::server::{self, ServeConfig};
use tessera_hub::store::{AnyStore, postgres_url, shown_database};
use tessera_shared::message::validate_id;

use super::keys::print_trust_anchor;

/// The files `init` creates in a hub directory, besides the database.
const HUB_FILES: [&str; 4] = [
    config::DEFAULT_FILE,
    "policy.toml",
    "hub.kek",
    "trust-anchor.pem",
];

/// `init`: the hub's files in `dir` and its database, an SQLite file, or a `postgres://`
/// URL whose (existing, empty) database gets the schema and the first signing key. `None`:
/// the default file in `dir`.
pub(super) async fn init_with_database(
    dir: &Path,
    hub_id: &str,
    database: Option<&str>,
) -> Result<()> {
    validate_id(hub_id).map_err(|_| anyhow::anyhow!("`{hub_id}` is not a valid hub id"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A hub serving this directory holds the lock: init would fail on its files anyway,
    // but this says why.
    let _lock = HubLock::acquire(&dir.join(config::DEFAULT_LOCK_FILE), "init")?;
    refuse_existing_hub(dir)?;
    let config_path = dir.join(config::DEFAULT_FILE);
    let mut config_text = config::DEFAULT_TOML.replacen(
        "hub_id = \"tessera-hub\"",
        &format!("hub_id = \"{hub_id}\""),
        1,
    );
    if let Some(database) = database {
        // A TOML basic string: the URL's quotes and backslashes escaped.
        let quoted = toml::Value::String(database.to_owned()).to_string();
        config_text = config_text.replacen(
            &format!("database = \"{}\"", config::DEFAULT_DATABASE),
            &format!("database = {quoted}"),
            1,
        );
    }
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
    // The URL as given: a relative path is the configuration's, a URL is not a path.
    let database_path = match database {
        Some(url) if postgres_url(Path::new(url)).is_some() => Path::new(url).to_path_buf(),
        _ => config.database.clone(),
    };
    let store = AnyStore::create(&database_path).await.with_context(|| {
        format!(
            "cannot create the hub's database in {}",
            shown_database(&database_path)
        )
    })?;
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
    // A PostgreSQL database is not a file here: `AnyStore::create` refuses one that holds a
    // hub already.
    let on_server = postgres_url(&database).is_some();
    let existing: Vec<String> = HUB_FILES
        .iter()
        .map(|f| dir.join(f))
        .chain((!on_server).then(|| database.clone()))
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    if !on_server && config_path.exists() && database.symlink_metadata().is_err() {
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
pub(super) struct HubLock {
    _file: std::fs::File,
}

impl HubLock {
    /// Takes the lock at `path` for `what` (`serve`, `init`…), writing the pid in it and
    /// `detail` after it (what other hubs read of this one: [`other_serving_hubs`]).
    pub(super) fn acquire(path: &Path, what: &str) -> Result<Self> {
        Self::acquire_noting(path, what, "")
    }

    pub(super) fn acquire_noting(path: &Path, what: &str, detail: &str) -> Result<Self> {
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
                let holder = match holder.split_whitespace().next() {
                    Some(pid) => format!(" (pid {pid})"),
                    None => String::new(),
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
        let note = format!("{} {detail}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

pub(super) async fn serve(
    mut config: HubConfig,
    host: Option<String>,
    port: Option<u16>,
) -> Result<()> {
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
    // Only for a database file: replicas on PostgreSQL run on other machines, where a lock
    // file beside the database cannot be seen; they must each split the requests with a
    // shared subscription (docs/OPERATING.md).
    let on_server = postgres_url(&config.database).is_some();
    let _lock = if on_server {
        None
    } else {
        let lock = HubLock::acquire_noting(
            &config.lock_file(),
            "serve",
            &format!("{SHARED_NOTE}{}", config.serve.shared_subscription),
        )?;
        refuse_replicas_that_would_answer_twice(&config)?;
        Some(lock)
    };
    let store = AnyStore::open_existing(&config.database)?;
    let shown = store.shown(&config.database);
    store.check_writable().await.map_err(|e| match e {
        e @ tessera_hub::store::StoreError::NoDatabase { .. } => anyhow::Error::new(e),
        e if on_server => anyhow::anyhow!(
            "the database {shown} cannot be used ({e}): `serve` must write it (is the server \
             up, and may this user write there?)"
        ),
        e => anyhow::anyhow!(
            "the database {shown} cannot be written ({e}): `serve` must write it (a read-only \
             file or file system, its permissions, or a full disk?)"
        ),
    })?;
    // Reviewed as a SIGHUP reload would review it: it may have changed while the hub was
    // stopped.
    let (policy, _) = policy_change::load_at_start(
        &store,
        &config.policy,
        &config.reload_limits(),
        SystemClock.now_ms(),
    )
    .await
    .map_err(|e| match e {
        e @ policy_change::ReloadError::Refused { .. } => anyhow::Error::new(e).context(format!(
            "not serving with this policy: fix it, or apply it anyway with `tessera-hub policy \
             force {}` and start again",
            config.policy.display()
        )),
        e => e.into(),
    })?;
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
        metrics: Arc::new(tessera_hub::metrics::Metrics::new()),
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
        http: config.http.as_ref().map(|h| h.listen),
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
    let database = shown;
    let dashboard = config.http.as_ref().and_then(|h| h.dashboard.clone());
    server::run_with_dashboard(hub, serve_config, dashboard, shutdown)
        .await
        .map_err(|e| match e {
            e @ server::ServeError::StorageFailed { .. } => {
                anyhow::Error::new(e).context(format!("database {database}"))
            }
            e => e.into(),
        })?;
    Ok(())
}

/// What a serving hub writes in its lock after its pid: whether it subscribes to requests
/// with a shared subscription.
const SHARED_NOTE: &str = "shared_subscription=";

/// The other hubs serving the same database now: the locks beside it
/// (`<database>.<client id>.lock`) another process holds, with what their holders wrote.
pub(super) fn other_serving_hubs(config: &HubConfig) -> Vec<(std::path::PathBuf, String)> {
    let own = config.lock_file();
    let Some(name) = config
        .database
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Vec::new();
    };
    let dir = match config.database.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path == own
            || !file_name.starts_with(&format!("{name}."))
            || !file_name.ends_with(".lock")
        {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        // A shared lock is refused only while a hub holds the exclusive one.
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock_shared() {
            held.push((
                path.clone(),
                std::fs::read_to_string(&path).unwrap_or_default(),
            ));
        }
    }
    held
}

/// Refuses to serve a database another hub serves unless both split the requests with a
/// shared subscription: otherwise each request reaches both, one answers it, and the
/// other answers `replay` (one client in two would be told its request was refused).
fn refuse_replicas_that_would_answer_twice(config: &HubConfig) -> Result<()> {
    let others = other_serving_hubs(config);
    let unshared: Vec<String> = others
        .iter()
        .filter(|(_, note)| {
            !config.serve.shared_subscription || note.contains(&format!("{SHARED_NOTE}false"))
        })
        .map(|(path, _)| path.display().to_string())
        .collect();
    if unshared.is_empty() {
        return Ok(());
    }
    bail!(
        "another tessera-hub serves this database ({}), and requests are not split between          them: every request would reach both, and one of them would answer it `replay`.          Replicas sharing a database must each set `serve.shared_subscription = true` (and          their own `mqtt.client_id`); otherwise stop the other hub first",
        unshared.join(", ")
    );
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
