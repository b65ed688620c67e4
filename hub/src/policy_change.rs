//! Revocation by role or policy change: after a client's role changes or the policy is
//! reloaded, every unexpired token whose scope the policy no longer grants is revoked.
//!
//! Refresh grants need no such sweep: every refresh decides again under the current
//! policy.

use std::collections::HashMap;

use tessera_shared::revocation::Entry;

use crate::policy::Policy;
use crate::store::{ClientKind, ClientRecord, Store, StoreError};

/// Revokes the unexpired tokens of `subjects` (and, for devices, the access tokens for
/// them) that `policy` no longer allows. Returns the revocation sequence number, or
/// `None` if nothing had to be revoked. The new delta is broadcast by the running hub
/// (its heartbeat publishes revocations not yet published).
pub async fn revoke_disallowed<S: Store>(
    store: &S,
    policy: &Policy,
    subjects: &[ClientRecord],
    now: u64,
) -> Result<Option<u64>, StoreError> {
    let mut clients: HashMap<String, Option<ClientRecord>> = HashMap::new();
    let mut entries = Vec::new();
    for subject in subjects {
        let mut tokens = store.issued_to(&subject.id, now).await?;
        if subject.kind == ClientKind::Device {
            tokens.extend(store.issued_for(&subject.id, now).await?);
        }
        for token in tokens {
            for id in [&token.subject, &token.audience] {
                if !clients.contains_key(id) {
                    clients.insert(id.clone(), store.client(id).await?);
                }
            }
            let holder = clients.get(&token.subject).and_then(Option::as_ref);
            let device = clients.get(&token.audience).and_then(Option::as_ref);
            if !policy.still_allows(&token, holder, device) {
                entries.push(Entry::Token {
                    hash: token.hash,
                    expires_at: token.expires_at + policy.leeway_s(),
                });
            }
        }
    }
    entries.dedup();
    if entries.is_empty() {
        return Ok(None);
    }
    Ok(Some(store.append_revocation(entries, now).await?))
}

/// Sweeps every registered client (after a policy reload).
pub async fn revoke_disallowed_everywhere<S: Store>(
    store: &S,
    policy: &Policy,
    now: u64,
) -> Result<Option<u64>, StoreError> {
    let all = store.clients(None).await?;
    revoke_disallowed(store, policy, &all, now).await
}
