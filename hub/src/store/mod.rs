//! Durable hub state behind one narrow trait: the registry, issued tokens, refresh grants,
//! revocations, nonces, rate-limit buckets, signing keys and the audit log.
//!
//! Everything that must survive a crash or be shared between hub replicas lives here, so
//! nothing in the hub assumes it is the only replica: revocation sequence numbers, the
//! nonce cache and rate limits are all decided by the store. [`Sqlite`] is the embedded
//! default, [`Postgres`] the backend several hub replicas share; [`AnyStore`] is whichever
//! the configuration's `database` names. Every backend must pass the conformance suite in
//! [`conformance`]; the schema of both is in one module, `migrations`.

mod any;
pub mod conformance;
mod migrations;
mod postgres;
mod sqlite;

use std::future::Future;

pub use any::{AnyStore, postgres_url, shown_database};
pub use postgres::Postgres;
pub use sqlite::{BackupSummary, Sqlite, StagedRestore};
use tessera_shared::revocation::Addressed;

use crate::revocation::{Change, Outcome, PendingControl, Target};

/// What kind of client a registry record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKind {
    /// A device: holds a device token, may be given access tokens' audience.
    Device,
    /// A control app: obtains access tokens for devices.
    App,
    /// An operator: revokes and watches.
    Operator,
}

impl ClientKind {
    /// The kind's name in the database, the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::App => "app",
            Self::Operator => "operator",
        }
    }

    /// The kind with this name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "device" => Self::Device,
            "app" => Self::App,
            "operator" => Self::Operator,
            _ => return None,
        })
    }
}

/// A registered client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// Unique id (a valid protocol id).
    pub id: String,
    /// Device, app or operator.
    pub kind: ClientKind,
    /// The client's P-256 public key, SEC1 uncompressed; `None` for a device that will
    /// enroll with a one-time code.
    pub public_key: Option<Vec<u8>>,
    /// The client's role in the policy.
    pub role: String,
    /// Device groups (devices only; empty otherwise).
    pub groups: Vec<String>,
    /// `SHA-256("tessera-enroll-v1" ‖ code)` of an unused one-time enrollment code.
    pub enrollment_code_key: Option<[u8; 32]>,
    /// When the device enrolled (Unix seconds); `None` until it has.
    pub enrolled_at: Option<u64>,
    /// When the client was revoked as a whole (Unix seconds); a revoked client is refused.
    pub revoked_at: Option<u64>,
    /// When the record was created (Unix seconds).
    pub created_at: u64,
}

/// The kind of an issued token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// A device token (`sub` = device).
    Device,
    /// An access token (`sub` = app, `aud` = device).
    Access,
}

impl TokenKind {
    /// The kind's name in the database and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Access => "access",
        }
    }

    /// The kind with this name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "device" => Self::Device,
            "access" => Self::Access,
            _ => return None,
        })
    }
}

/// A token the hub issued (never the token bytes: a copy would be useless without the
/// holder's key anyway, but there is no reason to keep it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token's `cti`.
    pub cti: [u8; 16],
    /// SHA-256 of the token bytes, as revocation entries name it.
    pub hash: [u8; 32],
    /// Device or access token.
    pub kind: TokenKind,
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audience: String,
    /// `scope`, space-separated.
    pub scope: String,
    /// `iat`, Unix seconds.
    pub issued_at: u64,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
}

/// A refresh grant. Only its hash is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// SHA-256 of the grant value.
    pub hash: [u8; 32],
    /// The family: every grant rotated from one first grant shares it.
    pub family: [u8; 16],
    /// The client the grant was issued to; only it may use it.
    pub client: String,
    /// What the grant refreshes: a device token or an access token.
    pub kind: TokenKind,
    /// The audience of the tokens it refreshes.
    pub audience: String,
    /// The scope of the tokens it refreshes.
    pub scope: String,
    /// When it stops being usable, Unix seconds.
    pub expires_at: u64,
    /// When it was issued, Unix seconds.
    pub created_at: u64,
}

/// What happened when a grant was presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantUse {
    /// The grant was valid and unused; it is now used (single use).
    Fresh(GrantRecord),
    /// The grant was already used: its whole family is now revoked.
    Reused(GrantRecord),
    /// The grant's family was revoked (by reuse, or with its client).
    Revoked(GrantRecord),
    /// The grant has expired.
    Expired(GrantRecord),
    /// No such grant.
    Unknown,
}

/// A revocation stream as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Its name (`devices/3f`, `service/tessera`).
    pub name: String,
    /// Its latest change number: 1, 2, 3… with no gaps, assigned by the store.
    pub seq: u64,
    /// The change the snapshot retained on the broker reaches (0: none, or it must be
    /// published again because entries left it).
    pub snapshot_seq: u64,
    /// How many retained snapshot pages were published for it (so extra ones can be
    /// cleared when the snapshot shrinks).
    pub snapshot_pages: u64,
}

/// Entries of one stream read from a change on (see [`Store::stream_entries`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRead {
    /// The stream's latest change number (0 for a stream that never changed).
    pub latest: u64,
    /// Changes that still carry entries, in order, with those entries.
    pub changes: Vec<(u64, Vec<Addressed>)>,
    /// Whether the read reached the end (it was not cut by its entry limit).
    pub complete: bool,
}

/// Unexpired issued tokens, by kind ([`Store::live_tokens`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveTokens {
    /// Device tokens.
    pub device: u64,
    /// Access tokens.
    pub access: u64,
}

/// A hub signing key, sealed under the key-encryption secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key id (RFC 9679 thumbprint prefix).
    pub kid: [u8; 8],
    /// The public key, SEC1 uncompressed.
    pub public_key: Vec<u8>,
    /// The private scalar as an encrypted record (never plaintext).
    pub sealed_private_key: Vec<u8>,
    /// When the key was created, Unix seconds.
    pub created_at: u64,
    /// From when the hub signs with it, Unix seconds (never before `published_at` plus the
    /// announce period: see [`Store::mark_key_published`]).
    pub active_from: u64,
    /// When a key set holding it was first published; `None` until then, and a key never
    /// published never signs. The first key (the trust anchor, provisioned out of band)
    /// counts as published when it is created.
    pub published_at: Option<u64>,
    /// When it stops being published in the key set (its last tokens have expired).
    pub retire_after: Option<u64>,
}

/// One audited decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When, Unix milliseconds.
    pub at_ms: u64,
    /// Who asked (client id, or `hub` / `cli` for local actions).
    pub actor: String,
    /// What was asked (`access_token`, `revoke`, `register`, …).
    pub action: String,
    /// What it was about (device id, token id, …).
    pub target: String,
    /// `ok` or the refusal's error code name.
    pub outcome: String,
    /// Why, in words.
    pub reason: String,
    /// How many identical decisions this row stands for (1, or more when the hub
    /// aggregated a flood of refusals from one client into one row per window; `at_ms` is
    /// then the first of them).
    pub count: u64,
}

/// Which audit events [`Store::audit_query`] returns: those meeting every condition set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this actor's decisions (a client id, or `hub` for its own).
    pub actor: Option<String>,
    /// Only decisions about this target: exactly this (a device id, a stream…), or a
    /// revocation of it as a device or a subject (`device ID`, `subject ID`).
    pub target: Option<String>,
    /// Only this action (`access_token`, `revoke`…).
    pub action: Option<String>,
    /// Only events at or after this time (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// Only events before this time (Unix milliseconds).
    pub until_ms: Option<u64>,
    /// At most this many: the most recent of those that match.
    pub limit: usize,
}

impl AuditFilter {
    /// The most recent `limit` events, whatever they are.
    pub fn tail(limit: usize) -> Self {
        Self {
            actor: None,
            target: None,
            action: None,
            since_ms: None,
            until_ms: None,
            limit,
        }
    }

    /// Whether `event` meets every condition (the limit aside).
    pub fn matches(&self, event: &AuditEvent) -> bool {
        self.actor.as_ref().is_none_or(|a| *a == event.actor)
            && self.target.as_ref().is_none_or(|t| {
                *t == event.target
                    || event.target.strip_prefix("device ") == Some(t.as_str())
                    || event.target.strip_prefix("subject ") == Some(t.as_str())
            })
            && self.action.as_ref().is_none_or(|a| *a == event.action)
            && self.since_ms.is_none_or(|t| event.at_ms >= t)
            && self.until_ms.is_none_or(|t| event.at_ms < t)
    }
}

/// What [`Store::prune`] forgets: everything whose time is before its horizon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Horizons {
    /// Issued-token records, refresh grants and nonces whose `expires_at` is before this
    /// (Unix seconds): the hub passes `now − its leeway`.
    pub tokens_before: u64,
    /// Revocation entries whose `expires_at` is before this (Unix seconds): the hub passes
    /// `now −` [`MAX_LEEWAY`](tessera_shared::revocation::MAX_LEEWAY), since a verifier may
    /// apply any leeway up to that and keeps needing an entry until `expires_at` plus its
    /// own leeway.
    pub entries_before: u64,
    /// Control messages owed and recorded (`issued_at`) before this (Unix seconds): the hub
    /// passes `now −` the policy's longest token lifetime `−` its leeway, by when the
    /// device's tokens have expired and the message changes nothing.
    pub controls_before: u64,
    /// Audit events recorded before this (Unix milliseconds).
    pub audit_before_ms: u64,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Issued-token records.
    pub tokens: u64,
    /// Refresh grants.
    pub grants: u64,
    /// Revocation entries (their streams' change numbers stay).
    pub revocation_entries: u64,
    /// Audit events.
    pub audit_events: u64,
    /// Control messages owed that can no longer matter.
    pub controls: u64,
}

/// A grant as stored (see [`Store::grant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantState {
    /// The grant.
    pub record: GrantRecord,
    /// Whether it was spent (grants are single use).
    pub used: bool,
    /// Whether its family was revoked (by a reuse, or with its client).
    pub family_revoked: bool,
}

impl GrantState {
    /// What presenting it at `now` amounts to, before anything is recorded.
    pub fn classify(self, now: u64) -> GrantUse {
        if self.family_revoked {
            GrantUse::Revoked(self.record)
        } else if now >= self.record.expires_at {
            GrantUse::Expired(self.record)
        } else if self.used {
            GrantUse::Reused(self.record)
        } else {
            GrantUse::Fresh(self.record)
        }
    }
}

/// A client's rate limit shared by every replica (a token bucket in the store).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests a client may send in a burst.
    pub burst: u32,
    /// Sustained requests per second.
    pub per_second: f64,
}

impl RateLimit {
    /// No limit: for commits that are not a client's request (tests, tools).
    pub const NONE: Self = Self {
        burst: u32::MAX,
        per_second: 1e12,
    };
}

/// Every effect of one authenticated request (see [`Store::commit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestCommit {
    /// The client that sent it (its nonce and rate bucket).
    pub client: String,
    /// The request's nonce.
    pub nonce: [u8; 16],
    /// Until when the nonce is remembered, Unix seconds (as long as the request could
    /// still be fresh).
    pub nonce_expires_at: u64,
    /// The hub's time of the request, Unix milliseconds.
    pub now_ms: u64,
    /// The client's shared rate limit, charged one request.
    pub rate: RateLimit,
    /// What the request changes besides.
    pub effect: Effect,
}

impl RequestCommit {
    /// The hub's time of the request, Unix seconds.
    pub fn now(&self) -> u64 {
        self.now_ms / 1000
    }
}

/// What a request changes besides its nonce and rate bucket.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per request, moved once into its commit
pub enum Effect {
    /// Nothing (a read such as `fetch_revocations`).
    None,
    /// The requesting device's enrollment: sets its key and `enrolled_at` and consumes its
    /// enrollment code. [`Refused::Conflict`] if the device is revoked, or already enrolled
    /// with a different key; enrolling again with the same key changes nothing;
    /// [`Refused::NotFound`] if there is no such client.
    Enroll {
        /// The device's key, SEC1 uncompressed.
        public_key: Vec<u8>,
    },
    /// Records an issued token and the grant issued with it, after spending `spends` (the
    /// hash of the refresh grant presented) if set. Re-checked here, so a revocation that
    /// committed after the token was decided still wins: [`Refused::HolderRevoked`] if its
    /// holder was revoked whole; [`Refused::CutOff`] if only the holder's tokens issued
    /// before a time after the token's `iat` were revoked. A spent grant must still be
    /// fresh, else [`Refused::Grant`] (and for one already used, its family is revoked and
    /// that is committed).
    Issue {
        /// The token.
        token: IssuedToken,
        /// The grant issued with it.
        grant: Option<GrantRecord>,
        /// The refresh grant presented.
        spends: Option<[u8; 32]>,
    },
    /// Presents a grant without issuing anything: [`Committed::Spent`] says what it was
    /// ([`GrantUse`]); a fresh one is now used, one already used has its family revoked.
    /// Atomic, so two replicas presented the same grant at once cannot both see `Fresh`.
    SpendGrant([u8; 32]),
    /// Revokes every grant of a client: [`Committed::GrantsRevoked`] with how many were
    /// live. (The pipeline no longer uses it: a grant presented by another client is
    /// refused without touching anyone's grants, docs/DECISIONS.md.)
    RevokeGrantsOf(String),
    /// A revocation, as [`Store::revoke`]: [`Committed::Revoked`], or
    /// [`Refused::NotFound`] for a target that names nothing (with [`Unmatched::Refuse`]).
    Revoke {
        /// What to revoke.
        targets: Vec<crate::revocation::Target>,
        /// The leeway tokens are live with.
        leeway: u64,
        /// What to do with a target that names nothing.
        unmatched: Unmatched,
    },
}

/// What a committed request did.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    /// Its effects are recorded ([`Effect::None`], [`Effect::Enroll`], [`Effect::Issue`]).
    Done,
    /// [`Effect::SpendGrant`]: what the grant was.
    Spent(GrantUse),
    /// [`Effect::RevokeGrantsOf`]: how many grants were live.
    GrantsRevoked(u64),
    /// [`Effect::Revoke`]: what was revoked.
    Revoked(Outcome),
}

/// Why [`Store::commit`] recorded nothing (see each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The client already used this nonce in a request still remembered.
    Replay,
    /// The client's shared rate bucket is empty.
    RateLimited,
    /// The grant presented is not fresh (a reuse has revoked its family, durably).
    Grant(GrantUse),
    /// The token's holder was revoked whole.
    HolderRevoked(String),
    /// The holder's tokens issued before `issued_before` were revoked, and the token's
    /// `iat` is earlier (a subject revocation committed after the token was decided). The
    /// holder itself is not revoked: a token issued at `issued_before` or later is not
    /// covered.
    CutOff {
        /// The token's holder.
        subject: String,
        /// The cut-off.
        issued_before: u64,
    },
    /// The effect contradicts what is stored (an enrollment with another key, a duplicate).
    Conflict(String),
    /// The effect names nothing (an unknown client, a revocation target).
    NotFound(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Replay => f.write_str("nonce already used"),
            Self::RateLimited => f.write_str("rate limit reached"),
            Self::Grant(GrantUse::Reused(_)) => {
                f.write_str("refresh grant was already used: its whole family is revoked")
            }
            Self::Grant(GrantUse::Revoked(_)) => f.write_str("refresh grant is revoked"),
            Self::Grant(GrantUse::Expired(_)) => f.write_str("refresh grant has expired"),
            Self::Grant(GrantUse::Unknown) => f.write_str("unknown refresh grant"),
            Self::Grant(GrantUse::Fresh(_)) => f.write_str("refresh grant is fresh"),
            Self::HolderRevoked(id) => write!(f, "client {id:?} was revoked"),
            Self::CutOff {
                subject,
                issued_before,
            } => write!(
                f,
                "tokens of {subject:?} issued before {issued_before} are revoked"
            ),
            Self::Conflict(m) | Self::NotFound(m) => f.write_str(m),
        }
    }
}

/// What [`Store::revoke`] does with a target that names nothing (any more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Refuse the whole revocation with [`StoreError::NotFound`]: an operator's request,
    /// where a target naming nothing is a mistake to report.
    Refuse,
    /// Skip the target and revoke the others: a sweep whose targets were read before the
    /// revoking transaction (a token pruned or expired meanwhile needs no revocation).
    Skip,
}

/// A store failure. Every variant is a hub-side problem (the request may be retried),
/// except [`StoreError::Conflict`] and [`StoreError::NotFound`], which mean the write
/// contradicts existing state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, SQL, connection).
    #[error("store backend: {0}")]
    Backend(String),
    /// The database server failed or refused an operation (connection, SQL, I/O), with
    /// its own error as the source ([`Postgres`]).
    #[error("store database: {message}: {source}")]
    Database {
        /// What the store was doing.
        message: String,
        /// Whether the server refuses writes for good (a full disk, a read-only server,
        /// corruption): see [`StoreError::is_persistent_write_failure`].
        persistent: bool,
        /// The server's or the driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A transaction kept losing races with concurrent ones on the same rows (PostgreSQL's
    /// serialization failure `40001` or deadlock `40P01`), more times than the store
    /// retries it: nothing of it was written, and trying again later may succeed. A backend
    /// retries such conflicts itself; this is what is left when they persist.
    #[error(
        "store conflict with concurrent transactions after {attempts} attempts: {message}: {source}"
    )]
    Retryable {
        /// What the store was doing.
        message: String,
        /// How many times it was tried.
        attempts: u32,
        /// The last conflict, as the server reported it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stored data is not what this version of the hub wrote.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The write conflicts with what is stored (for example a duplicate id).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The record does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The database file does not exist. Only `tessera-hub init` creates one
    /// ([`Sqlite::create`]): a hub whose database is gone must have it restored, since a new
    /// one would hold no signing key, no client and no revocation of the hub devices know.
    #[error(
        "the database {} does not exist: restore it from a backup, or, to start a new hub \
         (every device and app registered again, with a new trust anchor), run \
         `tessera-hub init` in a new directory",
        path.display()
    )]
    NoDatabase {
        /// The missing file.
        path: std::path::PathBuf,
    },
    /// [`Sqlite::create`] found a file where it was to create a database.
    #[error("the database {} already exists: it is not overwritten", path.display())]
    DatabaseExists {
        /// The existing file.
        path: std::path::PathBuf,
    },
}

impl StoreError {
    /// Whether the storage refuses writes for good: a read-only database or file system,
    /// an I/O error, a full disk, a database that can no longer be opened, corruption, or
    /// a store writer that has stopped. Retrying will not help; the hub stops rather than
    /// answer every request `internal`. Not so for a database locked by another process
    /// past the busy timeout (transient), nor for a refusal of one write
    /// ([`StoreError::Conflict`], [`StoreError::NotFound`]).
    ///
    /// SQLite's backend keeps only the message, so this reads SQLite's fixed text for each
    /// of those result codes (`sqlite3_errstr`); the store's tests pin them against SQLite.
    /// PostgreSQL's decides from the SQLSTATE ([`StoreError::Database`]); a conflict
    /// still left after the store's retries ([`StoreError::Retryable`]) is transient.
    pub fn is_persistent_write_failure(&self) -> bool {
        /// SQLite's messages for SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL,
        /// SQLITE_CANTOPEN, SQLITE_CORRUPT and SQLITE_NOTADB, and the store's own when
        /// its writer thread is gone.
        const PERSISTENT: [&str; 7] = [
            "attempt to write a readonly database",
            "disk i/o error",
            "database or disk is full",
            "unable to open database file",
            "database disk image is malformed",
            "file is not a database",
            "the store's writer has stopped",
        ];
        match self {
            StoreError::Backend(message) => {
                let message = message.to_ascii_lowercase();
                PERSISTENT.iter().any(|text| message.contains(text))
            }
            StoreError::Corrupt(_) => true,
            StoreError::Database { persistent, .. } => *persistent,
            StoreError::Retryable { .. }
            | StoreError::Conflict(_)
            | StoreError::NotFound(_)
            | StoreError::NoDatabase { .. }
            | StoreError::DatabaseExists { .. } => false,
        }
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// How a backend's writes went, since it was opened (see [`Store::write_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Durable transactions committed (each one `fsync` for SQLite in WAL mode).
    pub transactions: u64,
    /// Writes they carried (requests committed, audit batches, registry changes…).
    pub writes: u64,
}

/// The hub's durable state. Every method is atomic; every write is durable when its
/// future completes (so the hub can acknowledge after it).
pub trait Store: Send + Sync + 'static {
    // --- registry ---

    /// Adds a client; [`StoreError::Conflict`] if the id exists.
    fn add_client(&self, client: ClientRecord) -> impl Future<Output = StoreResult<()>> + Send;
    /// The client with this id.
    fn client(&self, id: &str) -> impl Future<Output = StoreResult<Option<ClientRecord>>> + Send;
    /// Every client of a kind (all kinds if `None`), ordered by id.
    fn clients(
        &self,
        kind: Option<ClientKind>,
    ) -> impl Future<Output = StoreResult<Vec<ClientRecord>>> + Send;
    /// Removes a client; returns whether it existed.
    fn remove_client(&self, id: &str) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Changes a client's role and, in the same transaction, revokes `disallowed` (the
    /// tokens the new role no longer allows, which the caller decides) as
    /// [`Store::revoke`] does with [`Unmatched::Skip`]; returns what was revoked.
    /// [`StoreError::NotFound`] if there is no such client (and nothing is revoked).
    fn set_role(
        &self,
        id: &str,
        role: &str,
        disallowed: Vec<Target>,
        now: u64,
        leeway: u64,
    ) -> impl Future<Output = StoreResult<Outcome>> + Send;
    /// Provisions a device again, with a new key (`public_key`, SEC1) or one-time
    /// enrollment code (`code_key`): a device revoked whole (PROTOCOL.md §8.5.1), or one
    /// that never enrolled. It must enroll again; the tokens revoked with it stay revoked.
    /// [`StoreError::Conflict`] for an enrolled device that is not revoked, a client that
    /// is not a device, or a key a revoked device held; [`StoreError::NotFound`] if there
    /// is no such client.
    fn reprovision_device(
        &self,
        id: &str,
        public_key: Option<Vec<u8>>,
        code_key: Option<[u8; 32]>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Adds many clients in one transaction: all or none
    /// ([`StoreError::Conflict`] names the first id that exists).
    fn add_clients(
        &self,
        clients: Vec<ClientRecord>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    // --- requests: read, decide, then commit everything at once ---

    /// Whether `client` used `nonce` in a request still remembered at `now` (a replay).
    /// Only a hint that saves deciding a replayed request: [`Store::commit`] decides.
    fn nonce_seen(
        &self,
        client: &str,
        nonce: &[u8; 16],
        now: u64,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// The grant with this hash as stored, to decide a refresh before
    /// [`Store::commit`] spends it.
    fn grant(
        &self,
        hash: &[u8; 32],
    ) -> impl Future<Output = StoreResult<Option<GrantState>>> + Send;
    /// Commits every effect of one request in one transaction, durable when this completes,
    /// re-checking the preconditions the request was decided on:
    ///
    /// 1. the nonce is remembered until `nonce_expires_at` ([`Refused::Replay`] if the client
    ///    already used it in a request still remembered; expired nonces are forgotten);
    /// 2. the client's shared rate bucket gives one token ([`Refused::RateLimited`]);
    /// 3. the [`Effect`].
    ///
    /// A refusal commits nothing (not even the nonce), except [`Refused::Grant`] for a grant
    /// already used, whose whole family is then revoked, durably: see [`Effect::Issue`].
    /// Concurrent commits may share one durable write (group commit); each is atomic on its
    /// own and answered only once durable.
    fn commit(
        &self,
        request: RequestCommit,
    ) -> impl Future<Output = StoreResult<Result<Committed, Refused>>> + Send;

    // --- issued tokens ---

    /// The issued token with this `cti`.
    fn issued(&self, cti: &[u8]) -> impl Future<Output = StoreResult<Option<IssuedToken>>> + Send;
    /// Unexpired tokens issued to `subject`.
    fn issued_to(
        &self,
        subject: &str,
        now: u64,
    ) -> impl Future<Output = StoreResult<Vec<IssuedToken>>> + Send;
    /// Unexpired tokens whose audience is `audience` (access tokens for a device).
    fn issued_for(
        &self,
        audience: &str,
        now: u64,
    ) -> impl Future<Output = StoreResult<Vec<IssuedToken>>> + Send;

    // --- revocation ---

    /// Revokes `targets` at `now` in one transaction, durable when this completes:
    /// resolves them against the registry and the tokens issued (those still live with
    /// `leeway`), marks whole clients revoked (a device loses its key and enrollment and
    /// must be registered again), revokes the subjects' refresh grant families, plans the
    /// entries ([`crate::revocation::plan`]), numbers the changes on their streams,
    /// records them unpublished and records the control messages owed.
    ///
    /// A target that names nothing: an unknown or expired token, an unregistered subject
    /// without live tokens, a device that is not a registered device, an empty group or
    /// role, an id of a device list that is not a registered device. With
    /// [`Unmatched::Refuse`] it is [`StoreError::NotFound`] with the reason, and nothing is
    /// revoked; with [`Unmatched::Skip`] it is left out (decided inside the transaction, so
    /// a token pruned after the caller read it cannot fail the others).
    fn revoke(
        &self,
        targets: Vec<Target>,
        now: u64,
        leeway: u64,
        unmatched: Unmatched,
    ) -> impl Future<Output = StoreResult<Outcome>> + Send;
    /// Every stream that ever changed, by name.
    fn streams(&self) -> impl Future<Output = StoreResult<Vec<StreamState>>> + Send;
    /// The entries of `stream` still in force at `now` (`expires_at + leeway ≥ now`)
    /// from change `from` on, grouped by change in order, reading at most `max_entries`
    /// entries, and the stream's latest change number. The hub passes
    /// [`MAX_LEEWAY`](tessera_shared::revocation::MAX_LEEWAY) as `leeway`: an entry is
    /// served as long as some verifier may still need it.
    fn stream_entries(
        &self,
        stream: &str,
        from: u64,
        now: u64,
        leeway: u64,
        max_entries: usize,
    ) -> impl Future<Output = StoreResult<StreamRead>> + Send;
    /// Records that the snapshot retained for `stream` now reaches change `seq` in `pages`
    /// pages.
    fn set_snapshot_published(
        &self,
        stream: &str,
        seq: u64,
        pages: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Changes not yet seen back from the broker that were recorded at or before
    /// `created_before`, in stream and change order.
    fn unpublished_changes(
        &self,
        created_before: u64,
    ) -> impl Future<Output = StoreResult<Vec<Change>>> + Send;
    /// Marks exactly the changes of these ranges (stream, first, last change number,
    /// inclusive) published, each range with one ranged update; unknown changes are
    /// ignored.
    fn mark_published(
        &self,
        ranges: Vec<(String, u64, u64)>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Control messages owed and recorded at or before `created_before`, oldest first, at
    /// most `limit` of them.
    fn unsent_controls(
        &self,
        created_before: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<PendingControl>>> + Send;
    /// Forgets control messages the broker took; unknown ones are ignored.
    fn mark_controls_sent(
        &self,
        controls: Vec<PendingControl>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    // --- signing keys ---

    /// Adds a signing key.
    fn add_key(&self, key: KeyRecord) -> impl Future<Output = StoreResult<()>> + Send;
    /// Every signing key, oldest first.
    fn keys(&self) -> impl Future<Output = StoreResult<Vec<KeyRecord>>> + Send;
    /// Records that a key set holding `kid` was first published at `at`, and pushes its
    /// `active_from` to at least `active_from` (so verifiers have had it for the announce
    /// period before anything is signed with it). Only the first call for a key counts;
    /// returns the key as stored after the call.
    fn mark_key_published(
        &self,
        kid: &[u8; 8],
        at: u64,
        active_from: u64,
    ) -> impl Future<Output = StoreResult<KeyRecord>> + Send;
    /// Sets when a key stops being published.
    fn retire_key(
        &self,
        kid: &[u8; 8],
        retire_after: u64,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    // --- housekeeping ---

    /// Forgets what can no longer matter, so the store stays bounded by token lifetimes
    /// and the audit retention: whatever is before its horizon in `horizons` (issued
    /// tokens, grants, nonces, revocation entries, control messages owed, audit events),
    /// and published changes left without entries. A stream that lost entries gets its
    /// snapshot published again; change numbers are never reused.
    fn prune(&self, horizons: Horizons) -> impl Future<Output = StoreResult<Pruned>> + Send;

    // --- audit ---

    /// Appends audit events (batched by the caller where it helps).
    fn audit(&self, events: Vec<AuditEvent>) -> impl Future<Output = StoreResult<()>> + Send;
    /// Whether this handle holds the housekeeping lease, taking it if no one holds it:
    /// several hub replicas on one database do the periodic work (heartbeats, snapshots,
    /// control messages owed, pruning, notifying revocations made outside a request) once,
    /// by whichever holds it. The lease lasts as long as the holder's connection: a
    /// replica that dies (even `kill -9`) loses it, and another takes it at its next try.
    /// Called once per heartbeat by the serving loop. This provided version always holds
    /// it: one process serves a database that cannot be shared (SQLite's serve lock).
    fn hold_lease(&self) -> impl Future<Output = StoreResult<bool>> + Send {
        async { Ok(true) }
    }

    /// How many transactions carried how many writes (group commit); zeros for a backend
    /// that does not count.
    fn write_stats(&self) -> WriteStats {
        WriteStats::default()
    }

    /// Revocation entries still in force at `now` (`expires_at + leeway ≥ now`), summed
    /// over the streams that carry them: the size of the revocation list, for the metrics.
    /// This provided version reads every stream; a backend counts where the data lives.
    fn revocation_entries(
        &self,
        now: u64,
        leeway: u64,
    ) -> impl Future<Output = StoreResult<u64>> + Send {
        async move {
            let mut n = 0u64;
            for stream in self.streams().await? {
                let read = self
                    .stream_entries(&stream.name, 0, now, leeway, usize::MAX)
                    .await?;
                for (_, entries) in read.changes {
                    n = n.saturating_add(u64::try_from(entries.len()).unwrap_or(u64::MAX));
                }
            }
            Ok(n)
        }
    }

    /// Unexpired tokens at `now` (`expires_at > now`), by kind: the live-token gauge of the
    /// metrics. A token revoked on its own still counts until it expires (the revocation
    /// list holds it). This provided version asks every client; a backend counts where the
    /// data lives.
    fn live_tokens(&self, now: u64) -> impl Future<Output = StoreResult<LiveTokens>> + Send {
        async move {
            let mut live = LiveTokens::default();
            for client in self.clients(None).await? {
                for t in self.issued_to(&client.id, now).await? {
                    match t.kind {
                        TokenKind::Device => live.device += 1,
                        TokenKind::Access => live.access += 1,
                    }
                }
            }
            Ok(live)
        }
    }

    /// The most recent audit events, newest last.
    fn audit_tail(&self, limit: usize)
    -> impl Future<Output = StoreResult<Vec<AuditEvent>>> + Send;

    /// The most recent audit events that match `filter`, at most `filter.limit` of them,
    /// by time, newest last (events of the same millisecond in the order appended).
    /// Unlike [`Store::audit_tail`], time decides, not the order of appending: replicas
    /// append their batches a little out of time order.
    ///
    /// The audit log can be large: a backend filters where the data lives (SQLite in SQL,
    /// with an index on time). This provided version reads the whole log and filters it in
    /// memory, for fakes and wrappers only.
    fn audit_query(
        &self,
        filter: &AuditFilter,
    ) -> impl Future<Output = StoreResult<Vec<AuditEvent>>> + Send {
        let filter = filter.clone();
        async move {
            let mut events: Vec<AuditEvent> = self
                .audit_tail(usize::MAX)
                .await?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            // Stable: the same millisecond stays in the order appended.
            events.sort_by_key(|e| e.at_ms);
            let skip = events.len().saturating_sub(filter.limit);
            events.drain(..skip);
            Ok(events)
        }
    }
}
