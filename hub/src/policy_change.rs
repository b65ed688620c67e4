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
//!
//! The sweep reads the live tokens and decides under the policy outside any store
//! transaction, then revokes them in one, skipping any token that is no longer live by then
//! ([`Unmatched::Skip`]): pruned or expired in between, it needs no revocation, and it must
//! not fail the others. A role change commits the new role and that revocation together
//! ([`change_role`]).

use std::collections::{HashMap, HashSet};

use crate::policy::Policy;
use crate::revocation::{Outcome, Target};
use crate::store::{ClientKind, ClientRecord, Store, StoreError, Unmatched};

/// The live tokens of `subjects` (and, for devices, the access tokens for them) that
/// `policy` no longer allows and that are not revoked yet, by hash. Only reads: the
/// caller revokes them with [`Unmatched::Skip`], since a token read here may be pruned or
/// expire before the revoking transaction.
pub async fn disallowed<S: Store>(
    store: &S,
    policy: &Policy,
    subjects: &[ClientRecord],
    now: u64,
) -> Result<Vec<Target>, StoreError> {
    let live_after = now.saturating_sub(policy.leeway_s());
    let mut clients: HashMap<String, Option<ClientRecord>> = HashMap::new();
    // The subjects as the caller has them (with a role not committed yet, for a role
    // change), not as stored.
    for subject in subjects {
        clients.insert(subject.id.clone(), Some(subject.clone()));
    }
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
    Ok(targets)
}

/// Revokes the live tokens of `subjects` (and, for devices, the access tokens for them)
/// that `policy` no longer allows. Returns what was revoked, or `None` if nothing had to
/// be. The running hub publishes the changes and control messages (its heartbeat
/// publishes whatever is recorded and not yet published).
///
/// A token found here but pruned or expired before the revoking transaction is skipped
/// there, not an error: it needs no revocation any more.
pub async fn revoke_disallowed<S: Store>(
    store: &S,
    policy: &Policy,
    subjects: &[ClientRecord],
    now: u64,
) -> Result<Option<Outcome>, StoreError> {
    let targets = disallowed(store, policy, subjects, now).await?;
    if targets.is_empty() {
        return Ok(None);
    }
    let outcome = store
        .revoke(targets, now, policy.leeway_s(), Unmatched::Skip)
        .await?;
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

/// Gives `client` the role `role` and revokes the live tokens the new role no longer
/// allows. The role and the revocation of the tokens found live commit in one transaction
/// ([`Store::set_role`]), so a crash cannot leave the new role with the tokens it
/// disallows unrevoked. The tokens are found before that transaction (which policy
/// decisions cannot run inside); a second sweep after it catches any token recorded in
/// between. Returns what was revoked, or `None` if nothing had to be.
pub async fn change_role<S: Store>(
    store: &S,
    policy: &Policy,
    client: &ClientRecord,
    role: &str,
    now: u64,
) -> Result<Option<Outcome>, StoreError> {
    let mut changed = client.clone();
    role.clone_into(&mut changed.role);
    let targets = disallowed(store, policy, std::slice::from_ref(&changed), now).await?;
    let mut outcome = store
        .set_role(&client.id, role, targets, now, policy.leeway_s())
        .await?;
    if let Some(stored) = store.client(&client.id).await?
        && let Some(later) = revoke_disallowed(store, policy, &[stored], now).await?
    {
        outcome.absorb(later);
    }
    Ok((outcome.revoked > 0).then_some(outcome))
}
