//! The policy in force, shared by every task of the hub and replaced whole on reload.

use std::path::Path;
use std::sync::{Arc, RwLock};

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
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *guard, Arc::new(policy))
    }

    /// Reads the file again and puts it in force if it is valid. If it is not, the policy
    /// in force stays and the error says why.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::FLEET;

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
