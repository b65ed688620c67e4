//! One simulated device: the `shared` agent state machine fed with MQTT notices and
//! timers, its actions performed in order (subscribe, publish, store to flash, wipe, wake),
//! exactly as `tessera-agent`'s shell does, with everything it saw counted for the fleet
//! summary. What makes it firmware rather than a Linux agent:
//!
//! - its state is sealed into a simulated [`Flash`] (two slots, the shared record format, a
//!   monotonic counter), whose writes power loss can tear; a cut write switches the device
//!   off (no DISCONNECT, everything in RAM lost) and, a moment later, it boots again from
//!   whatever the flash reads back, through the machine's own rules (a spent grant is
//!   refused, the machine falls back to its device key, a lost store enrolls again);
//! - it has its own [`DeviceClock`] (offset and drift) and feeds the machine that clock's
//!   time; lapses are judged by the real clock, which is the hub's.
//!
//! As in the agent, the task that owns the machine never waits on the MQTT client: what is
//! to be sent goes through a channel to a publisher task (rumqtt#1025).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_mqtt::MqttClient;
use tessera_mqtt::{Incoming, MqttConfig, Notice, QoS};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Report, State};
use tessera_shared::crypto::{P256Signer, PublicKey};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::attack::AttackBook;
use crate::clock::DeviceClock;
use crate::flash::{Dice, Flash, Read};

/// Timers and token expiry are re-checked at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Capacity of each device's MQTT request queue and notice channel.
const MQTT_CAPACITY: usize = 32;

/// How long a device stays off after a power cut: between these, ms.
const POWER_OFF_MS: (u64, u64) = (100, 500);

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
    /// Devices whose machine reported itself revoked so far.
    pub revoked: AtomicU64,
    /// Token exchanges under way (a request out or due: enrolling, asking, refreshing).
    pub refreshing: AtomicU64,
    /// The most token exchanges under way at once so far.
    pub peak_refreshing: AtomicU64,
    /// Power cuts so far.
    pub power_cuts: AtomicU64,
    /// The largest message a device was revoked by (its signed control message), bytes:
    /// the size of the broker's own fan-out that `revoke` compares with.
    pub control_bytes: AtomicU64,
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
    /// reachable and the device powered.
    pub lapses: u64,
    /// Milliseconds spent without a valid token after the first one, while the hub was
    /// reachable.
    pub lapse_ms: u64,
    /// From the first enrollment request to the first token held, ms.
    pub first_token_ms: Option<u64>,
    /// Real time (Unix ms) the first token was held.
    pub first_token_at_ms: Option<u64>,
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
    /// Whether its flash was empty at the end (wiped, or never written).
    pub flash_empty_at_end: bool,
    /// Whether some token exchange of its needed more than one request (a retry after a
    /// timeout or a refusal) before the token arrived.
    pub retried: bool,
    /// Whether its machine trusts its local clock (`trust_local_clock`).
    pub trusts_clock: bool,
    /// How far its clock was from real time at the start, ms.
    pub clock_error_ms: u64,
    /// Times its machine moved its idea of the hub's time.
    pub clock_adjustments: u64,
    /// Flash writes the power failed during.
    pub power_cuts: u64,
    /// Boots after a power cut whose flash held a token still valid.
    pub rebooted_holding: u64,
    /// From each boot after a power cut to a valid token held, ms (0 when the flash held
    /// one).
    pub reboot_recovery_ms: Vec<u64>,
    /// Boots whose flash had records written but none readable.
    pub flash_lost: u64,
    /// Whether the run ended while it was off after a power cut, or within
    /// [`JUST_BOOTED_MS`] of booting again (too soon to hold a token).
    pub off_at_end: bool,
    /// The broker's own fan-out (`revoke`): for each round received, its number and the
    /// time from its publication to its arrival here, ms.
    pub probe_ms: Vec<(u8, u64)>,
}

/// How soon after a boot the end of the run finds a device still recovering, not failed.
pub const JUST_BOOTED_MS: u64 = 1_000;

/// A presentation handed to a device over its local link (as an app would, over BLE or
/// the LAN), checked by its machine ([`Agent::check_presentation`]).
#[derive(Debug)]
pub struct PresentationCheck {
    /// The signed presentation.
    pub presentation: Vec<u8>,
    /// The scope the device requires.
    pub scope: &'static str,
    /// The machine's verdict.
    pub reply: oneshot::Sender<Result<(), tessera_shared::Error>>,
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
    /// The device's private key (its scalar: the key survives power loss, in a secure
    /// element or its own flash page).
    pub key: [u8; 32],
    /// The secret its record key is derived from.
    pub device_secret: [u8; 32],
    /// Its clock.
    pub clock: DeviceClock,
    /// The share of its flash writes power fails during.
    pub power_cut_rate: f64,
    /// Where the `malicious` scenario notes what it sent the device, to be judged.
    pub attacks: Option<Arc<AttackBook>>,
    /// Presentations to check, from the `malicious` scenario's app and attacker.
    pub presentations: Option<mpsc::Receiver<PresentationCheck>>,
    /// A topic to subscribe to besides the machine's, on which the simulator measures the
    /// broker's own fan-out (unsigned messages the machine never sees).
    pub probe: Option<String>,
}

/// The current Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// 32 bytes from the OS generator.
pub fn random32() -> Result<[u8; 32], Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(Error::Random)?;
    Ok(bytes)
}

/// A fresh P-256 key from the OS generator: the device's own, never leaving it. Returns
/// its scalar, from which [`P256Signer::from_scalar`] makes the signer.
pub fn generate_key() -> Result<[u8; 32], Error> {
    loop {
        // A random scalar is outside the group order with probability ~2^-32.
        let scalar = random32()?;
        if P256Signer::from_scalar(&scalar).is_ok() {
            return Ok(scalar);
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
async fn publisher(client: MqttClient, mut rx: mpsc::UnboundedReceiver<Outbound>) {
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

/// The machine, its flash, its clock and its tally.
struct Device {
    agent: Box<Agent<P256Signer>>,
    flash: Flash,
    clock: DeviceClock,
    outbound: mpsc::UnboundedSender<Outbound>,
    live: Arc<Live>,
    attacks: Option<Arc<AttackBook>>,
    outcome: Outcome,
    connected: bool,
    /// Whether it held a valid token at the last check.
    holding: bool,
    /// Whether it has held a valid token since it last booted: lapses count from then.
    held_since_boot: bool,
    /// Since when (real ms) it holds no valid token, after its first one.
    lapsed_since: Option<u64>,
    /// When (real ms) the first request of the token exchange in progress went out.
    asking_since: Option<u64>,
    /// Whether a request of the token exchange in progress failed (timed out, refused,
    /// not sent, answer rejected), so another try follows.
    try_failed: bool,
    /// Whether it counts in [`Live::refreshing`] now.
    counted_refreshing: bool,
    /// The power failed during the last flash write: the device is off.
    power_cut: bool,
    /// When (real ms) it booted after a power cut, until it holds a valid token again.
    recovering_since: Option<u64>,
    /// Effects of the last fed event (a token, a store, a wipe, the clock or key set or
    /// revocation list moved): how an attack message is judged accepted.
    effects: u64,
    /// The probe topic, if any (see [`Spec::probe`]).
    probe: Option<String>,
    /// The size of the message being fed, bytes (0 for other events).
    feeding_bytes: usize,
}

impl Device {
    /// Whether the machine holds a device token that is valid now by the real clock (the
    /// hub's), with no leeway.
    fn holds_valid_token(&self, real_now: u64) -> bool {
        self.agent.token().is_some()
            && self
                .agent
                .token_expires_at()
                .is_some_and(|exp| exp.saturating_mul(1000) > real_now)
    }

    /// Feeds one event and performs the actions, in order. A flash write cut short stops
    /// there: the device is off, and the rest of the actions die with it.
    fn feed(&mut self, event: Event<'_>) -> Result<(), Error> {
        let now = self.clock.now();
        let real = now_ms();
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
                Action::Store { plaintext } => {
                    self.effects += 1;
                    let mut nonce = [0u8; 12];
                    nonce.copy_from_slice(&random32()?[..12]);
                    if self.flash.write(plaintext, nonce).is_err() {
                        self.power_cut = true;
                        return Ok(());
                    }
                }
                Action::Wipe => {
                    self.effects += 1;
                    self.flash.wipe();
                }
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
            self.asking_since.get_or_insert(real);
        }
        for report in reports {
            self.on_report(report, real);
        }
        self.count_refreshing();
        self.check_token(real);
        Ok(())
    }

    fn count_refreshing(&mut self) {
        let asking = matches!(
            self.agent.state(),
            State::AwaitingEnrollment | State::AwaitingToken | State::Refreshing
        );
        if asking != self.counted_refreshing {
            self.counted_refreshing = asking;
            if asking {
                let now = self.live.refreshing.fetch_add(1, Ordering::Relaxed) + 1;
                self.live.peak_refreshing.fetch_max(now, Ordering::Relaxed);
            } else {
                self.live.refreshing.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn count_error(&mut self, code: &'static str) {
        self.try_failed = true;
        *self.outcome.errors.entry(code).or_default() += 1;
    }

    fn on_report(&mut self, report: Report, now: u64) {
        match report {
            Report::TokenRenewed { .. } => {
                self.effects += 1;
                if std::mem::take(&mut self.try_failed) {
                    self.outcome.retried = true;
                }
                if let Some(since) = self.asking_since.take() {
                    let ms = now.saturating_sub(since);
                    if self.outcome.tokens == 0 {
                        self.outcome.first_token_ms = Some(ms);
                        self.outcome.first_token_at_ms = Some(now);
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
                self.effects += 1;
                self.live.control_bytes.fetch_max(
                    u64::try_from(self.feeding_bytes).unwrap_or(0),
                    Ordering::Relaxed,
                );
                if !self.outcome.revoked {
                    self.live.revoked.fetch_add(1, Ordering::Relaxed);
                }
                self.outcome.revoked = true;
                self.outcome.revoked_at_ms.get_or_insert(now);
            }
            Report::ClockAdjusted { .. } => {
                self.effects += 1;
                self.outcome.clock_adjustments += 1;
            }
            Report::Enrolled { .. }
            | Report::KeySetUpdated { .. }
            | Report::RevocationsApplied { .. }
            | Report::RevocationsRefetching { .. } => self.effects += 1,
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
            self.held_since_boot = true;
            self.live.holding.fetch_add(1, Ordering::Relaxed);
            if let Some(since) = self.lapsed_since.take() {
                self.outcome.lapse_ms += now.saturating_sub(since);
            }
            if let Some(since) = self.recovering_since.take() {
                self.outcome
                    .reboot_recovery_ms
                    .push(now.saturating_sub(since));
            }
        } else {
            self.live.holding.fetch_sub(1, Ordering::Relaxed);
            if self.held_since_boot
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
                if let Some(probe) = &self.probe {
                    let _ = self.outbound.send(Outbound::Subscribe(probe.clone()));
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
            Notice::Message(Incoming { topic, payload }) if self.probe.as_ref() == Some(&topic) => {
                // Send time (Unix ms, big-endian) and round: the broker's own fan-out.
                if let (Some(sent), Some(round)) = (
                    payload.get(..8).and_then(|b| b.try_into().ok()),
                    payload.get(8),
                ) {
                    let ms = now_ms().saturating_sub(u64::from_be_bytes(sent));
                    self.outcome.probe_ms.push((*round, ms));
                }
                Ok(())
            }
            Notice::Message(Incoming { topic, payload }) => {
                let attack = self.attacks.as_ref().and_then(|book| book.take(&payload));
                let before = self.effects;
                self.feeding_bytes = payload.len();
                let fed = self.feed(Event::Message {
                    topic: &topic,
                    payload: &payload,
                });
                self.feeding_bytes = 0;
                fed?;
                if let (Some(kind), Some(book)) = (attack, self.attacks.as_ref()) {
                    book.judge(kind, self.effects > before);
                }
                Ok(())
            }
        }
    }

    /// How long to sleep: until the machine's wake time (on its own clock) or the token's
    /// expiry (by the real clock, to see a lapse when it happens), at most [`MAX_SLEEP`].
    fn sleep_for(&self) -> Duration {
        let wake = self.agent.next_wake().map(|at| self.clock.real_until(at));
        let expiry = self
            .agent
            .token()
            .and(self.agent.token_expires_at())
            .map(|exp| Duration::from_millis(exp.saturating_mul(1000).saturating_sub(now_ms())));
        [wake, expiry]
            .into_iter()
            .flatten()
            .min()
            .map_or(MAX_SLEEP, |d| (d + Duration::from_millis(1)).min(MAX_SLEEP))
    }

    fn on_sleep_over(&mut self) -> Result<(), Error> {
        if self
            .agent
            .next_wake()
            .is_some_and(|at| at <= self.clock.now())
        {
            self.feed(Event::Timer)?;
        }
        if !self.power_cut {
            self.check_token(now_ms());
        }
        Ok(())
    }

    /// Checks a presentation with the machine, by the device's own clock.
    fn check_presentation(&mut self, check: PresentationCheck) {
        let now = self.clock.now();
        let verdict = self
            .agent
            .check_presentation(&check.presentation, check.scope, now)
            .map(drop);
        let _ = check.reply.send(verdict);
    }

    /// Powers on: reads the flash and boots the machine from what it holds.
    fn boot(&mut self, after_cut: bool) -> Result<(), Error> {
        let stored = match self.flash.read() {
            Read::State(state) => Some(state),
            Read::Empty => None,
            Read::Lost => {
                self.outcome.flash_lost += 1;
                None
            }
        };
        if after_cut {
            self.recovering_since = Some(now_ms());
        }
        self.feed(Event::Boot {
            stored: stored.as_deref(),
        })?;
        if after_cut && self.holding {
            self.outcome.rebooted_holding += 1;
        }
        Ok(())
    }

    /// The power is gone: everything in RAM with it. Time off is not a lapse (the device
    /// cannot be asked anything); lapses count again once it holds a token after booting.
    fn power_off(&mut self) {
        let now = now_ms();
        self.power_cut = false;
        self.outcome.power_cuts += 1;
        self.live.power_cuts.fetch_add(1, Ordering::Relaxed);
        if self.holding {
            self.holding = false;
            self.live.holding.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(since) = self.lapsed_since.take() {
            self.outcome.lapse_ms += now.saturating_sub(since);
        }
        if self.connected {
            self.connected = false;
            self.live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if self.counted_refreshing {
            self.counted_refreshing = false;
            self.live.refreshing.fetch_sub(1, Ordering::Relaxed);
        }
        self.held_since_boot = false;
        self.asking_since = None;
        self.try_failed = false;
    }

    /// The outcome, with the state at the end; the live counts drop this device.
    fn finish(mut self, off: bool) -> Outcome {
        self.outcome.holding_at_end = self.holding;
        self.outcome.off_at_end = off
            || self
                .recovering_since
                .is_some_and(|t| now_ms().saturating_sub(t) < JUST_BOOTED_MS);
        self.outcome.flash_empty_at_end = matches!(self.flash.read(), Read::Empty);
        if let Some(since) = self.lapsed_since.take() {
            self.outcome.lapse_ms += now_ms().saturating_sub(since);
        }
        if self.holding {
            self.live.holding.fetch_sub(1, Ordering::Relaxed);
        }
        if self.connected {
            self.live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if self.counted_refreshing {
            self.live.refreshing.fetch_sub(1, Ordering::Relaxed);
        }
        self.outcome
    }
}

fn new_agent(spec: &Spec) -> Result<Box<Agent<P256Signer>>, Error> {
    let signer = P256Signer::from_scalar(&spec.key).map_err(Error::Core)?;
    Ok(Box::new(
        Agent::new(spec.config.clone(), signer, spec.anchor).map_err(Error::Core)?,
    ))
}

/// How a device's powered life ended.
enum LifeEnd {
    /// Told to stop, or a fault: the run is over for it.
    Stopped(Result<(), Error>),
    /// Power failed during a flash write.
    PowerCut,
}

/// Runs one device until `stop` turns true (or its sender is dropped): boots the machine
/// with an empty flash, so it enrolls (with the code in `spec.config`), then keeps its
/// token; after each power cut it stays off a moment and boots again from its flash.
/// Returns what it saw.
pub async fn run(
    mut spec: Spec,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, Error> {
    let mut checks = spec.presentations.take();
    let probe = spec.probe.take();
    let id = spec.config.device_id().to_string();
    let seed = u64::from_be_bytes(random32()?[..8].try_into().unwrap_or([1; 8]));
    let mut dice = Dice::new(seed);
    let (outbound, _) = mpsc::unbounded_channel();
    let mut device = Device {
        agent: new_agent(&spec)?,
        flash: Flash::new(
            &spec.device_secret,
            &id,
            spec.power_cut_rate,
            dice.next_u64(),
        )?,
        clock: spec.clock,
        outbound,
        live,
        attacks: spec.attacks.clone(),
        outcome: Outcome {
            id,
            trusts_clock: spec.config.trust_local_clock,
            clock_error_ms: spec.clock.error_ms(),
            ..Outcome::default()
        },
        connected: false,
        holding: false,
        held_since_boot: false,
        lapsed_since: None,
        asking_since: None,
        try_failed: false,
        counted_refreshing: false,
        power_cut: false,
        recovering_since: None,
        effects: 0,
        probe,
        feeding_bytes: 0,
    };
    let mut after_cut = false;
    let mut off = false;
    let result = loop {
        if after_cut {
            device.agent = new_agent(&spec)?;
        }
        let (outbound, outbound_rx) = mpsc::unbounded_channel();
        device.outbound = outbound;
        let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
        let (client, mut notices) = tessera_mqtt::connect(&spec.mqtt, MQTT_CAPACITY, mqtt_stop_rx)?;
        let publisher = tokio::spawn(publisher(client.clone(), outbound_rx));
        let end = live_once(&mut device, &mut notices, &mut stop, &mut checks, after_cut).await;
        match end {
            LifeEnd::PowerCut => {
                // No DISCONNECT: the radio dies with the power.
                let _ = mqtt_stop.send(true);
                publisher.abort();
                device.power_off();
                let off_ms = POWER_OFF_MS.0 + dice.below(POWER_OFF_MS.1 - POWER_OFF_MS.0);
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(off_ms)) => {}
                }
                if *stop.borrow() {
                    off = true;
                    break Ok(());
                }
                after_cut = true;
            }
            LifeEnd::Stopped(result) => {
                let _ = client.disconnect().await;
                // Let the event loop flush the DISCONNECT before it stops.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = mqtt_stop.send(true);
                publisher.abort();
                break result;
            }
        }
    };
    // Finished either way, so the live counts drop a device that failed too.
    let outcome = device.finish(off);
    result.map(|()| outcome)
}

/// One powered life: boot, then events until told to stop, a fault, or a power cut.
async fn live_once(
    device: &mut Device,
    notices: &mut tessera_mqtt::Notices,
    stop: &mut watch::Receiver<bool>,
    checks: &mut Option<mpsc::Receiver<PresentationCheck>>,
    after_cut: bool,
) -> LifeEnd {
    let mut result = device.boot(after_cut);
    while result.is_ok() && !device.power_cut && !*stop.borrow() {
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
            check = next_check(checks) => match check {
                Some(check) => device.check_presentation(check),
                // Nobody presents any more.
                None => *checks = None,
            },
        }
    }
    if device.power_cut && result.is_ok() {
        LifeEnd::PowerCut
    } else {
        LifeEnd::Stopped(result)
    }
}

/// The next presentation to check; never, without a channel.
async fn next_check(
    checks: &mut Option<mpsc::Receiver<PresentationCheck>>,
) -> Option<PresentationCheck> {
    match checks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
