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
//!
//! A policy reload ([`reload`]) is reviewed against the store before it is put in force
//! ([`review`]): one that leaves registered clients without a role, or that would revoke
//! more than [`ReloadLimits::max_revoked_percent`] of the live tokens, is an operator's
//! mistake far more often than an intent (an emptied or truncated file, the wrong file), and
//! it would log out a fleet. It is refused, and the old policy stays, unless a force marker
//! names the file ([`crate::policy::read_force`]). Every reload, applied or not, is one
//! audit event saying what it revoked or why it was refused.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use tessera_shared::revocation::{Entry, MAX_LEEWAY};

use crate::policy::{Candidate, DenialCode, Force, Policy, PolicyError, SharedPolicy};
use crate::revocation::{Outcome, Target};
use crate::store::{
    AuditEvent, ClientKind, ClientRecord, IssuedToken, Store, StoreError, Unmatched,
};
use crate::text::counted;

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
    Ok(scan(store, policy, subjects, now, None).await?.disallowed)
}

/// The live tokens a sweep sees.
struct Scan {
    /// How many (each token once), not counting those `listed` covers.
    live: u64,
    /// Those `policy` no longer allows, by hash.
    disallowed: Vec<Target>,
}

/// [`disallowed`], also counting the live tokens; tokens `listed` covers (revoked
/// already) are neither counted nor disallowed.
async fn scan<S: Store>(
    store: &S,
    policy: &Policy,
    subjects: &[ClientRecord],
    now: u64,
    listed: Option<&Listed>,
) -> Result<Scan, StoreError> {
    let live_after = now.saturating_sub(policy.leeway_s());
    let mut clients: HashMap<String, Option<ClientRecord>> = HashMap::new();
    // The subjects as the caller has them (with a role not committed yet, for a role
    // change), not as stored.
    for subject in subjects {
        clients.insert(subject.id.clone(), Some(subject.clone()));
    }
    let mut hashes = HashSet::new();
    let mut targets = Vec::new();
    let mut live = 0u64;
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
                || listed.is_some_and(|l| l.covers(&token))
                || !hashes.insert(token.hash)
            {
                continue;
            }
            live += 1;
            if !policy.still_allows(&token, holder, device) {
                targets.push(Target::TokenHash(token.hash));
            }
        }
    }
    Ok(Scan {
        live,
        disallowed: targets,
    })
}

/// The revocation entries in force, by audience: what is revoked already.
struct Listed(HashMap<String, Vec<Entry>>);

impl Listed {
    /// Every entry of every stream still served at `now`.
    async fn read<S: Store>(store: &S, now: u64) -> Result<Self, StoreError> {
        let mut by_audience: HashMap<String, Vec<Entry>> = HashMap::new();
        for stream in store.streams().await? {
            let read = store
                .stream_entries(&stream.name, 1, now, MAX_LEEWAY, usize::MAX)
                .await?;
            for (_, entries) in read.changes {
                for e in entries {
                    by_audience
                        .entry(e.audience.as_str().to_owned())
                        .or_default()
                        .push(e.entry);
                }
            }
        }
        Ok(Self(by_audience))
    }

    /// Whether an entry revokes `token` already (by its hash, or its subject's cut-off).
    fn covers(&self, token: &IssuedToken) -> bool {
        self.0.get(&token.audience).is_some_and(|entries| {
            entries
                .iter()
                .any(|e| e.covers(&token.hash, &token.subject, token.issued_at))
        })
    }
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
    let target = format!("client {}", client.id);
    let mut rows = vec![AuditEvent {
        at_ms: now.saturating_mul(1000),
        actor: "cli".to_owned(),
        action: "set_role".to_owned(),
        target: client.id.clone(),
        outcome: "ok".to_owned(),
        reason: format!("role {} → {role}", client.role),
        count: 1,
    }];
    rows.extend(revoked_row(
        "cli",
        &target,
        &format!("role {role}"),
        &outcome,
        now.saturating_mul(1000),
    ));
    if let Err(e) = store.audit(rows).await {
        tracing::error!(error = %e, "cannot audit the role change");
    }
    Ok((outcome.revoked > 0).then_some(outcome))
}

/// The audit action of tokens revoked outside a request: by a policy reload (or load at
/// start) or a role change, because the policy no longer allows them. The running hub
/// notifies the webhooks of these rows (`server::out_of_band_notifier`) as it does of the
/// operators' `revoke` requests.
pub const POLICY_REVOKE: &str = "policy_revoke";

/// The [`POLICY_REVOKE`] audit row of `outcome`, if it revoked anything: `actor` (`hub`,
/// `cli`), `target` (`policy FILE`, `client ID`), `why` the first words of the reason.
fn revoked_row(
    actor: &str,
    target: &str,
    why: &str,
    outcome: &Outcome,
    at_ms: u64,
) -> Option<AuditEvent> {
    (outcome.revoked > 0).then(|| AuditEvent {
        at_ms,
        actor: actor.to_owned(),
        action: POLICY_REVOKE.to_owned(),
        target: target.to_owned(),
        outcome: "ok".to_owned(),
        reason: format!(
            "{why}: revoked {} ({}, {} told to refresh)",
            counted(outcome.revoked, "token", "tokens"),
            counted(
                outcome.entry_count(),
                "revocation entry",
                "revocation entries"
            ),
            counted(
                u64::try_from(outcome.controls.len()).unwrap_or(u64::MAX),
                "device",
                "devices"
            )
        ),
        count: 1,
    })
}

/// How far a policy reload may go before it must be forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadLimits {
    /// The largest share of the live tokens a reload may revoke without being forced, in
    /// percent (0..=100): 100 lets a reload revoke every live token, 0 makes every reload
    /// that revokes anything need forcing.
    pub max_revoked_percent: u8,
}

/// [`ReloadLimits::max_revoked_percent`] by default: a reload may revoke at most half of
/// the live tokens. A deliberate narrowing of one role or rule stays well below on a fleet;
/// an emptied or wrong file revokes nearly everything.
pub const DEFAULT_MAX_REVOKED_PERCENT: u8 = 50;

impl Default for ReloadLimits {
    fn default() -> Self {
        Self {
            max_revoked_percent: DEFAULT_MAX_REVOKED_PERCENT,
        }
    }
}

/// A registered client a policy gives no usable role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roleless {
    /// The client.
    pub client: String,
    /// Its kind.
    pub kind: ClientKind,
    /// Its role as registered.
    pub role: String,
    /// [`DenialCode::UnknownRole`] (the policy does not define it) or
    /// [`DenialCode::WrongKind`] (it is a role for another kind of client).
    pub code: DenialCode,
}

/// What putting a policy in force would do, decided against the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Review {
    /// Registered clients, not revoked, that the policy gives no usable role although
    /// the policy compared with did (every such client when there is none to compare with).
    pub roleless: Vec<Roleless>,
    /// Live tokens of registered clients that are not revoked yet.
    pub live_tokens: u64,
    /// Those the policy no longer allows, by hash.
    pub disallowed: Vec<Target>,
}

/// Why a policy reload is refused unless forced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Objection {
    /// Registered clients would be left without a role: every request of theirs denied,
    /// every token of theirs revoked.
    ClientsWithoutRole(Vec<Roleless>),
    /// The reload would revoke more than the configured share of the live tokens.
    TooManyRevoked {
        /// Tokens it would revoke.
        revoked: u64,
        /// Live tokens.
        live: u64,
        /// The limit, percent.
        max_percent: u8,
    },
}

/// Clients named in a message at most; the rest are counted.
const NAMED_CLIENTS: usize = 5;

impl fmt::Display for Objection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientsWithoutRole(clients) => {
                let n = clients.len();
                write!(
                    f,
                    "{n} registered client{} would have no role: ",
                    if n == 1 { "" } else { "s" }
                )?;
                let named: Vec<String> = clients
                    .iter()
                    .take(NAMED_CLIENTS)
                    .map(|c| match c.code {
                        DenialCode::WrongKind => format!(
                            "{} ({}, role {:?} is for another kind)",
                            c.client,
                            c.kind.as_str(),
                            c.role
                        ),
                        _ => format!("{} (role {:?} is not defined)", c.client, c.role),
                    })
                    .collect();
                f.write_str(&named.join(", "))?;
                if n > NAMED_CLIENTS {
                    write!(f, " and {} more", n - NAMED_CLIENTS)?;
                }
                Ok(())
            }
            Self::TooManyRevoked {
                revoked,
                live,
                max_percent,
            } => write!(
                f,
                "it would revoke {revoked} of the {live} live tokens, more than the \
                 {max_percent} % a reload may revoke without being forced"
            ),
        }
    }
}

impl Review {
    /// Why this policy must not be put in force without being forced, if anything.
    pub fn objections(&self, limits: &ReloadLimits) -> Vec<Objection> {
        let mut out = Vec::new();
        if !self.roleless.is_empty() {
            out.push(Objection::ClientsWithoutRole(self.roleless.clone()));
        }
        let revoked = u64::try_from(self.disallowed.len()).unwrap_or(u64::MAX);
        let max_percent = limits.max_revoked_percent.min(100);
        // revoked / live > max / 100, in integers.
        if u128::from(revoked) * 100 > u128::from(self.live_tokens) * u128::from(max_percent) {
            out.push(Objection::TooManyRevoked {
                revoked,
                live: self.live_tokens,
                max_percent,
            });
        }
        out
    }
}

/// Reviews `candidate` against the registered clients and the live tokens at `now`: the
/// clients it leaves without a usable role (those `current` left without one already are
/// not counted again, so an unchanged policy raises nothing new; with `current` `None`,
/// every one), and the live tokens not revoked yet that it no longer allows. Revoked
/// clients are left out: they need no role.
pub async fn review<S: Store>(
    store: &S,
    current: Option<&Policy>,
    candidate: &Policy,
    now: u64,
) -> Result<Review, StoreError> {
    let clients = store.clients(None).await?;
    let roleless = clients
        .iter()
        .filter(|c| c.revoked_at.is_none())
        .filter(|c| current.is_none_or(|p| p.role_of(c).is_ok()))
        .filter_map(|c| {
            let denial = candidate.role_of(c).err()?;
            Some(Roleless {
                client: c.id.clone(),
                kind: c.kind,
                role: c.role.clone(),
                code: denial.code,
            })
        })
        .collect();
    let listed = Listed::read(store, now).await?;
    let scan = scan(store, candidate, &clients, now, Some(&listed)).await?;
    Ok(Review {
        roleless,
        live_tokens: scan.live,
        disallowed: scan.disallowed,
    })
}

/// What `tessera-hub policy check` reports about a policy file against the registered
/// clients and live tokens: why the running hub would refuse to reload it (empty if it
/// would not). Compared with no policy in force, so every client it leaves without a role
/// is named.
pub async fn check<S: Store>(
    store: &S,
    candidate: &Policy,
    limits: &ReloadLimits,
    now: u64,
) -> Result<Vec<Objection>, StoreError> {
    Ok(review(store, None, candidate, now)
        .await?
        .objections(limits))
}

/// A policy reload that was applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloaded {
    /// SHA-256 of the file as applied.
    pub digest: [u8; 32],
    /// The objections a force marker overrode (empty if none were raised).
    pub forced_over: Vec<Objection>,
    /// Live tokens before the reload (not revoked yet).
    pub live_tokens: u64,
    /// What the reload revoked; `None` if nothing (and then nothing is published).
    pub revoked: Option<Outcome>,
}

/// Why a policy reload was not applied. The policy in force stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is not a valid policy.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// The reload would strand clients or revoke too much, and no force marker names it.
    #[error(
        "{file}: {}; to apply it anyway, force it with `sha256sum {file} > {}` and reload \
         again",
        join(objections),
        crate::policy::force_marker(Path::new(file)).display()
    )]
    Refused {
        /// The file.
        file: String,
        /// Why.
        objections: Vec<Objection>,
    },
    /// The policy's `device_audience` is a registered client's id: that client would take
    /// every device token of the fleet as its own. Never forced.
    #[error(
        "{file}: device_audience `{audience}` is the id of a registered client, which would \
         accept every device token of the fleet as its own; choose another device_audience \
         (a force marker does not override this)"
    )]
    AudienceTaken {
        /// The file.
        file: String,
        /// The audience.
        audience: String,
    },
    /// The store could not be read or written (nothing was revoked).
    #[error("{file}: not reloaded, the store failed: {source}")]
    Store {
        /// The file.
        file: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

fn join(objections: &[Objection]) -> String {
    let all: Vec<String> = objections.iter().map(ToString::to_string).collect();
    all.join("; ")
}

/// Reloads the policy from `path` into `shared`, as the running hub does on `SIGHUP`.
///
/// Reads the file once; refuses it if it is invalid, or if [`review`] against the policy
/// in force raises an [`Objection`] and no force marker names these exact bytes
/// ([`crate::policy::read_force`]). Otherwise puts it in force and revokes the live tokens
/// it no longer allows (the running hub's heartbeat publishes the changes and control
/// messages); if that revocation fails, the previous policy is put back. A force marker is
/// removed by the reload that reads it (it forces once). Writes one audit event (actor
/// `hub`, action `policy_reload`, target the file) and logs the result; a reload that
/// revokes nothing records no revocation change, so nothing is published.
pub async fn reload<S: Store>(
    store: &S,
    shared: &SharedPolicy,
    path: &Path,
    limits: &ReloadLimits,
    now_ms: u64,
) -> Result<Reloaded, ReloadError> {
    let file = path.display().to_string();
    let result = attempt(store, Some(shared), path, limits, now_ms / 1000)
        .await
        .map(|(reloaded, _)| reloaded);
    log_reload(&file, "policy reload", result.as_ref());
    audit_reload(store, &file, "", result.as_ref(), now_ms).await;
    result
}

/// Loads the policy from `path` when the hub starts, reviewed as [`reload`] reviews a new
/// one: the file may have changed while the hub was stopped. The hub keeps no record of the
/// policy it served with last, so the review is against none (as `policy check`): every
/// registered client without a role counts. Refused as a reload is, unless forced; the
/// live tokens it no longer allows are revoked. Audited as a reload (`policy_reload`, its
/// reason starting `at start:`). Returns the policy to serve with.
pub async fn load_at_start<S: Store>(
    store: &S,
    path: &Path,
    limits: &ReloadLimits,
    now_ms: u64,
) -> Result<(SharedPolicy, Reloaded), ReloadError> {
    let file = path.display().to_string();
    let result = attempt(store, None, path, limits, now_ms / 1000).await;
    let outcome = result.as_ref().map(|(r, _)| r);
    log_reload(&file, "policy load at start", outcome);
    audit_reload(store, &file, "at start: ", outcome, now_ms).await;
    result.map(|(reloaded, shared)| (shared, reloaded))
}

async fn audit_reload<S: Store>(
    store: &S,
    file: &str,
    when: &str,
    result: Result<&Reloaded, &ReloadError>,
    now_ms: u64,
) {
    let mut event = audit_event(file, result, now_ms);
    event.reason.insert_str(0, when);
    let why = if when.is_empty() {
        "policy reload"
    } else {
        "policy load at start"
    };
    let revoked = result
        .ok()
        .and_then(|r| r.revoked.as_ref())
        .and_then(|out| revoked_row("hub", &format!("policy {file}"), why, out, now_ms));
    if let Err(e) = store
        .audit([event].into_iter().chain(revoked).collect())
        .await
    {
        tracing::error!(error = %e, "cannot audit the policy reload");
    }
}

/// Reviews the file against the policy in `shared` (none at start), and puts it in force:
/// into `shared`, or into a new [`SharedPolicy`] at start. Returns the policy in force.
async fn attempt<S: Store>(
    store: &S,
    shared: Option<&SharedPolicy>,
    path: &Path,
    limits: &ReloadLimits,
    now: u64,
) -> Result<(Reloaded, SharedPolicy), ReloadError> {
    let file = path.display().to_string();
    let store_error = |source| ReloadError::Store {
        file: file.clone(),
        source,
    };
    let candidate = Candidate::read(path)?;
    let audience = candidate.policy.device_audience();
    if store.client(audience).await.map_err(store_error)?.is_some() {
        return Err(ReloadError::AudienceTaken {
            file,
            audience: audience.to_owned(),
        });
    }
    let force = crate::policy::read_force(path, &candidate.digest);
    let current = shared.map(SharedPolicy::current);
    let review = review(store, current.as_deref(), &candidate.policy, now)
        .await
        .map_err(store_error)?;
    let objections = review.objections(limits);
    if force != Force::Absent {
        if force == Force::Stale {
            tracing::warn!(
                marker = %crate::policy::force_marker(path).display(),
                "the force marker names other contents than the policy file; it forces nothing"
            );
        }
        if let Err(e) = crate::policy::remove_force(path) {
            tracing::warn!(error = %e, "cannot remove the used force marker");
        }
    }
    if !objections.is_empty() && force != Force::Forced {
        return Err(ReloadError::Refused { file, objections });
    }
    let (shared, previous) = match shared {
        Some(shared) => {
            let previous = shared.replace(candidate.policy);
            (shared.clone(), Some(previous))
        }
        None => (SharedPolicy::new(candidate.policy), None),
    };
    // Decided again under the policy now in force, so a token issued under the old one
    // between the review and the swap is caught too.
    match revoke_disallowed_everywhere(store, &shared.current(), now).await {
        Ok(revoked) => Ok((
            Reloaded {
                digest: candidate.digest,
                forced_over: objections,
                live_tokens: review.live_tokens,
                revoked,
            },
            shared,
        )),
        Err(e) => {
            if let Some(previous) = previous {
                shared.restore(previous);
            }
            Err(store_error(e))
        }
    }
}

fn log_reload(file: &str, what: &str, result: Result<&Reloaded, &ReloadError>) {
    match result {
        Ok(r) => {
            let digest = hex::encode(r.digest);
            if !r.forced_over.is_empty() {
                tracing::warn!(
                    file,
                    sha256 = %digest,
                    overrode = %join(&r.forced_over),
                    "{what}: forced by its force marker"
                );
            }
            match &r.revoked {
                Some(out) => tracing::warn!(
                    file,
                    sha256 = %digest,
                    tokens = out.revoked,
                    live_tokens = r.live_tokens,
                    entries = out.entry_count(),
                    devices_told = out.controls.len(),
                    "{what} applied; revoked the live tokens it no longer allows"
                ),
                None => tracing::info!(
                    file,
                    sha256 = %digest,
                    "{what} applied; every live token is still allowed, nothing revoked"
                ),
            }
        }
        Err(e) => tracing::error!(error = %e, "{what}: refused, the policy in force stays"),
    }
}

fn audit_event(file: &str, result: Result<&Reloaded, &ReloadError>, now_ms: u64) -> AuditEvent {
    let (outcome, reason) = match result {
        Ok(r) => {
            let mut reason = format!("applied, sha256 {}: ", hex::encode(r.digest));
            match &r.revoked {
                Some(out) => reason.push_str(&format!(
                    "revoked {} of the {} ({}, {} told to refresh)",
                    out.revoked,
                    counted(r.live_tokens, "live token", "live tokens"),
                    counted(out.entry_count(), "revocation entry", "revocation entries"),
                    counted(
                        u64::try_from(out.controls.len()).unwrap_or(u64::MAX),
                        "device",
                        "devices"
                    )
                )),
                None => reason.push_str("revoked nothing"),
            }
            if !r.forced_over.is_empty() {
                reason.push_str(&format!("; forced over: {}", join(&r.forced_over)));
            }
            ("ok", reason)
        }
        Err(ReloadError::Refused { objections, .. }) => (
            "denied",
            format!("refused, not forced: {}", join(objections)),
        ),
        Err(ReloadError::Invalid(e)) => ("malformed", format!("refused: {e}")),
        Err(e @ ReloadError::AudienceTaken { .. }) => ("denied", format!("refused: {e}")),
        Err(ReloadError::Store { source, .. }) => (
            "internal",
            format!("not reloaded, the store failed: {source}"),
        ),
    };
    AuditEvent {
        at_ms: now_ms,
        actor: "hub".to_owned(),
        action: "policy_reload".to_owned(),
        target: file.to_owned(),
        outcome: outcome.to_owned(),
        reason,
        count: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(roleless: usize, live: u64, disallowed: u8) -> Review {
        Review {
            roleless: (0..roleless)
                .map(|i| Roleless {
                    client: format!("door-{i}"),
                    kind: ClientKind::Device,
                    role: "lock".into(),
                    code: DenialCode::UnknownRole,
                })
                .collect(),
            live_tokens: live,
            disallowed: (0..disallowed)
                .map(|n| Target::TokenHash([n; 32]))
                .collect(),
        }
    }

    fn limit(max_revoked_percent: u8) -> ReloadLimits {
        ReloadLimits {
            max_revoked_percent,
        }
    }

    #[test]
    fn a_reload_may_revoke_up_to_the_configured_share_and_no_more() {
        assert_eq!(review(0, 10, 5).objections(&limit(50)), []);
        assert_eq!(
            review(0, 10, 6).objections(&limit(50)),
            [Objection::TooManyRevoked {
                revoked: 6,
                live: 10,
                max_percent: 50
            }]
        );
        assert_eq!(review(0, 10, 10).objections(&limit(100)), []);
        assert_eq!(review(0, 10, 0).objections(&limit(0)), []);
        assert_eq!(review(0, 10, 1).objections(&limit(0)).len(), 1);
        assert_eq!(review(0, 0, 0).objections(&limit(0)), []);
    }

    #[test]
    fn a_refusal_names_the_first_clients_left_without_a_role_and_counts_the_rest() {
        let objections = review(7, 0, 0).objections(&limit(50));
        assert_eq!(
            objections[0].to_string(),
            "7 registered clients would have no role: door-0 (role \"lock\" is not defined), \
             door-1 (role \"lock\" is not defined), door-2 (role \"lock\" is not defined), \
             door-3 (role \"lock\" is not defined), door-4 (role \"lock\" is not defined) and \
             2 more"
        );
        assert_eq!(
            review(1, 0, 0).objections(&limit(50))[0].to_string(),
            "1 registered client would have no role: door-0 (role \"lock\" is not defined)"
        );
    }
}
