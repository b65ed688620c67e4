//! A running broker and hub, used instead of the run's own (`--hub-config`, `--broker`).
//!
//! The simulator cannot change such a hub: not its policy (the token lifetime, groups), not
//! its config (heartbeat, quarantine), not its process (no kill, no restart). So it reads
//! what it needs from the hub's config and policy files — the broker, the device role's
//! token lifetime, the device audience — and registers the fleet the way an operator
//! registers devices: one `tessera-hub --config <file> device import` on that hub's
//! database, every device with a one-time enrollment code, under ids of the run's own
//! (`sim-<6 hex digits>-<n>`) so that runs never collide with each other or with real
//! devices. Those devices stay registered after the run; their tokens expire on their own.

use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_mqtt::{MqttConfig, TlsConfig};
use tessera_shared::crypto::PublicKey;

use crate::Error;
use crate::processes::{anchor_from_pem, device_import, run_checked};

/// A running broker and hub to use, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// The hub's config file (`tessera-hub.toml`): its database, policy and broker.
    pub hub_config: PathBuf,
    /// The broker, `mqtt://host[:port]` or `mqtts://host[:port]`; `None`: the broker in
    /// the hub's config (`[mqtt]`, with its `[mqtt.tls]` CA).
    pub broker: Option<String>,
    /// The CA certificate (PEM) that signs an `mqtts://` broker's certificate.
    pub broker_ca: Option<PathBuf>,
    /// The hub's process id, to measure its CPU time and memory.
    pub hub_pid: Option<u32>,
    /// The broker's process id, likewise.
    pub broker_pid: Option<u32>,
    /// The role the fleet is registered with (a `device` role of the hub's policy).
    pub device_role: String,
    /// The group the fleet is registered in (a group of the hub's policy).
    pub device_group: String,
}

/// A broker address from `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// Port (default 1883, or 8883 for `mqtts`).
    pub port: u16,
    /// Whether it speaks TLS.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 host in brackets).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::Process(format!(
                "--broker {text}: {why} (expected mqtt://host[:port] or mqtts://host[:port])"
            ))
        };
        let (tls, rest) = if let Some(rest) = text.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(bad("unknown scheme"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') {
            return Err(bad("no path or user name is taken"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after the host")),
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => {
                    (host.to_string(), port.parse().map_err(|_| bad("bad port"))?)
                }
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if port == 0 {
            return Err(bad("port 0"));
        }
        Ok(Self { host, port, tls })
    }
}

/// The running hub, as its files describe it.
#[derive(Debug)]
pub struct ExternalHub {
    bin: PathBuf,
    config: PathBuf,
    /// How devices reach the broker (the client id is set per device).
    pub mqtt: MqttConfig,
    /// The device role's token lifetime in the hub's policy, s.
    pub lifetime_s: u64,
    /// The audience of device tokens in the hub's policy.
    pub audience: String,
    role: String,
    group: String,
}

fn read_toml(path: &Path, what: &str) -> Result<toml::Table, Error> {
    let text = std::fs::read_to_string(path).map_err(Error::file(path))?;
    text.parse::<toml::Table>()
        .map_err(|e| Error::Process(format!("{} ({what}): {e}", path.display())))
}

/// `path` as the hub reads it: relative to the directory of its config file.
fn beside(config: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        config.parent().unwrap_or_else(|| Path::new(".")).join(path)
    }
}

impl ExternalHub {
    /// Reads the hub's config and policy; `bin` is the `tessera-hub` whose CLI registers
    /// the fleet.
    pub fn open(bin: &Path, external: &External) -> Result<Self, Error> {
        let config_path = external.hub_config.clone();
        let config = read_toml(&config_path, "the hub's config")?;
        let policy_path = beside(
            &config_path,
            config
                .get("policy")
                .and_then(toml::Value::as_str)
                .unwrap_or("policy.toml"),
        );
        let policy = read_toml(&policy_path, "the hub's policy")?;
        let role = external.device_role.as_str();
        let Some(role_table) = policy
            .get("roles")
            .and_then(|r| r.get(role))
            .and_then(toml::Value::as_table)
        else {
            return Err(Error::Process(format!(
                "{}: no role `{role}` to register the fleet with (--device-role)",
                policy_path.display()
            )));
        };
        if role_table.get("kind").and_then(toml::Value::as_str) != Some("device") {
            return Err(Error::Process(format!(
                "{}: role `{role}` is not a device role (kind = \"device\")",
                policy_path.display()
            )));
        }
        let group = external.device_group.as_str();
        if policy.get("groups").and_then(|g| g.get(group)).is_none() {
            return Err(Error::Process(format!(
                "{}: no group `{group}` to register the fleet in (--device-group)",
                policy_path.display()
            )));
        }
        let defaults = policy.get("defaults");
        let lifetime = role_table
            .get("token_lifetime_s")
            .or_else(|| defaults.and_then(|d| d.get("device_token_lifetime_s")))
            .and_then(toml::Value::as_integer)
            // The policy's own default for device tokens (docs/OPERATING.md).
            .unwrap_or(900);
        let lifetime_s = u64::try_from(lifetime)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                Error::Process(format!(
                    "{}: role `{role}` has token lifetime {lifetime}",
                    policy_path.display()
                ))
            })?;
        let audience = defaults
            .and_then(|d| d.get("device_audience"))
            .and_then(toml::Value::as_str)
            .unwrap_or(crate::fleet::DEVICE_AUDIENCE)
            .to_string();
        let mqtt = broker_config(&config_path, &config, external)?;
        Ok(Self {
            bin: bin.to_path_buf(),
            config: config_path,
            mqtt,
            lifetime_s,
            audience,
            role: role.to_string(),
            group: group.to_string(),
        })
    }

    /// The hub's active signing key, from `tessera-hub trust-anchor` on its database.
    pub fn trust_anchor(&self) -> Result<PublicKey, Error> {
        let out = run_checked(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config)
                .arg("trust-anchor"),
            "tessera-hub trust-anchor",
        )?;
        anchor_from_pem(&out, "tessera-hub trust-anchor")
    }

    /// Registers `ids` with the role and group given, each with a one-time enrollment
    /// code, with one `device import` on the hub's database (a serving hub sees them at
    /// once: it keeps no registry in memory). `work` holds the CSV file and the codes.
    pub fn import(&self, ids: &[String], work: &Path) -> Result<Vec<(String, String)>, Error> {
        device_import(&self.bin, &self.config, work, ids, |_| {
            (self.role.as_str(), self.group.as_str())
        })
    }
}

/// How devices reach the broker: `--broker` (and `--broker-ca`), else the hub's `[mqtt]`.
fn broker_config(
    config_path: &Path,
    config: &toml::Table,
    external: &External,
) -> Result<MqttConfig, Error> {
    let mqtt = config.get("mqtt");
    let (host, port, tls) = if let Some(url) = &external.broker {
        let url = BrokerUrl::parse(url)?;
        (url.host, url.port, url.tls)
    } else {
        let host = mqtt
            .and_then(|m| m.get("host"))
            .and_then(toml::Value::as_str)
            .unwrap_or("127.0.0.1")
            .to_string();
        let port = mqtt
            .and_then(|m| m.get("port"))
            .and_then(toml::Value::as_integer)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(1883);
        let tls = mqtt.and_then(|m| m.get("tls")).is_some();
        (host, port, tls)
    };
    let ca_file = match (&external.broker_ca, tls) {
        (Some(ca), true) => Some(ca.clone()),
        (Some(_), false) => {
            return Err(Error::Process(
                "--broker-ca goes with an mqtts:// broker".into(),
            ));
        }
        (None, true) => {
            let from_config = (external.broker.is_none())
                .then(|| {
                    mqtt.and_then(|m| m.get("tls"))
                        .and_then(|t| t.get("ca_file"))
                        .and_then(toml::Value::as_str)
                })
                .flatten();
            Some(
                from_config
                    .map(|ca| beside(config_path, ca))
                    .ok_or_else(|| {
                        Error::Process(
                    "an mqtts:// broker needs the CA that signs its certificate: --broker-ca"
                        .into(),
                )
                    })?,
            )
        }
        (None, false) => None,
    };
    let mut mqtt = MqttConfig::plain(&host, port, "firmware-sim");
    mqtt.tls = ca_file.map(|ca_file| TlsConfig {
        ca_file,
        client_cert_file: None,
        client_key_file: None,
    });
    Ok(mqtt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_name_host_port_and_tls_with_default_ports() {
        let plain = BrokerUrl::parse("mqtt://127.0.0.1:1884").expect("valid");
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.tls),
            ("127.0.0.1", 1884, false)
        );
        let tls = BrokerUrl::parse("mqtts://broker.example").expect("valid");
        assert_eq!(
            (tls.host.as_str(), tls.port, tls.tls),
            ("broker.example", 8883, true)
        );
        assert_eq!(BrokerUrl::parse("mqtt://h/").expect("valid").port, 1883);
        let v6 = BrokerUrl::parse("mqtt://[::1]:2000").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 2000));
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://h:0",
            "mqtt://u@h",
            "mqtt://h/topic",
            "h:1883",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_are_read_beside_the_config_file() {
        let config = Path::new("/etc/tessera/tessera-hub.toml");
        assert_eq!(
            beside(config, "policy.toml"),
            Path::new("/etc/tessera/policy.toml")
        );
        assert_eq!(beside(config, "/x/ca.pem"), Path::new("/x/ca.pem"));
    }
}
