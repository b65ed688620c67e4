//! The device agent's sans-I/O state machine: enrollment, keeping a valid device token at all
//! times, following the hub's key set, revocation list and control messages, and checking
//! the tokens apps present to the device.
//!
//! The agent does no I/O. A shell (the tokio agent, the firmware simulator, firmware) feeds
//! [`Agent::handle`] one [`Event`] at a time with its local clock in milliseconds and 32 fresh
//! random bytes, and performs the [`Action`]s it returns, in order: wipe or store the
//! persisted state, subscribe, publish, log the reports, and call back with
//! [`Event::Timer`] at the time of the last [`Action::WakeAt`] (always also
//! [`Agent::next_wake`]).
//!
//! # States
//!
//! Each [`State`] is named for what the agent waits for:
//!
//! ```text
//! Starting            ── Boot, nothing stored ──────────────────────▶ AwaitingEnrollment
//! Starting            ── Boot, stored state ───────────▶ Holding / Refreshing / AwaitingToken
//! AwaitingEnrollment  ── hub confirms the enrollment ───────────────▶ AwaitingToken
//! AwaitingToken       ── valid token received ──────────────────────▶ Holding
//! Holding             ── refresh point reached, or RefreshNow ──────▶ Refreshing
//! Refreshing          ── valid token received ──────────────────────▶ Holding
//! Holding, Refreshing ── token expired, or revoked by the list ─────▶ AwaitingToken
//! any                 ── control Revoked, or the hub answers Revoked
//!                        to an enrollment or device-token request ──▶ Revoked
//! ```
//!
//! `AwaitingToken` and `Refreshing` both ask for a token: with the refresh grant while it
//! lasts ([`Operation::Refresh`]), otherwise with the device key alone
//! ([`Operation::DeviceToken`]). The difference is that `Refreshing` still holds a valid
//! token. `Revoked` is terminal: the persisted state is wiped and nothing is ever published
//! again.
//!
//! The connection is tracked apart from the state: requests go out only while connected,
//! and [`Event::Connected`] subscribes again and sends whatever is pending anew.
//!
//! # Requests
//!
//! The agent has at most two exchanges with the hub open at a time: one for its token
//! (enroll, device token, refresh) and one to fetch the revocation snapshot. Every attempt
//! is a freshly signed request with a new request id and nonce, so the hub's replay check
//! never refuses a resend. A response counts only if it verifies with the trusted key set
//! and [`answers`](crate::message::Response::answers) one of the last [`MAX_ATTEMPTS`]
//! attempts; so a late answer to an attempt that was resent is still used (the hub may
//! already have rotated the grant in it), while a replayed or foreign response is ignored.
//! Failures retry with the configured [`Backoff`] (full jitter, never later than halfway to
//! the token's expiry); an attempt without an answer within
//! [`request_timeout_ms`](AgentConfig::request_timeout_ms) counts as a failure. Refusals
//! that need a change first (`denied`, `unknown_client`, …) are retried only at the
//! backoff's cap, so an operator's fix is picked up without a reboot and without the fleet
//! hammering the hub meanwhile. How each code is handled:
//!
//! | code | the agent |
//! |---|---|
//! | `stale` | takes the hub's time from the answer and retries at once |
//! | `revoked` to `refresh`, `denied` to `refresh` | drops the grant, asks with `device_token` at once |
//! | `revoked` to `enroll` or `device_token` | wipes and stops ([`State::Revoked`]) |
//! | `replay` | keeps waiting for the answer to the first copy of the request |
//! | `rate_limited`, `internal`, `overloaded` | backs off |
//! | anything else | backs off from the cap |
//!
//! # Time
//!
//! Token, control, revocation and request times are the hub's Unix seconds. The agent's
//! notion of it is the shell's local milliseconds plus an offset learned from verified,
//! nonce-bound responses: from every such response unless
//! [`trust_local_clock`](AgentConfig::trust_local_clock) is set, and in any case from a
//! [`ErrorCode::Stale`] refusal, without which the device could never talk to the hub
//! again. [`Action::WakeAt`] and [`Agent::next_wake`] are in the shell's local milliseconds.
//!
//! The revocation list judges entries spent by that time, so a wrong clock must not lose
//! one: until the time is known (the local clock trusted, or a response received) it
//! judges none spent, and when its idea of the time goes back by more than the leeway (a
//! correction, or the local clock set back) after it skipped entries as spent, it fetches
//! its stream again from change 1 ([`Report::RevocationsRefetching`]).
//!
//! # Persisted state
//!
//! See [`persisted`] for the layout of [`Action::Store`]'s plaintext.

pub mod persisted;
mod replay;
#[cfg(test)]
mod tests;

use core::fmt;

use crate::MAX_ID_LEN;
use crate::claims::MAX_AUDIENCE_LEN;
use crate::crypto::{Kid, PublicKey, Signer, sha256};
use crate::error::{CapacityError, ClaimsError, DecodeError, Error};
use crate::keyset::{KeySet, KeySetOutcome};
use crate::message::{
    Command, Control, EnrollmentCode, ErrorCode, MAX_GRANT_LEN, NONCE_LEN, Operation, Request,
    RequestBody, Response, ResponseBody, SignedPresentation, SignedResponse, validate_id,
};
use crate::revocation::{
    self, Bounded, HeartbeatOutcome, MAX_REVOKED, Page, PageOutcome, RevocationList, Stream,
    StreamMessage,
};
use crate::schedule::{self, Backoff};
use crate::token::{self, MAX_TOKEN_LEN, Validation};
use crate::topic::{self, Topic};
use persisted::MAX_STATE_LEN;

pub use replay::MAX_SEEN_PRESENTATIONS;

/// Room for one signed request: the longest the agent sends is an enrollment with a code
/// proof and a [`MAX_ID_LEN`]-byte id, about 330 bytes.
pub const REQUEST_BUF_LEN: usize = 512;

/// Attempts of one exchange whose answers are still accepted.
pub const MAX_ATTEMPTS: usize = 4;

/// Reports one call of [`Agent::handle`] can return.
pub const MAX_REPORTS: usize = 8;

/// Topics the agent subscribes to on every [`Event::Connected`]: its response and control
/// topics, the key set, and its revocation stream.
pub const SUBSCRIPTIONS: usize = 4;

/// Most actions one call of [`Agent::handle`] returns: a wipe or store, the subscriptions,
/// one publish per exchange, the reports and a wake-up.
pub const MAX_ACTIONS: usize = 1 + SUBSCRIPTIONS + 2 + MAX_REPORTS + 1;

/// The actions of one [`Agent::handle`] call, borrowing the agent's buffers.
pub type Actions<'a> = heapless::Vec<Action<'a>, MAX_ACTIONS>;

/// Shortest wait for an answer, however close the token is to expiry.
pub const MIN_REQUEST_TIMEOUT_MS: u64 = 250;

/// Default for [`AgentConfig::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// Default for [`AgentConfig::presentation_window_s`].
pub const DEFAULT_PRESENTATION_WINDOW_S: u64 = 60;

/// How an agent behaves; everything but the two ids has a default.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentConfig {
    device_id: heapless::String<MAX_ID_LEN>,
    audience: heapless::String<MAX_AUDIENCE_LEN>,
    /// Clock-skew leeway for token, presentation and revocation times, in seconds.
    pub leeway_s: u64,
    /// How long to wait for a response before the request counts as failed, in ms.
    pub request_timeout_ms: u64,
    /// How failed requests are retried.
    pub backoff: Backoff,
    /// Whether the local clock is right (NTP, a real-time clock); if not, the agent keeps
    /// the hub's time learned from every verified response.
    pub trust_local_clock: bool,
    /// Presentations are refused once the revocation knowledge is older than this, in
    /// seconds, if that is stricter than the hub: the agent holds knowledge to the smaller
    /// of this and the `max_age` the hub announces in its heartbeats, which it derives from
    /// its heartbeat interval and the shortest access token lifetime
    /// ([`recommended_max_age`](crate::revocation::recommended_max_age)). `None` (the
    /// default) follows the hub's.
    pub revocation_max_age_s: Option<u64>,
    /// How far a presentation's `issued_at` may be from now, in seconds.
    pub presentation_window_s: u64,
    /// The key derived from this device's one-time enrollment code
    /// ([`EnrollmentCode::derive_key`]), if the hub expects one.
    pub enrollment_code_key: Option<[u8; 32]>,
}

impl AgentConfig {
    /// A configuration for device `device_id` whose device tokens name `audience` (the
    /// hub's service audience), with every other field at its default.
    pub fn new(device_id: &str, audience: &str) -> Result<Self, Error> {
        validate_id(device_id)?;
        if audience.is_empty() {
            return Err(DecodeError::InvalidValue("audience").into());
        }
        Ok(Self {
            device_id: heapless::String::try_from(device_id)
                .map_err(|_| DecodeError::InvalidValue("id"))?,
            audience: heapless::String::try_from(audience)
                .map_err(|_| DecodeError::InvalidValue("audience"))?,
            leeway_s: token::DEFAULT_LEEWAY,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            backoff: Backoff::default(),
            trust_local_clock: false,
            revocation_max_age_s: None,
            presentation_window_s: DEFAULT_PRESENTATION_WINDOW_S,
            enrollment_code_key: None,
        })
    }

    /// This device's id: the client id of its requests, the `sub` of its device token and
    /// the audience of tokens presented to it.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The audience the device's own token must name.
    pub fn audience(&self) -> &str {
        &self.audience
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The enrollment code key is a secret: say whether there is one, never what it is.
        f.debug_struct("AgentConfig")
            .field("device_id", &self.device_id)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("backoff", &self.backoff)
            .field("trust_local_clock", &self.trust_local_clock)
            .field("revocation_max_age_s", &self.revocation_max_age_s)
            .field("presentation_window_s", &self.presentation_window_s)
            .field("enrollment_code_key", &self.enrollment_code_key.is_some())
            .finish()
    }
}

/// What happened, as the shell tells the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// The shell started: `stored` is the opened plaintext of the last [`Action::Store`], or
    /// `None` if there is none (first start, or after [`Action::Wipe`]).
    Boot {
        /// The persisted state.
        stored: Option<&'a [u8]>,
    },
    /// The MQTT connection is up (first time or again).
    Connected,
    /// The MQTT connection is lost.
    Disconnected,
    /// A message arrived on a subscribed topic.
    Message {
        /// The topic it arrived on.
        topic: &'a str,
        /// Its payload.
        payload: &'a [u8],
    },
    /// The time of the last [`Action::WakeAt`] has come.
    Timer,
}

/// What the shell must do, in the order returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Subscribe to this topic (QoS 1).
    Subscribe(&'a str),
    /// Publish `payload` on `topic` (QoS 1, not retained).
    Publish {
        /// The agent's request topic.
        topic: &'a str,
        /// A signed request.
        payload: &'a [u8],
    },
    /// Seal this plaintext into the device's record, replacing the previous one; see
    /// [`persisted`] for its layout.
    Store {
        /// The persisted state.
        plaintext: &'a [u8],
    },
    /// Delete the stored record: the device was revoked.
    Wipe,
    /// Deliver [`Event::Timer`] at this local time (ms), replacing any earlier request.
    WakeAt(u64),
    /// Something worth logging or counting happened.
    Report(Report),
}

/// What the agent tells the shell about, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Report {
    /// The hub registered this device's key, at this hub time (Unix seconds).
    Enrolled {
        /// The hub's time of the enrollment.
        at: u64,
    },
    /// A new device token is held.
    TokenRenewed {
        /// When it expires, Unix seconds.
        expires_at: u64,
    },
    /// The token expired before a new one arrived.
    TokenExpired,
    /// The hub refused a request.
    RequestFailed {
        /// What was asked.
        op: Operation,
        /// Why it was refused.
        code: ErrorCode,
    },
    /// No response came within the request timeout.
    RequestTimedOut {
        /// What was asked.
        op: Operation,
    },
    /// A request could not be built or signed (a local fault: the signer failed).
    RequestNotSent {
        /// What was to be asked.
        op: Operation,
        /// Why.
        error: Error,
    },
    /// The hub answered, but what it sent does not pass the agent's checks (a token for
    /// another audience, subject or key).
    ResponseRejected {
        /// What was asked.
        op: Operation,
        /// Which check failed.
        error: Error,
    },
    /// The device is revoked: the stored state is wiped and the agent stops.
    Revoked,
    /// The agent's idea of the hub's time moved; the new offset from local time, in ms.
    ClockAdjusted {
        /// Hub time minus local time.
        offset_ms: i64,
    },
    /// A newer key set is trusted.
    KeySetUpdated {
        /// Its version.
        version: u64,
    },
    /// A revocation page was applied; the list holds every change up to `seq`.
    RevocationsApplied {
        /// The last change of the stream the list holds.
        seq: u64,
    },
    /// Revocation changes were missed (a delta skipped ahead, or a heartbeat named a later
    /// change); they are being fetched.
    RevocationGap {
        /// The last change the list holds.
        have: u64,
        /// The latest the hub has.
        got: u64,
    },
    /// The revocations addressed to this device do not fit its list: presentations are
    /// refused as stale until they fit again (as entries expire, they are fetched again).
    RevocationListFull,
    /// The agent's hub time went back by more than its leeway (a clock correction) after
    /// it had judged revocation entries spent at the later time: it forgets which changes it
    /// applied, keeping every entry it holds, and fetches its stream again from change 1.
    /// Presentations are refused as stale until it holds every change again.
    RevocationsRefetching {
        /// The latest change of the stream it has heard of.
        latest: u64,
    },
    /// A message was ignored.
    Ignored(Ignored),
}

/// Why a message was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// It does not decode or its signature does not verify with the trusted key set (forged,
    /// corrupted, or signed by a key not yet announced).
    Invalid(Error),
    /// A response that answers none of the agent's open requests: someone else's, a replay,
    /// or an answer to a request already settled.
    Unsolicited,
    /// A control message for another device.
    OtherDevice,
    /// A control message issued before this device enrolled (a replay of an old one), or
    /// before it is enrolled at all.
    BeforeEnrollment,
    /// Nothing newer than what the agent has: a key set or revocation message it already
    /// applied or that is older, or a command it already followed.
    Outdated,
    /// A topic the agent does not handle.
    UnknownTopic,
}

impl From<Error> for Ignored {
    fn from(e: Error) -> Self {
        Ignored::Invalid(e)
    }
}

/// What the agent is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// For [`Event::Boot`].
    Starting,
    /// For the hub to confirm the enrollment of the device's key.
    AwaitingEnrollment,
    /// For a token: the device holds none that is valid.
    AwaitingToken,
    /// For the refresh point of the valid token it holds.
    Holding,
    /// For a new token while the current one is still valid.
    Refreshing,
    /// For nothing: the device is revoked.
    Revoked,
}

/// The latest thing that went wrong, for a health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastError {
    /// The hub refused a request with this code.
    Refused(ErrorCode),
    /// A request got no answer in time.
    TimedOut(Operation),
    /// A message, a response's content or a request to send was rejected.
    Rejected(Error),
}

/// The two requests the agent has open at most: which buffer and attempt list is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    /// Enroll, device token, refresh.
    Token,
    /// Fetch pages of the revocation stream.
    Revocations,
}

/// One sent request whose answer is still accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attempt {
    op: Operation,
    request_id: u64,
    nonce: [u8; NONCE_LEN],
    /// Local time it was published, ms.
    sent_at: u64,
}

/// One exchange with the hub: its request buffer, its open attempts and its retry timing.
struct Requests {
    buf: [u8; REQUEST_BUF_LEN],
    len: usize,
    attempts: heapless::Vec<Attempt, MAX_ATTEMPTS>,
    /// Local time the latest attempt was published, while its answer is awaited.
    in_flight: Option<u64>,
    /// No attempt before this local time (backoff); `None` means as soon as connected.
    not_before: Option<u64>,
    /// Failures since the last success: the backoff attempt number.
    failures: u32,
    /// Whether this call of `handle` publishes `buf`.
    publish: bool,
}

impl Requests {
    const fn new() -> Self {
        Self {
            buf: [0; REQUEST_BUF_LEN],
            len: 0,
            attempts: heapless::Vec::new(),
            in_flight: None,
            not_before: None,
            failures: 0,
            publish: false,
        }
    }

    /// Forgets the exchange: it succeeded or no longer matters.
    fn settle(&mut self) {
        self.attempts.clear();
        self.in_flight = None;
        self.not_before = None;
        self.failures = 0;
    }

    /// Sends the next attempt as soon as possible, unless one is already out.
    fn hurry(&mut self) {
        if self.in_flight.is_none() {
            self.not_before = None;
        }
    }

    fn remember(&mut self, attempt: Attempt) {
        if self.attempts.is_full() {
            self.attempts.remove(0);
        }
        // There is room: a full list just lost its oldest attempt.
        let _ = self.attempts.push(attempt);
    }
}

/// The device token held, with what the agent needs of its claims.
#[derive(Debug, Clone, Copy)]
struct HeldToken {
    len: usize,
    iat: u64,
    exp: u64,
    /// When to refresh it, hub time in ms.
    refresh_at_ms: u64,
}

/// The refresh grant held.
#[derive(Debug, Clone, Copy)]
struct HeldGrant {
    len: usize,
    expires_at: u64,
}

/// The agent's idea of the hub's clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Hub time minus local time, ms.
    offset_ms: i64,
    /// The offsets every answer since the last clock jump agrees with, ms.
    consistent: Option<(i128, i128)>,
    /// Whether the offset can be relied on: the local clock is trusted, or a verified
    /// response has set it.
    synced: bool,
}

impl Clock {
    const fn new(synced: bool) -> Self {
        Self {
            offset_ms: 0,
            consistent: None,
            synced,
        }
    }

    fn hub_ms(&self, local_ms: u64) -> u64 {
        local_ms.saturating_add_signed(self.offset_ms)
    }

    fn hub_s(&self, local_ms: u64) -> u64 {
        self.hub_ms(local_ms) / 1000
    }

    fn local_ms(&self, hub_ms: u64) -> u64 {
        hub_ms.saturating_add_signed(self.offset_ms.saturating_neg())
    }

    /// Learns from a verified response answering a request sent at local `sent_at` and
    /// received at local `received_at` that carries the hub's time `hub_time` (seconds).
    /// Returns the new offset if it changed.
    ///
    /// The hub read its clock somewhere between sending and receiving, and its seconds
    /// floor up to 999 ms: every offset in that interval explains the response. Intersecting
    /// the intervals of successive answers narrows the estimate well below a second; an
    /// empty intersection means a clock stepped, and the latest answer alone counts. An
    /// offset still inside is kept, so the clock does not jitter with every answer; one
    /// outside moves to the middle.
    fn learn(&mut self, hub_time: u64, sent_at: u64, received_at: u64) -> Option<i64> {
        self.synced = true;
        let hub_ms = i128::from(hub_time) * 1000;
        let mut low = hub_ms - i128::from(received_at);
        let mut high = hub_ms + 999 - i128::from(sent_at.min(received_at));
        if let Some((l, h)) = self.consistent
            && l.max(low) <= h.min(high)
        {
            (low, high) = (l.max(low), h.min(high));
        }
        self.consistent = Some((low, high));
        if (low..=high).contains(&i128::from(self.offset_ms)) {
            return None;
        }
        let middle = low + (high - low) / 2;
        self.offset_ms =
            i64::try_from(middle).unwrap_or(if middle < 0 { i64::MIN } else { i64::MAX });
        Some(self.offset_ms)
    }
}

/// Stretches the 32 random bytes of one `handle` call into as many draws as it needs.
#[derive(Debug, Clone, Copy)]
struct Entropy {
    seed: [u8; 32],
    drawn: u32,
}

impl Entropy {
    fn next(&mut self) -> [u8; 32] {
        self.drawn = self.drawn.wrapping_add(1);
        sha256(&[b"tessera-agent", &self.seed, &self.drawn.to_be_bytes()])
    }

    fn nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut out = [0u8; NONCE_LEN];
        out.copy_from_slice(&self.next()[..NONCE_LEN]);
        out
    }

    fn u32(&mut self) -> u32 {
        let b = self.next();
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn u64(&mut self) -> u64 {
        let b = self.next();
        u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

/// What one `handle` call has decided to tell the shell besides publishes.
#[derive(Debug)]
struct Outbox {
    reports: heapless::Vec<Report, MAX_REPORTS>,
    overflow: bool,
    store: bool,
    wipe: bool,
    subscribe: bool,
}

impl Outbox {
    const fn new() -> Self {
        Self {
            reports: heapless::Vec::new(),
            overflow: false,
            store: false,
            wipe: false,
            subscribe: false,
        }
    }
}

/// The topics an agent uses, from its device id.
struct Topics {
    request: Topic,
    response: Topic,
    control: Topic,
    /// `tessera/v1/hub/revocation/{stream}/#` of the device's partition.
    revocations: Topic,
}

impl Topics {
    fn of(config: &AgentConfig) -> Result<Self, Error> {
        let id = config.device_id.as_str();
        Ok(Self {
            request: topic::request(id)?,
            response: topic::response(id)?,
            control: topic::control(id)?,
            revocations: topic::revocation_filter(&Stream::of_device(id)),
        })
    }
}

/// The device agent: one device's state machine, holding every buffer it needs.
///
/// It is about 13 KiB with the default `R` (the revocation list is half of it, the token
/// and persisted-state buffers most of the rest), so firmware keeps it in a static rather
/// than on the stack.
pub struct Agent<S: Signer, const R: usize = MAX_REVOKED> {
    config: AgentConfig,
    signer: S,
    public_key: PublicKey,
    kid: Kid,
    request_topic: Topic,
    response_topic: Topic,
    control_topic: Topic,
    /// `tessera/v1/hub/revocation/{stream}/#` of this device's partition.
    revocation_filter: Topic,
    keys: KeySet,
    revocations: RevocationList<Bounded<R>>,
    state: State,
    connected: bool,
    clock: Clock,
    enrolled_at: Option<u64>,
    token: Option<HeldToken>,
    token_buf: [u8; MAX_TOKEN_LEN],
    grant: Option<HeldGrant>,
    grant_buf: [u8; MAX_GRANT_LEN],
    /// `issued_at` of the last RefreshNow followed, so a replay of it is not.
    refreshed_on_command: Option<u64>,
    /// The revocations addressed to this device did not fit its list: fetching again is
    /// pointless until time has spent some of them, so the next fetch waits for a
    /// heartbeat newer than any before (one per interval) instead of looping.
    revocations_overflowed: bool,
    token_requests: Requests,
    revocation_requests: Requests,
    next_request_id: u64,
    presentations: replay::ReplayCache,
    /// The last `report_presentation` sent ([`Agent::sign_report`]): its answer is
    /// expected, not unsolicited.
    last_report: Option<(u64, [u8; NONCE_LEN])>,
    state_buf: [u8; MAX_STATE_LEN],
    next_wake: Option<u64>,
    last_error: Option<LastError>,
    outbox: Outbox,
    entropy: Entropy,
}

impl<S: Signer, const R: usize> fmt::Debug for Agent<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Buffers hold the token and grant: show their state, not their bytes.
        f.debug_struct("Agent")
            .field("device_id", &self.config.device_id)
            .field("state", &self.state)
            .field("connected", &self.connected)
            .field("enrolled_at", &self.enrolled_at)
            .field("token_expires_at", &self.token_expires_at())
            .field("has_grant", &self.grant.is_some())
            .field("clock_offset_ms", &self.clock.offset_ms)
            .field("revocation_seq", &self.revocations.seq())
            .field("next_wake", &self.next_wake)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

impl<S: Signer, const R: usize> Agent<S, R> {
    /// An agent for the device configured in `config`, signing with the device key `signer`
    /// and trusting `trust_anchor`, the hub key it was provisioned with. It waits for
    /// [`Event::Boot`].
    pub fn new(config: AgentConfig, signer: S, trust_anchor: PublicKey) -> Result<Self, Error> {
        let topics = Topics::of(&config)?;
        Ok(Self::assemble(topics, config, signer, trust_anchor))
    }

    /// Like [`new`](Self::new), but builds the agent in `slot` (a static, on firmware)
    /// rather than returning it: the agent is some 13 KiB, and a device's stack should not
    /// have to hold a temporary copy of it.
    pub fn new_in(
        slot: &mut core::mem::MaybeUninit<Self>,
        config: AgentConfig,
        signer: S,
        trust_anchor: PublicKey,
    ) -> Result<&mut Self, Error> {
        let topics = Topics::of(&config)?;
        Ok(slot.write(Self::assemble(topics, config, signer, trust_anchor)))
    }

    #[inline(always)]
    fn assemble(topics: Topics, config: AgentConfig, signer: S, trust_anchor: PublicKey) -> Self {
        let public_key = signer.public_key();
        Self {
            kid: public_key.kid(),
            public_key,
            signer,
            request_topic: topics.request,
            response_topic: topics.response,
            control_topic: topics.control,
            revocation_filter: topics.revocations,
            keys: KeySet::from_anchor(trust_anchor),
            // `AgentConfig::new` validated the id.
            revocations: RevocationList::for_valid_device(
                config.device_id.clone(),
                config.leeway_s,
            ),
            state: State::Starting,
            connected: false,
            clock: Clock::new(config.trust_local_clock),
            enrolled_at: None,
            token: None,
            token_buf: [0; MAX_TOKEN_LEN],
            grant: None,
            grant_buf: [0; MAX_GRANT_LEN],
            refreshed_on_command: None,
            revocations_overflowed: false,
            token_requests: Requests::new(),
            revocation_requests: Requests::new(),
            next_request_id: 0,
            presentations: replay::ReplayCache::new(),
            last_report: None,
            state_buf: [0; MAX_STATE_LEN],
            next_wake: None,
            last_error: None,
            outbox: Outbox::new(),
            entropy: Entropy {
                seed: [0; 32],
                drawn: 0,
            },
            config,
        }
    }

    /// Handles one event at local time `now_ms`, with 32 fresh random bytes for nonces and
    /// jitter, and returns what the shell must do.
    ///
    /// Bad input from the network never fails this: it is reported as
    /// [`Report::Ignored`]. An error means a stored state that does not decode (on
    /// [`Event::Boot`], which then changes nothing), or more reports than
    /// [`MAX_REPORTS`] ([`CapacityError::Actions`]).
    pub fn handle(
        &mut self,
        event: Event<'_>,
        now_ms: u64,
        random: &[u8; 32],
    ) -> Result<Actions<'_>, Error> {
        self.outbox = Outbox::new();
        self.entropy = Entropy {
            seed: *random,
            drawn: 0,
        };
        self.token_requests.publish = false;
        self.revocation_requests.publish = false;
        match event {
            Event::Boot { stored } => self.boot(stored)?,
            Event::Connected => self.on_connected(),
            Event::Disconnected => self.on_disconnected(),
            Event::Message { topic, payload } => self.on_message(topic, payload, now_ms),
            Event::Timer => {}
        }
        self.drive(now_ms);
        self.finish(now_ms)
    }

    /// Checks an access token an app presents to this device with `required_scope`, at
    /// local time `now_ms`, and returns it verified.
    ///
    /// In order: the presentation and its token ([`SignedPresentation::verify`]: hub
    /// signature, expiry, audience = this device, scope, the holder's signature, freshness
    /// within [`presentation_window_s`](AgentConfig::presentation_window_s)); then the
    /// revocation list; then how fresh the list is; then that the presentation's nonce was
    /// not accepted before. The errors that are not [`SignedPresentation::verify`]'s:
    ///
    /// - [`ClaimsError::Revoked`]: the revocation list covers the token.
    /// - [`ClaimsError::RevocationsStale`]: the agent cannot vouch for its revocation knowledge:
    ///   older than its maximum age ([`revocation_max_age`](Self::revocation_max_age)),
    ///   missing changes or overflowed, the clock not yet learned from the hub, or the device
    ///   revoked. Transient: the same presentation may pass once a heartbeat arrives.
    /// - [`ClaimsError::PresentationReplayed`]: the nonce was seen before (a replayed
    ///   presentation proves nothing about who holds the key now).
    pub fn check_presentation<'p>(
        &mut self,
        presentation: &'p [u8],
        required_scope: &str,
        now_ms: u64,
    ) -> Result<SignedPresentation<'p>, Error> {
        if self.state == State::Revoked || !self.clock.synced {
            return Err(ClaimsError::RevocationsStale.into());
        }
        let now = self.clock.hub_s(now_ms);
        let validation = Validation {
            now,
            audience: &self.config.device_id,
            leeway: self.config.leeway_s,
            issuer: None,
            required_scope: Some(required_scope),
        };
        let window = self.config.presentation_window_s;
        let checked = SignedPresentation::verify(presentation, &self.keys, &validation, window)?;
        checked.token.check_not_revoked(&self.revocations)?;
        if !self.revocations.is_fresh(now, self.revocation_max_age()) {
            return Err(ClaimsError::RevocationsStale.into());
        }
        if !self
            .presentations
            .admit(&checked.nonce, checked.issued_at, now, window)
        {
            return Err(ClaimsError::PresentationReplayed.into());
        }
        Ok(checked)
    }

    /// Signs into `out` a `report_presentation` request telling the hub that a
    /// presentation this device received at local time `now_ms` was refused because its
    /// token is revoked ([`ClaimsError::Revoked`] from
    /// [`check_presentation`](Self::check_presentation)), and returns its length; the
    /// shell publishes it on [`request_topic`](Self::request_topic). The hub checks the
    /// holder's signature on it, so a report is evidence against the holder, which anomaly
    /// detection counts (docs/PROTOCOL.md §7.5). Fire and forget: the answer is taken
    /// quietly and nothing is resent.
    ///
    /// Errors: the device has no clock from the hub yet, the presentation is larger than
    /// [`MAX_PRESENTATION_LEN`](crate::message::MAX_PRESENTATION_LEN), `out` is too small,
    /// or the signer failed.
    pub fn sign_report(
        &mut self,
        presentation: &[u8],
        now_ms: u64,
        out: &mut [u8],
    ) -> Result<usize, Error> {
        if !self.clock.synced {
            return Err(ClaimsError::RevocationsStale.into());
        }
        if presentation.is_empty() || presentation.len() > crate::message::MAX_PRESENTATION_LEN {
            return Err(DecodeError::InvalidValue("presentation").into());
        }
        let nonce = self.entropy.nonce();
        let request_id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let request = Request {
            client: self.config.device_id.as_str(),
            request_id,
            issued_at: self.clock.hub_s(now_ms),
            nonce,
            body: RequestBody::ReportPresentation { presentation },
        };
        let n = request.sign(&self.signer, out)?;
        self.last_report = Some((request_id, nonce));
        Ok(n)
    }

    /// The topic this device publishes its requests on.
    pub fn request_topic(&self) -> &str {
        self.request_topic.as_str()
    }

    /// What the agent waits for.
    pub fn state(&self) -> State {
        self.state
    }

    /// The device token held, if any (it is valid unless the clock is not yet learned).
    pub fn token(&self) -> Option<&[u8]> {
        self.token.and_then(|t| self.token_buf.get(..t.len))
    }

    /// When the held token expires, Unix seconds.
    pub fn token_expires_at(&self) -> Option<u64> {
        self.token.map(|t| t.exp)
    }

    /// When the held refresh grant expires, Unix seconds.
    pub fn grant_expires_at(&self) -> Option<u64> {
        self.grant.map(|g| g.expires_at)
    }

    /// When the agent wants the next [`Event::Timer`], local ms.
    pub fn next_wake(&self) -> Option<u64> {
        self.next_wake
    }

    /// The hub time (Unix seconds) as of which the revocation list is known complete.
    pub fn revocation_fresh_as_of(&self) -> Option<u64> {
        self.revocations.fresh_as_of()
    }

    /// The revocation list.
    pub fn revocations(&self) -> &RevocationList<Bounded<R>> {
        &self.revocations
    }

    /// How old, in seconds, revocation knowledge may be for a presentation to pass: the
    /// hub's announced one, or the configured
    /// [`revocation_max_age_s`](AgentConfig::revocation_max_age_s) if that is smaller.
    pub fn revocation_max_age(&self) -> u64 {
        self.revocations.max_age(self.config.revocation_max_age_s)
    }

    /// The trusted hub keys.
    pub fn key_set(&self) -> &KeySet {
        &self.keys
    }

    /// The hub's time of this device's enrollment, Unix seconds.
    pub fn enrolled_at(&self) -> Option<u64> {
        self.enrolled_at
    }

    /// The hub's clock minus the local clock, ms, as the agent currently believes.
    pub fn clock_offset_ms(&self) -> i64 {
        self.clock.offset_ms
    }

    /// Whether the shell last reported the connection up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The latest thing that went wrong.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    fn boot(&mut self, stored: Option<&[u8]>) -> Result<(), Error> {
        let saved = stored.map(persisted::Saved::decode).transpose()?;
        if saved
            .as_ref()
            .is_some_and(|s| s.device != self.config.device_id.as_str())
        {
            return Err(DecodeError::InvalidValue("device").into());
        }
        // A (re)start forgets everything volatile: open requests and the learned clock.
        self.token_requests.settle();
        self.revocation_requests.settle();
        self.refreshed_on_command = None;
        self.revocations_overflowed = false;
        self.clock = Clock::new(self.config.trust_local_clock);
        // Request ids only need to differ from those of earlier runs still in flight.
        self.next_request_id = self.entropy.u64() >> 1;
        self.drop_token();
        self.drop_grant();
        // The shell may have connected before it booted the agent.
        self.outbox.subscribe = self.connected;
        let Some(saved) = saved else {
            self.enrolled_at = None;
            self.state = State::AwaitingEnrollment;
            return Ok(());
        };
        if saved.keys.version() >= self.keys.version() {
            self.keys = saved.keys;
        }
        self.enrolled_at = Some(saved.enrolled_at);
        if let Some(g) = saved.grant {
            self.hold_grant(g.bytes, g.expires_at);
        }
        self.state = State::AwaitingToken;
        if let Some(t) = saved.token {
            self.hold_token(t.bytes, t.iat, t.exp);
            // Without a trusted clock the token's validity is unknown until the hub has
            // answered once; refreshing at once is what asks it.
            self.state = if self.clock.synced {
                State::Holding
            } else {
                State::Refreshing
            };
        }
        Ok(())
    }

    fn on_connected(&mut self) {
        self.connected = true;
        if matches!(self.state, State::Starting | State::Revoked) {
            return;
        }
        self.outbox.subscribe = true;
        // Whatever was out may have been lost with the old connection: send it again.
        for requests in [&mut self.token_requests, &mut self.revocation_requests] {
            if requests.in_flight.take().is_some() {
                requests.not_before = None;
            }
        }
    }

    fn on_disconnected(&mut self) {
        self.connected = false;
        for requests in [&mut self.token_requests, &mut self.revocation_requests] {
            if requests.in_flight.take().is_some() {
                requests.not_before = None;
            }
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8], now: u64) {
        if matches!(self.state, State::Starting | State::Revoked) {
            return;
        }
        let outcome = if topic == self.response_topic.as_str() {
            self.on_response(payload, now)
        } else if topic == self.control_topic.as_str() {
            self.on_control(payload)
        } else if topic == topic::KEYS {
            self.on_key_set(payload)
        } else if topic::is_revocation_topic(&self.revocations.stream(), topic) {
            self.on_stream_message(payload, now)
        } else {
            Err(Ignored::UnknownTopic)
        };
        if let Err(ignored) = outcome {
            if let Ignored::Invalid(e) = ignored {
                self.last_error = Some(LastError::Rejected(e));
            }
            self.report(Report::Ignored(ignored));
        }
    }

    fn on_response(&mut self, payload: &[u8], now: u64) -> Result<(), Ignored> {
        let response = SignedResponse::decode(payload)?.verify(&self.keys)?;
        if let Some((request_id, nonce)) = self.last_report
            && response.answers(self.config.device_id.as_str(), request_id, &nonce)
            && response.op == Some(Operation::ReportPresentation)
        {
            self.last_report = None;
            if let Err(e) = response.outcome {
                self.report(Report::RequestFailed {
                    op: Operation::ReportPresentation,
                    code: e.code,
                });
            }
            return Ok(());
        }
        let (exchange, index) = self.find_attempt(&response).ok_or(Ignored::Unsolicited)?;
        let requests = self.requests_mut(exchange);
        let Some(attempt) = requests.attempts.get(index).copied() else {
            return Err(Ignored::Unsolicited);
        };
        // Op 0 (`None`) is the hub's report of an undecodable request: it answers nothing.
        if response.op != Some(attempt.op) {
            return Err(Ignored::Unsolicited);
        }
        let refusal = response.outcome.err().map(|e| e.code);
        if refusal == Some(ErrorCode::Replay) {
            // The broker (or a second hub replica) saw this very request twice; the answer
            // to the first copy may still come, so keep waiting for it, and let the
            // timeout resend with a new nonce if it does not.
            self.report(Report::RequestFailed {
                op: attempt.op,
                code: ErrorCode::Replay,
            });
            return Ok(());
        }
        // Only the answer to the attempt still awaited decides what happens next; an
        // earlier attempt's refusal says nothing about the newer one.
        let latest = requests.in_flight.is_some() && index + 1 == requests.attempts.len();
        requests.attempts.remove(index);
        if latest {
            requests.in_flight = None;
        }
        let mut clock_adjusted = false;
        if (refusal == Some(ErrorCode::Stale) || !self.config.trust_local_clock)
            && let Some(offset_ms) = self.clock.learn(response.hub_time, attempt.sent_at, now)
        {
            clock_adjusted = true;
            self.report(Report::ClockAdjusted { offset_ms });
        }
        match response.outcome {
            Ok(body) => self.on_answer(exchange, attempt.op, body, response.hub_time, now),
            Err(e) => {
                self.report(Report::RequestFailed {
                    op: attempt.op,
                    code: e.code,
                });
                self.last_error = Some(LastError::Refused(e.code));
                if latest {
                    self.on_refusal(exchange, attempt.op, e.code, clock_adjusted, now);
                }
                Ok(())
            }
        }
    }

    fn find_attempt(&self, response: &Response<'_>) -> Option<(Exchange, usize)> {
        let id = self.config.device_id.as_str();
        [Exchange::Token, Exchange::Revocations]
            .into_iter()
            .find_map(|exchange| {
                self.requests(exchange)
                    .attempts
                    .iter()
                    .position(|a| response.answers(id, a.request_id, &a.nonce))
                    .map(|i| (exchange, i))
            })
    }

    fn on_answer(
        &mut self,
        exchange: Exchange,
        op: Operation,
        body: ResponseBody<'_>,
        hub_time: u64,
        now: u64,
    ) -> Result<(), Ignored> {
        match body {
            ResponseBody::Enrolled if self.state == State::AwaitingEnrollment => {
                self.token_requests.settle();
                self.enrolled_at = Some(hub_time);
                self.state = State::AwaitingToken;
                self.outbox.store = true;
                self.report(Report::Enrolled { at: hub_time });
                Ok(())
            }
            ResponseBody::Enrolled => Err(Ignored::Outdated),
            ResponseBody::Token { token, grant } => {
                self.on_token(op, token, grant, now);
                Ok(())
            }
            ResponseBody::Revocations { page } => {
                match self.apply_signed_page(page, now) {
                    // Settled either way: the next page, if one is still missing, is asked
                    // for at once; a list that overflowed waits for the next heartbeat.
                    Ok(_) | Err(Error::Capacity(_)) => self.requests_mut(exchange).settle(),
                    Err(error) => {
                        self.report(Report::ResponseRejected { op, error });
                        self.last_error = Some(LastError::Rejected(error));
                        self.back_off(exchange, now, false);
                    }
                }
                Ok(())
            }
            // The agent never asks to revoke; `Response::decode` ties bodies to operations.
            ResponseBody::Revoked { .. } => {
                Err(Ignored::Invalid(DecodeError::InvalidValue("body").into()))
            }
        }
    }

    fn on_token(&mut self, op: Operation, token: &[u8], grant: Option<(&[u8], u64)>, now: u64) {
        // The hub rotated the grant when it answered, whatever the token turns out to be:
        // the old grant is spent, so keep the new one (or none).
        match grant {
            Some((bytes, expires_at)) => self.hold_grant(bytes, expires_at),
            None if op == Operation::Refresh => self.drop_grant(),
            None => {}
        }
        self.outbox.store = true;
        match self.check_own_token(token, now) {
            Ok((iat, exp)) => {
                self.hold_token(token, iat, exp);
                self.token_requests.settle();
                self.state = State::Holding;
                self.report(Report::TokenRenewed { expires_at: exp });
            }
            Err(error) => {
                self.report(Report::ResponseRejected { op, error });
                self.last_error = Some(LastError::Rejected(error));
                // The hub will issue the same again until its configuration or ours changes.
                if self.token_requests.in_flight.is_none() {
                    self.back_off(Exchange::Token, now, true);
                }
            }
        }
    }

    /// The checks a device token must pass before the agent holds it; returns its iat and
    /// exp. A token for another subject fails with `ClaimsError::WrongSubject`, one
    /// bound to another key with [`ClaimsError::ProofOfPossession`].
    fn check_own_token(&self, token: &[u8], now: u64) -> Result<(u64, u64), Error> {
        let now_ms = self.clock.hub_ms(now);
        let validation = Validation {
            now: now_ms / 1000,
            audience: &self.config.audience,
            leeway: self.config.leeway_s,
            issuer: None,
            required_scope: None,
        };
        let verified = token::verify(token, &self.keys, &validation)?;
        let claims = verified.claims();
        if claims.sub != self.config.device_id.as_str() {
            return Err(ClaimsError::WrongSubject.into());
        }
        if claims.cnf != self.public_key {
            return Err(ClaimsError::ProofOfPossession.into());
        }
        // Leeway is for clocks that disagree, not for holding a token past its end.
        if claims.exp.saturating_mul(1000) <= now_ms {
            return Err(ClaimsError::Expired.into());
        }
        Ok((claims.iat, claims.exp))
    }

    fn on_refusal(
        &mut self,
        exchange: Exchange,
        op: Operation,
        code: ErrorCode,
        clock_adjusted: bool,
        now: u64,
    ) {
        match (exchange, code) {
            // The clock was just set from this very response, so the next attempt carries
            // the hub's time. (If it already agreed, retrying at once would only be refused
            // again: back off instead.)
            (_, ErrorCode::Stale) if clock_adjusted => {
                self.requests_mut(exchange).hurry();
            }
            // A refused grant (spent, expired, unknown, or its family revoked after a reuse)
            // is not a refused device: the device key can still ask for a token, and the
            // answer to that says whether the device itself is revoked.
            (Exchange::Token, ErrorCode::Revoked | ErrorCode::Denied)
                if op == Operation::Refresh =>
            {
                self.drop_grant();
                self.outbox.store = true;
                self.token_requests.hurry();
            }
            (Exchange::Token, ErrorCode::Revoked) => self.revoke(),
            // Codes that need a change first (policy, registration) are asked again only
            // at the backoff's cap: slowly enough not to hammer the hub, soon enough to
            // recover without a reboot once an operator has fixed things.
            _ => self.back_off(exchange, now, !code.is_retryable()),
        }
    }

    fn on_control(&mut self, payload: &[u8]) -> Result<(), Ignored> {
        let control = Control::verify(payload, &self.keys)?;
        if control.device != self.config.device_id.as_str() {
            return Err(Ignored::OtherDevice);
        }
        if self.enrolled_at.is_none_or(|at| control.issued_at < at) {
            return Err(Ignored::BeforeEnrollment);
        }
        match control.command {
            Command::Revoked => {
                self.revoke();
                Ok(())
            }
            Command::RefreshNow => self.refresh_now(control.issued_at),
        }
    }

    /// Follows a RefreshNow issued at `issued_at` unless it is already satisfied: a token
    /// issued after it reflects whatever changed, and a command is followed once.
    fn refresh_now(&mut self, issued_at: u64) -> Result<(), Ignored> {
        if self.refreshed_on_command.is_some_and(|t| issued_at <= t)
            || self.token.is_some_and(|t| t.iat > issued_at)
        {
            return Err(Ignored::Outdated);
        }
        self.refreshed_on_command = Some(issued_at);
        match self.state {
            State::Holding => {
                self.state = State::Refreshing;
                self.token_requests.hurry();
            }
            State::Refreshing | State::AwaitingToken => self.token_requests.hurry(),
            State::Starting | State::AwaitingEnrollment | State::Revoked => {}
        }
        Ok(())
    }

    fn on_key_set(&mut self, payload: &[u8]) -> Result<(), Ignored> {
        match self.keys.update(payload)? {
            KeySetOutcome::Updated => {
                self.outbox.store = true;
                self.report(Report::KeySetUpdated {
                    version: self.keys.version(),
                });
                Ok(())
            }
            KeySetOutcome::NotNewer => Err(Ignored::Outdated),
        }
    }

    fn on_stream_message(&mut self, signed: &[u8], now: u64) -> Result<(), Ignored> {
        if signed.is_empty() {
            // The hub clearing a retained snapshot page it no longer needs.
            return Err(Ignored::Outdated);
        }
        let payload = revocation::verify(signed, &self.keys)?;
        match StreamMessage::decode(payload)? {
            StreamMessage::Page(page) => match self.apply_page(&page, now)? {
                PageOutcome::AlreadyApplied => Err(Ignored::Outdated),
                PageOutcome::Applied | PageOutcome::Gap { .. } => Ok(()),
            },
            StreamMessage::Heartbeat(heartbeat) => {
                let newer = self
                    .revocations
                    .last_heartbeat_at()
                    .is_none_or(|at| heartbeat.issued_at() > at);
                let outcome = self.revocations.apply_heartbeat(&heartbeat)?;
                // One try per heartbeat interval for a list that overflowed (see the field):
                // only a heartbeat newer than every one before counts, so a broker replaying
                // old ones (outdated, or naming the change still missing) causes no fetch.
                if newer {
                    self.revocations_overflowed = false;
                }
                match outcome {
                    HeartbeatOutcome::InSync => Ok(()),
                    HeartbeatOutcome::Behind => {
                        self.report(Report::RevocationGap {
                            have: self.revocations.seq(),
                            got: self.revocations.latest(),
                        });
                        self.revocation_requests.hurry();
                        Ok(())
                    }
                    HeartbeatOutcome::Outdated => Err(Ignored::Outdated),
                }
            }
        }
    }

    /// Verifies and applies a signed page (from a `fetch_revocations` answer).
    fn apply_signed_page(&mut self, signed: &[u8], now: u64) -> Result<PageOutcome, Error> {
        let payload = revocation::verify(signed, &self.keys)?;
        self.apply_page(&Page::decode(payload)?, now)
    }

    /// Applies a verified page. An overflow is reported here and returned as
    /// [`CapacityError::Revocations`].
    fn apply_page(&mut self, page: &Page<'_>, now: u64) -> Result<PageOutcome, Error> {
        match self.revocations.apply_page(page, self.revocation_time(now)) {
            Ok(outcome) => {
                match outcome {
                    PageOutcome::Applied => self.report(Report::RevocationsApplied {
                        seq: self.revocations.seq(),
                    }),
                    PageOutcome::Gap { have, latest } => {
                        self.report(Report::RevocationGap { have, got: latest });
                        self.revocation_requests.hurry();
                    }
                    PageOutcome::AlreadyApplied => {}
                }
                Ok(outcome)
            }
            Err(e @ Error::Capacity(_)) => {
                self.revocations_overflowed = true;
                self.last_error = Some(LastError::Rejected(e));
                self.report(Report::RevocationListFull);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The time the revocation list judges entries spent by: the hub's, once the agent knows
    /// it; until then 0, so that no entry counts as spent. A device whose clock is off
    /// (an hour fast, say) would otherwise skip entries still in force from the snapshot it
    /// gets before the hub's first answer, and count their changes as applied all the same.
    fn revocation_time(&self, now: u64) -> u64 {
        if self.clock.synced {
            self.clock.hub_s(now)
        } else {
            0
        }
    }

    /// After the held token was dropped: ask for a new one, unless already asking.
    fn lost_token(&mut self) {
        if self.state == State::Holding {
            self.token_requests.hurry();
        }
        if matches!(self.state, State::Holding | State::Refreshing) {
            self.state = State::AwaitingToken;
        }
    }

    fn revoke(&mut self) {
        self.state = State::Revoked;
        self.drop_token();
        self.drop_grant();
        for requests in [&mut self.token_requests, &mut self.revocation_requests] {
            requests.settle();
            requests.publish = false;
        }
        self.outbox.wipe = true;
        self.outbox.store = false;
        self.report(Report::Revoked);
    }

    /// Moves time-driven work forward: token expiry, the refresh point, request timeouts,
    /// and sending what is due.
    fn drive(&mut self, now: u64) {
        if matches!(self.state, State::Starting | State::Revoked) {
            return;
        }
        // The hub time went back (a clock correction, or the local clock set back) since
        // the list skipped entries as spent: they may still be in force, so the changes
        // that carried them are fetched again.
        if self.clock.synced && self.revocations.must_refetch(self.clock.hub_s(now)) {
            self.revocations.refetch();
            self.report(Report::RevocationsRefetching {
                latest: self.revocations.latest(),
            });
            self.revocation_requests.hurry();
        }
        if self.clock.synced
            && self
                .token
                .is_some_and(|t| self.clock.local_ms(t.exp.saturating_mul(1000)) <= now)
        {
            self.drop_token();
            self.outbox.store = true;
            self.report(Report::TokenExpired);
            self.lost_token();
        }
        if self.state == State::Holding
            && self
                .token
                .is_some_and(|t| self.clock.local_ms(t.refresh_at_ms) <= now)
        {
            self.state = State::Refreshing;
            self.token_requests.hurry();
        }
        for exchange in [Exchange::Token, Exchange::Revocations] {
            self.drive_exchange(exchange, now);
        }
    }

    /// What an exchange should ask for now, if anything.
    fn wanted(&self, exchange: Exchange, now: u64) -> Option<Operation> {
        match exchange {
            Exchange::Token => match self.state {
                State::AwaitingEnrollment => Some(Operation::Enroll),
                State::AwaitingToken | State::Refreshing if self.grant_usable(now) => {
                    Some(Operation::Refresh)
                }
                State::AwaitingToken | State::Refreshing => Some(Operation::DeviceToken),
                State::Starting | State::Holding | State::Revoked => None,
            },
            // The hub answers only enrolled clients. A list that overflowed asks again only
            // when a heartbeat says it is behind, not in a loop.
            Exchange::Revocations => (self.revocations.wanted_from().is_some()
                && self.enrolled_at.is_some()
                && !self.revocations_overflowed)
                .then_some(Operation::FetchRevocations),
        }
    }

    fn grant_usable(&self, now: u64) -> bool {
        self.grant.is_some_and(|g| {
            !self.clock.synced || g.expires_at.saturating_mul(1000) > self.clock.hub_ms(now)
        })
    }

    /// When an attempt sent at `sent` counts as lost. A token request made while the
    /// current token still lives waits at most half of what is left of it (but at least
    /// [`MIN_REQUEST_TIMEOUT_MS`]), so a request lost near expiry is resent in time rather
    /// than after the full configured timeout.
    fn request_deadline(&self, exchange: Exchange, sent: u64) -> u64 {
        let mut timeout = self.config.request_timeout_ms;
        if exchange == Exchange::Token
            && let Some(t) = self.token.filter(|_| self.clock.synced)
        {
            let expires = self.clock.local_ms(t.exp.saturating_mul(1000));
            let half_left = expires.saturating_sub(sent) / 2;
            timeout = timeout.min(half_left.max(MIN_REQUEST_TIMEOUT_MS));
        }
        sent.saturating_add(timeout)
    }

    fn drive_exchange(&mut self, exchange: Exchange, now: u64) {
        let Some(op) = self.wanted(exchange, now) else {
            // Answers to attempts already out are still taken; there is just no more to ask.
            self.requests_mut(exchange).in_flight = None;
            return;
        };
        if let Some(sent) = self.requests(exchange).in_flight {
            if now < self.request_deadline(exchange, sent) {
                return;
            }
            self.requests_mut(exchange).in_flight = None;
            self.report(Report::RequestTimedOut { op });
            self.last_error = Some(LastError::TimedOut(op));
            self.back_off(exchange, now, false);
        }
        if !self.connected || self.requests(exchange).not_before.is_some_and(|t| now < t) {
            return;
        }
        if let Err(error) = self.send(exchange, op, now) {
            self.report(Report::RequestNotSent { op, error });
            self.last_error = Some(LastError::Rejected(error));
            self.back_off(exchange, now, false);
        }
    }

    fn send(&mut self, exchange: Exchange, op: Operation, now: u64) -> Result<(), Error> {
        let nonce = self.entropy.nonce();
        let request_id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1);
        let client = self.config.device_id.as_str();
        let body = match op {
            Operation::Enroll => RequestBody::Enroll {
                key: self.public_key,
                code_proof: self
                    .config
                    .enrollment_code_key
                    .as_ref()
                    .map(|key| EnrollmentCode::proof(key, client, &self.kid, &nonce)),
            },
            Operation::Refresh => RequestBody::Refresh {
                grant: self
                    .grant
                    .and_then(|g| self.grant_buf.get(..g.len))
                    .unwrap_or_default(),
            },
            Operation::FetchRevocations => RequestBody::FetchRevocations {
                stream: self.revocations.stream(),
                from: self.revocations.wanted_from().unwrap_or(1),
            },
            // `wanted` asks for nothing else.
            _ => RequestBody::DeviceToken,
        };
        let request = Request {
            client,
            request_id,
            issued_at: self.clock.hub_s(now),
            nonce,
            body,
        };
        let requests = match exchange {
            Exchange::Token => &mut self.token_requests,
            Exchange::Revocations => &mut self.revocation_requests,
        };
        requests.len = request.sign(&self.signer, &mut requests.buf)?;
        requests.remember(Attempt {
            op,
            request_id,
            nonce,
            sent_at: now,
        });
        requests.in_flight = Some(now);
        requests.not_before = None;
        requests.publish = true;
        Ok(())
    }

    /// Schedules the next attempt after a failure: capped exponential backoff with full
    /// jitter, never later than halfway to the held token's expiry; `patient` starts at the
    /// cap.
    fn back_off(&mut self, exchange: Exchange, now: u64, patient: bool) {
        let jitter = self.entropy.u32();
        let expires = self
            .token
            .filter(|_| self.clock.synced)
            .map(|t| self.clock.local_ms(t.exp.saturating_mul(1000)));
        let backoff = self.config.backoff;
        let requests = self.requests_mut(exchange);
        let attempt = if patient { u32::MAX } else { requests.failures };
        requests.not_before = Some(backoff.retry_at(now, attempt, jitter, expires));
        requests.failures = requests.failures.saturating_add(1);
    }

    fn finish(&mut self, now: u64) -> Result<Actions<'_>, Error> {
        let wake = self.compute_wake(now);
        let wake_changed = wake != self.next_wake;
        self.next_wake = wake;
        let stored_len = if self.outbox.store && !self.outbox.wipe {
            self.encode_state()?
        } else {
            None
        };
        if self.outbox.overflow {
            return Err(CapacityError::Actions.into());
        }
        let mut actions = Actions::new();
        let mut push = |action| {
            actions
                .push(action)
                .map_err(|_| Error::from(CapacityError::Actions))
        };
        if self.outbox.wipe {
            push(Action::Wipe)?;
        }
        if let Some(plaintext) = stored_len.and_then(|n| self.state_buf.get(..n)) {
            push(Action::Store { plaintext })?;
        }
        if self.outbox.subscribe {
            let subscriptions: [&str; SUBSCRIPTIONS] = [
                &self.response_topic,
                &self.control_topic,
                topic::KEYS,
                &self.revocation_filter,
            ];
            for t in subscriptions {
                push(Action::Subscribe(t))?;
            }
        }
        for requests in [&self.token_requests, &self.revocation_requests] {
            if let Some(payload) = requests
                .buf
                .get(..requests.len)
                .filter(|_| requests.publish)
            {
                push(Action::Publish {
                    topic: &self.request_topic,
                    payload,
                })?;
            }
        }
        for report in &self.outbox.reports {
            push(Action::Report(*report))?;
        }
        if let Some(at) = wake.filter(|_| wake_changed) {
            push(Action::WakeAt(at))?;
        }
        Ok(actions)
    }

    /// The earliest local time at which something is due.
    fn compute_wake(&self, now: u64) -> Option<u64> {
        if matches!(self.state, State::Starting | State::Revoked) {
            return None;
        }
        let mut times: heapless::Vec<u64, 4> = heapless::Vec::new();
        if let Some(t) = self.token.filter(|_| self.clock.synced) {
            let _ = times.push(self.clock.local_ms(t.exp.saturating_mul(1000)));
            if self.state == State::Holding {
                let _ = times.push(self.clock.local_ms(t.refresh_at_ms));
            }
        }
        for exchange in [Exchange::Token, Exchange::Revocations] {
            if self.wanted(exchange, now).is_none() {
                continue;
            }
            let requests = self.requests(exchange);
            let due = match requests.in_flight {
                Some(sent) => Some(self.request_deadline(exchange, sent)),
                // Nothing can be sent before the connection is back; Connected will.
                None if self.connected => Some(requests.not_before.unwrap_or(now)),
                None => None,
            };
            if let Some(due) = due {
                let _ = times.push(due);
            }
        }
        times.into_iter().min()
    }

    /// Writes the persisted state into `state_buf`; `None` before enrollment, when there is
    /// nothing worth keeping.
    fn encode_state(&mut self) -> Result<Option<usize>, Error> {
        let Some(enrolled_at) = self.enrolled_at else {
            return Ok(None);
        };
        let saved = persisted::Saved {
            device: &self.config.device_id,
            enrolled_at,
            token: self.token.and_then(|t| {
                Some(persisted::SavedToken {
                    bytes: self.token_buf.get(..t.len)?,
                    iat: t.iat,
                    exp: t.exp,
                })
            }),
            grant: self.grant.and_then(|g| {
                Some(persisted::SavedGrant {
                    bytes: self.grant_buf.get(..g.len)?,
                    expires_at: g.expires_at,
                })
            }),
            keys: &self.keys,
        };
        Ok(Some(saved.encode_to(&mut self.state_buf)?))
    }

    fn hold_token(&mut self, bytes: &[u8], iat: u64, exp: u64) {
        let Some(dst) = self.token_buf.get_mut(..bytes.len()) else {
            // Every token decoded has passed MAX_TOKEN_LEN already.
            return;
        };
        dst.copy_from_slice(bytes);
        let jitter = self.entropy.u32();
        self.token = Some(HeldToken {
            len: bytes.len(),
            iat,
            exp,
            refresh_at_ms: schedule::refresh_at(
                iat.saturating_mul(1000),
                exp.saturating_mul(1000),
                jitter,
            ),
        });
    }

    fn drop_token(&mut self) {
        self.token = None;
        self.token_buf.fill(0);
    }

    fn hold_grant(&mut self, bytes: &[u8], expires_at: u64) {
        self.drop_grant();
        if let Some(dst) = self.grant_buf.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
            self.grant = Some(HeldGrant {
                len: bytes.len(),
                expires_at,
            });
        }
    }

    fn drop_grant(&mut self) {
        // The grant is a bearer secret for whoever also holds the device key: leave no copy.
        self.grant = None;
        self.grant_buf.fill(0);
    }

    fn report(&mut self, report: Report) {
        if self.outbox.reports.push(report).is_err() {
            self.outbox.overflow = true;
        }
    }

    fn requests(&self, exchange: Exchange) -> &Requests {
        match exchange {
            Exchange::Token => &self.token_requests,
            Exchange::Revocations => &self.revocation_requests,
        }
    }

    fn requests_mut(&mut self, exchange: Exchange) -> &mut Requests {
        match exchange {
            Exchange::Token => &mut self.token_requests,
            Exchange::Revocations => &mut self.revocation_requests,
        }
    }
}
