//! Tessera's MQTT transport, shared by the hub, the agent and the tools.
//!
//! The connection: options (plain or TLS through rustls, optional client
//! certificate), an event loop that is polled continuously in its own task, reconnects
//! with capped exponential backoff, and hands incoming messages and (re)connections to
//! the rest of the program over channels.
//!
//! Publishing happens from other tasks through the [`AsyncClient`]; the polling task never
//! publishes, so a full request queue can never stall the loop that drains it
//! (rumqtt#1025). rumqttc reconnects when polled again after an error but does not wait,
//! so the backoff is ours (rumqtt#918).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tessera_shared::schedule::Backoff;
use tokio::sync::{mpsc, watch};

pub use rumqttc::v5::mqttbytes::QoS;

/// Largest MQTT packet a client accepts by default: every hub message (at most 16 KiB,
/// PROTOCOL.md §2.4) with room to spare.
pub const MAX_PACKET_BYTES: u32 = 64 * 1024;

/// Where and how to connect.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (1883 plain, 8883 TLS by convention).
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// Broker user name, if the broker requires one.
    #[serde(default)]
    pub username: Option<String>,
    /// Broker password, if the broker requires one.
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Keep the MQTT session this many seconds across disconnections (MQTT 5 session
    /// expiry): the broker holds the client's subscriptions and queues its QoS 1
    /// messages meanwhile, so a control message sent while a device is offline still
    /// reaches it. `None` starts a clean session on every connection.
    #[serde(default)]
    pub session_expiry_s: Option<u32>,
    /// TLS settings; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest packet this connection accepts (announced to the broker, which drops larger
    /// messages for it). Not configurable: the program that connects sets it.
    #[serde(skip, default = "default_max_packet")]
    pub max_incoming_packet_bytes: u32,
}

fn default_keep_alive() -> u64 {
    30
}

fn default_max_packet() -> u32 {
    MAX_PACKET_BYTES
}

/// TLS to the broker.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate chain, for brokers that require client certificates.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// Why the MQTT connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A TLS file is missing or unreadable.
    #[error("TLS: cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A TLS file does not hold what it should.
    #[error("TLS: {0}")]
    Tls(String),
    /// The client's request channel is closed (the event loop is gone).
    #[error("MQTT client: {0}")]
    Client(Box<rumqttc::v5::ClientError>),
}

impl From<rumqttc::v5::ClientError> for MqttError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        // Boxed: the error holds a whole request and would make every Result large.
        Self::Client(Box::new(e))
    }
}

impl MqttConfig {
    /// A plain-TCP config for a broker on `host:port`.
    pub fn plain(host: &str, port: u16, client_id: &str) -> Self {
        Self {
            host: host.to_string(),
            port,
            client_id: client_id.to_string(),
            username: None,
            password: None,
            keep_alive_s: default_keep_alive(),
            session_expiry_s: None,
            tls: None,
            max_incoming_packet_bytes: MAX_PACKET_BYTES,
        }
    }

    /// The rumqttc options for this config.
    pub fn options(&self) -> Result<MqttOptions, MqttError> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s.max(5)));
        match self.session_expiry_s {
            Some(secs) => {
                o.set_clean_start(false);
                o.set_session_expiry_interval(Some(secs));
            }
            None => {
                o.set_clean_start(true);
            }
        }
        o.set_max_packet_size(Some(self.max_incoming_packet_bytes));
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            o.set_credentials(u, p);
        }
        // Without TCP_NODELAY a request/response round trip on loopback took 88 ms
        // (Nagle plus delayed ACK) instead of 0.19 ms (DESIGN.md).
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls.client_config()?),
            )));
        }
        Ok(o)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::TlsFile {
        path: path.clone(),
        source,
    })
}

impl TlsConfig {
    /// A rustls client config trusting `ca_file`, with the client certificate if set.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, MqttError> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = read(&self.ca_file)?;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| MqttError::Tls(format!("CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| MqttError::Tls(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(MqttError::Tls(format!(
                "{} holds no certificate",
                self.ca_file.display()
            )));
        }
        let provider = Arc::new(crypto_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MqttError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let certs = CertificateDer::pem_slice_iter(&read(cert)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                    .map_err(|e| MqttError::Tls(format!("client key: {e}")))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(MqttError::Tls(
                "client_cert_file and client_key_file go together".into(),
            )),
        }
    }
}

/// The TLS crypto provider this build was made with (see the crate's features).
#[cfg(feature = "aws-lc-rs")]
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The TLS crypto provider this build was made with (see the crate's features).
#[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!("tessera-mqtt needs a TLS crypto provider: enable its `aws-lc-rs` or `ring` feature");

/// One received application message.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// What the event loop task reports.
#[derive(Debug, Clone)]
pub enum Notice {
    /// Connected (again): subscriptions must be made again (clean start).
    Connected,
    /// A message arrived.
    Message(Incoming),
    /// The connection dropped; the loop is backing off before reconnecting.
    Disconnected(String),
}

/// Connects and spawns the event loop task. Notices arrive on the returned channel until
/// `shutdown` turns true.
pub fn connect(
    config: &MqttConfig,
    capacity: usize,
    shutdown: watch::Receiver<bool>,
) -> Result<(AsyncClient, mpsc::Receiver<Notice>), MqttError> {
    let (client, eventloop) = AsyncClient::new(config.options()?, capacity);
    let (tx, rx) = mpsc::channel(capacity);
    tokio::spawn(poll_forever(eventloop, tx, shutdown));
    Ok((client, rx))
}

async fn poll_forever(
    mut eventloop: EventLoop,
    tx: mpsc::Sender<Notice>,
    mut shutdown: watch::Receiver<bool>,
) {
    let backoff = Backoff {
        base_ms: 200,
        cap_ms: 10_000,
    };
    let mut attempt = 0u32;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
            event = eventloop.poll() => event,
        };
        let notice = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                Notice::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Notice::Message(Incoming {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
            }),
            // Our own DISCONNECT went out: the owner is closing, so do not reconnect.
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                let delay = backoff.delay_ms(attempt, getrandom::u32().unwrap_or(0));
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = delay, "MQTT connection lost");
                if tx.send(Notice::Disconnected(e.to_string())).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay.max(100))) => {}
                    _ = shutdown.changed() => { if *shutdown.borrow() { return; } }
                }
                continue;
            }
        };
        if tx.send(notice).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_expiry_keeps_the_session_and_none_starts_clean() {
        let mut config = MqttConfig::plain("127.0.0.1", 1883, "device-1");
        let clean = config.options().expect("options");
        assert!(clean.clean_start());
        assert_eq!(clean.session_expiry_interval(), None);

        config.session_expiry_s = Some(3600);
        let kept = config.options().expect("options");
        assert!(!kept.clean_start());
        assert_eq!(kept.session_expiry_interval(), Some(3600));
    }
}
