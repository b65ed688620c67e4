//! The PostgreSQL backend of [`Store`]: the database several hub replicas share.
//!
//! **Connections**: a `deadpool-postgres` pool of `tokio-postgres` connections, from a
//! `postgres://` (or `postgresql://`) URL in libpq's form. TLS goes through rustls with
//! the system's trust roots: `sslmode=disable` is plain; a server on a loopback address
//! or a Unix socket is plain unless `sslmode=require`; any other server needs TLS (the
//! default `prefer` is taken as `require` there, so a network attacker cannot strip it).
//!
//! **Transactions**: every write runs in one `SERIALIZABLE` transaction, so the checks the
//! store makes (a nonce not used, a grant not spent, a rate bucket not empty, a stream's
//! next change number) hold against every replica without locks held in the hub. A
//! transaction that loses a race (serialization failure `40001`, deadlock `40P01`) is rolled
//! back and run again from the start, at most [`MAX_ATTEMPTS`] times with jittered backoff;
//! then [`StoreError::Retryable`]. Other errors are reported at once, with the server's
//! error as their source ([`StoreError::Database`]). A commit is durable when it returns
//! (the server's `synchronous_commit`, on by default), so the hub may acknowledge after it.
//!
//! A refusal ([`Refused`]) rolls back to a savepoint taken after `BEGIN` and still commits
//! the (empty) transaction, so what a refusal was decided on is checked by the server's
//! serializability like any write; a reused grant's family revocation is kept.
//!
//! **Revocation numbers** come from one row per stream (`revocation_streams.seq`), raised
//! in the transaction that appends the changes: gapless whatever the number of replicas,
//! since a transaction that rolls back takes its numbers with it.
//!
//! **Schema**: `migrations::postgres`, version in the table `tessera_schema`. `create`
//! makes it (`tessera-hub init`); every other opening checks it at the first use and
//! migrates an older one, under an advisory lock, so replicas starting together do it once.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tessera_shared::message::Command;
use tessera_shared::revocation::{Addressed, Entry, TOKEN_HASH_LEN};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, IsolationLevel, Row};

use super::migrations::postgres::MIGRATIONS;
use super::{
    AuditEvent, AuditFilter, ClientKind, ClientRecord, Committed, Effect, GrantRecord, GrantState,
    GrantUse, Horizons, IssuedToken, KeyRecord, LiveTokens, Pruned, RateLimit, Refused,
    RequestCommit, Store, StoreError, StoreResult, StreamRead, StreamState, TokenKind, Unmatched,
    WriteStats,
};
use crate::revocation::{self, Change, Outcome, PendingControl, Resolved, ResolvedSubject, Target};

/// Runs `$body` (an expression using `$tx`, a `&Tx`, and `?` with [`Abort`]) in a
/// `SERIALIZABLE` transaction and commits it, again from the start while it loses races
/// (see the module doc): `StoreResult<Result<T, Refused>>`. A macro rather than a function
/// taking an async closure, whose future could not be shown `Send` for the trait.
macro_rules! transaction {
    ($store:expr, $what:expr, |$tx:ident| $body:expr) => {{
        let store: &Postgres = $store;
        let what: &'static str = $what;
        let mut retry = Retry::new(what);
        loop {
            let attempt: StoreResult<Result<_, Refused>> = async {
                store.ready().await?;
                let mut conn = store.conn().await?;
                let owned = begin(&mut conn).await?;
                let body: Result<_, Abort> = {
                    let $tx = &owned;
                    async { $body }.await
                };
                finish(owned, body).await
            }
            .await;
            let settled = retry.settle(attempt).await;
            if settled.is_none() {
                store.inner.retries.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(done) = settled {
                if done.is_ok() {
                    store.inner.transactions.fetch_add(1, Ordering::Relaxed);
                }
                break done;
            }
        }
    }};
}

/// [`transaction!`] for operations that are not a client's request: a refusal is an error.
macro_rules! write_tx {
    ($store:expr, $what:expr, |$tx:ident| $body:expr) => {
        no_refusal(transaction!($store, $what, |$tx| $body), $what)
    };
}

const _: () = assert!(MIGRATIONS.len() == Postgres::SCHEMA_VERSION as usize);

/// How many times a transaction that lost a race is run (the first time included). Racing
/// transactions on one row commit one per round, so this covers many racers at once.
const MAX_ATTEMPTS: u32 = 24;

/// The longest pause between two attempts (each pause is random, up to twice the last).
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Connections one handle keeps at most.
const POOL_SIZE: usize = 16;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The advisory lock key migrations hold (`pg_advisory_xact_lock`): "tessera" in ASCII.
const MIGRATION_LOCK: i64 = 0x0074_6573_7365_7261;

/// Tolerance when comparing a refilled rate bucket with one token.
const RATE_EPSILON: f64 = 1e-9;

/// The [`Store`] on a PostgreSQL database. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The URL without its password, for messages.
    shown: String,
    /// Set once the schema was found current (or migrated) on this handle.
    schema: tokio::sync::OnceCell<()>,
    transactions: AtomicU64,
    /// Transactions run again after losing a race.
    retries: AtomicU64,
    /// The connection holding the housekeeping lease (a session advisory lock), taken
    /// out of the pool for good: the lock lasts as long as this session.
    lease: tokio::sync::Mutex<Option<deadpool_postgres::ClientWrapper>>,
}

/// The key of the housekeeping lease's advisory lock ("tessera\x01" in ASCII).
/// Advisory locks are per database: one per hub deployment.
const LEASE_KEY: i64 = 0x7465_7373_6572_6101;

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("database", &self.inner.shown)
            .finish_non_exhaustive()
    }
}

/// What opening expects of the schema.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A hub's database: refused without a schema ([`StoreError::NoDatabase`]).
    Existing,
    /// A new one: refused with a schema ([`StoreError::DatabaseExists`]).
    New,
    /// Either: created if missing (tests).
    Any,
}

impl Postgres {
    /// The schema version this code writes: the number of migration steps.
    pub const SCHEMA_VERSION: u32 = 1;

    /// A handle on the hub database at `url`, without connecting yet: the first operation
    /// connects, and checks (and migrates) the schema; [`StoreError::NoDatabase`] if the
    /// database holds none (only `tessera-hub init` creates one, [`Postgres::create`]).
    /// Never blocks.
    pub fn open_existing(url: &str) -> StoreResult<Self> {
        Self::handle(url)
    }

    /// Creates the schema in the (existing, empty) database at `url`.
    /// [`StoreError::DatabaseExists`] if it holds a hub's schema already: nothing is
    /// overwritten.
    pub async fn create(url: &str) -> StoreResult<Self> {
        let store = Self::handle(url)?;
        store.migrate(Expect::New).await?;
        Ok(store)
    }

    /// Opens the database at `url`, creating the schema if it has none and migrating an
    /// older one; connects at once, so an unreachable server fails here.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let store = Self::handle(url)?;
        store.migrate(Expect::Any).await?;
        Ok(store)
    }

    /// How many transactions this handle ran again after they lost a race with a
    /// concurrent one (see the module doc), since it was opened.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// The database's URL, without its password.
    pub fn shown_url(&self) -> &str {
        &self.inner.shown
    }

    fn handle(url: &str) -> StoreResult<Self> {
        let shown = hide_password(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            database(
                e,
                &format!("{shown} is not a PostgreSQL connection URL"),
                false,
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let tls =
            tls(&mut config).map_err(|e| StoreError::Backend(format!("TLS for {shown}: {e}")))?;
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("connection pool for {shown}: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                shown,
                schema: tokio::sync::OnceCell::new(),
                transactions: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                lease: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A pooled connection.
    async fn conn(&self) -> StoreResult<deadpool_postgres::Object> {
        self.inner.pool.get().await.map_err(|e| {
            let message = format!("connecting to {}", self.inner.shown);
            match e {
                deadpool_postgres::PoolError::Backend(e) => database(e, &message, false),
                e => StoreError::Database {
                    message,
                    persistent: false,
                    source: Box::new(e),
                },
            }
        })
    }

    /// Checks the schema once per handle, before its first operation.
    async fn ready(&self) -> StoreResult<()> {
        self.inner
            .schema
            .get_or_try_init(|| self.migrate(Expect::Existing))
            .await
            .map(|_| ())
    }

    /// Brings the schema to [`Postgres::SCHEMA_VERSION`] in one transaction, under an
    /// advisory lock (see [`Expect`] for what it refuses).
    async fn migrate(&self, expect: Expect) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| database(e, "beginning the migration", false))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| database(e, "taking the migration lock", false))?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('tessera_schema') IS NOT NULL", &[])
            .await
            .map_err(|e| database(e, "looking for the schema", false))?
            .try_get(0)
            .map_err(|e| database(e, "looking for the schema", false))?;
        let path = || std::path::PathBuf::from(&self.inner.shown);
        let version = if exists {
            if expect == Expect::New {
                return Err(StoreError::DatabaseExists { path: path() });
            }
            let v: i32 = tx
                .query_one("SELECT version FROM tessera_schema", &[])
                .await
                .map_err(|e| database(e, "reading the schema version", false))?
                .try_get(0)
                .map_err(|e| database(e, "reading the schema version", false))?;
            usize::try_from(v).map_err(|_| StoreError::Corrupt(format!("schema version {v}")))?
        } else {
            if expect == Expect::Existing {
                return Err(StoreError::NoDatabase { path: path() });
            }
            tx.batch_execute(
                "CREATE TABLE tessera_schema (
                    version INTEGER NOT NULL,
                    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one)
                 );
                 INSERT INTO tessera_schema (version) VALUES (0);",
            )
            .await
            .map_err(|e| database(e, "creating the schema table", false))?;
            0
        };
        if version > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this hub supports ({}); it \
                 was written by a newer hub: upgrade the hub",
                MIGRATIONS.len()
            )));
        }
        if version == MIGRATIONS.len() {
            return tx
                .commit()
                .await
                .map_err(|e| database(e, "checking the schema", false));
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.batch_execute(step)
                .await
                .map_err(|e| database(e, &format!("applying migration {}", i + 1), false))?;
        }
        tx.execute(
            "UPDATE tessera_schema SET version = $1",
            &[&i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)],
        )
        .await
        .map_err(|e| database(e, "setting the schema version", false))?;
        tx.commit()
            .await
            .map_err(|e| database(e, "committing migrations", false))?;
        // Created here: no need to check again at the first use.
        let _ = self.inner.schema.set(());
        Ok(())
    }

    /// Fails unless the database takes a durable write (`serve` checks this first).
    pub async fn check_writable(&self) -> StoreResult<()> {
        write_tx!(self, "check_writable", |tx| {
            tx.execute("UPDATE tessera_schema SET version = version", &[])
                .await
                .map_err(|e| pg(e, "writing the schema version back"))?;
            Ok(())
        })
    }

    /// Which of `ids` are registered clients, in one query.
    pub async fn registered_among(&self, ids: Vec<String>) -> StoreResult<HashSet<String>> {
        let rows = self
            .query(
                "registered_among",
                "SELECT id FROM clients WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        rows.iter().map(|r| text(r, 0, "client id")).collect()
    }

    /// Which of `keys` (SEC1) belonged to devices revoked whole, each with that device.
    pub async fn retired_among(&self, keys: Vec<Vec<u8>>) -> StoreResult<HashMap<Vec<u8>, String>> {
        let rows = self
            .query(
                "retired_among",
                "SELECT public_key, client FROM retired_keys WHERE public_key = ANY($1)",
                &[&keys],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    blob(r, 0, "retired key")?,
                    text(r, 1, "retired key holder")?,
                ))
            })
            .collect()
    }

    /// Runs one read (its own implicit transaction).
    async fn query(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<Row>> {
        self.ready().await?;
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(sql)
            .await
            .map_err(|e| pg(e, &format!("{what}: preparing")))?;
        conn.query(&stmt, params)
            .await
            .map_err(|e| pg(e, &format!("{what}: reading")))
    }
}

// --- TLS ---

/// The TLS connector for `config`, after settling its `sslmode` (see the module doc).
fn tls(
    config: &mut tokio_postgres::Config,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let local = !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        });
    match config.get_ssl_mode() {
        SslMode::Disable => {}
        SslMode::Prefer if local => {
            config.ssl_mode(SslMode::Disable);
        }
        _ => {
            config.ssl_mode(SslMode::Require);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(client))
}

/// `url` with its password replaced by `***`.
pub(super) fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

// --- errors ---

/// A driver error as a store error, `persistent` deciding for errors without a SQLSTATE.
fn database(
    e: impl std::error::Error + Send + Sync + 'static,
    what: &str,
    persistent: bool,
) -> StoreError {
    StoreError::Database {
        message: what.to_owned(),
        persistent,
        source: Box::new(e),
    }
}

/// Whether the server says the transaction lost a race and may be run again.
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// A statement's error: a lost race is [`StoreError::Retryable`] (the transaction runs
/// again), a full disk, a read-only server or corruption a persistent failure.
fn pg(e: tokio_postgres::Error, what: &str) -> StoreError {
    if is_retryable(&e) {
        return StoreError::Retryable {
            message: what.to_owned(),
            attempts: 1,
            source: Box::new(e),
        };
    }
    let persistent = e.code().is_some_and(|c| {
        [
            SqlState::DISK_FULL,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::DATA_CORRUPTED,
            SqlState::INDEX_CORRUPTED,
            SqlState::IO_ERROR,
        ]
        .contains(c)
    });
    database(e, what, persistent)
}

/// Why a transaction stops: a refusal (rolled back to its savepoint, then committed) or a
/// failure (rolled back).
enum Abort {
    Refused(Box<Refused>),
    Store(StoreError),
}

impl From<Refused> for Abort {
    fn from(r: Refused) -> Self {
        Self::Refused(Box::new(r))
    }
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// The transaction type bodies run in.
type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// Begins a `SERIALIZABLE` transaction with a savepoint to roll a refusal back to.
async fn begin(conn: &mut deadpool_postgres::Object) -> StoreResult<Tx<'_>> {
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .await
        .map_err(|e| pg(e, "beginning a transaction"))?;
    tx.batch_execute("SAVEPOINT request")
        .await
        .map_err(|e| pg(e, "taking a savepoint"))?;
    Ok(tx)
}

/// Ends a transaction as its body went: committed; rolled back to the savepoint and
/// committed for a refusal; rolled back for a failure.
async fn finish<T>(tx: Tx<'_>, body: Result<T, Abort>) -> StoreResult<Result<T, Refused>> {
    let done = match body {
        Ok(v) => Ok(v),
        Err(Abort::Refused(r)) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT request")
                .await
                .map_err(|e| pg(e, "rolling back a refused request"))?;
            Err(*r)
        }
        // Dropping the transaction rolls it back.
        Err(Abort::Store(e)) => return Err(e),
    };
    tx.commit().await.map_err(|e| pg(e, "committing"))?;
    Ok(done)
}

/// The retries of one transaction.
struct Retry {
    what: &'static str,
    attempt: u32,
    pause: Duration,
}

impl Retry {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            attempt: 1,
            pause: Duration::from_millis(1),
        }
    }

    /// What to answer after an attempt (`None`: it lost a race; pause, then run it again).
    async fn settle<T>(&mut self, attempt: StoreResult<T>) -> Option<StoreResult<T>> {
        match attempt {
            Err(StoreError::Retryable {
                message, source, ..
            }) => {
                if self.attempt >= MAX_ATTEMPTS {
                    return Some(Err(StoreError::Retryable {
                        message: format!("{}: {message}", self.what),
                        attempts: self.attempt,
                        source,
                    }));
                }
                tracing::debug!(
                    what = self.what,
                    attempt = self.attempt,
                    "store transaction lost a race; running it again"
                );
                tokio::time::sleep(jitter(self.pause)).await;
                self.pause = (self.pause * 2).min(MAX_BACKOFF);
                self.attempt += 1;
                None
            }
            Err(e) => Some(Err(super::sqlite::prefix(e, self.what))),
            Ok(done) => Some(Ok(done)),
        }
    }
}

/// A random pause between half of `pause` and all of it.
fn jitter(pause: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::fill(&mut b).map_or(0, |()| u16::from_le_bytes(b));
    pause / 2 + pause / 2 * u32::from(r) / u32::from(u16::MAX)
}

/// A refusal of an operation that is not a client's request, as its error.
fn no_refusal<T>(done: StoreResult<Result<T, Refused>>, what: &str) -> StoreResult<T> {
    done?.map_err(|r| match r {
        Refused::NotFound(m) => StoreError::NotFound(format!("{what}: {m}")),
        other => StoreError::Conflict(format!("{what}: {other}")),
    })
}

// --- conversions ---

/// A value to store: refused if PostgreSQL's `BIGINT` cannot hold it.
fn stored(v: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| {
        StoreError::Backend(format!(
            "{what} = {v} does not fit PostgreSQL's signed 64-bit integer"
        ))
    })
}

/// A value only compared against stored ones (see the SQLite backend's `bound`).
fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn column(e: tokio_postgres::Error, what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn text(row: &Row, idx: usize, what: &str) -> StoreResult<String> {
    row.try_get(idx).map_err(|e| column(e, what))
}

fn opt_text(row: &Row, idx: usize, what: &str) -> StoreResult<Option<String>> {
    row.try_get(idx).map_err(|e| column(e, what))
}

fn blob(row: &Row, idx: usize, what: &str) -> StoreResult<Vec<u8>> {
    row.try_get(idx).map_err(|e| column(e, what))
}

fn opt_blob(row: &Row, idx: usize, what: &str) -> StoreResult<Option<Vec<u8>>> {
    row.try_get(idx).map_err(|e| column(e, what))
}

fn flag(row: &Row, idx: usize, what: &str) -> StoreResult<bool> {
    row.try_get(idx).map_err(|e| column(e, what))
}

fn time(row: &Row, idx: usize, what: &str) -> StoreResult<u64> {
    let v: i64 = row.try_get(idx).map_err(|e| column(e, what))?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

fn opt_time(row: &Row, idx: usize, what: &str) -> StoreResult<Option<u64>> {
    let v: Option<i64> = row.try_get(idx).map_err(|e| column(e, what))?;
    v.map(|v| {
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
    })
    .transpose()
}

fn array<const N: usize>(bytes: Vec<u8>, what: &str) -> StoreResult<[u8; N]> {
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {len} bytes, not {N}")))
}

fn fixed<const N: usize>(row: &Row, idx: usize, what: &str) -> StoreResult<[u8; N]> {
    array(blob(row, idx, what)?, what)
}

fn token_kind(row: &Row, idx: usize) -> StoreResult<TokenKind> {
    let s = text(row, idx, "token kind")?;
    TokenKind::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("token kind {s:?}")))
}

// --- row decoding; each SELECT lists the columns in the order its decoder reads them ---

const CLIENT_COLUMNS: &str =
    "id, kind, public_key, role, enrollment_code_key, enrolled_at, revoked_at, created_at";

fn client_row(row: &Row) -> StoreResult<ClientRecord> {
    let kind = text(row, 1, "client kind")?;
    Ok(ClientRecord {
        id: text(row, 0, "client id")?,
        kind: ClientKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("client kind {kind:?}")))?,
        public_key: opt_blob(row, 2, "client public key")?,
        role: text(row, 3, "client role")?,
        groups: Vec::new(),
        enrollment_code_key: opt_blob(row, 4, "enrollment code key")?
            .map(|b| array(b, "enrollment code key"))
            .transpose()?,
        enrolled_at: opt_time(row, 5, "enrolled_at")?,
        revoked_at: opt_time(row, 6, "revoked_at")?,
        created_at: time(row, 7, "client created_at")?,
    })
}

const TOKEN_COLUMNS: &str = "cti, hash, kind, subject, audience, scope, issued_at, expires_at";

fn token_row(row: &Row) -> StoreResult<IssuedToken> {
    Ok(IssuedToken {
        cti: fixed(row, 0, "token cti")?,
        hash: fixed(row, 1, "token hash")?,
        kind: token_kind(row, 2)?,
        subject: text(row, 3, "token subject")?,
        audience: text(row, 4, "token audience")?,
        scope: text(row, 5, "token scope")?,
        issued_at: time(row, 6, "token issued_at")?,
        expires_at: time(row, 7, "token expires_at")?,
    })
}

const GRANT_COLUMNS: &str =
    "hash, family, client, kind, audience, scope, expires_at, created_at, used, family_revoked";

fn grant_row(row: &Row) -> StoreResult<GrantState> {
    Ok(GrantState {
        record: GrantRecord {
            hash: fixed(row, 0, "grant hash")?,
            family: fixed(row, 1, "grant family")?,
            client: text(row, 2, "grant client")?,
            kind: token_kind(row, 3)?,
            audience: text(row, 4, "grant audience")?,
            scope: text(row, 5, "grant scope")?,
            expires_at: time(row, 6, "grant expires_at")?,
            created_at: time(row, 7, "grant created_at")?,
        },
        used: flag(row, 8, "grant used")?,
        family_revoked: flag(row, 9, "grant family_revoked")?,
    })
}

const ENTRY_COLUMNS: &str = "audience, token_hash, subject, issued_before, expires_at";

fn entry_row(row: &Row, at: usize) -> StoreResult<Addressed> {
    let audience = text(row, at, "entry audience")?;
    let hash = opt_blob(row, at + 1, "entry token hash")?;
    let subject = opt_text(row, at + 2, "entry subject")?;
    let issued_before = opt_time(row, at + 3, "entry issued_before")?;
    let expires_at = time(row, at + 4, "entry expires_at")?;
    let entry = match (hash, subject, issued_before) {
        (Some(hash), None, None) => Entry::Token {
            hash: array::<TOKEN_HASH_LEN>(hash, "entry token hash")?,
            expires_at,
        },
        (None, Some(subject), Some(issued_before)) => {
            Entry::for_subject(&subject, issued_before, expires_at)
                .map_err(|e| StoreError::Corrupt(format!("entry subject {subject:?}: {e}")))?
        }
        _ => {
            return Err(StoreError::Corrupt(
                "revocation entry is neither a token nor a subject entry".into(),
            ));
        }
    };
    Addressed::new(&audience, entry)
        .map_err(|e| StoreError::Corrupt(format!("entry audience {audience:?}: {e}")))
}

const KEY_COLUMNS: &str =
    "kid, public_key, sealed_private_key, created_at, active_from, retire_after, published_at";

fn key_row(row: &Row) -> StoreResult<KeyRecord> {
    Ok(KeyRecord {
        kid: fixed(row, 0, "key id")?,
        public_key: blob(row, 1, "key public key")?,
        sealed_private_key: blob(row, 2, "sealed private key")?,
        created_at: time(row, 3, "key created_at")?,
        active_from: time(row, 4, "key active_from")?,
        retire_after: opt_time(row, 5, "key retire_after")?,
        published_at: opt_time(row, 6, "key published_at")?,
    })
}

const AUDIT_COLUMNS: &str = "at_ms, actor, action, target, outcome, reason, count";

fn audit_row(row: &Row) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        at_ms: time(row, 0, "audit at_ms")?,
        actor: text(row, 1, "audit actor")?,
        action: text(row, 2, "audit action")?,
        target: text(row, 3, "audit target")?,
        outcome: text(row, 4, "audit outcome")?,
        reason: text(row, 5, "audit reason")?,
        count: time(row, 6, "audit count")?,
    })
}

fn stream_row(row: &Row) -> StoreResult<StreamState> {
    Ok(StreamState {
        name: text(row, 0, "stream name")?,
        seq: time(row, 1, "stream seq")?,
        snapshot_seq: time(row, 2, "stream snapshot_seq")?,
        snapshot_pages: time(row, 3, "stream snapshot_pages")?,
    })
}

// --- statements on a client or a transaction ---

/// Runs a query (prepared once per connection) and decodes every row.
async fn collect<C: GenericClient + Sync, T>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    decode: impl Fn(&Row) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let rows = c
        .query(sql, params)
        .await
        .map_err(|e| pg(e, "running a query"))?;
    rows.iter().map(decode).collect()
}

/// Runs a statement; returns how many rows it changed.
async fn exec<C: GenericClient + Sync>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: &str,
) -> StoreResult<u64> {
    c.execute(sql, params).await.map_err(|e| pg(e, what))
}

async fn client_without_groups<C: GenericClient + Sync>(
    c: &C,
    id: &str,
) -> StoreResult<Option<ClientRecord>> {
    Ok(collect(
        c,
        &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE id = $1"),
        &[&id],
        client_row,
    )
    .await?
    .pop())
}

/// The clients of `kind` (all if `None`), ordered by id, with their groups.
async fn load_clients<C: GenericClient + Sync>(
    c: &C,
    kind: Option<ClientKind>,
) -> StoreResult<Vec<ClientRecord>> {
    let kind = kind.map(ClientKind::as_str);
    let mut clients = collect(
        c,
        &format!(
            "SELECT {CLIENT_COLUMNS} FROM clients WHERE $1::TEXT IS NULL OR kind = $1 ORDER BY id"
        ),
        &[&kind],
        client_row,
    )
    .await?;
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (client, name) in collect(
        c,
        "SELECT g.client, g.name FROM client_groups g JOIN clients c ON c.id = g.client
         WHERE $1::TEXT IS NULL OR c.kind = $1 ORDER BY g.client, g.ordinal",
        &[&kind],
        |row| Ok((text(row, 0, "group client")?, text(row, 1, "group name")?)),
    )
    .await?
    {
        groups.entry(client).or_default().push(name);
    }
    for client in &mut clients {
        if let Some(g) = groups.remove(&client.id) {
            client.groups = g;
        }
    }
    Ok(clients)
}

/// Refuses a key a device revoked whole held.
async fn refuse_retired_key(tx: &Tx<'_>, key: &[u8]) -> Result<(), Abort> {
    let holder = tx
        .query_opt(
            "SELECT client FROM retired_keys WHERE public_key = $1",
            &[&key],
        )
        .await
        .map_err(|e| pg(e, "reading the retired keys"))?;
    match holder {
        Some(row) => {
            let device = text(&row, 0, "retired key holder")?;
            Err(Abort::from(Refused::Conflict(format!(
                "this key belonged to device {device:?}, which was revoked: a revoked device's \
                 key is never accepted again; make a new key"
            ))))
        }
        None => Ok(()),
    }
}

/// A refusal of a registry change, as the error the registry methods return.
fn refused_as_conflict(e: Abort) -> Abort {
    match e {
        Abort::Refused(r) => Abort::Store(StoreError::Conflict(r.to_string())),
        e => e,
    }
}

/// Inserts one client with its groups.
async fn insert_client(tx: &Tx<'_>, client: &ClientRecord) -> Result<(), Abort> {
    if let Some(key) = &client.public_key {
        refuse_retired_key(tx, key).await.map_err(|e| match e {
            Abort::Refused(r) => {
                Abort::Store(StoreError::Conflict(format!("client {:?}: {r}", client.id)))
            }
            e => e,
        })?;
    }
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO clients ({CLIENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO NOTHING"
            ),
            &[
                &client.id,
                &client.kind.as_str(),
                &client.public_key,
                &client.role,
                &client.enrollment_code_key.as_ref().map(|k| &k[..]),
                &client
                    .enrolled_at
                    .map(|t| stored(t, "enrolled_at"))
                    .transpose()?,
                &client
                    .revoked_at
                    .map(|t| stored(t, "revoked_at"))
                    .transpose()?,
                &stored(client.created_at, "created_at")?,
            ],
        )
        .await
        .map_err(|e| pg(e, "inserting the client"))?;
    if inserted == 0 {
        return Err(Abort::Store(StoreError::Conflict(format!(
            "client {:?} already exists",
            client.id
        ))));
    }
    for (i, group) in client.groups.iter().enumerate() {
        let ordinal = i64::try_from(i).unwrap_or(i64::MAX);
        exec(
            &**tx,
            "INSERT INTO client_groups (client, ordinal, name) VALUES ($1, $2, $3)",
            &[&client.id, &ordinal, group],
            "inserting a group",
        )
        .await?;
    }
    Ok(())
}

/// Marks a client revoked at `at` (see the SQLite backend's `revoke_client`).
async fn revoke_client(tx: &Tx<'_>, id: &str, at: u64) -> StoreResult<()> {
    let at = stored(at, "revoked_at")?;
    exec(
        &**tx,
        "INSERT INTO retired_keys (public_key, client, retired_at)
         SELECT public_key, id, $2 FROM clients
         WHERE id = $1 AND kind = 'device' AND public_key IS NOT NULL
         ON CONFLICT DO NOTHING",
        &[&id, &at],
        "retiring the device's key",
    )
    .await?;
    let n = exec(
        &**tx,
        "UPDATE clients SET
            revoked_at = COALESCE(revoked_at, $2),
            enrollment_code_key = NULL,
            public_key = CASE kind WHEN 'device' THEN NULL ELSE public_key END,
            enrolled_at = CASE kind WHEN 'device' THEN NULL ELSE enrolled_at END
         WHERE id = $1",
        &[&id, &at],
        "revoking the client",
    )
    .await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("client {id:?}")));
    }
    Ok(())
}

/// Revokes every grant family of a client; returns how many grants were live.
async fn revoke_grants(tx: &Tx<'_>, client: &str) -> StoreResult<u64> {
    let live: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM grants WHERE client = $1 AND NOT used AND NOT family_revoked",
            &[&client],
        )
        .await
        .map_err(|e| pg(e, "counting live grants"))?
        .try_get(0)
        .map_err(|e| column(e, "grant count"))?;
    exec(
        &**tx,
        "UPDATE grants SET family_revoked = TRUE
         WHERE NOT family_revoked AND family IN (SELECT family FROM grants WHERE client = $1)",
        &[&client],
        "revoking the families",
    )
    .await?;
    u64::try_from(live).map_err(|_| StoreError::Corrupt(format!("grant count {live}")))
}

fn command_number(c: Command) -> i64 {
    i64::try_from(c.as_u64()).unwrap_or(i64::MAX)
}

/// Tokens issued to `subject` with `expires_at ≥ live_after`.
async fn live_tokens(tx: &Tx<'_>, subject: &str, live_after: i64) -> StoreResult<Vec<IssuedToken>> {
    collect(
        &**tx,
        &format!(
            "SELECT {TOKEN_COLUMNS} FROM issued_tokens
             WHERE subject = $1 AND expires_at >= $2 ORDER BY issued_at, cti"
        ),
        &[&subject, &live_after],
        token_row,
    )
    .await
}

/// Subjects of a revocation in the order named, each once; whole wins.
#[derive(Default)]
struct Subjects(Vec<(String, bool, Option<ClientRecord>)>);

impl Subjects {
    fn add(&mut self, id: &str, whole: bool, client: Option<ClientRecord>) {
        match self.0.iter_mut().find(|(s, _, _)| s == id) {
            Some(held) => held.1 |= whole,
            None => self.0.push((id.to_owned(), whole, client)),
        }
    }
}

/// Resolves revocation targets inside the revoking transaction (as the SQLite backend).
async fn resolve(
    tx: &Tx<'_>,
    targets: &[Target],
    now: u64,
    leeway: u64,
    unmatched: Unmatched,
) -> StoreResult<Resolved> {
    let live_after = bound(now.saturating_sub(leeway));
    let unmatched = |e: StoreError| match unmatched {
        Unmatched::Refuse => Err(e),
        Unmatched::Skip => Ok(()),
    };
    let mut resolved = Resolved::default();
    let mut subjects = Subjects::default();
    for target in targets {
        match target {
            Target::TokenHash(_) | Target::TokenId(_) => {
                let (column, key, what) = match target {
                    Target::TokenHash(hash) => (
                        "hash",
                        &hash[..],
                        format!("token hash {}", hex::encode(hash)),
                    ),
                    Target::TokenId(cti) => {
                        ("cti", &cti[..], format!("token id {}", hex::encode(cti)))
                    }
                    _ => unreachable!("matched above"),
                };
                let token = collect(
                    &**tx,
                    &format!(
                        "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                         WHERE {column} = $1 AND expires_at >= $2"
                    ),
                    &[&key, &live_after],
                    token_row,
                )
                .await?
                .pop();
                let Some(t) = token else {
                    unmatched(StoreError::NotFound(format!(
                        "{what}: no live token of this hub has it (unknown, or already expired)"
                    )))?;
                    continue;
                };
                // Revoked by hash before: nothing more to do (and nothing counted).
                let listed = tx
                    .query_opt(
                        "SELECT 1 FROM stream_entries WHERE token_hash = $1 LIMIT 1",
                        &[&&t.hash[..]],
                    )
                    .await
                    .map_err(|e| pg(e, "looking the token up"))?
                    .is_some();
                if !listed && !resolved.tokens.iter().any(|(held, _)| held.hash == t.hash) {
                    let holder = client_without_groups(&**tx, &t.subject).await?;
                    resolved.tokens.push((t, holder));
                }
            }
            Target::Subject(id) => {
                let client = client_without_groups(&**tx, id).await?;
                if client.is_none() && live_tokens(tx, id, live_after).await?.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no client {id:?}, and no live token issued to it"
                    )))?;
                    continue;
                }
                subjects.add(id, false, client);
            }
            Target::Device(id) => match client_without_groups(&**tx, id).await? {
                Some(c) if c.kind == ClientKind::Device => subjects.add(id, true, Some(c)),
                Some(c) => unmatched(StoreError::NotFound(format!(
                    "{id:?} is a registered {}, not a device (revoke it as a subject)",
                    c.kind.as_str()
                )))?,
                None => unmatched(StoreError::NotFound(format!("no device {id:?}")))?,
            },
            Target::Group(group) => {
                let members = collect(
                    &**tx,
                    &format!(
                        "SELECT {} FROM clients c JOIN client_groups g ON g.client = c.id
                         WHERE g.name = $1 AND c.kind = 'device' ORDER BY c.id",
                        CLIENT_COLUMNS
                            .split(", ")
                            .map(|c| format!("c.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[group],
                    client_row,
                )
                .await?;
                if members.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no device in group {group:?}"
                    )))?;
                }
                for c in members {
                    subjects.add(&c.id.clone(), true, Some(c));
                }
            }
            Target::Role(role) => {
                let members = collect(
                    &**tx,
                    &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE role = $1 ORDER BY id"),
                    &[role],
                    client_row,
                )
                .await?;
                if members.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no client with role {role:?}"
                    )))?;
                }
                for c in members {
                    let whole = c.kind == ClientKind::Device;
                    subjects.add(&c.id.clone(), whole, Some(c));
                }
            }
            Target::Devices(ids) => {
                // One query for the whole list, however long.
                let mut found: HashMap<String, ClientRecord> = collect(
                    &**tx,
                    &format!(
                        "SELECT {CLIENT_COLUMNS} FROM clients
                         WHERE id = ANY($1) AND kind = 'device'"
                    ),
                    &[ids],
                    client_row,
                )
                .await?
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect();
                let unknown: Vec<&str> = ids
                    .iter()
                    .filter(|id| !found.contains_key(id.as_str()))
                    .map(String::as_str)
                    .collect();
                if !unknown.is_empty() {
                    let shown: Vec<&str> = unknown.iter().take(5).copied().collect();
                    unmatched(StoreError::NotFound(format!(
                        "{} of the {} ids are not registered devices ({}{}); nothing was revoked",
                        unknown.len(),
                        ids.len(),
                        shown.join(", "),
                        if unknown.len() > shown.len() {
                            ", …"
                        } else {
                            ""
                        }
                    )))?;
                }
                for id in ids {
                    if let Some(c) = found.remove(id) {
                        subjects.add(id, true, Some(c));
                    }
                }
            }
        }
    }
    for (id, whole, client) in subjects.0 {
        let live_tokens = live_tokens(tx, &id, live_after).await?;
        resolved.subjects.push(ResolvedSubject {
            id,
            client,
            whole,
            live_tokens,
        });
    }
    Ok(resolved)
}

/// Inserts one numbered change with its entries (the stream row is the caller's).
async fn insert_change(
    tx: &Tx<'_>,
    stream: &str,
    seq: u64,
    created_at: u64,
    entries: &[Addressed],
) -> StoreResult<()> {
    let seq = stored(seq, "change seq")?;
    exec(
        &**tx,
        "INSERT INTO revocation_changes (stream, seq, created_at, published)
         VALUES ($1, $2, $3, FALSE)",
        &[&stream, &seq, &stored(created_at, "created_at")?],
        "inserting a change",
    )
    .await?;
    // All the entries in one statement (a mass revocation has thousands).
    let mut ordinals = Vec::with_capacity(entries.len());
    let mut audiences = Vec::with_capacity(entries.len());
    let mut hashes: Vec<Option<Vec<u8>>> = Vec::with_capacity(entries.len());
    let mut subjects: Vec<Option<String>> = Vec::with_capacity(entries.len());
    let mut befores: Vec<Option<i64>> = Vec::with_capacity(entries.len());
    let mut expiries = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        ordinals.push(i64::try_from(i).unwrap_or(i64::MAX));
        audiences.push(e.audience.as_str().to_owned());
        expiries.push(stored(e.entry.expires_at(), "entry expires_at")?);
        match &e.entry {
            Entry::Token { hash, .. } => {
                hashes.push(Some(hash.to_vec()));
                subjects.push(None);
                befores.push(None);
            }
            Entry::Subject {
                subject,
                issued_before,
                ..
            } => {
                hashes.push(None);
                subjects.push(Some(subject.as_str().to_owned()));
                befores.push(Some(stored(*issued_before, "entry issued_before")?));
            }
        }
    }
    exec(
        &**tx,
        &format!(
            "INSERT INTO stream_entries (stream, seq, ordinal, {ENTRY_COLUMNS})
             SELECT $1::TEXT, $2::BIGINT, * FROM UNNEST($3::BIGINT[], $4::TEXT[], $5::BYTEA[], $6::TEXT[],
                                          $7::BIGINT[], $8::BIGINT[])"
        ),
        &[
            &stream, &seq, &ordinals, &audiences, &hashes, &subjects, &befores, &expiries,
        ],
        "inserting the entries",
    )
    .await?;
    Ok(())
}

/// Revokes `targets` inside `tx` (see [`Store::revoke`]); the caller commits.
async fn revoke_in(
    tx: &Tx<'_>,
    targets: &[Target],
    now: u64,
    leeway: u64,
    unmatched: Unmatched,
) -> StoreResult<Outcome> {
    let resolved = resolve(tx, targets, now, leeway, unmatched).await?;
    let plan =
        revocation::plan(&resolved, now, leeway).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    for subject in &resolved.subjects {
        let Some(client) = &subject.client else {
            continue;
        };
        if subject.whole {
            revoke_client(tx, &client.id, now).await?;
        } else {
            exec(
                &**tx,
                "UPDATE clients SET tokens_revoked_before =
                    GREATEST(COALESCE(tokens_revoked_before, 0), $2) WHERE id = $1",
                &[&client.id, &stored(now, "now")?],
                "recording the cut-off",
            )
            .await?;
        }
        revoke_grants(tx, &subject.id).await?;
    }
    let mut outcome = Outcome {
        revoked: plan.revoked,
        controls: plan.controls.clone(),
        ..Outcome::default()
    };
    for (name, changes) in plan.changes {
        // The stream's counter row, locked by this transaction until it commits: the
        // numbers it takes are the next ones, with no gap, whichever replica runs it.
        let n = u64::try_from(changes.len()).unwrap_or(u64::MAX);
        let row = tx
            .query_one(
                "INSERT INTO revocation_streams (name, seq) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET seq = revocation_streams.seq + $2
                 RETURNING seq",
                &[&name, &stored(n, "changes")?],
            )
            .await
            .map_err(|e| pg(e, "numbering the stream"))?;
        let last = time(&row, 0, "stream seq")?;
        let mut seq = last - n;
        for entries in changes {
            seq += 1;
            insert_change(tx, &name, seq, now, &entries).await?;
            outcome.changes.push(Change {
                stream: name.clone(),
                seq,
                created_at: now,
                entries,
            });
        }
        outcome.latest.insert(name, seq);
    }
    for c in &plan.controls {
        exec(
            &**tx,
            "INSERT INTO pending_controls (device, command, issued_at)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[
                &c.device,
                &command_number(c.command),
                &stored(c.issued_at, "issued_at")?,
            ],
            "recording a control message",
        )
        .await?;
    }
    Ok(outcome)
}

// --- one request, one transaction (Store::commit) ---

async fn commit_in(tx: &Tx<'_>, c: &RequestCommit) -> Result<Committed, Abort> {
    let now = c.now();
    if !remember_nonce_in(tx, &c.client, &c.nonce, now, c.nonce_expires_at).await? {
        return Err(Abort::from(Refused::Replay));
    }
    if !take_rate_token_in(tx, &c.client, c.now_ms, c.rate).await? {
        return Err(Abort::from(Refused::RateLimited));
    }
    Ok(match &c.effect {
        Effect::None => Committed::Done,
        Effect::Enroll { public_key } => {
            enroll_in(tx, &c.client, public_key, now).await?;
            Committed::Done
        }
        Effect::Issue {
            token,
            grant,
            spends,
        } => {
            if let Some(hash) = spends {
                match use_grant_in(tx, hash, now).await? {
                    GrantUse::Fresh(_) => {}
                    // Kept: the request fails, the reuse is known (see `commit`).
                    used @ GrantUse::Reused(_) => {
                        return Ok(Committed::Spent(used));
                    }
                    other => return Err(Abort::from(Refused::Grant(other))),
                }
            }
            record_issued_in(tx, token, grant.as_ref()).await?;
            Committed::Done
        }
        Effect::SpendGrant(hash) => Committed::Spent(use_grant_in(tx, hash, now).await?),
        Effect::RevokeGrantsOf(client) => {
            Committed::GrantsRevoked(revoke_grants(tx, client).await?)
        }
        Effect::Revoke {
            targets,
            leeway,
            unmatched,
        } => match revoke_in(tx, targets, now, *leeway, *unmatched).await {
            Ok(outcome) => Committed::Revoked(outcome),
            Err(StoreError::NotFound(m)) => return Err(Abort::from(Refused::NotFound(m))),
            Err(StoreError::Conflict(m)) => return Err(Abort::from(Refused::Conflict(m))),
            Err(e) => return Err(e.into()),
        },
    })
}

/// Remembers a nonce until `expires_at`; `false` for a replay. Unlike the SQLite backend,
/// a request's commit does not delete other expired nonces: under `SERIALIZABLE` that read
/// of the expiry index would make concurrent requests conflict; [`Store::prune`] does it.
async fn remember_nonce_in(
    tx: &Tx<'_>,
    client: &str,
    nonce: &[u8; 16],
    now: u64,
    expires_at: u64,
) -> StoreResult<bool> {
    let fresh = exec(
        &**tx,
        "INSERT INTO nonces (client, nonce, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (client, nonce) DO UPDATE SET expires_at = excluded.expires_at
         WHERE nonces.expires_at < $4",
        &[
            &client,
            &&nonce[..],
            &stored(expires_at, "expires_at")?,
            &bound(now),
        ],
        "recording the nonce",
    )
    .await?
        == 1;
    Ok(fresh)
}

async fn take_rate_token_in(
    tx: &Tx<'_>,
    client: &str,
    now_ms: u64,
    rate: RateLimit,
) -> StoreResult<bool> {
    if rate == RateLimit::NONE {
        return Ok(true);
    }
    let row = tx
        .query_opt(
            "SELECT tokens, updated_ms FROM rate_buckets WHERE client = $1",
            &[&client],
        )
        .await
        .map_err(|e| pg(e, "reading the bucket"))?;
    let burst = f64::from(rate.burst);
    let (tokens, updated_ms) = match row {
        None => (burst, now_ms),
        Some(row) => {
            let tokens: f64 = row.try_get(0).map_err(|e| column(e, "bucket tokens"))?;
            let updated_ms = time(&row, 1, "bucket updated_ms")?;
            if !tokens.is_finite() || tokens < 0.0 {
                return Err(StoreError::Corrupt(format!("bucket holds {tokens} tokens")));
            }
            let elapsed = now_ms.saturating_sub(updated_ms);
            let refill = if elapsed > 0 && rate.per_second > 0.0 {
                elapsed as f64 * rate.per_second / 1000.0
            } else {
                0.0
            };
            ((tokens + refill).min(burst), now_ms.max(updated_ms))
        }
    };
    if tokens < 1.0 - RATE_EPSILON {
        return Ok(false);
    }
    exec(
        &**tx,
        "INSERT INTO rate_buckets (client, tokens, updated_ms) VALUES ($1, $2, $3)
         ON CONFLICT (client) DO UPDATE SET tokens = excluded.tokens,
                                            updated_ms = excluded.updated_ms",
        &[
            &client,
            &(tokens - 1.0).max(0.0),
            &stored(updated_ms, "now_ms")?,
        ],
        "updating the bucket",
    )
    .await?;
    Ok(true)
}

async fn enroll_in(tx: &Tx<'_>, id: &str, key: &[u8], at: u64) -> Result<(), Abort> {
    let row = tx
        .query_opt(
            "SELECT public_key, enrolled_at, revoked_at FROM clients WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| pg(e, "reading the client"))?;
    let Some(row) = row else {
        return Err(Abort::from(Refused::NotFound(format!("client {id:?}"))));
    };
    let current = opt_blob(&row, 0, "client public key")?;
    let enrolled_at = opt_time(&row, 1, "enrolled_at")?;
    let revoked_at = opt_time(&row, 2, "revoked_at")?;
    refuse_retired_key(tx, key).await?;
    if revoked_at.is_some() {
        return Err(Abort::from(Refused::Conflict(format!(
            "client {id:?} is revoked"
        ))));
    }
    match current {
        Some(current) if current != key => {
            return Err(Abort::from(Refused::Conflict(format!(
                "client {id:?} is already enrolled with a different key"
            ))));
        }
        Some(_) if enrolled_at.is_some() => return Ok(()),
        _ => {}
    }
    exec(
        &**tx,
        "UPDATE clients SET public_key = $2, enrolled_at = $3, enrollment_code_key = NULL
         WHERE id = $1",
        &[&id, &key, &stored(at, "enrolled_at")?],
        "updating the client",
    )
    .await?;
    Ok(())
}

async fn record_issued_in(
    tx: &Tx<'_>,
    token: &IssuedToken,
    grant: Option<&GrantRecord>,
) -> Result<(), Abort> {
    // Re-checked in the transaction: a revocation that committed after the hub decided to
    // issue still wins (and one committing concurrently makes one of the two run again).
    let holder = tx
        .query_opt(
            "SELECT revoked_at, tokens_revoked_before FROM clients WHERE id = $1",
            &[&token.subject],
        )
        .await
        .map_err(|e| pg(e, "reading the holder"))?;
    if let Some(row) = holder {
        let revoked_at = opt_time(&row, 0, "revoked_at")?;
        let before = opt_time(&row, 1, "tokens_revoked_before")?;
        match (revoked_at, before) {
            (Some(_), _) => {
                return Err(Abort::from(Refused::HolderRevoked(token.subject.clone())));
            }
            (None, Some(before)) if token.issued_at < before => {
                return Err(Abort::from(Refused::CutOff {
                    subject: token.subject.clone(),
                    issued_before: before,
                }));
            }
            _ => {}
        }
    }
    let inserted = exec(
        &**tx,
        &format!(
            "INSERT INTO issued_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (cti) DO NOTHING"
        ),
        &[
            &&token.cti[..],
            &&token.hash[..],
            &token.kind.as_str(),
            &token.subject,
            &token.audience,
            &token.scope,
            &stored(token.issued_at, "issued_at")?,
            &stored(token.expires_at, "expires_at")?,
        ],
        "inserting the token",
    )
    .await?;
    if inserted == 0 {
        return Err(Abort::from(Refused::Conflict(format!(
            "a token with cti {} is already recorded",
            hex::encode(token.cti)
        ))));
    }
    if let Some(g) = grant {
        let inserted = exec(
            &**tx,
            &format!(
                "INSERT INTO grants ({GRANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE,
                 EXISTS (SELECT 1 FROM grants WHERE family = $2 AND family_revoked))
                 ON CONFLICT (hash) DO NOTHING"
            ),
            &[
                &&g.hash[..],
                &&g.family[..],
                &g.client,
                &g.kind.as_str(),
                &g.audience,
                &g.scope,
                &stored(g.expires_at, "grant expires_at")?,
                &stored(g.created_at, "grant created_at")?,
            ],
            "inserting the grant",
        )
        .await?;
        if inserted == 0 {
            return Err(Abort::from(Refused::Conflict(
                "a grant with this hash is already recorded".to_owned(),
            )));
        }
    }
    Ok(())
}

async fn grant_state<C: GenericClient + Sync>(
    c: &C,
    hash: &[u8; 32],
) -> StoreResult<Option<GrantState>> {
    Ok(collect(
        c,
        &format!("SELECT {GRANT_COLUMNS} FROM grants WHERE hash = $1"),
        &[&&hash[..]],
        grant_row,
    )
    .await?
    .pop())
}

async fn use_grant_in(tx: &Tx<'_>, hash: &[u8; 32], now: u64) -> StoreResult<GrantUse> {
    let Some(state) = grant_state(&**tx, hash).await? else {
        return Ok(GrantUse::Unknown);
    };
    let outcome = state.classify(now);
    match &outcome {
        GrantUse::Reused(grant) => {
            exec(
                &**tx,
                "UPDATE grants SET family_revoked = TRUE WHERE family = $1",
                &[&&grant.family[..]],
                "revoking the family",
            )
            .await?;
        }
        GrantUse::Fresh(_) => {
            exec(
                &**tx,
                "UPDATE grants SET used = TRUE WHERE hash = $1",
                &[&&hash[..]],
                "marking the grant used",
            )
            .await?;
        }
        _ => {}
    }
    Ok(outcome)
}

impl Store for Postgres {
    // --- registry ---

    async fn add_client(&self, client: ClientRecord) -> StoreResult<()> {
        write_tx!(self, "add_client", |tx| insert_client(tx, &client).await)
    }

    async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        let rows = self
            .query(
                "client",
                &format!(
                    "SELECT {CLIENT_COLUMNS},
                        ARRAY(SELECT name FROM client_groups WHERE client = $1 ORDER BY ordinal)
                     FROM clients WHERE id = $1"
                ),
                &[&id],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut client = client_row(row)?;
        client.groups = row.try_get(8).map_err(|e| column(e, "client groups"))?;
        Ok(Some(client))
    }

    async fn clients(&self, kind: Option<ClientKind>) -> StoreResult<Vec<ClientRecord>> {
        self.ready().await?;
        let mut conn = self.conn().await?;
        // One snapshot for both queries.
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg(e, "clients: beginning a read"))?;
        let clients = load_clients(&*tx, kind).await?;
        tx.commit()
            .await
            .map_err(|e| pg(e, "clients: ending a read"))?;
        Ok(clients)
    }

    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        write_tx!(self, "remove_client", |tx| {
            let removed = exec(
                &**tx,
                "DELETE FROM clients WHERE id = $1",
                &[&id],
                "deleting the client",
            )
            .await?;
            exec(
                &**tx,
                "DELETE FROM grants WHERE client = $1",
                &[&id],
                "deleting the client's grants",
            )
            .await?;
            Ok(removed > 0)
        })
    }

    async fn set_role(
        &self,
        id: &str,
        role: &str,
        disallowed: Vec<Target>,
        now: u64,
        leeway: u64,
    ) -> StoreResult<Outcome> {
        write_tx!(self, "set_role", |tx| {
            let n = exec(
                &**tx,
                "UPDATE clients SET role = $2 WHERE id = $1",
                &[&id, &role],
                "updating the role",
            )
            .await?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("client {id:?}")).into());
            }
            if disallowed.is_empty() {
                return Ok(Outcome::default());
            }
            Ok(revoke_in(tx, &disallowed, now, leeway, Unmatched::Skip).await?)
        })
    }

    async fn reprovision_device(
        &self,
        id: &str,
        public_key: Option<Vec<u8>>,
        code_key: Option<[u8; 32]>,
    ) -> StoreResult<()> {
        write_tx!(self, "reprovision_device", |tx| {
            let Some(client) = client_without_groups(&**tx, id).await? else {
                return Err(StoreError::NotFound(format!("client {id:?}")).into());
            };
            if client.kind != ClientKind::Device {
                return Err(StoreError::Conflict(format!(
                    "{id:?} is an {}, not a device",
                    client.kind.as_str()
                ))
                .into());
            }
            if client.revoked_at.is_none() && client.enrolled_at.is_some() {
                return Err(StoreError::Conflict(format!(
                    "device {id:?} is enrolled and not revoked: revoke it first (that cuts its \
                     key and tokens), then provision it again"
                ))
                .into());
            }
            if let Some(key) = &public_key {
                refuse_retired_key(tx, key)
                    .await
                    .map_err(refused_as_conflict)?;
            }
            exec(
                &**tx,
                "UPDATE clients SET public_key = $2, enrollment_code_key = $3,
                    enrolled_at = NULL, revoked_at = NULL
                 WHERE id = $1",
                &[&id, &public_key, &code_key.as_ref().map(|k| &k[..])],
                "reprovisioning the device",
            )
            .await?;
            Ok(())
        })
    }

    async fn add_clients(&self, clients: Vec<ClientRecord>) -> StoreResult<()> {
        write_tx!(self, "add_clients", |tx| {
            for client in &clients {
                insert_client(tx, client).await?;
            }
            Ok(())
        })
    }

    // --- requests ---

    async fn nonce_seen(&self, client: &str, nonce: &[u8; 16], now: u64) -> StoreResult<bool> {
        let rows = self
            .query(
                "nonce_seen",
                "SELECT 1 FROM nonces WHERE client = $1 AND nonce = $2 AND expires_at >= $3",
                &[&client, &&nonce[..], &bound(now)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn grant(&self, hash: &[u8; 32]) -> StoreResult<Option<GrantState>> {
        self.ready().await?;
        let conn = self.conn().await?;
        grant_state(&**conn, hash)
            .await
            .map_err(|e| super::sqlite::prefix(e, "grant"))
    }

    async fn commit(&self, request: RequestCommit) -> StoreResult<Result<Committed, Refused>> {
        let done = transaction!(self, "commit", |tx| commit_in(tx, &request).await)?;
        // A reused grant's family revocation is committed, and the request refused.
        Ok(match done {
            Ok(Committed::Spent(used @ GrantUse::Reused(_)))
                if matches!(request.effect, Effect::Issue { .. }) =>
            {
                Err(Refused::Grant(used))
            }
            other => other,
        })
    }

    // --- issued tokens ---

    async fn issued(&self, cti: &[u8]) -> StoreResult<Option<IssuedToken>> {
        let rows = self
            .query(
                "issued",
                &format!("SELECT {TOKEN_COLUMNS} FROM issued_tokens WHERE cti = $1"),
                &[&cti],
            )
            .await?;
        rows.first().map(token_row).transpose()
    }

    async fn issued_to(&self, subject: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        let rows = self
            .query(
                "issued_to",
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                     WHERE subject = $1 AND expires_at > $2 ORDER BY issued_at, cti"
                ),
                &[&subject, &bound(now)],
            )
            .await?;
        rows.iter().map(token_row).collect()
    }

    async fn issued_for(&self, audience: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        let rows = self
            .query(
                "issued_for",
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                     WHERE audience = $1 AND expires_at > $2 ORDER BY issued_at, cti"
                ),
                &[&audience, &bound(now)],
            )
            .await?;
        rows.iter().map(token_row).collect()
    }

    // --- revocation ---

    async fn revoke(
        &self,
        targets: Vec<Target>,
        now: u64,
        leeway: u64,
        unmatched: Unmatched,
    ) -> StoreResult<Outcome> {
        // Not through `write`: a target naming nothing is NotFound, as the trait says.
        transaction!(self, "revoke", |tx| {
            Ok(revoke_in(tx, &targets, now, leeway, unmatched).await?)
        })?
        .map_err(|r| StoreError::Conflict(format!("revoke: {r}")))
    }

    async fn streams(&self) -> StoreResult<Vec<StreamState>> {
        let rows = self
            .query(
                "streams",
                "SELECT name, seq, snapshot_seq, snapshot_pages FROM revocation_streams
                 ORDER BY name",
                &[],
            )
            .await?;
        rows.iter().map(stream_row).collect()
    }

    async fn stream_entries(
        &self,
        stream: &str,
        from: u64,
        now: u64,
        leeway: u64,
        max_entries: usize,
    ) -> StoreResult<StreamRead> {
        self.ready().await?;
        let mut conn = self.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg(e, "stream_entries: beginning a read"))?;
        let latest = match tx
            .query_opt(
                "SELECT seq FROM revocation_streams WHERE name = $1",
                &[&stream],
            )
            .await
            .map_err(|e| pg(e, "stream_entries: reading the stream"))?
        {
            Some(row) => time(&row, 0, "stream seq")?,
            None => 0,
        };
        let limit = i64::try_from(max_entries).unwrap_or(i64::MAX);
        let rows = collect(
            &*tx,
            &format!(
                "SELECT seq, {ENTRY_COLUMNS} FROM stream_entries
                 WHERE stream = $1 AND seq >= $2 AND expires_at >= $3
                 ORDER BY seq, ordinal LIMIT $4"
            ),
            &[
                &stream,
                &bound(from),
                &bound(now.saturating_sub(leeway)),
                &limit,
            ],
            |row| Ok((time(row, 0, "entry seq")?, entry_row(row, 1)?)),
        )
        .await?;
        tx.commit()
            .await
            .map_err(|e| pg(e, "stream_entries: ending a read"))?;
        let complete = rows.len() < max_entries;
        let mut changes: Vec<(u64, Vec<Addressed>)> = Vec::new();
        for (seq, entry) in rows {
            match changes.last_mut() {
                Some((s, entries)) if *s == seq => entries.push(entry),
                _ => changes.push((seq, vec![entry])),
            }
        }
        Ok(StreamRead {
            latest,
            changes,
            complete,
        })
    }

    async fn set_snapshot_published(&self, stream: &str, seq: u64, pages: u64) -> StoreResult<()> {
        write_tx!(self, "set_snapshot_published", |tx| {
            exec(
                &**tx,
                "UPDATE revocation_streams SET snapshot_seq = $2, snapshot_pages = $3
                 WHERE name = $1",
                &[&stream, &stored(seq, "seq")?, &stored(pages, "pages")?],
                "updating the stream",
            )
            .await?;
            Ok(())
        })
    }

    async fn unpublished_changes(&self, created_before: u64) -> StoreResult<Vec<Change>> {
        let rows = self
            .query(
                "unpublished_changes",
                "SELECT c.stream, c.seq, c.created_at,
                        e.audience, e.token_hash, e.subject, e.issued_before, e.expires_at,
                        e.ordinal
                 FROM revocation_changes c
                 LEFT JOIN stream_entries e ON e.stream = c.stream AND e.seq = c.seq
                 WHERE NOT c.published AND c.created_at <= $1
                 ORDER BY c.stream, c.seq, e.ordinal",
                &[&bound(created_before)],
            )
            .await?;
        let mut changes: Vec<Change> = Vec::new();
        for row in &rows {
            let stream = text(row, 0, "change stream")?;
            let seq = time(row, 1, "change seq")?;
            let created_at = time(row, 2, "change created_at")?;
            let ordinal: Option<i64> = row.try_get(8).map_err(|e| column(e, "entry ordinal"))?;
            // No entry row: the change's entries were all pruned.
            let entry = ordinal.map(|_| entry_row(row, 3)).transpose()?;
            let same = changes
                .last()
                .is_some_and(|c| c.stream == stream && c.seq == seq);
            if !same {
                changes.push(Change {
                    stream,
                    seq,
                    created_at,
                    entries: Vec::new(),
                });
            }
            if let (Some(entry), Some(change)) = (entry, changes.last_mut()) {
                change.entries.push(entry);
            }
        }
        Ok(changes)
    }

    async fn mark_published(&self, ranges: Vec<(String, u64, u64)>) -> StoreResult<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        write_tx!(self, "mark_published", |tx| {
            // One statement per range, whatever its length: the primary key finds it.
            for (stream, from, to) in &ranges {
                exec(
                    &**tx,
                    "UPDATE revocation_changes SET published = TRUE
                     WHERE stream = $1 AND seq BETWEEN $2 AND $3 AND NOT published",
                    &[stream, &bound(*from), &bound(*to)],
                    "marking changes published",
                )
                .await?;
            }
            Ok(())
        })
    }

    async fn unsent_controls(
        &self,
        created_before: u64,
        limit: usize,
    ) -> StoreResult<Vec<PendingControl>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "unsent_controls",
                "SELECT device, command, issued_at FROM pending_controls
                 WHERE issued_at <= $1 ORDER BY issued_at, device, command LIMIT $2",
                &[&bound(created_before), &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let n: i64 = row.try_get(1).map_err(|e| column(e, "control command"))?;
                Ok(PendingControl {
                    device: text(row, 0, "control device")?,
                    command: u64::try_from(n)
                        .ok()
                        .and_then(Command::from_u64)
                        .ok_or_else(|| StoreError::Corrupt(format!("control command {n}")))?,
                    issued_at: time(row, 2, "control issued_at")?,
                })
            })
            .collect()
    }

    async fn mark_controls_sent(&self, controls: Vec<PendingControl>) -> StoreResult<()> {
        if controls.is_empty() {
            return Ok(());
        }
        write_tx!(self, "mark_controls_sent", |tx| {
            for c in &controls {
                exec(
                    &**tx,
                    "DELETE FROM pending_controls
                     WHERE device = $1 AND command = $2 AND issued_at = $3",
                    &[&c.device, &command_number(c.command), &bound(c.issued_at)],
                    "forgetting a control message",
                )
                .await?;
            }
            Ok(())
        })
    }

    // --- signing keys ---

    async fn add_key(&self, key: KeyRecord) -> StoreResult<()> {
        write_tx!(self, "add_key", |tx| {
            let inserted = exec(
                &**tx,
                &format!(
                    "INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (kid) DO NOTHING"
                ),
                &[
                    &&key.kid[..],
                    &key.public_key,
                    &key.sealed_private_key,
                    &stored(key.created_at, "created_at")?,
                    &stored(key.active_from, "active_from")?,
                    &key.retire_after
                        .map(|t| stored(t, "retire_after"))
                        .transpose()?,
                    &key.published_at
                        .map(|t| stored(t, "published_at"))
                        .transpose()?,
                ],
                "inserting the key",
            )
            .await?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "a key with kid {} exists",
                    hex::encode(key.kid)
                ))
                .into());
            }
            Ok(())
        })
    }

    async fn keys(&self) -> StoreResult<Vec<KeyRecord>> {
        let rows = self
            .query(
                "keys",
                &format!("SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, id"),
                &[],
            )
            .await?;
        rows.iter().map(key_row).collect()
    }

    async fn mark_key_published(
        &self,
        kid: &[u8; 8],
        at: u64,
        active_from: u64,
    ) -> StoreResult<KeyRecord> {
        write_tx!(self, "mark_key_published", |tx| {
            exec(
                &**tx,
                "UPDATE signing_keys SET published_at = $2,
                    active_from = GREATEST(active_from, $3)
                 WHERE kid = $1 AND published_at IS NULL",
                &[
                    &&kid[..],
                    &stored(at, "published_at")?,
                    &stored(active_from, "active_from")?,
                ],
                "updating the key",
            )
            .await?;
            let key = collect(
                &**tx,
                &format!("SELECT {KEY_COLUMNS} FROM signing_keys WHERE kid = $1"),
                &[&&kid[..]],
                key_row,
            )
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("key {}", hex::encode(kid))))?;
            Ok(key)
        })
    }

    async fn retire_key(&self, kid: &[u8; 8], retire_after: u64) -> StoreResult<()> {
        write_tx!(self, "retire_key", |tx| {
            let n = exec(
                &**tx,
                "UPDATE signing_keys SET retire_after = $2 WHERE kid = $1",
                &[&&kid[..], &stored(retire_after, "retire_after")?],
                "updating the key",
            )
            .await?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("key {}", hex::encode(kid))).into());
            }
            Ok(())
        })
    }

    // --- housekeeping ---

    async fn prune(&self, horizons: Horizons) -> StoreResult<Pruned> {
        let tokens_before = bound(horizons.tokens_before);
        let entries_before = bound(horizons.entries_before);
        let controls_before = bound(horizons.controls_before);
        let audit_before = bound(horizons.audit_before_ms);
        write_tx!(self, "prune", |tx| {
            let tokens = exec(
                &**tx,
                "DELETE FROM issued_tokens WHERE expires_at < $1",
                &[&tokens_before],
                "pruning issued tokens",
            )
            .await?;
            let grants = exec(
                &**tx,
                "DELETE FROM grants WHERE expires_at < $1",
                &[&tokens_before],
                "pruning grants",
            )
            .await?;
            // A snapshot retained with spent entries is republished without them.
            exec(
                &**tx,
                "UPDATE revocation_streams SET snapshot_seq = 0 WHERE name IN
                 (SELECT DISTINCT stream FROM stream_entries WHERE expires_at < $1)",
                &[&entries_before],
                "marking snapshots to republish",
            )
            .await?;
            let revocation_entries = exec(
                &**tx,
                "DELETE FROM stream_entries WHERE expires_at < $1",
                &[&entries_before],
                "pruning revocation entries",
            )
            .await?;
            // Published changes left without entries are only numbers now.
            exec(
                &**tx,
                "DELETE FROM revocation_changes c WHERE published AND NOT EXISTS
                 (SELECT 1 FROM stream_entries e WHERE e.stream = c.stream AND e.seq = c.seq)",
                &[],
                "pruning empty changes",
            )
            .await?;
            let audit_events = exec(
                &**tx,
                "DELETE FROM audit_log WHERE at_ms < $1",
                &[&audit_before],
                "pruning the audit log",
            )
            .await?;
            let controls = exec(
                &**tx,
                "DELETE FROM pending_controls WHERE issued_at < $1",
                &[&controls_before],
                "pruning control messages",
            )
            .await?;
            exec(
                &**tx,
                "DELETE FROM nonces WHERE expires_at < $1",
                &[&tokens_before],
                "pruning nonces",
            )
            .await?;
            Ok(Pruned {
                tokens,
                grants,
                revocation_entries,
                audit_events,
                controls,
            })
        })
    }

    // --- audit ---

    async fn audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        // One statement for the batch, the rows in the order given (ids follow it).
        let mut at = Vec::with_capacity(events.len());
        let mut counts = Vec::with_capacity(events.len());
        for e in &events {
            at.push(stored(e.at_ms, "at_ms")?);
            counts.push(stored(e.count.max(1), "count")?);
        }
        let column = |f: fn(&AuditEvent) -> &str| -> Vec<&str> { events.iter().map(f).collect() };
        let (actors, actions, targets, outcomes, reasons) = (
            column(|e| &e.actor),
            column(|e| &e.action),
            column(|e| &e.target),
            column(|e| &e.outcome),
            column(|e| &e.reason),
        );
        write_tx!(self, "audit", |tx| {
            exec(
                &**tx,
                &format!(
                    "INSERT INTO audit_log ({AUDIT_COLUMNS})
                     SELECT {AUDIT_COLUMNS} FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[],
                                                       $4::TEXT[], $5::TEXT[], $6::TEXT[],
                                                       $7::BIGINT[])
                     WITH ORDINALITY AS e ({AUDIT_COLUMNS}, n)
                     ORDER BY n"
                ),
                &[
                    &at, &actors, &actions, &targets, &outcomes, &reasons, &counts,
                ],
                "inserting the events",
            )
            .await?;
            Ok(())
        })
    }

    /// A session advisory lock ([`LEASE_KEY`]) on a connection of its own: kept while
    /// that connection answers; when it does not (the server restarted, the network
    /// broke), the server has released the lock with the session, and it is tried for
    /// again on a new connection.
    async fn hold_lease(&self) -> StoreResult<bool> {
        let mut held = self.inner.lease.lock().await;
        if let Some(client) = held.as_ref() {
            if !client.is_closed() && client.simple_query("SELECT 1").await.is_ok() {
                return Ok(true);
            }
            tracing::warn!(
                database = %self.inner.shown,
                "the housekeeping lease's connection broke: the lease is lost"
            );
            *held = None;
        }
        let conn = self.conn().await?;
        let row = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEASE_KEY])
            .await
            .map_err(|e| pg(e, "taking the housekeeping lease"))?;
        let took: bool = row.get(0);
        if took {
            // Out of the pool: the lock must never go back with a pooled session.
            *held = Some(deadpool_postgres::Object::take(conn));
        }
        Ok(took)
    }

    fn write_stats(&self) -> WriteStats {
        let n = self.inner.transactions.load(Ordering::Relaxed);
        WriteStats {
            transactions: n,
            writes: n,
        }
    }

    async fn revocation_entries(&self, now: u64, leeway: u64) -> StoreResult<u64> {
        let rows = self
            .query(
                "revocation_entries",
                "SELECT COUNT(*) FROM stream_entries WHERE expires_at >= $1",
                &[&bound(now.saturating_sub(leeway))],
            )
            .await?;
        let n: i64 = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("no count".into()))?
            .try_get(0)
            .map_err(|e| column(e, "entry count"))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("entry count {n}")))
    }

    async fn live_tokens(&self, now: u64) -> StoreResult<LiveTokens> {
        let rows = self
            .query(
                "live_tokens",
                "SELECT kind, COUNT(*) FROM issued_tokens WHERE expires_at > $1 GROUP BY kind",
                &[&bound(now)],
            )
            .await?;
        let mut live = LiveTokens::default();
        for row in rows {
            let kind: String = row.try_get(0).map_err(|e| column(e, "token kind"))?;
            let n: i64 = row.try_get(1).map_err(|e| column(e, "token count"))?;
            let n = u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("count {n}")))?;
            match TokenKind::parse(&kind) {
                Some(TokenKind::Device) => live.device = n,
                Some(TokenKind::Access) => live.access = n,
                None => return Err(StoreError::Corrupt(format!("token kind {kind:?}"))),
            }
        }
        Ok(live)
    }

    async fn audit_tail(&self, limit: usize) -> StoreResult<Vec<AuditEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "audit_tail",
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM
                     (SELECT id, {AUDIT_COLUMNS} FROM audit_log ORDER BY id DESC LIMIT $1) t
                     ORDER BY id"
                ),
                &[&limit],
            )
            .await?;
        rows.iter().map(audit_row).collect()
    }

    async fn audit_query(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEvent>> {
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let since = filter.since_ms.map_or(0, bound);
        let until = filter.until_ms.map_or(i64::MAX, bound);
        let rows = self
            .query(
                "audit_query",
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM
                     (SELECT id, {AUDIT_COLUMNS} FROM audit_log
                      WHERE at_ms >= $1 AND at_ms < $2
                        AND ($3::TEXT IS NULL OR actor = $3)
                        AND ($4::TEXT IS NULL OR target IN ($4, 'device ' || $4, 'subject ' || $4))
                        AND ($5::TEXT IS NULL OR action = $5)
                      ORDER BY at_ms DESC, id DESC LIMIT $6) t
                     ORDER BY at_ms, id"
                ),
                &[
                    &since,
                    &until,
                    &filter.actor,
                    &filter.target,
                    &filter.action,
                    &limit,
                ],
            )
            .await?;
        rows.iter().map(audit_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(
            hide_password("postgres://hub:s3cret@db.example:5432/tessera?sslmode=require"),
            "postgres://hub:***@db.example:5432/tessera?sslmode=require"
        );
        assert_eq!(
            hide_password("postgres://postgres@127.0.0.1/postgres"),
            "postgres://postgres@127.0.0.1/postgres"
        );
    }

    #[test]
    fn loopback_is_plain_unless_required_and_other_hosts_need_tls() {
        let mode = |url: &str| {
            let mut c: tokio_postgres::Config = url.parse().expect("url");
            tls(&mut c).expect("tls");
            c.get_ssl_mode()
        };
        assert_eq!(mode("postgres://u@127.0.0.1/db"), SslMode::Disable);
        assert_eq!(mode("postgres://u@localhost/db"), SslMode::Disable);
        assert_eq!(mode("postgres://u@[::1]/db"), SslMode::Disable);
        assert_eq!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            SslMode::Require
        );
        assert_eq!(mode("postgres://u@db.example/db"), SslMode::Require);
        assert_eq!(
            mode("postgres://u@db.example/db?sslmode=prefer"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://u@db.example/db?sslmode=disable"),
            SslMode::Disable
        );
    }
}
