//! One simulated device: the `shared` agent state machine fed with MQTT notices and
//! timers, its actions performed in order (subscribe, publish, store to flash, wipe, wake),
//! exactly as `tessera-agent`'s shell does, but with an in-memory flash instead of the
//! encrypted store on disk, and with everything it saw counted for the fleet summary.
//!
//! As in the agent, the task that owns the machine never waits on the MQTT client: what is
//! to be sent goes through a channel to a publisher task (rumqtt#1025).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5::AsyncClient;
use tessera_mqtt::{Incoming, MqttConfig, Notice, QoS};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Report, State};
use tessera_shared::crypto::{P256Signer, PublicKey};
use tokio::sync::{mpsc, watch};

use crate::Error;

/// Timers and token expiry are re-checked at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Capacity of each device's MQTT request queue and notice channel.
const MQTT_CAPACITY: usize = 32;

/// Fleet-wide counts the devices keep up to date while they run, for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    /// Devices connected to the broker now.
    pub connected: AtomicU64,
    /// Devices holding a valid device token now.
    pub holding: AtomicU64,
    /// Device tokens received so far.
    pub tokens: AtomicU64,
    /// Lapses so far.
    pub lapses: AtomicU64,
    /// Whether the hub is reachable (the broker and the hub run); a device that loses its
    /// token while it is not does not count a lapse. Always true in `steady`.
    pub hub_reachable: AtomicBool,
}

/// What one device saw during the run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The device id.
    pub id: String,
    /// Device tokens received (the first one included).
    pub tokens: u64,
    /// Times the device went from holding a valid token to holding none while the hub was
    /// reachable.
    pub lapses: u64,
    /// Milliseconds spent without a valid token after the first one, while the hub was
    /// reachable.
    pub lapse_ms: u64,
    /// From the first enrollment request to the first token held, ms.
    pub first_token_ms: Option<u64>,
    /// From each refresh request (the first attempt) to the new token held, ms.
    pub refresh_latencies_ms: Vec<u64>,
    /// Refusals and failures by code (`timeout` for a request with no answer in time).
    pub errors: BTreeMap<&'static str, u64>,
    /// Whether it held a valid token when the run ended.
    pub holding_at_end: bool,
    /// Whether the hub revoked it.
    pub revoked: bool,
    /// When (Unix ms) its machine reported it revoked (and wiped its flash).
    pub revoked_at_ms: Option<u64>,
    /// Whether some token exchange of its needed more than one request (a retry after a
    /// timeout or a refusal) before the token arrived.
    pub retried: bool,
}

/// What a device needs to start.
#[derive(Debug)]
pub struct Spec {
    /// The machine's configuration (device id, audience, enrollment code key...).
    pub config: AgentConfig,
    /// The hub's trust anchor.
    pub anchor: PublicKey,
    /// The broker.
    pub mqtt: MqttConfig,
}

/// The current Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random32() -> Result<[u8; 32], Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(Error::Random)?;
    Ok(bytes)
}

/// A fresh P-256 key from the OS generator: the device's own, never leaving it.
pub fn generate_key() -> Result<P256Signer, Error> {
    loop {
        // A random scalar is outside the group order with probability ~2^-32.
        if let Ok(signer) = P256Signer::from_scalar(&random32()?) {
            return Ok(signer);
        }
    }
}

/// Something for the publisher task to send.
#[derive(Debug)]
enum Outbound {
    Subscribe(String),
    Publish { topic: String, payload: Vec<u8> },
}

/// Sends what the machine publishes, in order (a subscription before the request that
/// needs it).
async fn publisher(client: AsyncClient, mut rx: mpsc::UnboundedReceiver<Outbound>) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Outbound::Subscribe(t) => client.subscribe(t, QoS::AtLeastOnce).await,
            Outbound::Publish { topic, payload } => {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
            }
        };
        if sent.is_err() {
            // The event loop is gone: the device is stopping.
            return;
        }
    }
}

/// The machine, its flash and its tally.
struct Device {
    agent: Box<Agent<P256Signer>>,
    /// The simulated flash: the plaintext of the last `Store` action. Firmware would seal
    /// it with the record format; power loss during writes is a scenario still to come.
    flash: Option<Vec<u8>>,
    outbound: mpsc::UnboundedSender<Outbound>,
    live: Arc<Live>,
    outcome: Outcome,
    connected: bool,
    /// Whether it held a valid token at the last check.
    holding: bool,
    /// Since when (local ms) it holds no valid token, after its first one.
    lapsed_since: Option<u64>,
    /// When (local ms) the first request of the token exchange in progress went out.
    asking_since: Option<u64>,
    /// Whether a request of the token exchange in progress failed (timed out, refused,
    /// not sent, answer rejected), so another try follows.
    try_failed: bool,
}

impl Device {
    /// Whether the machine holds a device token that is valid at hub time (the machine's
    /// idea of it: local time plus the offset it learned from the hub).
    fn holds_valid_token(&self, now: u64) -> bool {
        let hub_now = now.saturating_add_signed(self.agent.clock_offset_ms());
        self.agent.token().is_some()
            && self
                .agent
                .token_expires_at()
                .is_some_and(|exp| exp.saturating_mul(1000) > hub_now)
    }

    /// Local ms at which the token held expires.
    fn expires_at_local(&self) -> Option<u64> {
        self.agent.token()?;
        let exp_ms = self.agent.token_expires_at()?.saturating_mul(1000);
        Some(exp_ms.saturating_add_signed(self.agent.clock_offset_ms().saturating_neg()))
    }

    /// Feeds one event and performs the actions, in order.
    fn feed(&mut self, event: Event<'_>) -> Result<(), Error> {
        let now = now_ms();
        let random = random32()?;
        let mut reports = Vec::new();
        let mut published = false;
        let actions = self
            .agent
            .handle(event, now, &random)
            .map_err(Error::Core)?;
        for action in actions {
            match action {
                Action::Subscribe(t) => {
                    let _ = self.outbound.send(Outbound::Subscribe(t.to_string()));
                }
                Action::Publish { topic, payload } => {
                    published = true;
                    let _ = self.outbound.send(Outbound::Publish {
                        topic: topic.to_string(),
                        payload: payload.to_vec(),
                    });
                }
                Action::Store { plaintext } => self.flash = Some(plaintext.to_vec()),
                Action::Wipe => self.flash = None,
                // The machine keeps the latest wake time; `sleep_for` reads it.
                Action::WakeAt(_) => {}
                Action::Report(report) => reports.push(report),
            }
        }
        // A token exchange starts with its first request; retries belong to it.
        if published
            && matches!(
                self.agent.state(),
                State::AwaitingEnrollment | State::AwaitingToken | State::Refreshing
            )
        {
            self.asking_since.get_or_insert(now);
        }
        for report in reports {
            self.on_report(report, now);
        }
        self.check_token(now);
        Ok(())
    }

    fn count_error(&mut self, code: &'static str) {
        self.try_failed = true;
        *self.outcome.errors.entry(code).or_default() += 1;
    }

    fn on_report(&mut self, report: Report, now: u64) {
        match report {
            Report::TokenRenewed { .. } => {
                if std::mem::take(&mut self.try_failed) {
                    self.outcome.retried = true;
                }
                if let Some(since) = self.asking_since.take() {
                    let ms = now.saturating_sub(since);
                    if self.outcome.tokens == 0 {
                        self.outcome.first_token_ms = Some(ms);
                    } else {
                        self.outcome.refresh_latencies_ms.push(ms);
                    }
                }
                self.outcome.tokens += 1;
                self.live.tokens.fetch_add(1, Ordering::Relaxed);
            }
            Report::RequestFailed { code, .. } => self.count_error(code.name()),
            Report::RequestTimedOut { .. } => self.count_error("timeout"),
            Report::RequestNotSent { .. } => self.count_error("request_not_sent"),
            Report::ResponseRejected { .. } => self.count_error("response_rejected"),
            Report::Revoked => {
                self.outcome.revoked = true;
                self.outcome.revoked_at_ms.get_or_insert(now);
            }
            _ => {}
        }
    }

    /// Notes whether a valid token is held, and a lapse when one stops being held.
    fn check_token(&mut self, now: u64) {
        let holding = self.holds_valid_token(now);
        if holding == self.holding {
            return;
        }
        self.holding = holding;
        if holding {
            self.live.holding.fetch_add(1, Ordering::Relaxed);
            if let Some(since) = self.lapsed_since.take() {
                self.outcome.lapse_ms += now.saturating_sub(since);
            }
        } else {
            self.live.holding.fetch_sub(1, Ordering::Relaxed);
            if self.outcome.tokens > 0
                && !self.outcome.revoked
                && self.live.hub_reachable.load(Ordering::Relaxed)
            {
                self.outcome.lapses += 1;
                self.live.lapses.fetch_add(1, Ordering::Relaxed);
                self.lapsed_since = Some(now);
            }
        }
    }

    fn on_notice(&mut self, notice: Notice) -> Result<(), Error> {
        match notice {
            Notice::Connected => {
                if !self.connected {
                    self.connected = true;
                    self.live.connected.fetch_add(1, Ordering::Relaxed);
                }
                self.feed(Event::Connected)
            }
            Notice::Disconnected(_) => {
                if self.connected {
                    self.connected = false;
                    self.live.connected.fetch_sub(1, Ordering::Relaxed);
                }
                self.feed(Event::Disconnected)
            }
            Notice::Message(Incoming { topic, payload }) => self.feed(Event::Message {
                topic: &topic,
                payload: &payload,
            }),
        }
    }

    /// How long to sleep: until the machine's wake time or the token's expiry (to see a
    /// lapse when it happens), at most [`MAX_SLEEP`].
    fn sleep_for(&self) -> Duration {
        let now = now_ms();
        let wake = [self.agent.next_wake(), self.expires_at_local()]
            .into_iter()
            .flatten()
            .min();
        match wake {
            Some(at) => {
                Duration::from_millis(at.saturating_sub(now).saturating_add(1)).min(MAX_SLEEP)
            }
            None => MAX_SLEEP,
        }
    }

    fn on_sleep_over(&mut self) -> Result<(), Error> {
        if self.agent.next_wake().is_some_and(|at| at <= now_ms()) {
            self.feed(Event::Timer)?;
        }
        self.check_token(now_ms());
        Ok(())
    }

    /// The outcome, with the state at the end; the live counts drop this device.
    fn finish(mut self) -> Outcome {
        self.outcome.holding_at_end = self.holding;
        if let Some(since) = self.lapsed_since.take() {
            self.outcome.lapse_ms += now_ms().saturating_sub(since);
        }
        if self.holding {
            self.live.holding.fetch_sub(1, Ordering::Relaxed);
        }
        if self.connected {
            self.live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.outcome
    }
}

/// Runs one device until `stop` turns true (or its sender is dropped): boots the machine
/// with an empty flash, so it enrolls (with the code in `spec.config`), then keeps its
/// token. Returns what it saw.
pub async fn run(
    spec: Spec,
    signer: P256Signer,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, Error> {
    let id = spec.config.device_id().to_string();
    let agent = Box::new(Agent::new(spec.config, signer, spec.anchor).map_err(Error::Core)?);
    let (outbound, outbound_rx) = mpsc::unbounded_channel();
    let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
    let (client, mut notices) = tessera_mqtt::connect(&spec.mqtt, MQTT_CAPACITY, mqtt_stop_rx)?;
    let publisher = tokio::spawn(publisher(client.clone(), outbound_rx));
    let mut device = Device {
        agent,
        flash: None,
        outbound,
        live,
        outcome: Outcome {
            id,
            ..Outcome::default()
        },
        connected: false,
        holding: false,
        lapsed_since: None,
        asking_since: None,
        try_failed: false,
    };
    let stored = device.flash.clone();
    let mut result = device.feed(Event::Boot {
        stored: stored.as_deref(),
    });
    while result.is_ok() && !*stop.borrow() {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            notice = notices.recv() => match notice {
                Some(notice) => result = device.on_notice(notice),
                None => {
                    result = Err(Error::Process("a device's MQTT event loop stopped".into()));
                }
            },
            () = tokio::time::sleep(device.sleep_for()) => result = device.on_sleep_over(),
        }
    }
    let _ = client.disconnect().await;
    // Let the event loop flush the DISCONNECT before it stops.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = mqtt_stop.send(true);
    publisher.abort();
    // Finished either way, so the live counts drop a device that failed too.
    let outcome = device.finish();
    result.map(|()| outcome)
}
