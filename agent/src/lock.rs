//! The single-instance lock on the agent's state directory (`[store] dir`): one process at a
//! time may write a device's store.
//!
//! Two agents on one store would each spend the refresh grant the other just rotated, and
//! the hub answers a spent grant by revoking its whole family; they would also race each
//! other's records and counter. So `run` holds this lock for its whole life, and `enroll`
//! while it writes the store. It is an exclusive advisory lock (`flock`) on
//! [`LOCK_FILE`] in the state directory: the kernel releases it when the process exits,
//! however it exits (`kill -9` included), so it never goes stale. The file holds the pid of
//! the holder, only for the message a second agent prints; it is never deleted, since a
//! process that locked a deleted file would not exclude one that locks its replacement.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::store;

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// The lock, held until dropped (or the process ends).
#[derive(Debug)]
pub struct StateLock {
    // Only held: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock on the state directory `dir`, creating the directory (mode 0700) and
    /// the lock file (mode 0600) if needed. Fails at once, without waiting, with
    /// [`Error::Locked`] when another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, Error> {
        store::ensure_private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io(format!(
                "cannot open the lock file {} (the state directory must be writable by the agent)",
                path.display()
            )))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                return Err(Error::Locked {
                    dir: dir.to_path_buf(),
                    lock: path,
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    what: format!("cannot lock {}", path.display()),
                    source,
                });
            }
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(Error::io(format!("cannot write {}", path.display())))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_directory_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).expect("first");
        assert_eq!(first.path(), state.join(LOCK_FILE));
        let pid = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(pid.trim(), std::process::id().to_string());

        // flock conflicts between two opens of the file even within one process.
        let err = StateLock::acquire(&state).expect_err("second");
        assert!(
            matches!(&err, Error::Locked { holder: Some(p), .. } if *p == std::process::id()),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&state.display().to_string())
                && message.contains("another tessera-agent"),
            "{message}"
        );

        drop(first);
        let again = StateLock::acquire(&state).expect("free again");
        assert!(again.path().exists());
    }
}
