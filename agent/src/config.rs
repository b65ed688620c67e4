//! The agent's configuration: one TOML file, typed and validated once, unknown keys refused;
//! then environment variables, then command-line flags, each overriding the one before
//! ([`Overrides`], filled by clap from both).
//!
//! Relative paths in the file are relative to the file's own directory. The file paths of
//! the store default to names inside `[store] dir`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tessera_mqtt::{MqttConfig, TlsConfig};
use tessera_shared::agent::AgentConfig;
use tessera_shared::claims::MAX_AUDIENCE_LEN;
use tessera_shared::message::{EnrollmentCode, validate_id};
use tessera_shared::schedule::Backoff;
use zeroize::Zeroizing;

use crate::error::Error;

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tessera-agent/agent.toml";

/// The fully commented default configuration (`tessera-agent default-config`).
pub const DEFAULT_TOML: &str = r#"# tessera-agent configuration. Every option is shown with its default; only
# `device_id` has none. Relative paths are relative to the directory of this file.
# Environment variables and command-line flags override the file (file, then environment,
# then flags); the ones that exist are named below.

# This device's id: its MQTT client id, the `sub` of its device token and the audience
# of the access tokens apps present to it. 1 to 64 of A-Z a-z 0-9 . _ -
# (TESSERA_AGENT_DEVICE_ID, --device-id)
device_id = "device-1"

# The `aud` the hub puts in device tokens: the hub policy's `device_audience`.
audience = "tessera"

# The device's P-256 private key (PKCS#8 PEM, mode 0600). `enroll` creates it when it does
# not exist; put the key there first to enroll with a key the operator registered.
# Default: "<store.dir>/device-key.pem".
# key_file = "/var/lib/tessera-agent/device-key.pem"

# The hub's trust anchor: its public signing key (SPKI PEM), as `tessera-hub init` wrote
# it to trust-anchor.pem. Provisioned out of band, never learned over MQTT.
trust_anchor_file = "/etc/tessera-agent/trust-anchor.pem"

# The one-time enrollment code the operator printed with
# `tessera-hub device add ID --enrollment-code`, if the device enrolls with one. Prefer
# `enroll --code` or TESSERA_AGENT_ENROLLMENT_CODE so the code is never on disk at all;
# the agent keeps only the key derived from it, in memory, and only during `enroll`.
# enrollment_code = "ABCDE-FGHJK-LMNPQ-RSTUV"

# Whether the local clock is right (NTP, a real-time clock). When false the agent takes
# the hub's time from every verified, nonce-bound response and uses it for token expiry,
# refresh times and presentations. (TESSERA_AGENT_TRUST_LOCAL_CLOCK, --trust-local-clock)
trust_local_clock = false

# Clock-skew leeway for token, presentation and revocation times, seconds.
leeway_s = 30

# A request without an answer within this many milliseconds counts as failed and is retried.
request_timeout_ms = 10000

# Retries after a failure: capped exponential backoff with full jitter, starting at
# backoff_base_ms and doubling up to backoff_cap_ms (and never later than halfway to the
# held token's expiry).
backoff_base_ms = 500
backoff_cap_ms = 60000

# `verify` refuses presentations once the revocation knowledge is older than the max_age
# the hub announces in each signed heartbeat: two to three heartbeat intervals, and no more
# than half the shortest access token lifetime, so a broker that suppresses revocations
# shows up before a revoked token has lived out much of its life (90 s until the first
# heartbeat arrives). Set, the smaller of this and the hub's applies, in seconds: it can
# only make the agent stricter, and a larger value is ignored.
# revocation_max_age_s = 60

# How far a presentation's issued_at may be from now, seconds.
presentation_window_s = 60

# The local interface for device programs: a Unix socket (mode 0660) with a line protocol
# (docs/DEVICE.md). (TESSERA_AGENT_SOCKET, --socket)
socket = "/run/tessera-agent/agent.sock"

# Where `run` keeps the agent's facts as Prometheus metrics (token validity, seconds to
# expiry, refresh failures, revocation freshness; docs/METRICS.md), for node_exporter's
# textfile collector: rewritten whole every 15 s and when the agent stops. Unset: no file
# (`tessera-agent status --prometheus` prints the same any time).
# metrics_textfile = "/var/lib/node_exporter/textfile_collector/tessera-agent.prom"

[store]
# Where the encrypted token store lives (created with mode 0700).
# (TESSERA_AGENT_STATE_DIR, --state-dir)
dir = "/var/lib/tessera-agent"
# The encrypted record holding the device token, refresh grant and trusted key set.
# Default: "<dir>/store.tsr".
# record_file = "/var/lib/tessera-agent/store.tsr"
# The highest record counter written, for rollback detection. Put it where an attacker
# cannot roll it back together with the record (another partition, a mount backed by a
# monotonic counter); see the threat model in docs/DEVICE.md. Default: "<dir>/store.counter".
# counter_file = "/var/lib/tessera-agent/store.counter"
# The device secret the store key is derived from (32 random bytes, mode 0600, created by
# `enroll`). On real hardware, derive it from a secure element instead.
# Default: "<dir>/device-secret".
# device_secret_file = "/var/lib/tessera-agent/device-secret"

[mqtt]
# Broker address. (TESSERA_AGENT_MQTT_HOST / --mqtt-host, TESSERA_AGENT_MQTT_PORT / --mqtt-port)
host = "127.0.0.1"
# 1883 for plain MQTT, 8883 for TLS.
port = 1883
# Broker credentials, if the broker requires them. The MQTT client id is always device_id.
# username = "device-1"
# password = "..."
# Keep-alive interval, seconds.
keep_alive_s = 30
# Seconds the broker keeps this device's MQTT session while it is offline (MQTT 5 session
# expiry): its subscriptions stay and QoS 1 messages, such as a revocation on its control
# topic, are queued for it. 0 starts a clean session on every connection.
session_expiry_s = 3600
# MQTT version: "5", or "3.1.1" for brokers that speak only 3.1.1. Over 3.1.1 a kept
# session (session_expiry_s above 0) has no expiry of its own: the broker decides.
version = "5"

# TLS to the broker (rustls). Uncomment to enable.
# [mqtt.tls]
# ca_file = "/etc/tessera-agent/broker-ca.pem"     # CA that signed the broker's certificate
# client_cert_file = "/etc/tessera-agent/cert.pem" # optional: client certificate (mTLS)
# client_key_file = "/etc/tessera-agent/key.pem"   # optional: its private key
"#;

/// The file as written; see [`DEFAULT_TOML`] for what each key means.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    device_id: String,
    #[serde(default = "default_audience")]
    audience: String,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default = "default_trust_anchor")]
    trust_anchor_file: PathBuf,
    #[serde(default)]
    enrollment_code: Option<String>,
    #[serde(default)]
    trust_local_clock: bool,
    #[serde(default = "default_leeway")]
    leeway_s: u64,
    #[serde(default = "default_request_timeout")]
    request_timeout_ms: u64,
    #[serde(default = "default_backoff_base")]
    backoff_base_ms: u64,
    #[serde(default = "default_backoff_cap")]
    backoff_cap_ms: u64,
    #[serde(default)]
    revocation_max_age_s: Option<u64>,
    #[serde(default = "default_presentation_window")]
    presentation_window_s: u64,
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default)]
    metrics_textfile: Option<PathBuf>,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    mqtt: MqttSection,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoreSection {
    dir: PathBuf,
    record_file: Option<PathBuf>,
    counter_file: Option<PathBuf>,
    device_secret_file: Option<PathBuf>,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/tessera-agent"),
            record_file: None,
            counter_file: None,
            device_secret_file: None,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MqttSection {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    keep_alive_s: u64,
    session_expiry_s: u32,
    tls: Option<TlsConfig>,
    version: tessera_mqtt::MqttVersion,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            keep_alive_s: 30,
            session_expiry_s: 3600,
            tls: None,
            version: tessera_mqtt::MqttVersion::V5,
        }
    }
}

fn default_audience() -> String {
    "tessera".into()
}
fn default_trust_anchor() -> PathBuf {
    PathBuf::from("/etc/tessera-agent/trust-anchor.pem")
}
fn default_leeway() -> u64 {
    tessera_shared::token::DEFAULT_LEEWAY
}
fn default_request_timeout() -> u64 {
    tessera_shared::agent::DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_backoff_base() -> u64 {
    Backoff::default().base_ms
}
fn default_backoff_cap() -> u64 {
    Backoff::default().cap_ms
}
fn default_presentation_window() -> u64 {
    tessera_shared::agent::DEFAULT_PRESENTATION_WINDOW_S
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/tessera-agent/agent.sock")
}

/// Values from the environment or the command line that replace the file's (clap reads
/// each from its flag, else from its environment variable).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `device_id`.
    pub device_id: Option<String>,
    /// `[mqtt] host`.
    pub mqtt_host: Option<String>,
    /// `[mqtt] port`.
    pub mqtt_port: Option<u16>,
    /// `[store] dir`.
    pub state_dir: Option<PathBuf>,
    /// `socket`.
    pub socket: Option<PathBuf>,
    /// `trust_local_clock`.
    pub trust_local_clock: Option<bool>,
}

/// The store's files, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePaths {
    /// The directory holding them (created with mode 0700).
    pub dir: PathBuf,
    /// The encrypted record.
    pub record: PathBuf,
    /// The highest record counter written.
    pub counter: PathBuf,
    /// The device secret the record key is derived from.
    pub device_secret: PathBuf,
    /// Written when the device is revoked (no secret inside), so the agent can say why it
    /// has no store.
    pub revoked_marker: PathBuf,
}

/// The validated configuration, every path resolved.
#[derive(Clone)]
pub struct Config {
    /// This device's id.
    pub device_id: String,
    /// The audience of its device tokens.
    pub audience: String,
    /// The device's private key (PKCS#8 PEM).
    pub key_file: PathBuf,
    /// The hub's public key (SPKI PEM).
    pub trust_anchor_file: PathBuf,
    /// The enrollment code from the file, if any. Only ever turned into its derived key.
    enrollment_code: Option<Zeroizing<String>>,
    /// Whether the local clock is trusted.
    pub trust_local_clock: bool,
    /// Clock-skew leeway, seconds.
    pub leeway_s: u64,
    /// Request timeout, ms.
    pub request_timeout_ms: u64,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Maximum age of revocation knowledge for `verify`, seconds, when stricter than the
    /// hub's announced one (the smaller applies); `None` follows the hub.
    pub revocation_max_age_s: Option<u64>,
    /// Presentation window, seconds.
    pub presentation_window_s: u64,
    /// The local socket.
    pub socket: PathBuf,
    /// Where `run` keeps the Prometheus metrics textfile, if anywhere.
    pub metrics_textfile: Option<PathBuf>,
    /// The store's files.
    pub store: StorePaths,
    /// The broker connection (client id = device id).
    pub mqtt: MqttConfig,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The enrollment code and the broker password are secrets: never print them.
        f.debug_struct("Config")
            .field("device_id", &self.device_id)
            .field("audience", &self.audience)
            .field("key_file", &self.key_file)
            .field("trust_anchor_file", &self.trust_anchor_file)
            .field("enrollment_code", &self.enrollment_code.is_some())
            .field("trust_local_clock", &self.trust_local_clock)
            .field("leeway_s", &self.leeway_s)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("backoff", &self.backoff)
            .field("revocation_max_age_s", &self.revocation_max_age_s)
            .field("presentation_window_s", &self.presentation_window_s)
            .field("socket", &self.socket)
            .field("metrics_textfile", &self.metrics_textfile)
            .field("store", &self.store)
            .field("mqtt_host", &self.mqtt.host)
            .field("mqtt_port", &self.mqtt.port)
            .field("mqtt_tls", &self.mqtt.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the file at `path`, applies `overrides`, resolves relative paths against the
    /// file's directory and validates the result.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read {}: {e} (use --config or TESSERA_AGENT_CONFIG; \
                 `tessera-agent default-config` prints a commented one)",
                path.display()
            ))
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, path, base, overrides)
    }

    /// Parses config text; `path` names it in messages, `base` resolves relative paths.
    pub fn parse(
        text: &str,
        path: &Path,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Self, Error> {
        let mut file: FileConfig =
            toml::from_str(text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if let Some(id) = &overrides.device_id {
            file.device_id.clone_from(id);
        }
        if let Some(host) = &overrides.mqtt_host {
            file.mqtt.host.clone_from(host);
        }
        if let Some(port) = overrides.mqtt_port {
            file.mqtt.port = port;
        }
        if let Some(dir) = &overrides.state_dir {
            file.store.dir.clone_from(dir);
        }
        if let Some(socket) = &overrides.socket {
            file.socket.clone_from(socket);
        }
        if let Some(trust) = overrides.trust_local_clock {
            file.trust_local_clock = trust;
        }
        Self::validate(file, path, base)
    }

    fn validate(file: FileConfig, path: &Path, base: &Path) -> Result<Self, Error> {
        let invalid = |message: String| Error::Config(format!("{}: {message}", path.display()));
        validate_id(&file.device_id).map_err(|_| {
            invalid(format!(
                "device_id `{}` is not a valid id (1 to 64 of A-Z a-z 0-9 . _ -)",
                file.device_id
            ))
        })?;
        if file.audience.is_empty()
            || file.audience.len() > MAX_AUDIENCE_LEN
            || !file.audience.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "audience must be 1 to 128 printable ASCII characters without spaces".into(),
            ));
        }
        if file.request_timeout_ms < 100 {
            return Err(invalid("request_timeout_ms must be at least 100".into()));
        }
        if file.backoff_base_ms == 0 || file.backoff_cap_ms < file.backoff_base_ms {
            return Err(invalid(
                "backoff_base_ms must be positive and at most backoff_cap_ms".into(),
            ));
        }
        if file.leeway_s > tessera_shared::revocation::MAX_LEEWAY {
            return Err(invalid(format!(
                "leeway_s must be 0 to {}",
                tessera_shared::revocation::MAX_LEEWAY
            )));
        }
        if file.presentation_window_s == 0 || file.revocation_max_age_s == Some(0) {
            return Err(invalid(
                "presentation_window_s and revocation_max_age_s must be positive".into(),
            ));
        }
        if file.mqtt.port == 0 || file.mqtt.host.is_empty() {
            return Err(invalid("[mqtt] needs a host and a non-zero port".into()));
        }
        if file.mqtt.username.is_some() != file.mqtt.password.is_some() {
            return Err(invalid("[mqtt] username and password go together".into()));
        }
        if file.enrollment_code.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("enrollment_code is empty".into()));
        }
        let resolve = |p: &Path| -> PathBuf {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let dir = resolve(&file.store.dir);
        let in_dir = |given: &Option<PathBuf>, name: &str| {
            given.as_deref().map_or_else(|| dir.join(name), resolve)
        };
        let store = StorePaths {
            record: in_dir(&file.store.record_file, "store.tsr"),
            counter: in_dir(&file.store.counter_file, "store.counter"),
            device_secret: in_dir(&file.store.device_secret_file, "device-secret"),
            revoked_marker: dir.join("revoked"),
            dir: dir.clone(),
        };
        let key_file = in_dir(&file.key_file, "device-key.pem");
        let mut tls = file.mqtt.tls;
        if let Some(tls) = &mut tls {
            tls.ca_file = resolve(&tls.ca_file);
            tls.client_cert_file = tls.client_cert_file.as_deref().map(resolve);
            tls.client_key_file = tls.client_key_file.as_deref().map(resolve);
        }
        let mqtt = MqttConfig {
            host: file.mqtt.host,
            port: file.mqtt.port,
            // The protocol requires the MQTT client id to be the Tessera id (the broker ACL
            // keys on it).
            client_id: file.device_id.clone(),
            username: file.mqtt.username,
            password: file.mqtt.password,
            keep_alive_s: file.mqtt.keep_alive_s,
            // 0 asks for a clean session on every connection.
            session_expiry_s: (file.mqtt.session_expiry_s > 0)
                .then_some(file.mqtt.session_expiry_s),
            tls,
            version: file.mqtt.version,
            max_incoming_packet_bytes: tessera_mqtt::MAX_PACKET_BYTES,
        };
        Ok(Self {
            audience: file.audience,
            key_file,
            trust_anchor_file: resolve(&file.trust_anchor_file),
            enrollment_code: file.enrollment_code.map(Zeroizing::new),
            trust_local_clock: file.trust_local_clock,
            leeway_s: file.leeway_s,
            request_timeout_ms: file.request_timeout_ms,
            backoff: Backoff {
                base_ms: file.backoff_base_ms,
                cap_ms: file.backoff_cap_ms,
            },
            revocation_max_age_s: file.revocation_max_age_s,
            presentation_window_s: file.presentation_window_s,
            socket: resolve(&file.socket),
            metrics_textfile: file.metrics_textfile.as_deref().map(resolve),
            store,
            mqtt,
            device_id: file.device_id,
        })
    }

    /// The key derived from the enrollment code: `from_command_line` (flag or environment)
    /// wins over the file's. The code itself is dropped (and wiped) here.
    pub fn enrollment_code_key(
        &self,
        from_command_line: Option<Zeroizing<String>>,
    ) -> Option<[u8; 32]> {
        from_command_line
            .or_else(|| self.enrollment_code.clone())
            .map(|code| EnrollmentCode::derive_key(code.trim()))
    }

    /// The state machine's configuration.
    pub fn agent_config(
        &self,
        enrollment_code_key: Option<[u8; 32]>,
    ) -> Result<AgentConfig, Error> {
        let mut config = AgentConfig::new(&self.device_id, &self.audience)
            .map_err(|e| Error::Config(format!("device_id or audience: {e}")))?;
        config.leeway_s = self.leeway_s;
        config.request_timeout_ms = self.request_timeout_ms;
        config.backoff = self.backoff;
        config.trust_local_clock = self.trust_local_clock;
        config.revocation_max_age_s = self.revocation_max_age_s;
        config.presentation_window_s = self.presentation_window_s;
        config.enrollment_code_key = enrollment_code_key;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, overrides: &Overrides) -> Result<Config, Error> {
        Config::parse(
            text,
            Path::new("agent.toml"),
            Path::new("/etc/tessera-agent"),
            overrides,
        )
    }

    #[test]
    fn the_commented_default_parses_with_the_documented_defaults() {
        let c = parse(DEFAULT_TOML, &Overrides::default()).expect("valid");
        assert_eq!(c.device_id, "device-1");
        assert_eq!(c.mqtt.client_id, "device-1");
        assert_eq!(c.mqtt.port, 1883);
        assert!(!c.trust_local_clock);
        assert_eq!(c.backoff, Backoff::default());
        assert_eq!(
            c.store.record,
            Path::new("/var/lib/tessera-agent/store.tsr")
        );
        assert_eq!(
            c.store.counter,
            Path::new("/var/lib/tessera-agent/store.counter")
        );
        assert_eq!(
            c.key_file,
            Path::new("/var/lib/tessera-agent/device-key.pem")
        );
        assert_eq!(c.enrollment_code_key(None), None);
    }

    #[test]
    fn a_minimal_file_needs_only_the_device_id() {
        let c = parse("device_id = \"d-7\"\n", &Overrides::default()).expect("valid");
        let full = parse(
            &DEFAULT_TOML.replace("device-1", "d-7"),
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(format!("{c:?}"), format!("{full:?}"));
        assert!(
            parse("", &Overrides::default()).is_err(),
            "device_id is required"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_file_and_key() {
        for text in [
            DEFAULT_TOML.replace("leeway_s = 30", "leeway_s = 30\nleway_s = 3"),
            DEFAULT_TOML.replace("keep_alive_s = 30", "keep_alive_s = 30\nkeepalive = 3"),
            DEFAULT_TOML.replace("[store]", "[store]\nrecord = \"x\""),
        ] {
            let err = parse(&text, &Overrides::default()).expect_err("unknown key");
            let msg = err.to_string();
            assert!(
                msg.contains("agent.toml") && msg.contains("unknown field"),
                "{msg}"
            );
        }
    }

    #[test]
    fn environment_and_flags_override_the_file() {
        let overrides = Overrides {
            device_id: Some("d-9".into()),
            mqtt_host: Some("broker.example".into()),
            mqtt_port: Some(8883),
            state_dir: Some("state".into()),
            socket: Some("/tmp/a.sock".into()),
            trust_local_clock: Some(true),
        };
        let c = parse(DEFAULT_TOML, &overrides).expect("valid");
        assert_eq!(c.device_id, "d-9");
        assert_eq!(c.mqtt.client_id, "d-9");
        assert_eq!(
            (c.mqtt.host.as_str(), c.mqtt.port),
            ("broker.example", 8883)
        );
        // Relative to the config file's directory.
        assert_eq!(c.store.dir, Path::new("/etc/tessera-agent/state"));
        assert_eq!(
            c.store.record,
            Path::new("/etc/tessera-agent/state/store.tsr")
        );
        assert_eq!(c.socket, Path::new("/tmp/a.sock"));
        assert!(c.trust_local_clock);
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        for (from, to, needle) in [
            (
                "device_id = \"device-1\"",
                "device_id = \"a/b\"",
                "device_id",
            ),
            ("backoff_cap_ms = 60000", "backoff_cap_ms = 1", "backoff"),
            (
                "request_timeout_ms = 10000",
                "request_timeout_ms = 5",
                "request_timeout_ms",
            ),
            (
                "# username = \"device-1\"",
                "username = \"u\"",
                "username and password",
            ),
        ] {
            let err =
                parse(&DEFAULT_TOML.replace(from, to), &Overrides::default()).expect_err("invalid");
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn the_enrollment_code_becomes_its_derived_key_and_the_command_line_wins() {
        let text = DEFAULT_TOML.replace(
            "# enrollment_code = \"ABCDE-FGHJK-LMNPQ-RSTUV\"",
            "enrollment_code = \"FILE-CODE\"",
        );
        let c = parse(&text, &Overrides::default()).expect("valid");
        assert!(
            !format!("{c:?}").contains("FILE-CODE"),
            "Debug never shows the code"
        );
        assert_eq!(
            c.enrollment_code_key(None),
            Some(EnrollmentCode::derive_key("FILE-CODE"))
        );
        assert_eq!(
            c.enrollment_code_key(Some(Zeroizing::new("CLI-CODE".into()))),
            Some(EnrollmentCode::derive_key("CLI-CODE"))
        );
        let agent = c.agent_config(c.enrollment_code_key(None)).expect("valid");
        assert_eq!(agent.device_id(), "device-1");
        assert!(!format!("{agent:?}").contains("FILE-CODE"));
    }
}
