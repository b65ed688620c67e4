//! The tokio shell around the sans-I/O state machine
//! ([`tessera_shared::agent::Agent`]): it feeds the machine events (MQTT notices, timers,
//! boot) with the wall clock and fresh random bytes, and performs the actions it returns
//! (subscribe, publish, store, wipe, wake), in order.
//!
//! One task owns the machine: the [`run`] loop. It never waits on the MQTT client: what is
//! to be sent goes through an unbounded channel to a publisher task, so the loop keeps
//! draining the notices of the event-loop task (which never publishes itself), and neither
//! can block the other (rumqtt#1025). Requests on the local socket reach the loop through a
//! channel too and are answered from the machine's state.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tessera_mqtt::MqttClient;
use tessera_mqtt::{Incoming, Notice, Notices, QoS};
use tessera_shared::agent::{Action, Agent, AgentConfig, Event, Ignored, Report, State};
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::error::{ClaimsError, Error as CoreError};
use tessera_shared::message::{ErrorCode, MAX_PRESENTATION_LEN, Operation, SignedResponse};
use tessera_shared::schedule::Backoff;
use tessera_shared::topic;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::Error;
use crate::identity;
use crate::local::{self, Command, Reply};
use crate::lock::StateLock;
use crate::status::{ShellFacts, Status, state_name, token_times};
use crate::store::{Loaded, Store, StoreError};
use crate::system::{now_ms, random32};

/// Timers are re-checked at least this often, so a wall clock that jumps does not leave
/// the agent asleep past its wake time.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// Capacity of the MQTT client's request queue and notice channel.
const MQTT_CAPACITY: usize = 64;

/// Something for the publisher task to send.
#[derive(Debug)]
enum Outbound {
    Subscribe(String),
    Publish { topic: String, payload: Vec<u8> },
}

/// A refusal the hub sent for one of the agent's requests, as the machine reported it.
#[derive(Debug, Clone)]
struct Refusal {
    op: Operation,
    code: ErrorCode,
    reason: Option<String>,
}

/// A state the machine asked to keep that is not on disk, because writing it failed.
struct Unsaved {
    plaintext: Zeroizing<Vec<u8>>,
    /// Local ms of the first failed write since the store was last written.
    since_ms: u64,
    /// Failed writes since then: the backoff attempt number.
    failures: u32,
    /// Local ms of the next try.
    retry_at_ms: u64,
}

/// Writes the machine's state to the store, and keeps the latest state it could not write
/// to try again with backoff.
///
/// A refresh spends the grant it presents the moment the hub answers, so the state in
/// memory (the new token and grant) is the only one that can still refresh: it stays in
/// force even when it cannot be saved, and the record on disk stays the previous one (every
/// write is atomic). A restart before the write succeeds reads that previous record, whose
/// grant is spent: the hub refuses it (revoking its family) and the agent asks again with
/// its key alone (`device_token`). See docs/DEVICE.md, "When the store cannot be written".
pub struct StoreWriter {
    store: Store,
    backoff: Backoff,
    unsaved: Option<Unsaved>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The plaintext holds the token and grant: never print it.
        f.debug_struct("StoreWriter")
            .field("store", &self.store)
            .field("unsaved_since_ms", &self.unsaved_since_ms())
            .finish_non_exhaustive()
    }
}

impl StoreWriter {
    /// A writer for `store` that retries failed writes with `backoff`.
    pub fn new(store: Store, backoff: Backoff) -> Self {
        Self {
            store,
            backoff,
            unsaved: None,
        }
    }

    /// Writes `plaintext` at local time `now_ms`. On failure it is kept (replacing any older
    /// unsaved state) and tried again from [`retry_at_ms`](Self::retry_at_ms) on.
    pub fn write(&mut self, plaintext: &[u8], now_ms: u64, jitter: u32) -> Result<(), StoreError> {
        match self.store.write(plaintext) {
            Ok(()) => {
                self.saved(now_ms);
                Ok(())
            }
            Err(e) => {
                let (since_ms, failures) = self
                    .unsaved
                    .as_ref()
                    .map_or((now_ms, 0), |u| (u.since_ms, u.failures));
                self.unsaved = Some(Unsaved {
                    plaintext: Zeroizing::new(plaintext.to_vec()),
                    since_ms,
                    failures: failures.saturating_add(1),
                    retry_at_ms: self.backoff.retry_at(now_ms, failures, jitter, None),
                });
                Err(e)
            }
        }
    }

    /// Tries the unsaved state again if its time has come; `None` if there was nothing to
    /// try.
    pub fn retry_due(&mut self, now_ms: u64, jitter: u32) -> Option<Result<(), StoreError>> {
        let due = self.unsaved.as_ref()?;
        if due.retry_at_ms > now_ms {
            return None;
        }
        self.retry_now(now_ms, jitter)
    }

    /// Tries the unsaved state again now; `None` if there is none.
    pub fn retry_now(&mut self, now_ms: u64, jitter: u32) -> Option<Result<(), StoreError>> {
        let plaintext = self.unsaved.as_ref()?.plaintext.clone();
        Some(self.write(&plaintext, now_ms, jitter))
    }

    fn saved(&mut self, now_ms: u64) {
        if let Some(u) = self.unsaved.take() {
            tracing::info!(
                failed_attempts = u.failures,
                unsaved_for_ms = now_ms.saturating_sub(u.since_ms),
                "token store written again: the device token and refresh grant held are saved"
            );
        }
    }

    /// Forgets the unsaved state (the device was revoked: nothing is to be kept).
    pub fn forget(&mut self) {
        self.unsaved = None;
    }

    /// Since when (local ms) the state in force has not been saved, if it has not.
    pub fn unsaved_since_ms(&self) -> Option<u64> {
        self.unsaved.as_ref().map(|u| u.since_ms)
    }

    /// When (local ms) the unsaved state is tried again, if there is one.
    pub fn retry_at_ms(&self) -> Option<u64> {
        self.unsaved.as_ref().map(|u| u.retry_at_ms)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, to wipe it.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }
}

/// 32 random bits for backoff jitter; a fixed middle value if the OS generator fails (the
/// jitter only spreads retries).
fn jitter() -> u32 {
    random32().map_or(u32::MAX / 2, |r| {
        u32::from_be_bytes([r[0], r[1], r[2], r[3]])
    })
}

/// The machine, its store, and what the shell remembers besides.
pub struct Shell {
    agent: Box<Agent<P256Signer>>,
    writer: StoreWriter,
    outbound: mpsc::UnboundedSender<Outbound>,
    response_topic: String,
    facts: ShellFacts,
    /// `(iat, exp)` of the token held, to log at which fraction of its lifetime it was
    /// replaced.
    held: Option<(u64, u64)>,
    /// The reason text of the latest refusal seen on the response topic.
    hub_reason: Option<String>,
    /// The latest refusal the machine reported, for `enroll`.
    refusal: Option<Refusal>,
    /// Messages signed by a key the trust anchor does not name, since the last request
    /// timed out or was answered.
    untrusted_seen: u32,
    /// Whether an `enroll` timed out while such messages came: `enroll` stops then (the
    /// trust anchor is most likely another hub's) rather than retry until its timeout.
    enroll_answer_untrusted: bool,
    revoked: bool,
    /// Presentations are refused before this local time (ms): see [`Shell::answer`].
    presentations_from_ms: u64,
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell")
            .field("agent", &self.agent)
            .field("writer", &self.writer)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

impl Shell {
    fn new(
        config: AgentConfig,
        signer: P256Signer,
        anchor: PublicKey,
        store: Store,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Outbound>), Error> {
        let response_topic = topic::response(config.device_id())
            .map_err(Error::Core)?
            .as_str()
            .to_string();
        let window_ms = config.presentation_window_s.saturating_mul(1000);
        let writer = StoreWriter::new(store, config.backoff);
        let agent = Box::new(Agent::new(config, signer, anchor).map_err(Error::Core)?);
        let (outbound, rx) = mpsc::unbounded_channel();
        let presentations_from_ms = now_ms().saturating_add(window_ms);
        let facts = ShellFacts {
            running: true,
            store_counter: writer.store().counter(),
            presentations_from_ms: Some(presentations_from_ms),
            ..ShellFacts::default()
        };
        Ok((
            Self {
                agent,
                writer,
                outbound,
                response_topic,
                facts,
                held: None,
                hub_reason: None,
                refusal: None,
                untrusted_seen: 0,
                enroll_answer_untrusted: false,
                revoked: false,
                presentations_from_ms,
            },
            rx,
        ))
    }

    /// Starts the machine with the state read from the store (`None`: enrolling).
    fn boot(&mut self, stored: Option<&[u8]>) -> Result<(), Error> {
        self.feed(Event::Boot { stored }).map_err(|e| match e {
            Error::Core(core) => Error::Store(StoreError::StateUndecodable {
                path: self.writer.store().paths().record.clone(),
                reason: core.to_string(),
            }),
            other => other,
        })?;
        self.held = self
            .agent
            .token()
            .and_then(|t| token_times(t, self.agent.key_set()));
        Ok(())
    }

    fn on_notice(&mut self, notice: Notice) -> Result<(), Error> {
        match notice {
            Notice::Connected => {
                tracing::info!("connected to the broker");
                self.feed(Event::Connected)
            }
            Notice::Disconnected(reason) => {
                if self.agent.is_connected() {
                    tracing::warn!(%reason, "disconnected from the broker");
                }
                self.feed(Event::Disconnected)
            }
            Notice::Message(Incoming { topic, payload }) => {
                if topic == self.response_topic {
                    self.note_refusal_reason(&payload);
                }
                self.feed(Event::Message {
                    topic: &topic,
                    payload: &payload,
                })
            }
        }
    }

    /// The machine reports refusals by code only; the hub's reason text helps people, so
    /// read it from the (verified) response too.
    fn note_refusal_reason(&mut self, payload: &[u8]) {
        let Ok(signed) = SignedResponse::decode(payload) else {
            return;
        };
        let Ok(response) = signed.verify(self.agent.key_set()) else {
            return;
        };
        if let Err(e) = response.outcome
            && response.client == self.agent.config().device_id()
            && response.op.is_some()
        {
            self.hub_reason = Some(e.reason.to_string());
        }
    }

    /// How long to sleep before the next timer check.
    fn sleep_for(&self) -> Duration {
        let wake = match (self.agent.next_wake(), self.writer.retry_at_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wake {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).min(MAX_SLEEP),
            None => MAX_SLEEP,
        }
    }

    fn on_sleep_over(&mut self) -> Result<(), Error> {
        let now = now_ms();
        if let Some(result) = self.writer.retry_due(now, jitter()) {
            self.after_write(result, now);
        }
        if self.agent.next_wake().is_some_and(|at| at <= now_ms()) {
            self.feed(Event::Timer)?;
        }
        Ok(())
    }

    /// Notes the outcome of a store write for `status` and the log.
    fn after_write(&mut self, result: Result<(), StoreError>, now: u64) {
        self.facts.store_counter = self.writer.store().counter();
        self.facts.unsaved_since_ms = self.writer.unsaved_since_ms();
        match result {
            Ok(()) => self.facts.shell_error = None,
            Err(e) => {
                let retry_in_ms = self
                    .writer
                    .retry_at_ms()
                    .map_or(0, |at| at.saturating_sub(now));
                tracing::error!(
                    error = %e,
                    retry_in_ms,
                    "cannot write the token store: the device token and refresh grant in force \
                     are held in memory only (the previous record stays on disk); retrying"
                );
                self.facts.shell_error = Some(format!(
                    "store write failed: {e} (the token and grant in force are not saved; \
                     retrying)"
                ));
            }
        }
    }

    /// Feeds one event and performs the actions, in order.
    fn feed(&mut self, event: Event<'_>) -> Result<(), Error> {
        let now = now_ms();
        let random = random32()?;
        let mut reports = Vec::new();
        let mut written = Vec::new();
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
                    let _ = self.outbound.send(Outbound::Publish {
                        topic: topic.to_string(),
                        payload: payload.to_vec(),
                    });
                }
                Action::Store { plaintext } => {
                    let result = self.writer.write(plaintext, now, jitter());
                    written.push(result);
                }
                Action::Wipe => {
                    let note = format!(
                        "revoked by the hub; tokens and grants wiped at {} (Unix seconds, local clock)",
                        now / 1000
                    );
                    // Nothing is to be kept any more: an unsaved state must not come back.
                    self.writer.forget();
                    self.facts.unsaved_since_ms = None;
                    if let Err(e) = self.writer.store_mut().wipe(&note) {
                        tracing::error!(error = %e, "cannot wipe the token store");
                        self.facts.shell_error = Some(format!("store wipe failed: {e}"));
                    }
                    self.facts.store_counter = self.writer.store().counter();
                }
                // The machine keeps the latest wake time; `sleep_for` reads it.
                Action::WakeAt(_) => {}
                Action::Report(report) => reports.push(report),
            }
        }
        for result in written {
            self.after_write(result, now);
        }
        for report in reports {
            self.on_report(report, now);
        }
        Ok(())
    }

    fn on_report(&mut self, report: Report, now: u64) {
        match report {
            Report::Enrolled { at } => tracing::info!(at, "enrolled"),
            Report::TokenRenewed { expires_at } => {
                self.facts.renewals += 1;
                let hub_now_ms = now.saturating_add_signed(self.agent.clock_offset_ms());
                // How far into the old token's life the new one arrived: the refresh
                // schedule aims at 50 to 75 %.
                let fraction = self.held.and_then(|(iat, exp)| {
                    let lifetime_ms = exp.checked_sub(iat)?.checked_mul(1000)?;
                    let elapsed_ms = hub_now_ms.checked_sub(iat.checked_mul(1000)?)?;
                    #[allow(clippy::cast_precision_loss)] // a ratio for a log line
                    Some(elapsed_ms as f64 / lifetime_ms.max(1) as f64)
                });
                self.held = self
                    .agent
                    .token()
                    .and_then(|t| token_times(t, self.agent.key_set()));
                let lifetime_s = self.held.map(|(iat, exp)| exp.saturating_sub(iat));
                if self.writer.unsaved_since_ms().is_some() {
                    // Not a renewal done: a restart now would lose this token and grant.
                    tracing::error!(
                        expires_at,
                        lifetime_s,
                        "device token renewed in memory only: it and the rotated refresh grant \
                         are NOT saved (the token store cannot be written); the store write is \
                         retried with backoff"
                    );
                    return;
                }
                match fraction {
                    Some(f) => tracing::info!(
                        expires_at,
                        lifetime_s,
                        replaced_at_fraction = format!("{f:.3}"),
                        "device token renewed"
                    ),
                    None => tracing::info!(expires_at, lifetime_s, "device token received"),
                }
            }
            Report::TokenExpired => {
                tracing::warn!("device token expired before a new one arrived");
                self.held = None;
            }
            Report::RequestFailed { op, code } => {
                if matches!(op, Operation::DeviceToken | Operation::Refresh) {
                    self.facts.refresh_failures += 1;
                }
                let reason = self.hub_reason.clone();
                if code == ErrorCode::Replay {
                    tracing::debug!(op = op.name(), "hub saw a request twice; waiting");
                } else {
                    tracing::warn!(
                        op = op.name(),
                        code = code.name(),
                        reason = reason.as_deref().unwrap_or(""),
                        "hub refused"
                    );
                    self.facts.hub_reason.clone_from(&reason);
                    self.refusal = Some(Refusal { op, code, reason });
                }
            }
            Report::RequestTimedOut { op } => {
                tracing::warn!(op = op.name(), "no answer from the hub in time; retrying");
                if matches!(op, Operation::DeviceToken | Operation::Refresh) {
                    self.facts.refresh_failures += 1;
                }
                if op == Operation::Enroll && self.untrusted_seen > 0 {
                    self.enroll_answer_untrusted = true;
                }
                self.untrusted_seen = 0;
            }
            Report::RequestNotSent { op, error } => {
                tracing::error!(op = op.name(), %error, "cannot build a request");
            }
            Report::ResponseRejected { op, error } => {
                tracing::error!(op = op.name(), %error, "the hub's answer fails this device's checks");
            }
            Report::Revoked => {
                tracing::error!(
                    "this device is revoked: tokens and grants wiped, refreshing stopped"
                );
                self.revoked = true;
                self.held = None;
            }
            Report::ClockAdjusted { offset_ms } => {
                tracing::info!(offset_ms, "hub time learned");
            }
            Report::KeySetUpdated { version } => tracing::info!(version, "hub key set updated"),
            Report::RevocationsApplied { seq } => tracing::info!(seq, "revocations applied"),
            Report::RevocationGap { have, got } => {
                tracing::info!(
                    have,
                    got,
                    "revocation changes missed; fetching the snapshot"
                );
            }
            Report::RevocationsRefetching { latest } => {
                tracing::warn!(
                    latest,
                    "hub time went back past revocation entries judged spent; fetching the \
                     revocation stream again"
                );
            }
            Report::RevocationListFull => {
                tracing::warn!("revocation list full: presentations refused until a snapshot fits");
            }
            Report::Ignored(Ignored::Invalid(error)) => {
                tracing::warn!(%error, "ignored a message that does not verify");
                if error
                    == tessera_shared::Error::Signature(
                        tessera_shared::error::SignatureError::UnknownKey,
                    )
                {
                    self.untrusted_seen = self.untrusted_seen.saturating_add(1);
                }
            }
            Report::Ignored(why) => tracing::debug!(?why, "ignored a message"),
            other => tracing::debug!(?other, "report"),
        }
    }

    /// Answers a request from the local socket.
    ///
    /// Presentations are refused for one presentation window after the agent starts: the
    /// nonces of presentations accepted before a restart are not persisted, so one of them
    /// could otherwise be replayed while its `issued_at` is still within the window
    /// (docs/PROTOCOL.md §13, step 7).
    fn answer(&mut self, command: Command) -> Reply {
        let now = now_ms();
        match command {
            Command::Token => match self.valid_token(now) {
                Ok(token) => Reply::Ok(hex::encode(token)),
                Err(reason) => Reply::Err(reason),
            },
            Command::Status => match serde_json::to_string(&self.status(now)) {
                Ok(json) => Reply::Ok(json),
                Err(e) => Reply::Err(format!("cannot encode the status: {e}")),
            },
            Command::Verify { .. } if now < self.presentations_from_ms => Reply::Err(format!(
                "not yet: presentations are refused for {} s after the agent started (until \
                 {} ms), so that one accepted before the restart cannot be replayed",
                self.agent.config().presentation_window_s,
                self.presentations_from_ms
            )),
            Command::Verify {
                scope,
                presentation,
            } => match self.agent.check_presentation(&presentation, &scope, now) {
                Ok(checked) => Reply::Ok(checked.token.claims().sub.to_string()),
                Err(e) => {
                    if e == CoreError::Claims(ClaimsError::Revoked) {
                        self.report_presentation(&presentation, now);
                    }
                    Reply::Err(e.to_string())
                }
            },
        }
    }

    /// Tells the hub that `presentation` carried a revoked token: anomaly detection there
    /// counts it against the holder. Best effort: a report that cannot be signed is logged.
    fn report_presentation(&mut self, presentation: &[u8], now: u64) {
        let mut out = vec![0u8; MAX_PRESENTATION_LEN + 512];
        match self.agent.sign_report(presentation, now, &mut out) {
            Ok(n) => {
                out.truncate(n);
                tracing::warn!(
                    "a presentation with a revoked token was refused: reported to the hub"
                );
                let _ = self.outbound.send(Outbound::Publish {
                    topic: self.agent.request_topic().to_string(),
                    payload: out,
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot report a refused presentation to the hub"),
        }
    }

    /// The device token, if one is held and valid by the agent's idea of the hub's time.
    fn valid_token(&self, now: u64) -> Result<&[u8], String> {
        if self.revoked {
            return Err("revoked: this device is revoked and holds no token".into());
        }
        let state = state_name(self.agent.state());
        let (Some(token), Some(exp)) = (self.agent.token(), self.agent.token_expires_at()) else {
            return Err(format!("no device token (state: {state})"));
        };
        let hub_now_ms = now.saturating_add_signed(self.agent.clock_offset_ms());
        if exp.saturating_mul(1000) <= hub_now_ms {
            return Err(format!("device token expired at {exp} (state: {state})"));
        }
        Ok(token)
    }

    fn status(&self, now: u64) -> Status {
        Status::of(&self.agent, now, &self.facts)
    }
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
        if let Err(e) = sent {
            // The event loop is gone: the agent is stopping.
            tracing::debug!(error = %e, "cannot hand a message to the MQTT client");
            return;
        }
    }
}

/// The MQTT connection of one run: the client, its notices and the publisher task.
struct Connection {
    client: MqttClient,
    notices: Notices,
    stop: watch::Sender<bool>,
    publisher: tokio::task::JoinHandle<()>,
}

impl Connection {
    fn open(config: &Config, outbound: mpsc::UnboundedReceiver<Outbound>) -> Result<Self, Error> {
        let (stop, stop_rx) = watch::channel(false);
        let (client, notices) = tessera_mqtt::connect(&config.mqtt, MQTT_CAPACITY, stop_rx)?;
        let publisher = tokio::spawn(publisher(client.clone(), outbound));
        Ok(Self {
            client,
            notices,
            stop,
            publisher,
        })
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        // Let the event loop flush the DISCONNECT before it stops.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.stop.send(true);
        self.publisher.abort();
    }
}

/// Removes the socket file when the run ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop (SIGTERM, SIGINT).
    Stopped,
    /// The hub revoked the device: the store is wiped.
    Revoked,
}

/// `tessera-agent run`: keeps a valid device token until `shutdown` completes or the device
/// is revoked, and serves the local socket meanwhile.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<Ended, Error> {
    let anchor = identity::read_trust_anchor(&config.trust_anchor_file)?;
    // Held until `run` returns (the kernel releases it if the process dies): a second agent
    // on this state directory, whatever its socket, stops here.
    let _lock = StateLock::acquire(&config.store.dir)?;
    // Then the socket: it refuses to start while another agent (with another state
    // directory) serves it, before the store is touched.
    let listener = local::bind(&config.socket)?;
    let _socket_file = SocketFile(config.socket.clone());
    let (mut store, stored) = match Store::load(&config.store, &config.device_id)? {
        Loaded::Enrolled(store, plaintext) => (store, plaintext),
        Loaded::NotEnrolled => return Err(Error::NotEnrolled(config.store.record.clone())),
        Loaded::Revoked(note) => return Err(revoked_error(&note)),
    };
    // After the store: a revoked device's key is retired, and it says revoked, not missing.
    let signer = identity::read_device_key(&config.key_file)?;
    // Fail fast on a store that cannot be written: every refresh spends the grant on disk,
    // so an agent that cannot save the new one must not start spending. Writing the state
    // just read back (with the next counter) exercises exactly what every later write does.
    store.write(&stored).map_err(Error::StoreNotWritable)?;
    let (mut shell, outbound) = Shell::new(config.agent_config(None)?, signer, anchor, store)?;
    shell.boot(Some(&stored))?;
    drop(stored);
    tracing::info!(
        device = %config.device_id,
        state = state_name(shell.agent.state()),
        token_expires_at = shell.agent.token_expires_at(),
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        tls = config.mqtt.tls.is_some(),
        socket = %config.socket.display(),
        "agent started"
    );
    let mut connection = Connection::open(config, outbound)?;
    let (requests_tx, mut requests) = mpsc::channel(32);
    let server = tokio::spawn(local::serve(listener, requests_tx));
    tokio::pin!(shutdown);
    let mut textfile_tick = tokio::time::interval(METRICS_TEXTFILE_EVERY);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(Ended::Stopped),
            _ = textfile_tick.tick(), if config.metrics_textfile.is_some() => {
                write_metrics_textfile(config, &shell, false);
            }
            notice = connection.notices.recv() => match notice {
                Some(notice) => {
                    if let Err(e) = shell.on_notice(notice) {
                        break Err(e);
                    }
                }
                None => break Err(Error::Hub("the MQTT event loop stopped".into())),
            },
            Some(request) = requests.recv() => {
                let reply = shell.answer(request.command);
                let _ = request.reply.send(reply);
            }
            () = tokio::time::sleep(shell.sleep_for()) => {
                if let Err(e) = shell.on_sleep_over() {
                    break Err(e);
                }
            }
        }
        if shell.revoked {
            break Ok(Ended::Revoked);
        }
    };
    if matches!(result, Ok(Ended::Revoked)) {
        // The hub never accepts this key again: enrolling again makes a new one.
        match identity::retire_device_key(&config.key_file) {
            Ok(Some(to)) => tracing::warn!(
                key = %to.display(),
                "device key retired: the device must be provisioned again and enrolled with a \
                 new key"
            ),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot retire the revoked device key"),
        }
    }
    server.abort();
    connection.close().await;
    // The last word: a stopped or revoked agent, not a stale "holding".
    write_metrics_textfile(config, &shell, true);
    tracing::info!(outcome = ?result.as_ref().ok(), "agent stopped");
    result
}

/// How often `run` rewrites the metrics textfile (`metrics_textfile`).
const METRICS_TEXTFILE_EVERY: Duration = Duration::from_secs(15);

/// Rewrites the metrics textfile, if one is configured; a failure is logged, never fatal:
/// monitoring must not take the device's token away.
fn write_metrics_textfile(config: &Config, shell: &Shell, stopped: bool) {
    let Some(path) = &config.metrics_textfile else {
        return;
    };
    let mut status = shell.status(now_ms());
    if stopped {
        status.running = false;
        status.connected = Some(false);
        if status.state != "revoked" {
            status.state = "stopped".into();
        }
    }
    if let Err(e) = crate::metrics::write_textfile(path, &status) {
        tracing::warn!(error = %e, "cannot write the metrics textfile");
    }
}

/// The error for a device whose store says it was revoked.
pub fn revoked_error(note: &str) -> Error {
    Error::Revoked(format!(
        "this device is revoked ({note}); it holds no token and does not refresh. To put it \
         back in service, provision it at the hub again (`tessera-hub device reprovision`) and \
         run `tessera-agent enroll`, which makes a new device key"
    ))
}

/// What `enroll` achieved.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The device key file, and whether `enroll` created it.
    pub key_file: PathBuf,
    /// Whether the device key was created now.
    pub key_created: bool,
    /// The hub's time of the enrollment.
    pub enrolled_at: Option<u64>,
    /// The device token's expiry.
    pub token_expires_at: Option<u64>,
    /// The record file.
    pub record: PathBuf,
}

/// `tessera-agent enroll`: creates the device key and secret if missing, enrolls with the
/// hub (pre-registered key, or the one-time code `code`, of which only the derived key is
/// kept, in memory) and waits for the first device token, which it stores. Gives up after
/// `timeout`, or at the first refusal that needs an operator.
pub async fn enroll(
    config: &Config,
    code: Option<Zeroizing<String>>,
    timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<Enrolled, Error> {
    // Held until `enroll` returns: no agent can run on this store meanwhile.
    let _lock = StateLock::acquire(&config.store.dir)?;
    if matches!(
        local::ask(&config.socket, &Command::Status, Duration::from_secs(2)),
        Ok(local::Asked::Answer(_))
    ) {
        return Err(Error::Config(format!(
            "tessera-agent is running (socket {}): stop it before enrolling",
            config.socket.display()
        )));
    }
    let anchor = identity::read_trust_anchor(&config.trust_anchor_file)?;
    crate::store::ensure_private_dir(&config.store.dir)?;
    let (signer, key_created) = identity::device_key_or_create(&config.key_file)?;
    if key_created {
        tracing::info!(path = %config.key_file.display(), "created the device key");
    }
    let store = Store::create(&config.store, &config.device_id)?;
    let code_key = config.enrollment_code_key(code);
    let with_code = code_key.is_some();
    let kid = hex::encode(signer.kid());
    let (mut shell, outbound) = Shell::new(config.agent_config(code_key)?, signer, anchor, store)?;
    shell.boot(None)?;
    tracing::info!(
        device = %config.device_id,
        %kid,
        with_code,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        "enrolling"
    );
    let mut connection = Connection::open(config, outbound)?;
    let deadline = tokio::time::Instant::now() + timeout;
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Err(Error::Hub("interrupted".into())),
            () = tokio::time::sleep_until(deadline) => {
                let last = shell.status(now_ms()).last_error.unwrap_or_else(|| {
                    if shell.agent.is_connected() {
                        "the hub did not answer".into()
                    } else {
                        format!("cannot reach the broker at {}:{}", config.mqtt.host, config.mqtt.port)
                    }
                });
                break Err(Error::Hub(format!(
                    "no device token within {} s (state: {}): {last}",
                    timeout.as_secs(),
                    state_name(shell.agent.state())
                )));
            }
            notice = connection.notices.recv() => match notice {
                Some(notice) => {
                    if let Err(e) = shell.on_notice(notice) {
                        break Err(e);
                    }
                }
                None => break Err(Error::Hub("the MQTT event loop stopped".into())),
            },
            () = tokio::time::sleep(shell.sleep_for()) => {
                if let Err(e) = shell.on_sleep_over() {
                    break Err(e);
                }
            }
        }
        if shell.revoked {
            break Err(revoked_error(
                "the hub answered that this device is revoked",
            ));
        }
        if shell.agent.state() == State::Holding {
            // The token is not enrolled until it is stored: a last try, then a clear stop.
            let now = now_ms();
            if let Some(Err(e)) = shell.writer.retry_now(now, jitter()) {
                break Err(Error::StoreNotWritable(e));
            }
            break Ok(Enrolled {
                key_file: config.key_file.clone(),
                key_created,
                enrolled_at: shell.agent.enrolled_at(),
                token_expires_at: shell.agent.token_expires_at(),
                record: config.store.record.clone(),
            });
        }
        if shell.enroll_answer_untrusted {
            break Err(Error::Hub(format!(
                "no answer from the hub that verifies, but messages signed by a key the trust \
                 anchor {} does not name: is it this hub's trust anchor (`tessera-hub \
                 trust-anchor` prints it)?",
                config.trust_anchor_file.display()
            )));
        }
        if let Some(refusal) = shell.refusal.take().filter(|r| !r.code.is_retryable()) {
            let reason = refusal.reason.unwrap_or_default();
            break Err(Error::Hub(match refusal.op {
                Operation::Enroll => format!(
                    "the hub refused the enrollment: {}: {reason} (check the device id, the \
                     enrollment code or the registered key)",
                    refusal.code
                ),
                op => format!(
                    "enrolled, but the hub refuses {}: {}: {reason}; `tessera-agent run` \
                     keeps asking at the backoff's cap",
                    op.name(),
                    refusal.code
                ),
            }));
        }
    };
    connection.close().await;
    result
}

/// What `token` and `status` read from disk when the agent is not running.
#[derive(Debug)]
pub enum Inspected {
    /// The state in the store.
    Enrolled {
        /// The status, `running` false.
        status: Box<Status>,
        /// The token, hex, if one is stored and valid by the local clock.
        token: Result<String, String>,
    },
    /// No store.
    NotEnrolled,
    /// The store was wiped on revocation; the marker's note.
    Revoked(String),
}

/// Reads the store without starting the agent (needs read access to the device key, the
/// device secret and the store).
pub fn inspect(config: &Config) -> Result<Inspected, Error> {
    let (store, stored) = match Store::load(&config.store, &config.device_id)? {
        Loaded::Enrolled(store, plaintext) => (store, plaintext),
        Loaded::NotEnrolled => return Ok(Inspected::NotEnrolled),
        Loaded::Revoked(note) => return Ok(Inspected::Revoked(note)),
    };
    let signer = identity::read_device_key(&config.key_file)?;
    let anchor = identity::read_trust_anchor(&config.trust_anchor_file)?;
    let mut agent = Agent::<P256Signer>::new(config.agent_config(None)?, signer, anchor)
        .map_err(Error::Core)?;
    let now = now_ms();
    // The actions are not performed: this only reads.
    agent
        .handle(
            Event::Boot {
                stored: Some(&stored),
            },
            now,
            &random32()?,
        )
        .map_err(|e| {
            Error::Store(StoreError::StateUndecodable {
                path: config.store.record.clone(),
                reason: e.to_string(),
            })
        })?;
    let facts = ShellFacts {
        running: false,
        store_counter: store.counter(),
        ..ShellFacts::default()
    };
    let status = Box::new(Status::of(&agent, now, &facts));
    let token = match (agent.token(), agent.token_expires_at()) {
        (Some(t), Some(exp)) if exp.saturating_mul(1000) > now => Ok(hex::encode(t)),
        (Some(_), Some(exp)) => Err(format!("the stored device token expired at {exp}")),
        _ => Err("no device token stored".into()),
    };
    Ok(Inspected::Enrolled { status, token })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorePaths;

    fn paths(dir: &std::path::Path) -> StorePaths {
        StorePaths {
            dir: dir.to_path_buf(),
            record: dir.join("store.tsr"),
            counter: dir.join("store.counter"),
            device_secret: dir.join("device-secret"),
            revoked_marker: dir.join("revoked"),
        }
    }

    fn stored(p: &StorePaths) -> Vec<u8> {
        match Store::load(p, "dev-1").expect("loads") {
            Loaded::Enrolled(_, plaintext) => plaintext.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_state_that_cannot_be_written_is_kept_and_written_by_a_retry_with_backoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let backoff = Backoff {
            base_ms: 500,
            cap_ms: 60_000,
        };
        let mut writer = StoreWriter::new(Store::create(&p, "dev-1").expect("create"), backoff);
        writer.write(b"first", 1_000, 0).expect("write");
        assert_eq!(writer.retry_due(1_000_000, 0).map(|r| r.is_ok()), None);

        // The disk stops taking writes: the newest state is kept, the old record stays.
        let obstacle = dir.path().join(".store.tsr.tmp");
        std::fs::create_dir(&obstacle).expect("block writes");
        assert!(writer.write(b"second", 2_000, u32::MAX).is_err());
        assert_eq!(writer.unsaved_since_ms(), Some(2_000));
        assert_eq!(stored(&p), b"first");
        // First retry within the base delay (full jitter, here its top).
        assert_eq!(writer.retry_at_ms(), Some(2_500));
        assert!(writer.retry_due(2_499, u32::MAX).is_none(), "not yet due");
        // Still failing: the delay doubles, the first failure time stays.
        assert!(writer.retry_due(2_500, u32::MAX).expect("due").is_err());
        assert_eq!(writer.retry_at_ms(), Some(3_500));
        assert_eq!(writer.unsaved_since_ms(), Some(2_000));
        // A newer state replaces the unsaved one.
        assert!(writer.write(b"third", 3_000, u32::MAX).is_err());
        assert_eq!(writer.retry_at_ms(), Some(5_000));

        // The disk is back: the retry writes the newest state, and nothing is pending.
        std::fs::remove_dir(&obstacle).expect("unblock");
        writer.retry_due(5_000, 0).expect("due").expect("written");
        assert_eq!(writer.unsaved_since_ms(), None);
        assert_eq!(writer.retry_at_ms(), None);
        assert_eq!(stored(&p), b"third");

        // After a revocation nothing unsaved may come back.
        std::fs::create_dir(&obstacle).expect("block writes");
        assert!(writer.write(b"fourth", 6_000, 0).is_err());
        writer.forget();
        assert!(writer.retry_now(7_000, 0).is_none());
    }
}
