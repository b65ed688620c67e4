//! Token checking for services (PROTOCOL.md §11.5, §13): a service that devices call with
//! their device tokens (the token's `aud` is the service's name) follows the hub's key set
//! and its revocation stream `service/{name}` over MQTT, and checks each presentation by the
//! core's rules: the token verifies with a hub key, is for this service and grants the
//! scope the call needs; the device signed the presentation with the token's `cnf` key for
//! this service, within the presentation window; the token is not revoked, by knowledge no
//! older than the hub's announced maximum age; and the nonce was not accepted before.
//!
//! The verifier needs no identity at the hub: revocation lists are public. It follows the
//! stream's retained snapshot, deltas and heartbeats; when it misses changes it takes the
//! retained snapshot again (subscribing anew), until it holds them all. Until then, and
//! whenever its knowledge is older than the maximum age, it refuses every presentation
//! ([`Refusal::Stale`]): it fails closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tessera_shared::crypto::PublicKey;
use tessera_shared::error::ClaimsError;
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{NONCE_LEN, SignedPresentation};
use tessera_shared::revocation::{self, Indexed, RevocationList, Stream, StreamMessage};
use tessera_shared::token::Validation;
use tessera_shared::topic;
use tokio::sync::watch;

use crate::{ClientError, MqttConfig};
use tessera_mqtt::{Notice, QoS};

/// How a service checks presentations; [`VerifierConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The service's name: the audience of the device tokens it accepts, and its stream
    /// `service/{name}`.
    pub service: String,
    /// The hub's trust anchor (its first signing key); the key set follows from it.
    pub trust_anchor: PublicKey,
    /// How far a presentation's `issued_at` may be from the service's clock, seconds.
    pub presentation_window_s: u64,
    /// Clock-skew leeway on token times and revocation entries, seconds.
    pub leeway_s: u64,
    /// Revocation entries held at most (a service holds the device revocations of the
    /// whole fleet for one device-token lifetime: PROTOCOL.md §11.6).
    pub capacity: usize,
    /// A maximum age of revocation knowledge tighter than the hub announces, seconds.
    pub max_age_s: Option<u64>,
}

impl VerifierConfig {
    /// Defaults: a 60 s presentation window, 30 s leeway, 100 000 entries, the hub's own
    /// maximum age.
    pub fn new(service: &str, trust_anchor: PublicKey) -> Self {
        Self {
            service: service.to_owned(),
            trust_anchor,
            presentation_window_s: 60,
            leeway_s: revocation::DEFAULT_LEEWAY,
            capacity: 100_000,
            max_age_s: None,
        }
    }
}

/// A presentation the verifier accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The device that presented its token (the token's `sub`).
    pub device: String,
    /// The token's scopes, space-separated.
    pub scope: String,
    /// The token's hash, as operators revoke it by.
    pub token_hash: [u8; 32],
    /// When the token expires, Unix seconds.
    pub expires_at: u64,
}

/// Why a presentation was refused, with the HTTP status a service answers it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a valid presentation of a valid token for this service: malformed, a token the
    /// hub did not sign, expired, for another audience, without proof of possession, or
    /// outside the presentation window. 401.
    #[error("invalid presentation: {0}")]
    Invalid(String),
    /// A valid token that does not grant the scope asked for. 403.
    #[error("the token does not grant `{0}`")]
    Forbidden(String),
    /// The token is revoked. 401.
    #[error("the token is revoked")]
    Revoked,
    /// This presentation was accepted before: a replay proves nothing. 401.
    #[error("presentation already used")]
    Replayed,
    /// The verifier's revocation knowledge is incomplete or older than the maximum age: it
    /// cannot vouch that the token is not revoked. 503: try again later.
    #[error("revocation knowledge is not current; try again later")]
    Stale,
}

impl Refusal {
    /// The HTTP status a service answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::Invalid(_) | Refusal::Revoked | Refusal::Replayed => 401,
            Refusal::Forbidden(_) => 403,
            Refusal::Stale => 503,
        }
    }
}

/// What the verifier knows, for a service's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifierStatus {
    /// Whether its revocation knowledge is complete and within the maximum age now.
    pub fresh: bool,
    /// Revocation entries held.
    pub entries: usize,
    /// Changes of the stream held (every change up to this one).
    pub changes: u64,
    /// `issued_at` of the newest heartbeat seen.
    pub last_heartbeat_at: Option<u64>,
}

/// Nonces remembered at most: beyond this, presentations are refused until older nonces
/// leave their window (fail closed).
const MAX_NONCES: usize = 1 << 20;

/// How long after asking for the snapshot again it is asked for once more, while changes
/// are still missing.
const RESNAPSHOT: Duration = Duration::from_secs(5);

/// What wakes the following task.
enum Event {
    Notice(Notice),
    Tick,
    Stop,
}

struct State {
    config: VerifierConfig,
    keys: KeySet,
    list: RevocationList<Indexed, 1024>,
    /// Nonce → until when it could still pass the window (Unix seconds).
    nonces: HashMap<[u8; NONCE_LEN], u64>,
}

impl State {
    fn apply(&mut self, signed: &[u8], now: u64) {
        let Ok(payload) = revocation::verify(signed, &self.keys) else {
            tracing::warn!("ignoring a revocation message that does not verify");
            return;
        };
        let applied = match StreamMessage::decode(payload) {
            Ok(StreamMessage::Page(page)) => self.list.apply_page(&page, now).map(drop),
            Ok(StreamMessage::Heartbeat(beat)) => self.list.apply_heartbeat(&beat).map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = applied {
            tracing::warn!(error = %e, "revocation message not applied");
        }
    }

    fn check(&mut self, presentation: &[u8], scope: &str, now: u64) -> Result<Verified, Refusal> {
        let validation = Validation {
            now,
            audience: &self.config.service,
            leeway: self.config.leeway_s,
            issuer: None,
            required_scope: Some(scope),
        };
        let window = self.config.presentation_window_s;
        let checked = SignedPresentation::verify(presentation, &self.keys, &validation, window)
            .map_err(|e| refusal(e, scope))?;
        let verified = self.current(&checked.token, now)?;
        self.admit(checked.nonce, checked.issued_at, now)?;
        Ok(verified)
    }

    fn check_token(&self, token: &[u8], scope: &str, now: u64) -> Result<Verified, Refusal> {
        let validation = Validation {
            now,
            audience: &self.config.service,
            leeway: self.config.leeway_s,
            issuer: None,
            required_scope: Some(scope),
        };
        let verified = tessera_shared::token::verify(token, &self.keys, &validation)
            .map_err(|e| refusal(e, scope))?;
        self.current(&verified, now)
    }

    /// The rest of a check once the token verified: not revoked, by current knowledge.
    fn current(
        &self,
        token: &tessera_shared::token::VerifiedToken<'_>,
        now: u64,
    ) -> Result<Verified, Refusal> {
        if token.check_not_revoked(&self.list).is_err() {
            return Err(Refusal::Revoked);
        }
        if !self
            .list
            .is_fresh(now, self.list.max_age(self.config.max_age_s))
        {
            return Err(Refusal::Stale);
        }
        let claims = token.claims();
        Ok(Verified {
            device: claims.sub.to_owned(),
            scope: claims.scope.as_str().to_owned(),
            token_hash: token.hash(),
            expires_at: claims.exp,
        })
    }

    /// Remembers `nonce` for as long as its presentation could pass the window; refuses
    /// one seen before, and any while the cache is full of nonces still in their window.
    fn admit(&mut self, nonce: [u8; NONCE_LEN], issued_at: u64, now: u64) -> Result<(), Refusal> {
        let until = issued_at.saturating_add(self.config.presentation_window_s);
        if self.nonces.len() >= MAX_NONCES {
            self.nonces.retain(|_, keep_until| *keep_until >= now);
            if self.nonces.len() >= MAX_NONCES {
                return Err(Refusal::Stale);
            }
        }
        match self.nonces.insert(nonce, until) {
            Some(_) => Err(Refusal::Replayed),
            None => Ok(()),
        }
    }
}

/// A verification error as a refusal: a missing scope is 403, the rest 401.
fn refusal(e: tessera_shared::Error, scope: &str) -> Refusal {
    match e {
        tessera_shared::Error::Claims(ClaimsError::MissingScope) => {
            Refusal::Forbidden(scope.to_owned())
        }
        e => Refusal::Invalid(e.to_string()),
    }
}

/// A service's verifier: follows the hub's key set and the service's revocation stream in
/// a task of its own, and checks presentations ([`ServiceVerifier::check`]). Cheap to
/// share (`Arc`).
pub struct ServiceVerifier {
    state: Arc<Mutex<State>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for ServiceVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceVerifier")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl ServiceVerifier {
    /// Connects to the broker with `mqtt` (the service's own client id and login; it
    /// only subscribes) and starts following. Returns once connected, within `timeout`;
    /// presentations are refused as [`Refusal::Stale`] until the first snapshot and
    /// heartbeat came ([`ServiceVerifier::status`]).
    pub async fn start(
        mqtt: &MqttConfig,
        config: VerifierConfig,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let filter = topic::revocation_filter(
            &Stream::of_service(&config.service).map_err(ClientError::Core)?,
        )
        .as_str()
        .to_owned();
        let list = RevocationList::for_service(
            Indexed::with_capacity(config.capacity),
            &config.service,
            config.leeway_s,
        )
        .map_err(ClientError::Core)?
        .with_pending_ranges::<1024>();
        let state = Arc::new(Mutex::new(State {
            keys: KeySet::from_anchor(config.trust_anchor),
            list,
            nonces: HashMap::new(),
            config,
        }));
        let (stop, stop_rx) = watch::channel(false);
        let (client, mut notices) = tessera_mqtt::connect(mqtt, 1024, stop_rx.clone())?;
        crate::await_connected(&mut notices, &stop, timeout).await?;
        let subscribe = {
            let (client, filter) = (client.clone(), filter.clone());
            move || {
                let (client, filter) = (client.clone(), filter.clone());
                async move {
                    client.subscribe(topic::KEYS, QoS::AtLeastOnce).await?;
                    client.subscribe(filter.as_str(), QoS::AtLeastOnce).await
                }
            }
        };
        subscribe().await?;
        let follow = Arc::clone(&state);
        let mut stop_rx = stop_rx;
        tokio::spawn(async move {
            let mut asked_again = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let event = tokio::select! {
                    notice = notices.recv() => notice.map_or(Event::Stop, Event::Notice),
                    _ = tick.tick() => Event::Tick,
                    _ = stop_rx.wait_for(|stop| *stop) => Event::Stop,
                };
                match event {
                    Event::Tick => {
                        let missing = {
                            let mut state = follow.lock().unwrap_or_else(PoisonError::into_inner);
                            state.list.prune(unix_now());
                            state.list.wanted_from().is_some()
                        };
                        // Missing changes: the retained snapshot holds them all; a new
                        // subscription delivers it again.
                        if missing && asked_again.elapsed() >= RESNAPSHOT {
                            asked_again = tokio::time::Instant::now();
                            let _ = client.unsubscribe(filter.as_str()).await;
                            if let Err(e) =
                                client.subscribe(filter.as_str(), QoS::AtLeastOnce).await
                            {
                                tracing::warn!(error = %e, "cannot ask for the snapshot again");
                            }
                        }
                    }
                    Event::Notice(Notice::Connected) => {
                        // Every session starts clean: subscribe again.
                        if let Err(e) = subscribe().await {
                            tracing::warn!(error = %e, "cannot subscribe again after reconnecting");
                        }
                    }
                    Event::Notice(Notice::Message(msg)) => {
                        let mut state = follow.lock().unwrap_or_else(PoisonError::into_inner);
                        if msg.topic == topic::KEYS {
                            if let Err(e) = state.keys.update(&msg.payload) {
                                tracing::warn!(error = %e, "ignoring a key set that does not verify");
                            }
                        } else {
                            state.apply(&msg.payload, unix_now());
                        }
                    }
                    Event::Notice(Notice::Disconnected(_)) => {}
                    Event::Stop => {
                        let _ = client.disconnect().await;
                        return;
                    }
                }
            }
        });
        Ok(Self { state, stop })
    }

    /// Checks a signed presentation (its bytes, as the device sent them) for a call that
    /// needs `scope`, by the service's clock.
    pub fn check(&self, presentation: &[u8], scope: &str) -> Result<Verified, Refusal> {
        self.check_at(presentation, scope, unix_now())
    }

    /// [`ServiceVerifier::check`] at `now` (Unix seconds).
    pub fn check_at(
        &self,
        presentation: &[u8],
        scope: &str,
        now: u64,
    ) -> Result<Verified, Refusal> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(presentation, scope, now)
    }

    /// Checks a device token on its own, without a presentation: its signature, this
    /// service as audience, `scope`, its times, and that it is not revoked by current
    /// knowledge. Only for a channel that already proves the device holds the token's key
    /// (mutual TLS with the device's key, say): a bare token proves nothing about who sends
    /// it. Use [`ServiceVerifier::check`] otherwise.
    pub fn check_token(&self, token: &[u8], scope: &str) -> Result<Verified, Refusal> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check_token(token, scope, unix_now())
    }

    /// What the verifier knows now.
    pub fn status(&self) -> VerifierStatus {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = unix_now();
        VerifierStatus {
            fresh: state
                .list
                .is_fresh(now, state.list.max_age(state.config.max_age_s)),
            entries: state.list.len(),
            changes: state.list.seq(),
            last_heartbeat_at: state.list.last_heartbeat_at(),
        }
    }

    /// Stops following (the connection closes).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for ServiceVerifier {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

use crate::unix_now;

#[cfg(test)]
mod tests {
    use tessera_shared::claims::Claims;
    use tessera_shared::cose;
    use tessera_shared::crypto::{P256Signer, Signer};
    use tessera_shared::message::Presentation;
    use tessera_shared::revocation::{Addressed, Entry};
    use tessera_shared::scope::Scopes;

    use super::*;

    const NOW: u64 = 1_767_225_600;
    const SERVICE: &str = "svc.telemetry";
    const DEVICE: &str = "device-42";

    fn signer(n: u8) -> P256Signer {
        P256Signer::from_scalar(&[n; 32]).expect("scalar")
    }

    fn signed(hub: &P256Signer, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 16_384];
        let n = cose::sign(hub, payload, &mut out).expect("sign");
        out.truncate(n);
        out
    }

    /// A verifier's state for `SERVICE` trusting `hub`, current as of a heartbeat at NOW.
    fn state(hub: &P256Signer) -> State {
        let config = VerifierConfig::new(SERVICE, hub.public_key());
        let list = RevocationList::for_service(Indexed::with_capacity(16), SERVICE, 30)
            .expect("list")
            .with_pending_ranges::<1024>();
        let mut state = State {
            keys: KeySet::from_anchor(hub.public_key()),
            list,
            nonces: HashMap::new(),
            config,
        };
        beat(&mut state, hub, 0, NOW);
        state
    }

    fn beat(state: &mut State, hub: &P256Signer, seq: u64, at: u64) {
        let stream = Stream::of_service(SERVICE).expect("stream");
        let mut out = [0u8; 512];
        let n = revocation::encode_heartbeat(seq, at, &stream, 90, &mut out).expect("beat");
        state.apply(&signed(hub, &out[..n]), at);
    }

    /// A device token of DEVICE for `audience` with `scope`, issued at NOW - 10.
    fn token(hub: &P256Signer, device: &P256Signer, audience: &str, scope: &str) -> Vec<u8> {
        let claims = Claims {
            iss: "hub-1",
            sub: DEVICE,
            aud: audience,
            exp: NOW + 600,
            nbf: None,
            iat: NOW - 10,
            cti: &[7; 16],
            cnf: device.public_key(),
            scope: Scopes::parse(scope).expect("scope"),
        };
        let mut out = vec![0u8; 1024];
        let n = tessera_shared::token::issue(&claims, hub, &mut out).expect("issue");
        out.truncate(n);
        out
    }

    fn present(token: &[u8], holder: &P256Signer, audience: &str, nonce: u8) -> Vec<u8> {
        present_at(token, holder, audience, nonce, NOW)
    }

    fn present_at(
        token: &[u8],
        holder: &P256Signer,
        audience: &str,
        nonce: u8,
        issued_at: u64,
    ) -> Vec<u8> {
        let presentation = Presentation {
            token,
            audience,
            issued_at,
            nonce: [nonce; NONCE_LEN],
        };
        let mut out = vec![0u8; 2048];
        let n = presentation.sign(holder, &mut out).expect("sign");
        out.truncate(n);
        out
    }

    #[test]
    fn presentations_are_checked_by_the_cores_rules_and_fail_closed() {
        let (hub, device, thief) = (signer(1), signer(2), signer(3));
        let good = token(&hub, &device, SERVICE, "telemetry:write");

        // Not current yet: nothing is accepted.
        let mut fresh = state(&hub);
        let mut stale = State {
            list: RevocationList::for_service(Indexed::with_capacity(16), SERVICE, 30)
                .expect("list")
                .with_pending_ranges::<1024>(),
            nonces: HashMap::new(),
            keys: KeySet::from_anchor(hub.public_key()),
            config: VerifierConfig::new(SERVICE, hub.public_key()),
        };
        let first = present(&good, &device, SERVICE, 1);
        assert_eq!(
            stale.check(&first, "telemetry:write", NOW),
            Err(Refusal::Stale)
        );

        let accepted = fresh
            .check(&first, "telemetry:write", NOW)
            .expect("accepted");
        assert_eq!(accepted.device, DEVICE);
        assert_eq!(accepted.scope, "telemetry:write");
        assert_eq!(
            fresh.check(&first, "telemetry:write", NOW),
            Err(Refusal::Replayed)
        );
        assert_eq!(
            fresh.check(&present(&good, &device, SERVICE, 2), "door:open", NOW),
            Err(Refusal::Forbidden("door:open".into()))
        );
        for (presentation, why) in [
            (present(&good, &thief, SERVICE, 3), "signed by another key"),
            (
                present(&good, &device, "svc.other", 4),
                "for another service",
            ),
            (
                present(
                    &token(&hub, &device, "svc.other", "telemetry:write"),
                    &device,
                    SERVICE,
                    5,
                ),
                "a token for another service",
            ),
            (
                present(
                    &token(&thief, &device, SERVICE, "telemetry:write"),
                    &device,
                    SERVICE,
                    6,
                ),
                "a token the hub did not sign",
            ),
            (vec![0xd2, 0x84, 0x00], "malformed"),
        ] {
            let refused = fresh.check(&presentation, "telemetry:write", NOW);
            assert!(
                matches!(refused, Err(Refusal::Invalid(_))),
                "{why}: {refused:?}"
            );
        }
        // Knowledge older than the hub's maximum age (90 s) fails closed; a presentation
        // from before the window is invalid.
        let late = present_at(&good, &device, SERVICE, 7, NOW + 91);
        assert_eq!(
            fresh.check(&late, "telemetry:write", NOW + 91),
            Err(Refusal::Stale)
        );
        assert!(matches!(
            fresh.check(
                &present(&good, &device, SERVICE, 10),
                "telemetry:write",
                NOW + 61
            ),
            Err(Refusal::Invalid(_))
        ));

        // The device revoked: change 1 of the stream names every token of it issued before
        // NOW; a heartbeat names change 1.
        let stream = Stream::of_service(SERVICE).expect("stream");
        let entry = Addressed::new(
            SERVICE,
            Entry::for_subject(DEVICE, NOW, NOW + 630).expect("entry"),
        )
        .expect("addressed");
        let mut page = vec![0u8; 2048];
        let n = revocation::encode_page(1, NOW, &stream, 1, 1, [&entry], &mut page).expect("page");
        assert!(fresh.check_token(&good, "telemetry:write", NOW).is_ok());
        assert_eq!(
            fresh.check_token(&good, "door:open", NOW),
            Err(Refusal::Forbidden("door:open".into()))
        );
        fresh.apply(&signed(&hub, &page[..n]), NOW);
        assert_eq!(
            fresh.check(&present(&good, &device, SERVICE, 8), "telemetry:write", NOW),
            Err(Refusal::Revoked)
        );
        assert_eq!(
            fresh.check_token(&good, "telemetry:write", NOW),
            Err(Refusal::Revoked)
        );
        // A page signed by another key changes nothing.
        let mut other = state(&hub);
        other.apply(&signed(&thief, &page[..n]), NOW);
        assert!(
            other
                .check(&present(&good, &device, SERVICE, 9), "telemetry:write", NOW)
                .is_ok()
        );
    }
}
