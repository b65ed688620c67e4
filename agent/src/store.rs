//! The encrypted token store: the state machine's persisted state (device token, refresh
//! grant, trusted key set, enrollment time) sealed in one record of the shared format
//! ([`tessera_shared::record`], `docs/PROTOCOL.md` Appendix A), plus a separate counter for
//! rollback detection.
//!
//! # Files
//!
//! | file | holds | written |
//! |---|---|---|
//! | record (`store.tsr`) | the sealed state: ChaCha20-Poly1305 under a key derived from the device secret and bound to the device id | atomically on every change |
//! | counter (`store.counter`) | the highest record counter written, in decimal | atomically after each record |
//! | device secret (`device-secret`) | 32 random bytes the record key is derived from | once, at enrollment |
//! | revoked marker (`revoked`) | the time the device was revoked; no secret | when the hub revokes the device |
//!
//! Every write goes to a temporary file in the same directory, is fsynced, renamed over the
//! old file, and the directory is fsynced, so a power cut leaves the old or the new file,
//! never a torn one. Each record carries a counter one higher than the last; the record is
//! written before the counter, so a crash between the two leaves a record whose counter is
//! higher than the one remembered, which opens fine.
//!
//! # What is detected
//!
//! Opening refuses, with [`StoreError`], and never falls back to enrolling again:
//! a record that is not in the record format; one whose tag does not verify (altered, copied
//! from another device, or the device secret is not the one it was sealed with); one whose
//! counter is lower than the counter file (an older copy put back); a counter file that is
//! missing or unreadable while a record exists; a record that is missing while the counter
//! says records were written.
//!
//! # Threat model
//!
//! The counter only helps where an attacker cannot roll it back together with the record.
//! If both live on the same writable disk, an attacker who copies both files and later puts
//! both back defeats rollback detection. Put the counter elsewhere: another medium, or
//! behind [`CounterStore`] a hardware monotonic counter (a TPM NV counter, a secure
//! element). The record key is only as secret as the device secret: on real hardware derive
//! it from a secure element, not a file. See `docs/DEVICE.md`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tessera_shared::error::{Error as CoreError, RecordError};
use tessera_shared::record::{self, RecordKey};
use zeroize::Zeroizing;

use crate::config::StorePaths;
use crate::error::Error;
use crate::identity;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record file is not a Tessera record at all.
    #[error(
        "{path}: not a Tessera record (bad magic, version or length): the store was corrupted or replaced"
    )]
    Malformed {
        /// The record file.
        path: PathBuf,
    },
    /// The record does not authenticate.
    #[error(
        "{path}: authentication failed: the record was altered, belongs to another device, or \
         the device secret {secret} is not the one it was written with (wrong store key)"
    )]
    Tampered {
        /// The record file.
        path: PathBuf,
        /// The device secret file.
        secret: PathBuf,
    },
    /// The record is authentic but older than the last one written.
    #[error(
        "{path}: rolled back: the record has counter {found} but {counter} says {expected} was \
         written; an older copy of the store was put back"
    )]
    RolledBack {
        /// The record file.
        path: PathBuf,
        /// The counter file.
        counter: PathBuf,
        /// The record's counter.
        found: u64,
        /// The highest counter written.
        expected: u64,
    },
    /// A record exists but the counter does not: rollback could not be checked.
    #[error(
        "{counter}: missing while the record {record} exists; without it an older record \
         could not be told from the current one"
    )]
    CounterMissing {
        /// The record file.
        record: PathBuf,
        /// The counter file.
        counter: PathBuf,
    },
    /// The counter file does not hold a counter.
    #[error("{path}: not a record counter: {reason}")]
    CounterCorrupt {
        /// The counter file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The record is gone but the counter says records were written.
    #[error(
        "{record}: missing, but {counter} says {written} records were written: the store was \
         deleted (to enroll again on purpose, run `tessera-agent enroll`)"
    )]
    RecordMissing {
        /// The record file.
        record: PathBuf,
        /// The counter file.
        counter: PathBuf,
        /// The counter's value.
        written: u64,
    },
    /// The record authenticated but its plaintext is not a state this agent reads.
    #[error("{path}: the stored state does not decode: {reason}")]
    StateUndecodable {
        /// The record file.
        path: PathBuf,
        /// The decoder's reason.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The record could not be sealed (state too large, or a local fault).
    #[error("cannot seal the record: {0}")]
    Seal(CoreError),
}

impl StoreError {
    /// Whether the store's integrity is in doubt (as opposed to an I/O failure): the agent
    /// stops with [`exit::STORE`](crate::error::exit::STORE) and an operator must look.
    pub fn is_integrity(&self) -> bool {
        !matches!(self, StoreError::Io { .. } | StoreError::Seal(_))
    }
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the highest record counter written is kept. The file implementation is
/// [`FileCounter`]; a hardware monotonic counter (TPM NV index, secure element) would
/// implement this trait so the counter cannot be rolled back with the disk.
pub trait CounterStore: Send {
    /// The highest counter written, `None` if none ever was.
    fn read(&self) -> Result<Option<u64>, StoreError>;
    /// Records `value`, which is higher than every value recorded before.
    fn advance_to(&mut self, value: u64) -> Result<(), StoreError>;
    /// Where the counter lives, for messages.
    fn location(&self) -> PathBuf;
}

/// The counter in a small file of its own, written atomically.
#[derive(Debug, Clone)]
pub struct FileCounter {
    path: PathBuf,
}

impl FileCounter {
    /// The counter in `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl CounterStore for FileCounter {
    fn read(&self) -> Result<Option<u64>, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read the counter", &self.path)(e)),
        };
        let digits = text.strip_suffix('\n').unwrap_or(&text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StoreError::CounterCorrupt {
                path: self.path.clone(),
                reason: "expected a decimal number and a newline".into(),
            });
        }
        digits
            .parse()
            .map(Some)
            .map_err(|e| StoreError::CounterCorrupt {
                path: self.path.clone(),
                reason: format!("{e}"),
            })
    }

    fn advance_to(&mut self, value: u64) -> Result<(), StoreError> {
        write_atomic(&self.path, format!("{value}\n").as_bytes())
    }

    fn location(&self) -> PathBuf {
        self.path.clone()
    }
}

/// What [`Store::load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// The device is enrolled: the store and the opened state (the plaintext for
    /// [`Event::Boot`](tessera_shared::agent::Event::Boot)).
    Enrolled(Store, Zeroizing<Vec<u8>>),
    /// No store was ever written.
    NotEnrolled,
    /// The device was revoked and its store wiped; the marker's text.
    Revoked(String),
}

/// The opened store: writes new records and wipes them.
pub struct Store {
    paths: StorePaths,
    device_id: String,
    key: RecordKey,
    counter: Box<dyn CounterStore>,
    /// The highest counter written or read, so the next record gets a higher one.
    last: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("record", &self.paths.record)
            .field("counter", &self.counter.location())
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store of `device_id`: reads and authenticates the record, checks its
    /// counter against the counter file, and returns the plaintext state.
    pub fn load(paths: &StorePaths, device_id: &str) -> Result<Loaded, Error> {
        Self::load_with(paths, device_id, Box::new(FileCounter::new(&paths.counter)))
    }

    /// [`Store::load`] with another place for the counter.
    pub fn load_with(
        paths: &StorePaths,
        device_id: &str,
        counter: Box<dyn CounterStore>,
    ) -> Result<Loaded, Error> {
        let remembered = counter.read()?;
        let mut sealed = match std::fs::read(&paths.record) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Ok(text) = std::fs::read_to_string(&paths.revoked_marker) {
                    return Ok(Loaded::Revoked(text.trim().to_string()));
                }
                return match remembered {
                    Some(written) if written > 0 => Err(StoreError::RecordMissing {
                        record: paths.record.clone(),
                        counter: counter.location(),
                        written,
                    }
                    .into()),
                    _ => Ok(Loaded::NotEnrolled),
                };
            }
            Err(e) => return Err(io_error("cannot read the record", &paths.record)(e).into()),
        };
        let Some(min_counter) = remembered else {
            return Err(StoreError::CounterMissing {
                record: paths.record.clone(),
                counter: counter.location(),
            }
            .into());
        };
        let secret = identity::read_device_secret(&paths.device_secret)?;
        let key = RecordKey::derive(&secret, device_id).map_err(Error::Core)?;
        let opened =
            record::open(&key, device_id, min_counter, &mut sealed).map_err(|e| match e {
                CoreError::Record(RecordError::Tampered) => StoreError::Tampered {
                    path: paths.record.clone(),
                    secret: paths.device_secret.clone(),
                },
                CoreError::Record(RecordError::RolledBack {
                    found,
                    expected_at_least,
                }) => StoreError::RolledBack {
                    path: paths.record.clone(),
                    counter: counter.location(),
                    found,
                    expected: expected_at_least,
                },
                _ => StoreError::Malformed {
                    path: paths.record.clone(),
                },
            })?;
        let plaintext = Zeroizing::new(opened.plaintext.to_vec());
        let store = Store {
            paths: paths.clone(),
            device_id: device_id.to_string(),
            key,
            counter,
            last: opened.counter.max(min_counter),
        };
        Ok(Loaded::Enrolled(store, plaintext))
    }

    /// A new store for a device about to enroll: creates the directory (mode 0700) and the
    /// device secret if missing. Refuses when a record already exists: enrolling again is an
    /// operator's decision, made by removing the store first.
    pub fn create(paths: &StorePaths, device_id: &str) -> Result<Store, Error> {
        Self::create_with(paths, device_id, Box::new(FileCounter::new(&paths.counter)))
    }

    /// [`Store::create`] with another place for the counter.
    pub fn create_with(
        paths: &StorePaths,
        device_id: &str,
        counter: Box<dyn CounterStore>,
    ) -> Result<Store, Error> {
        ensure_private_dir(&paths.dir)?;
        if paths.record.exists() {
            // Whether it opens or not, it is not ours to replace.
            return match Self::load_with(paths, device_id, counter)? {
                Loaded::Enrolled(..) => Err(Error::Config(format!(
                    "already enrolled: {} exists (remove the store files to enroll again)",
                    paths.record.display()
                ))),
                Loaded::NotEnrolled | Loaded::Revoked(_) => Err(Error::Config(format!(
                    "{} appeared while enrolling",
                    paths.record.display()
                ))),
            };
        }
        let last = counter.read()?.unwrap_or(0);
        let secret = identity::device_secret_or_create(&paths.device_secret)?;
        let key = RecordKey::derive(&secret, device_id).map_err(Error::Core)?;
        Ok(Store {
            paths: paths.clone(),
            device_id: device_id.to_string(),
            key,
            counter,
            last,
        })
    }

    /// Seals `plaintext` into a new record with the next counter and replaces the record
    /// file atomically, then records the counter.
    pub fn write(&mut self, plaintext: &[u8]) -> Result<(), StoreError> {
        let next = self.last.saturating_add(1);
        let mut buf = Zeroizing::new(vec![0u8; record::sealed_len(plaintext.len())]);
        let region = record::plaintext_mut(&mut buf);
        let dst = region
            .get_mut(..plaintext.len())
            .ok_or(StoreError::Seal(RecordError::TooLarge.into()))?;
        dst.copy_from_slice(plaintext);
        let mut nonce = [0u8; record::NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| StoreError::Io {
            what: "random nonce",
            path: self.paths.record.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let len = record::seal(
            &self.key,
            &self.device_id,
            next,
            nonce,
            &mut buf,
            plaintext.len(),
        )
        .map_err(StoreError::Seal)?;
        write_atomic(&self.paths.record, &buf[..len])?;
        self.last = next;
        self.counter.advance_to(next)?;
        if self.paths.revoked_marker.exists() {
            // Enrolled again after a revocation.
            let _ = std::fs::remove_file(&self.paths.revoked_marker);
        }
        Ok(())
    }

    /// Wipes the store after the device was revoked: writes the revoked marker, deletes the
    /// record, and moves the counter past it, so a copy of the old record put back is a
    /// rollback. The device key and secret stay, for re-provisioning.
    pub fn wipe(&mut self, note: &str) -> Result<(), StoreError> {
        write_atomic(&self.paths.revoked_marker, format!("{note}\n").as_bytes())?;
        match std::fs::remove_file(&self.paths.record) {
            Ok(()) => sync_parent(&self.paths.record)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot delete the record", &self.paths.record)(e)),
        }
        let next = self.last.saturating_add(1);
        self.counter.advance_to(next)?;
        self.last = next;
        Ok(())
    }

    /// The highest record counter written or read.
    pub fn counter(&self) -> u64 {
        self.last
    }

    /// The store's files.
    pub fn paths(&self) -> &StorePaths {
        &self.paths
    }
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("cannot create {}", dir.display())))
}

/// Replaces `path` with `bytes` atomically: a temporary file (mode 0600) in the same
/// directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("cannot create the directory", dir))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error("cannot create a temporary file", &tmp))?;
    // A temporary file left by a crash keeps its old mode; make sure.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("cannot chmod", &tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error("cannot write", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_error("cannot rename into place", path))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> StorePaths {
        StorePaths {
            dir: dir.to_path_buf(),
            record: dir.join("store.tsr"),
            counter: dir.join("store.counter"),
            device_secret: dir.join("device-secret"),
            revoked_marker: dir.join("revoked"),
        }
    }

    fn enrolled(paths: &StorePaths) -> (Store, Vec<u8>) {
        match Store::load(paths, "dev-1").expect("loads") {
            Loaded::Enrolled(store, plaintext) => (store, plaintext.to_vec()),
            other => panic!("expected an enrolled store, got {other:?}"),
        }
    }

    #[test]
    fn a_written_state_reads_back_and_counters_increase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        assert!(matches!(Store::load(&p, "dev-1"), Ok(Loaded::NotEnrolled)));
        let mut store = Store::create(&p, "dev-1").expect("create");
        store.write(b"first").expect("write");
        store.write(b"second state").expect("write");
        assert_eq!(store.counter(), 2);
        assert_eq!(std::fs::read_to_string(&p.counter).expect("counter"), "2\n");
        let (store, plaintext) = enrolled(&p);
        assert_eq!(plaintext, b"second state");
        assert_eq!(store.counter(), 2);
        for f in [&p.record, &p.counter, &p.device_secret] {
            let mode = std::fs::metadata(f).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let raw = std::fs::read(&p.record).expect("record");
        assert!(
            !raw.windows(6).any(|w| w == b"second"),
            "no plaintext on disk"
        );
        assert!(
            Store::create(&p, "dev-1").is_err(),
            "never enrolls over a store"
        );
    }

    #[test]
    fn a_flipped_byte_is_reported_as_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        Store::create(&p, "dev-1")
            .expect("create")
            .write(b"state")
            .expect("write");
        let mut raw = std::fs::read(&p.record).expect("record");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&p.record, &raw).expect("tamper");
        let err = Store::load(&p, "dev-1").expect_err("tampered");
        assert_eq!(err.exit_code(), crate::error::exit::STORE);
        assert!(err.to_string().contains("authentication failed"), "{err}");
    }

    #[test]
    fn an_older_record_put_back_is_a_rollback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let mut store = Store::create(&p, "dev-1").expect("create");
        store.write(b"old").expect("write");
        let old = std::fs::read(&p.record).expect("record");
        store.write(b"new").expect("write");
        std::fs::write(&p.record, &old).expect("roll back");
        let err = Store::load(&p, "dev-1").expect_err("rolled back");
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(err.exit_code(), crate::error::exit::STORE);
    }

    #[test]
    fn a_wrong_secret_or_another_device_fails_authentication() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        Store::create(&p, "dev-1")
            .expect("create")
            .write(b"state")
            .expect("write");
        let err = Store::load(&p, "dev-2").expect_err("other device");
        assert!(err.to_string().contains("authentication failed"), "{err}");
        std::fs::write(&p.device_secret, [9u8; 32]).expect("replace secret");
        let err = Store::load(&p, "dev-1").expect_err("wrong key");
        assert!(err.to_string().contains("wrong store key"), "{err}");
    }

    #[test]
    fn missing_counter_or_record_is_not_taken_for_a_fresh_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        Store::create(&p, "dev-1")
            .expect("create")
            .write(b"state")
            .expect("write");
        let counter = std::fs::read(&p.counter).expect("counter");
        std::fs::remove_file(&p.counter).expect("rm");
        let err = Store::load(&p, "dev-1").expect_err("no counter");
        assert!(
            err.to_string().contains("missing while the record"),
            "{err}"
        );
        std::fs::write(&p.counter, &counter).expect("restore");
        std::fs::remove_file(&p.record).expect("rm");
        let err = Store::load(&p, "dev-1").expect_err("no record");
        assert!(err.to_string().contains("was deleted"), "{err}");
        std::fs::write(&p.counter, "12x\n").expect("corrupt");
        assert!(Store::load(&p, "dev-1").is_err());
    }

    #[test]
    fn a_wiped_store_says_revoked_and_its_old_record_stays_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = paths(dir.path());
        let mut store = Store::create(&p, "dev-1").expect("create");
        store.write(b"state").expect("write");
        let old = std::fs::read(&p.record).expect("record");
        store.wipe("revoked at 1700000000").expect("wipe");
        assert!(!p.record.exists());
        match Store::load(&p, "dev-1").expect("loads") {
            Loaded::Revoked(note) => assert_eq!(note, "revoked at 1700000000"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&p.record, &old).expect("put the old record back");
        let err = Store::load(&p, "dev-1").expect_err("rollback");
        assert!(err.to_string().contains("rolled back"), "{err}");
        // Re-provisioning: an operator removes the record; enrolling again writes above
        // the old counter and clears the marker.
        std::fs::remove_file(&p.record).expect("rm");
        let mut store = Store::create(&p, "dev-1").expect("create again");
        store.write(b"again").expect("write");
        assert_eq!(store.counter(), 3);
        assert!(!p.revoked_marker.exists());
        assert_eq!(enrolled(&p).1, b"again");
    }
}
