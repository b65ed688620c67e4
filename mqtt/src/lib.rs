//! Tessera's MQTT transport, shared by the hub, the agent and the tools.
//!
//! The connection: options (plain or TLS through rustls, optional client
//! certificate), an event loop that is polled continuously in its own task, reconnects
//! with capped exponential backoff, and hands incoming messages and (re)connections to
//! the rest of the program ([`Notices`]).
//!
//! Publishing happens from other tasks through the [`MqttClient`]. The polling task never
//! publishes and never waits for the program: incoming messages go to a bounded queue and
//! are dropped (and counted) when it is full, and connection changes go through a channel
//! that only keeps the latest state. So neither a full request queue nor a slow reader can
//! stall the loop that drains both (rumqtt#1025). rumqttc reconnects when polled again
//! after an error but does not wait, so the backoff is ours (rumqtt#918).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Most QoS 1 publishes a connection keeps unacknowledged (the broker's Receive Maximum
/// lowers it further: Mosquitto announces 20). rumqttc's v5 client pre-allocates one slot per
/// possible packet id up to this limit, about 216 bytes each: its default, 65,535, cost every
/// connection 14 MB of resident memory before it sent anything.
pub const MAX_INFLIGHT: u16 = 100;

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
    /// The MQTT version spoken: `"5"` (the default) or `"3.1.1"`, for brokers that speak
    /// only 3.1.1 (NATS's MQTT gateway, some managed IoT brokers). The protocol is the
    /// same over both (PROTOCOL.md §7.3); over 3.1.1 a kept session (`session_expiry_s`)
    /// has no expiry of its own.
    #[serde(default)]
    pub version: MqttVersion,
    /// Largest packet this connection accepts (announced to the broker, which drops larger
    /// messages for it). Not configurable: the program that connects sets it.
    #[serde(skip, default = "default_max_packet")]
    pub max_incoming_packet_bytes: u32,
}

/// An MQTT protocol version.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 5.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
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
    /// The client's request channel is closed (the event loop is gone), or full for a
    /// `try_publish`.
    #[error("MQTT client: {0}")]
    Client(String),
}

impl From<rumqttc::v5::ClientError> for MqttError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        // Not the error itself: it holds a whole request and would make every Result large.
        Self::Client(e.to_string())
    }
}

impl From<rumqttc::ClientError> for MqttError {
    fn from(e: rumqttc::ClientError) -> Self {
        Self::Client(e.to_string())
    }
}

/// The publishing half of a connection ([`connect`], [`connection`]), whichever MQTT
/// version it speaks: cheap to clone, usable from any task.
#[derive(Debug, Clone)]
pub enum MqttClient {
    /// MQTT 5.
    V5(AsyncClient),
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
}

/// The 3.1.1 client's QoS of ours.
fn qos_v311(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

impl MqttClient {
    /// Queues a publish, waiting for room in the request queue.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.publish(topic, qos, retain, payload.into()).await?),
            Self::V311(c) => Ok(c
                .publish(topic, qos_v311(qos), retain, payload.into())
                .await?),
        }
    }

    /// Queues a publish if the request queue has room; an error if it has not.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.try_publish(topic, qos, retain, payload.into())?),
            Self::V311(c) => Ok(c.try_publish(topic, qos_v311(qos), retain, payload.into())?),
        }
    }

    /// Subscribes to `filter`.
    pub async fn subscribe(&self, filter: impl Into<String>, qos: QoS) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.subscribe(filter, qos).await?),
            Self::V311(c) => Ok(c.subscribe(filter, qos_v311(qos)).await?),
        }
    }

    /// Unsubscribes from `filter`.
    pub async fn unsubscribe(&self, filter: impl Into<String>) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.unsubscribe(filter).await?),
            Self::V311(c) => Ok(c.unsubscribe(filter).await?),
        }
    }

    /// Queues an unsubscribe if the request queue has room.
    pub fn try_unsubscribe(&self, filter: impl Into<String>) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.try_unsubscribe(filter)?),
            Self::V311(c) => Ok(c.try_unsubscribe(filter)?),
        }
    }

    /// Sends DISCONNECT: the event loop ends once it went out.
    pub async fn disconnect(&self) -> Result<(), MqttError> {
        match self {
            Self::V5(c) => Ok(c.disconnect().await?),
            Self::V311(c) => Ok(c.disconnect().await?),
        }
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
            version: MqttVersion::V5,
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
        o.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
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

impl MqttConfig {
    /// The rumqttc options for this config, over MQTT 3.1.1.
    pub fn options_v311(&self) -> Result<rumqttc::MqttOptions, MqttError> {
        let mut o = rumqttc::MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s.max(5)));
        o.set_clean_session(self.session_expiry_s.is_none());
        let max = usize::try_from(self.max_incoming_packet_bytes).unwrap_or(usize::MAX);
        o.set_max_packet_size(max, max);
        o.set_inflight(MAX_INFLIGHT);
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            o.set_credentials(u, p);
        }
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
compile_error!(
    "tessera-mqtt needs a TLS crypto provider: enable its `aws-lc-rs` or `ring` feature"
);

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

/// Sizes of the queues between the event loop task and the rest of the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queues {
    /// Requests (publish, subscribe, disconnect) waiting for the event loop: rumqttc's
    /// request channel. `AsyncClient::publish` waits for room, `try_publish` fails.
    pub requests: usize,
    /// Incoming messages waiting for the owner; further ones are dropped and counted.
    pub incoming: usize,
    /// Payload bytes of those messages at most; further ones are dropped and counted.
    pub incoming_bytes: usize,
}

impl Queues {
    /// `capacity` requests and incoming messages, and room for that many messages of
    /// [`MAX_PACKET_BYTES`].
    pub fn uniform(capacity: usize) -> Self {
        Self {
            requests: capacity,
            incoming: capacity,
            incoming_bytes: capacity.saturating_mul(MAX_PACKET_BYTES as usize),
        }
    }
}

/// A count shared between tasks (messages dropped, say); it only grows.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The connection's state as the event loop task last saw it. Counters rather than
/// events, so the owner never misses that a (re)connection happened however late it looks,
/// and the event loop never waits for the owner to look.
#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    /// CONNACKs received so far.
    connects: u64,
    /// Connection errors so far (each followed by a backoff), and the last one.
    failures: u64,
    last_error: String,
}

/// Where the event loop task's reports arrive (see [`connect`]).
///
/// Incoming messages wait in a bounded queue; when it is full (or holds
/// [`Queues::incoming_bytes`]), the event loop drops further messages and counts them
/// ([`Notices::dropped`]) rather than wait: it must keep polling, or nothing (publishes,
/// acknowledgements, keep-alives) moves. (Re)connections and disconnections never wait
/// behind messages and are never lost: each [`Notice::Connected`] the owner must act on
/// is reported, after the [`Notice::Disconnected`] before it. Only the detail of several
/// failed attempts in a row is folded into one `Disconnected` (the latest error).
#[derive(Debug)]
pub struct Notices {
    link: watch::Receiver<Link>,
    link_open: bool,
    seen_connects: u64,
    seen_failures: u64,
    messages: mpsc::Receiver<Incoming>,
    queued_bytes: Arc<AtomicUsize>,
    dropped: Counter,
}

impl Notices {
    /// The next notice; `None` once the event loop task has stopped and everything it
    /// reported was read. Cancel safe: a notice is never lost when the future is dropped.
    pub async fn recv(&mut self) -> Option<Notice> {
        loop {
            if let Some(notice) = self.link_notice() {
                return Some(notice);
            }
            tokio::select! {
                biased;
                changed = self.link.changed(), if self.link_open => {
                    if changed.is_err() {
                        self.link_open = false;
                    }
                }
                message = self.messages.recv() => match message {
                    Some(m) => {
                        self.queued_bytes.fetch_sub(m.payload.len(), Ordering::Relaxed);
                        return Some(Notice::Message(m));
                    }
                    None => {
                        // The event loop task is gone; report its last state change.
                        return self.link_notice();
                    }
                },
            }
        }
    }

    /// How many incoming messages the event loop dropped because the owner had not taken
    /// the earlier ones yet (since the connection was made).
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    fn link_notice(&mut self) -> Option<Notice> {
        let link = self.link.borrow_and_update();
        if link.failures > self.seen_failures {
            self.seen_failures = link.failures;
            return Some(Notice::Disconnected(link.last_error.clone()));
        }
        if link.connects > self.seen_connects {
            self.seen_connects = link.connects;
            // A connection that dropped again before the owner looked needs no action:
            // the next one is reported.
            if link.connected {
                return Some(Notice::Connected);
            }
        }
        None
    }
}

/// Why the event loop task stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The owner's DISCONNECT went out.
    Disconnected,
    /// `shutdown` turned true, or its sender was dropped.
    Shutdown,
    /// The owner dropped its [`Notices`].
    OwnerGone,
}

/// Connects and spawns the event loop task; `capacity` sizes every queue
/// ([`Queues::uniform`]). Notices arrive until the event loop stops: after a DISCONNECT
/// ([`MqttClient::disconnect`]) went out, or when `shutdown` turns true (or its sender is
/// dropped).
pub fn connect(
    config: &MqttConfig,
    capacity: usize,
    shutdown: watch::Receiver<bool>,
) -> Result<(MqttClient, Notices), MqttError> {
    let (client, notices, event_loop) = connection(config, Queues::uniform(capacity), shutdown)?;
    tokio::spawn(event_loop);
    Ok((client, notices))
}

/// Like [`connect`], with queue sizes of the caller's choice, and without spawning: the
/// caller runs the returned event loop future in a task of its own (in a `JoinSet`, say,
/// to notice if it ever ends) and must keep it running for anything to move.
pub fn connection(
    config: &MqttConfig,
    queues: Queues,
    shutdown: watch::Receiver<bool>,
) -> Result<
    (
        MqttClient,
        Notices,
        impl Future<Output = Stopped> + Send + 'static,
    ),
    MqttError,
> {
    let capacity = queues.requests.max(1);
    let (client, event_loop) = match config.version {
        MqttVersion::V5 => {
            let (client, event_loop) = AsyncClient::new(config.options()?, capacity);
            (MqttClient::V5(client), Loop::V5(Box::new(event_loop)))
        }
        MqttVersion::V311 => {
            let (client, mut event_loop) =
                rumqttc::AsyncClient::new(config.options_v311()?, capacity);
            // Without TCP_NODELAY a request/response round trip on loopback took 88 ms
            // (Nagle plus delayed ACK) instead of 0.19 ms (DESIGN.md).
            let mut net = NetworkOptions::new();
            net.set_tcp_nodelay(true);
            event_loop.set_network_options(net);
            (MqttClient::V311(client), Loop::V311(Box::new(event_loop)))
        }
    };
    let (link_tx, inbox, notices) = notice_channel(queues);
    Ok((
        client,
        notices,
        poll_forever(event_loop, link_tx, inbox, shutdown),
    ))
}

/// The event loop of either version.
enum Loop {
    V5(Box<EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// What one poll of the event loop gave, whichever the version.
enum Polled {
    /// CONNACK: (re)connected.
    Connected,
    /// An application message.
    Message(Incoming),
    /// Our own DISCONNECT went out.
    Closing,
    /// Anything else.
    Other,
    /// The connection failed or dropped.
    Failed(String),
}

impl Loop {
    async fn poll(&mut self) -> Polled {
        match self {
            Loop::V5(event_loop) => match event_loop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::Connected,
                Ok(Event::Incoming(Packet::Publish(p))) => Polled::Message(Incoming {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                }),
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::Closing,
                Ok(_) => Polled::Other,
                Err(e) => Polled::Failed(e.to_string()),
            },
            Loop::V311(event_loop) => match event_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Polled::Connected,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Polled::Message(Incoming {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    })
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::Closing,
                Ok(_) => Polled::Other,
                Err(e) => Polled::Failed(e.to_string()),
            },
        }
    }
}

/// The event loop's ends of the notices (connection state, incoming queue) and the
/// owner's.
fn notice_channel(queues: Queues) -> (watch::Sender<Link>, Inbox, Notices) {
    let (link_tx, link) = watch::channel(Link::default());
    let (tx, messages) = mpsc::channel(queues.incoming.max(1));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let dropped = Counter::default();
    let inbox = Inbox {
        tx,
        queued_bytes: Arc::clone(&queued_bytes),
        max_bytes: queues.incoming_bytes,
        dropped: dropped.clone(),
    };
    let notices = Notices {
        link,
        link_open: true,
        seen_connects: 0,
        seen_failures: 0,
        messages,
        queued_bytes,
        dropped,
    };
    (link_tx, inbox, notices)
}

/// The event loop's end of the incoming queue.
struct Inbox {
    tx: mpsc::Sender<Incoming>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    dropped: Counter,
}

impl Inbox {
    /// Queues a message without waiting; drops and counts it when the queue is full.
    /// `false` when the owner is gone.
    fn offer(&self, message: Incoming) -> bool {
        let len = message.payload.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.dropped.add(1);
            return !self.tx.is_closed();
        }
        match self.tx.try_send(message) {
            Ok(()) => true,
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.dropped.add(1);
                        true
                    }
                    mpsc::error::TrySendError::Closed(_) => false,
                }
            }
        }
    }
}

/// Polls the event loop until it is told to stop: never waits on anything but the
/// network, the backoff and `shutdown`, so a slow owner can never stall the loop that
/// drains the requests its own tasks are waiting on.
async fn poll_forever(
    mut event_loop: Loop,
    link: watch::Sender<Link>,
    inbox: Inbox,
    mut shutdown: watch::Receiver<bool>,
) -> Stopped {
    let backoff = Backoff {
        base_ms: 200,
        cap_ms: 10_000,
    };
    let mut attempt = 0u32;
    loop {
        let polled = tokio::select! {
            // Also when the sender is gone: nobody could stop the loop otherwise.
            _ = shutdown.wait_for(|stop| *stop) => return Stopped::Shutdown,
            polled = event_loop.poll() => polled,
        };
        match polled {
            Polled::Connected => {
                attempt = 0;
                link.send_modify(|l| {
                    l.connected = true;
                    l.connects += 1;
                });
            }
            Polled::Message(message) => {
                if !inbox.offer(message) {
                    return Stopped::OwnerGone;
                }
            }
            // Our own DISCONNECT went out: the owner is closing, so do not reconnect.
            Polled::Closing => {
                link.send_modify(|l| l.connected = false);
                return Stopped::Disconnected;
            }
            Polled::Other => {}
            Polled::Failed(e) => {
                let delay = backoff.delay_ms(attempt, getrandom::u32().unwrap_or(0));
                attempt = attempt.saturating_add(1);
                // The owner logs the `Notice::Disconnected` as it sees fit: a warning here
                // too would log every disconnection twice.
                tracing::debug!(error = %e, retry_in_ms = delay, "MQTT connection lost");
                link.send_modify(|l| {
                    l.connected = false;
                    l.failures += 1;
                    l.last_error = e;
                });
                if inbox.tx.is_closed() {
                    return Stopped::OwnerGone;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay.max(100))) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Stopped::Shutdown,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, len: usize) -> Incoming {
        Incoming {
            topic: topic.into(),
            payload: vec![7; len],
        }
    }

    fn connected(l: &mut Link) {
        l.connected = true;
        l.connects += 1;
    }

    fn failed(l: &mut Link, why: &str) {
        l.connected = false;
        l.failures += 1;
        l.last_error = why.into();
    }

    #[tokio::test]
    async fn a_full_incoming_queue_drops_and_counts_instead_of_waiting() {
        let queues = Queues {
            requests: 4,
            incoming: 2,
            incoming_bytes: 1000,
        };
        let (_link, inbox, mut notices) = notice_channel(queues);
        for i in 0..5 {
            assert!(
                inbox.offer(message(&format!("t/{i}"), 10)),
                "owner still there"
            );
        }
        assert_eq!(notices.dropped().get(), 3);
        let Some(Notice::Message(m)) = notices.recv().await else {
            panic!("a message")
        };
        assert_eq!(m.topic, "t/0");
        // Taking one makes room for one.
        assert!(inbox.offer(message("t/5", 10)));
        assert_eq!(notices.dropped().get(), 3);
    }

    #[tokio::test]
    async fn messages_over_the_byte_budget_are_dropped_and_counted() {
        let queues = Queues {
            requests: 4,
            incoming: 100,
            incoming_bytes: 100,
        };
        let (_link, inbox, mut notices) = notice_channel(queues);
        assert!(inbox.offer(message("a", 60)));
        assert!(inbox.offer(message("b", 60)));
        assert_eq!(notices.dropped().get(), 1);
        assert!(matches!(notices.recv().await, Some(Notice::Message(_))));
        assert!(inbox.offer(message("c", 60)), "room again");
        assert_eq!(notices.dropped().get(), 1);
    }

    #[tokio::test]
    async fn a_reconnection_is_reported_after_its_disconnection_and_before_queued_messages() {
        let (link, inbox, mut notices) = notice_channel(Queues::uniform(8));
        link.send_modify(connected);
        assert!(inbox.offer(message("old", 1)));
        // The owner looks late: the connection dropped and came back meanwhile.
        link.send_modify(|l| failed(l, "reset"));
        link.send_modify(|l| failed(l, "refused"));
        link.send_modify(connected);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(match notices.recv().await {
                Some(Notice::Connected) => "connected".to_owned(),
                Some(Notice::Disconnected(why)) => format!("disconnected: {why}"),
                Some(Notice::Message(m)) => m.topic,
                None => "end".to_owned(),
            });
        }
        assert_eq!(seen, ["disconnected: refused", "connected", "old"]);
    }

    #[tokio::test]
    async fn a_connection_that_dropped_before_the_owner_looked_is_only_a_disconnection() {
        let (link, _inbox, mut notices) = notice_channel(Queues::uniform(8));
        link.send_modify(connected);
        link.send_modify(|l| failed(l, "reset"));
        assert!(matches!(
            notices.recv().await,
            Some(Notice::Disconnected(_))
        ));
        link.send_modify(connected);
        assert!(matches!(notices.recv().await, Some(Notice::Connected)));
    }

    #[tokio::test]
    async fn notices_end_once_the_event_loop_is_gone_and_everything_was_read() {
        let (link, inbox, mut notices) = notice_channel(Queues::uniform(8));
        assert!(inbox.offer(message("last", 1)));
        link.send_modify(connected);
        drop((link, inbox));
        assert!(matches!(notices.recv().await, Some(Notice::Connected)));
        assert!(matches!(notices.recv().await, Some(Notice::Message(_))));
        assert!(notices.recv().await.is_none());
    }

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
