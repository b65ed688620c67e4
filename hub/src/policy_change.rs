//! Revocation by role or policy change: after a client's role changes or the policy is
//! reloaded, every live token whose scope the policy no longer grants is revoked, by its
//! hash, and a device whose own token was revoked is told to refresh now (PROTOCOL.md
//! §11.1).
//!
//! Token entries rather than subject entries: a subject entry would also cut off the
//! tokens the new policy still allows (an app keeps its rights on other devices), and a
//! token hash names the canonical encoding, so re-encoding a token does not dodge it.
//! Tokens already revoked (their holder or device revoked whole, cut off by an earlier
//! subject revocation, or revoked by hash before) are left alone, so an unchanged policy
//! revokes nothing.
//!
//! Refresh grants need no such sweep: every refresh decides again under the current
//! policy.

use std::collections::{HashMap, HashSet};

use crate::policy::Policy;
use crate::revocation::{Outcome, Target};
use crate::store::{ClientKind, ClientRecord, Store, StoreError};

/// Revokes the live tokens of `subjects` (and, for devices, the access tokens for them)
/// that `policy` no longer allows. Returns what was revoked, or `None` if nothing had to
/// be. The running hub publishes the changes and control messages (its heartbeat
/// publishes whatever is recorded and not yet published).
pub async fn revoke_disallowed<S: Store>(
    store: &S,
    policy: &Policy,
    subjects: &[ClientRecord],
    now: u64,
) -> Result<Option<Outcome>, StoreError> {
    let leeway = policy.leeway_s();
    let live_after = now.saturating_sub(leeway);
    let mut clients: HashMap<String, Option<ClientRecord>> = HashMap::new();
    let mut hashes = HashSet::new();
    let mut targets = Vec::new();
    for subject in subjects {
        let mut tokens = store.issued_to(&subject.id, live_after).await?;
        if subject.kind == ClientKind::Device {
            tokens.extend(store.issued_for(&subject.id, live_after).await?);
        }
        for token in tokens {
            for id in [&token.subject, &token.audience] {
                if !clients.contains_key(id) {
                    clients.insert(id.clone(), store.client(id).await?);
                }
            }
            let holder = clients.get(&token.subject).and_then(Option::as_ref);
            let device = clients.get(&token.audience).and_then(Option::as_ref);
            let revoked_whole =
                |c: Option<&ClientRecord>| c.is_some_and(|c| c.revoked_at.is_some());
            // Revoked along with its holder or device already.
            if revoked_whole(holder)
                || (token.kind == crate::store::TokenKind::Access && revoked_whole(device))
            {
                continue;
            }
            if !policy.still_allows(&token, holder, device) && hashes.insert(token.hash) {
                targets.push(Target::TokenHash(token.hash));
            }
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let outcome = store.revoke(targets, now, leeway).await?;
    Ok((outcome.revoked > 0).then_some(outcome))
}

/// Sweeps every registered client (after a policy reload).
pub async fn revoke_disallowed_everywhere<S: Store>(
    store: &S,
    policy: &Policy,
    now: u64,
) -> Result<Option<Outcome>, StoreError> {
    let all = store.clients(None).await?;
    revoke_disallowed(store, policy, &all, now).await
}
