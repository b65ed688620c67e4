//! Notifications to webhooks: revocations and alerts, POSTed as JSON, signed with
//! HMAC-SHA256, retried with capped exponential backoff, then given up (dead letters).
//!
//! Nothing here waits on the request path or the audit writer: [`Webhooks::notify`]
//! puts a notification in each interested webhook's bounded queue and returns; a full
//! queue drops it (counted). One task per webhook delivers its queue in order, so a slow
//! or dead endpoint delays only its own notifications.
//!
//! A delivery is `POST {url}` with the JSON body and these headers:
//!
//! | header | value |
//! |---|---|
//! | `Content-Type` | `application/json` |
//! | `X-Tessera-Event` | `alert` or `revocation` |
//! | `X-Tessera-Delivery` | the notification's `id` (the same on every attempt) |
//! | `X-Tessera-Signature` | `sha256=` and the lowercase hex HMAC-SHA256 of the body under the webhook's secret |
//!
//! Any 2xx answer delivers it; anything else (another status, a connection error, no
//! answer within `timeout_ms`) is retried after `backoff_initial_ms`, doubling up to
//! `backoff_max_ms`, until `max_attempts` attempts; then it is a dead letter (counted and
//! logged). The body carries `id` and `at_ms`, so a receiver can drop duplicates and stale
//! replays; the signature proves the body comes from a holder of the secret.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// Header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";
/// Header carrying the notification's kind.
pub const EVENT_HEADER: &str = "x-tessera-event";
/// Header carrying the notification's id.
pub const DELIVERY_HEADER: &str = "x-tessera-delivery";

/// What a webhook may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// An anomaly alert, or a quarantine lifted or run out (the alerts topic's messages).
    Alert,
    /// A revocation committed for an operator's `revoke` request.
    Revocation,
}

impl NotificationKind {
    /// The name in the `X-Tessera-Event` header and the body's `type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Revocation => "revocation",
        }
    }
}

/// One `[[webhooks]]` entry (its `Debug` leaves the secret out).
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// A short name, the `webhook` label of the metrics (`[a-z0-9_-]`, 1 to 32).
    pub name: String,
    /// Where to POST: `http://` or `https://`.
    pub url: String,
    /// The HMAC-SHA256 key, at least 16 bytes.
    pub secret: String,
    /// What to send.
    pub events: Vec<NotificationKind>,
    /// Attempts per notification, the first included.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt, milliseconds; doubles after each failure.
    #[serde(default = "defaults::backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// The longest wait between attempts, milliseconds.
    #[serde(default = "defaults::backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// How long one attempt may take, milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Notifications waiting for delivery at most; more are dropped (counted).
    #[serde(default = "defaults::queue")]
    pub queue: usize,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

mod defaults {
    pub(super) fn max_attempts() -> u32 {
        8
    }
    pub(super) fn backoff_initial_ms() -> u64 {
        1000
    }
    pub(super) fn backoff_max_ms() -> u64 {
        60_000
    }
    pub(super) fn timeout_ms() -> u64 {
        5000
    }
    pub(super) fn queue() -> usize {
        1024
    }
}

impl WebhookConfig {
    /// What is wrong with the entry, if anything.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = (1..=32).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!(
                "webhooks: name `{}` must be 1 to 32 of a-z, 0-9, _ and -",
                self.name
            ));
        }
        let named = |m: &str| format!("webhooks `{}`: {m}", self.name);
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => return Err(named("url must be an http:// or https:// URL")),
        }
        if self.secret.len() < 16 {
            return Err(named("secret must be at least 16 bytes"));
        }
        if self.events.is_empty() {
            return Err(named("events must name `alert`, `revocation` or both"));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(named("max_attempts must be 1..=100"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err(named(
                "backoff_initial_ms must be positive and at most backoff_max_ms",
            ));
        }
        if !(1..=120_000).contains(&self.timeout_ms) {
            return Err(named("timeout_ms must be 1..=120000"));
        }
        if !(1..=65_536).contains(&self.queue) {
            return Err(named("queue must be 1..=65536"));
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1 for the first): the initial backoff,
    /// doubled per attempt, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .backoff_initial_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
        Duration::from_millis(doubled.min(self.backoff_max_ms))
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`: the signature header.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A notification, as it is POSTed.
#[derive(Debug)]
struct Notification {
    kind: NotificationKind,
    id: String,
    body: Vec<u8>,
}

/// One webhook's end of the queue, and its counters.
#[derive(Debug)]
struct Sink {
    events: Vec<NotificationKind>,
    tx: mpsc::Sender<Arc<Notification>>,
    dropped: Counter,
}

/// The configured webhooks: where notifications are put.
#[derive(Debug, Default)]
pub struct Webhooks {
    sinks: Vec<Sink>,
}

/// A webhook's delivery task, to be run (and joined) by the serving loop.
pub type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Webhooks {
    /// The webhooks of `configs`, and one delivery task for each. A task ends once the
    /// returned [`Webhooks`] is dropped and its queue is empty; after `stop` it no longer
    /// waits to retry (what is left gets one attempt each), so a shutdown is not held up
    /// by an endpoint that is down.
    pub fn start(
        configs: &[WebhookConfig],
        metrics: &Arc<Metrics>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(Self, Vec<Delivery>), reqwest::Error> {
        let mut sinks = Vec::with_capacity(configs.len());
        let mut tasks: Vec<Delivery> = Vec::with_capacity(configs.len());
        for config in configs {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let counters = metrics.webhook(&config.name);
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(config.timeout_ms))
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            sinks.push(Sink {
                events: config.events.clone(),
                tx,
                dropped: counters.dropped.clone(),
            });
            tasks.push(Box::pin(deliver(
                config.clone(),
                client,
                rx,
                counters,
                stop.clone(),
            )));
        }
        Ok((Self { sinks }, tasks))
    }

    /// Whether any webhook takes `kind`.
    pub fn wants(&self, kind: NotificationKind) -> bool {
        self.sinks.iter().any(|s| s.events.contains(&kind))
    }

    /// Queues a notification of `kind` for every webhook that takes it, without waiting:
    /// `fields` (a JSON object) gets `type` and a fresh `id` added. A full queue drops it.
    pub fn notify(&self, kind: NotificationKind, mut fields: serde_json::Value) {
        if !self.wants(kind) {
            return;
        }
        let mut id = [0u8; 16];
        // An id only tells deliveries apart; a failed generator still leaves a usable one.
        let _ = getrandom::fill(&mut id);
        let id = hex::encode(id);
        if let Some(map) = fields.as_object_mut() {
            map.insert("type".into(), kind.as_str().into());
            map.insert("id".into(), id.clone().into());
        }
        let notification = Arc::new(Notification {
            kind,
            id,
            body: serde_json::to_vec(&fields).unwrap_or_default(),
        });
        for sink in self.sinks.iter().filter(|s| s.events.contains(&kind)) {
            if sink.tx.try_send(Arc::clone(&notification)).is_err() {
                sink.dropped.inc();
            }
        }
    }
}

/// One webhook's counters (the `webhook` label is its name).
#[derive(Debug, Clone)]
pub struct WebhookCounters {
    /// Notifications delivered (a 2xx answer).
    pub delivered: Counter,
    /// Attempts that failed (each retried one, and the last one of a dead letter).
    pub failed_attempts: Counter,
    /// Notifications given up after `max_attempts`.
    pub dead_letters: Counter,
    /// Notifications dropped: the queue was full.
    pub dropped: Counter,
}

/// Delivers one webhook's queue, in order, until the queue closes.
async fn deliver(
    config: WebhookConfig,
    client: reqwest::Client,
    mut rx: mpsc::Receiver<Arc<Notification>>,
    counters: WebhookCounters,
    mut stop: watch::Receiver<bool>,
) {
    let secret = config.secret.as_bytes();
    while let Some(n) = rx.recv().await {
        let signature = signature(secret, &n.body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = client
                .post(&config.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(EVENT_HEADER, n.kind.as_str())
                .header(DELIVERY_HEADER, &n.id)
                .header(SIGNATURE_HEADER, &signature)
                .body(n.body.clone())
                .send()
                .await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("answered {}", r.status())),
                Err(e) => Some(e.to_string()),
            };
            let Some(failure) = failure else {
                counters.delivered.inc();
                break;
            };
            counters.failed_attempts.inc();
            let stopping = *stop.borrow();
            if attempt >= config.max_attempts || stopping {
                counters.dead_letters.inc();
                tracing::warn!(
                    webhook = %config.name,
                    id = %n.id,
                    attempts = attempt,
                    error = %failure,
                    "webhook notification given up (dead letter)"
                );
                break;
            }
            tracing::debug!(webhook = %config.name, attempt, error = %failure, "webhook retry");
            tokio::select! {
                () = tokio::time::sleep(config.backoff(attempt)) => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        WebhookConfig {
            name: "ops".into(),
            url: "https://hooks.example/tessera".into(),
            secret: "0123456789abcdef".into(),
            events: vec![NotificationKind::Alert],
            max_attempts: 8,
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
            timeout_ms: 5000,
            queue: 16,
        }
    }

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_backoff_doubles_from_the_initial_wait_up_to_the_cap() {
        let c = config();
        let waits: Vec<u128> = (1..=9).map(|a| c.backoff(a).as_millis()).collect();
        assert_eq!(
            waits,
            [
                1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000
            ]
        );
        assert_eq!(c.backoff(u32::MAX).as_millis(), 60_000);
    }

    #[test]
    fn entries_are_checked() {
        assert_eq!(config().check(), Ok(()));
        for (bad, what) in [
            (
                WebhookConfig {
                    url: "ftp://x".into(),
                    ..config()
                },
                "url",
            ),
            (
                WebhookConfig {
                    secret: "short".into(),
                    ..config()
                },
                "secret",
            ),
            (
                WebhookConfig {
                    name: "Ops Team".into(),
                    ..config()
                },
                "name",
            ),
            (
                WebhookConfig {
                    events: vec![],
                    ..config()
                },
                "events",
            ),
            (
                WebhookConfig {
                    backoff_max_ms: 10,
                    ..config()
                },
                "backoff",
            ),
        ] {
            let err = bad.check().expect_err(what);
            assert!(err.contains(what), "{err}");
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let metrics = Arc::new(Metrics::new());
        let c = WebhookConfig {
            queue: 2,
            ..config()
        };
        // The delivery task is not run: nothing leaves the queue.
        let (_stop, stop) = watch::channel(false);
        let (hooks, _tasks) = Webhooks::start(&[c], &metrics, &stop).expect("client");
        for i in 0..5 {
            hooks.notify(NotificationKind::Alert, serde_json::json!({ "n": i }));
        }
        // Not taken by this webhook: not queued, not dropped.
        hooks.notify(NotificationKind::Revocation, serde_json::json!({}));
        assert_eq!(metrics.webhook("ops").dropped.get(), 3);
    }
}
