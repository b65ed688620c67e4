//! `tessera-client`: the Tessera client over MQTT, for control apps, operators and tests.
//! It signs requests with the client's own key, publishes them on its request topic, and
//! waits for the signed response that answers them (same client, request id and nonce,
//! hub signature), as docs/PROTOCOL.md specifies.
//!
//! The client keeps the hub's key set current from the retained `tessera/v1/hub/keys`
//! message, starting from the trust anchor it was given. It links no database, CLI or
//! policy code: only the protocol core (`tessera-shared`) and the MQTT transport.
//!
//! A control app gets an access token for a device and presents it with its command; the
//! token is cached and renewed through its refresh grant before it expires:
//!
//! ```no_run
//! use std::time::Duration;
//! use tessera_client::{Client, MqttConfig};
//! use tessera_shared::crypto::{P256Signer, PublicKey};
//!
//! # async fn app(key: P256Signer, trust_anchor: PublicKey) -> Result<(), tessera_client::ClientError> {
//! let broker = MqttConfig::plain("127.0.0.1", 1883, "app-7");
//! let mut client = Client::connect(&broker, "app-7", key, trust_anchor, Duration::from_secs(10)).await?;
//! let token = client.access_token("door-1", "door:open").await?;
//! let presentation = client.present(&token)?;
//! // Send `presentation` to door-1 with the command; its agent checks it (PROTOCOL.md §13).
//! # let _ = presentation;
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! An operator revokes with [`Client::revoke`] and follows the hub's events with
//! [`Client::watch`] and [`Client::next_event`].

#[cfg(feature = "axum")]
pub mod http;
pub mod keyfile;
mod tokens;
pub mod verifier;

use std::collections::HashMap;
use std::time::Duration;

use tessera_mqtt::MqttClient;
use tessera_shared::crypto::{P256Signer, PublicKey};
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{
    ErrorCode, NONCE_LEN, Request, RequestBody, ResponseBody, RevokeTarget, SignedResponse,
};
use tessera_shared::topic;
use tokio::sync::watch;

pub use tessera_mqtt::{self as mqtt, MqttConfig, MqttError};
use tessera_mqtt::{Notice, Notices, QoS};
pub use tokens::{AccessToken, present};

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The MQTT connection failed.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// No (valid) response within the timeout.
    #[error("no response from the hub within {0:?}")]
    Timeout(Duration),
    /// No response within the timeout that verifies, but responses came that do not:
    /// signed by a key the client does not trust.
    #[error(
        "no response from the hub within {timeout:?} that verifies with the trust anchor: \
         {untrusted} signed by a key it does not trust came (is the trust anchor this hub's?)",
        untrusted = if *.untrusted == 1 { "1 response".to_owned() } else { format!("{} responses", .untrusted) }
    )]
    Untrusted {
        /// How long the client waited.
        timeout: Duration,
        /// Responses on the client's topic that did not verify.
        untrusted: usize,
    },
    /// The hub refused the request.
    #[error("refused: {code}: {reason}")]
    Refused {
        /// The wire error code.
        code: ErrorCode,
        /// The hub's reason.
        reason: String,
    },
    /// The request could not be built.
    #[error("request: {0}")]
    Core(tessera_shared::Error),
    /// The OS random number generator failed.
    #[error("random number generator: {0}")]
    Random(String),
    /// The hub answered with a body of another kind than the request asks for.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// A successful answer of the hub, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Enrollment done.
    Enrolled,
    /// A token, with the new refresh grant and its expiry.
    Token {
        /// The token bytes.
        token: Vec<u8>,
        /// The refresh grant and when it expires.
        grant: Option<(Vec<u8>, u64)>,
    },
    /// A revocation is durable.
    Revoked {
        /// Clients or tokens newly revoked.
        revoked: u64,
        /// Revocation entries published.
        entries: u64,
        /// Devices told on their control topic.
        notified: u64,
    },
    /// A signed page of a revocation stream.
    Revocations {
        /// The signed page.
        page: Vec<u8>,
    },
}

impl From<ResponseBody<'_>> for Answer {
    fn from(body: ResponseBody<'_>) -> Self {
        match body {
            ResponseBody::Enrolled => Answer::Enrolled,
            ResponseBody::Token { token, grant } => Answer::Token {
                token: token.to_vec(),
                grant: grant.map(|(g, e)| (g.to_vec(), e)),
            },
            ResponseBody::Revoked {
                revoked,
                entries,
                notified,
            } => Answer::Revoked {
                revoked,
                entries,
                notified,
            },
            ResponseBody::Revocations { page } => Answer::Revocations {
                page: page.to_vec(),
            },
        }
    }
}

/// What a revocation did, as the hub answered once it was durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// Clients or tokens newly revoked.
    pub revoked: u64,
    /// Revocation entries published.
    pub entries: u64,
    /// Devices told on their control topic.
    pub notified: u64,
}

/// A connected client.
pub struct Client {
    id: String,
    signer: P256Signer,
    keys: KeySet,
    mqtt: MqttClient,
    notices: Notices,
    /// Every topic subscribed, made again at each reconnection (the session starts clean).
    subscriptions: Vec<(String, QoS)>,
    stop: watch::Sender<bool>,
    next_request: u64,
    /// The hub's time minus ours, learned from responses (seconds).
    clock_offset: i64,
    /// How long the high-level calls ([`Client::access_token`], [`Client::revoke`]…) wait
    /// for an answer: the `timeout` given to [`Client::connect`].
    timeout: Duration,
    /// Access tokens held, by device and scope ([`Client::access_token`]).
    tokens: HashMap<(String, String), AccessToken>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Waits up to `timeout` for the connection to come up; if it does not, stops its event
/// loop (`stop`) and says so.
pub(crate) async fn await_connected(
    notices: &mut Notices,
    stop: &watch::Sender<bool>,
    timeout: Duration,
) -> Result<(), ClientError> {
    let connected = tokio::time::timeout(timeout, async {
        while let Some(n) = notices.recv().await {
            if matches!(n, Notice::Connected) {
                return true;
            }
        }
        false
    })
    .await;
    if matches!(connected, Ok(true)) {
        Ok(())
    } else {
        let _ = stop.send(true);
        Err(ClientError::Timeout(timeout))
    }
}

/// Unix seconds by the system clock (0 before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Client {
    /// Connects as `id` and subscribes to the client's response topic and the key set.
    /// `timeout` bounds the connection, and each answer the high-level calls wait for.
    pub async fn connect(
        config: &MqttConfig,
        id: &str,
        signer: P256Signer,
        trust_anchor: PublicKey,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let resp = topic::response(id).map_err(ClientError::Core)?;
        let (stop, stop_rx) = watch::channel(false);
        let (mqtt, mut notices) = mqtt::connect(config, 64, stop_rx)?;
        await_connected(&mut notices, &stop, timeout).await?;
        let mut client = Self {
            id: id.to_string(),
            signer,
            keys: KeySet::from_anchor(trust_anchor),
            mqtt,
            notices,
            subscriptions: Vec::new(),
            stop,
            next_request: 1,
            clock_offset: 0,
            timeout,
            tokens: HashMap::new(),
        };
        client
            .add_subscription(resp.as_str(), QoS::AtLeastOnce)
            .await?;
        client
            .add_subscription(topic::KEYS, QoS::AtLeastOnce)
            .await?;
        Ok(client)
    }

    async fn add_subscription(&mut self, topic: &str, qos: QoS) -> Result<(), ClientError> {
        self.mqtt.subscribe(topic, qos).await?;
        self.subscriptions.push((topic.to_owned(), qos));
        Ok(())
    }

    /// The next notice, with the subscriptions made again first when it says the
    /// connection is back: the broker starts every session clean, so without them the
    /// client would wait for answers it is no longer subscribed to. A request in flight
    /// across the outage is not sent again (its answer may have gone out meanwhile, and a
    /// second copy would be refused as a replay): it times out, and the caller asks again.
    async fn next_notice(&mut self) -> Option<Notice> {
        let notice = self.notices.recv().await?;
        if matches!(notice, Notice::Connected) {
            for (topic, qos) in &self.subscriptions {
                if let Err(e) = self.mqtt.subscribe(topic.as_str(), *qos).await {
                    tracing::warn!(topic, error = %e, "cannot subscribe again after reconnecting");
                }
            }
        }
        Some(notice)
    }

    /// Sends one request and waits up to `timeout` for its answer.
    pub async fn request(
        &mut self,
        body: RequestBody<'_>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| ClientError::Random(e.to_string()))?;
        let request_id = self.next_request;
        self.next_request += 1;
        let issued_at = unix_now().saturating_add_signed(self.clock_offset);
        let request = Request {
            client: &self.id,
            request_id,
            issued_at,
            nonce,
            body,
        };
        // Room for the largest request: a revoke naming the most devices one may.
        let room = match &request.body {
            RequestBody::Revoke(RevokeTarget::Devices(list)) => list
                .iter()
                .map(|id| id.len() + 3)
                .sum::<usize>()
                .saturating_add(1024)
                .min(tessera_shared::cose::MAX_REQUEST_LEN),
            _ => 4096,
        };
        let mut buf = vec![0u8; room];
        let n = request
            .sign(&self.signer, &mut buf)
            .map_err(ClientError::Core)?;
        let req_topic = topic::request(&self.id).map_err(ClientError::Core)?;
        self.mqtt
            .publish(
                req_topic.as_str(),
                QoS::AtLeastOnce,
                false,
                buf[..n].to_vec(),
            )
            .await?;
        let resp_topic = topic::response(&self.id).map_err(ClientError::Core)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut untrusted = 0;
        let timed_out = |untrusted| match untrusted {
            0 => ClientError::Timeout(timeout),
            untrusted => ClientError::Untrusted { timeout, untrusted },
        };
        loop {
            let notice = tokio::time::timeout_at(deadline, self.next_notice())
                .await
                .map_err(|_| timed_out(untrusted))?
                .ok_or_else(|| timed_out(untrusted))?;
            let Notice::Message(msg) = notice else {
                continue;
            };
            if msg.topic == topic::KEYS {
                if let Err(e) = self.keys.update(&msg.payload) {
                    tracing::warn!(error = %e, "ignoring key set that does not verify");
                }
                continue;
            }
            if msg.topic != resp_topic.as_str() {
                continue;
            }
            // Anything that does not verify or does not answer this request is someone
            // else's (or a replay): ignore it and keep waiting.
            let Ok(signed) = SignedResponse::decode(&msg.payload) else {
                continue;
            };
            let Ok(response) = signed.verify(&self.keys) else {
                tracing::warn!("ignoring response that does not verify with the hub's keys");
                untrusted += 1;
                continue;
            };
            if !response.answers(&self.id, request_id, &nonce) {
                continue;
            }
            self.clock_offset = i64::try_from(response.hub_time).unwrap_or(i64::MAX)
                - i64::try_from(unix_now()).unwrap_or(i64::MAX);
            return match response.outcome {
                Err(e) => Err(ClientError::Refused {
                    code: e.code,
                    reason: e.reason.to_string(),
                }),
                Ok(body) => Ok(Answer::from(body)),
            };
        }
    }

    /// The hub's time as this client knows it (its own clock corrected by what the
    /// hub's answers said), Unix milliseconds.
    pub fn hub_now_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        now.saturating_add_signed(self.clock_offset.saturating_mul(1000))
    }

    /// Revokes `target` as an operator (every kind of PROTOCOL.md §8.5.5); returns once the
    /// revocation is durable on the hub.
    pub async fn revoke(&mut self, target: RevokeTarget<'_>) -> Result<Revoked, ClientError> {
        match self
            .request(RequestBody::Revoke(target), self.timeout)
            .await?
        {
            Answer::Revoked {
                revoked,
                entries,
                notified,
            } => Ok(Revoked {
                revoked,
                entries,
                notified,
            }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lifts the quarantine of `client` as an operator (PROTOCOL.md §8.5.7).
    pub async fn lift_quarantine(&mut self, client: &str) -> Result<(), ClientError> {
        match self
            .request(RequestBody::LiftQuarantine { client }, self.timeout)
            .await?
        {
            // The empty success body.
            Answer::Enrolled => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Follows the hub's event stream (operators whose role lists `watch`): subscribes to
    /// it; [`Client::next_event`] then gives each event.
    pub async fn watch(&mut self) -> Result<(), ClientError> {
        self.subscribe(topic::EVENTS).await
    }

    /// Follows the hub's alerts topic (anomalies and quarantines), as [`Client::watch`].
    pub async fn watch_alerts(&mut self) -> Result<(), ClientError> {
        self.subscribe(topic::ALERTS).await
    }

    /// The next message of the event stream or alerts topic followed: its topic and its
    /// JSON payload (PROTOCOL.md §7.1, §7.5). `None` once the connection is closed for good.
    pub async fn next_event(&mut self) -> Option<(String, Vec<u8>)> {
        while let Some(msg) = self.next_message().await {
            if msg.topic == topic::EVENTS || msg.topic == topic::ALERTS {
                return Some((msg.topic, msg.payload));
            }
        }
        None
    }

    /// The hub's key set as currently trusted.
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Waits for the next message on any subscribed topic (for `watch`).
    pub async fn next_message(&mut self) -> Option<mqtt::Incoming> {
        while let Some(n) = self.next_notice().await {
            if let Notice::Message(m) = n {
                return Some(m);
            }
        }
        None
    }

    /// Subscribes to another topic (for `watch`), again after each reconnection too.
    pub async fn subscribe(&mut self, topic: &str) -> Result<(), ClientError> {
        self.add_subscription(topic, QoS::AtMostOnce).await
    }

    /// Disconnects cleanly: returns once the DISCONNECT went out (the event loop ends
    /// then, closing the notices), or after a second if the broker is unreachable.
    pub async fn close(mut self) {
        if self.mqtt.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.notices.recv().await.is_some() {}
            })
            .await;
        }
        let _ = self.stop.send(true);
    }
}
