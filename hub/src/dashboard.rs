//! The operator dashboard: a read-only web page on the hub's HTTP listener
//! ([`crate::http`]), off unless `[http.dashboard]` is configured.
//!
//! - **Credential.** Operators are registered clients; a browser cannot sign requests
//!   with their keys, so each operator may be given a dashboard password:
//!   `tessera-hub dashboard-password OPERATOR` draws 32 random bytes, prints them once in
//!   hex and keeps only their SHA-256 in the passwords file ([`set_password`]). A
//!   password this random needs no slow hash: nobody can guess it from its SHA-256.
//! - **Login.** HTTP Basic on the page (`/dashboard`): the browser asks, then sends the
//!   operator id and password; a good pair opens a session, an HttpOnly,
//!   SameSite=Strict cookie that expires after `session_s`. Comparisons are constant-time;
//!   the session map is keyed by the SHA-256 of the cookie value, so a lookup's timing
//!   says nothing about a valid one.
//! - **Every request checks again** that the operator is still registered, an operator,
//!   not revoked, allowed to `watch` under the current policy, and holds the password
//!   the session was opened with: revoking an operator, changing its role or its
//!   password ends its sessions at once.
//! - **Read-only.** Only `GET`s, which change nothing but the session map: there is no
//!   state change for a cross-site request to forge.
//!
//! The page (`hub/src/dashboard/`) is self-contained: inline CSS and JavaScript, charts in
//! SVG, no external resource; a Content-Security-Policy allows only those exact inline
//! blocks (by hash) and requests to the hub itself. It polls
//! `/dashboard/api/overview` and, for the device search, `/dashboard/api/device?id=`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::config::DashboardSection;
use crate::metrics::{KindLabels, Metrics, RefusalLabels, RequestLabels};
use crate::pipeline::Hub;
use crate::rng::Rng;
use crate::store::{AuditEvent, AuditFilter, ClientKind, ClientRecord, IssuedToken, Store};

/// The session cookie's name.
pub const COOKIE: &str = "tessera_dashboard";
/// Random bytes in a dashboard password (printed as twice as many hex digits).
pub const PASSWORD_BYTES: usize = 32;
/// Sessions held at once at most; a login beyond ends the one closest to expiring.
pub const MAX_SESSIONS: usize = 1024;
/// Chart points kept: ten minutes at one every [`SAMPLE_EVERY`].
const SAMPLES: usize = 300;
/// How often the issuance and refusal counters are sampled for the charts.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// The fleet overview reads every client and its tokens: viewers share one reading at
/// most this old, so any number of open dashboards cost one reading per interval.
const FLEET_MAX_AGE_MS: u64 = 5_000;
/// Recent revocations and alerts shown.
const RECENT: usize = 20;
/// Audit events shown for one device.
const DEVICE_EVENTS: usize = 50;
/// The realm the browser shows when it asks for the operator id and password.
const REALM: &str = "Basic realm=\"tessera-hub dashboard\", charset=\"UTF-8\"";
/// What a dashboard password hash is over, before the password.
const HASH_CONTEXT: &[u8] = b"tessera-dashboard-v1";

const PAGE: &str = include_str!("dashboard/index.html");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// Why a dashboard password could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// I/O on the passwords file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of the passwords file is not `OPERATOR SHA256-HEX`.
    #[error(
        "{path} line {line}: not `OPERATOR SHA256-HEX` (rewrite it with `tessera-hub dashboard-password`)"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
    },
    /// The random number generator failed.
    #[error("random number generator: {0}")]
    Random(String),
}

/// A new dashboard password: [`PASSWORD_BYTES`] random bytes in hex.
pub fn new_password(rng: &dyn Rng) -> Result<String, DashboardError> {
    let mut bytes = zeroize::Zeroizing::new([0u8; PASSWORD_BYTES]);
    rng.fill(bytes.as_mut())
        .map_err(|e| DashboardError::Random(e.to_string()))?;
    Ok(hex::encode(bytes.as_ref()))
}

/// What the passwords file keeps of a password.
pub fn password_hash(password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_CONTEXT);
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Every `(operator, hash)` of the passwords file; none if it does not exist.
fn read_passwords(path: &Path) -> Result<Vec<(String, [u8; 32])>, DashboardError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DashboardError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let format = || DashboardError::Format {
            path: path.to_path_buf(),
            line: n + 1,
        };
        let (id, hash) = line.split_once(' ').ok_or_else(format)?;
        let mut h = [0u8; 32];
        hex::decode_to_slice(hash.trim(), &mut h).map_err(|_| format())?;
        out.push((id.to_owned(), h));
    }
    Ok(out)
}

/// The hash kept for `operator`, if any.
fn stored_hash(path: &Path, operator: &str) -> Result<Option<[u8; 32]>, DashboardError> {
    Ok(read_passwords(path)?
        .into_iter()
        .find(|(id, _)| id == operator)
        .map(|(_, h)| h))
}

/// Sets (`Some`) or removes (`None`) `operator`'s password in the passwords file,
/// replacing the one it had; the file is rewritten whole (a temporary file, mode 0600,
/// synced, then renamed over it). Returns whether the operator had one. The hub reads
/// the file at each request: no restart needed, and sessions opened with the old
/// password end.
pub fn set_password(
    path: &Path,
    operator: &str,
    password: Option<&str>,
) -> Result<bool, DashboardError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DashboardError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries = read_passwords(path)?;
    let had = entries.iter().any(|(id, _)| id == operator);
    entries.retain(|(id, _)| id != operator);
    if let Some(p) = password {
        entries.push((operator.to_owned(), password_hash(p)));
    }
    let mut text = String::from(
        "# tessera-hub dashboard passwords: OPERATOR SHA256-HEX per line.\n\
         # Written by `tessera-hub dashboard-password`; the passwords themselves are not kept.\n",
    );
    for (id, h) in &entries {
        text.push_str(&format!("{id} {}\n", hex::encode(h)));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(had)
}

/// Whether two hashes are equal, in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Which quarantines are in force: the serving loop's anomaly detector.
pub trait QuarantineList: Send + Sync {
    /// `(client, until Unix ms)` of every quarantine in force at `now_ms`, by client.
    fn quarantines(&self, now_ms: u64) -> Vec<(String, u64)>;
}

/// No quarantines (a hub without the serving loop's detector, in tests).
impl QuarantineList for () {
    fn quarantines(&self, _now_ms: u64) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// Why a dashboard request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// 401: no credential, a wrong one, or a session that ended; log in (again).
    Unauthorized(String),
    /// 403: the operator authenticated but may not watch (any more).
    Forbidden(String),
    /// 500: the passwords file or the store cannot be read.
    Internal(String),
}

impl Refused {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reason(&self) -> &str {
        match self {
            Self::Unauthorized(r) | Self::Forbidden(r) | Self::Internal(r) => r,
        }
    }
}

/// A logged-in operator.
#[derive(Debug, Clone)]
struct Session {
    operator: String,
    /// The password hash it logged in with: a changed password ends the session.
    password: [u8; 32],
    expires_ms: u64,
}

/// Who a request is from, once authenticated.
#[derive(Debug)]
pub struct Viewer {
    /// The operator.
    pub operator: String,
    /// A new session's cookie value, to set in the answer.
    new_session: Option<String>,
}

/// One sample of the counters behind the charts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sample {
    at_ms: u64,
    issued: u64,
    refused: u64,
}

/// The fleet as last read from the store.
#[derive(Debug, Clone, Default)]
struct Fleet {
    at_ms: u64,
    devices: u64,
    enrolled: u64,
    revoked_devices: u64,
    apps: u64,
    operators: u64,
    device_tokens: u64,
    access_tokens: u64,
    revocation_entries: u64,
}

/// The dashboard's state: its settings, sessions and chart samples.
pub struct Dashboard<S: Store> {
    hub: Arc<Hub<S>>,
    quarantines: Arc<dyn QuarantineList>,
    passwords: PathBuf,
    session_ms: u64,
    sessions: std::sync::Mutex<HashMap<[u8; 32], Session>>,
    samples: std::sync::Mutex<VecDeque<Sample>>,
    fleet: tokio::sync::Mutex<Option<Fleet>>,
    page: String,
    csp: String,
}

impl<S: Store> std::fmt::Debug for Dashboard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("passwords", &self.passwords)
            .field("session_ms", &self.session_ms)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Dashboard<S> {
    /// The dashboard of `hub`, configured by `config`, showing the quarantines of
    /// `quarantines`.
    pub fn new(
        hub: Arc<Hub<S>>,
        config: &DashboardSection,
        quarantines: Arc<dyn QuarantineList>,
    ) -> Self {
        let page = PAGE
            .replace("/*STYLE*/", STYLE)
            .replace("/*SCRIPT*/", SCRIPT);
        let csp = format!(
            "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            base64(&Sha256::digest(STYLE.as_bytes())),
            base64(&Sha256::digest(SCRIPT.as_bytes())),
        );
        Self {
            hub,
            quarantines,
            passwords: config.passwords.clone(),
            session_ms: config.session_s.saturating_mul(1000),
            sessions: std::sync::Mutex::new(HashMap::new()),
            samples: std::sync::Mutex::new(VecDeque::new()),
            fleet: tokio::sync::Mutex::new(None),
            page,
            csp,
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Authenticates a request by its session cookie or, failing that, its Basic
    /// credentials (then opening a session if `open_session`: the page does, the JSON
    /// routes do not, so a script calling them with Basic credentials does not fill the
    /// session table), and checks that the operator may watch.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        open_session: bool,
    ) -> Result<Viewer, Refused> {
        let now_ms = self.hub.clock.now_ms();
        let mut ended = None;
        if let Some(cookie) = session_cookie(headers) {
            let key: [u8; 32] = Sha256::digest(cookie.as_bytes()).into();
            // The lock is let go before anything waits.
            let found = {
                let mut sessions = self.sessions();
                match sessions.get(&key).cloned() {
                    Some(s) if s.expires_ms > now_ms => Ok(s),
                    Some(_) => {
                        sessions.remove(&key);
                        Err("the session has expired: log in again")
                    }
                    None => Err("unknown session (the hub restarted?): log in again"),
                }
            };
            match found {
                Ok(s) => {
                    self.check_operator(&s.operator, &s.password).await?;
                    return Ok(Viewer {
                        operator: s.operator,
                        new_session: None,
                    });
                }
                Err(why) => ended = Some(why),
            }
        }
        let Some(basic) = headers.get(header::AUTHORIZATION) else {
            return Err(Refused::Unauthorized(
                ended
                    .unwrap_or(
                        "log in with your operator id and dashboard password \
                         (`tessera-hub dashboard-password OPERATOR` makes one)",
                    )
                    .to_owned(),
            ));
        };
        let (operator, password) = basic_credentials(basic).ok_or_else(|| {
            Refused::Unauthorized(
                "malformed Authorization header: expected Basic credentials".to_owned(),
            )
        })?;
        let given = password_hash(&password);
        let stored = stored_hash(&self.passwords, &operator)
            .map_err(|e| Refused::Internal(format!("cannot read dashboard passwords: {e}")))?;
        // Compared either way, so an unknown operator takes as long as a wrong password.
        let matches = same(&given, &stored.unwrap_or([0; 32])) && stored.is_some();
        if !matches {
            tracing::info!(
                operator,
                "dashboard login refused: wrong operator id or password"
            );
            return Err(Refused::Unauthorized(
                "wrong operator id or dashboard password".to_owned(),
            ));
        }
        self.check_operator(&operator, &given).await?;
        if !open_session {
            return Ok(Viewer {
                operator,
                new_session: None,
            });
        }
        let mut token = [0u8; 32];
        self.hub
            .rng
            .fill(&mut token)
            .map_err(|e| Refused::Internal(format!("random number generator: {e}")))?;
        let token = hex::encode(token);
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let mut sessions = self.sessions();
            sessions.retain(|_, s| s.expires_ms > now_ms);
            if sessions.len() >= MAX_SESSIONS
                && let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.expires_ms)
                    .map(|(k, _)| *k)
            {
                sessions.remove(&oldest);
            }
            sessions.insert(
                key,
                Session {
                    operator: operator.clone(),
                    password: given,
                    expires_ms: now_ms.saturating_add(self.session_ms),
                },
            );
        }
        tracing::info!(operator, "dashboard login");
        Ok(Viewer {
            operator,
            new_session: Some(token),
        })
    }

    /// Whether `operator`, holding the password hashed `password`, may watch now.
    async fn check_operator(&self, operator: &str, password: &[u8; 32]) -> Result<(), Refused> {
        let stored = stored_hash(&self.passwords, operator)
            .map_err(|e| Refused::Internal(format!("cannot read dashboard passwords: {e}")))?;
        if !stored.is_some_and(|s| same(&s, password)) {
            return Err(Refused::Unauthorized(format!(
                "the dashboard password of operator {operator:?} was changed or removed: \
                 log in again"
            )));
        }
        let client = self
            .hub
            .store
            .client(operator)
            .await
            .map_err(|e| Refused::Internal(format!("cannot read the registry: {e}")))?
            .ok_or_else(|| {
                Refused::Forbidden(format!("operator {operator:?} is no longer registered"))
            })?;
        if client.kind != ClientKind::Operator {
            return Err(Refused::Forbidden(format!(
                "client {operator:?} is {}, not an operator",
                client.kind.as_str()
            )));
        }
        if client.revoked_at.is_some() {
            return Err(Refused::Forbidden(format!(
                "operator {operator:?} is revoked"
            )));
        }
        self.hub
            .policy
            .current()
            .watch(&client)
            .map_err(|d| Refused::Forbidden(d.reason))
    }

    /// Takes one sample of the counters behind the charts.
    pub fn sample(&self) {
        let (issued, refused) = totals(&self.hub.metrics);
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if samples.len() >= SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample {
            at_ms: self.hub.clock.now_ms(),
            issued,
            refused,
        });
    }

    /// Samples every [`SAMPLE_EVERY`] until `stop` completes.
    pub async fn sampling(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(),
                () = &mut stop => return,
            }
        }
    }

    /// The fleet, read again if the last reading is older than [`FLEET_MAX_AGE_MS`].
    async fn fleet(&self, now_ms: u64) -> Result<Fleet, Refused> {
        let mut cached = self.fleet.lock().await;
        if let Some(f) = cached.as_ref()
            && now_ms.saturating_sub(f.at_ms) < FLEET_MAX_AGE_MS
            && f.at_ms <= now_ms
        {
            return Ok(f.clone());
        }
        let store = &self.hub.store;
        let now = now_ms / 1000;
        let failed = |e: crate::store::StoreError| Refused::Internal(format!("store: {e}"));
        let clients = store.clients(None).await.map_err(failed)?;
        let mut f = Fleet {
            at_ms: now_ms,
            ..Fleet::default()
        };
        for c in &clients {
            match c.kind {
                ClientKind::Device => {
                    f.devices += 1;
                    if c.revoked_at.is_some() {
                        f.revoked_devices += 1;
                    } else if c.enrolled_at.is_some() {
                        f.enrolled += 1;
                    }
                }
                ClientKind::App => f.apps += 1,
                ClientKind::Operator => f.operators += 1,
            }
            // A client revoked whole has every token revoked.
            if c.revoked_at.is_some() || c.kind == ClientKind::Operator {
                continue;
            }
            for t in store.issued_to(&c.id, now).await.map_err(failed)? {
                match t.kind {
                    crate::store::TokenKind::Device => f.device_tokens += 1,
                    crate::store::TokenKind::Access => f.access_tokens += 1,
                }
            }
        }
        f.revocation_entries = store
            .revocation_entries(now, tessera_shared::revocation::MAX_LEEWAY)
            .await
            .map_err(failed)?;
        *cached = Some(f.clone());
        Ok(f)
    }

    /// The overview the page polls.
    pub async fn overview(&self, viewer: &Viewer) -> Result<Value, Refused> {
        let now_ms = self.hub.clock.now_ms();
        let fleet = self.fleet(now_ms).await?;
        let failed = |e: crate::store::StoreError| Refused::Internal(format!("store: {e}"));
        let recent = |action: &str| AuditFilter {
            action: Some(action.to_owned()),
            ..AuditFilter::tail(RECENT)
        };
        let mut revocations = self
            .hub
            .store
            .audit_query(&recent("revoke"))
            .await
            .map_err(failed)?;
        revocations.extend(
            self.hub
                .store
                .audit_query(&recent(crate::policy_change::POLICY_REVOKE))
                .await
                .map_err(failed)?,
        );
        revocations.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
        revocations.truncate(RECENT);
        let mut alerts = self
            .hub
            .store
            .audit_query(&recent("alert"))
            .await
            .map_err(failed)?;
        alerts.reverse();
        let last_heartbeat = u64::try_from(self.hub.metrics.last_heartbeat.get()).unwrap_or(0);
        let heartbeat_s = self.hub.config.heartbeat_s;
        let heartbeat_age =
            (last_heartbeat > 0).then(|| (now_ms / 1000).saturating_sub(last_heartbeat));
        let (issued, refused) = totals(&self.hub.metrics);
        let series: Vec<Value> = {
            let samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            samples
                .iter()
                .zip(samples.iter().skip(1))
                .map(|(a, b)| {
                    json!({
                        "at_ms": b.at_ms,
                        "issued": b.issued.saturating_sub(a.issued),
                        "refused": b.refused.saturating_sub(a.refused),
                    })
                })
                .collect()
        };
        let quarantines: Vec<Value> = self
            .quarantines
            .quarantines(now_ms)
            .into_iter()
            .map(|(client, until_ms)| json!({ "client": client, "until_ms": until_ms }))
            .collect();
        Ok(json!({
            "now_ms": now_ms,
            "operator": viewer.operator,
            "hub_id": self.hub.config.hub_id,
            "fleet": {
                "read_at_ms": fleet.at_ms,
                "devices": fleet.devices,
                "enrolled": fleet.enrolled,
                "revoked_devices": fleet.revoked_devices,
                "apps": fleet.apps,
                "operators": fleet.operators,
                "tokens_live": {
                    "device": fleet.device_tokens,
                    "access": fleet.access_tokens,
                },
            },
            "revocation": {
                "entries": fleet.revocation_entries,
                "last_heartbeat_s": (last_heartbeat > 0).then_some(last_heartbeat),
                "heartbeat_age_s": heartbeat_age,
                "heartbeat_s": heartbeat_s,
                // Verifiers count their knowledge stale past two or three heartbeats.
                "fresh": heartbeat_age.is_some_and(|a| a <= 2 * heartbeat_s),
            },
            "totals": { "issued": issued, "refused": refused },
            "sample_s": SAMPLE_EVERY.as_secs(),
            "series": series,
            "revocations": revocations.iter().map(event_json).collect::<Vec<_>>(),
            "alerts": alerts.iter().map(event_json).collect::<Vec<_>>(),
            "quarantines": quarantines,
        }))
    }

    /// One device's (or any client's) history: its registry record, live tokens,
    /// revocations and audit events.
    pub async fn device(&self, id: &str) -> Result<(StatusCode, Value), Refused> {
        if tessera_shared::message::validate_id(id).is_err() {
            return Ok((
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("{id:?} is not a valid client id") }),
            ));
        }
        let now_ms = self.hub.clock.now_ms();
        let now = now_ms / 1000;
        let store = &self.hub.store;
        let failed = |e: crate::store::StoreError| Refused::Internal(format!("store: {e}"));
        let record = store.client(id).await.map_err(failed)?;
        let tokens = store.issued_to(id, now).await.map_err(failed)?;
        let access_for = store.issued_for(id, now).await.map_err(failed)?;
        let revocations = store
            .audit_query(&AuditFilter {
                target: Some(id.to_owned()),
                action: Some("revoke".to_owned()),
                ..AuditFilter::tail(RECENT)
            })
            .await
            .map_err(failed)?;
        let mut events = store
            .audit_query(&AuditFilter {
                target: Some(id.to_owned()),
                ..AuditFilter::tail(DEVICE_EVENTS)
            })
            .await
            .map_err(failed)?;
        events.extend(
            store
                .audit_query(&AuditFilter {
                    actor: Some(id.to_owned()),
                    ..AuditFilter::tail(DEVICE_EVENTS)
                })
                .await
                .map_err(failed)?,
        );
        events.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
        events.dedup();
        events.truncate(DEVICE_EVENTS);
        // Tokens of a subject revoked whole are revoked, expired or not; so are those
        // for a device revoked whole (its enrollment is gone).
        let mut revoked_whole: Vec<String> = Vec::new();
        for t in tokens.iter().chain(&access_for) {
            for who in [&t.subject, &t.audience] {
                if revoked_whole.contains(who) {
                    continue;
                }
                if who == id {
                    if record.as_ref().is_some_and(|r| r.revoked_at.is_some()) {
                        revoked_whole.push(who.clone());
                    }
                } else if store
                    .client(who)
                    .await
                    .map_err(failed)?
                    .is_some_and(|c| c.revoked_at.is_some())
                {
                    revoked_whole.push(who.clone());
                }
            }
        }
        let quarantined_until = self
            .quarantines
            .quarantines(now_ms)
            .into_iter()
            .find(|(c, _)| c == id)
            .map(|(_, until)| until);
        Ok((
            StatusCode::OK,
            json!({
                "id": id,
                "found": record.is_some(),
                "record": record.as_ref().map(record_json),
                "quarantined_until_ms": quarantined_until,
                "tokens": tokens.iter().map(|t| token_json(t, &revoked_whole)).collect::<Vec<_>>(),
                "access_tokens_for_it": access_for
                    .iter()
                    .map(|t| token_json(t, &revoked_whole))
                    .collect::<Vec<_>>(),
                "revocations": revocations.iter().rev().map(event_json).collect::<Vec<_>>(),
                "events": events.iter().map(event_json).collect::<Vec<_>>(),
            }),
        ))
    }
}

/// Tokens issued (device and access) and requests refused (by the pipeline or before
/// it), since the hub started.
fn totals(metrics: &Metrics) -> (u64, u64) {
    let mut issued = 0;
    for kind in ["device", "access"] {
        if let Some(c) = metrics.tokens_issued.get(&KindLabels { kind }) {
            issued += c.get();
        }
    }
    let mut refused = 0;
    let mut codes = Vec::new();
    for n in 0..64 {
        if let Some(code) = tessera_shared::message::ErrorCode::from_u64(n) {
            codes.push(code.name());
        }
    }
    let mut operations = vec!["unknown"];
    for n in 0..64 {
        if let Some(op) = tessera_shared::message::Operation::from_u64(n) {
            operations.push(op.name());
        }
    }
    for operation in operations {
        for &outcome in &codes {
            if let Some(c) = metrics.requests.get(&RequestLabels { operation, outcome }) {
                refused += c.get();
            }
        }
    }
    for code in ["overloaded", "rate_limited", "quarantined"] {
        for result in ["answered", "dropped"] {
            if let Some(c) = metrics
                .admission_refusals
                .get(&RefusalLabels { code, result })
            {
                refused += c.get();
            }
        }
    }
    (issued, refused)
}

fn event_json(e: &AuditEvent) -> Value {
    json!({
        "at_ms": e.at_ms,
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "reason": e.reason,
        "count": e.count,
    })
}

/// A token as the device view shows it; `revoked_whole` lists the clients revoked whole.
fn token_json(t: &IssuedToken, revoked_whole: &[String]) -> Value {
    json!({
        "revoked_with_client": revoked_whole.contains(&t.subject)
            || revoked_whole.contains(&t.audience),
        "cti": hex::encode(t.cti),
        "kind": t.kind.as_str(),
        "subject": t.subject,
        "audience": t.audience,
        "scope": t.scope,
        "issued_at": t.issued_at,
        "expires_at": t.expires_at,
    })
}

fn record_json(c: &ClientRecord) -> Value {
    json!({
        "id": c.id,
        "kind": c.kind.as_str(),
        "role": c.role,
        "groups": c.groups,
        "has_key": c.public_key.is_some(),
        "awaiting_enrollment_code": c.enrollment_code_key.is_some(),
        "enrolled_at": c.enrolled_at,
        "revoked_at": c.revoked_at,
        "created_at": c.created_at,
    })
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// `(user, password)` of a `Basic` Authorization header.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (CSP hashes).
fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = BASE64.iter().position(|b| *b == c)?;
        acc = acc << 6 | u32::try_from(v).ok()?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits & 0xff).ok()?);
        }
    }
    // A lone 6 bits cannot end a valid encoding.
    (bits < 6).then_some(out)
}

/// The dashboard's routes, under `/dashboard`.
pub fn router<S: Store>(dashboard: Arc<Dashboard<S>>) -> Router {
    Router::new()
        .route("/dashboard", get(page::<S>))
        .route("/dashboard/api/overview", get(overview::<S>))
        .route("/dashboard/api/device", get(device::<S>))
        .with_state(dashboard)
}

/// Headers every dashboard answer carries: nothing cached, nothing framed or sniffed.
fn guarded(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn with_session<S: Store>(dashboard: &Dashboard<S>, viewer: &Viewer, mut r: Response) -> Response {
    if let Some(token) = &viewer.new_session {
        let cookie = format!(
            "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age={}",
            dashboard.session_ms / 1000
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

/// A refusal as the page shows it: the reason in plain text; a 401 asks the browser
/// for the operator id and password.
fn refused_page(refused: &Refused) -> Response {
    let mut r = (
        refused.status(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "{} {}: {}\n",
            refused.status().as_u16(),
            refused.status().canonical_reason().unwrap_or(""),
            refused.reason()
        ),
    )
        .into_response();
    if matches!(refused, Refused::Unauthorized(_)) {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
    }
    guarded(r)
}

/// A JSON answer (axum's `json` feature is off in this build).
trait IntoJson {
    fn into_json(self) -> Response;
}

impl IntoJson for (StatusCode, Value) {
    fn into_json(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "application/json")],
            self.1.to_string(),
        )
            .into_response()
    }
}

/// A refusal of an API call: JSON, without a Basic challenge (the page says to reload).
fn refused_json(refused: &Refused) -> Response {
    guarded(
        (
            refused.status(),
            json!({
                "error": refused.reason(),
                "status": refused.status().as_u16(),
            }),
        )
            .into_json(),
    )
}

async fn page<S: Store>(State(d): State<Arc<Dashboard<S>>>, headers: HeaderMap) -> Response {
    let viewer = match d.authenticate(&headers, true).await {
        Ok(v) => v,
        Err(refused) => return refused_page(&refused),
    };
    let mut r = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        d.page.clone(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&d.csp) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    guarded(with_session(&d, &viewer, r))
}

async fn overview<S: Store>(State(d): State<Arc<Dashboard<S>>>, headers: HeaderMap) -> Response {
    let viewer = match d.authenticate(&headers, false).await {
        Ok(v) => v,
        Err(refused) => return refused_json(&refused),
    };
    match d.overview(&viewer).await {
        Ok(body) => guarded(with_session(
            &d,
            &viewer,
            (StatusCode::OK, body).into_json(),
        )),
        Err(refused) => refused_json(&refused),
    }
}

async fn device<S: Store>(
    State(d): State<Arc<Dashboard<S>>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let viewer = match d.authenticate(&headers, false).await {
        Ok(v) => v,
        Err(refused) => return refused_json(&refused),
    };
    let id = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("id="))
        .unwrap_or("");
    match d.device(id).await {
        Ok((status, body)) => guarded(with_session(&d, &viewer, (status, body).into_json())),
        Err(refused) => refused_json(&refused),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::clock::FakeClock;
    use crate::server::tests::{T0, hub};

    fn client(id: &str, kind: ClientKind, role: &str, revoked_at: Option<u64>) -> ClientRecord {
        ClientRecord {
            id: id.into(),
            kind,
            public_key: Some(vec![4; 65]),
            role: role.into(),
            groups: Vec::new(),
            enrollment_code_key: None,
            enrolled_at: None,
            revoked_at,
            created_at: T0,
        }
    }

    struct Rig {
        clock: FakeClock,
        hub: Arc<Hub<crate::store::Sqlite>>,
        dashboard: Arc<Dashboard<crate::store::Sqlite>>,
        passwords: PathBuf,
        _dir: tempfile::TempDir,
    }

    /// A dashboard over a test hub: operators `ops-1` and `ops-2` (revoked) and app
    /// `app-1`, each with a password named after it.
    async fn rig() -> Rig {
        let clock = FakeClock::at_ms(T0 * 1000);
        let hub = hub(&clock).await;
        hub.store
            .add_clients(vec![
                client("ops-1", ClientKind::Operator, "ops", None),
                client("ops-2", ClientKind::Operator, "ops", Some(T0)),
                client("app-1", ClientKind::App, "controller", None),
            ])
            .await
            .expect("clients");
        let dir = tempfile::tempdir().expect("tempdir");
        let passwords = dir.path().join("dashboard-passwords");
        for id in ["ops-1", "ops-2", "app-1"] {
            set_password(&passwords, id, Some(&format!("pw-{id}"))).expect("set");
        }
        let dashboard = Arc::new(Dashboard::new(
            hub.clone(),
            &DashboardSection {
                passwords: passwords.clone(),
                session_s: 600,
            },
            Arc::new(()),
        ));
        Rig {
            clock,
            hub,
            dashboard,
            passwords,
            _dir: dir,
        }
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        h.insert(header::AUTHORIZATION, value.parse().expect("header"));
        h
    }

    fn cookie(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={token}")
                .parse()
                .expect("header"),
        );
        h
    }

    fn unauthorized(r: Result<Viewer, Refused>, why: &str) {
        match r {
            Err(Refused::Unauthorized(reason)) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected a 401 ({why}), got {other:?}"),
        }
    }

    fn forbidden(r: Result<Viewer, Refused>, why: &str) {
        match r {
            Err(Refused::Forbidden(reason)) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected a 403 ({why}), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn only_a_registered_unrevoked_watching_operator_with_its_password_gets_in() {
        let rig = rig().await;
        let d = &rig.dashboard;
        unauthorized(d.authenticate(&HeaderMap::new(), true).await, "log in");
        unauthorized(
            d.authenticate(&basic("ops-1", "pw-ops-2"), true).await,
            "wrong operator id or dashboard password",
        );
        unauthorized(
            d.authenticate(&basic("ops-9", "pw-ops-9"), true).await,
            "wrong operator id or dashboard password",
        );
        let mut garbled = HeaderMap::new();
        garbled.insert(header::AUTHORIZATION, "Basic ***".parse().expect("header"));
        unauthorized(d.authenticate(&garbled, true).await, "malformed");
        garbled.insert(header::AUTHORIZATION, "Bearer x".parse().expect("header"));
        unauthorized(d.authenticate(&garbled, true).await, "malformed");
        forbidden(
            d.authenticate(&basic("ops-2", "pw-ops-2"), true).await,
            "operator \"ops-2\" is revoked",
        );
        forbidden(
            d.authenticate(&basic("app-1", "pw-app-1"), true).await,
            "not an operator",
        );

        let viewer = d
            .authenticate(&basic("ops-1", "pw-ops-1"), true)
            .await
            .expect("logged in");
        assert_eq!(viewer.operator, "ops-1");
        let token = viewer.new_session.expect("a session");
        let again = d
            .authenticate(&cookie(&token), true)
            .await
            .expect("the session");
        assert_eq!(
            (again.operator.as_str(), again.new_session),
            ("ops-1", None)
        );
        unauthorized(d.authenticate(&cookie("00"), true).await, "unknown session");
        // The JSON routes take Basic credentials without opening a session.
        let scripted = d
            .authenticate(&basic("ops-1", "pw-ops-1"), false)
            .await
            .expect("Basic");
        assert_eq!(scripted.new_session, None);
        assert_eq!(d.sessions().len(), 1);

        // Removed from the registry: its session no longer lets it in.
        assert!(rig.hub.store.remove_client("ops-1").await.expect("removed"));
        forbidden(
            d.authenticate(&cookie(&token), true).await,
            "no longer registered",
        );
    }

    #[tokio::test]
    async fn a_session_ends_when_it_expires_or_the_password_changes() {
        let rig = rig().await;
        let d = &rig.dashboard;
        let token = d
            .authenticate(&basic("ops-1", "pw-ops-1"), true)
            .await
            .expect("logged in")
            .new_session
            .expect("a session");
        rig.clock.advance_ms(599_000);
        d.authenticate(&cookie(&token), true)
            .await
            .expect("still open");
        rig.clock.advance_ms(1_000);
        unauthorized(d.authenticate(&cookie(&token), true).await, "expired");
        // Gone: a second try does not find it at all.
        unauthorized(
            d.authenticate(&cookie(&token), true).await,
            "unknown session",
        );

        let token = d
            .authenticate(&basic("ops-1", "pw-ops-1"), true)
            .await
            .expect("logged in")
            .new_session
            .expect("a session");
        assert!(set_password(&rig.passwords, "ops-1", Some("new")).expect("set"));
        unauthorized(
            d.authenticate(&cookie(&token), true).await,
            "was changed or removed",
        );
        unauthorized(
            d.authenticate(&basic("ops-1", "pw-ops-1"), true).await,
            "wrong operator id",
        );
        d.authenticate(&basic("ops-1", "new"), true)
            .await
            .expect("the new one");
        assert!(set_password(&rig.passwords, "ops-1", None).expect("removed"));
        unauthorized(
            d.authenticate(&basic("ops-1", "new"), true).await,
            "wrong operator id",
        );
    }

    #[tokio::test]
    async fn an_operator_whose_role_does_not_list_watch_is_forbidden() {
        let rig = rig().await;
        let text = crate::policy::Policy::DEFAULT_TOML.replace(
            "operations = [\"revoke\", \"watch\"]",
            "operations = [\"revoke\"]",
        );
        let policy = crate::policy::Policy::from_toml(&text, "policy.toml").expect("policy");
        rig.hub.policy.replace(policy);
        forbidden(
            rig.dashboard
                .authenticate(&basic("ops-1", "pw-ops-1"), true)
                .await,
            "does not list watch",
        );
    }

    async fn get(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn over_http_a_login_sets_a_strict_http_only_cookie_and_refusals_say_why() {
        let rig = rig().await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(rig.dashboard.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let (status, head, body) = get(addr, "/dashboard", "").await;
        assert_eq!(status, 401);
        assert!(head.contains("www-authenticate: basic"), "{head}");
        assert!(body.contains("log in with your operator id"), "{body}");

        let auth = format!("Authorization: Basic {}\r\n", base64(b"ops-1:pw-ops-1"));
        let (status, head, body) = get(addr, "/dashboard", &auth).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("<svg id=\"chart-issued\""), "{body}");
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        let cookie_line = head
            .lines()
            .find(|l| l.starts_with("set-cookie:"))
            .expect("a cookie");
        for attr in [
            "httponly",
            "samesite=strict",
            "path=/dashboard",
            "max-age=600",
        ] {
            assert!(cookie_line.contains(attr), "{cookie_line}");
        }
        let token = cookie_line
            .split(';')
            .next()
            .and_then(|c| c.split_once('='))
            .map(|(_, v)| v.trim().to_owned())
            .expect("value");
        let with_cookie = format!("Cookie: {COOKIE}={token}\r\n");

        let (status, _, body) = get(addr, "/dashboard/api/overview", &with_cookie).await;
        assert_eq!(status, 200, "{body}");
        let o: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(o["operator"], "ops-1");
        assert_eq!(o["fleet"]["operators"], 2);
        assert_eq!(o["fleet"]["apps"], 1);

        let (status, _, body) = get(addr, "/dashboard/api/device?id=app-1", &with_cookie).await;
        assert_eq!(status, 200, "{body}");
        let o: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            (&o["found"], &o["record"]["kind"]),
            (&true.into(), &"app".into())
        );
        let (status, _, body) =
            get(addr, "/dashboard/api/device?id=%3Cscript%3E", &with_cookie).await;
        assert_eq!(status, 400, "{body}");

        let wrong = format!("Authorization: Basic {}\r\n", base64(b"ops-1:nope"));
        let (status, head, body) = get(addr, "/dashboard/api/overview", &wrong).await;
        assert_eq!(status, 401);
        assert!(!head.contains("www-authenticate"), "{head}");
        assert!(
            body.contains("wrong operator id or dashboard password"),
            "{body}"
        );
        let revoked = format!("Authorization: Basic {}\r\n", base64(b"ops-2:pw-ops-2"));
        let (status, _, body) = get(addr, "/dashboard/api/overview", &revoked).await;
        assert_eq!(status, 403);
        assert!(body.contains("revoked"), "{body}");
        // Nothing here answers anything but GET.
        let (status, _, _) = get(addr, "/nothing", &with_cookie).await;
        assert_eq!(status, 404);
    }

    #[test]
    fn base64_round_trips_and_refuses_what_is_not_base64() {
        for input in [&b""[..], b"f", b"fo", b"foo", b"ops-1:pw", &[0xff, 0, 0x80]] {
            assert_eq!(base64_decode(&base64(input)).as_deref(), Some(input));
        }
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64_decode("Zm9vYg"), Some(b"foob".to_vec()));
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zm9v!"), None);
    }

    #[test]
    fn the_passwords_file_keeps_hashes_only_and_says_which_line_is_bad() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p");
        assert!(!set_password(&path, "ops-1", Some("secret")).expect("set"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            !text.contains("secret") && text.contains("ops-1 "),
            "{text}"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            stored_hash(&path, "ops-1").expect("read"),
            Some(password_hash("secret"))
        );
        std::fs::write(&path, format!("{text}ops-2 zz\n")).expect("write");
        let err = stored_hash(&path, "ops-1").expect_err("bad line");
        assert!(err.to_string().contains("line 4"), "{err}");
    }
}
