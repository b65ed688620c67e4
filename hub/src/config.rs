//! The hub's configuration file: typed, validated once, unknown keys refused.
//!
//! Precedence is file, then environment, then command-line flags (the flags and variables
//! are declared in `main.rs` with clap's `env`). Relative paths in the file are relative
//! to the file's own directory, so a hub directory can be moved as a whole.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::mqtt::MqttConfig;
use crate::pipeline::PipelineConfig;

/// The configuration file `tessera-hub init` writes in a hub directory.
pub const DEFAULT_FILE: &str = "tessera-hub.toml";

/// The database file of the default configuration.
pub const DEFAULT_DATABASE: &str = "tessera-hub.db";

/// The single-instance lock file of the default configuration ([`HubConfig::lock_file`]).
pub const DEFAULT_LOCK_FILE: &str = "tessera-hub.db.tessera-hub.lock";

/// The fully commented default configuration, as `tessera-hub init` writes it.
pub const DEFAULT_TOML: &str = r#"# tessera-hub configuration. Every option is shown with its default.
# Relative paths are relative to the directory of this file.

# The hub's id: the `iss` of every token it issues, and the identity in audit logs.
hub_id = "tessera-hub"

# The database (created by `tessera-hub init`; no other command creates one): an SQLite
# file, or a PostgreSQL URL such as `postgres://tessera@db.example/tessera` (over TLS unless
# on loopback; `?sslmode=require` to insist, `?sslmode=disable` for plain). On SQLite a
# serving hub holds an exclusive lock on `<database>.<mqtt.client_id>.lock` beside it, so a
# second `serve` with the same client id on this database refuses to start. On PostgreSQL
# there is no lock file: several replicas may serve one database, each with its own
# `mqtt.client_id` and `serve.shared_subscription = true`.
database = "tessera-hub.db"

# Policy file: roles, device groups, access rules, lifetimes (see docs/OPERATING.md).
# Reloaded without restart on SIGHUP.
policy = "policy.toml"

# Key-encryption secret that seals the signing keys in the database: a file of at least
# 32 random bytes (mode 0600). Comment it out to read the secret, hex-encoded, from the
# TESSERA_HUB_KEK environment variable instead.
kek_file = "hub.kek"

[mqtt]
# Broker address. Overridden by TESSERA_HUB_MQTT_HOST / --mqtt-host.
host = "127.0.0.1"
# 1883 for plain MQTT, 8883 for TLS. Overridden by TESSERA_HUB_MQTT_PORT / --mqtt-port.
port = 1883
# MQTT client id of the hub. Give every replica its own.
client_id = "tessera-hub"
# Broker credentials, if the broker requires them.
# username = "tessera-hub"
# password = "..."
# Keep-alive interval, seconds.
keep_alive_s = 30
# MQTT version: "5", or "3.1.1" for brokers that speak only 3.1.1 (NATS's MQTT gateway,
# some managed IoT brokers). Shared subscriptions (several replicas) need a broker that
# has them under either version: Mosquitto, EMQX and HiveMQ do, NATS does not.
version = "5"

# TLS to the broker (rustls). Uncomment to enable.
# [mqtt.tls]
# ca_file = "ca.pem"                 # CA that signed the broker's certificate
# client_cert_file = "hub-cert.pem"  # optional: client certificate (mTLS)
# client_key_file = "hub-key.pem"    # optional: its private key

[serve]
# Subscribe with an MQTT 5 shared subscription ($share/tessera-hub/...), so several hub
# replicas sharing one PostgreSQL database split the requests.
shared_subscription = false
# Requests handled at the same time (request workers).
concurrency = 64
# Requests waiting for a worker. When this many wait, further requests are answered
# `overloaded` at once (nothing done, clients retry after a backoff); when even those
# answers cannot keep up, requests are dropped. Every drop and refusal is counted in a
# summary line logged at each heartbeat. 1 to 65536.
queue = 256
# Seconds a shutdown (SIGTERM, SIGINT) waits for the queued and running requests to be
# answered before it disconnects from the broker anyway. 1 to 600.
drain_s = 5
# Seconds between signed revocation heartbeats, one per revocation stream (and the
# republishing of snapshots that changed). Each heartbeat announces how old verifiers may
# let their revocation knowledge get: between two and three heartbeats, and within that
# no more than half the shortest token lifetime of the policy (PROTOCOL.md §11.6). 1 to
# 3600.
heartbeat_s = 30
# Days the audit log keeps a decision. Records of expired tokens, grants and revocation
# entries are dropped at each heartbeat anyway, so the database stays bounded.
audit_retention_days = 90

[requests]
# How far a request's issued_at may be from the hub's clock, seconds. Nonces are
# remembered for this long, so a request cannot be replayed.
freshness_window_s = 60
# Largest request accepted, bytes. 256 to 65536.
max_request_bytes = 4096
# Largest `revoke` request accepted, bytes: an operator revoking a list of devices
# (`tessera-hub revoke --devices-from FILE`) sends them all in one request, about 12 bytes
# per id of 10 characters. The broker must carry messages this large to the hub
# (Mosquitto: max_packet_size at least this plus 4096). 4096 to 1048576.
max_revoke_request_bytes = 1048576
# Per-client rate limit, kept in the database (shared by replicas) and charged only for
# requests whose signature verified: a burst of this many requests...
rate_burst = 20
# ...then this many per second. Over it: `rate_limited`.
rate_per_second = 5.0
# Admission limit, per client id of the request topic, kept in memory and checked for every
# message before anything else (signature, database, queue), so a flood costs the hub
# little: a burst of this many messages...
admission_burst = 40
# ...then this many per second. Over it, a client gets one `rate_limited` answer a second
# and the rest of its messages are dropped unanswered. Keep it above the rate limit
# above, which then decides for well-behaved clients.
admission_per_second = 10.0

[keys]
# `keys rotate` publishes the next signing key this many seconds before using it, so
# every verifier has it first.
rotation_announce_s = 300

[policy_reload]
# A policy reload (SIGHUP) that would revoke more than this share of the live tokens, in
# percent, is refused and the old policy stays, unless forced with a marker file
# (`tessera-hub policy force`, docs/OPERATING.md "Policy"). A reload that leaves registered
# clients without a role is refused the same way. 0 makes every reload that revokes
# anything need forcing; 100 turns the share check off. 0 to 100.
max_revoked_percent = 50

[anomaly]
# Anomaly detection (docs/OPERATING.md, "Alerts and quarantine"): each alert goes to the
# alerts topic (tessera/v1/hub/alerts), the audit log and the webhooks that take alerts.
# Counts are kept per registered client over windows of window_s; unregistered ids (and
# clients beyond max_clients) are counted together under `*`, never quarantined.
enabled = true
# The counting window, seconds. 1 to 86400.
window_s = 60
# `refusals`: this many refusals of one client in a window (bad_signature, replay, stale,
# malformed, denied, revoked).
refusals = 20
# ...and this many, together, for unregistered ids.
unregistered_refusals = 200
# `not_granted`: this many requests in a window for scopes or operations the client's
# role never grants.
not_granted = 3
# `revoked_use`: this many uses in a window of a revoked client, refresh grant or token:
# its requests, or presentations of its revoked access tokens that devices reported
# (`report_presentation`). (`grant_reuse`, a refresh grant presented again by its owner,
# alerts at once.)
revoked_uses = 3
# `issuance_spike`: more tokens issued to one client in a window than this many times its
# own norm (a weighted mean of its past windows)...
issuance_factor = 10.0
# ...and at least this many.
issuance_min = 30
# An alert listed in quarantine_on quarantines the client for this many seconds: its
# requests are refused `quarantined` until it ends or an operator lifts it
# (`tessera-hub lift-quarantine`). 0 never quarantines. Quarantines are kept in memory:
# a restart lifts them all. 0 to 2592000.
quarantine_s = 900
# The alerts that quarantine: any of refusals, grant_reuse, not_granted, issuance_spike,
# revoked_use. None by default: alerts only. With a broker ACL that lets nobody else
# publish on a client's request topic (`tessera-hub broker-acl`), a good choice is
#   quarantine_on = ["refusals", "grant_reuse", "not_granted"]
# `refusals` counts requests not signed by the client's key (a forgery is by definition
# not the client's): without such an ACL anyone could get any client quarantined with it.
quarantine_on = []
# Clients tracked apart (and quarantined) at most. 1 to 1048576.
max_clients = 65536

# Webhooks notified of revocations and alerts: an HTTP POST of JSON per notification,
# signed in the X-Tessera-Signature header (sha256= and the hex HMAC-SHA256 of the body
# under `secret`), retried with doubling backoff, given up after max_attempts (counted in
# tessera_hub_webhook_dead_letters_total). None by default: uncomment an entry, repeat
# the [[webhooks]] block for more (at most 16).
# [[webhooks]]
# name = "ops"                          # the `webhook` label of the metrics: a-z 0-9 _ -
# url = "https://hooks.example.net/tessera"
# secret = "at least 16 bytes, shared with the receiver"
# events = ["alert", "revocation"]      # what to send: alert, revocation
# max_attempts = 8                      # attempts per notification, the first included
# backoff_initial_ms = 1000             # wait after the first failure, doubling...
# backoff_max_ms = 60000                # ...up to this
# timeout_ms = 5000                     # one attempt at most
# queue = 1024                          # waiting at most; more are dropped (counted)

# HTTP listener for monitoring: /metrics (Prometheus), /healthz and /readyz
# (docs/METRICS.md). Off while this section is absent: uncomment both lines to enable.
# The endpoints are read-only and ask for no credential: listen on loopback or on a
# monitoring network only.
# [http]
# listen = "127.0.0.1:9464"
#
# The operator dashboard at /dashboard on that listener (docs/OPERATING.md, "Dashboard"):
# a read-only web page of the fleet, issuance and refusals, revocations, alerts,
# quarantines and one device's history. Off while this section is absent: uncomment it
# with [http] above. Operators log in with their client id and a dashboard password that
# `tessera-hub dashboard-password OPERATOR` prints once; only operators whose role lists
# `watch` get in. The listener speaks plain HTTP: reach it over loopback, an SSH tunnel
# or a TLS reverse proxy, never across an untrusted network.
# [http.dashboard]
# passwords = "dashboard-passwords"   # SHA-256 of each operator's password (mode 0600)
# session_s = 3600                    # a login lasts this long, seconds: 60 to 604800
"#;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or ill-typed keys.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error (with line and column).
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `iss` of every token.
    pub hub_id: String,
    /// The database: an SQLite file path, or a `postgres://` URL.
    pub database: PathBuf,
    /// Policy file path.
    pub policy: PathBuf,
    /// Key-encryption secret file; `None` reads `TESSERA_HUB_KEK`.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Broker connection.
    pub mqtt: MqttConfig,
    /// Serving loop.
    #[serde(default)]
    pub serve: ServeSection,
    /// Request handling.
    #[serde(default)]
    pub requests: RequestsSection,
    /// Signing keys.
    #[serde(default)]
    pub keys: KeysSection,
    /// Policy reloads.
    #[serde(default)]
    pub policy_reload: PolicyReloadSection,
    /// The monitoring HTTP listener; `None` (no `[http]` section) for none.
    #[serde(default)]
    pub http: Option<HttpSection>,
    /// Anomaly detection and quarantine.
    #[serde(default)]
    pub anomaly: crate::anomaly::AnomalyConfig,
    /// Webhooks notified of revocations and alerts (`[[webhooks]]`, none by default).
    #[serde(default)]
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
}

/// `[http]`: present to enable the listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address and port to listen on (`127.0.0.1:9464`).
    pub listen: std::net::SocketAddr,
    /// The operator dashboard; `None` (no `[http.dashboard]` section) for none.
    #[serde(default)]
    pub dashboard: Option<DashboardSection>,
}

/// `[http.dashboard]`: present to serve the dashboard ([`crate::dashboard`]).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardSection {
    /// The passwords file: `OPERATOR SHA256-HEX` lines, written by
    /// `tessera-hub dashboard-password`.
    pub passwords: PathBuf,
    /// How long a login lasts, seconds.
    pub session_s: u64,
}

/// The passwords file of the default configuration.
pub const DEFAULT_DASHBOARD_PASSWORDS: &str = "dashboard-passwords";

impl Default for DashboardSection {
    fn default() -> Self {
        Self {
            passwords: PathBuf::from(DEFAULT_DASHBOARD_PASSWORDS),
            session_s: 3600,
        }
    }
}

/// `[policy_reload]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyReloadSection {
    /// The largest share of the live tokens a reload may revoke unforced, percent.
    pub max_revoked_percent: u8,
}

impl Default for PolicyReloadSection {
    fn default() -> Self {
        Self {
            max_revoked_percent: crate::policy_change::DEFAULT_MAX_REVOKED_PERCENT,
        }
    }
}

/// `[serve]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    /// Use an MQTT 5 shared subscription.
    pub shared_subscription: bool,
    /// Requests handled at once.
    pub concurrency: usize,
    /// Seconds between heartbeats.
    pub heartbeat_s: u64,
    /// Days the audit log keeps a decision.
    pub audit_retention_days: u64,
    /// Requests waiting for a worker at most.
    pub queue: usize,
    /// Seconds a shutdown waits for queued and running requests.
    pub drain_s: u64,
}

impl Default for ServeSection {
    fn default() -> Self {
        Self {
            shared_subscription: false,
            concurrency: 64,
            heartbeat_s: 30,
            audit_retention_days: 90,
            queue: 256,
            drain_s: 5,
        }
    }
}

/// `[requests]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestsSection {
    /// Freshness window, seconds.
    pub freshness_window_s: u64,
    /// Largest request, bytes.
    pub max_request_bytes: usize,
    /// Largest revoke request, bytes.
    pub max_revoke_request_bytes: usize,
    /// Rate-limit burst.
    pub rate_burst: u32,
    /// Rate-limit sustained rate.
    pub rate_per_second: f64,
    /// In-memory admission limit: burst.
    pub admission_burst: u32,
    /// In-memory admission limit: sustained rate.
    pub admission_per_second: f64,
}

impl Default for RequestsSection {
    fn default() -> Self {
        Self {
            freshness_window_s: 60,
            max_request_bytes: 4096,
            max_revoke_request_bytes: tessera_shared::cose::MAX_REQUEST_LEN,
            rate_burst: 20,
            rate_per_second: 5.0,
            admission_burst: 40,
            admission_per_second: 10.0,
        }
    }
}

/// `[keys]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysSection {
    /// Seconds between announcing a key and signing with it.
    pub rotation_announce_s: u64,
}

impl Default for KeysSection {
    fn default() -> Self {
        Self {
            rotation_announce_s: 300,
        }
    }
}

impl HubConfig {
    /// Reads, parses and validates a config file, resolving relative paths against its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Parses and validates config text (`path` is only used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        tessera_shared::message::validate_id(&self.hub_id)
            .map_err(|_| invalid(format!("hub_id `{}` is not a valid id", self.hub_id)))?;
        let r = &self.requests;
        if !(5..=600).contains(&r.freshness_window_s) {
            return Err(invalid(
                "requests.freshness_window_s must be 5..=600".into(),
            ));
        }
        if !(256..=65536).contains(&r.max_request_bytes) {
            return Err(invalid(
                "requests.max_request_bytes must be 256..=65536".into(),
            ));
        }
        if !(4096..=tessera_shared::cose::MAX_REQUEST_LEN).contains(&r.max_revoke_request_bytes) {
            return Err(invalid(format!(
                "requests.max_revoke_request_bytes must be 4096..={}",
                tessera_shared::cose::MAX_REQUEST_LEN
            )));
        }
        if r.rate_burst == 0 || !(r.rate_per_second > 0.0 && r.rate_per_second.is_finite()) {
            return Err(invalid(
                "requests.rate_burst and rate_per_second must be positive".into(),
            ));
        }
        if r.admission_burst == 0
            || !(r.admission_per_second > 0.0 && r.admission_per_second.is_finite())
        {
            return Err(invalid(
                "requests.admission_burst and admission_per_second must be positive".into(),
            ));
        }
        if !(1..=65_536).contains(&self.serve.queue) {
            return Err(invalid("serve.queue must be 1..=65536".into()));
        }
        if !(1..=600).contains(&self.serve.drain_s) {
            return Err(invalid("serve.drain_s must be 1..=600".into()));
        }
        if self.policy_reload.max_revoked_percent > 100 {
            return Err(invalid(
                "policy_reload.max_revoked_percent must be 0..=100".into(),
            ));
        }
        if !(1..=4096).contains(&self.serve.concurrency) {
            return Err(invalid("serve.concurrency must be 1..=4096".into()));
        }
        if !(1..=3600).contains(&self.serve.heartbeat_s) {
            return Err(invalid("serve.heartbeat_s must be 1..=3600".into()));
        }
        if !(1..=36_500).contains(&self.serve.audit_retention_days) {
            return Err(invalid(
                "serve.audit_retention_days must be 1..=36500".into(),
            ));
        }
        if let Some(d) = self.http.as_ref().and_then(|h| h.dashboard.as_ref())
            && !(60..=604_800).contains(&d.session_s)
        {
            return Err(invalid(
                "http.dashboard.session_s must be 60..=604800".into(),
            ));
        }
        self.anomaly.check().map_err(invalid)?;
        for (i, hook) in self.webhooks.iter().enumerate() {
            hook.check().map_err(invalid)?;
            if self.webhooks[..i].iter().any(|h| h.name == hook.name) {
                return Err(invalid(format!(
                    "webhooks: two entries are named `{}`",
                    hook.name
                )));
            }
        }
        if self.webhooks.len() > 16 {
            return Err(invalid("webhooks: at most 16 entries".into()));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        // A PostgreSQL URL is not a path.
        if crate::store::postgres_url(&self.database).is_none() {
            join(&mut self.database);
        }
        join(&mut self.policy);
        if let Some(k) = &mut self.kek_file {
            join(k);
        }
        if let Some(d) = self.http.as_mut().and_then(|h| h.dashboard.as_mut()) {
            join(&mut d.passwords);
        }
        if let Some(tls) = &mut self.mqtt.tls {
            join(&mut tls.ca_file);
            if let Some(c) = &mut tls.client_cert_file {
                join(c);
            }
            if let Some(k) = &mut tls.client_key_file {
                join(k);
            }
        }
    }

    /// The single-instance lock file: `<database>.<mqtt.client_id>.lock`. `serve` holds an
    /// exclusive lock on it for its whole life, so only one hub process serves a database
    /// under one MQTT client id: two would take the broker session from each other in
    /// turn. Replicas sharing the database each have their own client id, so their own lock.
    pub fn lock_file(&self) -> PathBuf {
        // A client id is any string to MQTT; only a file name's characters go in the path.
        let client: String = self
            .mqtt
            .client_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = self.database.as_os_str().to_owned();
        name.push(format!(".{client}.lock"));
        PathBuf::from(name)
    }

    /// How far a policy reload may go unforced (see [`crate::policy_change::reload`]).
    pub fn reload_limits(&self) -> crate::policy_change::ReloadLimits {
        crate::policy_change::ReloadLimits {
            max_revoked_percent: self.policy_reload.max_revoked_percent,
        }
    }

    /// The admission limit (see [`crate::limiter`]).
    pub fn admission(&self) -> crate::limiter::Limit {
        crate::limiter::Limit {
            burst: self.requests.admission_burst,
            per_second: self.requests.admission_per_second,
        }
    }

    /// The pipeline's tunables.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            hub_id: self.hub_id.clone(),
            freshness_window_s: self.requests.freshness_window_s,
            max_request_bytes: self.requests.max_request_bytes,
            rate_burst: self.requests.rate_burst,
            rate_per_second: self.requests.rate_per_second,
            max_revoke_request_bytes: self.requests.max_revoke_request_bytes,
            heartbeat_s: self.serve.heartbeat_s,
            anomaly: self.anomaly.clone(),
            webhooks: self.webhooks.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_default_parses_and_validates() {
        let c = HubConfig::parse(DEFAULT_TOML, Path::new("default.toml")).expect("valid");
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.requests.freshness_window_s, 60);
        assert_eq!(c.serve.heartbeat_s, 30);
        assert_eq!(c.serve, ServeSection::default());
        assert_eq!(c.requests, RequestsSection::default());
    }

    #[test]
    fn the_http_listener_is_off_unless_its_section_is_uncommented() {
        let c = HubConfig::parse(DEFAULT_TOML, Path::new("default.toml")).expect("valid");
        assert_eq!(c.http, None);
        let text = DEFAULT_TOML
            .replace("# [http]", "[http]")
            .replace("# listen = ", "listen = ");
        let c = HubConfig::parse(&text, Path::new("default.toml")).expect("valid");
        assert_eq!(
            c.http.map(|h| h.listen.to_string()).as_deref(),
            Some("127.0.0.1:9464")
        );
        let text = text.replace("127.0.0.1:9464", "localhost");
        assert!(HubConfig::parse(&text, Path::new("default.toml")).is_err());
    }

    #[test]
    fn the_dashboard_is_off_unless_its_section_is_uncommented_and_its_file_follows_the_config() {
        let with_http = DEFAULT_TOML
            .replace("# [http]", "[http]")
            .replace("# listen = ", "listen = ");
        let c = HubConfig::parse(&with_http, Path::new("default.toml")).expect("valid");
        assert_eq!(c.http.and_then(|h| h.dashboard), None);
        let text = with_http
            .replace("# [http.dashboard]", "[http.dashboard]")
            .replace("# passwords = ", "passwords = ")
            .replace("# session_s = ", "session_s = ");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, &text).expect("write");
        let c = HubConfig::load(&path).expect("valid");
        assert_eq!(
            c.http.and_then(|h| h.dashboard),
            Some(DashboardSection {
                passwords: dir.path().join(DEFAULT_DASHBOARD_PASSWORDS),
                session_s: 3600,
            })
        );
        let err = HubConfig::parse(
            &text.replace("session_s = 3600", "session_s = 5"),
            Path::new("hub.toml"),
        )
        .expect_err("too short");
        assert!(err.to_string().contains("session_s"), "{err}");
    }

    /// The default config with its commented `[[webhooks]]` entry uncommented.
    fn with_webhook() -> String {
        DEFAULT_TOML
            .lines()
            .map(|l| {
                let entry = [
                    "[[webhooks]]",
                    "name",
                    "url",
                    "secret",
                    "events",
                    "max_attempts",
                    "backoff_initial_ms",
                    "backoff_max_ms",
                    "timeout_ms",
                    "queue",
                ];
                match l.strip_prefix("# ") {
                    Some(rest) if entry.iter().any(|k| rest.starts_with(k)) => rest,
                    _ => l,
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn anomaly_detection_is_on_alerting_only_and_webhooks_are_off_by_default() {
        let c = HubConfig::parse(DEFAULT_TOML, Path::new("default.toml")).expect("valid");
        assert_eq!(c.anomaly, crate::anomaly::AnomalyConfig::default());
        assert!(c.anomaly.enabled && c.anomaly.quarantine_on.is_empty());
        assert!(c.webhooks.is_empty());
        assert_eq!(c.pipeline().anomaly, c.anomaly);
    }

    #[test]
    fn the_commented_webhook_entry_parses_with_its_defaults_and_entries_are_checked() {
        let text = with_webhook();
        let c = HubConfig::parse(&text, Path::new("default.toml")).expect("valid");
        assert_eq!(c.webhooks.len(), 1);
        let hook = &c.webhooks[0];
        assert_eq!(
            (
                hook.name.as_str(),
                hook.max_attempts,
                hook.backoff_max_ms,
                hook.queue
            ),
            ("ops", 8, 60_000, 1024)
        );
        assert_eq!(c.pipeline().webhooks, c.webhooks);
        // The secret stays out of debug output (logs).
        assert!(!format!("{c:?}").contains("shared with the receiver"));
        for (from, to, key) in [
            ("url = \"https://", "url = \"ftp://", "url"),
            ("secret = \"at least", "secret = \"short\" # ", "secret"),
            (
                "events = [\"alert\", \"revocation\"]",
                "events = []",
                "events",
            ),
            ("events = [\"alert\"", "events = [\"audit\"", "audit"),
        ] {
            let err =
                HubConfig::parse(&text.replace(from, to), Path::new("hub.toml")).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
        // Names are metric labels: unique.
        let block = text
            .lines()
            .skip_while(|l| !l.starts_with("[[webhooks]]"))
            .take_while(|l| !l.starts_with("# HTTP listener"))
            .collect::<Vec<_>>()
            .join("\n");
        let twice = format!("{text}\n{block}\n");
        let err = HubConfig::parse(&twice, Path::new("hub.toml")).expect_err("duplicate");
        assert!(err.to_string().contains("two entries"), "{err}");
        // Thresholds are checked.
        for (from, to) in [
            ("\nwindow_s = 60", "\nwindow_s = 0"),
            ("issuance_factor = 10.0", "issuance_factor = 0.5"),
            (
                "quarantine_on = []",
                "quarantine_on = [\"quarantine_lifted\"]",
            ),
        ] {
            let err = HubConfig::parse(&DEFAULT_TOML.replace(from, to), Path::new("hub.toml"))
                .expect_err(to);
            assert!(err.to_string().contains("anomaly"), "{err}");
        }
    }

    #[test]
    fn queue_drain_and_admission_limits_are_checked() {
        for (from, to, key) in [
            ("queue = 256", "queue = 0", "serve.queue"),
            ("drain_s = 5", "drain_s = 0", "serve.drain_s"),
            (
                "admission_burst = 40",
                "admission_burst = 0",
                "admission_burst",
            ),
            (
                "admission_per_second = 10.0",
                "admission_per_second = -1.0",
                "admission_per_second",
            ),
        ] {
            let text = DEFAULT_TOML.replace(from, to);
            let err = HubConfig::parse(&text, Path::new("hub.toml")).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_the_file_name() {
        let text = DEFAULT_TOML.replace("hub_id = ", "hub_idd = \"x\"\nhub_id = ");
        let err = HubConfig::parse(&text, Path::new("hub.toml")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("hub.toml") && msg.contains("hub_idd"), "{msg}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let text = DEFAULT_TOML.replace("freshness_window_s = 60", "freshness_window_s = 0");
        let err = HubConfig::parse(&text, Path::new("hub.toml")).expect_err("invalid");
        assert!(err.to_string().contains("freshness_window_s"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        std::fs::write(&path, DEFAULT_TOML).expect("write");
        let c = HubConfig::load(&path).expect("load");
        assert_eq!(c.database, dir.path().join(DEFAULT_DATABASE));
        assert_eq!(c.lock_file(), dir.path().join(DEFAULT_LOCK_FILE));
        assert_eq!(c.kek_file, Some(dir.path().join("hub.kek")));
    }
}
