//! The broker and the hub a run starts for itself: a Mosquitto on a free loopback port and
//! a `tessera-hub` made with `init` in a temporary directory, the fleet registered with one
//! `device import`, then `serve`. Both are child processes stopped when their guards drop;
//! the directory goes with the [`tempfile::TempDir`] that holds it.
//!
//! Setup blocks the calling thread (bounded polls on what the programs show: the broker's
//! log, the hub's subscription); call it from a blocking task.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_shared::crypto::PublicKey;

use crate::Error;

/// The only address the simulator binds or connects to when it runs its own broker.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Where Debian's `mosquitto` package installs the broker; `$MOSQUITTO` overrides it.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The hub id of the hub the simulator starts.
pub const HUB_ID: &str = "sim-hub";

/// The device role and group of the default policy the fleet is registered with.
pub const DEVICE_ROLE: &str = "sensor";
/// See [`DEVICE_ROLE`].
pub const DEVICE_GROUP: &str = "building-a";
/// The second group `init` declares in the policy: devices the `revoke` scenario revokes
/// with one `revoke --group`.
pub const REVOKE_GROUP: &str = "sim-revoke";
/// The operator (role `ops` of the default policy) that revokes, and its role.
pub const OPERATOR: &str = "sim-operator";
/// See [`OPERATOR`].
pub const OPERATOR_ROLE: &str = "ops";

/// How long Mosquitto may take to listen, and the hub to subscribe.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(50);

/// A child process stopped (SIGTERM, then SIGKILL after a grace period) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl ChildGuard {
    fn spawn(command: &mut Command, name: &'static str, log: PathBuf) -> Result<Self, Error> {
        let file = std::fs::File::create(&log).map_err(Error::file(&log))?;
        let err = file.try_clone().map_err(Error::file(&log))?;
        use std::os::unix::process::CommandExt as _;
        let child = command
            // Its own process group: a Ctrl-C on the terminal reaches the simulator only,
            // which then stops the devices before the hub and the broker, in that order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::Process(format!("cannot start {name}: {e}")))?;
        Ok(Self { child, name, log })
    }

    /// Fails with the log's tail if the process has exited.
    fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Process(format!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail(&self.log, 20)
            ))),
            Err(e) => Err(Error::Process(format!("{}: {e}", self.name))),
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM through `kill`), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let asked = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if asked {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(POLL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A binary the run needs, and how it was found (reported in the summary).
#[derive(Debug, Clone)]
pub struct Located {
    /// Its path.
    pub path: PathBuf,
    /// How it was found: `flag`, `next to the executable`, `CARGO_TARGET_DIR`,
    /// `cargo metadata`, `PATH`.
    pub how: &'static str,
}

/// Finds `tessera-hub`: `given` (the `--hub-bin` flag or `$TESSERA_HUB_BIN`), else next to
/// the running executable (or one directory up, from a test's `deps/`), else in
/// `$CARGO_TARGET_DIR/{debug,release}`, else in the target directory `cargo metadata`
/// names. It is not built here: `cargo build -p tessera-hub` first.
pub fn locate_hub(given: Option<PathBuf>) -> Result<Located, Error> {
    const NAME: &str = "tessera-hub";
    if let Some(path) = given {
        return if path.is_file() {
            Ok(Located { path, how: "flag" })
        } else {
            Err(Error::BinaryNotFound {
                name: NAME.into(),
                looked: format!("{} is not a file", path.display()),
            })
        };
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let mut dirs = vec![dir.to_path_buf()];
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(up) = dir.parent()
        {
            dirs.push(up.to_path_buf());
        }
        for d in dirs {
            let path = d.join(NAME);
            if path.is_file() {
                return Ok(Located {
                    path,
                    how: "next to the executable",
                });
            }
            looked.push(path);
        }
    }
    let in_target = |target: &Path, looked: &mut Vec<PathBuf>| {
        ["debug", "release"].into_iter().find_map(|profile| {
            let path = target.join(profile).join(NAME);
            if path.is_file() {
                Some(path)
            } else {
                looked.push(path);
                None
            }
        })
    };
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR")
        && let Some(path) = in_target(Path::new(&target), &mut looked)
    {
        return Ok(Located {
            path,
            how: "CARGO_TARGET_DIR",
        });
    }
    if let Some(target) = cargo_target_dir()
        && let Some(path) = in_target(&target, &mut looked)
    {
        return Ok(Located {
            path,
            how: "cargo metadata",
        });
    }
    let mut text = String::from("looked at");
    for p in &looked {
        let _ = write!(text, " {}", p.display());
    }
    text.push_str(
        "; build it (`cargo build -p tessera-hub`) or name it with --hub-bin / TESSERA_HUB_BIN",
    );
    Err(Error::BinaryNotFound {
        name: NAME.into(),
        looked: text,
    })
}

/// The target directory of the workspace around the current directory, as
/// `cargo metadata` reports it.
fn cargo_target_dir() -> Option<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    json.get("target_directory")?.as_str().map(PathBuf::from)
}

/// Finds Mosquitto: `given` (`--mosquitto` or `$MOSQUITTO`), else [`MOSQUITTO`], else
/// `mosquitto` on the `PATH`.
pub fn locate_mosquitto(given: Option<PathBuf>) -> Result<Located, Error> {
    if let Some(path) = given {
        return Ok(Located { path, how: "flag" });
    }
    if Path::new(MOSQUITTO).is_file() {
        return Ok(Located {
            path: MOSQUITTO.into(),
            how: "default path",
        });
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .map(|path| Located { path, how: "PATH" })
        .ok_or_else(|| Error::BinaryNotFound {
            name: "mosquitto".into(),
            looked: format!(
                "not at {MOSQUITTO} nor on the PATH: install the `mosquitto` package \
                 (Debian: apt-get install mosquitto) or set MOSQUITTO"
            ),
        })
}

/// A Mosquitto of the run's own, on a free loopback port.
#[derive(Debug)]
pub struct Broker {
    child: ChildGuard,
    port: u16,
    log: PathBuf,
    program: PathBuf,
    dir: PathBuf,
}

impl Broker {
    /// Starts Mosquitto in `dir` on a port the OS just picked, retrying with a new port if
    /// someone else took it first.
    pub fn start(program: &Path, dir: &Path) -> Result<Self, Error> {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::start_on(program, dir, free_port()?) {
                Ok(broker) => return Ok(broker),
                Err(Startup::PortTaken(why)) => last = why,
                Err(Startup::Failed(e)) => return Err(e),
            }
        }
        Err(Error::Process(format!("mosquitto did not start: {last}")))
    }

    /// Stops it (SIGTERM) and starts it again on the same port, with a fresh log; clients
    /// must reconnect. The port may stay taken for a moment after the old broker exits,
    /// so binding is retried for a few seconds.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start_on(&self.program, &self.dir, self.port) {
                Ok(broker) => {
                    *self = broker;
                    return Ok(());
                }
                Err(Startup::PortTaken(why)) if Instant::now() < deadline => {
                    let _ = why;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(Startup::PortTaken(why)) => {
                    return Err(Error::Process(format!(
                        "mosquitto could not listen on port {} again: {why}",
                        self.port
                    )));
                }
                Err(Startup::Failed(e)) => return Err(e),
            }
        }
    }

    fn start_on(program: &Path, dir: &Path, port: u16) -> Result<Self, Startup> {
        let config = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let _ = std::fs::remove_file(&log);
        std::fs::write(&config, mosquitto_conf(port, &log))
            .map_err(|e| Startup::Failed(Error::file(&config)(e)))?;
        let mut child = ChildGuard::spawn(
            Command::new(program).arg("-c").arg(&config),
            "mosquitto",
            dir.join("mosquitto.stderr"),
        )
        .map_err(Startup::Failed)?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = SocketAddr::from((LOOPBACK, port));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Err(e) = child.check_alive() {
                let why = format!("{e}\n{}", tail(&log, 10));
                return Err(if why.contains("Address already in use") {
                    Startup::PortTaken(why)
                } else {
                    Startup::Failed(Error::Process(format!("mosquitto did not start: {why}")))
                });
            }
            // "running" is logged once every listener is bound.
            if text.contains(" running")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(Self {
                    child,
                    port,
                    log,
                    program: program.to_path_buf(),
                    dir: dir.to_path_buf(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Startup::Failed(Error::Process(format!(
                    "mosquitto did not listen on {addr} within {STARTUP_TIMEOUT:?}:\n{}",
                    tail(&log, 10)
                ))));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Its port on [`LOOPBACK`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Stops it.
    pub fn stop(&mut self) {
        self.child.stop(Duration::from_secs(5));
    }

    /// Waits until the broker logs a subscription of `client` to a topic containing
    /// `topic_part` (at most [`STARTUP_TIMEOUT`]).
    pub fn await_subscription(&self, client: &str, topic_part: &str) -> Result<(), Error> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let client = format!(" {client} ");
            if text
                .lines()
                .any(|l| l.contains(&client) && l.contains(topic_part))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Process(format!(
                    "the broker did not log a subscription of {client} to {topic_part} within \
                     {STARTUP_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Why one attempt to start Mosquitto failed.
enum Startup {
    /// The port was taken: another port (or a later try) may do.
    PortTaken(String),
    /// Anything else.
    Failed(Error),
}

fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((LOOPBACK, 0))
        .map_err(|e| Error::Process(format!("cannot bind a loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Process(format!("cannot read a loopback port: {e}")))
}

fn mosquitto_conf(port: u16, log: &Path) -> String {
    format!(
        "# firmware-sim's own broker: loopback only, anonymous, no persistence.\n\
         user root\n\
         per_listener_settings false\n\
         persistence false\n\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n\
         log_type subscribe\n\
         connection_messages false\n\
         # Without it a loopback round trip waits on Nagle + delayed ACK (DESIGN.md).\n\
         set_tcp_nodelay true\n\
         max_packet_size 131072\n\
         allow_anonymous true\n\
         listener {port} {LOOPBACK}\n\
         # No cap on clients (a fleet of 10,000 is 10,000 connections); the open-file limit\n\
         # it inherits from the simulator, raised to the hard limit, is the real one.\n\
         max_connections -1\n",
        log = log.display()
    )
}

/// A hub directory made by `tessera-hub init`, and later the serving hub.
#[derive(Debug)]
pub struct Hub {
    bin: PathBuf,
    dir: PathBuf,
    serving: Option<ChildGuard>,
    /// How many times `serve` started it (each start logs to its own file).
    starts: u32,
}

impl Hub {
    /// `tessera-hub init --dir <dir>/hub`, then the device role's token lifetime set to
    /// `lifetime_s` in its policy.
    pub fn init(bin: &Path, dir: &Path, lifetime_s: u64) -> Result<Self, Error> {
        let hub = Self {
            bin: bin.to_path_buf(),
            dir: dir.join("hub"),
            serving: None,
            starts: 0,
        };
        run_checked(
            Command::new(bin)
                .arg("init")
                .arg("--dir")
                .arg(&hub.dir)
                .args(["--hub-id", HUB_ID]),
            "tessera-hub init",
        )?;
        let policy = hub.dir.join("policy.toml");
        let text = std::fs::read_to_string(&policy).map_err(Error::file(&policy))?;
        // The default policy's sensor role sets its own lifetime (the first such line).
        let from = "\ntoken_lifetime_s = 600\n";
        if !text.contains(from) {
            return Err(Error::Process(format!(
                "{} has no `token_lifetime_s = 600` for the {DEVICE_ROLE} role: the default \
                 policy changed, update firmware-sim",
                policy.display()
            )));
        }
        let text = text.replacen(from, &format!("\ntoken_lifetime_s = {lifetime_s}\n"), 1);
        // A second group, for the devices the `revoke` scenario revokes as a group.
        let groups = "\n[groups]\n";
        if !text.contains(groups) {
            return Err(Error::Process(format!(
                "{} has no [groups] table: the default policy changed, update firmware-sim",
                policy.display()
            )));
        }
        let text = text.replacen(
            groups,
            &format!("{groups}{REVOKE_GROUP} = \"Devices firmware-sim revokes as a group\"\n"),
            1,
        );
        std::fs::write(&policy, text).map_err(Error::file(&policy))?;
        hub.relax_quarantine()?;
        Ok(hub)
    }

    /// Takes `refusals` and `grant_reuse` out of the hub's `anomaly.quarantine_on` (a hub
    /// without anomaly detection has no such line, and nothing changes):
    /// - `refusals` counts requests anyone can publish on a client's topic; the hub's
    ///   config says to keep it only behind a broker ACL, and the simulator's broker has
    ///   none (the `malicious` attacker would get its victims quarantined);
    /// - `grant_reuse`: firmware whose flash write was cut by power loss boots with the
    ///   previous record and presents its spent grant once, then asks with its key alone
    ///   (docs/DEVICE.md); quarantining it for that would turn every power cut into a
    ///   lapse of `quarantine_s`.
    fn relax_quarantine(&self) -> Result<(), Error> {
        let config = self.config();
        let text = std::fs::read_to_string(&config).map_err(Error::file(&config))?;
        let Some(line) = text
            .lines()
            .find(|l| l.trim_start().starts_with("quarantine_on"))
        else {
            return Ok(());
        };
        let relaxed = "quarantine_on = [\"not_granted\"]";
        let text = text.replacen(line, relaxed, 1);
        std::fs::write(&config, text).map_err(Error::file(&config))
    }

    fn config(&self) -> PathBuf {
        self.dir.join("tessera-hub.toml")
    }

    /// The hub's trust anchor, from the `trust-anchor.pem` init wrote.
    pub fn trust_anchor(&self) -> Result<PublicKey, Error> {
        let path = self.dir.join("trust-anchor.pem");
        let pem = std::fs::read_to_string(&path).map_err(Error::file(&path))?;
        anchor_from_pem(&pem, &path.display().to_string())
    }

    /// Registers `ids` (role [`DEVICE_ROLE`], group [`DEVICE_GROUP`], or
    /// [`REVOKE_GROUP`] for those `in_revoke_group` says) with one `device import`, each
    /// with a one-time enrollment code; returns `(id, code)` pairs.
    pub fn import(
        &self,
        ids: &[String],
        in_revoke_group: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, String)>, Error> {
        device_import(&self.bin, &self.config(), &self.dir, ids, |id| {
            (
                DEVICE_ROLE,
                if in_revoke_group(id) {
                    REVOKE_GROUP
                } else {
                    DEVICE_GROUP
                },
            )
        })
    }

    /// `tessera-hub serve` against `broker`; returns once the broker logs a new
    /// subscription of the hub to the request topics (one more than before the start, so
    /// a restart waits for its own). The first start logs to `hub.log`, the next ones to
    /// `hub-2.log`, `hub-3.log`...
    pub fn serve(&mut self, broker: &Broker) -> Result<(), Error> {
        let before = hub_subscriptions(broker);
        self.starts += 1;
        let log = if self.starts == 1 {
            self.dir.join("hub.log")
        } else {
            self.dir.join(format!("hub-{}.log", self.starts))
        };
        let mut child = ChildGuard::spawn(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config())
                .arg("serve")
                .args(["--mqtt-port", &broker.port().to_string()])
                .env("RUST_LOG", "info"),
            "tessera-hub serve",
            log.clone(),
        )?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            child.check_alive()?;
            if hub_subscriptions(broker) > before {
                self.serving = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Process(format!(
                    "the hub did not subscribe within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    tail(&log, 20)
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the broker (restarted: a fresh log) logs the running hub's
    /// subscription again, as it does once it has reconnected.
    pub fn await_resubscribed(&mut self, broker: &Broker) -> Result<(), Error> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while hub_subscriptions(broker) == 0 {
            if let Some(child) = self.serving.as_mut() {
                child.check_alive()?;
            }
            if Instant::now() >= deadline {
                return Err(Error::Process(format!(
                    "the hub did not subscribe again within {STARTUP_TIMEOUT:?} after the \
                     broker restarted"
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Kills the serving hub at once (SIGKILL): no drain, no goodbye, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.serving.take() {
            child.kill();
        }
    }

    /// Registers [`OPERATOR`] (role [`OPERATOR_ROLE`]) with a key made by
    /// `tessera-hub keygen`.
    pub fn add_operator(&self) -> Result<(), Error> {
        let key = self.operator_key();
        run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config())
                .arg("keygen")
                .arg(&key),
            "tessera-hub keygen",
        )?;
        let mut public = key.into_os_string();
        public.push(".pub");
        run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config())
                .args([
                    "operator",
                    "add",
                    OPERATOR,
                    "--role",
                    OPERATOR_ROLE,
                    "--key",
                ])
                .arg(public),
            "tessera-hub operator add",
        )?;
        Ok(())
    }

    /// Registers app `id` with `role` and the SPKI PEM public key in `public_pem`.
    pub fn add_app(&self, id: &str, role: &str, public_pem: &str) -> Result<(), Error> {
        let key = self.dir.join(format!("{id}.pub"));
        std::fs::write(&key, public_pem).map_err(Error::file(&key))?;
        run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config())
                .args(["app", "add", id, "--role", role, "--key"])
                .arg(&key),
            "tessera-hub app add",
        )
        .map(drop)
    }

    /// Sets the hub's revocation heartbeat interval (`serve.heartbeat_s`), so devices
    /// hold fresh revocation knowledge within a short run.
    pub fn set_heartbeat(&self, seconds: u64) -> Result<(), Error> {
        let config = self.config();
        let text = std::fs::read_to_string(&config).map_err(Error::file(&config))?;
        let from = "\nheartbeat_s = 30\n";
        if !text.contains(from) {
            return Err(Error::Process(format!(
                "{} has no `heartbeat_s = 30`: the default config changed, update firmware-sim",
                config.display()
            )));
        }
        let text = text.replacen(from, &format!("\nheartbeat_s = {seconds}\n"), 1);
        std::fs::write(&config, text).map_err(Error::file(&config))
    }

    fn operator_key(&self) -> PathBuf {
        self.dir.join("operator.pem")
    }

    /// `tessera-hub revoke` as [`OPERATOR`] through `broker`, with `what` (`--group G`,
    /// `--device ID`); returns once the hub answered that the revocation is durable.
    pub fn revoke(&self, broker: &Broker, what: &[&str]) -> Result<(), Error> {
        run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(self.config())
                .args(["revoke", "--as", OPERATOR, "--key"])
                .arg(self.operator_key())
                .arg("--trust-anchor")
                .arg(self.dir.join("trust-anchor.pem"))
                .args(["--mqtt-port", &broker.port().to_string()])
                .args(what),
            "tessera-hub revoke",
        )
        .map(drop)
    }

    /// The serving hub's process id.
    pub fn pid(&self) -> Option<u32> {
        self.serving.as_ref().map(ChildGuard::id)
    }

    /// Whether the serving hub still runs.
    pub fn is_running(&mut self) -> bool {
        self.serving
            .as_mut()
            .is_some_and(|c| c.check_alive().is_ok())
    }

    /// Stops the serving hub (SIGTERM: it drains and disconnects).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.serving.take() {
            child.stop(Duration::from_secs(10));
        }
    }
}

/// Registers `ids` with one `tessera-hub --config <config> device import`, each with the
/// role and group `place` gives it and a one-time enrollment code; the CSV file and the
/// codes go to `work`. Returns `(id, code)` pairs.
pub fn device_import<'a>(
    bin: &Path,
    config: &Path,
    work: &Path,
    ids: &[String],
    place: impl Fn(&str) -> (&'a str, &'a str),
) -> Result<Vec<(String, String)>, Error> {
    let csv = work.join("fleet.csv");
    let codes = work.join("codes.csv");
    let mut text = String::from("id,role,group,key\n");
    for id in ids {
        let (role, group) = place(id);
        let _ = writeln!(text, "{id},{role},{group},");
    }
    std::fs::write(&csv, text).map_err(Error::file(&csv))?;
    run_checked(
        Command::new(bin)
            .arg("--config")
            .arg(config)
            .args(["device", "import"])
            .arg(&csv)
            .arg("--codes")
            .arg(&codes),
        "tessera-hub device import",
    )?;
    let written = std::fs::read_to_string(&codes).map_err(Error::file(&codes))?;
    let pairs: Vec<(String, String)> = written
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(id, code)| (id.to_string(), code.trim().to_string()))
        .collect();
    if pairs.len() != ids.len() {
        return Err(Error::Process(format!(
            "device import wrote {} codes for {} devices ({})",
            pairs.len(),
            ids.len(),
            codes.display()
        )));
    }
    Ok(pairs)
}

/// The P-256 key of the first SPKI PEM block in `text` (from a file, or the output of
/// `tessera-hub trust-anchor`), as the hub's trust anchor; `what` names where it came from.
pub fn anchor_from_pem(text: &str, what: &str) -> Result<PublicKey, Error> {
    use p256::pkcs8::DecodePublicKey as _;
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let block = text
        .find(BEGIN)
        .and_then(|from| {
            text[from..]
                .find(END)
                .map(|to| &text[from..from + to + END.len()])
        })
        .ok_or_else(|| Error::Process(format!("{what}: no SPKI PEM public key")))?;
    let key = p256::PublicKey::from_public_key_pem(block)
        .map_err(|e| Error::Process(format!("{what}: not a P-256 SPKI PEM key: {e}")))?;
    PublicKey::from_sec1(&key.to_sec1_bytes()).map_err(Error::Core)
}

/// How many subscriptions of the hub to its request topics the broker has logged.
fn hub_subscriptions(broker: &Broker) -> usize {
    std::fs::read_to_string(broker.log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" tessera-hub ") && l.contains("tessera/v1/"))
        .count()
}

/// Runs a command to completion; fails with its output unless it succeeds.
pub fn run_checked(command: &mut Command, what: &str) -> Result<String, Error> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Process(format!("cannot run {what}: {e}")))?;
    if !output.status.success() {
        return Err(Error::Process(format!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
