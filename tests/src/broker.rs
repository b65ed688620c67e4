//! A real Mosquitto per test: its own config (ACL, passwords, TLS) in a temp dir, on a free
//! loopback port, killed and reaped on drop.
//!
//! Never the shared broker on 127.0.0.1:1883: each test owns its broker, so tests are
//! independent and run in parallel.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rustix::process::Signal;
use sha2::{Digest as _, Sha512};
use tempfile::TempDir;

use crate::pki::{CertKeyFiles, TestPki, rustls_client_config};
use crate::port::{LOOPBACK, free_port};
use crate::probe::{MqttProbe, ProbeOptions};
use crate::process::{ChildGuard, read_lossy, tail};

/// Where Debian's `mosquitto` package installs the broker; `$MOSQUITTO` overrides it.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The broker's `max_packet_size` unless [`BrokerBuilder::max_packet_size`] says otherwise.
pub const DEFAULT_MAX_PACKET_SIZE: u32 = 128 * 1024;

/// How long a start or restart may take before it fails with the log tail.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many fresh ports [`BrokerBuilder::start`] tries when another process keeps taking them.
const PORT_ATTEMPTS: usize = 10;

/// A running Mosquitto owned by one test. See the module docs.
///
/// Starting, stopping and restarting block the calling thread for at most the startup timeout
/// (a few milliseconds normally), so they work from sync and async tests alike.
#[derive(Debug)]
pub struct Broker {
    settings: BrokerBuilder,
    dir: TempDir,
    port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    ca_file: Option<PathBuf>,
    client_tls: Option<Arc<rustls::ClientConfig>>,
    child: Option<ChildGuard>,
}

/// Options for a [`Broker`]; [`BrokerBuilder::start`] starts it.
#[derive(Debug, Clone)]
pub struct BrokerBuilder {
    acl: Option<String>,
    tls: Option<TlsFiles>,
    require_certificate: bool,
    use_identity_as_username: bool,
    client_ids_as_user_names: bool,
    users: Vec<(String, String)>,
    allow_anonymous: bool,
    max_connections: Option<u32>,
    max_packet_size: u32,
    max_queued_messages: Option<u32>,
    verbose_log: bool,
    global_options: Vec<String>,
    listener_options: Vec<String>,
    startup_timeout: Duration,
}

#[derive(Debug, Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: CertKeyFiles,
}

impl Default for BrokerBuilder {
    fn default() -> Self {
        Self {
            acl: None,
            tls: None,
            require_certificate: false,
            use_identity_as_username: false,
            client_ids_as_user_names: false,
            users: Vec::new(),
            allow_anonymous: true,
            max_connections: None,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_queued_messages: None,
            verbose_log: false,
            global_options: Vec::new(),
            listener_options: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl BrokerBuilder {
    /// Writes `text` as the ACL file (`acl_file`). Mosquitto's syntax: `topic [read|write|
    /// readwrite|deny] <filter>` lines before any `user` line apply to anonymous clients,
    /// `user <name>` starts a block for that username, and `pattern ...` lines apply to every
    /// client with `%c` (client id) and `%u` (username) substituted. With an ACL file,
    /// anything not granted is denied.
    pub fn acl(mut self, text: impl Into<String>) -> Self {
        self.acl = Some(text.into());
        self
    }

    /// Makes the listener TLS, with `pki`'s server certificate and CA. The PEM files are
    /// copied into the broker's dir at start, so `pki` may be dropped afterwards.
    pub fn tls(mut self, pki: &TestPki) -> Self {
        self.tls = Some(TlsFiles {
            ca: pki.ca_file().to_owned(),
            cert: pki.server_cert().to_owned(),
            key: pki.server_key().to_owned(),
            client: pki.client().clone(),
        });
        self
    }

    /// mTLS: clients must present a certificate signed by the CA (`require_certificate`).
    /// Only meaningful with [`BrokerBuilder::tls`].
    pub fn require_certificate(mut self, required: bool) -> Self {
        self.require_certificate = required;
        self
    }

    /// Uses the client certificate's common name as the username
    /// (`use_identity_as_username`), so ACL `user` blocks can name certificate holders.
    /// Implies [`BrokerBuilder::require_certificate`].
    pub fn use_identity_as_username(mut self, enabled: bool) -> Self {
        self.use_identity_as_username = enabled;
        if enabled {
            self.require_certificate = true;
        }
        self
    }

    /// Binds client ids to user names as docs/OPERATING.md configures Mosquitto
    /// (`use_username_as_clientid true`: the broker replaces each client id by the user
    /// name and refuses clients without one), and has [`Broker::probe_options`] log in
    /// with the client id as user name. Without [`BrokerBuilder::user`] entries nobody's
    /// password is checked, so any client may claim any user name.
    pub fn client_ids_as_user_names(mut self, enabled: bool) -> Self {
        self.client_ids_as_user_names = enabled;
        self
    }

    /// Adds a username and password to the password file (`password_file`). Clients that
    /// send a username must then match it; anonymous clients stay allowed unless
    /// [`BrokerBuilder::allow_anonymous`] turns them away.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// Whether clients without a username may connect (`allow_anonymous`, default true).
    pub fn allow_anonymous(mut self, allowed: bool) -> Self {
        self.allow_anonymous = allowed;
        self
    }

    /// Caps client connections on the listener (`max_connections`). Measured with
    /// Mosquitto 2.0.11: it admits `max + 1` clients (its check is `count > max`), and 0
    /// means unlimited, so a limit of exactly one client cannot be expressed.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max);
        self
    }

    /// The largest MQTT packet the broker accepts (`max_packet_size`, default
    /// [`DEFAULT_MAX_PACKET_SIZE`]).
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// How many QoS 1/2 messages the broker queues per client beyond those in flight
    /// (`max_queued_messages`, Mosquitto's default 1000). Raise it for fan-out tests.
    pub fn max_queued_messages(mut self, max: u32) -> Self {
        self.max_queued_messages = Some(max);
        self
    }

    /// Logs every packet (`log_type all`) instead of connections, subscriptions and errors.
    pub fn verbose_log(mut self, verbose: bool) -> Self {
        self.verbose_log = verbose;
        self
    }

    /// Adds a raw global line to mosquitto.conf (written before the listener).
    pub fn global_option(mut self, line: impl Into<String>) -> Self {
        self.global_options.push(line.into());
        self
    }

    /// Adds a raw line to the listener's section of mosquitto.conf.
    pub fn listener_option(mut self, line: impl Into<String>) -> Self {
        self.listener_options.push(line.into());
        self
    }

    /// How long a start or restart may take (default [`DEFAULT_STARTUP_TIMEOUT`]).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Writes the config into a fresh temp dir and starts Mosquitto on a free loopback port,
    /// trying another port when someone else took the chosen one. Returns once the broker
    /// said it is running and its port accepts TCP connections.
    pub fn start(self) -> Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix("tessera-mosquitto-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let root = dir.path().to_owned();
        let mut broker = Broker {
            config_path: root.join("mosquitto.conf"),
            log_path: root.join("mosquitto.log"),
            stderr_path: root.join("mosquitto.stderr"),
            ca_file: None,
            client_tls: None,
            child: None,
            port: 0,
            dir,
            settings: self,
        };
        broker.write_support_files()?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().context("picking a free port")?;
            match broker.launch(port)? {
                Launch::Running => return Ok(broker),
                Launch::PortTaken(detail) => last_error = Some(detail),
            }
        }
        bail!(
            "mosquitto could not bind a free port in {PORT_ATTEMPTS} attempts; last log:\n{}",
            last_error.unwrap_or_default()
        )
    }
}

enum Launch {
    Running,
    /// Bind failed with "Address already in use"; carries the log tail.
    PortTaken(String),
}

impl Broker {
    /// A plain broker: anonymous clients, no ACL, no TLS.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Options for a broker with an ACL, TLS, passwords and so on.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// The listener's port (the same across [`Broker::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listener's address, always `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The listener's socket address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((LOOPBACK, self.port))
    }

    /// `mqtt://127.0.0.1:<port>`, or `mqtts://...` for a TLS listener.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host(), self.port)
    }

    /// Whether clients log in with their client id as user name
    /// ([`BrokerBuilder::client_ids_as_user_names`]).
    pub fn client_ids_are_user_names(&self) -> bool {
        self.settings.client_ids_as_user_names
    }

    /// Whether the listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.settings.tls.is_some()
    }

    /// The CA certificate clients must trust (the broker's own copy), for TLS brokers.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The broker's temp dir (config, log, ACL, password and certificate files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generated mosquitto.conf.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The broker's log so far, for diagnostics (lossy UTF-8). Mosquitto writes config
    /// errors and a few warnings to stderr instead; those are in [`Broker::stderr`].
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// What Mosquitto wrote to stdout/stderr (config errors before the log file opens).
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// Whether the broker process is alive (it may be suspended).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the broker (SIGKILL: a crash; clients see their connections reset, no
    /// DISCONNECT) and reaps it. Its port stays reserved for [`Broker::restart`]. No-op when
    /// already stopped.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill_9().context("killing mosquitto")?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port with the same config (stopping it first if
    /// it runs). Retries while the port is still held (TIME_WAIT, a dying process), for at
    /// most the startup timeout. Clients reconnect; their sessions are gone (no persistence).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + self.settings.startup_timeout;
        loop {
            match self.launch(self.port)? {
                Launch::Running => return Ok(()),
                Launch::PortTaken(log) if Instant::now() >= deadline => bail!(
                    "mosquitto could not rebind port {} within {:?}:\n{log}",
                    self.port,
                    self.settings.startup_timeout
                ),
                Launch::PortTaken(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing answers, as when the
    /// network silently drops packets. Keep-alive timeouts then fire on clients.
    pub fn suspend(&mut self) -> Result<()> {
        self.signal(Signal::STOP)
    }

    /// Thaws a [`Broker::suspend`]ed broker (SIGCONT).
    pub fn resume(&mut self) -> Result<()> {
        self.signal(Signal::CONT)
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        match &mut self.child {
            Some(child) => child.signal(signal),
            None => bail!("mosquitto is not running"),
        }
    }

    /// Probe options for this broker: its host and port, the client id as user name with
    /// [`BrokerBuilder::client_ids_as_user_names`], and, for a TLS broker, a client config
    /// that trusts its CA and presents the PKI's default client certificate.
    pub fn probe_options(&self, client_id: &str) -> ProbeOptions {
        let mut options = ProbeOptions::new(client_id, self.host(), self.port);
        if self.settings.client_ids_as_user_names {
            options = options.credentials(client_id, "unchecked");
        }
        match &self.client_tls {
            Some(tls) => options.tls(Arc::clone(tls)),
            None => options,
        }
    }

    /// Connects an [`MqttProbe`] with [`Broker::probe_options`].
    pub async fn probe(&self, client_id: &str) -> Result<MqttProbe> {
        MqttProbe::connect(self.probe_options(client_id)).await
    }

    /// Writes the ACL, password and TLS files; they do not depend on the port.
    fn write_support_files(&mut self) -> Result<()> {
        let root = self.dir.path().to_owned();
        if let Some(acl) = &self.settings.acl {
            write(&root.join("acl"), acl.as_bytes())?;
        }
        if !self.settings.users.is_empty() {
            let mut text = String::new();
            for (name, password) in &self.settings.users {
                if name.contains(':') || name.contains('\n') {
                    bail!("username {name:?} cannot go in a Mosquitto password file");
                }
                text.push_str(&password_line(name, password));
                text.push('\n');
            }
            write(&root.join("passwd"), text.as_bytes())?;
        }
        if let Some(tls) = &self.settings.tls {
            let ca = root.join("ca.pem");
            for (from, to) in [
                (&tls.ca, &ca),
                (&tls.cert, &root.join("server.pem")),
                (&tls.key, &root.join("server-key.pem")),
            ] {
                std::fs::copy(from, to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            }
            self.client_tls = Some(rustls_client_config(&ca, Some(&tls.client))?);
            self.ca_file = Some(ca);
        }
        Ok(())
    }

    fn config(&self, port: u16) -> String {
        let s = &self.settings;
        let root = self.dir.path();
        let mut c = String::new();
        let mut line = |text: &str| {
            c.push_str(text);
            c.push('\n');
        };
        line("# Generated by tessera-tests for one test; deleted with its temp dir.");
        // Run as root, Mosquitto switches to the `mosquitto` user, which cannot read this
        // temp dir; `user root` keeps the current user (and is ignored when not root).
        line("user root");
        line("per_listener_settings false");
        line("persistence false");
        line(&format!(
            "log_dest file {}",
            root.join("mosquitto.log").display()
        ));
        if s.verbose_log {
            line("log_type all");
        } else {
            for kind in [
                "error",
                "warning",
                "notice",
                "information",
                "subscribe",
                "unsubscribe",
            ] {
                line(&format!("log_type {kind}"));
            }
        }
        line("connection_messages true");
        line("log_timestamp true");
        line("log_timestamp_format %Y-%m-%dT%H:%M:%S");
        // Without it a loopback round trip waits on Nagle + delayed ACK (88 ms vs 0.19 ms).
        line("set_tcp_nodelay true");
        line(&format!("max_packet_size {}", s.max_packet_size));
        if let Some(max) = s.max_queued_messages {
            line(&format!("max_queued_messages {max}"));
        }
        line(&format!("allow_anonymous {}", s.allow_anonymous));
        if !s.users.is_empty() {
            line(&format!("password_file {}", root.join("passwd").display()));
        }
        if s.acl.is_some() {
            line(&format!("acl_file {}", root.join("acl").display()));
        }
        for option in &s.global_options {
            line(option);
        }
        line(&format!("listener {port} {LOOPBACK}"));
        if let Some(max) = s.max_connections {
            line(&format!("max_connections {max}"));
        }
        if s.tls.is_some() {
            line(&format!("cafile {}", root.join("ca.pem").display()));
            line(&format!("certfile {}", root.join("server.pem").display()));
            line(&format!(
                "keyfile {}",
                root.join("server-key.pem").display()
            ));
            line(&format!("require_certificate {}", s.require_certificate));
            if s.use_identity_as_username {
                line("use_identity_as_username true");
            }
        }
        if s.client_ids_as_user_names {
            line("use_username_as_clientid true");
        }
        for option in &s.listener_options {
            line(option);
        }
        c
    }

    /// Starts mosquitto on `port` and waits until it runs or fails.
    fn launch(&mut self, port: u16) -> Result<Launch> {
        write(&self.config_path, self.config(port).as_bytes())?;
        // The log is appended to across restarts: only look at what this run writes.
        let log_start = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let stderr_start = std::fs::metadata(&self.stderr_path).map_or(0, |m| m.len());
        let program = std::env::var_os("MOSQUITTO").unwrap_or_else(|| MOSQUITTO.into());
        let mut child = ChildGuard::spawn_logged(
            Command::new(&program).arg("-c").arg(&self.config_path),
            &self.stderr_path,
        )
        .with_context(|| {
            format!(
                "starting {} (install the `mosquitto` package, or set $MOSQUITTO)",
                Path::new(&program).display()
            )
        })?;
        let addr = SocketAddr::from((LOOPBACK, port));
        let timeout = self.settings.startup_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_since(log_start);
            if let Some(status) = child.try_wait()? {
                let log = self.log_since(log_start);
                let stderr = read_from(&self.stderr_path, stderr_start);
                let report = format!("{}\n{}", tail(&log, 30), tail(&stderr, 30));
                if log.contains("Address already in use") {
                    return Ok(Launch::PortTaken(report));
                }
                bail!(
                    "mosquitto exited ({status}) while starting on port {port}:\n{report}\n\
                     config:\n{}",
                    self.config(port)
                );
            }
            // "running" is logged only after every listener is bound, so a connection that
            // succeeds before it might reach whoever else holds the port.
            if log.contains(" running")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                self.port = port;
                self.child = Some(child);
                return Ok(Launch::Running);
            }
            if Instant::now() >= deadline {
                let stderr = read_from(&self.stderr_path, stderr_start);
                drop(child);
                bail!(
                    "mosquitto did not accept connections on {addr} within {timeout:?}:\n{}\n{}",
                    tail(&log, 30),
                    tail(&stderr, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log_since(&self, start: u64) -> String {
        read_from(&self.log_path, start)
    }
}

/// One line of a Mosquitto password file: `name:$6$<salt>$<hash>` with
/// hash = SHA-512(password ‖ salt), both base64. Mosquitto 2.0 also reads its newer `$7$`
/// (PBKDF2) lines, but `$6$` needs only SHA-512, and a test password needs no stretching.
/// The salt is derived from the name, so the file is reproducible.
fn password_line(name: &str, password: &str) -> String {
    let salt = &Sha512::digest(format!("tessera-test-salt:{name}").as_bytes())[..12];
    let hash = Sha512::new()
        .chain_update(password.as_bytes())
        .chain_update(salt)
        .finalize();
    format!("{name}:$6${}${}", base64(salt), base64(&hash))
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn read_from(path: &Path, start: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(start).unwrap_or(usize::MAX).min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

fn write(path: &Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

impl Drop for Broker {
    fn drop(&mut self) {
        // ChildGuard kills and reaps; dropping it here, before the temp dir goes, keeps
        // mosquitto from writing into a deleted dir.
        self.child.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn password_line_has_the_sha512_format() {
        let line = password_line("hub", "secret");
        let rest = line.strip_prefix("hub:$6$").expect("prefix");
        let (salt, hash) = rest.split_once('$').expect("two fields");
        assert_eq!(salt.len(), 16); // 12 bytes
        assert_eq!(hash.len(), 88); // 64 bytes
    }
}
