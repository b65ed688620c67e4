//! A real `tessera-hub` for end-to-end tests: a hub directory made by `tessera-hub init`,
//! clients registered through its CLI with keys from `tessera-hub keygen`, `tessera-hub
//! serve` as a [`ChildGuard`] against a test [`Broker`], and clients to talk to it.
//!
//! - [`HubDir`]: the directory, its config and policy (edited as text, so a test sees the
//!   very files an operator would), and every CLI command run against it.
//! - [`TestHub`]: a hub directory, a broker (optionally with the ACL `tessera-hub
//!   broker-acl` prints and password authentication, optionally TLS or mutual TLS) and the
//!   serving hub; [`TestHub::kill_9`] and [`TestHub::restart`] for crash tests.
//! - [`RawClient`]: signs requests with full control over every field and publishes them
//!   through an [`MqttProbe`], for refusals that the well-behaved
//!   [`tessera_hub::client::Client`] never sends.
//! - [`SharedHub`]: one [`TestHub`] for all tests of a file that run at the same time.
//! - Revocation streams: [`RevocationPage`] (a verified page: delta, snapshot page or
//!   `fetch_revocations` answer), [`fetch_stream`], [`read_snapshot`] (the retained pages
//!   as a new subscriber reads them), [`expect_delta`] / [`expect_delta_where`], and
//!   [`RevokeCounts`] (what a revocation did, from the answer or the CLI's output).
//!
//! Every wait is bounded and fails with the hub's log.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;
use tessera_hub::client::{Answer, Client, ClientError};
use tessera_hub::keyfile;
use tessera_hub::mqtt::{MqttConfig, TlsConfig};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer as _};
use tessera_shared::message::{
    ErrorCode, NONCE_LEN, Operation, Request, RequestBody, ResponseBody, RevokeTarget,
    SignedResponse,
};
use tessera_shared::revocation::{Addressed, Entry, Page, Stream, TokenHash, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::{cose, topic};

use crate::broker::Broker;
use crate::pki::TestPki;
use crate::probe::{Message, MqttProbe, QoS};
use crate::process::{ChildGuard, cargo_bin, tail};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// The MQTT user name the hub connects with when the broker authenticates it.
pub const HUB_USER: &str = "tessera-hub";
const HUB_PASSWORD: &str = "hub-e2e-password";
/// The MQTT user name `broker-acl --watcher` lets read the event stream.
pub const WATCHER_USER: &str = "e2e-watcher";
const WATCHER_PASSWORD: &str = "watcher-e2e-password";
/// The operator [`TestHub`] registers to poll the hub until it serves.
pub const READY_CLIENT: &str = "e2e-ready";
/// How long a hub may take to start serving.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a test waits for one answer from the hub.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The request [`TestHub::wait_until_serving`] polls with: the first change of device
/// partition 0, which any client may fetch. The hub answers it with a page, or refuses it
/// as `denied` while that stream has no change: either shows it serves.
pub const READINESS_PROBE: RequestBody<'static> = RequestBody::FetchRevocations {
    stream: Stream::Devices(0),
    from: 1,
};

/// Asks [`READINESS_PROBE`] through `client` until a hub answers it (it has subscribed to
/// the request topics), for at most `timeout`; each try waits only briefly, since requests
/// sent before the hub subscribed are lost. `alive` is checked before each try (a hub that
/// exited fails at once).
pub async fn await_serving(
    client: &mut Client,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        match client
            .request(READINESS_PROBE, Duration::from_millis(300))
            .await
        {
            answer if answers_readiness_probe(&answer) => return Ok(()),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether `answer` to [`READINESS_PROBE`] shows the hub serving: a page, or the `denied`
/// refusal of a stream with no change yet.
pub fn answers_readiness_probe(answer: &Result<Answer, ClientError>) -> bool {
    matches!(
        answer,
        Ok(Answer::Revocations { .. })
            | Err(ClientError::Refused {
                code: ErrorCode::Denied,
                ..
            })
    )
}

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Fresh random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).unwrap_or_else(|e| panic!("OS random number generator: {e}"));
    bytes
}

/// A P-256 key made in the test process (for clients the hub must not know).
pub fn generate_signer() -> P256Signer {
    loop {
        // A random scalar is outside the group order with probability ~2^-32.
        if let Ok(signer) = P256Signer::from_scalar(&random_bytes::<32>()) {
            return signer;
        }
    }
}

/// A client's key pair as `tessera-hub keygen` wrote it.
#[derive(Debug, Clone)]
pub struct TestKey {
    private: PathBuf,
    public: PathBuf,
}

impl TestKey {
    /// The private key file (PKCS#8 PEM).
    pub fn private_path(&self) -> &Path {
        &self.private
    }

    /// The public key file (SPKI PEM).
    pub fn public_path(&self) -> &Path {
        &self.public
    }

    /// The private key, read back from its file.
    pub fn signer(&self) -> Result<P256Signer> {
        keyfile::read_private(&self.private).context("reading a test key")
    }

    /// The public key.
    pub fn public_key(&self) -> Result<PublicKey> {
        Ok(self.signer()?.public_key())
    }
}

/// A hub directory made by `tessera-hub init`, and the CLI run against its config.
#[derive(Debug)]
pub struct HubDir {
    // Keeps the directory alive; `root` is inside it.
    _temp: TempDir,
    root: PathBuf,
    hub_id: String,
    trust_anchor: PublicKey,
    trust_anchor_cose_hex: String,
    init_output: String,
}

impl HubDir {
    /// Runs `tessera-hub init --dir <temp>/hub --hub-id <hub_id>` and registers
    /// [`READY_CLIENT`] (an operator of the default policy's `ops` role).
    pub fn init(hub_id: &str) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("tessera-hub-e2e-")
            .tempdir()
            .context("creating the hub's temp dir")?;
        let root = temp.path().join("hub");
        let output = run_checked(
            Command::new(cargo_bin("tessera-hub")?)
                .arg("init")
                .arg("--dir")
                .arg(&root)
                .args(["--hub-id", hub_id]),
        )?;
        let trust_anchor = keyfile::read_public(&root.join("trust-anchor.pem"))
            .context("reading the trust anchor init wrote")?;
        let trust_anchor_cose_hex = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("COSE_Key hex:"))
            .map(|h| h.trim().to_owned())
            .with_context(|| format!("init printed no COSE_Key:\n{output}"))?;
        std::fs::create_dir_all(root.join("keys")).context("creating the keys dir")?;
        let dir = Self {
            _temp: temp,
            root,
            hub_id: hub_id.to_owned(),
            trust_anchor,
            trust_anchor_cose_hex,
            init_output: output,
        };
        dir.add_operator(READY_CLIENT, "ops")?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The hub's id (`iss` of its tokens).
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// `tessera-hub.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("tessera-hub.toml")
    }

    /// `policy.toml`.
    pub fn policy_path(&self) -> PathBuf {
        self.root.join("policy.toml")
    }

    /// `trust-anchor.pem`, as init wrote it.
    pub fn trust_anchor_path(&self) -> PathBuf {
        self.root.join("trust-anchor.pem")
    }

    /// The trust anchor (the hub's first signing key).
    pub fn trust_anchor(&self) -> PublicKey {
        self.trust_anchor
    }

    /// The trust anchor as the COSE_Key hex that init printed.
    pub fn trust_anchor_cose_hex(&self) -> &str {
        &self.trust_anchor_cose_hex
    }

    /// Everything init printed.
    pub fn init_output(&self) -> &str {
        &self.init_output
    }

    /// The hub's log (`hub.log`, appended to across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("hub.log")
    }

    /// Replaces the one occurrence of `from` in the config file with `to`.
    pub fn replace_in_config(&self, from: &str, to: &str) -> Result<()> {
        replace_once(&self.config_path(), from, to)
    }

    /// Appends `text` to the config file.
    pub fn append_to_config(&self, text: &str) -> Result<()> {
        append(&self.config_path(), text)
    }

    /// Replaces the one occurrence of `from` in the policy file with `to`.
    pub fn replace_in_policy(&self, from: &str, to: &str) -> Result<()> {
        replace_once(&self.policy_path(), from, to)
    }

    /// Appends `text` to the policy file.
    pub fn append_to_policy(&self, text: &str) -> Result<()> {
        append(&self.policy_path(), text)
    }

    /// `tessera-hub --config <this hub's config>`, ready for more arguments.
    pub fn command(&self) -> Result<Command> {
        let mut command = Command::new(cargo_bin("tessera-hub")?);
        command.arg("--config").arg(self.config_path());
        Ok(command)
    }

    /// Runs a CLI command against this hub; fails with its output unless it succeeds.
    /// Returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_checked(self.command()?.args(args))
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn run_failing(&self, args: &[&str]) -> Result<String> {
        let output = run_output(self.command()?.args(args))?;
        ensure!(
            !output.status.success(),
            "`tessera-hub {}` succeeded:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        );
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// `tessera-hub keygen keys/<name>.pem`.
    pub fn keygen(&self, name: &str) -> Result<TestKey> {
        let private = self.root.join("keys").join(format!("{name}.pem"));
        run_checked(
            Command::new(cargo_bin("tessera-hub")?)
                .arg("keygen")
                .arg(&private),
        )?;
        let public = PathBuf::from(format!("{}.pub", private.display()));
        ensure!(public.is_file(), "keygen wrote no {}", public.display());
        Ok(TestKey { private, public })
    }

    /// `device add <id> --role <role> --group ... --key <new key>`.
    pub fn add_device(&self, id: &str, role: &str, groups: &[&str]) -> Result<TestKey> {
        let key = self.keygen(id)?;
        let mut args = vec!["device", "add", id, "--role", role];
        for g in groups {
            args.extend(["--group", g]);
        }
        let public = key.public.to_string_lossy().into_owned();
        args.extend(["--key", &public]);
        self.run(&args)?;
        Ok(key)
    }

    /// `device add <id> --role <role> --group ... --enrollment-code`; returns the code.
    pub fn add_device_with_code(&self, id: &str, role: &str, groups: &[&str]) -> Result<String> {
        let mut args = vec!["device", "add", id, "--role", role];
        for g in groups {
            args.extend(["--group", g]);
        }
        args.push("--enrollment-code");
        let output = self.run(&args)?;
        output
            .lines()
            .find_map(|l| l.strip_prefix("one-time enrollment code:"))
            .map(|c| c.trim().to_owned())
            .with_context(|| format!("`device add --enrollment-code` printed no code:\n{output}"))
    }

    /// `app add <id> --role <role> --key keys/<id>.pem.pub`, the public key file written
    /// from `public` (for a key made in the test process, such as a fast flood signer).
    pub fn add_app_with_key(&self, id: &str, role: &str, public: &PublicKey) -> Result<()> {
        let path = self.root.join("keys").join(format!("{id}.pem.pub"));
        std::fs::write(&path, keyfile::public_to_pem(public))
            .with_context(|| format!("writing {}", path.display()))?;
        let path = path.to_string_lossy().into_owned();
        self.run(&["app", "add", id, "--role", role, "--key", &path])?;
        Ok(())
    }

    /// The hub's SQLite database (`tessera-hub.db`, as init configures it).
    pub fn database_path(&self) -> PathBuf {
        self.root.join("tessera-hub.db")
    }

    /// `app add <id> --role <role> --key <new key>`.
    pub fn add_app(&self, id: &str, role: &str) -> Result<TestKey> {
        self.add_keyed("app", id, role)
    }

    /// `operator add <id> --role <role> --key <new key>`.
    pub fn add_operator(&self, id: &str, role: &str) -> Result<TestKey> {
        self.add_keyed("operator", id, role)
    }

    fn add_keyed(&self, kind: &str, id: &str, role: &str) -> Result<TestKey> {
        let key = self.keygen(id)?;
        let public = key.public.to_string_lossy().into_owned();
        self.run(&[kind, "add", id, "--role", role, "--key", &public])?;
        Ok(key)
    }

    /// Arguments that make a client command (`revoke`, `access-token`, `watch`) act as
    /// `id` with `key`, trusting this hub's anchor.
    pub fn identity_args(&self, id: &str, key: &TestKey) -> Vec<String> {
        vec![
            "--as".into(),
            id.into(),
            "--key".into(),
            key.private.to_string_lossy().into_owned(),
            "--trust-anchor".into(),
            self.trust_anchor_path().to_string_lossy().into_owned(),
            "--timeout-s".into(),
            "5".into(),
        ]
    }
}

fn run_output(command: &mut Command) -> Result<Output> {
    let shown = format!("{command:?}");
    command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {shown}"))
}

/// Runs `command` (no stdin) and returns its stdout; fails with its status, stdout and
/// stderr if it did not succeed.
pub fn run_checked(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = run_output(command)?;
    ensure!(
        output.status.success(),
        "{shown} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Replaces `from`, which must occur exactly once in the file, with `to`.
pub fn replace_once(path: &Path, from: &str, to: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        text.matches(from).count() == 1,
        "{} must contain {from:?} exactly once",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1))
        .with_context(|| format!("writing {}", path.display()))
}

fn append(path: &Path, extra: &str) -> Result<()> {
    let mut text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.push('\n');
    text.push_str(extra);
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// How a [`TestHub`] reaches its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Plain,
    /// TLS: the hub and clients trust the test CA.
    Tls,
    /// Mutual TLS: the broker also requires a client certificate from the test CA.
    MutualTls,
}

/// Options for a [`TestHub`]; [`TestHubBuilder::start`] starts it.
#[derive(Debug)]
pub struct TestHubBuilder {
    hub_id: String,
    acl: bool,
    transport: Transport,
    config: Vec<(String, String)>,
    policy: Vec<(String, String)>,
    policy_extra: Vec<String>,
}

impl TestHubBuilder {
    /// The hub's id (default `hub-e2e`).
    pub fn hub_id(mut self, id: &str) -> Self {
        self.hub_id = id.to_owned();
        self
    }

    /// The broker enforces the ACL `tessera-hub broker-acl --watcher e2e-watcher` prints,
    /// with client ids bound to user names as docs/OPERATING.md configures Mosquitto
    /// (`use_username_as_clientid`); the hub logs in as [`HUB_USER`], the watcher as
    /// [`WATCHER_USER`], clients with their Tessera id as user name. Passwords are not
    /// checked (every client would need a password file entry before it is registered);
    /// tests/tests/broker_takeover.rs runs the password-checked setup.
    pub fn with_acl(mut self) -> Self {
        self.acl = true;
        self
    }

    /// TLS or mutual TLS to the broker (default plain TCP).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Replaces a line of the default config (`from` must occur exactly once).
    pub fn config(mut self, from: &str, to: &str) -> Self {
        self.config.push((from.to_owned(), to.to_owned()));
        self
    }

    /// Replaces text of the default policy (`from` must occur exactly once).
    pub fn policy(mut self, from: &str, to: &str) -> Self {
        self.policy.push((from.to_owned(), to.to_owned()));
        self
    }

    /// Appends TOML to the default policy.
    pub fn policy_append(mut self, text: &str) -> Self {
        self.policy_extra.push(text.to_owned());
        self
    }

    /// Makes the hub directory, starts the broker, configures the hub for it, starts
    /// `tessera-hub serve` and waits until it answers requests.
    pub async fn start(self) -> Result<TestHub> {
        let dir = HubDir::init(&self.hub_id)?;
        for (from, to) in &self.policy {
            dir.replace_in_policy(from, to)?;
        }
        for extra in &self.policy_extra {
            dir.append_to_policy(extra)?;
        }
        dir.run(&["policy", "check"])?;

        let pki = match self.transport {
            Transport::Plain => None,
            Transport::Tls | Transport::MutualTls => Some(TestPki::new()?),
        };
        // As OPERATING.md configures Mosquitto: room for 10,000 messages queued for a client
        // (the hub falls behind a flood; the default 1,000 drops others' requests).
        let mut broker = Broker::builder().max_queued_messages(10_000);
        if self.acl {
            let acl = dir.run(&[
                "broker-acl",
                "--hub-user",
                HUB_USER,
                "--watcher",
                WATCHER_USER,
            ])?;
            broker = broker.acl(acl).client_ids_as_user_names(true);
        }
        if let Some(pki) = &pki {
            broker = broker
                .tls(pki)
                .require_certificate(self.transport == Transport::MutualTls);
        }
        let broker = broker.start()?;

        dir.replace_in_config("port = 1883", &format!("port = {}", broker.port()))?;
        if self.acl {
            dir.replace_in_config(
                "# username = \"tessera-hub\"",
                &format!("username = \"{HUB_USER}\""),
            )?;
            dir.replace_in_config(
                "# password = \"...\"",
                &format!("password = \"{HUB_PASSWORD}\""),
            )?;
        }
        let tls = match &pki {
            None => None,
            Some(pki) => {
                let ca = dir.path().join("broker-ca.pem");
                std::fs::copy(pki.ca_file(), &ca).context("copying the CA")?;
                let mut section = "[mqtt.tls]\nca_file = \"broker-ca.pem\"\n".to_owned();
                let mut tls = TlsConfig {
                    ca_file: ca,
                    client_cert_file: None,
                    client_key_file: None,
                };
                if self.transport == Transport::MutualTls {
                    let (cert, key) = (
                        dir.path().join("hub-cert.pem"),
                        dir.path().join("hub-key.pem"),
                    );
                    std::fs::copy(&pki.client().cert, &cert).context("copying the client cert")?;
                    std::fs::copy(&pki.client().key, &key).context("copying the client key")?;
                    section.push_str(
                        "client_cert_file = \"hub-cert.pem\"\nclient_key_file = \"hub-key.pem\"\n",
                    );
                    tls.client_cert_file = Some(cert);
                    tls.client_key_file = Some(key);
                }
                dir.append_to_config(&section)?;
                Some(tls)
            }
        };
        for (from, to) in &self.config {
            dir.replace_in_config(from, to)?;
        }
        let ready_key = TestKey {
            private: dir.path().join("keys").join(format!("{READY_CLIENT}.pem")),
            public: dir
                .path()
                .join("keys")
                .join(format!("{READY_CLIENT}.pem.pub")),
        };
        let hub = TestHub {
            process: Mutex::new(None),
            dir,
            broker,
            tls,
            acl: self.acl,
            ready_key,
            _pki: pki,
        };
        hub.spawn()?;
        hub.wait_until_serving().await?;
        Ok(hub)
    }
}

/// A hub directory, its broker and the serving hub. Dropping it kills both.
#[derive(Debug)]
pub struct TestHub {
    // Declared first so the hub dies before its broker.
    process: Mutex<Option<ChildGuard>>,
    dir: HubDir,
    broker: Broker,
    tls: Option<TlsConfig>,
    acl: bool,
    ready_key: TestKey,
    _pki: Option<TestPki>,
}

impl TestHub {
    /// Options for a hub.
    pub fn builder() -> TestHubBuilder {
        TestHubBuilder {
            hub_id: "hub-e2e".to_owned(),
            acl: false,
            transport: Transport::Plain,
            config: Vec::new(),
            policy: Vec::new(),
            policy_extra: Vec::new(),
        }
    }

    /// The hub directory (config, policy, CLI).
    pub fn dir(&self) -> &HubDir {
        &self.dir
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The broker, to stop or restart it under the running hub.
    pub fn broker_mut(&mut self) -> &mut Broker {
        &mut self.broker
    }

    /// The process id of the serving hub, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock_process().as_ref().map(ChildGuard::id)
    }

    /// Asks the hub to shut down (SIGTERM) and waits up to `timeout` for it to exit;
    /// returns its exit status, or an error (after killing it, with its log) when it did
    /// not exit in time.
    pub fn terminate(&self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut process = self.lock_process();
        let child = process.as_mut().context("the hub is not running")?;
        child.terminate(timeout)
    }

    /// Waits up to `timeout` for the hub to exit on its own; its exit status, or `None`
    /// while it still runs.
    pub fn wait_for_exit(&self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let mut process = self.lock_process();
        let child = process.as_mut().context("the hub is not running")?;
        child.wait_timeout(timeout)
    }

    /// The trust anchor init printed.
    pub fn trust_anchor(&self) -> PublicKey {
        self.dir.trust_anchor()
    }

    /// The watcher's MQTT credentials, when the broker enforces the ACL.
    pub fn watcher_credentials(&self) -> Option<(&'static str, &'static str)> {
        self.acl.then_some((WATCHER_USER, WATCHER_PASSWORD))
    }

    /// The hub's log so far (every run of it).
    pub fn log(&self) -> String {
        crate::process::read_lossy(&self.dir.log_path())
    }

    /// The MQTT settings of a client `id` (plain, TLS or mutual TLS like the hub; with the
    /// ACL, `id` is also its user name).
    pub fn mqtt(&self, id: &str) -> MqttConfig {
        let mut config = MqttConfig::plain(self.broker.host(), self.broker.port(), id);
        if self.acl {
            config.username = Some(id.to_owned());
            config.password = Some("unchecked".to_owned());
        }
        config.tls = self.tls.clone();
        config
    }

    /// [`HubDir::identity_args`], plus the broker login of `id` when the broker enforces
    /// the ACL ([`TestHubBuilder::with_acl`]: its user name is its id).
    pub fn identity_args(&self, id: &str, key: &TestKey) -> Vec<String> {
        let mut args = self.dir.identity_args(id, key);
        if self.acl {
            args.extend([
                "--mqtt-username".into(),
                id.into(),
                "--mqtt-password".into(),
                "unchecked".into(),
            ]);
        }
        args
    }

    /// Connects a [`Client`] as `id` with `key`, trusting the anchor.
    pub async fn client(&self, id: &str, key: &TestKey) -> Result<Client> {
        Client::connect(
            &self.mqtt(id),
            id,
            key.signer()?,
            self.trust_anchor(),
            ANSWER_TIMEOUT,
        )
        .await
        .with_context(|| format!("connecting client {id}"))
    }

    /// Registers device `id` with a key of its own (`role`, `groups` of the policy),
    /// connects it and enrolls it with that key: the device's client, ready to ask for its
    /// device token, and its key.
    pub async fn enrolled_device(
        &self,
        id: &str,
        role: &str,
        groups: &[&str],
    ) -> Result<(Client, TestKey)> {
        let key = self.dir.add_device(id, role, groups)?;
        let mut device = self.client(id, &key).await?;
        let enrolled = device
            .request(
                RequestBody::Enroll {
                    key: key.public_key()?,
                    code_proof: None,
                },
                ANSWER_TIMEOUT,
            )
            .await
            .with_context(|| format!("enrolling {id}"))?;
        ensure!(enrolled == Answer::Enrolled, "enrolling {id}: {enrolled:?}");
        Ok((device, key))
    }

    /// Connects a [`RawClient`] as `id` signing with `signer`.
    pub async fn raw(&self, id: &str, signer: P256Signer) -> Result<RawClient> {
        RawClient::connect(&self.broker, id, signer, self.trust_anchor()).await
    }

    /// Gives a stream a change, so that fetching it from change 1 is answered with a page:
    /// registers device `{prefix}-door` (role `sensor`, group `building-a`), app
    /// `{prefix}-app` (`controller`) and operator `{prefix}-ops` (`ops`) of the default
    /// policy, has the app get a `door:open` token for the device and the operator revoke
    /// it by hash. Returns the device's stream, which now lists that token.
    pub async fn seed_revocation(&self, prefix: &str) -> Result<Stream<'static>> {
        let (device, app_id, ops_id) = (
            format!("{prefix}-door"),
            format!("{prefix}-app"),
            format!("{prefix}-ops"),
        );
        self.dir.add_device(&device, "sensor", &["building-a"])?;
        let app_key = self.dir.add_app(&app_id, "controller")?;
        let ops_key = self.dir.add_operator(&ops_id, "ops")?;
        let mut app = self.client(&app_id, &app_key).await?;
        let answer = app
            .request(
                RequestBody::AccessToken {
                    device: &device,
                    scope: Scopes::parse("door:open").map_err(|e| anyhow::anyhow!("scope: {e}"))?,
                },
                ANSWER_TIMEOUT,
            )
            .await;
        app.close().await;
        let Answer::Token { token, .. } = answer? else {
            bail!("expected an access token for {device}")
        };
        let hash = token_hash(&token);
        let mut ops = self.client(&ops_id, &ops_key).await?;
        let answer = ops
            .request(
                RequestBody::Revoke(RevokeTarget::TokenHash(hash)),
                ANSWER_TIMEOUT,
            )
            .await;
        ops.close().await;
        let counts = RevokeCounts::from_answer(&answer?)?;
        ensure!(
            counts.entries == 1,
            "revoking one token published {counts:?}"
        );
        Ok(Stream::of_device(&device))
    }

    /// Starts `tessera-hub serve`; see [`TestHub::wait_until_serving`].
    fn spawn(&self) -> Result<()> {
        let mut command = self.dir.command()?;
        command.arg("serve").env("RUST_LOG", "info");
        let child = ChildGuard::spawn_logged(&mut command, &self.dir.log_path())?;
        *self.lock_process() = Some(child);
        Ok(())
    }

    fn lock_process(&self) -> std::sync::MutexGuard<'_, Option<ChildGuard>> {
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Polls with [`READINESS_PROBE`] as [`READY_CLIENT`] until the hub answers (it has
    /// subscribed to the request topics), for at most [`STARTUP_TIMEOUT`]. Requests sent
    /// before the hub subscribed are lost, so each attempt waits only briefly.
    pub async fn wait_until_serving(&self) -> Result<()> {
        let mut client = self.client(READY_CLIENT, &self.ready_key).await?;
        let result = await_serving(&mut client, STARTUP_TIMEOUT, || {
            match self
                .lock_process()
                .as_mut()
                .map(ChildGuard::try_wait)
                .transpose()?
                .flatten()
            {
                Some(status) => bail!("the hub exited ({status})"),
                None => Ok(()),
            }
        })
        .await;
        client.close().await;
        result.with_context(|| {
            format!(
                "the hub did not start serving within {STARTUP_TIMEOUT:?}; its log:\n{}",
                tail(&self.log(), 40)
            )
        })
    }

    /// Kills the hub with SIGKILL (a crash) and reaps it.
    pub fn kill_9(&self) -> Result<()> {
        if let Some(mut child) = self.lock_process().take() {
            child.kill_9()?;
        }
        Ok(())
    }

    /// Starts the hub again (killing it first if it runs) and waits until it serves.
    pub async fn restart(&self) -> Result<()> {
        self.kill_9()?;
        self.spawn()?;
        self.wait_until_serving().await
    }
}

/// One [`TestHub`] for the tests of a file that run at the same time: the first test
/// starts it, each test holds an `Arc`, and the last one to finish stops it (a `static`
/// would never be dropped, leaking the hub and broker processes). Tests that share a hub
/// use their own client ids.
#[derive(Debug)]
pub struct SharedHub {
    slot: tokio::sync::Mutex<Weak<TestHub>>,
}

impl SharedHub {
    /// An empty slot, for a `static`.
    pub const fn new() -> Self {
        Self {
            slot: tokio::sync::Mutex::const_new(Weak::new()),
        }
    }

    /// The running hub, or a new one from `start`.
    pub async fn get<F, Fut>(&self, start: F) -> Result<Arc<TestHub>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<TestHub>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(hub) = slot.upgrade() {
            return Ok(hub);
        }
        let hub = Arc::new(start().await?);
        *slot = Arc::downgrade(&hub);
        Ok(hub)
    }
}

impl Default for SharedHub {
    fn default() -> Self {
        Self::new()
    }
}

/// A refresh grant and when it expires (Unix seconds).
pub type Grant = (Vec<u8>, u64);

/// A refusal: the error code and the hub's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The wire code.
    pub code: ErrorCode,
    /// The reason, for people.
    pub reason: String,
}

/// A response from the hub, verified with the trust anchor and owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubResponse {
    /// The request's op (`None`: the request could not be decoded).
    pub op: Option<Operation>,
    /// The client it is for.
    pub client: String,
    /// The request's id.
    pub request_id: u64,
    /// The hub's clock.
    pub hub_time: u64,
    /// The request's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// What the hub answered.
    pub outcome: Result<Answer, Refusal>,
}

impl HubResponse {
    /// Decodes a signed response and verifies it with `anchor`.
    pub fn verify(bytes: &[u8], anchor: &PublicKey) -> Result<Self> {
        let signed = SignedResponse::decode(bytes)
            .map_err(|e| anyhow::anyhow!("response does not decode: {e}"))?;
        let r = signed
            .verify(anchor)
            .map_err(|e| anyhow::anyhow!("response does not verify with the trust anchor: {e}"))?;
        Ok(Self {
            op: r.op,
            client: r.client.to_owned(),
            request_id: r.request_id,
            hub_time: r.hub_time,
            nonce: r.nonce,
            outcome: match r.outcome {
                Ok(ResponseBody::Enrolled) => Ok(Answer::Enrolled),
                Ok(ResponseBody::Token { token, grant }) => Ok(Answer::Token {
                    token: token.to_vec(),
                    grant: grant.map(|(g, e)| (g.to_vec(), e)),
                }),
                Ok(ResponseBody::Revoked {
                    revoked,
                    entries,
                    notified,
                }) => Ok(Answer::Revoked {
                    revoked,
                    entries,
                    notified,
                }),
                Ok(ResponseBody::Revocations { page }) => Ok(Answer::Revocations {
                    page: page.to_vec(),
                }),
                Err(e) => Err(Refusal {
                    code: e.code,
                    reason: e.reason.to_owned(),
                }),
            },
        })
    }

    /// The refusal's code, `None` on success.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.outcome.as_ref().err().map(|r| r.code)
    }

    /// Fails unless the hub refused with `code`; returns the reason.
    pub fn expect_refusal(&self, code: ErrorCode) -> Result<&str> {
        match &self.outcome {
            Err(r) if r.code == code => Ok(&r.reason),
            other => bail!("expected a `{code}` refusal, got {other:?}"),
        }
    }

    /// Fails unless the hub answered with a token; returns it and the grant.
    pub fn expect_token(&self) -> Result<(Vec<u8>, Option<Grant>)> {
        match &self.outcome {
            Ok(Answer::Token { token, grant }) => Ok((token.clone(), grant.clone())),
            other => bail!("expected a token, got {other:?}"),
        }
    }
}

/// A request as it went out: its bytes and what identifies its answer.
#[derive(Debug, Clone)]
pub struct SentRequest {
    /// The signed request.
    pub bytes: Vec<u8>,
    /// Its request id.
    pub request_id: u64,
    /// Its nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// A client that builds and publishes requests byte by byte: any client id in the payload,
/// any key, any time, any nonce, or no request at all. Connected with its id as MQTT
/// client id and subscribed to its response topic.
#[derive(Debug)]
pub struct RawClient {
    id: String,
    signer: P256Signer,
    anchor: PublicKey,
    probe: MqttProbe,
    next_request: u64,
}

impl RawClient {
    /// Connects and subscribes to the response topic.
    pub async fn connect(
        broker: &Broker,
        id: &str,
        signer: P256Signer,
        anchor: PublicKey,
    ) -> Result<Self> {
        let probe = broker.probe(id).await?;
        probe
            .subscribe_granted(&response_topic(id)?, QoS::AtLeastOnce)
            .await?;
        Ok(Self {
            id: id.to_owned(),
            signer,
            anchor,
            probe,
            next_request: 1,
        })
    }

    /// Like [`RawClient::connect`], over a probe the caller connected (with credentials of
    /// its choice, say); subscribes it to `id`'s response topic.
    pub async fn over_probe(
        probe: MqttProbe,
        id: &str,
        signer: P256Signer,
        anchor: PublicKey,
    ) -> Result<Self> {
        probe
            .subscribe_granted(&response_topic(id)?, QoS::AtLeastOnce)
            .await?;
        Ok(Self {
            id: id.to_owned(),
            signer,
            anchor,
            probe,
            next_request: 1,
        })
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The probe underneath, to subscribe to more topics.
    pub fn probe(&mut self) -> &mut MqttProbe {
        &mut self.probe
    }

    /// Signs from now on with another key (the client id stays).
    pub fn set_signer(&mut self, signer: P256Signer) {
        self.signer = signer;
    }

    /// Signs a request naming `client`, with this client's key.
    pub fn sign_as(
        &self,
        client: &str,
        request_id: u64,
        issued_at: u64,
        nonce: [u8; NONCE_LEN],
        body: RequestBody<'_>,
    ) -> Result<Vec<u8>> {
        let request = Request {
            client,
            request_id,
            issued_at,
            nonce,
            body,
        };
        // Room for the largest request the protocol allows (a revoke naming many devices).
        let mut out = vec![0u8; cose::MAX_REQUEST_LEN];
        let n = request
            .sign(&self.signer, &mut out)
            .map_err(|e| anyhow::anyhow!("signing a request: {e}"))?;
        out.truncate(n);
        Ok(out)
    }

    /// A request in this client's name with the next request id, a fresh nonce and
    /// `issued_at`.
    pub fn request_at(&mut self, body: RequestBody<'_>, issued_at: u64) -> Result<SentRequest> {
        let request_id = self.next_request;
        self.next_request += 1;
        let nonce = random_bytes::<NONCE_LEN>();
        let bytes = self.sign_as(&self.id, request_id, issued_at, nonce, body)?;
        Ok(SentRequest {
            bytes,
            request_id,
            nonce,
        })
    }

    /// [`RawClient::request_at`] the current time.
    pub fn request(&mut self, body: RequestBody<'_>) -> Result<SentRequest> {
        self.request_at(body, unix_now())
    }

    /// Publishes `payload` on this client's own request topic; returns the broker's PUBACK
    /// reason.
    pub async fn publish(&self, payload: &[u8]) -> Result<PubAckReason> {
        self.publish_on(&request_topic(&self.id)?, payload).await
    }

    /// Publishes `payload` on any topic; returns the broker's PUBACK reason.
    pub async fn publish_on(&self, topic: &str, payload: &[u8]) -> Result<PubAckReason> {
        self.probe
            .publish_acked(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
    }

    /// The next response on this client's response topic, verified with the anchor.
    pub async fn next_response(&mut self, timeout: Duration) -> Result<HubResponse> {
        let message = self
            .probe
            .expect_message(&response_topic(&self.id)?, timeout)
            .await?;
        HubResponse::verify(&message.payload, &self.anchor)
    }

    /// Fails if any response arrives within `window`.
    pub async fn expect_no_response(&mut self, window: Duration) -> Result<()> {
        self.probe
            .expect_no_message(&response_topic(&self.id)?, window)
            .await
    }

    /// Publishes `request` and waits for the response that answers it (same request id
    /// and nonce); fails on any other response.
    pub async fn send(&mut self, request: &SentRequest) -> Result<HubResponse> {
        self.publish(&request.bytes).await?;
        let response = self.next_response(ANSWER_TIMEOUT).await?;
        ensure!(
            response.client == self.id
                && response.request_id == request.request_id
                && response.nonce == request.nonce,
            "response does not answer request {}: {response:?}",
            request.request_id
        );
        Ok(response)
    }

    /// Signs `body` now and sends it.
    pub async fn ask(&mut self, body: RequestBody<'_>) -> Result<HubResponse> {
        let request = self.request(body)?;
        self.send(&request).await
    }
}

fn request_topic(id: &str) -> Result<String> {
    Ok(topic::request(id)
        .map_err(|e| anyhow::anyhow!("topic for {id:?}: {e}"))?
        .to_string())
}

fn response_topic(id: &str) -> Result<String> {
    Ok(topic::response(id)
        .map_err(|e| anyhow::anyhow!("topic for {id:?}: {e}"))?
        .to_string())
}

/// A signed revocation page, verified and owned: a delta (one change), a page of a
/// retained snapshot, the answer to `fetch_revocations`, or several consecutive pages of
/// one stream combined ([`RevocationPage::combine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationPage {
    /// The stream's name (`devices/3f`, `service/tessera`).
    pub stream: String,
    /// The stream's latest change when the page was built.
    pub seq: u64,
    /// When the hub built it.
    pub issued_at: u64,
    /// First change covered.
    pub from: u64,
    /// Last change covered.
    pub to: u64,
    /// The entries still in force of changes `from..=to`, each with its audience.
    pub entries: Vec<Addressed>,
}

impl RevocationPage {
    /// Verifies a signed page with `anchor` and decodes it.
    pub fn verify(bytes: &[u8], anchor: &PublicKey) -> Result<Self> {
        let payload = verified_payload(bytes, anchor)?;
        let page = Page::decode(payload).map_err(|e| anyhow::anyhow!("revocation page: {e}"))?;
        Ok(Self {
            stream: page.stream().name().to_string(),
            seq: page.seq(),
            issued_at: page.issued_at(),
            from: page.from(),
            to: page.to(),
            entries: page
                .entries()
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("revocation entry: {e}"))?,
        })
    }

    /// Combines pages of one stream into the page covering the longest run of changes from
    /// the first one's `from` that they cover together (pages may come in any order, from
    /// different builds, and overlap); `seq` and `issued_at` are the newest seen. Fails on
    /// no pages or pages of different streams.
    pub fn combine(pages: impl IntoIterator<Item = RevocationPage>) -> Result<Self> {
        let mut pages: Vec<RevocationPage> = pages.into_iter().collect();
        pages.sort_by_key(|p| (p.from, std::cmp::Reverse(p.to)));
        let mut pages = pages.into_iter();
        let mut combined = pages.next().context("no page to combine")?;
        for page in pages {
            ensure!(
                page.stream == combined.stream,
                "pages of {} and {}",
                combined.stream,
                page.stream
            );
            combined.seq = combined.seq.max(page.seq);
            combined.issued_at = combined.issued_at.max(page.issued_at);
            if page.from <= combined.to + 1 && page.to > combined.to {
                combined.to = page.to;
                combined.entries.extend(page.entries);
            }
        }
        Ok(combined)
    }

    /// Whether the page belongs to `stream`.
    pub fn is_of(&self, stream: &Stream<'_>) -> bool {
        self.stream == stream.name().as_str()
    }

    /// The entries addressed to `audience`.
    pub fn entries_for<'a>(&'a self, audience: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |a| a.audience.as_str() == audience)
            .map(|a| &a.entry)
    }

    /// Whether an entry addressed to `audience` names the token with this hash.
    pub fn lists_token(&self, audience: &str, hash: &TokenHash) -> bool {
        self.entries_for(audience)
            .any(|e| matches!(e, Entry::Token { hash: h, .. } if h == hash))
    }

    /// Whether any entry, to any audience, names the token with this hash.
    pub fn lists_token_anywhere(&self, hash: &TokenHash) -> bool {
        self.entries
            .iter()
            .any(|a| matches!(&a.entry, Entry::Token { hash: h, .. } if h == hash))
    }

    /// `(issued_before, expires_at)` of the subject entry for `subject` addressed to
    /// `audience`, if there is one.
    pub fn subject_entry(&self, audience: &str, subject: &str) -> Option<(u64, u64)> {
        self.entries_for(audience).find_map(|e| match e {
            Entry::Subject {
                subject: s,
                issued_before,
                expires_at,
            } if s.as_str() == subject => Some((*issued_before, *expires_at)),
            _ => None,
        })
    }

    /// Whether an entry addressed to `audience` revokes the token with `hash`, issued to
    /// `subject` at `issued_at`: what a verifier of that audience would conclude.
    pub fn covers(&self, audience: &str, hash: &TokenHash, subject: &str, issued_at: u64) -> bool {
        self.entries_for(audience)
            .any(|e| e.covers(hash, subject, issued_at))
    }
}

fn verified_payload<'a>(bytes: &'a [u8], anchor: &PublicKey) -> Result<&'a [u8]> {
    cose::Sign1::decode(bytes)
        .and_then(|s| s.verify(anchor))
        .map_err(|e| anyhow::anyhow!("does not verify with the trust anchor: {e}"))
}

/// One signed page of `stream` from change `from`, as `fetch_revocations` answers;
/// `None` when the hub refuses because the stream has no change `from` yet.
pub async fn fetch_page(
    client: &mut Client,
    anchor: &PublicKey,
    stream: &Stream<'_>,
    from: u64,
) -> Result<Option<RevocationPage>> {
    let body = RequestBody::FetchRevocations {
        stream: *stream,
        from,
    };
    match client.request(body, ANSWER_TIMEOUT).await {
        Ok(Answer::Revocations { page }) => {
            let page = RevocationPage::verify(&page, anchor)?;
            ensure!(
                page.is_of(stream) && page.from == from,
                "asked for {} from {from}, got {page:?}",
                stream.name()
            );
            Ok(Some(page))
        }
        Err(ClientError::Refused {
            code: ErrorCode::Denied,
            reason,
        }) if reason.contains("there is nothing from change") => Ok(None),
        Ok(other) => bail!("expected a revocation page, got {other:?}"),
        Err(e) => Err(e.into()),
    }
}

/// Everything `fetch_revocations` serves of `stream`: pages from change 1, each fetched
/// from where the last ended, until one reaches the stream's latest change; combined.
/// `None` when the stream has no change.
pub async fn fetch_stream(
    client: &mut Client,
    anchor: &PublicKey,
    stream: &Stream<'_>,
) -> Result<Option<RevocationPage>> {
    let mut pages = Vec::new();
    let mut from = 1;
    loop {
        let Some(page) = fetch_page(client, anchor, stream, from).await? else {
            ensure!(
                pages.is_empty(),
                "the stream ended at {from} after pages {pages:?}"
            );
            return Ok(None);
        };
        let done = page.to >= page.seq;
        from = page.to + 1;
        pages.push(page);
        if done {
            return RevocationPage::combine(pages).map(Some);
        }
    }
}

/// Reads the retained snapshot of `stream` as a new subscriber would: subscribes `probe`
/// to `…/{stream}/snapshot/+` and collects pages (the last one per topic) until together
/// they cover changes `1..=n` with `n ≥ at_least`, for at most `timeout`. Returns them
/// combined, and whether every page came as a retained message.
pub async fn read_snapshot(
    probe: &mut MqttProbe,
    anchor: &PublicKey,
    stream: &Stream<'_>,
    at_least: u64,
    timeout: Duration,
) -> Result<(RevocationPage, bool)> {
    let filter = format!("{}/{}/snapshot/+", topic::REVOCATION_PREFIX, stream.name());
    probe.subscribe_granted(&filter, QoS::AtLeastOnce).await?;
    let deadline = Instant::now() + timeout;
    let mut pages: std::collections::BTreeMap<String, (RevocationPage, bool)> =
        std::collections::BTreeMap::new();
    loop {
        let message = probe
            .expect_message(&filter, deadline.saturating_duration_since(Instant::now()))
            .await
            .with_context(|| {
                format!(
                    "no snapshot of {} reaching change {at_least}; pages seen: {:?}",
                    stream.name(),
                    pages
                        .iter()
                        .map(|(t, (p, _))| format!("{t}: {}..={} of {}", p.from, p.to, p.seq))
                        .collect::<Vec<_>>()
                )
            })?;
        if message.payload.is_empty() {
            // A cleared page of a longer earlier snapshot.
            pages.remove(&message.topic);
            continue;
        }
        let page = RevocationPage::verify(&message.payload, anchor)?;
        ensure!(page.is_of(stream), "{} carries {page:?}", message.topic);
        pages.insert(message.topic, (page, message.retain));
        let combined = RevocationPage::combine(pages.values().map(|(p, _)| p.clone()))?;
        if combined.from == 1 && combined.to >= at_least {
            let retained = pages.values().all(|(_, r)| *r);
            return Ok((combined, retained));
        }
    }
}

/// Waits on `probe` (subscribed to `stream`'s delta topic, or a filter covering it) for
/// the delta of change `seq` of `stream`, skipping others; returns it verified.
pub async fn expect_delta(
    probe: &mut MqttProbe,
    anchor: &PublicKey,
    stream: &Stream<'_>,
    seq: u64,
    timeout: Duration,
) -> Result<RevocationPage> {
    expect_delta_where(
        probe,
        anchor,
        stream,
        &format!("change {seq}"),
        |d| d.from == seq,
        timeout,
    )
    .await
}

/// Waits on `probe` (subscribed to `stream`'s delta topic, or a filter covering it) for a
/// delta of `stream` for which `wanted` holds (`what` names it in the error), skipping
/// others; returns it verified. Every delta seen must be one change (`from = to`).
pub async fn expect_delta_where(
    probe: &mut MqttProbe,
    anchor: &PublicKey,
    stream: &Stream<'_>,
    what: &str,
    wanted: impl Fn(&RevocationPage) -> bool,
    timeout: Duration,
) -> Result<RevocationPage> {
    let topic = topic::revocation_delta(stream).to_string();
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message: Message = probe.expect_message(&topic, left).await.with_context(|| {
            format!("waiting for the delta of {what} on {topic}; deltas seen: {seen:?}")
        })?;
        let delta = RevocationPage::verify(&message.payload, anchor)?;
        ensure!(
            delta.is_of(stream) && delta.from == delta.to && delta.to <= delta.seq,
            "not a delta of {}: {delta:?}",
            stream.name()
        );
        if wanted(&delta) {
            return Ok(delta);
        }
        seen.push(delta.from);
    }
}

/// What a revocation did, as the hub answers it and the CLI prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeCounts {
    /// Clients or tokens newly revoked.
    pub revoked: u64,
    /// Revocation entries published.
    pub entries: u64,
    /// Devices told on their control topic.
    pub notified: u64,
}

impl RevokeCounts {
    /// From an answer, which must be `Revoked`.
    pub fn from_answer(answer: &Answer) -> Result<Self> {
        match answer {
            Answer::Revoked {
                revoked,
                entries,
                notified,
            } => Ok(Self {
                revoked: *revoked,
                entries: *entries,
                notified: *notified,
            }),
            other => bail!("expected Revoked, got {other:?}"),
        }
    }

    /// From what `tessera-hub revoke` printed: `revoked N (durable): E revocation entries
    /// published, D devices told on their control topic` (`1 revocation entry`, `1 device`).
    pub fn from_cli(printed: &str) -> Result<Self> {
        let parse = || -> Option<Self> {
            let rest = printed.trim().strip_prefix("revoked ")?;
            let (revoked, rest) = rest.split_once(" (durable): ")?;
            let (entries, rest) = rest
                .split_once(" revocation entries published, ")
                .or_else(|| rest.split_once(" revocation entry published, "))?;
            let notified = rest
                .strip_suffix(" devices told on their control topic")
                .or_else(|| rest.strip_suffix(" device told on their control topic"))?;
            Some(Self {
                revoked: revoked.parse().ok()?,
                entries: entries.parse().ok()?,
                notified: notified.parse().ok()?,
            })
        };
        parse().with_context(|| format!("revoke printed {printed:?}"))
    }
}
