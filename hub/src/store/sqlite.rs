//! The embedded SQLite backend of [`Store`]: one database file in WAL mode with durable
//! commits, schema migrations tracked in `PRAGMA user_version`.
//!
//! **Writes** go to one writer thread that owns the write connection. It takes every write
//! queued, runs each in its own savepoint inside one `BEGIN IMMEDIATE` transaction, commits
//! once (one `fsync` for the whole batch: group commit), and only then answers each: a write
//! is durable when its future completes. A write that fails rolls back its savepoint alone.
//! Under load the batches grow by themselves, since writes queue while the thread waits for
//! the disk; alone, a write costs one commit as before.
//!
//! **Reads** run on the calling task, on one of a few read-only connections: WAL lets them
//! read the last committed state while the writer writes, so a request's reads never wait
//! for another request's `fsync`. (An in-memory database has a single connection, so its
//! reads go to the writer thread too, between batches.)
//!
//! **Checkpoints** (copying the WAL back into the database file) run on a thread and a
//! connection of their own, never on the writer: SQLite's automatic checkpoint would run
//! inside the commit that crossed its threshold, and every request in that batch, and every
//! one queued behind it, would wait for a thousand pages to be copied and synced. The
//! writer only says when the WAL has grown by [`CHECKPOINT_PAGES`]; the checkpointer runs
//! `PASSIVE` checkpoints, which never block the writer or a reader, and leaves the last
//! few frames for the writer to copy after answering a batch, so that the WAL starts over
//! (see [`Checkpoints::after_commit`]).
//!
//! `BEGIN IMMEDIATE` takes the write lock before reading, so several handles (or processes,
//! such as the CLI beside a running hub) on one file stay correct; `busy_timeout` makes them
//! wait for each other instead of failing.
//!
//! Integers: SQLite stores signed 64-bit integers, so a time or counter above `i64::MAX` is
//! refused on write (no real time is that large) and a negative one read back is corruption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, ffi, params};
use tessera_shared::message::Command;
use tessera_shared::revocation::{Addressed, Entry, MAX_LEEWAY, Stream, TOKEN_HASH_LEN};

use super::migrations::sqlite::{MIGRATIONS, STREAMS_SCHEMA, Step};
use super::{
    AuditEvent, AuditFilter, ClientKind, ClientRecord, Committed, Effect, GrantRecord, GrantState,
    GrantUse, Horizons, IssuedToken, KeyRecord, LiveTokens, Pruned, RateLimit, Refused,
    RequestCommit, Store, StoreError, StoreResult, StreamRead, StreamState, TokenKind, Unmatched,
    WriteStats,
};
use crate::revocation::{self, Change, Outcome, PendingControl, Resolved, ResolvedSubject, Target};

mod backup;
pub use backup::{BackupSummary, StagedRestore};

const _: () = assert!(MIGRATIONS.len() == Sqlite::SCHEMA_VERSION as usize);

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most expired nonces one `remember_nonce` deletes, so pruning a backlog never makes a
/// single request slow; each call adds one nonce and may delete this many, so it keeps up.
const NONCE_PRUNE_BATCH: u32 = 64;

/// Tolerance when comparing a refilled rate bucket with one token: refills are computed in
/// floating point and must not lose a token to rounding.
const RATE_EPSILON: f64 = 1e-9;

/// Version 2: creates the stream tables and moves every entry of the old single list onto
/// the streams of the tokens it covers, as unpublished changes (the hub publishes them when
/// it starts). An old entry that covers no recorded token covers nothing live: it is
/// dropped.
///
/// An old entry's `expires_at` came from the policy at the time (a subject entry's from the
/// longest lifetime then), which may be earlier than a token it covers really lasts: each
/// new entry lasts at least until its tokens' `exp` plus [`MAX_LEEWAY`] (the policy's
/// leeway is unknown here, and no policy allows more). An old subject entry covering several
/// tokens of one audience becomes one entry, as does a token listed twice.
pub(super) fn streams_migration(tx: &Transaction<'_>) -> StoreResult<()> {
    tx.execute_batch(STREAMS_SCHEMA)
        .ctx("creating the stream tables")?;
    let old = collect(
        tx,
        "SELECT e.token_hash, e.subject, e.issued_before, e.expires_at, r.created_at
         FROM revocation_entries e JOIN revocations r ON r.seq = e.seq
         ORDER BY e.seq, e.ordinal",
        [],
        |row| {
            Ok((
                opt_blob(row, 0, "old entry hash")?,
                row.get::<_, Option<String>>(1)
                    .map_err(|e| column(e, "old entry subject"))?,
                opt_time(row, 2, "old entry issued_before")?,
                time(row, 3, "old entry expires_at")?,
                time(row, 4, "old revocation created_at")?,
            ))
        },
    )?;
    let mut per_stream: BTreeMap<String, Vec<Addressed>> = BTreeMap::new();
    // Where each (stream, audience, token or subject) is in `per_stream`.
    let mut held: HashMap<(String, String, String), usize> = HashMap::new();
    let mut newest = 0;
    for (hash, subject, issued_before, expires_at, created_at) in old {
        newest = newest.max(created_at);
        let tokens = match (hash, subject, issued_before) {
            (Some(hash), None, None) => collect(
                tx,
                &format!("SELECT {TOKEN_COLUMNS} FROM issued_tokens WHERE hash = ?1"),
                params![hash],
                token_row,
            )?,
            (None, Some(subject), Some(before)) => collect(
                tx,
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM issued_tokens
                     WHERE subject = ?1 AND issued_at < ?2"
                ),
                params![subject, bound(before)],
                token_row,
            )?,
            _ => return Err(StoreError::Corrupt("old revocation entry".into())),
        };
        for token in tokens {
            let expires_at = expires_at.max(token.expires_at.saturating_add(MAX_LEEWAY));
            let entry = match issued_before {
                Some(before) => Entry::for_subject(&token.subject, before, expires_at)
                    .map_err(|e| StoreError::Corrupt(format!("old entry subject: {e}")))?,
                None => Entry::Token {
                    hash: token.hash,
                    expires_at,
                },
            };
            let Ok(stream) = revocation::stream_of(&token) else {
                continue;
            };
            let Ok(addressed) = Addressed::new(&token.audience, entry) else {
                continue;
            };
            let stream = stream.name().to_string();
            let entries = per_stream.entry(stream.clone()).or_default();
            // One entry per token or subject and audience: fold into it (the later cut-off
            // and the later expiry, as verifiers fold) rather than list it again.
            let named = match &addressed.entry {
                Entry::Token { hash, .. } => hex::encode(hash),
                Entry::Subject { subject, .. } => format!("subject {subject}"),
            };
            match held.entry((stream, addressed.audience.to_string(), named)) {
                std::collections::hash_map::Entry::Occupied(at) => {
                    entries[*at.get()].entry.merge(&addressed.entry);
                }
                std::collections::hash_map::Entry::Vacant(at) => {
                    at.insert(entries.len());
                    entries.push(addressed);
                }
            }
        }
    }
    for (name, entries) in per_stream {
        let stream = Stream::parse(&name)
            .map_err(|e| StoreError::Corrupt(format!("stream {name:?}: {e}")))?;
        let changes = revocation::chunk(&stream, entries);
        tx.execute(
            "INSERT INTO revocation_streams (name, seq) VALUES (?1, ?2)",
            params![name, stored(changes.len() as u64, "seq")?],
        )
        .ctx("recording a stream")?;
        for (i, change) in changes.iter().enumerate() {
            insert_change(tx, &name, i as u64 + 1, newest, change)?;
        }
    }
    tx.execute_batch("DROP TABLE revocation_entries; DROP TABLE revocations;")
        .ctx("dropping the old revocation tables")
}

/// Inserts one numbered change with its entries (the stream row is the caller's).
fn insert_change(
    tx: &Connection,
    stream: &str,
    seq: u64,
    created_at: u64,
    entries: &[Addressed],
) -> StoreResult<()> {
    let seq = stored(seq, "change seq")?;
    tx.prepare_cached(
        "INSERT INTO revocation_changes (stream, seq, created_at, published)
         VALUES (?1, ?2, ?3, 0)",
    )
    .ctx("preparing the change insert")?
    .execute(params![stream, seq, stored(created_at, "created_at")?])
    .ctx("inserting a change")?;
    let mut insert = tx
        .prepare_cached(&format!(
            "INSERT INTO stream_entries (stream, seq, ordinal, {ENTRY_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))
        .ctx("preparing the entry insert")?;
    for (i, e) in entries.iter().enumerate() {
        let ordinal = i64::try_from(i).unwrap_or(i64::MAX);
        let expires_at = stored(e.entry.expires_at(), "entry expires_at")?;
        let audience = e.audience.as_str();
        match &e.entry {
            Entry::Token { hash, .. } => insert.execute(params![
                stream,
                seq,
                ordinal,
                audience,
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
                stream,
                seq,
                ordinal,
                audience,
                None::<&[u8]>,
                subject.as_str(),
                stored(*issued_before, "entry issued_before")?,
                expires_at
            ]),
        }
        .ctx("inserting an entry")?;
    }
    Ok(())
}

/// Most writes one transaction takes (group commit): enough for every request in flight.
const MAX_BATCH: usize = 1024;

/// Read-only connections of a database file.
const READERS: usize = 4;

/// Prepared statements kept per connection: more than the store has (rusqlite's default,
/// 16, made the writer parse some of a request's statements again each time).
const STATEMENT_CACHE: usize = 64;

/// How much of the database file a read connection maps (`PRAGMA mmap_size`).
const MMAP_BYTES: i64 = 256 << 20;

/// WAL pages past which the writer asks for a checkpoint (SQLite's automatic threshold).
const CHECKPOINT_PAGES: i32 = 1000;

std::thread_local! {
    /// Pages in the WAL after the writer's last commit, set by [`wal_pages`].
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The writer connection's WAL hook: runs on the writer thread after each commit.
/// (Registering it also turns SQLite's automatic checkpoint off for that connection.)
fn wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}

/// The [`Store`] on an SQLite database file.
///
/// Cloning is cheap and shares the connections. The writer thread ends when the last clone
/// is dropped, after finishing the writes queued.
#[derive(Clone)]
pub struct Sqlite {
    inner: Arc<Inner>,
}

struct Inner {
    /// To the writer thread (`None` once dropping).
    jobs: Option<mpsc::Sender<Job>>,
    /// The writer thread, joined on drop.
    writer: Option<std::thread::JoinHandle<()>>,
    /// What the writer thread did.
    stats: Arc<Counters>,
    /// Read connections; `None` for an in-memory database (reads go to the writer).
    readers: Option<Readers>,
    /// The housekeeping lease's file beside the database (`None` in memory: one handle,
    /// always the holder) and, while held, the open file with its lock.
    lease: Option<(PathBuf, Mutex<Option<std::fs::File>>)>,
}

impl Drop for Inner {
    /// Closes the connections one after another, never two at once: the read connections
    /// first, then the writer's once it has answered every queued write. (Closing two
    /// connections of one WAL database on two threads at once could deadlock in SQLite
    /// before 3.51.2.)
    fn drop(&mut self) {
        self.readers = None;
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite")
            .field(
                "readers",
                &self.inner.readers.as_ref().map_or(0, |r| r.conns.len()),
            )
            .finish_non_exhaustive()
    }
}

/// Work for the writer thread.
enum Job {
    /// Runs in its own savepoint inside the batch's transaction.
    Write(Box<dyn FnOnce(&Connection) -> Ran + Send>),
    /// Runs alone, outside any transaction (reads of an in-memory database).
    Read(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// A write that ran: whether to keep what it wrote, and how to answer it once the batch's
/// commit is known (`Some(reason)` if the commit failed).
struct Ran {
    keep: bool,
    answer: Box<dyn FnOnce(Option<String>) + Send>,
}

/// Counts of the writer thread's work.
#[derive(Default)]
struct Counters {
    transactions: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

/// A few read-only connections, each used by one caller at a time.
struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        for i in 0..n {
            if let Ok(mut conn) = self.conns[(start + i) % n].try_lock() {
                return f(&mut conn);
            }
        }
        // All busy: wait for one. A read that panicked leaves its connection usable.
        let mut conn = self.conns[start % n]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn)
    }
}

impl Sqlite {
    /// The schema version this code writes (`PRAGMA user_version` after migrating): the
    /// number of migration steps.
    pub const SCHEMA_VERSION: u32 = 5;

    /// Opens the existing database at `path` as [`Sqlite::open`] does, but never creates
    /// one: [`StoreError::NoDatabase`] if there is no such file. Every hub command but
    /// `init` opens its database this way, so a lost database is reported rather than
    /// silently replaced by an empty one.
    ///
    /// This blocks; call it at startup, or on a blocking thread.
    pub fn open_existing(path: &Path) -> StoreResult<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Self::open(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NoDatabase {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(StoreError::Backend(format!("{}: {e}", path.display()))),
        }
    }

    /// Creates a new database at `path` (mode 0600: it holds the sealed signing keys and
    /// the registry) and opens it as [`Sqlite::open`] does. [`StoreError::DatabaseExists`]
    /// if a file is there already: nothing is overwritten.
    ///
    /// This blocks; call it at startup, or on a blocking thread.
    pub fn create(path: &Path) -> StoreResult<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // An empty file is an empty SQLite database; creating it exclusively first is what
        // makes "never overwrite" hold even against another `init` at the same moment.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::DatabaseExists {
                    path: path.to_path_buf(),
                },
                _ => StoreError::Backend(format!("creating {}: {e}", path.display())),
            })?;
        Self::open(path)
    }

    /// Opens (creating it if needed) the database at `path`, switches it to WAL with durable
    /// commits, applies pending migrations and starts the writer thread. Refuses, with
    /// [`StoreError::Corrupt`], a database written by a newer hub. The hub's commands use
    /// [`Sqlite::open_existing`] or [`Sqlite::create`], which say which they mean.
    ///
    /// This blocks; call it at startup, or on a blocking thread.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let context = |e| prefix(e, &format!("opening {}", path.display()));
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let conn = Self::configure(conn, true).map_err(context)?;
        let conns = (0..READERS)
            .map(|_| {
                let reader = Connection::open(path).ctx("opening a read connection")?;
                reader
                    .busy_timeout(BUSY_TIMEOUT)
                    .ctx("setting busy_timeout")?;
                reader
                    .pragma_update(None, "query_only", "ON")
                    .ctx("setting query_only")?;
                reader.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                // Pages read through a map instead of a `pread` each: every commit empties a
                // reader's page cache, so each read after one fetches its pages again.
                reader
                    .pragma_update(None, "mmap_size", MMAP_BYTES)
                    .ctx("setting mmap_size")?;
                Ok(Mutex::new(reader))
            })
            .collect::<StoreResult<Vec<_>>>()
            .map_err(context)?;
        let checkpoints = Connection::open(path)
            .ctx("opening the checkpoint connection")
            .and_then(|c| {
                c.busy_timeout(BUSY_TIMEOUT).ctx("setting busy_timeout")?;
                // FULL: the checkpoint syncs the WAL before copying and the file after.
                c.pragma_update(None, "synchronous", "FULL")
                    .ctx("setting synchronous")?;
                Ok(c)
            })
            .map_err(context)?;
        let mut store = Self::start(
            conn,
            Some(Readers {
                conns,
                next: AtomicUsize::new(0),
            }),
            Some(checkpoints),
        )?;
        let mut lease = path.as_os_str().to_owned();
        lease.push(".lease");
        // Just built: no other handle yet.
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.lease = Some((PathBuf::from(lease), Mutex::new(None)));
        }
        Ok(store)
    }

    /// The housekeeping lease ([`Store::hold_lease`]) of replicas on one SQLite file: an
    /// exclusive `flock` on `DATABASE.lease`, which the kernel releases when the holder's
    /// process ends, however it ends.
    fn lease(&self) -> StoreResult<bool> {
        let Some((path, held)) = &self.inner.lease else {
            return Ok(true);
        };
        let mut held = held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_some() {
            return Ok(true);
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {
                *held = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Backend(format!(
                "locking {}: {e}",
                path.display()
            ))),
        }
    }

    /// A private in-memory database, for tests of code that needs a store. Nothing
    /// survives dropping it.
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().ctx("opening an in-memory database")?;
        Self::start(Self::configure(conn, false)?, None, None)
    }

    /// Fails unless the database takes a durable write, through the store's own writer:
    /// writes the schema version back unchanged. `serve` checks this before serving, since
    /// a hub that cannot write would answer every request `internal`.
    pub async fn check_writable(&self) -> StoreResult<()> {
        self.write("check_writable", |conn| {
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .ctx("reading the schema version")?;
            conn.pragma_update(None, "user_version", version)
                .ctx("writing the schema version back")
        })
        .await
    }

    /// Which of `ids` are registered clients, in one query however many there are (`device
    /// import` reports every id of a file that is taken before writing anything).
    pub async fn registered_among(
        &self,
        ids: Vec<String>,
    ) -> StoreResult<std::collections::HashSet<String>> {
        self.read("registered_among", move |conn| {
            let ids = serde_json::to_string(&ids)
                .map_err(|e| StoreError::Backend(format!("encoding the ids: {e}")))?;
            let mut stmt = conn
                .prepare("SELECT c.id FROM json_each(?1) j JOIN clients c ON c.id = j.value")
                .ctx("preparing the id lookup")?;
            let mut rows = stmt.query(params![ids]).ctx("looking the ids up")?;
            let mut found = std::collections::HashSet::new();
            while let Some(row) = rows.next().ctx("reading a row")? {
                found.insert(text(row, 0, "client id")?);
            }
            Ok(found)
        })
        .await
    }

    /// Which of `keys` (SEC1) belonged to devices revoked whole, each with that device: such
    /// a key is never accepted again. One query however many keys there are.
    pub async fn retired_among(&self, keys: Vec<Vec<u8>>) -> StoreResult<HashMap<Vec<u8>, String>> {
        self.read("retired_among", move |conn| {
            let keys = serde_json::to_string(&keys.iter().map(hex::encode).collect::<Vec<_>>())
                .map_err(|e| StoreError::Backend(format!("encoding the keys: {e}")))?;
            let mut stmt = conn
                .prepare(
                    "SELECT r.public_key, r.client FROM json_each(?1) j
                     JOIN retired_keys r ON r.public_key = unhex(j.value)",
                )
                .ctx("preparing the key lookup")?;
            let mut rows = stmt.query(params![keys]).ctx("looking the keys up")?;
            let mut found = HashMap::new();
            while let Some(row) = rows.next().ctx("reading a row")? {
                found.insert(
                    blob(row, 0, "retired key")?,
                    text(row, 1, "retired key holder")?,
                );
            }
            Ok(found)
        })
        .await
    }

    fn configure(mut conn: Connection, wal: bool) -> StoreResult<Connection> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
        // Each request runs in a savepoint (see `run_write`), whose undo copy of every page it
        // changes is a sub-journal. By default that spills to a temporary file once any
        // savepoint outgrows 64 KiB, and from then on every page a request touches costs two
        // `pwrite`s to it: 92 % of the writer's system calls at 64 clients
        // (docs/BENCHMARKS.md). In memory, a savepoint's undo costs a copy, and nothing it
        // holds needs to outlive the process: the commit is durable through the WAL alone.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .ctx("setting temp_store")?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    /// Starts the writer thread on `conn`, and beside it the checkpointer on `checkpoints`
    /// (a connection of its own to the same file; `None` in memory, where there is no WAL).
    fn start(
        conn: Connection,
        readers: Option<Readers>,
        checkpoints: Option<Connection>,
    ) -> StoreResult<Self> {
        let (jobs, queue) = mpsc::channel();
        let stats = Arc::new(Counters::default());
        let counters = Arc::clone(&stats);
        let writer = std::thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || run_writer(conn, &queue, &counters, checkpoints))
            .map_err(|e| StoreError::Backend(format!("starting the store's writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                jobs: Some(jobs),
                writer: Some(writer),
                stats,
                readers,
                lease: None,
            }),
        })
    }

    /// Hands a job to the writer thread; `Err` if it has stopped.
    fn send(&self, job: Job) -> Result<(), ()> {
        match &self.inner.jobs {
            Some(jobs) => jobs.send(job).map_err(|_| ()),
            None => Err(()),
        }
    }

    /// Runs `f` in the next batch of the writer thread; answers once that batch is durable.
    /// An `Err` from `f` undoes what it wrote (its savepoint) and nothing else.
    async fn write_with<T, E, F>(&self, what: &'static str, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Write(Box::new(move |conn| {
            let result = f(conn);
            Ran {
                keep: result.is_ok(),
                answer: Box::new(move |failed| {
                    let _ = tx.send(match failed {
                        None => result,
                        Some(m) => Err(StoreError::Backend(format!("{what}: {m}")).into()),
                    });
                }),
            }
        }));
        let stopped = || StoreError::Backend(format!("{what}: the store's writer has stopped"));
        self.send(job).map_err(|()| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// [`write_with`](Self::write_with) for plain store errors, named after the operation.
    async fn write<T, F>(&self, what: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.write_with(what, move |conn| f(conn).map_err(|e| prefix(e, what)))
            .await
    }

    /// Runs `f` on a read connection (on the writer thread for an in-memory database).
    async fn read<T, F>(&self, what: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        if let Some(readers) = &self.inner.readers {
            return readers.with(f).map_err(|e| prefix(e, what));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Read(Box::new(move |conn| {
            let _ = tx.send(f(conn).map_err(|e| prefix(e, what)));
        }));
        let stopped = || StoreError::Backend(format!("{what}: the store's writer has stopped"));
        self.send(job).map_err(|()| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The writer thread, with the checkpointer beside it when there is a WAL. The checkpointer
/// has closed its connection before the writer closes its own (see `Inner::drop` on closing
/// connections one at a time).
fn run_writer(
    mut conn: Connection,
    queue: &mpsc::Receiver<Job>,
    counters: &Counters,
    checkpoints: Option<Connection>,
) {
    let Some(checkpoints) = checkpoints else {
        return write_loop(&mut conn, queue, counters, None);
    };
    conn.wal_hook(Some(wal_pages));
    let (wake, woken) = mpsc::sync_channel(1);
    let copied = Arc::new(AtomicBool::new(false));
    let ours = Checkpoints {
        wake,
        copied: Arc::clone(&copied),
    };
    std::thread::scope(|scope| {
        let checkpointer = std::thread::Builder::new()
            .name("tessera-checkpoint".into())
            .spawn_scoped(scope, move || checkpoint_loop(checkpoints, &woken, &copied));
        if let Err(e) = checkpointer {
            // The writer still works without it: SQLite checkpoints inside commits, as
            // it does by default (which replaces the hook above).
            tracing::warn!(error = %e, "no checkpoint thread: the writer checkpoints");
            if let Err(e) = conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES) {
                tracing::error!(error = %e, "the WAL will not be checkpointed");
            }
            return write_loop(&mut conn, queue, counters, None);
        }
        write_loop(&mut conn, queue, counters, Some(&ours));
        // Stops the checkpointer, which the scope then waits for.
        drop(ours);
    });
}

/// The writer thread's loop: batches of writes, one transaction each (see the module doc).
fn write_loop(
    conn: &mut Connection,
    queue: &mpsc::Receiver<Job>,
    counters: &Counters,
    checkpoint: Option<&Checkpoints>,
) {
    let mut pacer = CheckpointPacer::default();
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                // Every handle is gone and every write answered.
                Err(_) => return,
            },
        };
        let first = match job {
            Job::Read(f) => {
                f(conn);
                continue;
            }
            Job::Write(f) => f,
        };
        if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
            // Another process holds the write lock past the busy timeout: fail this write
            // only (answering it needs running it, so say why instead).
            let reason = format!("beginning a write transaction: {e}");
            tracing::error!(%reason, "store write failed");
            let ran = run_write(conn, first);
            (ran.answer)(Some(reason));
            continue;
        }
        let mut answers = vec![run_write(conn, first)];
        while answers.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(Job::Write(f)) => answers.push(run_write(conn, f)),
                Ok(read) => {
                    next = Some(read);
                    break;
                }
                Err(_) => break,
            }
        }
        let failed = run(conn, "COMMIT")
            .err()
            .map(|e| format!("committing: {e}"));
        if let Some(reason) = &failed {
            tracing::error!(%reason, writes = answers.len(), "store commit failed");
            let _ = run(conn, "ROLLBACK");
        } else {
            counters.transactions.fetch_add(1, Ordering::Relaxed);
            counters
                .writes
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
        }
        for ran in answers {
            (ran.answer)(failed.clone());
        }
        // After answering: a checkpoint the writer finishes delays the next batch only.
        if failed.is_none()
            && let Some(checkpoints) = checkpoint
        {
            checkpoints.after_commit(conn, &mut pacer);
        }
    }
}

/// When the writer asks for a checkpoint: once the WAL holds [`CHECKPOINT_PAGES`], then
/// again only after that many more. (A checkpoint that ran while the writer kept appending
/// leaves the WAL above the threshold; asking after every commit then would sync the files
/// once per commit.) The WAL starting over from its beginning resets the count.
#[derive(Debug, Default)]
struct CheckpointPacer {
    /// WAL pages after the last commit.
    last: i32,
    /// Pages at which to ask next (0: at `CHECKPOINT_PAGES`).
    next: i32,
}

impl CheckpointPacer {
    /// Whether to ask for a checkpoint, given the pages in the WAL after a commit.
    fn due(&mut self, pages: i32) -> bool {
        if pages < self.last || self.next == 0 {
            self.next = CHECKPOINT_PAGES;
        }
        self.last = pages;
        if pages < self.next {
            return false;
        }
        self.next = pages.saturating_add(CHECKPOINT_PAGES);
        true
    }
}

/// The writer's side of the checkpointer.
struct Checkpoints {
    /// Asks the checkpointer for a checkpoint (full: already asked).
    wake: mpsc::SyncSender<()>,
    /// Set by the checkpointer when it has copied nearly all of the WAL.
    copied: Arc<AtomicBool>,
}

impl Checkpoints {
    /// After each commit: asks for a checkpoint when one is due, and finishes one the
    /// checkpointer has nearly done.
    ///
    /// The WAL only starts over from its beginning (instead of growing) when a write
    /// transaction begins with every frame copied back. The checkpointer, copying while the
    /// writer appends, is always a few commits behind; so once it has copied all but the
    /// last few frames, the writer copies those itself, between two batches, and its next
    /// transaction starts the WAL over. Without this the WAL grew by gigabytes under
    /// continuous load.
    fn after_commit(&self, conn: &Connection, pacer: &mut CheckpointPacer) {
        if self.copied.swap(false, Ordering::AcqRel)
            && let Err(e) = checkpoint(conn)
        {
            tracing::warn!(error = %e, "finishing a WAL checkpoint failed");
        }
        if pacer.due(WAL_PAGES.with(std::cell::Cell::get)) {
            let _ = self.wake.try_send(());
        }
    }
}

/// Frames the checkpointer is content to leave for the writer to copy (see
/// [`Checkpoints::after_commit`]).
const CHECKPOINT_LEFT: i64 = 64;

/// One `PASSIVE` checkpoint: the frames in the WAL and how many are copied back.
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// `PASSIVE` passes the checkpointer makes before leaving the rest to the writer.
const CHECKPOINT_PASSES: usize = 4;

/// The checkpointer thread: copies the WAL back each time the writer asks, in up to
/// [`CHECKPOINT_PASSES`] `PASSIVE` passes (each copies what the writer appended during the
/// last) until at most [`CHECKPOINT_LEFT`] frames are left, then leaves the rest to the
/// writer, however many: the WAL must start over even under a load the passes never catch
/// up with. Stops when the writer does.
fn checkpoint_loop(conn: Connection, woken: &mpsc::Receiver<()>, copied: &AtomicBool) {
    while woken.recv().is_ok() {
        for pass in 1..=CHECKPOINT_PASSES {
            match checkpoint(&conn) {
                Ok((frames, done))
                    if frames - done > CHECKPOINT_LEFT && pass < CHECKPOINT_PASSES =>
                {
                    continue;
                }
                Ok(_) => copied.store(true, Ordering::Release),
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; tried again later"),
            }
            break;
        }
    }
}

/// Runs one of the writer's fixed transaction statements, prepared once per connection
/// (`execute_batch` would parse it again each time: several per request).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Runs one write in its own savepoint: kept if it succeeded, undone if not (or if it
/// panicked: the store keeps serving the others).
fn run_write(conn: &Connection, f: Box<dyn FnOnce(&Connection) -> Ran + Send>) -> Ran {
    let undo = |conn: &Connection| {
        run(conn, "ROLLBACK TO write")
            .and_then(|()| run(conn, "RELEASE write"))
            .map_err(|e| format!("undoing a write: {e}"))
    };
    if let Err(e) = run(conn, "SAVEPOINT write") {
        let reason = format!("starting a write: {e}");
        return Ran {
            keep: false,
            answer: Box::new(move |_| tracing::error!(%reason, "store write not run")),
        };
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn))) {
        Ok(ran) => {
            let closed = if ran.keep {
                run(conn, "RELEASE write").map_err(|e| format!("keeping a write: {e}"))
            } else {
                undo(conn)
            };
            match closed {
                Ok(()) => ran,
                Err(reason) => Ran {
                    keep: false,
                    answer: Box::new(move |_| (ran.answer)(Some(reason))),
                },
            }
        }
        Err(_) => {
            let _ = undo(conn);
            Ran {
                keep: false,
                answer: Box::new(|_| tracing::error!("a store write panicked; it was undone")),
            }
        }
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
        match step {
            Step::Sql(sql) => tx
                .execute_batch(sql)
                .map_err(|e| StoreError::Backend(format!("applying migration {}: {e}", i + 1)))?,
            Step::Code(f) => {
                f(&tx).map_err(|e| prefix(e, &format!("applying migration {}", i + 1)))?
            }
        }
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
pub(super) fn prefix(e: StoreError, what: &str) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(format!("{what}: {m}")),
        StoreError::Corrupt(m) => StoreError::Corrupt(format!("{what}: {m}")),
        StoreError::Conflict(m) => StoreError::Conflict(format!("{what}: {m}")),
        StoreError::NotFound(m) => StoreError::NotFound(format!("{what}: {m}")),
        StoreError::Database {
            message,
            persistent,
            source,
        } => StoreError::Database {
            message: format!("{what}: {message}"),
            persistent,
            source,
        },
        StoreError::Retryable {
            message,
            attempts,
            source,
        } => StoreError::Retryable {
            message: format!("{what}: {message}"),
            attempts,
            source,
        },
        // They name their file already.
        e @ (StoreError::NoDatabase { .. } | StoreError::DatabaseExists { .. }) => e,
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

const ENTRY_COLUMNS: &str = "audience, token_hash, subject, issued_before, expires_at";

/// A revocation entry from the five [`ENTRY_COLUMNS`] starting at `at`.
fn entry_row(row: &Row<'_>, at: usize) -> StoreResult<Addressed> {
    let audience = text(row, at, "entry audience")?;
    let hash = opt_blob(row, at + 1, "entry token hash")?;
    let subject: Option<String> = row.get(at + 2).map_err(|e| column(e, "entry subject"))?;
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

fn key_row(row: &Row<'_>) -> StoreResult<KeyRecord> {
    Ok(KeyRecord {
        kid: fixed(row, 0, "key id")?,
        public_key: blob(row, 1, "key public key")?,
        sealed_private_key: blob(row, 2, "sealed private key")?,
        created_at: time(row, 3, "key created_at")?,
        active_from: time(row, 4, "key active_from")?,
        published_at: opt_time(row, 6, "key published_at")?,
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
        count: time(row, 6, "audit count")?,
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

/// Inserts one client with its groups.
fn insert_client(tx: &Connection, client: &ClientRecord) -> StoreResult<()> {
    if let Some(key) = &client.public_key {
        refuse_retired_key(tx, key).map_err(|e| match e {
            Abort::Refused(r) => StoreError::Conflict(format!("client {:?}: {r}", client.id)),
            Abort::Store(e) => e,
        })?;
    }
    tx.prepare_cached(&format!(
        "INSERT INTO clients ({CLIENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))
    .ctx("preparing the client insert")?
    .execute(params![
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
    ])
    .map_err(|e| {
        insert_error(e, "inserting the client", || {
            format!("client {:?} already exists", client.id)
        })
    })?;
    let mut insert = tx
        .prepare_cached("INSERT INTO client_groups (client, ordinal, name) VALUES (?1, ?2, ?3)")
        .ctx("preparing the group insert")?;
    for (i, group) in client.groups.iter().enumerate() {
        let ordinal = i64::try_from(i).unwrap_or(i64::MAX);
        insert
            .execute(params![client.id, ordinal, group])
            .ctx("inserting a group")?;
    }
    Ok(())
}

/// The client with this id, without its groups.
fn client_without_groups(conn: &Connection, id: &str) -> StoreResult<Option<ClientRecord>> {
    Ok(collect(
        conn,
        &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE id = ?1"),
        params![id],
        client_row,
    )?
    .pop())
}

/// Refuses a key a device revoked whole held ([`Refused::Conflict`] naming that device).
fn refuse_retired_key(tx: &Connection, key: &[u8]) -> Result<(), Abort> {
    let holder: Option<String> = tx
        .prepare_cached("SELECT client FROM retired_keys WHERE public_key = ?1")
        .ctx("preparing the retired key read")?
        .query_row(params![key], |row| row.get(0))
        .optional()
        .ctx("reading the retired keys")?;
    match holder {
        Some(device) => Err(Abort::from(Refused::Conflict(format!(
            "this key belonged to device {device:?}, which was revoked: a revoked device's \
             key is never accepted again; make a new key"
        )))),
        None => Ok(()),
    }
}

/// Marks a client revoked at `at`. A second revocation keeps the first time. A device
/// loses its key and enrollment, and its key is retired for good ([`refuse_retired_key`]);
/// other clients keep their registered key for the record.
fn revoke_client(tx: &Connection, id: &str, at: u64) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO retired_keys (public_key, client, retired_at)
         SELECT public_key, id, ?2 FROM clients
         WHERE id = ?1 AND kind = 'device' AND public_key IS NOT NULL",
    )
    .ctx("preparing the key retirement")?
    .execute(params![id, stored(at, "revoked_at")?])
    .ctx("retiring the device's key")?;
    let n = tx
        .prepare_cached(
            "UPDATE clients SET
                revoked_at = COALESCE(revoked_at, ?2),
                enrollment_code_key = NULL,
                public_key = CASE kind WHEN 'device' THEN NULL ELSE public_key END,
                enrolled_at = CASE kind WHEN 'device' THEN NULL ELSE enrolled_at END
             WHERE id = ?1",
        )
        .ctx("preparing the client update")?
        .execute(params![id, stored(at, "revoked_at")?])
        .ctx("revoking the client")?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("client {id:?}")));
    }
    Ok(())
}

/// Revokes every grant family of a client; returns how many grants were live.
fn revoke_grants(tx: &Connection, client: &str) -> StoreResult<u64> {
    let live: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM grants WHERE client = ?1 AND used = 0 AND family_revoked = 0",
        )
        .ctx("preparing the grant count")?
        .query_row(params![client], |row| row.get(0))
        .ctx("counting live grants")?;
    tx.prepare_cached(
        "UPDATE grants SET family_revoked = 1
         WHERE family_revoked = 0 AND family IN (SELECT family FROM grants WHERE client = ?1)",
    )
    .ctx("preparing the family update")?
    .execute(params![client])
    .ctx("revoking the families")?;
    u64::try_from(live).map_err(|_| StoreError::Corrupt(format!("grant count {live}")))
}

/// How a control command is stored.
fn command_number(c: Command) -> i64 {
    i64::try_from(c.as_u64()).unwrap_or(i64::MAX)
}

/// Resolves revocation targets inside the revoking transaction (see [`Store::revoke`]).
fn resolve(
    tx: &Connection,
    targets: &[Target],
    now: u64,
    leeway: u64,
    unmatched: Unmatched,
) -> StoreResult<Resolved> {
    // Live: still accepted by a verifier with this leeway.
    let live_after = bound(now.saturating_sub(leeway));
    // A target that names nothing: refused, or skipped.
    let unmatched = |e: StoreError| match unmatched {
        Unmatched::Refuse => Err(e),
        Unmatched::Skip => Ok(()),
    };
    let mut resolved = Resolved::default();
    // Subjects in the order named, each once; whole wins.
    let mut subjects: Vec<(String, bool, Option<ClientRecord>)> = Vec::new();
    let mut add = |id: &str, whole: bool, client: Option<ClientRecord>| match subjects
        .iter_mut()
        .find(|(s, _, _)| s == id)
    {
        Some(held) => held.1 |= whole,
        None => subjects.push((id.to_owned(), whole, client)),
    };
    let live_token = |sql: &str, key: &[u8], what: String| -> StoreResult<Option<IssuedToken>> {
        match collect(
            tx,
            &format!("SELECT {TOKEN_COLUMNS} FROM issued_tokens WHERE {sql} AND expires_at >= ?2"),
            params![key, live_after],
            token_row,
        )?
        .pop()
        {
            Some(t) => Ok(Some(t)),
            None => unmatched(StoreError::NotFound(format!(
                "{what}: no live token of this hub has it (unknown, or already expired)"
            )))
            .map(|()| None),
        }
    };
    let mut add_token = |t: Option<IssuedToken>| -> StoreResult<()> {
        let Some(t) = t else { return Ok(()) };
        // Revoked by hash before: nothing more to do (and nothing counted).
        let listed = tx
            .prepare_cached("SELECT 1 FROM stream_entries WHERE token_hash = ?1 LIMIT 1")
            .ctx("preparing the entry lookup")?
            .exists(params![&t.hash[..]])
            .ctx("looking the token up")?;
        if !listed && !resolved.tokens.iter().any(|(held, _)| held.hash == t.hash) {
            let holder = client_without_groups(tx, &t.subject)?;
            resolved.tokens.push((t, holder));
        }
        Ok(())
    };
    for target in targets {
        match target {
            Target::TokenHash(hash) => add_token(live_token(
                "hash = ?1",
                hash,
                format!("token hash {}", hex::encode(hash)),
            )?)?,
            Target::TokenId(cti) => add_token(live_token(
                "cti = ?1",
                cti,
                format!("token id {}", hex::encode(cti)),
            )?)?,
            Target::Subject(id) => {
                let client = client_without_groups(tx, id)?;
                if client.is_none() && live_tokens(tx, id, live_after)?.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no client {id:?}, and no live token issued to it"
                    )))?;
                    continue;
                }
                add(id, false, client);
            }
            Target::Device(id) => match client_without_groups(tx, id)? {
                Some(c) if c.kind == ClientKind::Device => add(id, true, Some(c)),
                Some(c) => unmatched(StoreError::NotFound(format!(
                    "{id:?} is a registered {}, not a device (revoke it as a subject)",
                    c.kind.as_str()
                )))?,
                None => unmatched(StoreError::NotFound(format!("no device {id:?}")))?,
            },
            Target::Group(group) => {
                let members = collect(
                    tx,
                    &format!(
                        "SELECT {} FROM clients c JOIN client_groups g ON g.client = c.id
                         WHERE g.name = ?1 AND c.kind = 'device' ORDER BY c.id",
                        CLIENT_COLUMNS
                            .split(", ")
                            .map(|c| format!("c.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    params![group],
                    client_row,
                )?;
                if members.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no device in group {group:?}"
                    )))?;
                }
                for c in members {
                    add(&c.id.clone(), true, Some(c));
                }
            }
            Target::Role(role) => {
                let members = collect(
                    tx,
                    &format!("SELECT {CLIENT_COLUMNS} FROM clients WHERE role = ?1 ORDER BY id"),
                    params![role],
                    client_row,
                )?;
                if members.is_empty() {
                    unmatched(StoreError::NotFound(format!(
                        "no client with role {role:?}"
                    )))?;
                }
                for c in members {
                    let whole = c.kind == ClientKind::Device;
                    add(&c.id.clone(), whole, Some(c));
                }
            }
            Target::Devices(ids) => {
                let mut unknown = Vec::new();
                let mut found = Vec::new();
                for id in ids {
                    match client_without_groups(tx, id)? {
                        Some(c) if c.kind == ClientKind::Device => found.push(c),
                        _ => unknown.push(id.as_str()),
                    }
                }
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
                for c in found {
                    add(&c.id.clone(), true, Some(c));
                }
            }
        }
    }
    for (id, whole, client) in subjects {
        let live_tokens = live_tokens(tx, &id, live_after)?;
        resolved.subjects.push(ResolvedSubject {
            id,
            client,
            whole,
            live_tokens,
        });
    }
    Ok(resolved)
}

/// Revokes `targets` inside `tx` (see [`Store::revoke`]); the caller commits.
fn revoke_in(
    tx: &Connection,
    targets: &[Target],
    now: u64,
    leeway: u64,
    unmatched: Unmatched,
) -> StoreResult<Outcome> {
    let resolved = resolve(tx, targets, now, leeway, unmatched)?;
    let plan =
        revocation::plan(&resolved, now, leeway).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    for subject in &resolved.subjects {
        let Some(client) = &subject.client else {
            continue;
        };
        if subject.whole {
            revoke_client(tx, &client.id, now)?;
        } else {
            tx.prepare_cached(
                "UPDATE clients SET tokens_revoked_before =
                    MAX(COALESCE(tokens_revoked_before, 0), ?2) WHERE id = ?1",
            )
            .ctx("preparing the cut-off update")?
            .execute(params![client.id, stored(now, "now")?])
            .ctx("recording the cut-off")?;
        }
        revoke_grants(tx, &subject.id)?;
    }
    let mut outcome = Outcome {
        revoked: plan.revoked,
        controls: plan.controls.clone(),
        ..Outcome::default()
    };
    for (name, changes) in plan.changes {
        let mut seq: u64 = tx
            .prepare_cached("SELECT seq FROM revocation_streams WHERE name = ?1")
            .ctx("preparing the stream read")?
            .query_row(params![name], |row| row.get::<_, i64>(0))
            .optional()
            .ctx("reading the stream")?
            .map_or(Ok(0), |v| {
                u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("seq {v}")))
            })?;
        tx.prepare_cached(
            "INSERT INTO revocation_streams (name, seq) VALUES (?1, 0)
             ON CONFLICT (name) DO NOTHING",
        )
        .ctx("preparing the stream insert")?
        .execute(params![name])
        .ctx("recording the stream")?;
        for entries in changes {
            seq += 1;
            insert_change(tx, &name, seq, now, &entries)?;
            outcome.changes.push(Change {
                stream: name.clone(),
                seq,
                created_at: now,
                entries,
            });
        }
        tx.prepare_cached("UPDATE revocation_streams SET seq = ?2 WHERE name = ?1")
            .ctx("preparing the stream update")?
            .execute(params![name, stored(seq, "seq")?])
            .ctx("numbering the stream")?;
        outcome.latest.insert(name, seq);
    }
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO pending_controls (device, command, issued_at)
             VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .ctx("preparing the control insert")?;
    for c in &plan.controls {
        insert
            .execute(params![
                c.device,
                command_number(c.command),
                stored(c.issued_at, "issued_at")?
            ])
            .ctx("recording a control message")?;
    }
    Ok(outcome)
}

/// Tokens issued to `subject` with `expires_at ≥ live_after`.
fn live_tokens(conn: &Connection, subject: &str, live_after: i64) -> StoreResult<Vec<IssuedToken>> {
    collect(
        conn,
        &format!(
            "SELECT {TOKEN_COLUMNS} FROM issued_tokens
             WHERE subject = ?1 AND expires_at >= ?2 ORDER BY issued_at, cti"
        ),
        params![subject, live_after],
        token_row,
    )
}

// --- one request, one transaction (Store::commit) ---

/// Why a commit stops: a refusal (nothing of the request is kept) or a failure.
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

/// Every effect of one request, inside the batch's transaction (see [`Store::commit`]).
/// An `Err` rolls back the request's savepoint; `Ok(Err(Refused::Grant(_)))` keeps what a
/// reused grant revoked.
fn commit_in(tx: &Connection, c: RequestCommit) -> Result<Result<Committed, Refused>, Abort> {
    let now = c.now();
    if !remember_nonce_in(tx, &c.client, &c.nonce, now, c.nonce_expires_at)? {
        return Err(Abort::from(Refused::Replay));
    }
    if !take_rate_token_in(tx, &c.client, c.now_ms, c.rate)? {
        return Err(Abort::from(Refused::RateLimited));
    }
    Ok(Ok(match c.effect {
        Effect::None => Committed::Done,
        Effect::Enroll { public_key } => {
            enroll_in(tx, &c.client, &public_key, now)?;
            Committed::Done
        }
        Effect::Issue {
            token,
            grant,
            spends,
        } => {
            if let Some(hash) = spends {
                match use_grant_in(tx, &hash, now)? {
                    GrantUse::Fresh(_) => {}
                    // Keeps the family's revocation: the request fails, the reuse is known.
                    used @ GrantUse::Reused(_) => return Ok(Err(Refused::Grant(used))),
                    other => return Err(Abort::from(Refused::Grant(other))),
                }
            }
            record_issued_in(tx, &token, grant.as_ref())?;
            Committed::Done
        }
        Effect::SpendGrant(hash) => Committed::Spent(use_grant_in(tx, &hash, now)?),
        Effect::RevokeGrantsOf(client) => Committed::GrantsRevoked(revoke_grants(tx, &client)?),
        Effect::Revoke {
            targets,
            leeway,
            unmatched,
        } => match revoke_in(tx, &targets, now, leeway, unmatched) {
            Ok(outcome) => Committed::Revoked(outcome),
            Err(StoreError::NotFound(m)) => return Err(Abort::from(Refused::NotFound(m))),
            Err(StoreError::Conflict(m)) => return Err(Abort::from(Refused::Conflict(m))),
            Err(e) => return Err(e.into()),
        },
    }))
}

/// Remembers a nonce until `expires_at`; `false` if the client already used it in a
/// request still remembered (a replay). Forgets a few expired nonces on the way.
fn remember_nonce_in(
    tx: &Connection,
    client: &str,
    nonce: &[u8; 16],
    now: u64,
    expires_at: u64,
) -> StoreResult<bool> {
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
    Ok(fresh)
}

/// Takes one token from the client's bucket; `false` (and nothing written) if it is empty.
fn take_rate_token_in(
    tx: &Connection,
    client: &str,
    now_ms: u64,
    rate: RateLimit,
) -> StoreResult<bool> {
    if rate == RateLimit::NONE {
        return Ok(true);
    }
    let row = tx
        .prepare_cached("SELECT tokens, updated_ms FROM rate_buckets WHERE client = ?1")
        .ctx("preparing the bucket read")?
        .query_row(params![client], |row| {
            Ok((row.get::<_, f64>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()
        .ctx("reading the bucket")?;
    let burst = f64::from(rate.burst);
    let (tokens, updated_ms) = match row {
        None => (burst, now_ms),
        Some((tokens, updated_ms)) => {
            let updated_ms = u64::try_from(updated_ms)
                .map_err(|_| StoreError::Corrupt(format!("bucket updated_ms is {updated_ms}")))?;
            if !tokens.is_finite() || tokens < 0.0 {
                return Err(StoreError::Corrupt(format!("bucket holds {tokens} tokens")));
            }
            // A clock that went back (another replica's, say) refills nothing, and the
            // bucket keeps the later time so the interval is not counted twice.
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
    Ok(true)
}

/// Records a device's enrollment (see [`Effect::Enroll`]).
fn enroll_in(tx: &Connection, id: &str, key: &[u8], at: u64) -> Result<(), Abort> {
    let row = tx
        .prepare_cached("SELECT public_key, enrolled_at, revoked_at FROM clients WHERE id = ?1")
        .ctx("preparing the client read")?
        .query_row(params![id], |row| {
            Ok((
                row.get::<_, Option<Vec<u8>>>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, Option<i64>>(2)?,
            ))
        })
        .optional()
        .ctx("reading the client")?;
    let Some((current, enrolled_at, revoked_at)) = row else {
        return Err(Abort::from(Refused::NotFound(format!("client {id:?}"))));
    };
    refuse_retired_key(tx, key)?;
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
        // Enrolling again with the same key changes nothing.
        Some(_) if enrolled_at.is_some() => return Ok(()),
        _ => {}
    }
    tx.prepare_cached(
        "UPDATE clients SET public_key = ?2, enrolled_at = ?3, enrollment_code_key = NULL
         WHERE id = ?1",
    )
    .ctx("preparing the enrollment")?
    .execute(params![id, key, stored(at, "enrolled_at")?])
    .ctx("updating the client")?;
    Ok(())
}

/// Records an issued token and its grant (see [`Effect::Issue`]).
fn record_issued_in(
    tx: &Connection,
    token: &IssuedToken,
    grant: Option<&GrantRecord>,
) -> Result<(), Abort> {
    // Re-checked here, under the write lock: a revocation that committed after the hub
    // decided to issue must still win.
    let holder = tx
        .prepare_cached("SELECT revoked_at, tokens_revoked_before FROM clients WHERE id = ?1")
        .ctx("preparing the holder check")?
        .query_row(params![token.subject], |row| {
            Ok((row.get::<_, Option<i64>>(0)?, row.get::<_, Option<i64>>(1)?))
        })
        .optional()
        .ctx("reading the holder")?;
    match holder {
        Some((Some(_), _)) => {
            return Err(Abort::from(Refused::HolderRevoked(token.subject.clone())));
        }
        Some((None, Some(before))) if bound(token.issued_at) < before => {
            return Err(Abort::from(Refused::CutOff {
                subject: token.subject.clone(),
                issued_before: u64::try_from(before).map_err(|_| {
                    StoreError::Corrupt(format!("tokens_revoked_before is {before}"))
                })?,
            }));
        }
        _ => {}
    }
    let inserted = tx
        .prepare_cached(&format!(
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
        ]);
    if let Err(e) = inserted {
        return Err(
            match insert_error(e, "inserting the token", || {
                format!(
                    "a token with cti {} is already recorded",
                    hex::encode(token.cti)
                )
            }) {
                StoreError::Conflict(m) => Refused::Conflict(m).into(),
                other => other.into(),
            },
        );
    }
    if let Some(g) = grant {
        // A grant rotated into a family that was revoked meanwhile (its predecessor was
        // replayed on another replica) starts revoked.
        let inserted = tx
            .prepare_cached(&format!(
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
            ]);
        if let Err(e) = inserted {
            return Err(
                match insert_error(e, "inserting the grant", || {
                    "a grant with this hash is already recorded".to_owned()
                }) {
                    StoreError::Conflict(m) => Refused::Conflict(m).into(),
                    other => other.into(),
                },
            );
        }
    }
    Ok(())
}

/// The grant with this hash as stored.
fn grant_state(conn: &Connection, hash: &[u8; 32]) -> StoreResult<Option<GrantState>> {
    Ok(collect(
        conn,
        &format!("SELECT {GRANT_COLUMNS} FROM grants WHERE hash = ?1"),
        params![&hash[..]],
        grant_row,
    )?
    .pop()
    .map(|(record, used, family_revoked)| GrantState {
        record,
        used,
        family_revoked,
    }))
}

/// Presents a grant (see [`Effect::SpendGrant`]).
fn use_grant_in(tx: &Connection, hash: &[u8; 32], now: u64) -> StoreResult<GrantUse> {
    let Some(state) = grant_state(tx, hash)? else {
        return Ok(GrantUse::Unknown);
    };
    let outcome = state.classify(now);
    match &outcome {
        // Replay of a rotated grant: someone else holds a copy. Revoke the family.
        GrantUse::Reused(grant) => {
            tx.prepare_cached("UPDATE grants SET family_revoked = 1 WHERE family = ?1")
                .ctx("preparing the family revocation")?
                .execute(params![&grant.family[..]])
                .ctx("revoking the family")?;
        }
        GrantUse::Fresh(_) => {
            tx.prepare_cached("UPDATE grants SET used = 1 WHERE hash = ?1")
                .ctx("preparing the grant use")?
                .execute(params![&hash[..]])
                .ctx("marking the grant used")?;
        }
        _ => {}
    }
    Ok(outcome)
}

impl Store for Sqlite {
    // --- registry ---

    async fn add_client(&self, client: ClientRecord) -> StoreResult<()> {
        self.write("add_client", move |tx| {
            insert_client(tx, &client)?;
            Ok(())
        })
        .await
    }

    async fn reprovision_device(
        &self,
        id: &str,
        public_key: Option<Vec<u8>>,
        code_key: Option<[u8; 32]>,
    ) -> StoreResult<()> {
        let id = id.to_owned();
        self.write("reprovision_device", move |tx| {
            let Some(client) = client_without_groups(tx, &id)? else {
                return Err(StoreError::NotFound(format!("client {id:?}")));
            };
            if client.kind != ClientKind::Device {
                return Err(StoreError::Conflict(format!(
                    "{id:?} is an {}, not a device",
                    client.kind.as_str()
                )));
            }
            if client.revoked_at.is_none() && client.enrolled_at.is_some() {
                return Err(StoreError::Conflict(format!(
                    "device {id:?} is enrolled and not revoked: revoke it first (that cuts its \
                     key and tokens), then provision it again"
                )));
            }
            if let Some(key) = &public_key {
                refuse_retired_key(tx, key).map_err(|e| match e {
                    Abort::Refused(r) => StoreError::Conflict(r.to_string()),
                    Abort::Store(e) => e,
                })?;
            }
            tx.prepare_cached(
                "UPDATE clients SET public_key = ?2, enrollment_code_key = ?3,
                    enrolled_at = NULL, revoked_at = NULL
                 WHERE id = ?1",
            )
            .ctx("preparing the reprovisioning")?
            .execute(params![id, public_key, code_key.as_ref().map(|k| &k[..])])
            .ctx("reprovisioning the device")?;
            Ok(())
        })
        .await
    }

    async fn client(&self, id: &str) -> StoreResult<Option<ClientRecord>> {
        let id = id.to_owned();
        self.read("client", move |conn| {
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
        self.read("clients", move |conn| {
            let tx = deferred(conn)?;
            load_clients(&tx, kind)
        })
        .await
    }

    async fn remove_client(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.write("remove_client", move |tx| {
            // Groups go by cascade. Grants go too: a client registered again under this id
            // must not inherit the old one's grants.
            let removed = tx
                .execute("DELETE FROM clients WHERE id = ?1", params![id])
                .ctx("deleting the client")?;
            tx.execute("DELETE FROM grants WHERE client = ?1", params![id])
                .ctx("deleting the client's grants")?;
            Ok(removed > 0)
        })
        .await
    }

    async fn set_role(
        &self,
        id: &str,
        role: &str,
        disallowed: Vec<Target>,
        now: u64,
        leeway: u64,
    ) -> StoreResult<Outcome> {
        let (id, role) = (id.to_owned(), role.to_owned());
        self.write("set_role", move |tx| {
            let n = tx
                .execute(
                    "UPDATE clients SET role = ?2 WHERE id = ?1",
                    params![id, role],
                )
                .ctx("updating the role")?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("client {id:?}")));
            }
            let outcome = if disallowed.is_empty() {
                Outcome::default()
            } else {
                revoke_in(tx, &disallowed, now, leeway, Unmatched::Skip)?
            };
            Ok(outcome)
        })
        .await
    }

    async fn add_clients(&self, clients: Vec<ClientRecord>) -> StoreResult<()> {
        self.write("add_clients", move |tx| {
            for client in &clients {
                insert_client(tx, client)?;
            }
            Ok(())
        })
        .await
    }

    // --- requests ---

    async fn nonce_seen(&self, client: &str, nonce: &[u8; 16], now: u64) -> StoreResult<bool> {
        let (client, nonce) = (client.to_owned(), *nonce);
        self.read("nonce_seen", move |conn| {
            conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM nonces
                 WHERE client = ?1 AND nonce = ?2 AND expires_at >= ?3)",
            )
            .ctx("preparing the nonce read")?
            .query_row(params![client, &nonce[..], bound(now)], |row| row.get(0))
            .ctx("reading the nonce")
        })
        .await
    }

    async fn grant(&self, hash: &[u8; 32]) -> StoreResult<Option<GrantState>> {
        let hash = *hash;
        self.read("grant", move |conn| grant_state(conn, &hash))
            .await
    }

    async fn commit(&self, request: RequestCommit) -> StoreResult<Result<Committed, Refused>> {
        match self
            .write_with("commit", move |tx| commit_in(tx, request))
            .await
        {
            Ok(done) => Ok(done),
            Err(Abort::Refused(refused)) => Ok(Err(*refused)),
            Err(Abort::Store(e)) => Err(prefix(e, "commit")),
        }
    }

    async fn issued(&self, cti: &[u8]) -> StoreResult<Option<IssuedToken>> {
        let cti = cti.to_vec();
        self.read("issued", move |conn| {
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
        self.read("issued_to", move |conn| {
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
        self.read("issued_for", move |conn| {
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

    // --- revocation ---

    async fn revoke(
        &self,
        targets: Vec<Target>,
        now: u64,
        leeway: u64,
        unmatched: Unmatched,
    ) -> StoreResult<Outcome> {
        self.write("revoke", move |tx| {
            let outcome = revoke_in(tx, &targets, now, leeway, unmatched)?;
            Ok(outcome)
        })
        .await
    }

    async fn streams(&self) -> StoreResult<Vec<StreamState>> {
        self.read("streams", move |conn| {
            collect(
                conn,
                "SELECT name, seq, snapshot_seq, snapshot_pages FROM revocation_streams
                 ORDER BY name",
                [],
                |row| {
                    Ok(StreamState {
                        name: text(row, 0, "stream name")?,
                        seq: time(row, 1, "stream seq")?,
                        snapshot_seq: time(row, 2, "stream snapshot_seq")?,
                        snapshot_pages: time(row, 3, "stream snapshot_pages")?,
                    })
                },
            )
        })
        .await
    }

    async fn stream_entries(
        &self,
        stream: &str,
        from: u64,
        now: u64,
        leeway: u64,
        max_entries: usize,
    ) -> StoreResult<StreamRead> {
        let stream = stream.to_owned();
        self.read("stream_entries", move |conn| {
            let tx = deferred(conn)?;
            let latest = tx
                .prepare_cached("SELECT seq FROM revocation_streams WHERE name = ?1")
                .ctx("preparing the stream read")?
                .query_row(params![stream], |row| row.get::<_, i64>(0))
                .optional()
                .ctx("reading the stream")?
                .unwrap_or(0);
            let latest = u64::try_from(latest)
                .map_err(|_| StoreError::Corrupt(format!("stream seq {latest}")))?;
            let limit = i64::try_from(max_entries).unwrap_or(i64::MAX);
            let rows = collect(
                &tx,
                &format!(
                    "SELECT seq, {ENTRY_COLUMNS} FROM stream_entries
                     WHERE stream = ?1 AND seq >= ?2 AND expires_at >= ?3
                     ORDER BY seq, ordinal LIMIT ?4"
                ),
                params![
                    stream,
                    bound(from),
                    bound(now.saturating_sub(leeway)),
                    limit
                ],
                |row| Ok((time(row, 0, "entry seq")?, entry_row(row, 1)?)),
            )?;
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
        })
        .await
    }

    async fn set_snapshot_published(&self, stream: &str, seq: u64, pages: u64) -> StoreResult<()> {
        let stream = stream.to_owned();
        self.write("set_snapshot_published", move |tx| {
            tx.execute(
                "UPDATE revocation_streams SET snapshot_seq = ?2, snapshot_pages = ?3
                 WHERE name = ?1",
                params![stream, stored(seq, "seq")?, stored(pages, "pages")?],
            )
            .ctx("updating the stream")?;
            Ok(())
        })
        .await
    }

    async fn unpublished_changes(&self, created_before: u64) -> StoreResult<Vec<Change>> {
        self.read("unpublished_changes", move |conn| {
            let tx = deferred(conn)?;
            let rows = collect(
                &tx,
                &format!(
                    "SELECT c.stream, c.seq, c.created_at, {}
                     FROM revocation_changes c
                     LEFT JOIN stream_entries e ON e.stream = c.stream AND e.seq = c.seq
                     WHERE c.published = 0 AND c.created_at <= ?1
                     ORDER BY c.stream, c.seq, e.ordinal",
                    prefixed_entry_columns()
                ),
                params![bound(created_before)],
                |row| {
                    let entry = match row.get::<_, Option<i64>>(7).map_err(|e| column(e, "e"))? {
                        // No entry row: the change's entries were all pruned.
                        None => None,
                        Some(_) => Some(entry_row(row, 3)?),
                    };
                    Ok((
                        text(row, 0, "change stream")?,
                        time(row, 1, "change seq")?,
                        time(row, 2, "change created_at")?,
                        entry,
                    ))
                },
            )?;
            let mut changes: Vec<Change> = Vec::new();
            for (stream, seq, created_at, entry) in rows {
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
        })
        .await
    }

    async fn mark_published(&self, ranges: Vec<(String, u64, u64)>) -> StoreResult<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.write("mark_published", move |tx| {
            {
                // One statement per range, whatever its length: the primary key finds it.
                let mut update = tx
                    .prepare_cached(
                        "UPDATE revocation_changes SET published = 1
                         WHERE stream = ?1 AND seq BETWEEN ?2 AND ?3 AND published = 0",
                    )
                    .ctx("preparing the update")?;
                for (stream, from, to) in &ranges {
                    update
                        .execute(params![stream, bound(*from), bound(*to)])
                        .ctx("marking changes published")?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn unsent_controls(
        &self,
        created_before: u64,
        limit: usize,
    ) -> StoreResult<Vec<PendingControl>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("unsent_controls", move |conn| {
            collect(
                conn,
                "SELECT device, command, issued_at FROM pending_controls
                 WHERE issued_at <= ?1 ORDER BY issued_at, device, command LIMIT ?2",
                params![bound(created_before), limit],
                |row| {
                    let n: i64 = row.get(1).map_err(|e| column(e, "control command"))?;
                    Ok(PendingControl {
                        device: text(row, 0, "control device")?,
                        command: u64::try_from(n)
                            .ok()
                            .and_then(Command::from_u64)
                            .ok_or_else(|| StoreError::Corrupt(format!("control command {n}")))?,
                        issued_at: time(row, 2, "control issued_at")?,
                    })
                },
            )
        })
        .await
    }

    async fn mark_controls_sent(&self, controls: Vec<PendingControl>) -> StoreResult<()> {
        if controls.is_empty() {
            return Ok(());
        }
        self.write("mark_controls_sent", move |tx| {
            {
                let mut delete = tx
                    .prepare_cached(
                        "DELETE FROM pending_controls
                         WHERE device = ?1 AND command = ?2 AND issued_at = ?3",
                    )
                    .ctx("preparing the delete")?;
                for c in &controls {
                    delete
                        .execute(params![
                            c.device,
                            command_number(c.command),
                            bound(c.issued_at)
                        ])
                        .ctx("forgetting a control message")?;
                }
            }
            Ok(())
        })
        .await
    }

    // --- signing keys ---

    async fn add_key(&self, key: KeyRecord) -> StoreResult<()> {
        self.write("add_key", move |tx| {
            tx.execute(
                &format!(
                    "INSERT INTO signing_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
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
                    key.published_at
                        .map(|t| stored(t, "published_at"))
                        .transpose()?,
                ],
            )
            .map_err(|e| {
                insert_error(e, "inserting the key", || {
                    format!("a key with kid {} exists", hex::encode(key.kid))
                })
            })?;
            Ok(())
        })
        .await
    }

    async fn keys(&self) -> StoreResult<Vec<KeyRecord>> {
        self.read("keys", move |conn| {
            collect(
                conn,
                &format!("SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, rowid"),
                [],
                key_row,
            )
        })
        .await
    }

    async fn mark_key_published(
        &self,
        kid: &[u8; 8],
        at: u64,
        active_from: u64,
    ) -> StoreResult<KeyRecord> {
        let kid = *kid;
        self.write("mark_key_published", move |tx| {
            tx.execute(
                "UPDATE signing_keys SET published_at = ?2, active_from = MAX(active_from, ?3)
                 WHERE kid = ?1 AND published_at IS NULL",
                params![
                    &kid[..],
                    stored(at, "published_at")?,
                    stored(active_from, "active_from")?
                ],
            )
            .ctx("updating the key")?;
            let key = collect(
                tx,
                &format!("SELECT {KEY_COLUMNS} FROM signing_keys WHERE kid = ?1"),
                params![&kid[..]],
                key_row,
            )?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("key {}", hex::encode(kid))))?;
            Ok(key)
        })
        .await
    }

    async fn retire_key(&self, kid: &[u8; 8], retire_after: u64) -> StoreResult<()> {
        let kid = *kid;
        self.write("retire_key", move |tx| {
            let n = tx
                .execute(
                    "UPDATE signing_keys SET retire_after = ?2 WHERE kid = ?1",
                    params![&kid[..], stored(retire_after, "retire_after")?],
                )
                .ctx("updating the key")?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("key {}", hex::encode(kid))));
            }
            Ok(())
        })
        .await
    }

    // --- audit ---

    async fn audit(&self, events: Vec<AuditEvent>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.write("audit", move |tx| {
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO audit_log
                            (at_ms, actor, action, target, outcome, reason, count)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
                            e.reason,
                            stored(e.count.max(1), "count")?
                        ])
                        .ctx("inserting an event")?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn prune(&self, horizons: Horizons) -> StoreResult<Pruned> {
        let tokens_before = bound(horizons.tokens_before);
        let entries_before = bound(horizons.entries_before);
        let controls_before = bound(horizons.controls_before);
        let audit_before = bound(horizons.audit_before_ms);
        self.write("prune", move |tx| {
            let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            let pruned = Pruned {
                tokens: count(
                    tx.execute(
                        "DELETE FROM issued_tokens WHERE expires_at < ?1",
                        params![tokens_before],
                    )
                    .ctx("pruning issued tokens")?,
                ),
                grants: count(
                    tx.execute(
                        "DELETE FROM grants WHERE expires_at < ?1",
                        params![tokens_before],
                    )
                    .ctx("pruning grants")?,
                ),
                revocation_entries: {
                    // A snapshot retained with spent entries is republished without them.
                    tx.execute(
                        "UPDATE revocation_streams SET snapshot_seq = 0 WHERE name IN
                         (SELECT DISTINCT stream FROM stream_entries WHERE expires_at < ?1)",
                        params![entries_before],
                    )
                    .ctx("marking snapshots to republish")?;
                    let n = tx
                        .execute(
                            "DELETE FROM stream_entries WHERE expires_at < ?1",
                            params![entries_before],
                        )
                        .ctx("pruning revocation entries")?;
                    // Published changes left without entries are only numbers now.
                    tx.execute(
                        "DELETE FROM revocation_changes WHERE published = 1 AND NOT EXISTS
                         (SELECT 1 FROM stream_entries e
                          WHERE e.stream = revocation_changes.stream
                            AND e.seq = revocation_changes.seq)",
                        [],
                    )
                    .ctx("pruning empty changes")?;
                    count(n)
                },
                audit_events: count(
                    tx.execute(
                        "DELETE FROM audit_log WHERE at_ms < ?1",
                        params![audit_before],
                    )
                    .ctx("pruning the audit log")?,
                ),
                controls: count(
                    tx.execute(
                        "DELETE FROM pending_controls WHERE issued_at < ?1",
                        params![controls_before],
                    )
                    .ctx("pruning control messages")?,
                ),
            };
            tx.execute(
                "DELETE FROM nonces WHERE expires_at < ?1",
                params![tokens_before],
            )
            .ctx("pruning nonces")?;
            Ok(pruned)
        })
        .await
    }

    async fn revocation_entries(&self, now: u64, leeway: u64) -> StoreResult<u64> {
        self.read("revocation_entries", move |conn| {
            let n: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM stream_entries WHERE expires_at >= ?1")
                .ctx("preparing the entry count")?
                .query_row(params![bound(now.saturating_sub(leeway))], |row| row.get(0))
                .ctx("counting the revocation entries")?;
            u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("entry count {n}")))
        })
        .await
    }

    async fn live_tokens(&self, now: u64) -> StoreResult<LiveTokens> {
        self.read("live_tokens", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT kind, COUNT(*) FROM issued_tokens WHERE expires_at > ?1 GROUP BY kind",
                )
                .ctx("preparing the live-token count")?;
            let mut rows = stmt
                .query(params![bound(now)])
                .ctx("counting live tokens")?;
            let mut live = LiveTokens::default();
            while let Some(row) = rows.next().ctx("counting live tokens")? {
                let kind: String = row.get(0).ctx("reading a token kind")?;
                let n: i64 = row.get(1).ctx("reading a token count")?;
                let n = u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("count {n}")))?;
                match TokenKind::parse(&kind) {
                    Some(TokenKind::Device) => live.device = n,
                    Some(TokenKind::Access) => live.access = n,
                    None => return Err(StoreError::Corrupt(format!("token kind {kind:?}"))),
                }
            }
            Ok(live)
        })
        .await
    }

    async fn hold_lease(&self) -> StoreResult<bool> {
        self.lease()
    }

    fn write_stats(&self) -> WriteStats {
        WriteStats {
            transactions: self.inner.stats.transactions.load(Ordering::Relaxed),
            writes: self.inner.stats.writes.load(Ordering::Relaxed),
        }
    }

    async fn audit_tail(&self, limit: usize) -> StoreResult<Vec<AuditEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("audit_tail", move |conn| {
            collect(
                conn,
                "SELECT at_ms, actor, action, target, outcome, reason, count FROM
                 (SELECT id, at_ms, actor, action, target, outcome, reason, count FROM audit_log
                  ORDER BY id DESC LIMIT ?1)
                 ORDER BY id",
                params![limit],
                audit_row,
            )
        })
        .await
    }

    async fn audit_query(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEvent>> {
        let AuditFilter {
            actor,
            target,
            action,
            since_ms,
            until_ms,
            limit,
        } = filter.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let since = since_ms.map_or(0, bound);
        let until = until_ms.map_or(i64::MAX, bound);
        self.read("audit_query", move |conn| {
            // The newest matches first, so LIMIT keeps the most recent; then back in order.
            // `audit_log_by_time` holds (at_ms, id): walked backwards it gives this order
            // without sorting, and the walk stops at the limit.
            collect(
                conn,
                "SELECT at_ms, actor, action, target, outcome, reason, count FROM
                 (SELECT id, at_ms, actor, action, target, outcome, reason, count FROM audit_log
                  WHERE at_ms >= ?1 AND at_ms < ?2
                    AND (?3 IS NULL OR actor = ?3)
                    AND (?4 IS NULL OR target IN (?4, 'device ' || ?4, 'subject ' || ?4))
                    AND (?5 IS NULL OR action = ?5)
                  ORDER BY at_ms DESC, id DESC LIMIT ?6)
                 ORDER BY at_ms, id",
                params![since, until, actor, target, action, limit],
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

    #[test]
    fn opening_a_missing_database_creates_nothing_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let Err(err) = Sqlite::open_existing(&path) else {
            panic!("opened a database that does not exist");
        };
        assert!(matches!(&err, StoreError::NoDatabase { path: p } if *p == path));
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("backup"),
            "{message}"
        );
        assert!(!path.exists(), "open_existing created {}", path.display());
    }

    #[test]
    fn a_database_is_created_once_with_mode_0600_and_then_opened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        drop(Sqlite::create(&path).expect("create"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Sqlite::create(&path),
            Err(StoreError::DatabaseExists { .. })
        ));
        drop(Sqlite::open_existing(&path).expect("open the created database"));
    }

    #[tokio::test]
    async fn replicas_on_one_file_hold_the_lease_one_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let a = Sqlite::create(&path).expect("create");
        let b = Sqlite::open_existing(&path).expect("open");
        assert!(a.hold_lease().await.expect("lease"));
        assert!(a.hold_lease().await.expect("lease"), "kept");
        assert!(
            !b.hold_lease().await.expect("lease"),
            "one holder at a time"
        );
        drop(a);
        assert!(
            b.hold_lease().await.expect("lease"),
            "taken once the holder is gone"
        );
        let memory = Sqlite::open_in_memory().expect("memory");
        assert!(memory.hold_lease().await.expect("lease"));
    }

    #[test]
    fn the_writer_asks_for_a_checkpoint_once_per_threshold_and_again_after_the_wal_restarts() {
        let mut pacer = CheckpointPacer::default();
        assert!(!pacer.due(10));
        assert!(!pacer.due(CHECKPOINT_PAGES - 1));
        assert!(pacer.due(CHECKPOINT_PAGES + 5), "at the threshold");
        // The checkpoint runs while commits go on: no second request for every commit.
        assert!(!pacer.due(CHECKPOINT_PAGES + 40));
        assert!(!pacer.due(2 * CHECKPOINT_PAGES + 4));
        assert!(
            pacer.due(2 * CHECKPOINT_PAGES + 5),
            "another threshold's worth later"
        );
        // The WAL started over: counted from its beginning again.
        assert!(!pacer.due(30));
        assert!(pacer.due(CHECKPOINT_PAGES));
    }

    /// Under writes that never pause, the WAL must still start over: the checkpointer alone,
    /// always a few commits behind the writer, never copies it all (the writer finishes
    /// each checkpoint; see `Checkpoints::after_commit`). Before that, the WAL grew by
    /// everything written (1.5 GB in one benchmark run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_writes_that_never_pause() {
        const WRITERS: usize = 16;
        const ROWS: usize = 8;
        const ROW_BYTES: usize = 3_000;
        // About 150 MB written in all, more than four times the bound below.
        const WRITES_EACH: usize = 400;
        const BOUND: u64 = 32 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let store = Sqlite::create(&path).expect("create");
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, wal) = (store.clone(), wal.clone());
                tokio::spawn(async move {
                    let mut largest = 0;
                    for i in 0..WRITES_EACH {
                        let rows = (0..ROWS)
                            .map(|r| AuditEvent {
                                at_ms: (i * ROWS + r) as u64,
                                actor: format!("writer-{w}"),
                                action: "test".into(),
                                target: String::new(),
                                outcome: "ok".into(),
                                reason: "x".repeat(ROW_BYTES),
                                count: 1,
                            })
                            .collect();
                        store.audit(rows).await.expect("audit");
                        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
                    }
                    largest
                })
            })
            .collect();
        let mut largest = 0;
        for task in tasks {
            largest = largest.max(task.await.expect("writer task"));
        }
        let written = (WRITERS * WRITES_EACH * ROWS * ROW_BYTES) as u64;
        assert!(
            written >= 4 * BOUND,
            "the test writes too little to show anything"
        );
        assert!(
            largest <= BOUND,
            "the WAL reached {largest} bytes while {written} bytes were written"
        );
    }
}
