//! Access tokens for a control app: obtained from the hub, cached per device and scope,
//! renewed through the refresh grant that came with them before they expire (the core's
//! schedule, [`tessera_shared::schedule::refresh_at`]), and presented to a device with
//! proof of possession (PROTOCOL.md §13).

use tessera_shared::crypto::Signer;
use tessera_shared::message::{MAX_PRESENTATION_LEN, NONCE_LEN, Presentation, RequestBody};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};

use crate::{Answer, Client, ClientError};

/// An access token the hub issued to this app for one device, with what renewing it takes.
/// Its `Debug` output shows neither the token nor the refresh grant.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    token: Vec<u8>,
    device: String,
    scope: String,
    issued_at: u64,
    expires_at: u64,
    /// When to renew it, hub time in Unix milliseconds.
    refresh_at_ms: u64,
    /// The refresh grant that came with it, and when that expires (Unix seconds).
    grant: Option<(Vec<u8>, u64)>,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("device", &self.device)
            .field("scope", &self.scope)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("has_grant", &self.grant.is_some())
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// The token's bytes (a CWT, PROTOCOL.md §6), for [`present`] or to hand to a service.
    pub fn bytes(&self) -> &[u8] {
        &self.token
    }

    /// The device it is for (its audience).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The scopes asked for, as given.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// When the hub issued it, Unix seconds.
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// When it expires, Unix seconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// The token hash an operator revokes it by (PROTOCOL.md §6.6).
    pub fn hash(&self) -> [u8; 32] {
        tessera_shared::revocation::token_hash(&self.token)
    }

    /// Checks the hub's answer: a token for `device` that verifies with the hub's keys at
    /// `now_ms` (hub time), with its renewal time drawn from `jitter`.
    fn from_answer(
        answer: Answer,
        device: &str,
        scope: &str,
        keys: &tessera_shared::keyset::KeySet,
        now_ms: u64,
        jitter: u32,
    ) -> Result<Self, ClientError> {
        let Answer::Token { token, grant } = answer else {
            return Err(ClientError::Unexpected(format!(
                "a token was asked for, the hub answered {answer:?}"
            )));
        };
        let verified = token::verify(&token, keys, &Validation::new(now_ms / 1000, device))
            .map_err(ClientError::Core)?;
        let claims = verified.claims();
        let (issued_at, expires_at) = (claims.iat, claims.exp);
        let refresh_at_ms = tessera_shared::schedule::refresh_at(
            issued_at.saturating_mul(1000),
            expires_at.saturating_mul(1000),
            jitter,
        );
        Ok(Self {
            token,
            device: device.to_owned(),
            scope: scope.to_owned(),
            issued_at,
            expires_at,
            refresh_at_ms,
            grant,
        })
    }
}

/// Signs a presentation of `token` to `device` with the app's key `holder` (the key the
/// token's `cnf` names) at `issued_at` (Unix seconds, the device's idea of now), with a
/// fresh nonce: the bytes the app sends the device with its command, which the device's
/// agent checks (PROTOCOL.md §13).
pub fn present(
    holder: &dyn Signer,
    token: &[u8],
    device: &str,
    issued_at: u64,
) -> Result<Vec<u8>, ClientError> {
    // A fresh nonce per presentation: the device refuses one it has accepted before.
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| ClientError::Random(e.to_string()))?;
    let presentation = Presentation {
        token,
        audience: device,
        issued_at,
        nonce,
    };
    let mut out = vec![0u8; MAX_PRESENTATION_LEN];
    let n = presentation
        .sign(holder, &mut out)
        .map_err(ClientError::Core)?;
    out.truncate(n);
    Ok(out)
}

impl Client {
    /// An access token for `device` with `scope` (space-separated scopes, as the policy
    /// names them): the cached one while it is before its renewal time; else renewed with
    /// its refresh grant; else (no grant, or the hub refused it) asked for afresh. When the
    /// hub does not answer in time, a cached token still valid is returned as it is, and
    /// renewal is tried again at the next call.
    pub async fn access_token(
        &mut self,
        device: &str,
        scope: &str,
    ) -> Result<AccessToken, ClientError> {
        if let Some(cached) = self.tokens.get(&(device.to_owned(), scope.to_owned()))
            && self.hub_now_ms() < cached.refresh_at_ms
        {
            return Ok(cached.clone());
        }
        self.renew(device, scope).await
    }

    /// Renews the access token for `device` and `scope` now, as [`Client::access_token`]
    /// does once the one held is due: through its refresh grant, else afresh. For an app
    /// that learns its token is no longer accepted before the schedule says so.
    pub async fn renew(&mut self, device: &str, scope: &str) -> Result<AccessToken, ClientError> {
        tessera_shared::message::validate_id(device).map_err(ClientError::Core)?;
        let scopes = Scopes::parse(scope).map_err(ClientError::Core)?;
        let key = (device.to_owned(), scope.to_owned());
        let now_ms = self.hub_now_ms();
        let cached = self.tokens.remove(&key);
        let grant = cached
            .as_ref()
            .and_then(|t| t.grant.as_ref())
            .filter(|(_, expires)| now_ms / 1000 < *expires)
            .map(|(g, _)| g.clone());
        let timeout = self.timeout;
        let mut answer = None;
        if let Some(grant) = grant {
            match self
                .request(RequestBody::Refresh { grant: &grant }, timeout)
                .await
            {
                Ok(a) => answer = Some(a),
                // The grant is gone (used, expired, revoked): ask afresh below.
                Err(ClientError::Refused { code, reason }) => {
                    tracing::debug!(%code, reason, "refresh refused; asking for a new token");
                }
                Err(e) => return self.keep_or_fail(key, cached, now_ms, e),
            }
        }
        let answer = match answer {
            Some(a) => a,
            None => match self
                .request(
                    RequestBody::AccessToken {
                        device,
                        scope: scopes,
                    },
                    timeout,
                )
                .await
            {
                Ok(a) => a,
                Err(e @ ClientError::Refused { .. }) => return Err(e),
                Err(e) => return self.keep_or_fail(key, cached, now_ms, e),
            },
        };
        let mut jitter = [0u8; 4];
        getrandom::fill(&mut jitter).map_err(|e| ClientError::Random(e.to_string()))?;
        let token = AccessToken::from_answer(
            answer,
            device,
            scope,
            &self.keys,
            self.hub_now_ms(),
            u32::from_be_bytes(jitter),
        )?;
        self.tokens.insert(key, token.clone());
        Ok(token)
    }

    /// After a renewal without an answer: the cached token if it is still valid (kept for
    /// the next call to renew), else the error.
    fn keep_or_fail(
        &mut self,
        key: (String, String),
        cached: Option<AccessToken>,
        now_ms: u64,
        error: ClientError,
    ) -> Result<AccessToken, ClientError> {
        match cached {
            Some(t) if now_ms / 1000 < t.expires_at => {
                tracing::warn!(error = %error, "cannot renew the access token yet; using the one held");
                self.tokens.insert(key, t.clone());
                Ok(t)
            }
            _ => Err(error),
        }
    }

    /// [`present`] with this client's key, at the hub's time as this client knows it.
    pub fn present(&self, token: &AccessToken) -> Result<Vec<u8>, ClientError> {
        present(
            &self.signer,
            &token.token,
            &token.device,
            self.hub_now_ms() / 1000,
        )
    }
}
