//! Backups of the database file and restoring one (`tessera-hub backup`, `restore`).
//!
//! A backup is taken with SQLite's online backup API from a connection of its own, while a
//! hub may be serving: all pages are copied in one step, inside one read transaction, so the
//! copy is the state of one commit, and in WAL mode that read never blocks the hub's
//! writes. The copy is a new file (mode 0600: it holds the registry and the sealed signing
//! keys), in rollback-journal mode so it is one self-contained file, and it is checked
//! ([`Sqlite::check_backup`]) before the command reports success.
//!
//! A restore copies a checked backup into a staging file beside the database
//! ([`Sqlite::stage_restore`]), which the caller may open and check further (its signing
//! keys under the hub's secret), then moves it into place ([`StagedRestore::commit`]). The
//! database it replaces, and its `-wal`, are set aside rather than deleted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, Context as _, Sqlite};
use crate::store::{StoreError, StoreResult};

/// What a checked backup (or restored database) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// Its schema version (`PRAGMA user_version`); a hub migrates an older one when it
    /// opens it.
    pub schema_version: u32,
    /// Its size in bytes.
    pub bytes: u64,
    /// Registered devices, apps and operators.
    pub devices: u64,
    /// Registered control apps.
    pub apps: u64,
    /// Registered operators.
    pub operators: u64,
    /// Clients revoked whole.
    pub revoked_clients: u64,
    /// Signing keys (sealed).
    pub signing_keys: u64,
    /// Revocation entries still stored.
    pub revocation_entries: u64,
}

impl BackupSummary {
    /// Every registered client.
    pub fn clients(&self) -> u64 {
        self.devices + self.apps + self.operators
    }
}

/// `"12 clients (10 devices, 1 app, 1 operator; 2 revoked), 1 signing key, 3 revocation
/// entries"`.
impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |n: u64, one: &str, many: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {many}")
            }
        };
        write!(
            f,
            "{} ({}, {}, {}; {} revoked), {}, {}",
            n(self.clients(), "client", "clients"),
            n(self.devices, "device", "devices"),
            n(self.apps, "app", "apps"),
            n(self.operators, "operator", "operators"),
            self.revoked_clients,
            n(self.signing_keys, "signing key", "signing keys"),
            n(
                self.revocation_entries,
                "revocation entry",
                "revocation entries"
            ),
        )
    }
}

/// A backup copied beside the database, not yet in place (see [`Sqlite::stage_restore`]).
/// Dropped without [`StagedRestore::commit`], it is removed and the database is untouched.
#[derive(Debug)]
pub struct StagedRestore {
    staging: PathBuf,
    database: PathBuf,
    committed: bool,
}

impl StagedRestore {
    /// The staging file: a database the caller may open (and so migrate) to check it; every
    /// connection to it must be closed before [`StagedRestore::commit`].
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staged copy into place as the database. The database it replaces and its
    /// `-wal` (a `-wal` left without its database too: SQLite would apply it to the restored
    /// file) are renamed `<database>.before-restore-<unix time>` (`-wal`); its `-shm` is
    /// removed. Returns the files set aside.
    pub fn commit(mut self, now: u64) -> StoreResult<Vec<PathBuf>> {
        for suffix in ["-wal", "-shm", "-journal"] {
            let leftover = with_suffix(&self.staging, suffix);
            if leftover.exists() {
                return Err(StoreError::Backend(format!(
                    "{} is still there: a connection to the staged copy is open",
                    leftover.display()
                )));
            }
        }
        let aside = with_suffix(&self.database, &format!(".before-restore-{now}"));
        let mut set_aside = Vec::new();
        for suffix in ["", "-wal"] {
            let from = with_suffix(&self.database, suffix);
            if from.symlink_metadata().is_ok() {
                let to = with_suffix(&aside, suffix);
                std::fs::rename(&from, &to).map_err(|e| {
                    StoreError::Backend(format!(
                        "setting {} aside as {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?;
                set_aside.push(to);
            }
        }
        let shm = with_suffix(&self.database, "-shm");
        match std::fs::remove_file(&shm) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "removing {}: {e}",
                    shm.display()
                )));
            }
        }
        std::fs::rename(&self.staging, &self.database).map_err(|e| {
            StoreError::Backend(format!(
                "moving {} to {}: {e}",
                self.staging.display(),
                self.database.display()
            ))
        })?;
        self.committed = true;
        sync_dir(&self.database)?;
        Ok(set_aside)
    }
}

impl Drop for StagedRestore {
    fn drop(&mut self) {
        if !self.committed {
            remove_database_files(&self.staging);
        }
    }
}

impl Sqlite {
    /// Backs the database at `database` up into a new file `dest` (mode 0600; refuses to
    /// overwrite anything), safely while a hub serves it, then checks the copy
    /// ([`Sqlite::check_backup`]) and says what it holds. A failed backup leaves no file.
    ///
    /// This blocks for as long as the copy takes.
    pub fn backup(database: &Path, dest: &Path) -> StoreResult<BackupSummary> {
        let source = open_source(database)?;
        copy_into_new(&source, dest)?;
        drop(source);
        Self::check_backup(dest).inspect_err(|_| remove_database_files(dest))
    }

    /// Checks a backup without changing it: an SQLite database whose `PRAGMA
    /// integrity_check` and `foreign_key_check` pass, of a schema version this hub knows
    /// (1 up to [`Sqlite::SCHEMA_VERSION`]); says what it holds. [`StoreError::Corrupt`]
    /// says what is wrong.
    pub fn check_backup(path: &Path) -> StoreResult<BackupSummary> {
        let bytes = std::fs::metadata(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?
            .len();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("{}: {what}", path.display()));
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| corrupt(&format!("not an SQLite database ({e})")))?;
        let schema_version = match u32::try_from(version) {
            Ok(0) => return Err(corrupt("not a hub database (schema version 0)")),
            Ok(v) if v <= Self::SCHEMA_VERSION => v,
            _ => {
                return Err(corrupt(&format!(
                    "schema version {version} is newer than this hub supports ({}): it was \
                     written by a newer hub",
                    Self::SCHEMA_VERSION
                )));
            }
        };
        let problems = pragma_rows(&conn, "PRAGMA integrity_check")
            .map_err(|e| corrupt(&format!("integrity check failed to run: {e}")))?;
        if problems != ["ok"] {
            return Err(corrupt(&format!(
                "integrity check: {}",
                problems.into_iter().take(5).collect::<Vec<_>>().join("; ")
            )));
        }
        let dangling = pragma_rows(&conn, "PRAGMA foreign_key_check")
            .map_err(|e| corrupt(&format!("foreign key check failed to run: {e}")))?;
        if !dangling.is_empty() {
            return Err(corrupt(&format!(
                "{} rows reference rows that do not exist",
                dangling.len()
            )));
        }
        let count = |sql: &str| -> StoreResult<u64> {
            let n: i64 = conn
                .query_row(sql, [], |r| r.get(0))
                .map_err(|e| corrupt(&format!("counting ({sql}): {e}")))?;
            u64::try_from(n).map_err(|_| corrupt(&format!("count {n}")))
        };
        let kind = |k: &str| count(&format!("SELECT COUNT(*) FROM clients WHERE kind = '{k}'"));
        Ok(BackupSummary {
            schema_version,
            bytes,
            devices: kind("device")?,
            apps: kind("app")?,
            operators: kind("operator")?,
            revoked_clients: count("SELECT COUNT(*) FROM clients WHERE revoked_at IS NOT NULL")?,
            signing_keys: count("SELECT COUNT(*) FROM signing_keys")?,
            // Version 1 kept one list; version 2 moved it onto streams.
            revocation_entries: count(if schema_version >= 2 {
                "SELECT COUNT(*) FROM stream_entries"
            } else {
                "SELECT COUNT(*) FROM revocation_entries"
            })?,
        })
    }

    /// Checks the backup `backup` ([`Sqlite::check_backup`]) and copies it to a staging
    /// file beside `database` (mode 0600), to be moved into place with
    /// [`StagedRestore::commit`]. Nothing of the database is touched yet. The caller must
    /// make sure no hub uses the database (its lock) before committing.
    pub fn stage_restore(
        backup: &Path,
        database: &Path,
    ) -> StoreResult<(StagedRestore, BackupSummary)> {
        let summary = Self::check_backup(backup)?;
        let name = database
            .file_name()
            .ok_or_else(|| StoreError::Backend(format!("{} names no file", database.display())))?;
        let staging = database.with_file_name(format!(
            ".{}.restoring-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let source = Connection::open_with_flags(
            backup,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", backup.display())))?;
        copy_into_new(&source, &staging)?;
        Ok((
            StagedRestore {
                staging,
                database: database.to_path_buf(),
                committed: false,
            },
            summary,
        ))
    }
}

/// A connection to the live database that only reads, waiting for the hub's write lock
/// where it must.
fn open_source(database: &Path) -> StoreResult<Connection> {
    if let Err(e) = std::fs::symlink_metadata(database) {
        return Err(if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NoDatabase {
                path: database.to_path_buf(),
            }
        } else {
            StoreError::Backend(format!("{}: {e}", database.display()))
        });
    }
    // Read-write without create: a read-only connection could not open a WAL database
    // whose `-shm` it may not create (no hub running). `query_only` keeps it from writing.
    let conn = Connection::open_with_flags(
        database,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Backend(format!("opening {}: {e}", database.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .ctx("setting busy_timeout")?;
    conn.pragma_update(None, "query_only", "ON")
        .ctx("setting query_only")?;
    Ok(conn)
}

/// Copies the database of `source` into a new file `dest` (mode 0600, never overwriting)
/// with the online backup API, in one step, and leaves it in rollback-journal mode, synced.
/// A failure removes what was written.
fn copy_into_new(source: &Connection, dest: &Path) -> StoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::Backend(format!(
                "{} already exists: a backup never overwrites a file",
                dest.display()
            )),
            _ => StoreError::Backend(format!("creating {}: {e}", dest.display())),
        })?;
    let copied = copy(source, dest);
    if copied.is_err() {
        remove_database_files(dest);
    }
    copied
}

fn copy(source: &Connection, dest: &Path) -> StoreResult<()> {
    let what = |e: rusqlite::Error| {
        StoreError::Backend(format!("backing up into {}: {e}", dest.display()))
    };
    let mut target = Connection::open(dest).map_err(what)?;
    {
        let backup = Backup::new(source, &mut target).map_err(what)?;
        // All pages in one step: one read transaction on the source, so one consistent
        // state that a concurrent write cannot make the copy start over. Busy only while
        // another connection holds an exclusive lock (a checkpoint truncating the WAL).
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match backup.step(-1).map_err(what)? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                StepResult::Busy | StepResult::Locked => {
                    return Err(StoreError::Backend(format!(
                        "backing up into {}: the database stayed locked for {BUSY_TIMEOUT:?}",
                        dest.display()
                    )));
                }
                // A new rusqlite step result: not one of ours.
                _ => {
                    return Err(StoreError::Backend(format!(
                        "backing up into {}: unexpected step result",
                        dest.display()
                    )));
                }
            }
        }
    }
    // The pages say WAL (the source's mode); a backup is one self-contained file.
    let mode: String = target
        .pragma_update_and_check(None, "journal_mode", "delete", |r| r.get(0))
        .map_err(what)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StoreError::Backend(format!(
            "backing up into {}: journal_mode stayed {mode:?}",
            dest.display()
        )));
    }
    target.close().map_err(|(_, e)| what(e))?;
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Backend(format!("syncing {}: {e}", dest.display())))?;
    sync_dir(dest)
}

/// Every row of a pragma that returns text rows.
fn pragma_rows(conn: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok(match r.get_ref(0)? {
            rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
            other => format!("{other:?}"),
        })
    })?;
    rows.collect()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Removes a database file and its journals, as far as they exist (best effort: cleanup).
fn remove_database_files(path: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}

/// Makes a rename or a new file in `path`'s directory durable.
fn sync_dir(path: &Path) -> StoreResult<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Backend(format!("syncing {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientKind, ClientRecord, Store};

    fn device(id: &str) -> ClientRecord {
        ClientRecord {
            id: id.to_owned(),
            kind: ClientKind::Device,
            public_key: None,
            role: "sensor".to_owned(),
            groups: vec!["building-a".to_owned()],
            enrollment_code_key: Some([7; 32]),
            enrolled_at: None,
            revoked_at: None,
            created_at: 1_700_000_000,
        }
    }

    #[tokio::test]
    async fn a_backup_taken_while_the_store_is_open_is_a_new_private_checked_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("hub.db");
        let store = Sqlite::create(&db).expect("create");
        store.add_client(device("dev-1")).await.expect("add");
        let dest = dir.path().join("backup.db");

        let summary = Sqlite::backup(&db, &dest).expect("backup");
        assert_eq!((summary.devices, summary.clients()), (1, 1));
        assert_eq!(summary.schema_version, Sqlite::SCHEMA_VERSION);
        let mode = std::fs::metadata(&dest).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            !with_suffix(&dest, "-wal").exists(),
            "one self-contained file"
        );
        // Never overwritten, and the refusal leaves the first backup alone.
        let again = Sqlite::backup(&db, &dest).expect_err("overwrote a backup");
        assert!(again.to_string().contains("already exists"), "{again}");
        assert_eq!(Sqlite::check_backup(&dest).expect("check"), summary);
        // The store kept serving.
        store.add_client(device("dev-2")).await.expect("add after");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_not_a_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backup.db");
        std::fs::write(&path, vec![b'x'; 8192]).expect("write");
        assert!(matches!(
            Sqlite::check_backup(&path),
            Err(StoreError::Corrupt(_))
        ));
        let empty = dir.path().join("empty.db");
        drop(Connection::open(&empty).expect("empty database"));
        let err = Sqlite::check_backup(&empty).expect_err("empty database");
        assert!(err.to_string().contains("not a hub database"), "{err}");
    }

    #[tokio::test]
    async fn a_staged_restore_replaces_the_database_and_sets_the_old_one_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("hub.db");
        let store = Sqlite::create(&db).expect("create");
        store.add_client(device("dev-1")).await.expect("add");
        let dest = dir.path().join("backup.db");
        Sqlite::backup(&db, &dest).expect("backup");
        store.add_client(device("dev-2")).await.expect("add");
        drop(store);

        // Dropped without commit: nothing changes, nothing is left behind.
        let (staged, _) = Sqlite::stage_restore(&dest, &db).expect("stage");
        let staging = staged.path().to_path_buf();
        drop(staged);
        assert!(!staging.exists());

        let (staged, summary) = Sqlite::stage_restore(&dest, &db).expect("stage");
        assert_eq!(summary.devices, 1);
        let aside = staged.commit(42).expect("commit");
        assert_eq!(aside, [dir.path().join("hub.db.before-restore-42")]);
        let store = Sqlite::open_existing(&db).expect("open restored");
        assert!(store.client("dev-1").await.expect("read").is_some());
        assert!(store.client("dev-2").await.expect("read").is_none());
    }
}
