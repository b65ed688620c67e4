//! The `malicious` scenario's attacker, and the book in which every attack is judged.
//!
//! The attacker is a compromised device of the fleet's own hub: `sim-mallory`, registered
//! with an enrollment code like the others, which enrolls its own key and then, with its
//! own MQTT connection on the simulator's broker (which, like a broker without ACLs, lets
//! it read every request and response), goes round the victims (a few fleet devices), one
//! victim a round:
//!
//! | kind | what it sends | rejected when |
//! |---|---|---|
//! | `replay` | a victim's request, already answered, published again verbatim | the hub refuses it (`replay`) |
//! | `impersonation` | requests naming the victim, signed with its own key: a `device_token` on the victim's topic, one on its own topic, an `enroll` of its own key with a made-up code proof | the hub refuses each (`bad_signature`, `malformed`, `denied`) |
//! | `stolen_grant` | the victim's refresh grant, read off the broker, in a `refresh` of its own | the hub refuses it (`denied`: another client's grant) |
//! | `forged_token` | a response to the victim's latest request carrying the victim's token re-signed with its own key, itself signed with that key; and the app's access token re-signed with its key, presented to the victim | the victim's machine ignores the response, refuses the presentation |
//! | `stolen_token` | the app's access token for the victim, presented with a presentation signed by its own key | the victim's machine refuses it (proof of possession) |
//! | `replayed_presentation` | the app's genuine presentation to the victim, presented again | the victim's machine refuses it (seen before) |
//! | `forged_control` | a `Revoked` control message for the victim signed with its own key | the victim's machine ignores it |
//! | `replayed_response` | a genuine hub response to the victim, a second or more old, published again | the victim's machine ignores it |
//! | `flood` | once: 50 signed requests of its own back to back, then 50 of garbage | the hub does not serve the whole burst (some refused, `rate_limited`, or dropped); garbage is counted apart (answered `malformed`, or dropped) |
//!
//! The app (`sim-app`, role `controller`) is genuine: the attacker uses its key only to get
//! its access tokens for the victims and to present them as the app would, once per round
//! (the control: these should pass, so that the refusals above are the attacks' and not,
//! say, stale revocation knowledge). Presentations reach a victim over its local link (a
//! channel into its task, as BLE or the LAN would), where its machine checks them with
//! [`Agent::check_presentation`](tessera_shared::agent::Agent::check_presentation).
//!
//! An attack the hub answers is accepted if the answer is a success; one sent to a device
//! is accepted if the device acted on it (a token, a store, a wipe, its clock, key set or
//! revocation list moved). An attack with no verdict within [`VERDICT_TIMEOUT`] (or sent
//! to a device that never took it) counts as unanswered, apart from both.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_mqtt::{Incoming, MqttConfig, Notice, QoS};
use tessera_shared::agent::AgentConfig;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer as _, sha256};
use tessera_shared::error::{ClaimsError, Error as CoreError};
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{
    Command, Control, EnrollmentCode, ErrorCode, NONCE_LEN, Operation, Presentation, Request,
    RequestBody, Response, ResponseBody, SignedRequest, SignedResponse,
};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::device::{PresentationCheck, now_ms, random32};

/// The attacker's client id (a device registered with the fleet).
pub const MALLORY: &str = "sim-mallory";

/// A control app registered with the `controller` role, whose access tokens for the
/// victims the attacker steals (it reads them off the broker).
pub const APP: &str = "sim-app";

/// The app's role in the default policy.
pub const APP_ROLE: &str = "controller";

/// The scope the app asks for and the victims require of a presentation.
pub const SCOPE: &str = "telemetry:read";

/// How long a device may take to check a presentation.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an attack waits for its verdict before it counts as unanswered.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time between rounds.
const ROUND: Duration = Duration::from_millis(500);

/// Requests in the one flood of signed requests, and garbage messages after it.
const FLOOD: usize = 50;

/// Verdicts on one kind of attack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// Refused or ignored.
    pub rejected: u64,
    /// Acted on: a success from the hub, an effect on a device.
    pub accepted: u64,
    /// No verdict in time.
    pub unanswered: u64,
    /// The hub's refusal codes, for the attacks it answered.
    pub codes: BTreeMap<&'static str, u64>,
}

/// Where attacks are noted and judged; shared by the attacker and the devices.
#[derive(Debug, Default)]
pub struct AttackBook {
    /// Messages sent to devices, by the hash of their payload, not yet seen by a device.
    to_devices: Mutex<HashMap<[u8; 32], &'static str>>,
    armed: AtomicBool,
    tally: Mutex<BTreeMap<&'static str, Verdicts>>,
    /// The flood of signed requests: served, refused, dropped.
    flood: Mutex<FloodTally>,
    /// The app's own presentations, which the devices should accept: accepted, refused.
    legit: Mutex<(u64, u64)>,
}

/// What became of the flood of signed requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodTally {
    /// Requests sent.
    pub sent: u64,
    /// Answered with a token.
    pub served: u64,
    /// Refused (any code).
    pub refused: u64,
    /// Of those, refused `rate_limited`.
    pub rate_limited: u64,
    /// Neither answered within [`VERDICT_TIMEOUT`] (the admission limit drops them).
    pub dropped: u64,
    /// Garbage messages sent.
    pub garbage_sent: u64,
    /// Garbage messages the hub answered (`malformed`).
    pub garbage_answered: u64,
}

impl AttackBook {
    /// Notes a message about to be sent to a device, judged when a device receives it.
    pub fn expect(&self, payload: &[u8], kind: &'static str) {
        self.armed.store(true, Ordering::Relaxed);
        if let Ok(mut m) = self.to_devices.lock() {
            m.insert(sha256(&[payload]), kind);
        }
    }

    /// The kind of attack `payload` is, if it is one sent to a device (forgotten then).
    pub fn take(&self, payload: &[u8]) -> Option<&'static str> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        self.to_devices.lock().ok()?.remove(&sha256(&[payload]))
    }

    /// Records a verdict.
    pub fn judge(&self, kind: &'static str, accepted: bool) {
        if let Ok(mut t) = self.tally.lock() {
            let v = t.entry(kind).or_default();
            if accepted {
                v.accepted += 1;
            } else {
                v.rejected += 1;
            }
        }
    }

    fn refused(&self, kind: &'static str, code: ErrorCode) {
        self.judge(kind, false);
        if let Ok(mut t) = self.tally.lock() {
            *t.entry(kind)
                .or_default()
                .codes
                .entry(code.name())
                .or_default() += 1;
        }
    }

    /// An attack the hub answered with a success; noted under `ok_<operation>` too.
    fn accepted(&self, kind: &'static str, op: Option<Operation>) {
        self.judge(kind, true);
        let op = match op {
            Some(Operation::Enroll) => "ok_enroll",
            Some(Operation::DeviceToken) => "ok_device_token",
            Some(Operation::Refresh) => "ok_refresh",
            Some(Operation::FetchRevocations) => "ok_fetch_revocations",
            Some(_) => "ok_other",
            None => "ok_unknown",
        };
        if let Ok(mut t) = self.tally.lock() {
            *t.entry(kind).or_default().codes.entry(op).or_default() += 1;
        }
    }

    fn unanswered(&self, kind: &'static str, n: u64) {
        if n > 0
            && let Ok(mut t) = self.tally.lock()
        {
            t.entry(kind).or_default().unanswered += n;
        }
    }

    /// The verdicts so far, by kind; messages sent to devices that none took count as
    /// unanswered.
    pub fn verdicts(&self) -> BTreeMap<&'static str, Verdicts> {
        let left: Vec<&'static str> = self
            .to_devices
            .lock()
            .map(|mut m| m.drain().map(|(_, k)| k).collect())
            .unwrap_or_default();
        for kind in left {
            self.unanswered(kind, 1);
        }
        self.tally.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The flood's figures.
    pub fn flood(&self) -> FloodTally {
        self.flood.lock().map(|f| *f).unwrap_or_default()
    }

    /// The app's own presentations: accepted, refused by the devices.
    pub fn legit_presentations(&self) -> (u64, u64) {
        self.legit.lock().map(|l| *l).unwrap_or_default()
    }

    fn code(&self, kind: &'static str, code: &'static str) {
        if let Ok(mut t) = self.tally.lock() {
            *t.entry(kind).or_default().codes.entry(code).or_default() += 1;
        }
    }
}

/// What the attacker needs.
#[derive(Debug, Clone)]
pub struct Attacker {
    /// Its enrollment code.
    pub code: String,
    /// The hub's trust anchor (public, as every device has it).
    pub anchor: PublicKey,
    /// The broker.
    pub mqtt: MqttConfig,
    /// The devices it attacks.
    pub victims: Vec<String>,
    /// When to begin (real Unix ms).
    pub begin_at_ms: u64,
    /// The app's private key (its scalar): the attacker gets the app's access tokens
    /// for the victims legitimately, as the app, and presents them as the app would (the
    /// control) and as a thief would.
    pub app_key: [u8; 32],
    /// Each victim's local link, for presentations.
    pub links: BTreeMap<String, mpsc::Sender<PresentationCheck>>,
}

/// A request of the attacker's awaiting the hub's answer.
struct Pending {
    kind: &'static str,
    sent_at: u64,
}

/// What it has read off the broker about one victim.
#[derive(Default)]
struct Loot {
    /// Its requests (payload, id, nonce), newest last.
    requests: VecDeque<(Vec<u8>, u64, [u8; NONCE_LEN])>,
    /// Its latest token response.
    token_response: Option<Sniffed>,
}

/// A token response to a victim, read off the broker.
#[derive(Clone)]
struct Sniffed {
    /// The whole signed response.
    payload: Vec<u8>,
    token: Vec<u8>,
    grant: Option<Vec<u8>>,
    /// When it was read, Unix ms.
    read_at: u64,
}

type Correlation = (String, u64, [u8; NONCE_LEN]);

struct Mallory {
    signer: P256Signer,
    keys: KeySet,
    client: tessera_mqtt::MqttClient,
    book: std::sync::Arc<AttackBook>,
    pending: HashMap<Correlation, Pending>,
    /// Victims' requests the hub has answered, with the hash of the answer: the same
    /// answer delivered again is not an answer to a replay.
    answered: HashMap<Correlation, [u8; 32]>,
    loot: BTreeMap<String, Loot>,
    /// The own enrollment requests sent, until the hub confirms one.
    enrolling: HashSet<(u64, [u8; NONCE_LEN])>,
    enrolled: bool,
    code_key: [u8; 32],
    next_id: u64,
    app: P256Signer,
    /// The app's access token for each victim.
    app_tokens: BTreeMap<String, Vec<u8>>,
    /// The app's access token requests awaiting an answer, by correlation: for which victim.
    app_asked: HashMap<(u64, [u8; NONCE_LEN]), String>,
    links: BTreeMap<String, mpsc::Sender<PresentationCheck>>,
}

impl Mallory {
    fn nonce() -> Result<[u8; NONCE_LEN], Error> {
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(&random32()?[..NONCE_LEN]);
        Ok(n)
    }

    /// Signs a request naming `client` with the attacker's key.
    fn request(
        &mut self,
        client: &str,
        body: RequestBody<'_>,
    ) -> Result<(Vec<u8>, u64, [u8; NONCE_LEN]), Error> {
        let nonce = Self::nonce()?;
        self.next_id += 1;
        let request = Request {
            client,
            request_id: self.next_id,
            issued_at: now_ms() / 1000,
            nonce,
            body,
        };
        let mut buf = vec![0u8; 2048];
        let n = request.sign(&self.signer, &mut buf).map_err(Error::Core)?;
        buf.truncate(n);
        Ok((buf, self.next_id, nonce))
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) {
        let _ = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await;
    }

    /// Sends a request naming `client` on `on`'s request topic, awaiting a verdict.
    async fn attack_hub(
        &mut self,
        kind: &'static str,
        client: &str,
        on: &str,
        body: RequestBody<'_>,
    ) -> Result<(), Error> {
        let (payload, id, nonce) = self.request(client, body)?;
        // The hub answers on the topic's client, naming the request's id and nonce.
        self.pending.insert(
            (on.to_string(), id, nonce),
            Pending {
                kind,
                sent_at: now_ms(),
            },
        );
        self.publish(topic_of(topic::request(on)), payload).await;
        Ok(())
    }

    async fn enroll(&mut self) -> Result<(), Error> {
        let nonce = Self::nonce()?;
        let key = self.signer.public_key();
        let proof = EnrollmentCode::proof(&self.code_key, MALLORY, &key.kid(), &nonce);
        self.next_id += 1;
        let request = Request {
            client: MALLORY,
            request_id: self.next_id,
            issued_at: now_ms() / 1000,
            nonce,
            body: RequestBody::Enroll {
                key,
                code_proof: Some(proof),
            },
        };
        let mut buf = vec![0u8; 2048];
        let n = request.sign(&self.signer, &mut buf).map_err(Error::Core)?;
        buf.truncate(n);
        self.enrolling.insert((self.next_id, nonce));
        self.publish(topic_of(topic::request(MALLORY)), buf).await;
        Ok(())
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let Some(rest) = topic.strip_prefix("tessera/v1/client/") else {
            return;
        };
        let Some((client, leaf)) = rest.split_once('/') else {
            return;
        };
        match leaf {
            "req" => {
                if let Some(loot) = self.loot.get_mut(client)
                    && let Ok(signed) = SignedRequest::decode(payload)
                {
                    let (id, nonce) = signed.correlation();
                    loot.requests.push_back((payload.to_vec(), id, nonce));
                    if loot.requests.len() > 8 {
                        loot.requests.pop_front();
                    }
                }
            }
            "resp" => {
                let Ok(decoded) = SignedResponse::decode(payload) else {
                    return;
                };
                let Ok(response) = decoded.verify(&self.keys) else {
                    return;
                };
                self.on_response(client, &response, payload);
            }
            _ => {}
        }
    }

    fn on_response(&mut self, client: &str, response: &Response<'_>, payload: &[u8]) {
        let key = (client.to_string(), response.request_id, response.nonce);
        let hash = sha256(&[payload]);
        if self.answered.get(&key) == Some(&hash) {
            // The broker delivered the original answer again (QoS 1 allows it).
            return;
        }
        if client == MALLORY
            && self
                .enrolling
                .remove(&(response.request_id, response.nonce))
        {
            self.enrolled |= matches!(response.outcome, Ok(ResponseBody::Enrolled));
            return;
        }
        if client == APP {
            if let Some(victim) = self
                .app_asked
                .remove(&(response.request_id, response.nonce))
                && let Ok(ResponseBody::Token { token, .. }) = response.outcome
            {
                self.app_tokens.insert(victim, token.to_vec());
            }
            return;
        }
        if client == MALLORY && response.op.is_none() {
            // The hub's answer to a message it could not decode: the garbage.
            if let Ok(mut f) = self.book.flood.lock() {
                f.garbage_answered += 1;
            }
            return;
        }
        if let Some(p) = self.pending.remove(&key) {
            if p.kind == "flood" {
                if let Ok(mut f) = self.book.flood.lock() {
                    match response.outcome {
                        Ok(_) => f.served += 1,
                        Err(e) => {
                            f.refused += 1;
                            if e.code == ErrorCode::RateLimited {
                                f.rate_limited += 1;
                            }
                        }
                    }
                }
                return;
            }
            match response.outcome {
                // A replay the hub answers with a refusal of the original's kind (say a
                // `replay` of a refused request) is still refused.
                Ok(_) => self.book.accepted(p.kind, response.op),
                Err(e) => self.book.refused(p.kind, e.code),
            }
            return;
        }
        if let Some(loot) = self.loot.get_mut(client) {
            self.answered.insert(key, hash);
            if let Ok(ResponseBody::Token { token, grant }) = response.outcome {
                loot.token_response = Some(Sniffed {
                    payload: payload.to_vec(),
                    token: token.to_vec(),
                    grant: grant.map(|(g, _)| g.to_vec()),
                    read_at: now_ms(),
                });
            }
        }
    }

    /// One round against `victim`.
    async fn round(&mut self, victim: &str) -> Result<(), Error> {
        // Requests naming the victim, signed with the attacker's key.
        self.attack_hub("impersonation", victim, victim, RequestBody::DeviceToken)
            .await?;
        self.attack_hub("impersonation", victim, MALLORY, RequestBody::DeviceToken)
            .await?;
        let key = self.signer.public_key();
        let made_up = random32()?;
        self.attack_hub(
            "impersonation",
            victim,
            victim,
            RequestBody::Enroll {
                key,
                code_proof: Some(made_up),
            },
        )
        .await?;

        // A request of the victim's the hub has answered, again.
        let answered = self.loot.get_mut(victim).and_then(|loot| {
            let i = loot.requests.iter().position(|(_, id, nonce)| {
                self.answered
                    .contains_key(&(victim.to_string(), *id, *nonce))
            })?;
            loot.requests.remove(i)
        });
        if let Some((payload, id, nonce)) = answered {
            self.pending.insert(
                (victim.to_string(), id, nonce),
                Pending {
                    kind: "replay",
                    sent_at: now_ms(),
                },
            );
            self.publish(topic_of(topic::request(victim)), payload)
                .await;
        }

        let now = now_ms();
        let Some(Sniffed {
            payload: response,
            token,
            grant,
            read_at,
        }) = self.loot.get(victim).and_then(|l| l.token_response.clone())
        else {
            return Ok(());
        };
        // The victim's grant, presented as the attacker's own.
        if let Some(grant) = grant {
            self.attack_hub(
                "stolen_grant",
                MALLORY,
                MALLORY,
                RequestBody::Refresh { grant: &grant },
            )
            .await?;
        }
        // The victim's token re-signed with the attacker's key, in a response to the
        // victim's latest request, signed with the same key.
        let latest = self
            .loot
            .get(victim)
            .and_then(|l| l.requests.back().map(|(_, id, nonce)| (*id, *nonce)));
        if let Some((id, nonce)) = latest
            && let Some(forged) = self.forge_token(&token, crate::fleet::DEVICE_AUDIENCE)
        {
            let forged_response = Response {
                op: Some(Operation::Refresh),
                client: victim,
                request_id: id,
                hub_time: now / 1000,
                nonce,
                outcome: Ok(ResponseBody::Token {
                    token: &forged,
                    grant: None,
                }),
            };
            let mut buf = vec![0u8; 4096];
            if let Ok(n) = forged_response.sign(&self.signer, &mut buf) {
                buf.truncate(n);
                self.book.expect(&buf, "forged_token");
                self.publish(topic_of(topic::response(victim)), buf).await;
            }
        }
        // A revocation the hub never sent.
        let control = Control {
            device: victim,
            command: Command::Revoked,
            issued_at: now / 1000,
        };
        let mut buf = vec![0u8; 1024];
        if let Ok(n) = control.sign(&self.signer, &mut buf) {
            buf.truncate(n);
            self.book.expect(&buf, "forged_control");
            self.publish(topic_of(topic::control(victim)), buf).await;
        }
        // A genuine answer the victim has already had.
        if now.saturating_sub(read_at) >= 1_000 {
            self.book.expect(&response, "replayed_response");
            self.publish(topic_of(topic::response(victim)), response)
                .await;
            if let Some(loot) = self.loot.get_mut(victim) {
                loot.token_response = None;
            }
        }
        Ok(())
    }

    /// Asks, as the app, for an access token for `victim` (once answered, kept).
    async fn ask_app_token(&mut self, victim: &str) -> Result<(), Error> {
        let nonce = Self::nonce()?;
        self.next_id += 1;
        let scope = Scopes::parse(SCOPE).map_err(Error::Core)?;
        let request = Request {
            client: APP,
            request_id: self.next_id,
            issued_at: now_ms() / 1000,
            nonce,
            body: RequestBody::AccessToken {
                device: victim,
                scope,
            },
        };
        let mut buf = vec![0u8; 2048];
        let n = request.sign(&self.app, &mut buf).map_err(Error::Core)?;
        buf.truncate(n);
        self.app_asked
            .insert((self.next_id, nonce), victim.to_string());
        self.publish(topic_of(topic::request(APP)), buf).await;
        Ok(())
    }

    /// A presentation of `token` to `audience`, signed by `holder`.
    fn present(token: &[u8], audience: &str, holder: &P256Signer) -> Result<Vec<u8>, Error> {
        let presentation = Presentation {
            token,
            audience,
            issued_at: now_ms() / 1000,
            nonce: Self::nonce()?,
        };
        let mut buf = vec![0u8; 2048];
        let n = presentation.sign(holder, &mut buf).map_err(Error::Core)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Hands `presentation` to the victim's machine; its verdict, or `None` without one.
    async fn check(
        link: &mpsc::Sender<PresentationCheck>,
        presentation: Vec<u8>,
    ) -> Option<Result<(), CoreError>> {
        let (reply, verdict) = oneshot::channel();
        link.send(PresentationCheck {
            presentation,
            scope: SCOPE,
            reply,
        })
        .await
        .ok()?;
        tokio::time::timeout(CHECK_TIMEOUT, verdict)
            .await
            .ok()?
            .ok()
    }

    /// Presents an attack to the victim and notes the verdict, and the machine's reason.
    async fn judge_presentation(
        &self,
        kind: &'static str,
        link: &mpsc::Sender<PresentationCheck>,
        presentation: Vec<u8>,
    ) {
        match Self::check(link, presentation).await {
            Some(Ok(())) => self.book.judge(kind, true),
            Some(Err(e)) => {
                self.book.judge(kind, false);
                self.book.code(kind, refusal_name(e));
            }
            None => self.book.unanswered(kind, 1),
        }
    }

    /// The app's presentations to `victim`: its own (which should pass: the control), the
    /// same again, its token signed by the attacker's key, a re-signed copy of its token.
    async fn presentations(&mut self, victim: &str) -> Result<(), Error> {
        let (Some(token), Some(link)) = (
            self.app_tokens.get(victim).cloned(),
            self.links.get(victim).cloned(),
        ) else {
            return Ok(());
        };
        let own = Self::present(&token, victim, &self.app)?;
        if let Some(verdict) = Self::check(&link, own.clone()).await
            && let Ok(mut l) = self.book.legit.lock()
        {
            if verdict.is_ok() {
                l.0 += 1;
            } else {
                l.1 += 1;
            }
        }
        self.judge_presentation("replayed_presentation", &link, own)
            .await;
        let stolen = Self::present(&token, victim, &self.signer)?;
        self.judge_presentation("stolen_token", &link, stolen).await;
        if let Some(forged) = self.forge_token(&token, victim) {
            let p = Self::present(&forged, victim, &self.signer)?;
            self.judge_presentation("forged_token", &link, p).await;
        }
        Ok(())
    }

    /// `genuine` (a token for `audience`) with its claims unchanged, signed with the
    /// attacker's key.
    fn forge_token(&self, genuine: &[u8], audience: &str) -> Option<Vec<u8>> {
        let validation = Validation {
            now: now_ms() / 1000,
            audience,
            leeway: u64::from(u32::MAX),
            issuer: None,
            required_scope: None,
        };
        let verified = token::verify(genuine, &self.keys, &validation).ok()?;
        let mut out = vec![0u8; token::MAX_TOKEN_LEN];
        let n = token::issue(verified.claims(), &self.signer, &mut out).ok()?;
        out.truncate(n);
        Some(out)
    }

    async fn flood(&mut self) -> Result<(), Error> {
        for _ in 0..FLOOD {
            self.attack_hub("flood", MALLORY, MALLORY, RequestBody::DeviceToken)
                .await?;
        }
        for _ in 0..FLOOD {
            let junk = random32()?.to_vec();
            self.publish(topic_of(topic::request(MALLORY)), junk).await;
        }
        if let Ok(mut f) = self.book.flood.lock() {
            f.sent += FLOOD as u64;
            f.garbage_sent += FLOOD as u64;
        }
        Ok(())
    }

    /// Pending attacks older than `older_than` ms count as unanswered.
    fn expire(&mut self, older_than: u64) {
        let now = now_ms();
        let book = self.book.clone();
        self.pending.retain(|_, p| {
            let keep = now.saturating_sub(p.sent_at) < older_than;
            if keep {
                return true;
            }
            if p.kind == "flood" {
                if let Ok(mut f) = book.flood.lock() {
                    f.dropped += 1;
                }
            } else {
                book.unanswered(p.kind, 1);
            }
            false
        });
    }
}

fn topic_of(t: Result<topic::Topic, tessera_shared::Error>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// Runs the attacker until `stop`; verdicts go to `book`. Judges the flood once the run
/// ends: rejected if the hub refused or dropped any of it.
pub async fn run(
    attacker: Attacker,
    book: std::sync::Arc<AttackBook>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let scalar = crate::device::generate_key()?;
    let signer = P256Signer::from_scalar(&scalar).map_err(Error::Core)?;
    let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
    let (client, mut notices) = tessera_mqtt::connect(&attacker.mqtt, 1024, mqtt_stop_rx)?;
    // The code key as the fleet's devices derive theirs.
    let mut config =
        AgentConfig::new(MALLORY, crate::fleet::DEVICE_AUDIENCE).map_err(Error::Core)?;
    config.enrollment_code_key = Some(EnrollmentCode::derive_key(&attacker.code));
    let mut m = Mallory {
        signer,
        keys: KeySet::from_anchor(attacker.anchor),
        client: client.clone(),
        book: book.clone(),
        pending: HashMap::new(),
        answered: HashMap::new(),
        loot: attacker
            .victims
            .iter()
            .map(|v| (v.clone(), Loot::default()))
            .collect(),
        enrolling: HashSet::new(),
        enrolled: false,
        code_key: config.enrollment_code_key.unwrap_or_default(),
        next_id: 0,
        app: P256Signer::from_scalar(&attacker.app_key).map_err(Error::Core)?,
        app_tokens: BTreeMap::new(),
        app_asked: HashMap::new(),
        links: attacker.links.clone(),
    };
    let mut tick = tokio::time::interval(ROUND);
    let mut round = 0usize;
    let mut flooded = false;
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            notice = notices.recv() => match notice {
                Some(Notice::Connected) => {
                    for t in ["tessera/v1/client/+/req", "tessera/v1/client/+/resp"] {
                        let _ = client.subscribe(t, QoS::AtLeastOnce).await;
                    }
                    if !m.enrolled {
                        m.enroll().await?;
                    }
                }
                Some(Notice::Message(Incoming { topic, payload })) => m.on_message(&topic, &payload),
                Some(Notice::Disconnected(_)) => {}
                None => break,
            },
            _ = tick.tick() => {
                m.expire(VERDICT_TIMEOUT.as_millis().try_into().unwrap_or(u64::MAX));
                if !m.enrolled {
                    // Until the hub confirms one (a lost request is simply sent anew).
                    m.enroll().await?;
                    continue;
                }
                if now_ms() < attacker.begin_at_ms || m.loot.is_empty() {
                    continue;
                }
                let victim = attacker.victims[round % attacker.victims.len()].clone();
                round += 1;
                if !m.app_tokens.contains_key(&victim) {
                    m.ask_app_token(&victim).await?;
                }
                m.round(&victim).await?;
                m.presentations(&victim).await?;
                if !flooded && round == 2 {
                    flooded = true;
                    m.flood().await?;
                }
            }
        }
    }
    // What has waited long enough counts as unanswered; what was still in flight does not
    // count at all.
    m.expire(2_000);
    let flood = book.flood();
    if flood.refused + flood.dropped > 0 {
        // Refused (rate limited, or quarantined) or dropped (the admission limit drops
        // without answering): the hub did not serve the whole burst.
        book.judge("flood", false);
    } else if flood.sent > 0 && flood.served >= flood.sent {
        // Every request of the burst served: it did not.
        book.judge("flood", true);
    } else if flood.sent > 0 {
        book.unanswered("flood", 1);
    }
    let _ = client.disconnect().await;
    let _ = mqtt_stop.send(true);
    Ok(())
}

/// A name for a machine's reason to refuse a presentation, for the summary.
fn refusal_name(e: CoreError) -> &'static str {
    match e {
        CoreError::Claims(ClaimsError::ProofOfPossession) => "proof_of_possession",
        CoreError::Claims(ClaimsError::PresentationReplayed) => "presentation_replayed",
        CoreError::Claims(ClaimsError::RevocationsStale) => "revocations_stale",
        CoreError::Claims(ClaimsError::WrongAudience) => "wrong_audience",
        CoreError::Claims(_) => "claims",
        CoreError::Signature(_) => "signature",
        CoreError::Decode(_) => "decode",
        _ => "other",
    }
}
