//! The policy in force, shared by every task of the hub and replaced whole on reload; a
//! policy file read for a reload ([`Candidate`]), and its force marker.
//!
//! A reload the hub would refuse (one that leaves registered clients without a role, or
//! revokes too large a share of the live tokens: see [`crate::policy_change::reload`]) is
//! applied anyway when a *force marker* names the exact file: `policy.toml.force` beside
//! `policy.toml`, holding the SHA-256 of its bytes in hex, as `sha256sum policy.toml`
//! prints it. Binding the marker to the contents means an operator forces the file they
//! checked, not whatever the file holds by the time the hub reads it; the next reload of a
//! valid file removes the marker whatever it decides, so it forces once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tessera_shared::crypto::sha256;

use super::{Policy, PolicyError};

/// The current policy, cheap to clone. Readers take an `Arc<Policy>` snapshot, so a
/// decision in progress keeps the policy it started with while a reload swaps in another.
#[derive(Debug, Clone)]
pub struct SharedPolicy {
    current: Arc<RwLock<Arc<Policy>>>,
}

impl SharedPolicy {
    /// Shares an already validated policy.
    pub fn new(policy: Policy) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(policy))),
        }
    }

    /// Loads and validates a policy file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        Policy::load(path).map(Self::new)
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        // The lock only guards an `Arc` swap, which cannot leave it half-written, so a
        // poisoned lock still holds a whole policy.
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&guard)
    }

    /// Replaces the policy in force; returns the one it replaced.
    pub fn replace(&self, policy: Policy) -> Arc<Policy> {
        self.restore(Arc::new(policy))
    }

    /// Puts a policy taken from [`SharedPolicy::current`] or [`SharedPolicy::replace`]
    /// back in force (a reload that failed half-way); returns the one it replaced.
    pub fn restore(&self, policy: Arc<Policy>) -> Arc<Policy> {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, policy)
    }

    /// Reads the file again and puts it in force if it is valid. If it is not, the policy
    /// in force stays and the error says why.
    ///
    /// This checks the file alone. The running hub reloads with
    /// [`crate::policy_change::reload`], which also refuses a policy that would strand
    /// registered clients or revoke too many live tokens, revokes what the new policy no
    /// longer allows, and audits the reload.
    pub fn reload_from(&self, path: impl AsRef<Path>) -> Result<(), PolicyError> {
        let path = path.as_ref();
        match Policy::load(path) {
            Ok(policy) => {
                self.replace(policy);
                tracing::info!(file = %path.display(), "policy reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "policy not reloaded; the previous policy stays in force"
                );
                Err(e)
            }
        }
    }
}

/// A policy file read for a reload: the validated policy, and the SHA-256 of the exact
/// bytes it was parsed from (what a force marker must name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The policy.
    pub policy: Policy,
    /// SHA-256 of the file's bytes.
    pub digest: [u8; 32],
}

impl Candidate {
    /// Reads the file once, hashes and validates those same bytes (so the digest is of the
    /// policy validated, even if the file changes meanwhile).
    pub fn read(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let read_error = |source| PolicyError::Read {
            file: file.clone(),
            source,
        };
        let bytes = std::fs::read(path).map_err(read_error)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| read_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let policy = Policy::from_toml(text, &file)?;
        Ok(Self {
            policy,
            digest: sha256(&[&bytes]),
        })
    }
}

/// Where the force marker of a policy file is: beside it, its name with `.force` added
/// (`policy.toml.force`).
pub fn force_marker(policy_path: &Path) -> PathBuf {
    let mut name = policy_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".force");
    policy_path.with_file_name(name)
}

/// What the force marker of a policy file says about a reading of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    /// No marker.
    Absent,
    /// A marker naming exactly these bytes: apply them even if the hub would refuse them.
    Forced,
    /// A marker naming other contents (the file changed since it was written), or one
    /// that is not a SHA-256 in hex: it forces nothing.
    Stale,
}

/// Reads the force marker of `policy_path` against `digest`, the SHA-256 of the policy
/// bytes being reloaded. The marker is the hex SHA-256 of the file, optionally followed by
/// whitespace and anything (the output of `sha256sum policy.toml`).
pub fn read_force(policy_path: &Path, digest: &[u8; 32]) -> Force {
    match std::fs::read_to_string(force_marker(policy_path)) {
        Ok(text) => {
            let named = text.split_whitespace().next().unwrap_or_default();
            if named.eq_ignore_ascii_case(&hex::encode(digest)) {
                Force::Forced
            } else {
                Force::Stale
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Force::Absent,
        // Unreadable: it cannot say what it forces.
        Err(_) => Force::Stale,
    }
}

/// Removes the force marker of `policy_path`, if there is one (a marker forces one
/// reload). Fails only if it exists and cannot be removed.
pub fn remove_force(policy_path: &Path) -> io::Result<()> {
    match std::fs::remove_file(force_marker(policy_path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes the force marker for the policy file as it is now (`tessera-hub policy force`):
/// the running hub's next reload applies exactly these contents even if it would refuse
/// them. Refuses a file that is not a valid policy (nothing could force that). Returns
/// what was forced.
pub fn write_force_marker(policy_path: &Path) -> Result<Candidate, PolicyError> {
    let candidate = Candidate::read(policy_path)?;
    let marker = force_marker(policy_path);
    let line = format!(
        "{}  {}\n",
        hex::encode(candidate.digest),
        policy_path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    std::fs::write(&marker, line).map_err(|source| PolicyError::Read {
        file: marker.display().to_string(),
        source,
    })?;
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::FLEET;

    #[test]
    fn a_candidate_carries_the_digest_of_the_bytes_it_was_validated_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, FLEET).expect("write");
        let candidate = Candidate::read(&path).expect("valid");
        assert_eq!(candidate.digest, sha256(&[FLEET.as_bytes()]));
        assert_eq!(candidate.policy, crate::policy::testing::policy(FLEET));
    }

    #[test]
    fn a_force_marker_forces_only_the_contents_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, FLEET).expect("write");
        let digest = sha256(&[FLEET.as_bytes()]);
        assert_eq!(read_force(&path, &digest), Force::Absent);
        assert_eq!(force_marker(&path), dir.path().join("policy.toml.force"));

        let forced = write_force_marker(&path).expect("written");
        assert_eq!(forced.digest, digest);
        assert_eq!(read_force(&path, &digest), Force::Forced);
        assert_eq!(read_force(&path, &[0; 32]), Force::Stale);

        // As `sha256sum` writes it, in upper case too.
        let by_hand = format!("{}  policy.toml\n", hex::encode_upper(digest));
        std::fs::write(force_marker(&path), by_hand).expect("write");
        assert_eq!(read_force(&path, &digest), Force::Forced);
        std::fs::write(force_marker(&path), "not a digest").expect("write");
        assert_eq!(read_force(&path, &digest), Force::Stale);

        remove_force(&path).expect("removed");
        assert_eq!(read_force(&path, &digest), Force::Absent);
        remove_force(&path).expect("removing no marker is fine");
    }

    #[test]
    fn no_force_marker_is_written_for_an_invalid_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[roles.x]\n").expect("write");
        assert!(write_force_marker(&path).is_err());
        assert!(!force_marker(&path).exists());
    }

    #[test]
    fn reload_puts_a_valid_edited_file_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, FLEET).expect("write");
        let shared = SharedPolicy::load(&path).expect("valid");
        let before = shared.current();
        assert_eq!(before.leeway_s(), 30);

        std::fs::write(&path, FLEET.replace("leeway_s = 30", "leeway_s = 60")).expect("write");
        shared.reload_from(&path).expect("valid");
        assert_eq!(shared.current().leeway_s(), 60);
        assert_eq!(
            before.leeway_s(),
            30,
            "a snapshot taken before is unchanged"
        );
    }

    #[test]
    fn reload_keeps_the_old_policy_when_the_new_file_is_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, FLEET).expect("write");
        let shared = SharedPolicy::load(&path).expect("valid");
        let clone = shared.clone();

        std::fs::write(&path, FLEET.replace("\"controller\"]", "\"ctrl\"]")).expect("write");
        let message = shared.reload_from(&path).expect_err("invalid").to_string();
        assert!(
            message.contains("[[access]] #1: app role \"ctrl\" is not defined"),
            "{message}"
        );
        assert_eq!(*clone.current(), crate::policy::testing::policy(FLEET));

        std::fs::remove_file(&path).expect("remove");
        assert!(shared.reload_from(&path).is_err());
        assert!(clone.current().role("controller").is_some());
    }
}
