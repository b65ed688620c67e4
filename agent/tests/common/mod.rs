//! What the agent's end-to-end tests share: a real `tessera-hub` serving through a real
//! Mosquitto owned by the test (so the test can restart either), and a device directory
//! with its `tessera-agent` config, commands and local socket.
//!
//! Built on the `tessera-tests` harness ([`Broker`], [`HubDir`], [`ChildGuard`]). Every wait
//! is bounded.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;
use tessera_hub::client::{Client, ClientError};
use tessera_hub::keyfile;
use tessera_hub::mqtt::MqttConfig;
use tessera_shared::crypto::{P256Signer, PublicKey};
use tessera_shared::message::{NONCE_LEN, Presentation, ResponseBody, SignedResponse};
use tessera_shared::revocation::Stream;
use tessera_shared::token;
use tessera_tests::hub::{
    HubDir, READINESS_PROBE, READY_CLIENT, RevocationPage, RevokeCounts, TestKey,
    answers_readiness_probe, fetch_stream,
};
use tessera_tests::{Broker, ChildGuard, TestPki};

/// The device role's name in the default policy.
pub(crate) const DEVICE_ROLE: &str = "sensor";
/// The device group of the default policy.
pub(crate) const GROUP: &str = "building-a";
/// The app role of the default policy (door:open, door:close on building-a).
pub(crate) const APP_ROLE: &str = "controller";
/// An app role whose access tokens live 2 s (added by [`Hub::start`]).
pub(crate) const SHORT_APP_ROLE: &str = "shortlived";
/// An app role that no access rule names (added by [`Hub::start`]).
pub(crate) const NO_ACCESS_ROLE: &str = "nothing";
/// The operator role of the default policy.
pub(crate) const OPERATOR_ROLE: &str = "ops";

const EXTRA_POLICY: &str = r#"
[roles.shortlived]
kind = "app"
token_lifetime_s = 2

[roles.nothing]
kind = "app"

[[access]]
app_roles = ["shortlived"]
device_groups = ["building-a"]
scopes = ["door:open"]
"#;

/// How a test hub is set up.
#[derive(Debug, Clone)]
pub(crate) struct HubOptions {
    /// Lifetime of device tokens of the `sensor` role, seconds.
    pub(crate) device_token_lifetime_s: u64,
    /// MQTT over TLS.
    pub(crate) tls: bool,
    /// Seconds between the hub's revocation heartbeats.
    pub(crate) heartbeat_s: u64,
    /// Device groups to declare besides `building-a` (name, description).
    pub(crate) groups: Vec<(String, String)>,
    /// TOML appended to the policy (roles, access rules).
    pub(crate) extra_policy: String,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            device_token_lifetime_s: 600,
            tls: false,
            heartbeat_s: 2,
            groups: Vec::new(),
            extra_policy: String::new(),
        }
    }
}

/// A hub directory, its broker and `tessera-hub serve`. Dropping it kills both.
#[derive(Debug)]
pub(crate) struct Hub {
    // First, so the hub dies before its broker.
    process: Option<ChildGuard>,
    pub(crate) dir: HubDir,
    pub(crate) broker: Broker,
    _pki: Option<TestPki>,
}

impl Hub {
    /// Makes a hub directory, starts its broker and the hub, and waits until it serves.
    pub(crate) async fn start(options: HubOptions) -> Result<Self> {
        let dir = HubDir::init("hub-agent-e2e")?;
        dir.replace_in_policy(
            "token_lifetime_s = 600",
            &format!("token_lifetime_s = {}", options.device_token_lifetime_s),
        )?;
        dir.append_to_policy(EXTRA_POLICY)?;
        dir.append_to_policy(&options.extra_policy)?;
        for (name, description) in &options.groups {
            dir.replace_in_policy(
                "building-a = \"Doors and sensors in building A\"",
                &format!(
                    "building-a = \"Doors and sensors in building A\"\n{name} = {description:?}"
                ),
            )?;
        }
        dir.run(&["policy", "check"])?;
        let pki = options.tls.then(TestPki::new).transpose()?;
        let mut builder = Broker::builder();
        if let Some(pki) = &pki {
            builder = builder.tls(pki);
        }
        let broker = builder.start()?;
        dir.replace_in_config("port = 1883", &format!("port = {}", broker.port()))?;
        dir.replace_in_config(
            "heartbeat_s = 30",
            &format!("heartbeat_s = {}", options.heartbeat_s),
        )?;
        if let Some(ca) = broker.ca_file() {
            dir.append_to_config(&format!("[mqtt.tls]\nca_file = \"{}\"\n", ca.display()))?;
        }
        let mut hub = Self {
            process: None,
            dir,
            broker,
            _pki: pki,
        };
        hub.spawn()?;
        hub.wait_until_serving().await?;
        Ok(hub)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = self.dir.command()?;
        command.arg("serve").env("RUST_LOG", "info");
        self.process = Some(ChildGuard::spawn_logged(
            &mut command,
            &self.dir.log_path(),
        )?);
        Ok(())
    }

    /// The MQTT settings of a client of this hub.
    pub(crate) fn mqtt(&self, id: &str) -> MqttConfig {
        let mut config = MqttConfig::plain(self.broker.host(), self.broker.port(), id);
        config.tls = self
            .broker
            .ca_file()
            .map(|ca| tessera_hub::mqtt::TlsConfig {
                ca_file: ca.to_path_buf(),
                client_cert_file: None,
                client_key_file: None,
            });
        config
    }

    /// A client of this hub as [`READY_CLIENT`], the operator every hub directory has.
    async fn ready_client(&self) -> Result<Client> {
        let key = keyfile::read_private(
            &self
                .dir
                .path()
                .join("keys")
                .join(format!("{READY_CLIENT}.pem")),
        )?;
        Client::connect(
            &self.mqtt(READY_CLIENT),
            READY_CLIENT,
            key,
            self.dir.trust_anchor(),
            Duration::from_secs(5),
        )
        .await
        .context("connecting the readiness client")
    }

    /// Polls with [`READINESS_PROBE`] until the hub answers, for at most 20 s.
    pub(crate) async fn wait_until_serving(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = self.ready_client().await?;
        let result = loop {
            match client
                .request(READINESS_PROBE, Duration::from_millis(300))
                .await
            {
                answer if answers_readiness_probe(&answer) => break Ok(()),
                Ok(other) => break Err(anyhow::anyhow!("unexpected answer {other:?}")),
                Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
                Err(e) => break Err(e.into()),
            }
        };
        client.close().await;
        result.with_context(|| format!("the hub did not serve in time; log:\n{}", self.log_tail()))
    }

    /// Everything the hub serves of `device`'s revocation stream (its partition), once it
    /// serves; fails if the stream has no change.
    pub(crate) async fn device_stream(&self, device: &str) -> Result<RevocationPage> {
        self.wait_until_serving().await?;
        let stream = Stream::of_device(device);
        let mut client = self.ready_client().await?;
        let page = fetch_stream(&mut client, &self.dir.trust_anchor(), &stream).await;
        client.close().await;
        page?.with_context(|| format!("{} has no change", stream.name()))
    }

    /// Kills the hub (SIGKILL: a crash).
    pub(crate) fn kill_9(&mut self) -> Result<()> {
        if let Some(mut child) = self.process.take() {
            child.kill_9()?;
        }
        Ok(())
    }

    /// Starts the hub again and waits until it serves.
    pub(crate) async fn restart(&mut self) -> Result<()> {
        self.kill_9()?;
        self.spawn()?;
        self.wait_until_serving().await
    }

    /// The end of the hub's log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Registers an operator.
    pub(crate) fn operator(&self, id: &str) -> Result<TestKey> {
        self.dir.add_operator(id, OPERATOR_ROLE)
    }

    /// `tessera-hub revoke --<what> <value>` as operator `op`; what it printed it did.
    pub(crate) fn revoke(
        &self,
        op: (&str, &TestKey),
        what: &str,
        value: &str,
    ) -> Result<RevokeCounts> {
        let mut args: Vec<String> = vec!["revoke".into()];
        args.extend(self.dir.identity_args(op.0, op.1));
        args.extend([format!("--{what}"), value.into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        RevokeCounts::from_cli(&self.dir.run(&refs)?)
    }

    /// `tessera-hub access-token` as app `app`: the token.
    pub(crate) fn access_token(
        &self,
        app: (&str, &TestKey),
        device: &str,
        scope: &str,
    ) -> Result<Vec<u8>> {
        let mut args: Vec<String> = vec!["access-token".into()];
        args.extend(self.dir.identity_args(app.0, app.1));
        args.extend([
            "--device".into(),
            device.into(),
            "--scope".into(),
            scope.into(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.dir.run(&refs)?;
        hex::decode(out.trim()).with_context(|| format!("access-token printed no hex: {out}"))
    }
}

/// A presentation of `token` to `audience`, signed by `holder`, issued `age_s` seconds ago.
pub(crate) fn present(
    token: &[u8],
    audience: &str,
    holder: &P256Signer,
    age_s: u64,
) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce)?;
    let presentation = Presentation {
        token,
        audience,
        issued_at: unix_now().saturating_sub(age_s),
        nonce,
    };
    let mut out = vec![0u8; 4096];
    let n = presentation
        .sign(holder, &mut out)
        .map_err(|e| anyhow::anyhow!("signing the presentation: {e}"))?;
    out.truncate(n);
    Ok(out)
}

/// Unix seconds.
pub(crate) fn unix_now() -> u64 {
    now_ms() / 1000
}

/// Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A token's `(iat, exp)`, its signature checked with `anchor`.
pub(crate) fn token_times(token: &[u8], anchor: &PublicKey) -> Result<(u64, u64)> {
    let claims = token::dangerous_verify_signature_only(token, anchor)
        .map_err(|e| anyhow::anyhow!("token does not verify: {e}"))?;
    Ok((claims.iat, claims.exp))
}

/// Tokens and grants the hub sent on a device's response topic.
pub(crate) fn issued_in(
    messages: &[tessera_tests::Message],
    anchor: &PublicKey,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut tokens, mut grants) = (Vec::new(), Vec::new());
    for m in messages {
        let Ok(signed) = SignedResponse::decode(&m.payload) else {
            continue;
        };
        let Ok(response) = signed.verify(anchor) else {
            continue;
        };
        if let Ok(ResponseBody::Token { token, grant }) = response.outcome {
            tokens.push(token.to_vec());
            if let Some((g, _)) = grant {
                grants.push(g.to_vec());
            }
        }
    }
    (tokens, grants)
}

/// One device: its directory, `agent.toml`, and the agent binary run against it.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) id: String,
    dir: TempDir,
    pub(crate) config: PathBuf,
    pub(crate) socket: PathBuf,
    anchor: PublicKey,
}

impl Device {
    /// A device directory for `id` talking to `hub`, with `extra` added to the top of its
    /// config (top-level keys).
    pub(crate) fn new(hub: &Hub, id: &str, extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tessera-agent-e2e-")
            .tempdir()
            .context("creating the device dir")?;
        let socket = dir.path().join("agent.sock");
        let tls = match hub.broker.ca_file() {
            Some(ca) => format!("\n[mqtt.tls]\nca_file = \"{}\"\n", ca.display()),
            None => String::new(),
        };
        let text = format!(
            "device_id = \"{id}\"\n\
             trust_anchor_file = \"{anchor}\"\n\
             socket = \"{socket}\"\n\
             request_timeout_ms = 1000\n\
             backoff_cap_ms = 3000\n\
             {extra}\n\
             [store]\n\
             dir = \"state\"\n\
             [mqtt]\n\
             host = \"127.0.0.1\"\n\
             port = {port}\n\
             {tls}",
            anchor = hub.dir.trust_anchor_path().display(),
            socket = socket.display(),
            port = hub.broker.port(),
        );
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).context("writing agent.toml")?;
        Ok(Self {
            id: id.to_string(),
            config,
            socket,
            anchor: hub.dir.trust_anchor(),
            dir,
        })
    }

    /// The device directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The store directory.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `tessera-agent -c agent.toml <args>`.
    pub(crate) fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera-agent"));
        c.arg("-c").arg(&self.config).env("RUST_LOG", "info");
        c
    }

    /// Runs a command to completion (at most 90 s).
    pub(crate) fn output(&self, args: &[&str]) -> Result<Output> {
        let mut child = self
            .command()
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("spawning tessera-agent")?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tessera-agent {args:?} did not finish within 90 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs a command that must succeed; its stdout.
    pub(crate) fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        ensure!(
            out.status.success(),
            "tessera-agent {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Enrolls (with `code` when given).
    pub(crate) fn enroll(&self, code: Option<&str>) -> Result<String> {
        match code {
            Some(code) => self.run_ok(&["enroll", "--code", code, "--timeout-s", "30"]),
            None => self.run_ok(&["enroll", "--timeout-s", "30"]),
        }
    }

    /// Starts `tessera-agent run`, logging to `agent.log` in the device directory, and
    /// waits until it answers on its socket.
    pub(crate) fn spawn(&self) -> Result<ChildGuard> {
        let mut command = self.command();
        command.arg("run");
        let mut child = ChildGuard::spawn_logged(&mut command, &self.log_path())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ask("STATUS").is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("the agent exited ({status}):\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not open its socket:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// The agent's log file.
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Everything the agent logged (every run).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// One request on the socket; the reply line.
    pub(crate) fn ask(&self, line: &str) -> Result<String> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&stream).write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        ensure!(!reply.is_empty(), "no reply");
        Ok(reply.trim_end().to_string())
    }

    /// The running agent's status.
    pub(crate) fn status(&self) -> Result<serde_json::Value> {
        let reply = self.ask("STATUS")?;
        let json = reply
            .strip_prefix("OK ")
            .with_context(|| format!("STATUS: {reply}"))?;
        Ok(serde_json::from_str(json)?)
    }

    /// Waits (at most `timeout`) until `check` holds for the running agent's status.
    pub(crate) fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status()
                && check(&s)
            {
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "agent status never showed {what} within {timeout:?}: {:?}\nlog:\n{}",
                self.status().ok(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The device token from the socket.
    pub(crate) fn token(&self) -> Result<Vec<u8>> {
        let reply = self.ask("TOKEN")?;
        let hex_text = reply
            .strip_prefix("OK ")
            .with_context(|| format!("TOKEN: {reply}"))?;
        Ok(hex::decode(hex_text)?)
    }

    /// `(iat, exp)` of a token of this device's hub.
    pub(crate) fn times(&self, token: &[u8]) -> Result<(u64, u64)> {
        token_times(token, &self.anchor)
    }

    /// Every file under the device directory (store, key, config, log), with its contents.
    pub(crate) fn files(&self) -> Result<Vec<(PathBuf, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                let meta = std::fs::symlink_metadata(&path)?;
                if meta.is_dir() {
                    dirs.push(path);
                } else if meta.is_file() {
                    out.push((path.clone(), std::fs::read(&path)?));
                }
            }
        }
        Ok(out)
    }
}

/// What one sample of the device token over the socket showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sample {
    /// A token valid at the sample time, with its expiry (Unix seconds).
    Valid(u64),
    /// No valid token: the agent's reason, or an expired token.
    Lapse(String),
    /// The agent did not answer (it is not running).
    Down,
}

/// Samples a device's token every `every` on a thread until stopped.
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    samples: std::sync::Arc<std::sync::Mutex<Vec<(u64, Sample)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling `socket`; tokens are checked with `anchor`.
    pub(crate) fn start(socket: PathBuf, anchor: PublicKey, every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, taken) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let at = now_ms();
                let s = sample(&socket, &anchor, at);
                taken
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((at, s));
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// How many samples were taken so far.
    pub(crate) fn len(&self) -> usize {
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Stops and returns every sample with its local time (ms).
    pub(crate) fn finish(mut self) -> Vec<(u64, Sample)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

fn sample(socket: &Path, anchor: &PublicKey, at_ms: u64) -> Sample {
    let ask = || -> std::io::Result<String> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        (&stream).write_all(b"TOKEN\n")?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply.trim_end().to_string())
    };
    match ask() {
        Err(_) => Sample::Down,
        Ok(reply) if reply.is_empty() => Sample::Down,
        Ok(reply) => match reply.strip_prefix("OK ").map(hex::decode) {
            Some(Ok(token)) => match token_times(&token, anchor) {
                Ok((_, exp)) if exp.saturating_mul(1000) > at_ms => Sample::Valid(exp),
                Ok((_, exp)) => Sample::Lapse(format!("served a token that expired at {exp}")),
                Err(e) => Sample::Lapse(format!("served a bad token: {e}")),
            },
            _ => Sample::Lapse(reply),
        },
    }
}
