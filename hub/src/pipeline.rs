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
    Response, ResponseBody, RevokeTarget, SignedRequest, WireError,
};
use tessera_shared::revocation::{self, Entry};
use tessera_shared::scope::Scopes;
use tessera_shared::{token, topic};
use tokio::sync::RwLock;

use crate::client::Answer;
use crate::clock::Clock;
use crate::keys::KeyRing;
use crate::policy::SharedPolicy;
use crate::store::{
    AuditEvent, ClientKind, ClientRecord, GrantRecord, GrantUse, IssuedToken, Store, StoreError,
    TokenKind,
};

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
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            hub_id: "tessera-hub".into(),
            freshness_window_s: 60,
            max_request_bytes: 4096,
            rate_burst: 20,
            rate_per_second: 5.0,
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
}

/// A refusal before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The wire code.
    pub code: ErrorCode,
    /// Why, for people.
    pub reason: String,
}

impl Refusal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
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
}

impl<S: Store> std::fmt::Debug for Hub<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a successful operation produced before the response is signed.
struct Success {
    body: Answer,
    broadcast: Vec<Publication>,
    target: String,
    reason: String,
}

fn random<const N: usize>() -> Result<[u8; N], Refusal> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| {
        tracing::error!(error = %e, "OS random number generator failed");
        Refusal::new(ErrorCode::Internal, "hub randomness failure")
    })?;
    Ok(b)
}

impl<S: Store> Hub<S> {
    /// Handles one message from `tessera/v1/client/{topic_client}/req`.
    pub async fn handle(&self, topic_client: &str, payload: &[u8]) -> Handled {
        let now_ms = self.clock.now_ms();
        let now = now_ms / 1000;
        let mut correlation = (None, 0, [0u8; NONCE_LEN]);
        let result = self
            .process(topic_client, payload, now, &mut correlation)
            .await;
        let (op, request_id, nonce) = correlation;
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
                String::new(),
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
        }
    }

    async fn sign_response(&self, response: &Response<'_>, now: u64) -> Option<Vec<u8>> {
        // Room for the largest token answer or error reason, or for the snapshot carried.
        let body_len = match &response.outcome {
            Ok(ResponseBody::Revocations { snapshot }) => snapshot.len(),
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

    async fn process(
        &self,
        topic_client: &str,
        payload: &[u8],
        now: u64,
        correlation: &mut (Option<Operation>, u64, [u8; NONCE_LEN]),
    ) -> Result<Success, Refusal> {
        if payload.len() > self.config.max_request_bytes {
            return Err(Refusal::new(
                ErrorCode::Malformed,
                format!(
                    "request is {} bytes, the limit is {}",
                    payload.len(),
                    self.config.max_request_bytes
                ),
            ));
        }
        let signed = SignedRequest::decode(payload)
            .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("not a request: {e}")))?;
        let (request_id, nonce) = signed.correlation();
        *correlation = (Some(signed.operation()), request_id, nonce);
        if signed.client() != topic_client {
            return Err(Refusal::new(
                ErrorCode::Malformed,
                format!(
                    "request names client `{}` but was sent on `{topic_client}`'s topic",
                    signed.client()
                ),
            ));
        }
        let client = self
            .store
            .client(topic_client)
            .await?
            .ok_or_else(|| Refusal::new(ErrorCode::UnknownClient, "no such client"))?;
        if client.revoked_at.is_some() {
            return Err(Refusal::new(ErrorCode::Revoked, "client is revoked"));
        }
        let request = self.authenticate(&client, signed)?;

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
        // A nonce must be remembered for as long as its request could still be fresh.
        let remember_until = request.issued_at.max(now) + window;
        if !self
            .store
            .remember_nonce(&client.id, &request.nonce, now, remember_until)
            .await?
        {
            return Err(Refusal::new(ErrorCode::Replay, "nonce already used"));
        }
        if !self
            .store
            .take_rate_token(
                &client.id,
                self.clock.now_ms(),
                self.config.rate_burst,
                self.config.rate_per_second,
            )
            .await?
        {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests per second (burst {})",
                    self.config.rate_per_second, self.config.rate_burst
                ),
            ));
        }
        let policy = self.policy.current();
        policy
            .operation(&client, request.operation())
            .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;

        match request.body {
            RequestBody::Enroll { key, .. } => self.enroll(&client, key, now).await,
            RequestBody::DeviceToken => self.device_token(&client, now).await,
            RequestBody::AccessToken { device, scope } => {
                self.access_token(&client, device, &scope, now).await
            }
            RequestBody::Refresh { grant } => self.refresh(&client, grant, now).await,
            RequestBody::Revoke(target) => self.revoke(&client, target, now).await,
            RequestBody::FetchRevocations => Ok(Success {
                body: Answer::Revocations {
                    snapshot: self.signed_snapshot(now).await?,
                },
                broadcast: Vec::new(),
                target: String::new(),
                reason: String::new(),
            }),
        }
    }

    /// Checks the request's signature with the right key: the registered one, or for an
    /// enrollment the key in the body (which must match a pre-registered key or come with
    /// a valid one-time code proof).
    fn authenticate<'a>(
        &self,
        client: &ClientRecord,
        signed: SignedRequest<'a>,
    ) -> Result<Request<'a>, Refusal> {
        let bad_sig = |e: tessera_shared::Error| {
            Refusal::new(
                ErrorCode::BadSignature,
                format!("signature check failed: {e}"),
            )
        };
        let registered = client
            .public_key
            .as_deref()
            .map(PublicKey::from_sec1)
            .transpose()
            .map_err(|_| Refusal::new(ErrorCode::Internal, "registered key is corrupt"))?;
        if let Some(key) = signed.enrollment_key() {
            if client.kind != ClientKind::Device {
                return Err(Refusal::new(ErrorCode::Denied, "only devices enroll"));
            }
            let request = signed.verify(&key).map_err(bad_sig)?;
            match (registered, &client.enrollment_code_key, &request.body) {
                (Some(reg), _, _) if reg == key => {}
                (Some(_), _, _) => {
                    return Err(Refusal::new(
                        ErrorCode::BadSignature,
                        "device is enrolled with a different key",
                    ));
                }
                (
                    None,
                    Some(code_key),
                    RequestBody::Enroll {
                        code_proof: Some(p),
                        ..
                    },
                ) => {
                    if !EnrollmentCode::check(code_key, &client.id, &key.kid(), &request.nonce, p) {
                        return Err(Refusal::new(
                            ErrorCode::Denied,
                            "enrollment code proof does not match",
                        ));
                    }
                }
                (None, Some(_), _) => {
                    return Err(Refusal::new(
                        ErrorCode::Denied,
                        "enrollment needs the one-time code proof",
                    ));
                }
                (None, None, _) => {
                    return Err(Refusal::new(
                        ErrorCode::Denied,
                        "no key and no enrollment code registered for this device",
                    ));
                }
            }
            return Ok(request);
        }
        let key = registered.ok_or_else(|| {
            Refusal::new(ErrorCode::UnknownClient, "client has not enrolled a key")
        })?;
        signed.verify(&key).map_err(bad_sig)
    }

    async fn enroll(
        &self,
        client: &ClientRecord,
        key: PublicKey,
        now: u64,
    ) -> Result<Success, Refusal> {
        self.store
            .enroll(&client.id, &key.to_sec1(), now)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => Refusal::new(ErrorCode::Denied, m),
                other => other.into(),
            })?;
        Ok(Success {
            body: Answer::Enrolled,
            broadcast: Vec::new(),
            target: client.id.clone(),
            reason: format!("enrolled key {}", hex::encode(key.kid())),
        })
    }

    async fn device_token(&self, device: &ClientRecord, now: u64) -> Result<Success, Refusal> {
        require_enrolled(device)?;
        let policy = self.policy.current();
        let grant = policy
            .device_token(device)
            .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;
        self.issue(
            device,
            TokenKind::Device,
            &grant.audience,
            &grant.scope,
            grant.lifetime_s,
            Some((grant.grant_lifetime_s, random::<16>()?)),
            now,
        )
        .await
    }

    async fn access_token(
        &self,
        app: &ClientRecord,
        device_id: &str,
        scope: &Scopes<'_>,
        now: u64,
    ) -> Result<Success, Refusal> {
        let device = self.live_device(device_id).await?;
        let policy = self.policy.current();
        let grant = policy
            .access_token(app, &device, scope)
            .map_err(|d| Refusal::new(ErrorCode::Denied, d.reason))?;
        self.issue(
            app,
            TokenKind::Access,
            &device.id,
            &grant.scope,
            grant.lifetime_s,
            Some((grant.grant_lifetime_s, random::<16>()?)),
            now,
        )
        .await
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

    async fn refresh(
        &self,
        client: &ClientRecord,
        grant: &[u8],
        now: u64,
    ) -> Result<Success, Refusal> {
        let hash = sha256(&[grant]);
        let record = match self.store.use_grant(&hash, now).await? {
            GrantUse::Fresh(r) => r,
            GrantUse::Reused(r) => {
                tracing::warn!(client = %r.client, "refresh grant reused: family revoked");
                return Err(Refusal::new(
                    ErrorCode::Revoked,
                    "refresh grant was already used: its whole family is revoked",
                ));
            }
            GrantUse::Revoked(_) => {
                return Err(Refusal::new(ErrorCode::Revoked, "refresh grant is revoked"));
            }
            GrantUse::Expired(_) => {
                return Err(Refusal::new(ErrorCode::Denied, "refresh grant has expired"));
            }
            GrantUse::Unknown => {
                return Err(Refusal::new(ErrorCode::Denied, "unknown refresh grant"));
            }
        };
        if record.client != client.id {
            // Someone else's grant: it has leaked, so its family must not live on.
            self.store.revoke_grants_of(&record.client).await?;
            return Err(Refusal::new(
                ErrorCode::Denied,
                "refresh grant belongs to another client",
            ));
        }
        // Policy may have changed since the grant was issued: decide again.
        let policy = self.policy.current();
        let (audience, scope, lifetime, grant_lifetime) = match record.kind {
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
        self.issue(
            client,
            record.kind,
            &audience,
            &scope,
            lifetime,
            Some((grant_lifetime, record.family)),
            now,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)] // each is a distinct fact about the token
    async fn issue(
        &self,
        holder: &ClientRecord,
        kind: TokenKind,
        audience: &str,
        scope: &str,
        lifetime_s: u64,
        grant: Option<(u64, [u8; 16])>,
        now: u64,
    ) -> Result<Success, Refusal> {
        let cnf = holder
            .public_key
            .as_deref()
            .map(PublicKey::from_sec1)
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| Refusal::new(ErrorCode::Denied, "client has no enrolled key"))?;
        let scopes = Scopes::parse(scope)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("policy scope: {e}")))?;
        let cti = random::<CTI_LEN>()?;
        let claims = Claims {
            iss: &self.config.hub_id,
            sub: &holder.id,
            aud: audience,
            exp: now + lifetime_s,
            nbf: None,
            iat: now,
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
            audience: audience.to_string(),
            scope: scope.to_string(),
            issued_at: now,
            expires_at: claims.exp,
        };
        let (grant_value, grant_record) = match grant {
            Some((grant_lifetime, family)) if grant_lifetime > 0 => {
                let value = random::<GRANT_LEN>()?;
                let record = GrantRecord {
                    hash: sha256(&[&value]),
                    family,
                    client: holder.id.clone(),
                    kind,
                    audience: audience.to_string(),
                    scope: scope.to_string(),
                    expires_at: now + grant_lifetime,
                    created_at: now,
                };
                (Some((value.to_vec(), record.expires_at)), Some(record))
            }
            _ => (None, None),
        };
        self.store.record_issued(issued, grant_record).await?;
        Ok(Success {
            body: Answer::Token {
                token: buf,
                grant: grant_value,
            },
            broadcast: Vec::new(),
            target: audience.to_string(),
            reason: format!(
                "{} token, scope `{scope}`, {lifetime_s} s, cti {}",
                kind.as_str(),
                hex::encode(cti)
            ),
        })
    }

    /// The longest lifetime any token can have under the current policy, plus leeway:
    /// how long a subject revocation must stay on the list.
    fn max_token_life(&self) -> u64 {
        let policy = self.policy.current();
        policy.longest_token_lifetime_s() + policy.leeway_s()
    }

    async fn revoke(
        &self,
        operator: &ClientRecord,
        target: RevokeTarget<'_>,
        now: u64,
    ) -> Result<Success, Refusal> {
        let max_life = self.max_token_life();
        let mut broadcast = Vec::new();
        let (entry, target_name) = match target {
            RevokeTarget::TokenHash(hash) => (
                Entry::Token {
                    hash,
                    expires_at: now + max_life,
                },
                format!("token {}", hex::encode(hash)),
            ),
            RevokeTarget::TokenId(cti) => {
                let issued = self.store.issued(cti).await?.ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::Denied,
                        format!("no issued token with id {}", hex::encode(cti)),
                    )
                })?;
                (
                    Entry::Token {
                        hash: issued.hash,
                        expires_at: issued.expires_at + self.policy.current().leeway_s(),
                    },
                    format!("token {}", hex::encode(cti)),
                )
            }
            RevokeTarget::Subject(subject) => {
                self.store.revoke_grants_of(subject).await?;
                (
                    subject_entry(subject, now, max_life)?,
                    format!("subject {subject}"),
                )
            }
            RevokeTarget::Device(device) => {
                let record = self
                    .store
                    .client(device)
                    .await?
                    .filter(|c| c.kind == ClientKind::Device);
                if record.is_none() {
                    return Err(Refusal::new(
                        ErrorCode::Denied,
                        format!("no device `{device}`"),
                    ));
                }
                self.store.revoke_grants_of(device).await?;
                self.store.revoke_client(device, now).await?;
                broadcast.push(self.control(device, Command::Revoked, now).await?);
                (
                    subject_entry(device, now, max_life)?,
                    format!("device {device}"),
                )
            }
        };
        // Durable before acknowledged: the response is only built after this returns.
        let seq = self
            .store
            .append_revocation(vec![entry.clone()], now)
            .await?;
        broadcast.insert(0, self.delta(seq, &[entry], now).await?);
        broadcast.push(Publication {
            topic: topic::REVOCATION_SNAPSHOT.to_string(),
            payload: self.signed_snapshot(now).await?,
            retain: true,
        });
        Ok(Success {
            body: Answer::Revoked { seq },
            broadcast,
            target: target_name,
            reason: format!("revoked by {} at seq {seq}", operator.id),
        })
    }

    /// A signed control message for one device.
    pub async fn control(
        &self,
        device: &str,
        command: Command,
        now: u64,
    ) -> Result<Publication, Refusal> {
        let msg = Control {
            device,
            command,
            issued_at: now,
        };
        let mut out = vec![0u8; 512];
        let n = {
            let keys = self.keys.read().await;
            msg.sign(keys.active(now), &mut out)
                .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?
        };
        out.truncate(n);
        Ok(Publication {
            topic: topic::control(device)
                .map_err(|_| Refusal::new(ErrorCode::Denied, "invalid device id"))?
                .to_string(),
            payload: out,
            retain: false,
        })
    }

    /// A signed delta carrying `entries` at `seq`.
    pub async fn delta(
        &self,
        seq: u64,
        entries: &[Entry],
        now: u64,
    ) -> Result<Publication, Refusal> {
        let mut payload = vec![0u8; revocation::max_payload_len(entries.len())];
        let n = revocation::encode_delta(seq, now, entries, &mut payload)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot encode delta: {e}")))?;
        payload.truncate(n);
        Ok(Publication {
            topic: topic::REVOCATION_DELTA.to_string(),
            payload: self.sign_payload(&payload, now).await?,
            retain: false,
        })
    }

    /// The signed revocation snapshot as of `now`.
    pub async fn signed_snapshot(&self, now: u64) -> Result<Vec<u8>, Refusal> {
        let leeway = self.policy.current().leeway_s();
        let (seq, entries) = self.store.revocation_snapshot(now, leeway).await?;
        self.sign_snapshot(seq, &entries, now).await
    }

    /// The signed snapshot and a signed heartbeat naming the same sequence number, from
    /// one read of the store (what every heartbeat publishes).
    pub async fn signed_snapshot_and_heartbeat(
        &self,
        now: u64,
    ) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
        let leeway = self.policy.current().leeway_s();
        let (seq, entries) = self.store.revocation_snapshot(now, leeway).await?;
        let snapshot = self.sign_snapshot(seq, &entries, now).await?;
        let mut payload = [0u8; 64];
        let n = revocation::encode_heartbeat(seq, now, &mut payload).map_err(|e| {
            Refusal::new(ErrorCode::Internal, format!("cannot encode heartbeat: {e}"))
        })?;
        Ok((snapshot, self.sign_payload(&payload[..n], now).await?))
    }

    async fn sign_snapshot(
        &self,
        seq: u64,
        entries: &[Entry],
        now: u64,
    ) -> Result<Vec<u8>, Refusal> {
        let mut payload = vec![0u8; revocation::max_payload_len(entries.len())];
        let n = revocation::encode_snapshot(seq, now, entries, &mut payload).map_err(|e| {
            Refusal::new(ErrorCode::Internal, format!("cannot encode snapshot: {e}"))
        })?;
        payload.truncate(n);
        self.sign_payload(&payload, now).await
    }

    async fn sign_payload(&self, payload: &[u8], now: u64) -> Result<Vec<u8>, Refusal> {
        let mut out = vec![0u8; payload.len() + tessera_shared::cose::OVERHEAD];
        let keys = self.keys.read().await;
        let n = tessera_shared::cose::sign(keys.active(now), payload, &mut out)
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("cannot sign: {e}")))?;
        out.truncate(n);
        Ok(out)
    }

    /// Marks a revocation delta published once it has come back from the broker: the
    /// hub subscribes to its own delta topic, so seeing a delta there proves the broker
    /// took it (a publish that was only queued when the hub died or the connection
    /// dropped is sent again). Anything not signed by the hub is ignored.
    pub async fn confirm_delta(&self, signed: &[u8]) {
        let now = self.clock.now();
        let seq = {
            let keys = self.keys.read().await;
            let Ok(set) = keys.keyset(0, now) else { return };
            let Ok(payload) =
                tessera_shared::cose::Sign1::decode(signed).and_then(|m| m.verify(&set))
            else {
                tracing::warn!("ignoring a revocation delta the hub did not sign");
                return;
            };
            match revocation::Delta::decode(payload) {
                Ok(delta) => delta.seq(),
                Err(_) => return,
            }
        };
        if let Err(e) = self.store.mark_published(seq).await {
            tracing::error!(seq, error = %e, "cannot mark revocation published");
        }
    }

    /// Revocations recorded but not yet broadcast (after a crash or restart), as signed
    /// deltas to publish again.
    pub async fn pending_broadcasts(&self) -> Result<Vec<Publication>, Refusal> {
        let mut out = Vec::new();
        for rec in self.store.unpublished_revocations().await? {
            out.push(self.delta(rec.seq, &rec.entries, rec.created_at).await?);
        }
        Ok(out)
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

fn subject_entry(subject: &str, now: u64, max_life: u64) -> Result<Entry, Refusal> {
    // `issued_before` is exclusive: everything issued up to and including this second.
    Entry::for_subject(subject, now + 1, now + 1 + max_life)
        .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("subject: {e}")))
}
