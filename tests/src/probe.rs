//! A small MQTT v5 client for watching and poking broker traffic in tests.
//!
//! The rumqttc event loop runs in its own tokio task and is polled continuously; requests
//! (subscribe, publish) are sent from the caller's task, never from the polling one
//! (rumqtt#1025). When the connection drops, the task keeps polling after a short pause,
//! which makes rumqttc reconnect. Subscriptions do not survive a reconnect (clean start, and
//! the test brokers keep no sessions): subscribe again after [`MqttProbe::wait_connected`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, TlsConfiguration, Transport};
use tokio::sync::{Mutex, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

pub use rumqttc::v5::mqttbytes::QoS;

/// How long the probe waits for a CONNACK, SUBACK or PUBACK unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between reconnection attempts (rumqttc has no backoff of its own, rumqtt#918).
const RECONNECT_DELAY: Duration = Duration::from_millis(50);

/// Where and how an [`MqttProbe`] connects.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    client_id: String,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    credentials: Option<(String, String)>,
    keep_alive: Duration,
    timeout: Duration,
    max_packet_size: u32,
}

impl ProbeOptions {
    /// A plain-TCP, anonymous client. [`crate::Broker::probe_options`] fills these in for a
    /// test broker.
    pub fn new(client_id: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Self {
            client_id: client_id.into(),
            host: host.into(),
            port,
            tls: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            timeout: DEFAULT_TIMEOUT,
            max_packet_size: crate::broker::DEFAULT_MAX_PACKET_SIZE,
        }
    }

    /// Connects over TLS with this rustls config (see [`crate::TestPki::client_config`]).
    /// The server name checked is the host, so `127.0.0.1` must be an IP SAN.
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Connects over plain TCP.
    pub fn without_tls(mut self) -> Self {
        self.tls = None;
        self
    }

    /// Sends a username and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((username.into(), password.into()));
        self
    }

    /// Another client id (a broker's probe options start with the id given to them).
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// The MQTT keep-alive interval (default 30 s; at least 1 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.max(Duration::from_secs(1));
        self
    }

    /// How long connect, subscribe and acknowledged publishes wait (default
    /// [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest packet the probe accepts (rumqttc's own default is only 10 KiB).
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes;
        self
    }

    fn mqtt_options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(&self.client_id, &self.host, self.port);
        options.set_keep_alive(self.keep_alive);
        options.set_max_packet_size(Some(self.max_packet_size));
        options.set_connection_timeout(self.timeout.as_secs().max(1));
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(tls),
            )));
        }
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(self.timeout.as_secs().max(1));
        options.set_network_options(network);
        options
    }
}

/// A message the probe received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The QoS it was delivered with.
    pub qos: QoS,
    /// Whether the broker delivered it from its retained store.
    pub retain: bool,
    /// When the probe's event loop read it off the connection.
    pub received_at: std::time::Instant,
}

/// Connection state, as the event-loop task sees it.
#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    /// Successful CONNACKs so far.
    connects: u64,
    /// Failed connection attempts and dropped connections so far.
    failures: u64,
    last_error: Option<String>,
}

/// Acknowledgement-related events, matched to requests by packet id.
#[derive(Debug, Clone)]
enum Progress {
    SentPublish(u16),
    SentSubscribe(u16),
    SentUnsubscribe(u16),
    PubAck(u16, PubAckReason),
    PubComp(u16),
    SubAck(u16, Vec<SubscribeReasonCode>),
    UnsubAck(u16),
}

/// An MQTT v5 client for tests. See the module docs.
#[derive(Debug)]
pub struct MqttProbe {
    client: AsyncClient,
    client_id: String,
    timeout: Duration,
    link: watch::Receiver<Link>,
    acks: broadcast::Sender<Progress>,
    incoming: mpsc::UnboundedReceiver<Message>,
    /// Received messages that an `expect_message` skipped because they did not match.
    backlog: VecDeque<Message>,
    /// Serialises acknowledged requests, so each can match the packet id rumqttc assigned.
    requests: Mutex<()>,
    task: JoinHandle<()>,
}

impl MqttProbe {
    /// Connects and waits for the outcome of the first attempt: `Ok` once the broker
    /// accepted (CONNACK success), the error of the attempt otherwise (TLS failure, refused,
    /// timeout). Must run inside a tokio runtime.
    pub async fn connect(options: ProbeOptions) -> Result<Self> {
        let probe = Self::start(options);
        let mut link = probe.link.clone();
        let deadline = Instant::now() + probe.timeout;
        let outcome = timeout_at(deadline, link.wait_for(|l| l.connected || l.failures > 0))
            .await
            .map(|waited| waited.is_ok());
        let state = link.borrow().clone();
        match outcome {
            Ok(true) if state.connected => Ok(probe),
            Ok(_) => Err(anyhow!(
                "probe {:?} could not connect: {}",
                probe.client_id,
                state.last_error.as_deref().unwrap_or("connection closed")
            )),
            Err(_) => bail!(
                "probe {:?} got no CONNACK within {:?}",
                probe.client_id,
                probe.timeout
            ),
        }
    }

    /// Starts the event loop without waiting: it keeps trying to connect (every 50 ms) until
    /// the probe drops. Use [`MqttProbe::wait_connected`]. Must run inside a tokio runtime.
    pub fn start(options: ProbeOptions) -> Self {
        let (client, eventloop) = AsyncClient::new(options.mqtt_options(), 64);
        let (link_tx, link) = watch::channel(Link::default());
        let (acks, _) = broadcast::channel(1024);
        let (messages, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, link_tx, acks.clone(), messages));
        Self {
            client,
            client_id: options.client_id,
            timeout: options.timeout,
            link,
            acks,
            incoming,
            backlog: VecDeque::new(),
            requests: Mutex::new(()),
            task,
        }
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether the probe is connected now.
    pub fn is_connected(&self) -> bool {
        self.link.borrow().connected
    }

    /// How many times the probe has connected (1 after the first CONNACK; a reconnect adds
    /// one).
    pub fn connect_count(&self) -> u64 {
        self.link.borrow().connects
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.link.borrow().last_error.clone()
    }

    /// The underlying rumqttc client, for requests the probe does not wrap. Do not await it
    /// from a task that must keep polling (the probe's own task is separate).
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Waits until the probe is connected (for example after a broker restart).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        self.wait_link(timeout, "connected", |l| l.connected).await
    }

    /// Waits until the probe has noticed it is disconnected.
    pub async fn wait_disconnected(&self, timeout: Duration) -> Result<()> {
        self.wait_link(timeout, "disconnected", |l| !l.connected)
            .await
    }

    async fn wait_link(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl FnMut(&Link) -> bool,
    ) -> Result<()> {
        let mut link = self.link.clone();
        match tokio::time::timeout(timeout, link.wait_for(condition)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("probe {:?}: event loop stopped", self.client_id),
            Err(_) => bail!(
                "probe {:?} not {what} within {timeout:?} (last error: {})",
                self.client_id,
                self.last_error().as_deref().unwrap_or("none")
            ),
        }
    }

    /// Subscribes to one filter and waits for the SUBACK; returns its reason code
    /// ([`SubscribeReasonCode::Success`] with the granted QoS, or a refusal such as
    /// [`SubscribeReasonCode::NotAuthorized`]). A refusal is not an error here: use
    /// [`MqttProbe::subscribe_granted`] for that. Mosquitto 2.0 grants subscriptions its ACL
    /// forbids and filters at delivery, so a granted subscription proves nothing about
    /// what will arrive.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<SubscribeReasonCode> {
        let _turn = self.requests.lock().await;
        let mut acks = self.acks.subscribe();
        let deadline = Instant::now() + self.timeout;
        self.client
            .subscribe(filter, qos)
            .await
            .context("queueing subscribe")?;
        let pkid = self
            .wait_ack(&mut acks, deadline, "sending SUBSCRIBE", |ack| match ack {
                Progress::SentSubscribe(pkid) => Some(*pkid),
                _ => None,
            })
            .await?;
        let codes = self
            .wait_ack(&mut acks, deadline, "SUBACK", |ack| match ack {
                Progress::SubAck(id, codes) if *id == pkid => Some(codes.clone()),
                _ => None,
            })
            .await?;
        codes
            .into_iter()
            .next()
            .context("SUBACK without a reason code")
    }

    /// Subscribes and fails unless the broker granted the subscription.
    pub async fn subscribe_granted(&self, filter: &str, qos: QoS) -> Result<()> {
        match self.subscribe(filter, qos).await? {
            SubscribeReasonCode::Success(_) => Ok(()),
            refused => bail!(
                "probe {:?}: subscription to {filter:?} refused: {refused:?}",
                self.client_id
            ),
        }
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&self, filter: &str) -> Result<()> {
        let _turn = self.requests.lock().await;
        let mut acks = self.acks.subscribe();
        let deadline = Instant::now() + self.timeout;
        self.client
            .unsubscribe(filter)
            .await
            .context("queueing unsubscribe")?;
        let pkid = self
            .wait_ack(
                &mut acks,
                deadline,
                "sending UNSUBSCRIBE",
                |ack| match ack {
                    Progress::SentUnsubscribe(pkid) => Some(*pkid),
                    _ => None,
                },
            )
            .await?;
        self.wait_ack(&mut acks, deadline, "UNSUBACK", |ack| match ack {
            Progress::UnsubAck(id) if *id == pkid => Some(()),
            _ => None,
        })
        .await
    }

    /// Queues a publish and returns without waiting for the broker (while disconnected, it
    /// goes out after the reconnect).
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<()> {
        let _turn = self.requests.lock().await;
        self.client
            .publish(topic, qos, retain, payload.into())
            .await
            .context("queueing publish")
    }

    /// Publishes and waits until the broker has taken it: PUBACK for QoS 1, returning its
    /// reason (Mosquitto 2.0 answers `NoMatchingSubscribers` when nobody listens and
    /// `NotAuthorized` when the ACL forbids the topic; the message is then dropped),
    /// PUBCOMP for QoS 2, just the write for QoS 0 (both reported as `Success`). Do not run it concurrently with
    /// [`MqttProbe::publish`] on the same probe: acknowledgements are matched by the next
    /// packet id rumqttc sends.
    pub async fn publish_acked(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PubAckReason> {
        let _turn = self.requests.lock().await;
        let mut acks = self.acks.subscribe();
        let deadline = Instant::now() + self.timeout;
        self.client
            .publish(topic, qos, retain, payload.into())
            .await
            .context("queueing publish")?;
        let pkid = self
            .wait_ack(&mut acks, deadline, "sending PUBLISH", |ack| match ack {
                Progress::SentPublish(pkid) => Some(*pkid),
                _ => None,
            })
            .await?;
        match qos {
            QoS::AtMostOnce => Ok(PubAckReason::Success),
            QoS::AtLeastOnce => {
                self.wait_ack(&mut acks, deadline, "PUBACK", |ack| match ack {
                    Progress::PubAck(id, reason) if *id == pkid => Some(*reason),
                    _ => None,
                })
                .await
            }
            QoS::ExactlyOnce => {
                self.wait_ack(&mut acks, deadline, "PUBCOMP", |ack| match ack {
                    Progress::PubComp(id) if *id == pkid => Some(PubAckReason::Success),
                    _ => None,
                })
                .await
            }
        }
    }

    async fn wait_ack<T>(
        &self,
        acks: &mut broadcast::Receiver<Progress>,
        deadline: Instant,
        what: &str,
        mut select: impl FnMut(&Progress) -> Option<T>,
    ) -> Result<T> {
        loop {
            match timeout_at(deadline, acks.recv()).await {
                Ok(Ok(ack)) => {
                    if let Some(found) = select(&ack) {
                        return Ok(found);
                    }
                }
                // Dropped events are not ours unless we are very unlucky; keep waiting.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    bail!("probe {:?}: event loop stopped", self.client_id)
                }
                Err(_) => bail!(
                    "probe {:?}: no {what} within {:?} (connected: {}, last error: {})",
                    self.client_id,
                    self.timeout,
                    self.is_connected(),
                    self.last_error().as_deref().unwrap_or("none")
                ),
            }
        }
    }

    /// Waits for the next message whose topic matches `filter` (MQTT wildcards `+` and `#`),
    /// for at most `timeout`. Messages that do not match stay buffered for later calls.
    pub async fn expect_message(&mut self, filter: &str, timeout: Duration) -> Result<Message> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| topic_matches(filter, &m.topic))
            && let Some(message) = self.backlog.remove(i)
        {
            return Ok(message);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(message)) if topic_matches(filter, &message.topic) => return Ok(message),
                Ok(Some(other)) => self.backlog.push_back(other),
                Ok(None) => bail!("probe {:?}: event loop stopped", self.client_id),
                Err(_) => bail!(
                    "probe {:?}: no message on {filter:?} within {timeout:?} (connected: {}, \
                     other topics seen: {:?})",
                    self.client_id,
                    self.is_connected(),
                    self.backlog.iter().map(|m| &m.topic).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Fails if a message matching `filter` arrives within `window` (or is already
    /// buffered). Proving a negative takes the whole window: keep it short.
    pub async fn expect_no_message(&mut self, filter: &str, window: Duration) -> Result<()> {
        match self.expect_message(filter, window).await {
            Ok(message) => bail!(
                "probe {:?}: unexpected message on {:?} ({} bytes)",
                self.client_id,
                message.topic,
                message.payload.len()
            ),
            Err(_) => Ok(()),
        }
    }

    /// Every message received and not yet consumed, oldest first.
    pub fn take_messages(&mut self) -> Vec<Message> {
        while let Ok(message) = self.incoming.try_recv() {
            self.backlog.push_back(message);
        }
        self.backlog.drain(..).collect()
    }

    /// Sends DISCONNECT and waits briefly for the event loop to write it; the probe is
    /// consumed. Dropping a probe instead just closes the socket (the broker then sends any
    /// will message).
    pub async fn disconnect(self) -> Result<()> {
        self.client
            .disconnect()
            .await
            .context("queueing disconnect")?;
        let mut link = self.link.clone();
        // The task ends after writing DISCONNECT (see `drive`).
        let _ = tokio::time::timeout(self.timeout, link.wait_for(|l| !l.connected)).await;
        Ok(())
    }
}

impl Drop for MqttProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls the event loop until the probe drops or disconnects.
async fn drive(
    mut eventloop: EventLoop,
    link: watch::Sender<Link>,
    acks: broadcast::Sender<Progress>,
    messages: mpsc::UnboundedSender<Message>,
) {
    loop {
        let ack = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                link.send_modify(|l| {
                    l.connected = true;
                    l.connects += 1;
                });
                None
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = messages.send(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    qos: p.qos,
                    retain: p.retain,
                    received_at: std::time::Instant::now(),
                });
                None
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => Some(Progress::PubAck(a.pkid, a.reason)),
            Ok(Event::Incoming(Packet::PubComp(c))) => Some(Progress::PubComp(c.pkid)),
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                Some(Progress::SubAck(s.pkid, s.return_codes))
            }
            Ok(Event::Incoming(Packet::UnsubAck(u))) => Some(Progress::UnsubAck(u.pkid)),
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                link.send_modify(|l| {
                    l.connected = false;
                    l.last_error = Some(format!("broker sent DISCONNECT: {:?}", d.reason_code));
                });
                None
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Some(Progress::SentPublish(pkid)),
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => Some(Progress::SentSubscribe(pkid)),
            Ok(Event::Outgoing(Outgoing::Unsubscribe(pkid))) => {
                Some(Progress::SentUnsubscribe(pkid))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                link.send_modify(|l| l.connected = false);
                return;
            }
            Ok(_) => None,
            Err(e) => {
                link.send_modify(|l| {
                    l.connected = false;
                    l.failures += 1;
                    l.last_error = Some(e.to_string());
                });
                if matches!(e, rumqttc::v5::ConnectionError::RequestsDone) {
                    return;
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
                None
            }
        };
        if let Some(ack) = ack {
            // No receiver just means nobody is waiting for an acknowledgement.
            let _ = acks.send(ack);
        }
    }
}

/// Whether `topic` matches the MQTT topic filter `filter` (`+` one level, `#` the rest).
/// Per MQTT, wildcards at the first level do not match topics starting with `$`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(topic_matches("a/+", "a/b"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("#", "a/b"));
        assert!(topic_matches("+/+/c", "a/b/c"));
        assert!(!topic_matches("a/b", "a"));
        assert!(!topic_matches("#", "$SYS/broker/uptime"));
        assert!(!topic_matches("+/broker", "$SYS/broker"));
        assert!(topic_matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(topic_matches("a//c", "a//c"));
    }
}
