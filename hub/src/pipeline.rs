//! The request pipeline, independent of MQTT: bytes from a client's request topic in,
//! a signed response and the messages to broadcast out.
//!
//! decode → the sender's registered key verifies the signature → `issued_at` is within
//! the freshness window and the nonce is new → the client's rate limit → policy → issue or
//! refuse → record durably → respond. Every refusal is a typed [`ErrorCode`] with a reason,
//! recorded in the audit log; nothing a client sends can stop the hub serving others.

use std::sync::Arc;

use tessera_shared::claims::{CTI_LEN, Claims};
use tessera_shared::crypto::{PublicKey, Signer, sha256};
use tessera_shared::message::{
    Command, Control, EnrollmentCode, ErrorCode, NONCE_LEN, Operation, Request, RequestBody,
    RequestHead, Response, ResponseBody, RevokeTarget, SignedPresentation, SignedRequest,
    WireError,
};
use tessera_shared::revocation::{self, PARTITIONS, Stream, StreamMessage};
use tessera_shared::scope::Scopes;
use tessera_shared::{token, topic};
use tokio::sync::RwLock;

use crate::anomaly::{Decision, Quarantines, Signal};
use crate::clock::Clock;
use crate::crypto::AwsLcVerifier;
use crate::keys::KeyRing;
use crate::metrics::Metrics;
use crate::policy::{DenialCode, SharedPolicy};
use crate::revocation::{Change, Outcome, PendingControl, Target, pack};
use crate::rng::Rng;
use crate::store::{
    AuditEvent, ClientKind, ClientRecord, Committed, Effect, GrantRecord, GrantUse, Horizons,
    IssuedToken, Pruned, RateLimit, Refused, RequestCommit, Store, StoreError, StoreResult,
    StreamState, TokenKind, Unmatched,
};
use crate::text::counted;

/// Length of a refresh grant value.
pub const GRANT_LEN: usize = 32;

/// Tunables of the pipeline (from the hub config).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The hub's id: `iss` of every token.
    pub hub_id: String,
    /// How far a request's `issued_at` may be from the hub's clock, in seconds.
    pub freshness_window_s: u64,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Requests a client may send in a burst.
    pub rate_burst: u32,
    /// Sustained requests per second per client.
    pub rate_per_second: f64,
    /// Largest `revoke` request accepted, in bytes (a device list).
    pub max_revoke_request_bytes: usize,
    /// Seconds between revocation heartbeats (the announced `max_age` follows from it).
    pub heartbeat_s: u64,
    /// Anomaly detection and quarantine (`[anomaly]`), applied by the serving loop to the
    /// decisions the pipeline reports ([`Handled::decision`]).
    pub anomaly: crate::anomaly::AnomalyConfig,
    /// Where the serving loop notifies revocations and alerts (`[[webhooks]]`).
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            hub_id: "tessera-hub".into(),
            freshness_window_s: 60,
            max_request_bytes: 4096,
            rate_burst: 20,
            rate_per_second: 5.0,
            max_revoke_request_bytes: tessera_shared::cose::MAX_REQUEST_LEN,
            heartbeat_s: 30,
            anomaly: crate::anomaly::AnomalyConfig::default(),
            webhooks: Vec::new(),
        }
    }
}

/// A message for the MQTT layer to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Whether the broker should retain it.
    pub retain: bool,
}

/// What handling one request produced.
#[derive(Debug, Default)]
pub struct Handled {
    /// The signed response, for the client's response topic (first to publish).
    pub reply: Option<Publication>,
    /// Broadcasts caused by the request (revocation delta, control message, snapshot).
    pub broadcast: Vec<Publication>,
    /// The decision, for the audit log, metrics and the events topic.
    pub audit: Option<AuditEvent>,
    /// The decision, for anomaly detection ([`crate::anomaly`]).
    pub decision: Option<Decision>,
    /// What a device's `report_presentation` proved about another client (the holder of
    /// a revoked token that presented it), for anomaly detection.
    pub reported: Option<Decision>,
}

/// A refusal before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The wire code.
    pub code: ErrorCode,
    /// Why, for people.
    pub reason: String,
    /// What it says about the client, for anomaly detection.
    pub signal: Option<Signal>,
}

impl Refusal {
    /// A refusal with this code and reason.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            signal: None,
        }
    }

    /// The same refusal, telling anomaly detection `signal`.
    pub fn with(mut self, signal: Signal) -> Self {
        self.signal = Some(signal);
        self
    }
}

/// A policy denial as a refusal: a scope or operation the role does not grant tells
/// anomaly detection so.
fn denied(d: crate::policy::Denial) -> Refusal {
    let refusal = Refusal::new(ErrorCode::Denied, d.reason);
    if d.code == DenialCode::NotAllowed {
        refusal.with(Signal::NotGranted)
    } else {
        refusal
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure while handling a request");
        Refusal::new(ErrorCode::Internal, "hub storage failure; retry later")
    }
}

/// The hub's state shared by every request.
pub struct Hub<S: Store> {
    /// Durable state.
    pub store: S,
    /// The current policy (reloadable).
    pub policy: SharedPolicy,
    /// Signing keys.
    pub keys: RwLock<KeyRing>,
    /// The hub's clock.
    pub clock: Arc<dyn Clock>,
    /// Tunables.
    pub config: PipelineConfig,
    /// Where token ids and grants come from ([`OsRng`](crate::rng::OsRng) but in tests).
    pub rng: Arc<dyn Rng>,
    /// What the hub counts ([`crate::metrics`]), shared with the serving loop.
    pub metrics: Arc<Metrics>,
}

impl<S: Store> std::fmt::Debug for Hub<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A successful answer, owned: what the pipeline builds before the response is signed.
/// (Clients decode the same wire body into `tessera_client::Answer`.)
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

impl Answer {
    /// The wire body of this answer.
    pub fn as_body(&self) -> ResponseBody<'_> {
        match self {
            Answer::Enrolled => ResponseBody::Enrolled,
            Answer::Token { token, grant } => ResponseBody::Token {
                token,
                grant: grant.as_ref().map(|(g, e)| (g.as_slice(), *e)),
            },
            Answer::Revoked {
                revoked,
                entries,
                notified,
            } => ResponseBody::Revoked {
                revoked: *revoked,
                entries: *entries,
                notified: *notified,
            },
            Answer::Revocations { page } => ResponseBody::Revocations { page },
        }
    }
}

/// What a successful operation produced before the response is signed.
struct Success {
    body: Answer,
    broadcast: Vec<Publication>,
    target: String,
    reason: String,
}

impl<S: Store> Hub<S> {
    /// `N` random bytes from the hub's generator.
    fn random<const N: usize>(&self) -> Result<[u8; N], Refusal> {
        let mut b = [0u8; N];
        self.rng.fill(&mut b).map_err(|e| {
            tracing::error!(error = %e, "random number generator failed");
            Refusal::new(ErrorCode::Internal, "hub randomness failure")
        })?;
        Ok(b)
    }

    /// A new token id (`cti`, PROTOCOL.md §6.1): the time in milliseconds, 48 bits big-endian,
    /// then random bytes. Unique as a random id is (80 random bits per millisecond), and
    /// ordered by time, so the store records each new token at the end of its index instead
    /// of on a random page (one page written fewer per token; docs/BENCHMARKS.md).
    fn token_id(&self, now_ms: u64) -> Result<[u8; CTI_LEN], Refusal> {
        let mut cti = self.random::<CTI_LEN>()?;
        cti[..6].copy_from_slice(&now_ms.to_be_bytes()[2..]);
        Ok(cti)
    }

    /// Handles one message from `tessera/v1/client/{topic_client}/req`, without
    /// quarantines: a `lift_quarantine` is answered `unsupported`.
    pub async fn handle(&self, topic_client: &str, payload: &[u8]) -> Handled {
        self.handle_with(topic_client, payload, None).await
    }

    /// Handles one message from `tessera/v1/client/{topic_client}/req`; a
    /// `lift_quarantine` lifts it in `quarantines`.
    pub async fn handle_with(
        &self,
        topic_client: &str,
        payload: &[u8],
        quarantines: Option<&dyn Quarantines>,
    ) -> Handled {
        // Latency is real time, not the hub's clock (which tests control).
        let started = std::time::Instant::now();
        let now_ms = self.clock.now_ms();
        let mut correlation = (None, 0, [0u8; NONCE_LEN]);
        let mut asked_about = String::new();
        let mut registered = false;
        let result = self
            .process(
                topic_client,
                payload,
                now_ms,
                &mut correlation,
                &mut asked_about,
                &mut registered,
                quarantines,
            )
            .await;
        let operation = correlation.0.map_or("unknown", Operation::name);
        let (outcome, issued) = match &result {
            Ok(s) => ("ok", matches!(s.body, Answer::Token { .. })),
            Err(r) => (r.code.name(), false),
        };
        let signal = result.as_ref().err().and_then(|r| r.signal);
        // A device's report of a revoked token presented to it is evidence against the
        // holder, which `report_presentation` proved by the holder's own signature.
        let reported = match (&result, correlation.0) {
            (Ok(s), Some(Operation::ReportPresentation)) => Some(Decision {
                client: s.target.clone(),
                registered: true,
                refused: None,
                issued: false,
                signal: Some(Signal::RevokedUse),
            }),
            _ => None,
        };
        let decision = Decision {
            client: topic_client.to_owned(),
            // Every signal comes from a registered client's request.
            registered: registered || signal.is_some(),
            refused: result.as_ref().err().map(|r| r.code),
            issued,
            signal,
        };
        let mut handled = self
            .answer(topic_client, correlation, result, asked_about, now_ms)
            .await;
        handled.decision = Some(decision);
        handled.reported = reported;
        self.metrics.request(operation, outcome);
        if issued {
            self.metrics
                .issuance_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        handled
    }

    /// Answers a request with `refusal` without processing it (no signature check, no
    /// store access): for a hub that has more work queued than it takes
    /// ([`ErrorCode::Overloaded`]). The response names the request id and nonce its head
    /// claims, so the sender can match it; nothing else of the request is read.
    pub async fn refuse(&self, topic_client: &str, payload: &[u8], refusal: Refusal) -> Handled {
        let now_ms = self.clock.now_ms();
        let correlation = RequestHead::peek(payload)
            .ok()
            .filter(|head| head.client == topic_client)
            .map_or((None, 0, [0u8; NONCE_LEN]), |head| {
                (Some(head.op), head.request_id, head.nonce)
            });
        self.answer(
            topic_client,
            correlation,
            Err(refusal),
            String::new(),
            now_ms,
        )
        .await
    }

    /// The signed response to a request and its audit event.
    async fn answer(
        &self,
        topic_client: &str,
        (op, request_id, nonce): (Option<Operation>, u64, [u8; NONCE_LEN]),
        result: Result<Success, Refusal>,
        refused_about: String,
        now_ms: u64,
    ) -> Handled {
        let now = now_ms / 1000;
        let (outcome, broadcast, target, reason) = match &result {
            Ok(s) => (
                Ok(s.body.as_body()),
                s.broadcast.clone(),
                s.target.clone(),
                s.reason.clone(),
            ),
            Err(r) => (
                Err(WireError {
                    code: r.code,
                    reason: &r.reason,
                }),
                Vec::new(),
                refused_about,
                r.reason.clone(),
            ),
        };
        let audit = AuditEvent {
            at_ms: now_ms,
            actor: topic_client.to_string(),
            action: op.map_or("unknown", Operation::name).to_string(),
            target,
            outcome: match &result {
                Ok(_) => "ok".to_string(),
                Err(r) => r.code.name().to_string(),
            },
            reason,
            count: 1,
        };
        let response = Response {
            op,
            client: topic_client,
            request_id,
            hub_time: now,
            nonce,
            outcome,
        };
        let reply = self.sign_response(&response, now).await;
        Handled {
            reply: reply.map(|payload| Publication {
                topic: topic::response(topic_client)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                payload,
                retain: false,
            }),
            broadcast,
            audit: Some(audit),
            decision: None,
            reported: None,
        }
    }

    async fn sign_response(&self, response: &Response<'_>, now: u64) -> Option<Vec<u8>> {
        // Room for the largest token answer or error reason, or for the snapshot carried.
        let body_len = match &response.outcome {
            Ok(ResponseBody::Revocations { page }) => page.len(),
            _ => token::MAX_TOKEN_LEN,
        };
        let mut out = vec![0u8; body_len + 1024];
        let keys = self.keys.read().await;
        match response.sign(keys.active(now), &mut out) {
            Ok(n) => {
                out.truncate(n);
                Some(out)
            }
            Err(e) => {
                tracing::error!(error = %e, client = response.client, "cannot sign response");
                None
            }
        }
    }

    // What the request reveals as it is read (correlation, what it is about, whether
    // the client is registered) goes back through the `&mut` arguments, also when it is
    // refused.
    #[allow(clippy::too_many_arguments)]
    async fn process(
        &self,
        topic_client: &str,
        payload: &[u8],
        now_ms: u64,
        correlation: &mut (Option<Operation>, u64, [u8; NONCE_LEN]),
        asked_about: &mut String,
        registered: &mut bool,
        quarantines: Option<&dyn Quarantines>,
    ) -> Result<Success, Refusal> {
        let too_large = |limit: usize| {
            Refusal::new(
                ErrorCode::Malformed,
                format!("request is {} bytes, the limit is {limit}", payload.len()),
            )
        };
        let revoke_limit = self
            .config
            .max_revoke_request_bytes
            .max(self.config.max_request_bytes);
        if payload.len() > revoke_limit {
            return Err(too_large(revoke_limit));
        }
        let (client, request) = if payload.len() > self.config.max_request_bytes {
            self.authenticate_large(topic_client, payload, correlation, registered)
                .await?
        } else {
            let signed = SignedRequest::decode(payload)
                .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("not a request: {e}")))?;
            let (request_id, nonce) = signed.correlation();
            *correlation = (Some(signed.operation()), request_id, nonce);
            if signed.client() != topic_client {
                return Err(wrong_topic(signed.client(), topic_client));
            }
            let client = self.live_client(topic_client).await?;
            *registered = true;
            let request = self.authenticate(&client, signed)?;
            (client, request)
        };
        // For the audit row of a refusal: what the (authenticated) request was about.
        *asked_about = match &request.body {
            RequestBody::AccessToken { device, .. } => (*device).to_owned(),
            RequestBody::Revoke(target) => Target::from_wire(target).describe(),
            RequestBody::FetchRevocations { stream, .. } => stream.name().to_string(),
            RequestBody::Enroll { .. } | RequestBody::DeviceToken => client.id.clone(),
            RequestBody::LiftQuarantine { client } => (*client).to_owned(),
            RequestBody::Refresh { .. } | RequestBody::ReportPresentation { .. } => String::new(),
        };

        let now = now_ms / 1000;
        let window = self.config.freshness_window_s;
        if request.issued_at.abs_diff(now) > window {
            return Err(Refusal::new(
                ErrorCode::Stale,
                format!(
                    "issued_at {} is more than {window} s from the hub's time {now}",
                    request.issued_at
                ),
            ));
        }
        // A hint that saves deciding (and signing for) a replay; the commit decides.
        if self
            .store
            .nonce_seen(&client.id, &request.nonce, now)
            .await?
        {
            return Err(Refusal::new(ErrorCode::Replay, "nonce already used"));
        }
        // Only now, after freshness and replay: a stale or replayed guess of an enrollment
        // code is refused the same way whether it was right or not.
        if let RequestBody::Enroll { key, code_proof } = &request.body {
            check_enrollment(&client, key, code_proof.as_ref(), &request.nonce)?;
        }
        let policy = self.policy.current();
        // Lifting a quarantine takes what revoking takes: an operator whose role lists
        // `revoke` (the policy has no operation of its own for it).
        let asked = match request.operation() {
            Operation::LiftQuarantine if client.kind != ClientKind::Operator => {
                return Err(Refusal::new(
                    ErrorCode::Denied,
                    format!(
                        "client {:?} is not an operator; only operators lift quarantines",
                        client.id
                    ),
                )
                .with(Signal::NotGranted));
            }
            Operation::LiftQuarantine => Operation::Revoke,
            op => op,
        };
        policy.operation(&client, asked).map_err(denied)?;

        let ticket = Ticket {
            client: client.id.clone(),
            nonce: request.nonce,
            // Remembered for as long as the request could still be fresh.
            nonce_expires_at: request.issued_at.max(now) + window,
            now_ms,
        };
        match request.body {
            RequestBody::Enroll { key, .. } => self.enroll(&ticket, key).await,
            RequestBody::DeviceToken => self.device_token(&ticket, &client).await,
            RequestBody::AccessToken { device, scope } => {
                self.access_token(&ticket, &client, device, &scope).await
            }
            RequestBody::Refresh { grant } => self.refresh(&ticket, &client, grant).await,
            RequestBody::Revoke(target) => self.revoke(&ticket, &client, &target).await,
            RequestBody::LiftQuarantine { client: target } => {
                self.lift_quarantine(&ticket, &client, target, quarantines)
                    .await
            }
            RequestBody::ReportPresentation { presentation } => {
                self.report_presentation(&ticket, &client, presentation)
                    .await
            }
            RequestBody::FetchRevocations { stream, from } => {
                let page = self.fetch_page(&stream, from, now).await?;
                self.commit(&ticket, Effect::None).await?;
                Ok(Success {
                    body: Answer::Revocations { page },
                    broadcast: Vec::new(),
                    target: stream.name().to_string(),
                    reason: format!("page from change {from}"),
                })
            }
        }
    }

    /// Commits a request's effects with its nonce and rate charge (see [`Store::commit`]);
    /// a refusal comes back as the store said it, for the callers that act on one.
    async fn try_commit(
        &self,
        ticket: &Ticket,
        effect: Effect,
    ) -> Result<Result<Committed, Refused>, Refusal> {
        let started = std::time::Instant::now();
        let committed = self
            .store
            .commit(RequestCommit {
                client: ticket.client.clone(),
                nonce: ticket.nonce,
                nonce_expires_at: ticket.nonce_expires_at,
                now_ms: ticket.now_ms,
                rate: RateLimit {
                    burst: self.config.rate_burst,
                    per_second: self.config.rate_per_second,
                },
                effect,
            })
            .await;
        self.metrics
            .store_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match &committed {
            Ok(_) => self.metrics.store_written(true),
            Err(e) if e.is_persistent_write_failure() => self.metrics.store_written(false),
            Err(_) => {}
        }
        Ok(committed?)
    }

    /// [`try_commit`](Self::try_commit), with every refusal answered as such.
    async fn commit(&self, ticket: &Ticket, effect: Effect) -> Result<Committed, Refusal> {
        self.try_commit(ticket, effect)
            .await?
            .map_err(|r| self.refusal(r))
    }

    /// The answer to a commit's refusal.
    fn refusal(&self, refused: Refused) -> Refusal {
        let code = match &refused {
            Refused::Replay => ErrorCode::Replay,
            Refused::RateLimited => {
                return Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} requests per second (burst {})",
                        self.config.rate_per_second, self.config.rate_burst
                    ),
                );
            }
            Refused::Grant(GrantUse::Reused(r)) => {
                tracing::warn!(client = %r.client, "refresh grant reused: family revoked");
                self.metrics.grant_reuse.inc();
                return Refusal::new(ErrorCode::Revoked, refused.to_string())
                    .with(Signal::GrantReused);
            }
            Refused::Grant(GrantUse::Revoked(_)) | Refused::HolderRevoked(_) => {
                return Refusal::new(ErrorCode::Revoked, refused.to_string())
                    .with(Signal::RevokedUse);
            }
            Refused::Grant(GrantUse::Expired(_) | GrantUse::Unknown) => ErrorCode::Denied,
            Refused::Conflict(_) | Refused::NotFound(_) => ErrorCode::Denied,
            Refused::Grant(GrantUse::Fresh(_)) | Refused::CutOff { .. } => ErrorCode::Internal,
        };
        Refusal::new(code, refused.to_string())
    }

    /// The registered client that sent a request, refused if unknown or revoked.
    async fn live_client(&self, id: &str) -> Result<ClientRecord, Refusal> {
        let client = self
            .store
            .client(id)
            .await?
            .ok_or_else(|| Refusal::new(ErrorCode::UnknownClient, "no such client"))?;
        if client.revoked_at.is_some() {
            return Err(
                Refusal::new(ErrorCode::Revoked, "client is revoked").with(Signal::RevokedUse)
            );
        }
        Ok(client)
    }

    /// A request larger than an ordinary one: only an operator's revoke (a device list) may
    /// be. Its head is read first, without walking the body, and its signature is checked
    /// with the operator's registered key before the body is decoded: nobody else makes the
    /// hub walk a large request.
    async fn authenticate_large<'a>(
        &self,
        topic_client: &str,
        payload: &'a [u8],
        correlation: &mut (Option<Operation>, u64, [u8; NONCE_LEN]),
        registered: &mut bool,
    ) -> Result<(ClientRecord, Request<'a>), Refusal> {
        let limit = self.config.max_request_bytes;
        let too_large = || {
            Refusal::new(
                ErrorCode::Malformed,
                format!("request is {} bytes, the limit is {limit}", payload.len()),
            )
        };
        let head = RequestHead::peek(payload).map_err(|_| too_large())?;
        *correlation = (Some(head.op), head.request_id, head.nonce);
        if head.op != Operation::Revoke || head.client != topic_client {
            return Err(too_large());
        }
        let client = match self.store.client(head.client).await? {
            Some(c) if c.kind == ClientKind::Operator => c,
            _ => return Err(too_large()),
        };
        *registered = true;
        if client.revoked_at.is_some() {
            return Err(
                Refusal::new(ErrorCode::Revoked, "client is revoked").with(Signal::RevokedUse)
            );
        }
        let key = registered_verifier(&client)?.ok_or_else(|| {
            Refusal::new(ErrorCode::UnknownClient, "client has not enrolled a key")
        })?;
        let verified = tessera_shared::cose::Sign1::decode_within(
            payload,
            tessera_shared::cose::MAX_REQUEST_LEN,
        )
        .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("not a request: {e}")))?
        .verify_with(&key)
        .map_err(bad_signature)?;
        let request = Request::decode(verified)
            .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("not a request: {e}")))?;
        *correlation = (Some(request.operation()), request.request_id, request.nonce);
        if request.client != topic_client {
            return Err(wrong_topic(request.client, topic_client));
        }
        if request.operation() != Operation::Revoke {
            return Err(too_large());
        }
        Ok((client, request))
    }

    /// Checks the request's signature with the right key: the registered one, or for an
    /// enrollment the key in the body (whether the device may enroll with that key is
    /// checked later, by [`check_enrollment`], once the request is known fresh and new).
    fn authenticate<'a>(
        &self,
        client: &ClientRecord,
        signed: SignedRequest<'a>,
    ) -> Result<Request<'a>, Refusal> {
        if let Some(key) = signed.enrollment_key() {
            if client.kind != ClientKind::Device {
                return Err(Refusal::new(ErrorCode::Denied, "only devices enroll"));
            }
            let verifier = AwsLcVerifier::new(&key).map_err(bad_signature)?;
            return signed.verify(&verifier).map_err(bad_signature);
        }
        let key = registered_verifier(client)?.ok_or_else(|| {
            Refusal::new(ErrorCode::UnknownClient, "client has not enrolled a key")
        })?;
        signed.verify(&key).map_err(bad_signature)
    }

    async fn enroll(&self, ticket: &Ticket, key: PublicKey) -> Result<Success, Refusal> {
        self.commit(
            ticket,
            Effect::Enroll {
                public_key: key.to_sec1().to_vec(),
            },
        )
        .await?;
        Ok(Success {
            body: Answer::Enrolled,
            broadcast: Vec::new(),
            target: ticket.client.clone(),
            reason: format!("enrolled key {}", hex::encode(key.kid())),
        })
    }

    async fn device_token(
        &self,
        ticket: &Ticket,
        device: &ClientRecord,
    ) -> Result<Success, Refusal> {
        require_enrolled(device)?;
        let policy = self.policy.current();
        let grant = policy
            .device_token(device)
            .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;
        let token = TokenSpec {
            kind: TokenKind::Device,
            audience: grant.audience,
            scope: grant.scope,
            lifetime_s: grant.lifetime_s,
            grant: Some((grant.grant_lifetime_s, self.random::<16>()?)),
        };
        self.issue(ticket, device, token, None).await
    }

    async fn access_token(
        &self,
        ticket: &Ticket,
        app: &ClientRecord,
        device_id: &str,
        scope: &Scopes<'_>,
    ) -> Result<Success, Refusal> {
        let device = self.live_device(device_id).await?;
        let policy = self.policy.current();
        let grant = policy.access_token(app, &device, scope).map_err(denied)?;
        let token = TokenSpec {
            kind: TokenKind::Access,
            audience: device.id,
            scope: grant.scope,
            lifetime_s: grant.lifetime_s,
            grant: Some((grant.grant_lifetime_s, self.random::<16>()?)),
        };
        self.issue(ticket, app, token, None).await
    }

    async fn live_device(&self, id: &str) -> Result<ClientRecord, Refusal> {
        let device = self
            .store
            .client(id)
            .await?
            .filter(|c| c.kind == ClientKind::Device)
            .ok_or_else(|| Refusal::new(ErrorCode::Denied, format!("no device `{id}`")))?;
        if device.revoked_at.is_some() {
            return Err(Refusal::new(
                ErrorCode::Revoked,
                format!("device `{id}` is revoked"),
            ));
        }
        Ok(device)
    }

    /// A refresh: the grant is read and the new token decided first; the commit spends the
    /// grant only if it is still fresh then (so two replicas presented it at once cannot
    /// both issue), together with the new token.
    async fn refresh(
        &self,
        ticket: &Ticket,
        client: &ClientRecord,
        grant: &[u8],
    ) -> Result<Success, Refusal> {
        let now = ticket.now();
        let hash = sha256(&[grant]);
        let state = self.store.grant(&hash).await?;
        // Only the client a grant was issued to may present it, whatever state it is in.
        // Anyone else (a client that read it off the broker, or the broker itself) is
        // refused before the grant is looked at further: it is neither spent nor counted as
        // a reuse, so presenting it cannot revoke the owner's family and log the owner out.
        // The request's signature, by the presenter's registered key, says who is asking.
        if let Some(owner) = state.as_ref().map(|s| &s.record.client)
            && *owner != client.id
        {
            tracing::warn!(
                client = %client.id,
                owner = %owner,
                "a client presented another client's refresh grant (it has leaked); refused, \
                 the owner's grants are untouched"
            );
            return Err(foreign_grant());
        }
        let record = match state.map_or(GrantUse::Unknown, |s| s.classify(now)) {
            GrantUse::Fresh(r) => r,
            // Used already, and presented by its owner's key (a copy of the owner's store
            // replayed it, say): record the reuse, which revokes the whole family.
            GrantUse::Reused(_) => {
                return match self.commit(ticket, Effect::SpendGrant(hash)).await? {
                    Committed::Spent(used) => Err(self.refusal(Refused::Grant(used))),
                    other => Err(Refusal::new(
                        ErrorCode::Internal,
                        format!("spending a grant answered {other:?}"),
                    )),
                };
            }
            other => return Err(self.refusal(Refused::Grant(other))),
        };
        // Policy may have changed since the grant was issued: decide again.
        let policy = self.policy.current();
        let (audience, scope, lifetime_s, grant_lifetime) = match record.kind {
            TokenKind::Device => {
                require_enrolled(client)?;
                let g = policy
                    .device_token(client)
                    .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;
                (g.audience, g.scope, g.lifetime_s, g.grant_lifetime_s)
            }
            TokenKind::Access => {
                let device = self.live_device(&record.audience).await?;
                let scopes = Scopes::parse(&record.scope)
                    .map_err(|_| Refusal::new(ErrorCode::Internal, "stored scope is corrupt"))?;
                let g = policy
                    .access_token(client, &device, &scopes)
                    .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;
                (
                    record.audience.clone(),
                    g.scope,
                    g.lifetime_s,
                    g.grant_lifetime_s,
                )
            }
        };
        // The new grant lives no longer than the family's first one.
        let grant_lifetime = grant_lifetime.min(record.expires_at.saturating_sub(now));
        let token = TokenSpec {
            kind: record.kind,
            audience,
            scope,
            lifetime_s,
            grant: Some((grant_lifetime, record.family)),
        };
        self.issue(ticket, client, token, Some(hash)).await
    }

    /// Signs a token for `holder` and commits it with the request (spending `spends`, the
    /// refresh grant presented, if any).
    async fn issue(
        &self,
        ticket: &Ticket,
        holder: &ClientRecord,
        spec: TokenSpec,
        spends: Option<[u8; 32]>,
    ) -> Result<Success, Refusal> {
        let now = ticket.now();
        let TokenSpec {
            kind,
            audience,
            scope,
            lifetime_s,
            grant,
        } = spec;
        let cnf = holder
            .public_key
            .as_deref()
            .map(PublicKey::from_sec1)
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| Refusal::new(ErrorCode::Denied, "client has no enrolled key"))?;
        let scopes = Scopes::parse(&scope)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("policy scope: {e}")))?;
        let (grant_value, grant_record) = match grant {
            Some((grant_lifetime, family)) if grant_lifetime > 0 => {
                let value = self.random::<GRANT_LEN>()?;
                let record = GrantRecord {
                    hash: sha256(&[&value]),
                    family,
                    client: holder.id.clone(),
                    kind,
                    audience: audience.clone(),
                    scope: scope.clone(),
                    expires_at: now + grant_lifetime,
                    created_at: now,
                };
                (Some((value.to_vec(), record.expires_at)), Some(record))
            }
            _ => (None, None),
        };
        let (mut iat, mut retried) = (now, false);
        let (token, cti) = loop {
            let cti = self.token_id(ticket.now_ms)?;
            let claims = Claims {
                iss: &self.config.hub_id,
                sub: &holder.id,
                aud: &audience,
                exp: iat + lifetime_s,
                nbf: None,
                iat,
                cti: &cti,
                cnf,
                scope: scopes,
            };
            let mut buf = vec![0u8; token::MAX_TOKEN_LEN];
            let n = {
                let keys = self.keys.read().await;
                token::issue(&claims, keys.active(now), &mut buf)
                    .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?
            };
            buf.truncate(n);
            let issued = IssuedToken {
                cti,
                hash: revocation::token_hash(&buf),
                kind,
                subject: holder.id.clone(),
                audience: audience.clone(),
                scope: scope.clone(),
                issued_at: iat,
                expires_at: claims.exp,
            };
            let effect = Effect::Issue {
                token: issued,
                grant: grant_record.clone(),
                spends,
            };
            match self.try_commit(ticket, effect).await? {
                Ok(_) => break (buf, cti),
                // Only the holder's tokens issued before a cut-off were revoked meanwhile
                // (this request read the clock before the revocation committed, or another
                // replica's clock is ahead): the request counts as arriving after the
                // revocation, so the token is issued again at the cut-off, once. Never far
                // ahead of the hub's clock: verifiers would refuse a token issued in the
                // future beyond their leeway.
                Err(Refused::CutOff { issued_before, .. })
                    if !retried
                        && issued_before.saturating_sub(now)
                            <= self.policy.current().leeway_s() =>
                {
                    iat = issued_before.max(now);
                    retried = true;
                }
                Err(refused @ Refused::CutOff { .. }) => {
                    tracing::warn!(
                        refused = %refused,
                        holder = %holder.id,
                        iat,
                        "token refused by a revocation cut-off, again or too far ahead"
                    );
                    return Err(Refusal::new(
                        ErrorCode::Internal,
                        "a revocation of this client's earlier tokens was being recorded; retry",
                    ));
                }
                Err(refused) => return Err(self.refusal(refused)),
            }
        };
        self.metrics.token_issued(kind.as_str());
        if grant_value.is_some() {
            self.metrics.token_issued("refresh_grant");
        }
        Ok(Success {
            body: Answer::Token {
                token,
                grant: grant_value,
            },
            broadcast: Vec::new(),
            target: audience,
            reason: format!(
                "{} token, scope `{scope}`, {lifetime_s} s, cti {}{}",
                kind.as_str(),
                hex::encode(cti),
                if retried {
                    format!(", issued at the revocation cut-off {iat}")
                } else {
                    String::new()
                }
            ),
        })
    }

    async fn revoke(
        &self,
        ticket: &Ticket,
        operator: &ClientRecord,
        target: &RevokeTarget<'_>,
    ) -> Result<Success, Refusal> {
        let now = ticket.now();
        let target = Target::from_wire(target);
        let target_name = target.describe();
        let target_kind = target.kind();
        let leeway = self.policy.current().leeway_s();
        // Durable before acknowledged: the response is only built after this returns, and
        // the nonce, the rate charge and the revocation commit together.
        let effect = Effect::Revoke {
            targets: vec![target],
            leeway,
            unmatched: Unmatched::Refuse,
        };
        let outcome = match self.commit(ticket, effect).await? {
            Committed::Revoked(outcome) => outcome,
            other => {
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    format!("revoking answered {other:?}"),
                ));
            }
        };
        self.metrics.revocation(target_kind);
        let broadcast = self.outcome_publications(&outcome, now).await?;
        let (entries, notified) = (
            outcome.entry_count(),
            u64::try_from(outcome.controls.len()).unwrap_or(u64::MAX),
        );
        Ok(Success {
            body: Answer::Revoked {
                revoked: outcome.revoked,
                entries,
                notified,
            },
            broadcast,
            target: target_name,
            reason: format!(
                "revoked by {}: {} revoked, {} in {}, {} told",
                operator.id,
                outcome.revoked,
                counted(entries, "entry", "entries"),
                counted(
                    u64::try_from(outcome.changes.len()).unwrap_or(u64::MAX),
                    "change",
                    "changes"
                ),
                counted(notified, "device", "devices"),
            ),
        })
    }

    /// An operator's `lift_quarantine`: the nonce and rate charge are committed first (a
    /// replayed lift is refused as such), then the quarantine, kept in the serving loop's
    /// memory, is lifted. A client not quarantined (here: another replica's quarantine is
    /// its own) is refused `denied`.
    async fn lift_quarantine(
        &self,
        ticket: &Ticket,
        operator: &ClientRecord,
        target: &str,
        quarantines: Option<&dyn Quarantines>,
    ) -> Result<Success, Refusal> {
        let Some(quarantines) = quarantines else {
            return Err(Refusal::new(
                ErrorCode::Unsupported,
                "this hub keeps no quarantines",
            ));
        };
        self.commit(ticket, Effect::None).await?;
        match quarantines.lift(target, &operator.id, ticket.now_ms) {
            Some(until) => Ok(Success {
                // The empty success body (`{}`), as for an enrollment.
                body: Answer::Enrolled,
                broadcast: Vec::new(),
                target: target.to_owned(),
                reason: format!(
                    "quarantine lifted by {}; it would have lasted until {} (Unix s)",
                    operator.id,
                    until / 1000
                ),
            }),
            None => Err(Refusal::new(
                ErrorCode::Denied,
                format!("client `{target}` is not quarantined on this hub"),
            )),
        }
    }

    /// A device's report that a presentation it received carried a revoked token
    /// (docs/PROTOCOL.md §8.5.8). Taken only as evidence the hub can check itself: the
    /// holder's signature on the presentation, made to this very device, recently, with a
    /// token this hub signed and its own revocation list covers. Each presentation counts
    /// once (its nonce is remembered under the holder, beside the holder's request nonces
    /// but apart from them), so a device cannot replay one to get its holder quarantined.
    async fn report_presentation(
        &self,
        ticket: &Ticket,
        device: &ClientRecord,
        presentation: &[u8],
    ) -> Result<Success, Refusal> {
        let now = ticket.now();
        let policy = self.policy.current();
        let leeway = policy.leeway_s();
        let checked = {
            let keys = self.keys.read().await;
            SignedPresentation::verify_as_presented(presentation, &*keys, &device.id, leeway)
                .map_err(|e| {
                    Refusal::new(
                        ErrorCode::Denied,
                        format!("the reported presentation does not check out: {e}"),
                    )
                })?
        };
        let window = self.config.freshness_window_s;
        if checked.issued_at.abs_diff(now) > window {
            return Err(Refusal::new(
                ErrorCode::Stale,
                format!(
                    "the reported presentation was made at {}, more than {window} s from the \
                     hub's time {now}",
                    checked.issued_at
                ),
            ));
        }
        let claims = checked.token.claims();
        let holder = claims.sub.to_owned();
        let hash = checked.token.hash();
        let stream = Stream::of_device(&device.id).name();
        let read = self
            .store
            .stream_entries(stream.as_str(), 0, now, leeway, usize::MAX)
            .await?;
        let covered = read.changes.iter().flat_map(|(_, e)| e).any(|a| {
            a.audience.as_str() == device.id && a.entry.covers(&hash, &holder, claims.iat)
        });
        if !covered {
            return Err(Refusal::new(
                ErrorCode::Denied,
                format!(
                    "the hub's revocation list does not cover the token of {holder} that the \
                     presentation carries"
                ),
            ));
        }
        self.commit(ticket, Effect::None).await?;
        // The presentation's own nonce, under the holder, in a namespace of its own.
        let seen = sha256(&[b"tessera-presented", device.id.as_bytes(), &checked.nonce]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&seen[..NONCE_LEN]);
        let again = self
            .store
            .commit(RequestCommit {
                client: holder.clone(),
                nonce,
                nonce_expires_at: checked.issued_at.max(now) + window,
                now_ms: ticket.now_ms,
                rate: RateLimit::NONE,
                effect: Effect::None,
            })
            .await?;
        if again.is_err() {
            return Err(Refusal::new(
                ErrorCode::Replay,
                "this presentation was reported already",
            ));
        }
        Ok(Success {
            // The empty success body (`{}`), as for an enrollment.
            body: Answer::Enrolled,
            broadcast: Vec::new(),
            target: holder,
            reason: format!(
                "a presentation of a revoked token (cti {}) made at {} was refused by {}",
                hex::encode(claims.cti),
                checked.issued_at,
                device.id
            ),
        })
    }

    /// What a durable revocation publishes: a delta for each change and the control
    /// messages it owes.
    pub async fn outcome_publications(
        &self,
        outcome: &Outcome,
        now: u64,
    ) -> Result<Vec<Publication>, Refusal> {
        let mut out = Vec::with_capacity(outcome.changes.len() + outcome.controls.len());
        for change in &outcome.changes {
            let latest = outcome
                .latest
                .get(&change.stream)
                .copied()
                .unwrap_or(change.seq);
            out.push(self.delta(change, latest, now).await?);
        }
        let keys = self.keys.read().await;
        for c in &outcome.controls {
            out.push(control_publication(&keys, c, now)?);
        }
        Ok(out)
    }

    /// A signed control message for one device.
    pub async fn control(
        &self,
        device: &str,
        command: Command,
        now: u64,
    ) -> Result<Publication, Refusal> {
        let pending = PendingControl {
            device: device.to_owned(),
            command,
            issued_at: now,
        };
        control_publication(&*self.keys.read().await, &pending, now)
    }

    /// The signed delta of one change: the page covering only it. `latest` is the
    /// stream's latest change number now.
    pub async fn delta(
        &self,
        change: &Change,
        latest: u64,
        now: u64,
    ) -> Result<Publication, Refusal> {
        let stream = parse_stream(&change.stream)?;
        let payload = self.page_payload(
            &stream,
            latest.max(change.seq),
            change.seq,
            change.seq,
            &change.entries,
            now,
        )?;
        Ok(Publication {
            topic: tessera_shared::topic::revocation_delta(&stream).to_string(),
            payload: self.sign_payload(&payload, now).await?,
            retain: false,
        })
    }

    fn page_payload(
        &self,
        stream: &Stream<'_>,
        seq: u64,
        from: u64,
        to: u64,
        entries: &[revocation::Addressed],
        now: u64,
    ) -> Result<Vec<u8>, Refusal> {
        let len = entries.iter().map(revocation::Addressed::encoded_len).sum();
        let mut payload = vec![0u8; revocation::max_page_len(stream, len)];
        let n = revocation::encode_page(seq, now, stream, from, to, entries, &mut payload)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot encode page: {e}")))?;
        payload.truncate(n);
        Ok(payload)
    }

    /// The signed page of `stream` that a `fetch_revocations` from change `from` answers
    /// with: as many changes from `from` on as fit one page.
    pub async fn fetch_page(
        &self,
        stream: &Stream<'_>,
        from: u64,
        now: u64,
    ) -> Result<Vec<u8>, Refusal> {
        let name = stream.name();
        // More than one change can hold, so a read cut short still has a whole change.
        let read = self
            .store
            .stream_entries(
                &name,
                from,
                now,
                revocation::MAX_LEEWAY,
                2 * revocation::MAX_ENTRIES_PER_PAGE,
            )
            .await?;
        if from > read.latest {
            return Err(Refusal::new(
                ErrorCode::Denied,
                format!(
                    "stream {name} is at change {}: there is nothing from change {from}",
                    read.latest
                ),
            ));
        }
        let page = pack(
            stream,
            from,
            read.latest,
            &read.changes,
            read.complete,
            Some(1),
        )
        .into_iter()
        .next()
        .ok_or_else(|| Refusal::new(ErrorCode::Internal, "cannot build the page"))?;
        let payload =
            self.page_payload(stream, read.latest, page.from, page.to, &page.entries, now)?;
        self.sign_payload(&payload, now).await
    }

    /// The retained snapshot of a stream: signed pages covering every change, on
    /// `…/snapshot/0`, `…/snapshot/1`, …, and empty retained messages clearing the pages
    /// a longer earlier snapshot left. Returns them and the change they reach.
    pub async fn snapshot_publications(
        &self,
        state: &StreamState,
        now: u64,
    ) -> Result<(Vec<Publication>, u64), Refusal> {
        let stream = parse_stream(&state.name)?;
        let read = self
            .store
            .stream_entries(&state.name, 1, now, revocation::MAX_LEEWAY, usize::MAX)
            .await?;
        let mut out = Vec::new();
        if read.latest > 0 {
            let pages = pack(&stream, 1, read.latest, &read.changes, true, None);
            for (i, page) in pages.iter().enumerate() {
                let payload = self.page_payload(
                    &stream,
                    read.latest,
                    page.from,
                    page.to,
                    &page.entries,
                    now,
                )?;
                out.push(Publication {
                    topic: tessera_shared::topic::revocation_snapshot_page(&stream, i as u64)
                        .to_string(),
                    payload: self.sign_payload(&payload, now).await?,
                    retain: true,
                });
            }
        }
        let published = out.len() as u64;
        for stale in published..state.snapshot_pages {
            out.push(Publication {
                topic: tessera_shared::topic::revocation_snapshot_page(&stream, stale).to_string(),
                payload: Vec::new(),
                retain: true,
            });
        }
        Ok((out, read.latest))
    }

    /// A signed heartbeat for every stream a verifier may follow: the 256 device
    /// partitions, the policy's service audience, and any other stream that has changes.
    pub async fn heartbeats(
        &self,
        streams: &[StreamState],
        now: u64,
    ) -> Result<Vec<Publication>, Refusal> {
        let policy = self.policy.current();
        let h = self.config.heartbeat_s.max(1);
        let access_max_age = revocation::recommended_max_age(
            h,
            policy
                .shortest_token_lifetime_s(ClientKind::App)
                .unwrap_or(u64::MAX),
        );
        let device_max_age = revocation::recommended_max_age(
            h,
            policy
                .shortest_token_lifetime_s(ClientKind::Device)
                .unwrap_or(u64::MAX),
        );
        let seq_of = |name: &str| streams.iter().find(|s| s.name == name).map_or(0, |s| s.seq);
        let mut names: Vec<String> = (0..PARTITIONS)
            .map(|p| {
                Stream::Devices(u8::try_from(p).unwrap_or(u8::MAX))
                    .name()
                    .to_string()
            })
            .collect();
        if let Ok(service) = Stream::of_service(policy.device_audience()) {
            names.push(service.name().to_string());
        }
        for s in streams {
            if !names.contains(&s.name) {
                names.push(s.name.clone());
            }
        }
        let mut out = Vec::with_capacity(names.len());
        let keys = self.keys.read().await;
        let signer = keys.active(now);
        for name in &names {
            let stream = parse_stream(name)?;
            let max_age = match stream {
                Stream::Devices(_) => access_max_age,
                Stream::Service(_) => device_max_age,
            };
            let mut payload = [0u8; revocation::MAX_HEARTBEAT_LEN];
            let n = revocation::encode_heartbeat(seq_of(name), now, &stream, max_age, &mut payload)
                .map_err(|e| {
                    Refusal::new(ErrorCode::Internal, format!("cannot encode heartbeat: {e}"))
                })?;
            let mut signed = vec![0u8; n + tessera_shared::cose::OVERHEAD];
            let len = tessera_shared::cose::sign(signer, &payload[..n], &mut signed)
                .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?;
            signed.truncate(len);
            out.push(Publication {
                topic: tessera_shared::topic::revocation_heartbeat(&stream).to_string(),
                payload: signed,
                retain: false,
            });
        }
        Ok(out)
    }

    async fn sign_payload(&self, payload: &[u8], now: u64) -> Result<Vec<u8>, Refusal> {
        let mut out = vec![0u8; payload.len() + tessera_shared::cose::OVERHEAD];
        let keys = self.keys.read().await;
        let n = tessera_shared::cose::sign(keys.active(now), payload, &mut out)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?;
        out.truncate(n);
        Ok(out)
    }

    /// What one of the hub's own messages seen back from the broker confirms: the hub
    /// subscribes to its delta and control topics, so seeing a message there proves the
    /// broker took it (one only queued when the hub died or the connection dropped is
    /// sent again). Anything not signed by the hub is ignored.
    pub async fn echo(&self, topic: &str, signed: &[u8]) -> Option<Echo> {
        let keys = self.keys.read().await;
        // Any key the hub holds, checked with its own backend (aws-lc-rs).
        let Ok(payload) =
            tessera_shared::cose::Sign1::decode(signed).and_then(|m| m.verify(&*keys))
        else {
            // Debug only: on a broker without an ACL anyone can flood these topics, and a
            // line per message would flood the log too.
            tracing::debug!(
                topic,
                "ignoring a message on a hub topic the hub did not sign"
            );
            return None;
        };
        if let Some(device) = tessera_shared::topic::controlled_device(topic) {
            let c = Control::decode(payload).ok()?;
            // Seen on its own device's topic only.
            if c.device != device {
                return None;
            }
            return Some(Echo::Control(PendingControl {
                device: c.device.to_owned(),
                command: c.command,
                issued_at: c.issued_at,
            }));
        }
        match StreamMessage::decode(payload).ok()? {
            // Only what the hub publishes on a delta topic: the page of one change of that
            // topic's stream (see `delta`). Any other page the hub signed, a snapshot page
            // covering the whole stream replayed there say, confirms nothing: it would mark
            // changes published that may never have gone out as deltas.
            StreamMessage::Page(page)
                if page.from() == page.to()
                    && tessera_shared::topic::delta_stream(topic) == Some(page.stream()) =>
            {
                Some(Echo::Changes(
                    page.stream().name().to_string(),
                    page.from(),
                    page.to(),
                ))
            }
            StreamMessage::Page(_) | StreamMessage::Heartbeat(_) => None,
        }
    }

    /// What was recorded but not yet confirmed by the broker, recorded at or before
    /// `created_before` (after a crash, a restart, or a lost connection), to publish
    /// again: the deltas of unpublished changes and the oldest `max_controls` control
    /// messages owed (a broker that never echoes them must not make every heartbeat
    /// republish every control message ever owed).
    pub async fn pending_broadcasts(
        &self,
        created_before: u64,
        max_controls: usize,
    ) -> Result<Vec<Publication>, Refusal> {
        let now = self.clock.now();
        let changes = self.store.unpublished_changes(created_before).await?;
        let mut out = Vec::new();
        if !changes.is_empty() {
            let streams = self.store.streams().await?;
            for change in &changes {
                let latest = streams
                    .iter()
                    .find(|s| s.name == change.stream)
                    .map_or(change.seq, |s| s.seq);
                out.push(self.delta(change, latest, now).await?);
            }
        }
        let controls = self
            .store
            .unsent_controls(created_before, max_controls)
            .await?;
        let keys = self.keys.read().await;
        for c in &controls {
            out.push(control_publication(&keys, c, now)?);
        }
        Ok(out)
    }

    /// Forgets what can no longer matter ([`Store::prune`]): issued tokens, grants and
    /// nonces past their expiry plus the policy's leeway; revocation entries past their
    /// `expires_at` plus [`MAX_LEEWAY`](revocation::MAX_LEEWAY), the largest leeway a
    /// verifier may apply; control messages owed for longer than the policy's longest
    /// token lifetime plus leeway; audit events older than `audit_retention_s`.
    pub async fn prune(&self, audit_retention_s: u64) -> StoreResult<Pruned> {
        let now_ms = self.clock.now_ms();
        let now = now_ms / 1000;
        let policy = self.policy.current();
        let leeway = policy.leeway_s();
        self.store
            .prune(Horizons {
                tokens_before: now.saturating_sub(leeway),
                entries_before: now.saturating_sub(revocation::MAX_LEEWAY),
                controls_before: now
                    .saturating_sub(policy.longest_token_lifetime_s())
                    .saturating_sub(leeway),
                audit_before_ms: now_ms.saturating_sub(audit_retention_s.saturating_mul(1000)),
            })
            .await
    }

    /// The key set to publish (retained).
    pub async fn keyset_publication(&self, version: u64) -> Result<Publication, Refusal> {
        let now = self.clock.now();
        let keys = self.keys.read().await;
        let payload = keys
            .signed_keyset(version, now)
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        Ok(Publication {
            topic: topic::KEYS.to_string(),
            payload,
            retain: true,
        })
    }

    /// The active signer's public key (the trust anchor for a hub with one key).
    pub async fn active_public_key(&self) -> PublicKey {
        self.keys.read().await.active(self.clock.now()).public_key()
    }
}

/// A refused signature.
fn bad_signature(e: tessera_shared::Error) -> Refusal {
    Refusal::new(
        ErrorCode::BadSignature,
        format!("signature check failed: {e}"),
    )
}

/// The reason of the refusal of a refresh grant presented by a client other than its owner
/// (code [`ErrorCode::Denied`]): the one refusal a client gets for another's grant,
/// whether that grant is fresh, used, revoked or expired.
pub const FOREIGN_GRANT: &str = "refresh grant was issued to another client; only its holder \
                                 may present it (nothing was spent or revoked)";

/// A refresh grant presented by another client than its owner.
fn foreign_grant() -> Refusal {
    Refusal::new(ErrorCode::Denied, FOREIGN_GRANT).with(Signal::NotGranted)
}

/// A request that names another client than the one whose topic it came on.
fn wrong_topic(named: &str, topic_client: &str) -> Refusal {
    Refusal::new(
        ErrorCode::Malformed,
        format!("request names client `{named}` but was sent on `{topic_client}`'s topic"),
    )
}

/// A verifier (aws-lc-rs) for the client's registered key, if it has one.
fn registered_verifier(client: &ClientRecord) -> Result<Option<AwsLcVerifier>, Refusal> {
    client
        .public_key
        .as_deref()
        .map(crate::crypto::request_verifier)
        .transpose()
        .map_err(|_| Refusal::new(ErrorCode::Internal, "registered key is corrupt"))
}

/// The client's registered key, if it has one.
fn registered_key(client: &ClientRecord) -> Result<Option<PublicKey>, Refusal> {
    client
        .public_key
        .as_deref()
        .map(PublicKey::from_sec1)
        .transpose()
        .map_err(|_| Refusal::new(ErrorCode::Internal, "registered key is corrupt"))
}

/// What a request's commit needs besides its effect (see [`Hub::commit`]).
struct Ticket {
    client: String,
    nonce: [u8; NONCE_LEN],
    nonce_expires_at: u64,
    now_ms: u64,
}

impl Ticket {
    fn now(&self) -> u64 {
        self.now_ms / 1000
    }
}

/// A token the policy decided on, before it is signed.
struct TokenSpec {
    kind: TokenKind,
    audience: String,
    scope: String,
    lifetime_s: u64,
    /// The grant to issue with it: its lifetime and family.
    grant: Option<(u64, [u8; 16])>,
}

/// Whether a device may enroll with `key`: its pre-registered key, or a valid proof of its
/// one-time enrollment code. Checked only once the request is known fresh and new, so a
/// guess of the code learns nothing from being stale or replayed.
fn check_enrollment(
    client: &ClientRecord,
    key: &PublicKey,
    code_proof: Option<&[u8; 32]>,
    nonce: &[u8; NONCE_LEN],
) -> Result<(), Refusal> {
    match (
        registered_key(client)?,
        &client.enrollment_code_key,
        code_proof,
    ) {
        (Some(registered), _, _) if registered == *key => Ok(()),
        (Some(_), _, _) => Err(Refusal::new(
            ErrorCode::Denied,
            "this is not the device's registered key; a device's key never changes over the \
             wire: revoke the device and register it again",
        )),
        (None, Some(code_key), Some(proof)) => {
            if EnrollmentCode::check(code_key, &client.id, &key.kid(), nonce, proof) {
                Ok(())
            } else {
                Err(Refusal::new(
                    ErrorCode::Denied,
                    "enrollment code proof does not match",
                ))
            }
        }
        (None, Some(_), None) => Err(Refusal::new(
            ErrorCode::Denied,
            "enrollment needs the one-time code proof",
        )),
        (None, None, _) => Err(Refusal::new(
            ErrorCode::Denied,
            "no key and no enrollment code registered for this device",
        )),
    }
}

/// Device tokens go only to devices that have enrolled (proved their key to the hub),
/// even when the key was registered beforehand.
fn require_enrolled(device: &ClientRecord) -> Result<(), Refusal> {
    if device.enrolled_at.is_none() {
        return Err(Refusal::new(
            ErrorCode::Denied,
            "device has not enrolled: send an enroll request first",
        ));
    }
    Ok(())
}

/// What one of the hub's own messages seen back from the broker confirms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// Changes `from..=to` of a stream were published (a delta is one change).
    Changes(String, u64, u64),
    /// A control message was published.
    Control(PendingControl),
}

fn parse_stream(name: &str) -> Result<Stream<'_>, Refusal> {
    Stream::parse(name)
        .map_err(|_| Refusal::new(ErrorCode::Internal, format!("stored stream name {name:?}")))
}

/// A control message, signed with the active key.
fn control_publication(
    keys: &KeyRing,
    pending: &PendingControl,
    now: u64,
) -> Result<Publication, Refusal> {
    let msg = Control {
        device: &pending.device,
        command: pending.command,
        issued_at: pending.issued_at,
    };
    let mut out = vec![0u8; 512];
    let n = msg
        .sign(keys.active(now), &mut out)
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?;
    out.truncate(n);
    Ok(Publication {
        topic: tessera_shared::topic::control(&pending.device)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "invalid device id"))?
            .to_string(),
        payload: out,
        retain: false,
    })
}
