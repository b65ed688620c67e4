//! Several `tessera-hub serve` replicas on one PostgreSQL database behind one test
//! [`Broker`], for the replica end-to-end tests (issue 12).
//!
//! - [`TestDatabase`]: a database of the test's own on the PostgreSQL server at
//!   `TESSERA_TEST_POSTGRES` (default [`DEFAULT_POSTGRES`]: trust auth, plain on loopback),
//!   dropped when the guard drops, also when the test fails; [`TestDatabase::connect`] to
//!   read what the replicas wrote.
//! - [`HubReplicas`]: a hub directory made by `tessera-hub init --database <that URL>`, a
//!   broker, and one config per replica (its own `mqtt.client_id`, `[serve]
//!   shared_subscription = true`, its own `[http] listen` port for `/metrics` and
//!   `/readyz`); start, `kill -9` and restart each replica, read its metrics and which
//!   replica holds the housekeeping lease.
//!
//! Everything binds and connects to 127.0.0.1 only; every wait is bounded and fails with
//! the replicas' logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;
use tessera_hub::client::Client;
use tessera_hub::keyfile;
use tessera_hub::mqtt::MqttConfig;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer as _};

use crate::broker::Broker;
use crate::http::{http_get, metric};
use crate::hub::{
    ANSWER_TIMEOUT, READY_CLIENT, STARTUP_TIMEOUT, await_serving, generate_signer, random_bytes,
    replace_once, run_checked,
};
use crate::port::free_port;
use crate::process::{ChildGuard, cargo_bin, read_lossy, tail};

/// The PostgreSQL server the tests use unless `TESSERA_TEST_POSTGRES` names another.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The `[http]` section of the default config, commented out.
const HTTP_OFF: &str = "# [http]\n# listen = \"127.0.0.1:9464\"";

/// The server's URL (any database on it: each test makes its own).
pub fn postgres_server_url() -> String {
    std::env::var("TESSERA_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned())
}

/// `url` naming database `name` instead of its own.
fn with_database(url: &str, name: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("not a postgres:// URL: {url}"))?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    Ok(format!("{scheme}://{authority}/{name}{query}"))
}

/// A connection to `url`; its connection task runs on the current runtime.
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "PostgreSQL is not reachable at {url}: these tests need a PostgreSQL server \
                 (CI's .ci/run starts one); start it, or point TESSERA_TEST_POSTGRES at one \
                 (trust auth, plain on loopback)"
            )
        })?;
    tokio::spawn(connection);
    Ok(client)
}

/// A database of this test's own, `tessera_replicas_<pid>_<random>`, dropped (with the
/// connections still open to it) when this drops, also when the test panics.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    /// The server's URL it was made on (and is dropped through).
    server: String,
}

impl TestDatabase {
    /// Creates the database on the server at `TESSERA_TEST_POSTGRES`
    /// ([`postgres_server_url`]).
    pub async fn create() -> Result<Self> {
        Self::create_on(&postgres_server_url()).await
    }

    /// Creates the database on the server at `server` (a `postgres://` URL naming any
    /// database on it).
    pub async fn create_on(server: &str) -> Result<Self> {
        let name = format!(
            "tessera_replicas_{}_{}",
            std::process::id(),
            hex::encode(random_bytes::<6>())
        );
        connect(server)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating the test database {name}"))?;
        let url = with_database(server, &name)?;
        Ok(Self {
            name,
            url,
            server: server.to_owned(),
        })
    }

    /// Its URL, for `tessera-hub init --database`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to it, to read what the hub wrote.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server.clone();
        // Its own thread and runtime: this may run inside the test's runtime, or while it
        // unwinds. FORCE ends the connections replicas or the test still hold.
        let dropped = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                connect(&server)
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "could not drop the test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

/// The sum of every series of metric `name` (all label values).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let base = series.split_once('{').map_or(series, |(b, _)| b);
            (base == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One replica: its config, log and monitoring port, and its process while it runs.
#[derive(Debug)]
pub struct Replica {
    name: String,
    config: PathBuf,
    log: PathBuf,
    http_port: u16,
    process: Option<ChildGuard>,
}

impl Replica {
    /// Its name (`a`, `b`…); its MQTT client id is `tessera-hub-<name>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Its monitoring port (`/metrics`, `/readyz`).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Whether its process runs.
    pub fn is_running(&mut self) -> Result<bool> {
        match self.process.as_mut() {
            None => Ok(false),
            Some(child) => Ok(child.try_wait()?.is_none()),
        }
    }

    /// The pid of its process while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::id)
    }

    /// Its log so far (every run of it).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

/// Options for [`HubReplicas`]; [`HubReplicasBuilder::start`] starts them.
#[derive(Debug)]
pub struct HubReplicasBuilder {
    hub_id: String,
    replicas: usize,
    config: Vec<(String, String)>,
    bin: Option<PathBuf>,
    postgres: Option<String>,
}

impl HubReplicasBuilder {
    /// The hub's id (default `hub-replicas`).
    pub fn hub_id(mut self, id: &str) -> Self {
        self.hub_id = id.to_owned();
        self
    }

    /// How many replicas (default 3).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// The `tessera-hub` binary to run (default: the debug build `cargo_bin` finds, which
    /// works from test executables only).
    pub fn hub_bin(mut self, bin: &Path) -> Self {
        self.bin = Some(bin.to_owned());
        self
    }

    /// The PostgreSQL server to make the database on (default: [`postgres_server_url`]).
    pub fn postgres(mut self, server: &str) -> Self {
        self.postgres = Some(server.to_owned());
        self
    }

    /// Replaces text of the default config (`from` must occur exactly once) for every
    /// replica.
    pub fn config(mut self, from: &str, to: &str) -> Self {
        self.config.push((from.to_owned(), to.to_owned()));
        self
    }

    /// Creates the database, starts the broker, runs `init` against both, writes each
    /// replica's config, starts every replica and waits until each is ready and the hub
    /// answers requests.
    pub async fn start(self) -> Result<HubReplicas> {
        let database = match &self.postgres {
            Some(server) => TestDatabase::create_on(server).await?,
            None => TestDatabase::create().await?,
        };
        let bin = match self.bin {
            Some(bin) => bin,
            None => cargo_bin("tessera-hub")?,
        };
        let broker = Broker::builder().max_queued_messages(10_000).start()?;
        let temp = tempfile::Builder::new()
            .prefix("tessera-replicas-e2e-")
            .tempdir()
            .context("creating the hub's temp dir")?;
        let root = temp.path().join("hub");
        run_checked(
            Command::new(&bin)
                .arg("init")
                .arg("--dir")
                .arg(&root)
                .args(["--hub-id", &self.hub_id, "--database", database.url()]),
        )?;
        let trust_anchor = keyfile::read_public(&root.join("trust-anchor.pem"))
            .context("reading the trust anchor init wrote")?;
        std::fs::create_dir_all(root.join("keys")).context("creating the keys dir")?;
        let base = root.join("tessera-hub.toml");
        let text = std::fs::read_to_string(&base).context("reading the config init wrote")?;
        ensure!(
            text.contains(database.name()),
            "init did not configure the database {}:\n{text}",
            database.name()
        );
        replace_once(&base, "port = 1883", &format!("port = {}", broker.port()))?;
        replace_once(
            &base,
            "shared_subscription = false",
            "shared_subscription = true",
        )?;
        for (from, to) in &self.config {
            replace_once(&base, from, to)?;
        }
        let text = std::fs::read_to_string(&base).context("reading the config")?;
        let mut replicas = Vec::with_capacity(self.replicas);
        for i in 0..self.replicas {
            let name = char::from(b'a' + u8::try_from(i).context("too many replicas")?);
            let name = name.to_string();
            let http_port = free_port()?;
            ensure!(
                text.matches("client_id = \"tessera-hub\"").count() == 1
                    && text.matches(HTTP_OFF).count() == 1,
                "the config does not look like init's:\n{text}"
            );
            let replica_text = text
                .replacen(
                    "client_id = \"tessera-hub\"",
                    &format!("client_id = \"tessera-hub-{name}\""),
                    1,
                )
                .replacen(
                    HTTP_OFF,
                    &format!("[http]\nlisten = \"127.0.0.1:{http_port}\""),
                    1,
                );
            let config = root.join(format!("replica-{name}.toml"));
            keyfile::write_new(&config, replica_text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", config.display()))?;
            replicas.push(Replica {
                log: root.join(format!("replica-{name}.log")),
                name,
                config,
                http_port,
                process: None,
            });
        }
        let mut hub = HubReplicas {
            replicas,
            broker,
            database,
            root,
            trust_anchor,
            bin,
            _temp: temp,
        };
        hub.add_operator(READY_CLIENT, "ops")?;
        for i in 0..hub.replicas.len() {
            hub.spawn(i)?;
        }
        for i in 0..hub.replicas.len() {
            hub.wait_ready(i).await?;
        }
        hub.wait_until_serving().await?;
        Ok(hub)
    }
}

/// A hub's replicas, its broker and its database. Dropping it kills the replicas, then the
/// broker, then drops the database.
#[derive(Debug)]
pub struct HubReplicas {
    // Declared first so the replicas die before the broker and the database.
    replicas: Vec<Replica>,
    broker: Broker,
    database: TestDatabase,
    root: PathBuf,
    trust_anchor: PublicKey,
    /// The `tessera-hub` binary the replicas and the CLI run.
    bin: PathBuf,
    _temp: TempDir,
}

impl HubReplicas {
    /// Options for replicas.
    pub fn builder() -> HubReplicasBuilder {
        HubReplicasBuilder {
            hub_id: "hub-replicas".to_owned(),
            replicas: 3,
            config: Vec::new(),
            bin: None,
            postgres: None,
        }
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The database.
    pub fn database(&self) -> &TestDatabase {
        &self.database
    }

    /// The hub directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The trust anchor init printed.
    pub fn trust_anchor(&self) -> PublicKey {
        self.trust_anchor
    }

    /// The replicas.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Replica `i`.
    pub fn replica(&self, i: usize) -> Result<&Replica> {
        self.replicas
            .get(i)
            .with_context(|| format!("no replica {i}"))
    }

    fn replica_mut(&mut self, i: usize) -> Result<&mut Replica> {
        self.replicas
            .get_mut(i)
            .with_context(|| format!("no replica {i}"))
    }

    /// Runs a CLI command against the hub (the first replica's config); fails with its
    /// output unless it succeeds. Returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.replica(0)?.config)
                .args(args),
        )
    }

    /// Registers a client of `kind` (`device`, `app`, `operator`) with a key made in the
    /// test process (kept in `keys/<id>.pem`, [`HubReplicas::key`]); returns the key.
    fn add(&self, kind: &str, id: &str, role: &str, groups: &[&str]) -> Result<P256Signer> {
        let signer = generate_signer();
        keyfile::write_private(&self.key_path(id), &signer)
            .with_context(|| format!("writing the key of {id}"))?;
        let path = self.root.join("keys").join(format!("{id}.pem.pub"));
        std::fs::write(&path, keyfile::public_to_pem(&signer.public_key()))
            .with_context(|| format!("writing {}", path.display()))?;
        let path = path.to_string_lossy().into_owned();
        let mut args = vec![kind, "add", id, "--role", role];
        for g in groups {
            args.extend(["--group", g]);
        }
        args.extend(["--key", &path]);
        self.run(&args)?;
        Ok(signer)
    }

    fn key_path(&self, id: &str) -> PathBuf {
        self.root.join("keys").join(format!("{id}.pem"))
    }

    /// The private key of client `id`, registered with [`HubReplicas::add_device`],
    /// [`HubReplicas::add_app`] or [`HubReplicas::add_operator`].
    pub fn key(&self, id: &str) -> Result<P256Signer> {
        keyfile::read_private(&self.key_path(id))
            .with_context(|| format!("reading the key of {id}"))
    }

    /// `device add <id> --role <role> --group ... --key <new key>`.
    pub fn add_device(&self, id: &str, role: &str, groups: &[&str]) -> Result<P256Signer> {
        self.add("device", id, role, groups)
    }

    /// `app add <id> --role <role> --key <new key>`.
    pub fn add_app(&self, id: &str, role: &str) -> Result<P256Signer> {
        self.add("app", id, role, &[])
    }

    /// `operator add <id> --role <role> --key <new key>`.
    pub fn add_operator(&self, id: &str, role: &str) -> Result<P256Signer> {
        self.add("operator", id, role, &[])
    }

    /// The MQTT settings of a client `id` (plain TCP to the broker).
    pub fn mqtt(&self, id: &str) -> MqttConfig {
        MqttConfig::plain(self.broker.host(), self.broker.port(), id)
    }

    /// Connects a [`Client`] as `id` signing with `signer`, trusting the anchor.
    pub async fn client(&self, id: &str, signer: P256Signer) -> Result<Client> {
        Client::connect(
            &self.mqtt(id),
            id,
            signer,
            self.trust_anchor,
            ANSWER_TIMEOUT,
        )
        .await
        .with_context(|| format!("connecting client {id}"))
    }

    /// Starts replica `i` (which must not run); see [`HubReplicas::wait_ready`].
    fn spawn(&mut self, i: usize) -> Result<()> {
        let bin = self.bin.clone();
        let replica = self.replica_mut(i)?;
        ensure!(
            replica.process.is_none(),
            "replica {} already runs",
            replica.name
        );
        let mut command = Command::new(bin);
        command
            .arg("--config")
            .arg(&replica.config)
            .arg("serve")
            .env("RUST_LOG", "info");
        replica.process = Some(ChildGuard::spawn_logged(&mut command, &replica.log)?);
        Ok(())
    }

    /// Kills replica `i` with SIGKILL (a crash) and reaps it.
    pub fn kill_9(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.replica_mut(i)?.process.take() {
            child.kill_9()?;
        }
        Ok(())
    }

    /// Starts replica `i` again (killing it first if it runs) and waits until it is ready.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill_9(i)?;
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// Whether replica `i` runs.
    pub fn is_running(&mut self, i: usize) -> Result<bool> {
        self.replica_mut(i)?.is_running()
    }

    /// `GET /metrics` of replica `i`.
    pub async fn metrics(&self, i: usize) -> Result<String> {
        let replica = self.replica(i)?;
        let (status, body) = http_get(replica.http_port, "/metrics").await?;
        ensure!(
            status == 200,
            "/metrics of replica {}: {status}",
            replica.name
        );
        Ok(body)
    }

    /// Waits until replica `i` answers `/readyz` with 200 (connected to the broker, the
    /// lease tried, heartbeats published if it holds it), for at most [`STARTUP_TIMEOUT`];
    /// fails at once, with its log, if it exits.
    pub async fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let port = self.replica(i)?.http_port;
        loop {
            let replica = self.replica_mut(i)?;
            if let Some(status) = replica
                .process
                .as_mut()
                .map(ChildGuard::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "replica {} exited ({status}); its log:\n{}",
                    replica.name,
                    tail(&replica.log(), 40)
                );
            }
            if let Ok((200, _)) = http_get(port, "/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let replica = self.replica(i)?;
                let readyz = http_get(port, "/readyz").await;
                bail!(
                    "replica {} was not ready within {STARTUP_TIMEOUT:?} (/readyz: {readyz:?}); \
                     its log:\n{}",
                    replica.name,
                    tail(&replica.log(), 40)
                );
            }
            tokio::time::sleep(crate::wait::POLL_EVERY).await;
        }
    }

    /// Polls with [`READINESS_PROBE`] as [`READY_CLIENT`] until some replica answers, for
    /// at most [`STARTUP_TIMEOUT`].
    pub async fn wait_until_serving(&self) -> Result<()> {
        let signer = self.key(READY_CLIENT)?;
        let mut client = self.client(READY_CLIENT, signer).await?;
        let result = await_serving(&mut client, STARTUP_TIMEOUT, || Ok(())).await;
        client.close().await;
        result.with_context(|| {
            format!(
                "no replica answered within {STARTUP_TIMEOUT:?}; their logs:\n{}",
                self.logs(20)
            )
        })
    }

    /// The replicas whose `tessera_hub_lease_held` is 1, among those running.
    pub async fn lease_holders(&mut self) -> Result<Vec<usize>> {
        let mut holders = Vec::new();
        for i in 0..self.replicas.len() {
            if !self.is_running(i)? {
                continue;
            }
            let text = self.metrics(i).await?;
            if metric(&text, "tessera_hub_lease_held") == Some(1.0) {
                holders.push(i);
            }
        }
        Ok(holders)
    }

    /// The last `lines` lines of every replica's log, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- replica {} ---\n{}", r.name, tail(&r.log(), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
