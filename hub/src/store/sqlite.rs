//! The embedded SQLite backend of [`Store`]: one database file in WAL mode with durable
//! commits, schema migrations tracked in `PRAGMA user_version`.
//!
//! rusqlite is synchronous, so every operation runs on tokio's blocking pool while holding
//! the one connection of this handle. Within a process that mutex already serialises
//! operations; every read-modify-write still runs in a `BEGIN IMMEDIATE` transaction so that
//! several handles (or processes) on one file stay correct too: the write lock is taken before
//! the read, and `busy_timeout` makes the others wait for it instead of failing.
//!
//! Integers: SQLite stores signed 64-bit integers, so a time or counter above `i64::MAX` is
//! refused on write (no real time is that large) and a negative one read back is corruption.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, ffi, params};
use tessera_shared::revocation::{Entry, TOKEN_HASH_LEN};

use super::{
    AuditEvent, ClientKind, ClientRecord, GrantRecord, GrantUse, IssuedToken, KeyRecord, Pruned,
    RevocationRecord, Store, StoreError, StoreResult, TokenKind,
};

const _: () = assert!(MIGRATIONS.len() == Sqlite::SCHEMA_VERSION as usize);

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most expired nonces one `remember_nonce` deletes, so pruning a backlog never makes a
/// single request slow; each call adds one nonce and may delete this many, so it keeps up.
const NONCE_PRUNE_BATCH: u32 = 64;

/// Tolerance when comparing a refilled rate bucket with one token: refills are computed in
/// floating point and must not lose a token to rounding.
const RATE_EPSILON: f64 = 1e-9;

/// The schema, one step per version: step `i` takes the database from `user_version` `i` to
/// `i + 1`. Steps are append-only; a released step is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE clients (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'app', 'operator')),
        public_key BLOB,
        role TEXT NOT NULL,
        enrollment_code_key BLOB CHECK (enrollment_code_key IS NULL
                                        OR length(enrollment_code_key) = 32),
        enrolled_at INTEGER,
        revoked_at INTEGER,
        created_at INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE client_groups (
        client TEXT NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        name TEXT NOT NULL,
        PRIMARY KEY (client, ordinal)
    ) STRICT;

    CREATE TABLE issued_tokens (
        cti BLOB PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        subject TEXT NOT NULL,
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX issued_tokens_by_subject ON issued_tokens (subject, expires_at);
    CREATE INDEX issued_tokens_by_audience ON issued_tokens (audience, expires_at);
    CREATE INDEX issued_tokens_by_expiry ON issued_tokens (expires_at);

    -- family_revoked is kept on every grant of the family; a grant recorded into a family
    -- that is already revoked starts revoked (see record_issued).
    CREATE TABLE grants (
        hash BLOB PRIMARY KEY NOT NULL CHECK (length(hash) = 32),
        family BLOB NOT NULL CHECK (length(family) = 16),
        client TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'access')),
        audience TEXT NOT NULL,
        scope TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
        family_revoked INTEGER NOT NULL DEFAULT 0 CHECK (family_revoked IN (0, 1))
    ) STRICT;
    CREATE INDEX grants_by_family ON grants (family);
    CREATE INDEX grants_by_client ON grants (client);

    -- seq is assigned as max + 1 inside the appending transaction: no gaps, no reuse.
    CREATE TABLE revocations (
        seq INTEGER PRIMARY KEY NOT NULL CHECK (seq > 0),
        created_at INTEGER NOT NULL,
        published INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1))
    ) STRICT;
    CREATE INDEX revocations_unpublished ON revocations (seq) WHERE published = 0;

    -- A token entry has token_hash; a subject entry has subject and issued_before.
    CREATE TABLE revocation_entries (
        seq INTEGER NOT NULL REFERENCES revocations (seq) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        token_hash BLOB CHECK (token_hash IS NULL OR length(token_hash) = 32),
        subject TEXT,
        issued_before INTEGER,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (seq, ordinal),
        CHECK ((token_hash IS NOT NULL AND subject IS NULL AND issued_before IS NULL)
            OR (token_hash IS NULL AND subject IS NOT NULL AND issued_before IS NOT NULL))
    ) STRICT;
    CREATE INDEX revocation_entries_by_expiry ON revocation_entries (expires_at);

    CREATE TABLE nonces (
        client TEXT NOT NULL,
        nonce BLOB NOT NULL CHECK (length(nonce) = 16),
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (client, nonce)
    ) STRICT;
    CREATE INDEX nonces_by_expiry ON nonces (expires_at);

    CREATE TABLE rate_buckets (
        client TEXT PRIMARY KEY NOT NULL,
        tokens REAL NOT NULL,
        updated_ms INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE signing_keys (
        kid BLOB PRIMARY KEY NOT NULL CHECK (length(kid) = 8),
        public_key BLOB NOT NULL,
        sealed_private_key BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        active_from INTEGER NOT NULL,
        retire_after INTEGER
    ) STRICT;

    -- Named monotonic counters (the key set version).
    CREATE TABLE counters (
        name TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL
    ) STRICT;
    ",
];

/// The [`Store`] on an SQLite database file.
///
/// Cloning is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// The schema version this code writes (`PRAGMA user_version` after migrating): the
    /// number of migration steps.
    pub const SCHEMA_VERSION: u32 = 1;

    /// Opens (creating it if needed) the database at `path`, switches it to WAL with durable
    /// commits and applies pending migrations. Refuses, with [`StoreError::Corrupt`], a
    /// database written by a newer hub.
    ///
    /// This blocks; call it at startup, or on a blocking thread.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        Self::configure(conn, true).map_err(|e| prefix(e, &format!("opening {}", path.display())))
    }

    /// A private in-memory database, for tests of code that needs a store. Nothing
    /// survives dropping it.
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().ctx("opening an in-memory database")?;
        Self::configure(conn, false)
    }

    fn configure(mut conn: Connection, wal: bool) -> StoreResult<Self> {
        conn.busy_timeout(BUSY_TIMEOUT)
            .ctx("setting busy_timeout")?;
        if wal {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
                .ctx("setting journal_mode")?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(format!(
                    "journal_mode is {mode:?}, not WAL (is the file on a filesystem without \
                     shared memory?)"
                )));
            }
        }
        // FULL: in WAL mode a commit is on disk when it returns, so the hub may acknowledge.
        conn.pragma_update(None, "synchronous", "FULL")
            .ctx("setting synchronous")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .ctx("setting foreign_keys")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, what: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| StoreError::Backend(format!("{what}: connection lock poisoned")))?;
            f(&mut conn).map_err(|e| prefix(e, what))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("{what}: blocking task failed: {e}")))?
    }
}

/// Applies the migrations the database lacks, all in one transaction.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = immediate(conn)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .ctx("reading user_version")?;
    let known = i64::from(Sqlite::SCHEMA_VERSION);
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this hub supports ({known}); \
             it was written by a newer hub: upgrade the hub or restore an older database"
        )));
    }
    let start = usize::try_from(version.max(0))
        .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
    if start == MIGRATIONS.len() {
        return Ok(());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(start) {
        tx.execute_batch(step)
            .map_err(|e| StoreError::Backend(format!("applying migration {}: {e}", i + 1)))?;
    }
    tx.pragma_update(None, "user_version", known)
        .ctx("setting user_version")?;
    tx.commit().ctx("committing migrations")
}

// --- errors and conversions ---

/// Attaches context to rusqlite results.
trait Context<T> {
    fn ctx(self, what: &str) -> StoreResult<T>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn ctx(self, what: &str) -> StoreResult<T> {
        self.map_err(|e| StoreError::Backend(format!("{what}: {e}")))
    }
}

/// Prefixes an error's message with the operation it happened in.
fn prefix(e: StoreError, what: &str) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(format!("{what}: {m}")),
        StoreError::Corrupt(m) => StoreError::Corrupt(format!("{what}: {m}")),
        StoreError::Conflict(m) => StoreError::Conflict(format!("{what}: {m}")),
        StoreError::NotFound(m) => StoreError::NotFound(format!("{what}: {m}")),
    }
}

/// Whether `e` is a primary-key or unique constraint violation (a duplicate).
fn is_duplicate(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|e| {
        e.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            || e.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
    })
}

/// Maps an insert's error: a duplicate is a [`StoreError::Conflict`] naming `duplicate`.
fn insert_error(e: rusqlite::Error, what: &str, duplicate: impl FnOnce() -> String) -> StoreError {
    if is_duplicate(&e) {
        StoreError::Conflict(duplicate())
    } else {
        StoreError::Backend(format!("{what}: {e}"))
    }
}

/// Starts a transaction that takes the write lock at once (see the module doc).
fn immediate(conn: &mut Connection) -> StoreResult<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx("beginning a write transaction")
}

/// Starts a read transaction, for reads that must see one consistent state.
fn deferred(conn: &mut Connection) -> StoreResult<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Deferred)
        .ctx("beginning a read transaction")
}

/// A value to store: refused if SQLite's signed integers cannot hold it.
fn stored(v: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| {
        StoreError::Backend(format!(
            "{what} = {v} does not fit SQLite's signed 64-bit integer"
        ))
    })
}

/// A value only compared against stored ones: every stored value is at most `i64::MAX`, so
/// saturating keeps the comparison's meaning.
fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn flag(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<bool> {
    match row.get::<_, i64>(idx).map_err(|e| column(e, what))? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(StoreError::Corrupt(format!("{what} is {v}, not 0 or 1"))),
    }
}

/// A column's read error: a type surprise is corruption, anything else the backend's.
fn column(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(format!("{what}: {e}"))
        }
        e => StoreError::Backend(format!("reading {what}: {e}")),
    }
}

fn text(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<String> {
    row.get(idx).map_err(|e| column(e, what))
}

fn blob(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<Vec<u8>> {
    row.get(idx).map_err(|e| column(e, what))
}

fn opt_blob(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<Option<Vec<u8>>> {
    row.get(idx).map_err(|e| column(e, what))
}

fn time(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<u64> {
    let v: i64 = row.get(idx).map_err(|e| column(e, what))?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

fn opt_time(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<Option<u64>> {
    let v: Option<i64> = row.get(idx).map_err(|e| column(e, what))?;
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

fn fixed<const N: usize>(row: &Row<'_>, idx: usize, what: &str) -> StoreResult<[u8; N]> {
    array(blob(row, idx, what)?, what)
}

fn client_kind(row: &Row<'_>, idx: usize) -> StoreResult<ClientKind> {
    let s = text(row, idx, "client kind")?;
    ClientKind::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("client kind {s:?}")))
}

fn token_kind(row: &Row<'_>, idx: usize) -> StoreResult<TokenKind> {
    let s = text(row, idx, "token kind")?;
    TokenKind::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("token kind {s:?}")))
}

// --- row decoding; each SELECT lists the columns in the order its decoder reads them ---

const CLIENT_COLUMNS: &str =
    "id, kind, public_key, role, enrollment_code_key, enrolled_at, revoked_at, created_at";

/// A client row without its groups.
fn client_row(row: &Row<'_>) -> StoreResult<ClientRecord> {
    Ok(ClientRecord {
        id: text(row, 0, "client id")?,
        kind: client_kind(row, 1)?,
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

fn token_row(row: &Row<'_>) -> StoreResult<IssuedToken> {
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

/// A grant row, with its `used` and `family_revoked` flags.
fn grant_row(row: &Row<'_>) -> StoreResult<(GrantRecord, bool, bool)> {
    let grant = GrantRecord {
        hash: fixed(row, 0, "grant hash")?,
        family: fixed(row, 1, "grant family")?,
        client: text(row, 2, "grant client")?,
        kind: token_kind(row, 3)?,
        audience: text(row, 4, "grant audience")?,
        scope: text(row, 5, "grant scope")?,
        expires_at: time(row, 6, "grant expires_at")?,
        created_at: time(row, 7, "grant created_at")?,
    };
    Ok((
        grant,
        flag(row, 8, "grant used")?,
        flag(row, 9, "grant family_revoked")?,
    ))
}

const ENTRY_COLUMNS: &str = "token_hash, subject, issued_before, expires_at";

/// A revocation entry from the four [`ENTRY_COLUMNS`] starting at `at`.
fn entry_row(row: &Row<'_>, at: usize) -> StoreResult<Entry> {
    let hash = opt_blob(row, at, "entry token hash")?;
    let subject: Option<String> = row.get(at + 1).map_err(|e| column(e, "entry subject"))?;
    let issued_before = opt_time(row, at + 2, "entry issued_before")?;
    let expires_at = time(row, at + 3, "entry expires_at")?;
    match (hash, subject, issued_before) {
        (Some(hash), None, None) => Ok(Entry::Token {
            hash: array::<TOKEN_HASH_LEN>(hash, "entry token hash")?,
            expires_at,
        }),
        (None, Some(subject), Some(issued_before)) => {
            Entry::for_subject(&subject, issued_before, expires_at)
                .map_err(|e| StoreError::Corrupt(format!("entry subject {subject:?}: {e}")))
        }
        _ => Err(StoreError::Corrupt(
            "revocation entry is neither a token nor a subject entry".into(),
        )),
    }
}

const KEY_COLUMNS: &str =
    "kid, public_key, sealed_private_key, created_at, active_from, retire_after";

fn key_row(row: &Row<'_>) -> StoreResult<KeyRecord> {
    Ok(KeyRecord {
        kid: fixed(row, 0, "key id")?,
        public_key: blob(row, 1, "key public key")?,
        sealed_private_key: blob(row, 2, "sealed private key")?,
        created_at: time(row, 3, "key created_at")?,
        active_from: time(row, 4, "key active_from")?,
        retire_after: opt_time(row, 5, "key retire_after")?,
    })
}

fn audit_row(row: &Row<'_>) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        at_ms: time(row, 0, "audit at_ms")?,
        actor: text(row, 1, "audit actor")?,
        action: text(row, 2, "audit action")?,
        target: text(row, 3, "audit target")?,
        outcome: text(row, 4, "audit outcome")?,
        reason: text(row, 5, "audit reason")?,
    })
}

/// Runs a query and decodes every row with `decode`.
fn collect<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut decode: impl FnMut(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).ctx("preparing a query")?;
    let mut rows = stmt.query(params).ctx("running a query")?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().ctx("reading a row")? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The clients of `kind` (all if `None`), ordered by id, with their groups.
fn load_clients(conn: &Connection, kind: Option<ClientKind>) -> StoreResult<Vec<ClientRecord>> {
    let kind = kind.map(ClientKind::as_str);
    let mut clients = collect(
        conn,
        &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE ?1 IS NULL OR kind = ?1 ORDER BY id"),
        params![kind],
        client_row,
    )?;
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (client, name) in collect(
        conn,
        "SELECT g.client, g.name FROM client_groups g JOIN clients c ON c.id = g.client
         WHERE ?1 IS NULL OR c.kind = ?1 ORDER BY g.client, g.ordinal",
        params![kind],
        |row| Ok((text(row, 0, "group client")?, text(row, 1, "group name")?)),
    )? {
        groups.entry(client).or_default().push(name);
    }
    for client in &mut clients {
        if let Some(g) = groups.remove(&client.id) {
            client.groups = g;
        }
    }
    Ok(clients)
}

impl Store for Sqlite {
    // --- registry ---

    async fn add_client(&self, client: ClientRecord) -> StoreResult<()> {
        self.run("add_client", move |conn| {
            let tx = immediate(conn)?;
            tx.execute(
                &format!(
                    "INSERT INTO clients ({CLIENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    client.id,
                    client.kind.as_str(),
                    client.public_key,
                    client.role,
                    client.enrollment_code_key.as_ref().map(|k| &k[..]),
                    client
                        .enrolled_at
                        .map(|t| stored(t, "enrolled_at"))
                        .transpose()?,
                    client
                        .revoked_at
                        .map(|t| stored(t, "revoked_at"))
                        .transpose()?,
                    stored(client.created_at, "created_at")?,
                ],
            )
            .map_err(|e| {
                insert_error(e, "inserting the client", || {
                    format!("client {:?} already exists", client.id)
                })
            })?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO client_groups (client, ordinal, name) VALUES (?1, ?2, ?3)",
                    )
                    .ctx("preparing the group insert")?;
                for (i, group) in client.groups.iter().enumerate() {
                    let ordinal = i64::try_from(i).unwrap_or(i64::MAX);
                    insert
                        .execute(params![client.id, ordinal, group])
                        .ctx("inserting a group")?;
                }
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        let id = id.to_owned();
        self.run("client", move |conn| {
            let tx = deferred(conn)?;
            let mut found = collect(
                &tx,
                &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE id = ?1"),
                params![id],
                client_row,
            )?;
            let Some(mut client) = found.pop() else {
                return Ok(None);
            };
            client.groups = collect(
                &tx,
                "SELECT name FROM client_groups WHERE client = ?1 ORDER BY ordinal",
                params![id],
                |row| text(row, 0, "group name"),
            )?;
            Ok(Some(client))
        })
        .await
    }

    async fn clients(&self, kind: Option<ClientKind>) -> StoreResult<Vec<ClientRecord>> {
        self.run("clients", move |conn| {
            let tx = deferred(conn)?;
            load_clients(&tx, kind)
        })
        .await
    }

    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.run("remove_client", move |conn| {
            let tx = immediate(conn)?;
            // Groups go by cascade. Grants go too: a client registered again under this id
            // must not inherit the old one's grants.
            let removed = tx
                .execute("DELETE FROM clients WHERE id = ?1", params![id])
                .ctx("deleting the client")?;
            tx.execute("DELETE FROM grants WHERE client = ?1", params![id])
                .ctx("deleting the client's grants")?;
            tx.commit().ctx("committing")?;
            Ok(removed > 0)
        })
        .await
    }

    async fn set_role(&self, id: &str, role: &str) -> StoreResult<()> {
        let (id, role) = (id.to_owned(), role.to_owned());
        self.run("set_role", move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    "UPDATE clients SET role = ?2 WHERE id = ?1",
                    params![id, role],
                )
                .ctx("updating the role")?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("client {id:?}")));
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn enroll(&self, id: &str, public_key: &[u8], at: u64) -> StoreResult<()> {
        let (id, key) = (id.to_owned(), public_key.to_vec());
        self.run("enroll", move |conn| {
            let tx = immediate(conn)?;
            let row = tx
                .query_row(
                    "SELECT public_key, enrolled_at, revoked_at FROM clients WHERE id = ?1",
                    params![id],
                    |row| {
                        Ok((
                            row.get::<_, Option<Vec<u8>>>(0)?,
                            row.get::<_, Option<i64>>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                        ))
                    },
                )
                .optional()
                .ctx("reading the client")?;
            let Some((current, enrolled_at, revoked_at)) = row else {
                return Err(StoreError::NotFound(format!("client {id:?}")));
            };
            if revoked_at.is_some() {
                return Err(StoreError::Conflict(format!("client {id:?} is revoked")));
            }
            match current {
                Some(current) if current != key => {
                    return Err(StoreError::Conflict(format!(
                        "client {id:?} is already enrolled with a different key"
                    )));
                }
                // Enrolling again with the same key changes nothing.
                Some(_) if enrolled_at.is_some() => return Ok(()),
                _ => {}
            }
            tx.execute(
                "UPDATE clients SET public_key = ?2, enrolled_at = ?3, enrollment_code_key = NULL
                 WHERE id = ?1",
                params![id, key, stored(at, "enrolled_at")?],
            )
            .ctx("updating the client")?;
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn revoke_client(&self, id: &str, at: u64) -> StoreResult<()> {
        let id = id.to_owned();
        self.run("revoke_client", move |conn| {
            let tx = immediate(conn)?;
            // A second revocation keeps the first time. A device loses its key and
            // enrollment; other clients keep their registered key for the record.
            let n = tx
                .execute(
                    "UPDATE clients SET
                        revoked_at = COALESCE(revoked_at, ?2),
                        enrollment_code_key = NULL,
                        public_key = CASE kind WHEN 'device' THEN NULL ELSE public_key END,
                        enrolled_at = CASE kind WHEN 'device' THEN NULL ELSE enrolled_at END
                     WHERE id = ?1",
                    params![id, stored(at, "revoked_at")?],
                )
                .ctx("updating the client")?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("client {id:?}")));
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    // --- replay and rate limiting ---

    async fn remember_nonce(
        &self,
        client: &str,
        nonce: &[u8; 16],
        now: u64,
        expires_at: u64,
    ) -> StoreResult<bool> {
        let (client, nonce) = (client.to_owned(), *nonce);
        self.run("remember_nonce", move |conn| {
            let tx = immediate(conn)?;
            // A recorded nonce that expired before `now` is as good as absent: overwrite it.
            let fresh = tx
                .prepare_cached(
                    "INSERT INTO nonces (client, nonce, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (client, nonce) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE nonces.expires_at < ?4",
                )
                .ctx("preparing the nonce insert")?
                .execute(params![
                    client,
                    &nonce[..],
                    stored(expires_at, "expires_at")?,
                    bound(now)
                ])
                .ctx("recording the nonce")?
                == 1;
            tx.prepare_cached(
                "DELETE FROM nonces WHERE rowid IN
                 (SELECT rowid FROM nonces WHERE expires_at < ?1 LIMIT ?2)",
            )
            .ctx("preparing the nonce prune")?
            .execute(params![bound(now), NONCE_PRUNE_BATCH])
            .ctx("pruning expired nonces")?;
            tx.commit().ctx("committing")?;
            Ok(fresh)
        })
        .await
    }

    async fn take_rate_token(
        &self,
        client: &str,
        now_ms: u64,
        burst: u32,
        per_second: f64,
    ) -> StoreResult<bool> {
        let client = client.to_owned();
        self.run("take_rate_token", move |conn| {
            let tx = immediate(conn)?;
            let row = tx
                .query_row(
                    "SELECT tokens, updated_ms FROM rate_buckets WHERE client = ?1",
                    params![client],
                    |row| Ok((row.get::<_, f64>(0)?, row.get::<_, i64>(1)?)),
                )
                .optional()
                .ctx("reading the bucket")?;
            let burst = f64::from(burst);
            let (tokens, updated_ms) = match row {
                None => (burst, now_ms),
                Some((tokens, updated_ms)) => {
                    let updated_ms = u64::try_from(updated_ms).map_err(|_| {
                        StoreError::Corrupt(format!("bucket updated_ms is {updated_ms}"))
                    })?;
                    if !tokens.is_finite() || tokens < 0.0 {
                        return Err(StoreError::Corrupt(format!("bucket holds {tokens} tokens")));
                    }
                    // A clock that went back (another replica's, say) refills nothing, and
                    // the bucket keeps the later time so the interval is not counted twice.
                    let elapsed = now_ms.saturating_sub(updated_ms);
                    let refill = if elapsed > 0 && per_second > 0.0 {
                        elapsed as f64 * per_second / 1000.0
                    } else {
                        0.0
                    };
                    ((tokens + refill).min(burst), now_ms.max(updated_ms))
                }
            };
            if tokens < 1.0 - RATE_EPSILON {
                // Nothing to write: the refill is recomputed from the stored state next time.
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO rate_buckets (client, tokens, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (client) DO UPDATE SET tokens = excluded.tokens,
                                                    updated_ms = excluded.updated_ms",
            )
            .ctx("preparing the bucket update")?
            .execute(params![
                client,
                (tokens - 1.0).max(0.0),
                stored(updated_ms, "now_ms")?
            ])
            .ctx("updating the bucket")?;
            tx.commit().ctx("committing")?;
            Ok(true)
        })
        .await
    }

    // --- issuance ---

    async fn record_issued(
        &self,
        token: IssuedToken,
        grant: Option<GrantRecord>,
    ) -> StoreResult<()> {
        self.run("record_issued", move |conn| {
            let tx = immediate(conn)?;
            tx.prepare_cached(&format!(
                "INSERT INTO issued_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            ))
            .ctx("preparing the token insert")?
            .execute(params![
                &token.cti[..],
                &token.hash[..],
                token.kind.as_str(),
                token.subject,
                token.audience,
                token.scope,
                stored(token.issued_at, "issued_at")?,
                stored(token.expires_at, "expires_at")?,
            ])
            .map_err(|e| {
                insert_error(e, "inserting the token", || {
                    format!("a token with cti {} is already recorded", hex::encode(token.cti))
                })
            })?;
            if let Some(g) = grant {
                // A grant rotated into a family that was revoked meanwhile (its predecessor
                // was replayed on another replica) starts revoked.
                tx.prepare_cached(&format!(
                    "INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0,
                     EXISTS (SELECT 1 FROM grants WHERE family = ?2 AND family_revoked = 1))"
                ))
                .ctx("preparing the grant insert")?
                .execute(params![
                    &g.hash[..],
                    &g.family[..],
                    g.client,
                    g.kind.as_str(),
                    g.audience,
                    g.scope,
                    stored(g.expires_at, "grant expires_at")?,
                    stored(g.created_at, "grant created_at")?,
                ])
                .map_err(|e| {
                    insert_error(e, "inserting the grant", || {
                        "a grant with this hash is already recorded".to_owned()
                    })
                })?;
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn issued(&self, cti: &[u8]) -> StoreResult<Option<IssuedToken>> {
        let cti = cti.to_vec();
        self.run("issued", move |conn| {
            Ok(collect(
                conn,
                &format!("SELECT {TOKEN_COLUMNS} FROM issued_tokens WHERE cti = ?1"),
                params![cti],
                token_row,
            )?
            .pop())
        })
        .await
    }

    async fn issued_to(&self, subject: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        let subject = subject.to_owned();
        self.run("issued_to", move |conn| {
            collect(
                conn,
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                     WHERE subject = ?1 AND expires_at > ?2 ORDER BY issued_at, cti"
                ),
                params![subject, bound(now)],
                token_row,
            )
        })
        .await
    }

    async fn issued_for(&self, audience: &str, now: u64) -> StoreResult<Vec<IssuedToken>> {
        let audience = audience.to_owned();
        self.run("issued_for", move |conn| {
            collect(
                conn,
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                     WHERE audience = ?1 AND expires_at > ?2 ORDER BY issued_at, cti"
                ),
                params![audience, bound(now)],
                token_row,
            )
        })
        .await
    }

    async fn use_grant(&self, hash: &[u8; 32], now: u64) -> StoreResult<GrantUse> {
        let hash = *hash;
        self.run("use_grant", move |conn| {
            let tx = immediate(conn)?;
            let found = collect(
                &tx,
                &format!("SELECT {GRANT_COLUMNS} FROM grants WHERE hash = ?1"),
                params![&hash[..]],
                grant_row,
            )?
            .pop();
            let Some((grant, used, family_revoked)) = found else {
                return Ok(GrantUse::Unknown);
            };
            if family_revoked {
                return Ok(GrantUse::Revoked(grant));
            }
            if now >= grant.expires_at {
                return Ok(GrantUse::Expired(grant));
            }
            let outcome = if used {
                // Replay of a rotated grant: someone else holds a copy. Revoke the family.
                tx.execute(
                    "UPDATE grants SET family_revoked = 1 WHERE family = ?1",
                    params![&grant.family[..]],
                )
                .ctx("revoking the family")?;
                GrantUse::Reused(grant)
            } else {
                tx.execute(
                    "UPDATE grants SET used = 1 WHERE hash = ?1",
                    params![&hash[..]],
                )
                .ctx("marking the grant used")?;
                GrantUse::Fresh(grant)
            };
            tx.commit().ctx("committing")?;
            Ok(outcome)
        })
        .await
    }

    async fn revoke_grants_of(&self, client: &str) -> StoreResult<u64> {
        let client = client.to_owned();
        self.run("revoke_grants_of", move |conn| {
            let tx = immediate(conn)?;
            let live: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM grants
                     WHERE client = ?1 AND used = 0 AND family_revoked = 0",
                    params![client],
                    |row| row.get(0),
                )
                .ctx("counting live grants")?;
            tx.execute(
                "UPDATE grants SET family_revoked = 1
                 WHERE family_revoked = 0
                   AND family IN (SELECT family FROM grants WHERE client = ?1)",
                params![client],
            )
            .ctx("revoking the families")?;
            tx.commit().ctx("committing")?;
            u64::try_from(live).map_err(|_| StoreError::Corrupt(format!("grant count {live}")))
        })
        .await
    }

    // --- revocation ---

    async fn append_revocation(&self, entries: Vec<Entry>, now: u64) -> StoreResult<u64> {
        self.run("append_revocation", move |conn| {
            let tx = immediate(conn)?;
            // The write lock is held, so max + 1 cannot race another appender.
            let seq: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM revocations",
                    [],
                    |row| row.get(0),
                )
                .ctx("reading the last sequence number")?;
            tx.execute(
                "INSERT INTO revocations (seq, created_at, published) VALUES (?1, ?2, 0)",
                params![seq, stored(now, "created_at")?],
            )
            .ctx("inserting the revocation")?;
            {
                let mut insert = tx
                    .prepare_cached(&format!(
                        "INSERT INTO revocation_entries (seq, ordinal, {ENTRY_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                    ))
                    .ctx("preparing the entry insert")?;
                for (i, entry) in entries.iter().enumerate() {
                    let ordinal = i64::try_from(i).unwrap_or(i64::MAX);
                    let expires_at = stored(entry.expires_at(), "entry expires_at")?;
                    match entry {
                        Entry::Token { hash, .. } => insert.execute(params![
                            seq,
                            ordinal,
                            &hash[..],
                            None::<&str>,
                            None::<i64>,
                            expires_at
                        ]),
                        Entry::Subject {
                            subject,
                            issued_before,
                            ..
                        } => insert.execute(params![
                            seq,
                            ordinal,
                            None::<&[u8]>,
                            subject.as_str(),
                            stored(*issued_before, "entry issued_before")?,
                            expires_at
                        ]),
                    }
                    .ctx("inserting an entry")?;
                }
            }
            tx.commit().ctx("committing")?;
            u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("sequence number {seq}")))
        })
        .await
    }

    async fn unpublished_revocations(&self) -> StoreResult<Vec<RevocationRecord>> {
        self.run("unpublished_revocations", move |conn| {
            let tx = deferred(conn)?;
            let mut records = collect(
                &tx,
                "SELECT seq, created_at FROM revocations WHERE published = 0 ORDER BY seq",
                [],
                |row| {
                    Ok(RevocationRecord {
                        seq: time(row, 0, "revocation seq")?,
                        entries: Vec::new(),
                        created_at: time(row, 1, "revocation created_at")?,
                        published: false,
                    })
                },
            )?;
            let entries = collect(
                &tx,
                &format!(
                    "SELECT e.seq, {} FROM revocation_entries e
                     JOIN revocations r ON r.seq = e.seq
                     WHERE r.published = 0 ORDER BY e.seq, e.ordinal",
                    prefixed_entry_columns()
                ),
                [],
                |row| Ok((time(row, 0, "entry seq")?, entry_row(row, 1)?)),
            )?;
            // Both lists are in sequence order: walk them together.
            let mut records_iter = records.iter_mut().peekable();
            for (seq, entry) in entries {
                while records_iter.peek().is_some_and(|r| r.seq < seq) {
                    records_iter.next();
                }
                match records_iter.peek_mut() {
                    Some(r) if r.seq == seq => r.entries.push(entry),
                    _ => {
                        return Err(StoreError::Corrupt(format!(
                            "entry of revocation {seq} without its revocation"
                        )));
                    }
                }
            }
            Ok(records)
        })
        .await
    }

    async fn mark_published(&self, seq: u64) -> StoreResult<()> {
        self.run("mark_published", move |conn| {
            let tx = immediate(conn)?;
            tx.execute(
                "UPDATE revocations SET published = 1 WHERE seq <= ?1 AND published = 0",
                params![bound(seq)],
            )
            .ctx("marking published")?;
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn revocation_snapshot(&self, now: u64, leeway: u64) -> StoreResult<(u64, Vec<Entry>)> {
        self.run("revocation_snapshot", move |conn| {
            let tx = deferred(conn)?;
            let seq: i64 = tx
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", [], |row| {
                    row.get(0)
                })
                .ctx("reading the last sequence number")?;
            let seq = u64::try_from(seq)
                .map_err(|_| StoreError::Corrupt(format!("sequence number {seq}")))?;
            // In force while now <= expires_at + leeway (as verifiers prune them).
            let entries = collect(
                &tx,
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM revocation_entries
                     WHERE expires_at >= ?1 ORDER BY seq, ordinal"
                ),
                params![bound(now.saturating_sub(leeway))],
                |row| entry_row(row, 0),
            )?;
            Ok((seq, entries))
        })
        .await
    }

    // --- signing keys ---

    async fn add_key(&self, key: KeyRecord) -> StoreResult<()> {
        self.run("add_key", move |conn| {
            let tx = immediate(conn)?;
            tx.execute(
                &format!(
                    "INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                ),
                params![
                    &key.kid[..],
                    key.public_key,
                    key.sealed_private_key,
                    stored(key.created_at, "created_at")?,
                    stored(key.active_from, "active_from")?,
                    key.retire_after
                        .map(|t| stored(t, "retire_after"))
                        .transpose()?,
                ],
            )
            .map_err(|e| {
                insert_error(e, "inserting the key", || {
                    format!("a key with kid {} exists", hex::encode(key.kid))
                })
            })?;
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn keys(&self) -> StoreResult<Vec<KeyRecord>> {
        self.run("keys", move |conn| {
            collect(
                conn,
                &format!("SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, rowid"),
                [],
                key_row,
            )
        })
        .await
    }

    async fn retire_key(&self, kid: &[u8; 8], retire_after: u64) -> StoreResult<()> {
        let kid = *kid;
        self.run("retire_key", move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    "UPDATE signing_keys SET retire_after = ?2 WHERE kid = ?1",
                    params![&kid[..], stored(retire_after, "retire_after")?],
                )
                .ctx("updating the key")?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("key {}", hex::encode(kid))));
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn next_keyset_version(&self) -> StoreResult<u64> {
        self.run("next_keyset_version", move |conn| {
            let tx = immediate(conn)?;
            let v: i64 = tx
                .query_row(
                    "INSERT INTO counters (name, value) VALUES ('keyset_version', 1)
                     ON CONFLICT (name) DO UPDATE SET value = value + 1
                     RETURNING value",
                    [],
                    |row| row.get(0),
                )
                .ctx("incrementing the version")?;
            tx.commit().ctx("committing")?;
            u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("key set version {v}")))
        })
        .await
    }

    // --- audit ---

    async fn audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.run("audit", move |conn| {
            let tx = immediate(conn)?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO audit_log (at_ms, actor, action, target, outcome, reason)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .ctx("preparing the insert")?;
                for e in &events {
                    insert
                        .execute(params![
                            stored(e.at_ms, "at_ms")?,
                            e.actor,
                            e.action,
                            e.target,
                            e.outcome,
                            e.reason
                        ])
                        .ctx("inserting an event")?;
                }
            }
            tx.commit().ctx("committing")
        })
        .await
    }

    async fn prune(&self, expired_before: u64, audit_before_ms: u64) -> StoreResult<Pruned> {
        let (before, audit_before) = (bound(expired_before), bound(audit_before_ms));
        self.run("prune", move |conn| {
            let tx = immediate(conn)?;
            let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            let pruned = Pruned {
                tokens: count(
                    tx.execute(
                        "DELETE FROM issued_tokens WHERE expires_at < ?1",
                        params![before],
                    )
                    .ctx("pruning issued tokens")?,
                ),
                grants: count(
                    tx.execute("DELETE FROM grants WHERE expires_at < ?1", params![before])
                        .ctx("pruning grants")?,
                ),
                revocation_entries: count(
                    tx.execute(
                        "DELETE FROM revocation_entries WHERE expires_at < ?1",
                        params![before],
                    )
                    .ctx("pruning revocation entries")?,
                ),
                audit_events: count(
                    tx.execute(
                        "DELETE FROM audit_log WHERE at_ms < ?1",
                        params![audit_before],
                    )
                    .ctx("pruning the audit log")?,
                ),
            };
            tx.execute("DELETE FROM nonces WHERE expires_at < ?1", params![before])
                .ctx("pruning nonces")?;
            tx.commit().ctx("committing")?;
            Ok(pruned)
        })
        .await
    }

    async fn audit_tail(&self, limit: usize) -> StoreResult<Vec<AuditEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("audit_tail", move |conn| {
            collect(
                conn,
                "SELECT at_ms, actor, action, target, outcome, reason FROM
                 (SELECT id, at_ms, actor, action, target, outcome, reason FROM audit_log
                  ORDER BY id DESC LIMIT ?1)
                 ORDER BY id",
                params![limit],
                audit_row,
            )
        })
        .await
    }
}

/// [`ENTRY_COLUMNS`] qualified with the `e.` alias.
fn prefixed_entry_columns() -> String {
    ENTRY_COLUMNS
        .split(", ")
        .map(|c| format!("e.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_in_memory_store_passes_the_conformance_suite() {
        super::super::conformance::run_all(|| async {
            Sqlite::open_in_memory().expect("in-memory database")
        })
        .await;
    }

    #[test]
    fn every_migration_step_is_valid_sql_on_an_empty_database() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&mut conn).expect("migrations apply");
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(version, Sqlite::SCHEMA_VERSION);
        // Applying again is a no-op.
        migrate(&mut conn).expect("migrations are idempotent");
    }
}
