//! The hub's signing keys: generated from the OS RNG, stored sealed under a
//! key-encryption secret (the same AEAD record format devices use), published in a signed
//! key set, and rotated by announcing the next key before it signs anything.
//!
//! The key-encryption secret comes from a file or an environment variable, never from the
//! database, so a copied database alone reveals no signing key.

use std::path::Path;

use tessera_shared::crypto::{KeyLookup, P256Signer, PublicKey, Signer, Verifier};
use tessera_shared::keyset::KeySet;
use tessera_shared::record::{self, RecordKey};
use zeroize::Zeroizing;

use crate::crypto::AwsLcSigner;
use crate::store::{KeyRecord, Store, StoreError};

/// Environment variable that may hold the key-encryption secret, hex-encoded.
pub const KEK_ENV: &str = "TESSERA_HUB_KEK";

/// Shortest key-encryption secret accepted, in bytes.
pub const MIN_KEK_LEN: usize = record::MIN_DEVICE_SECRET_LEN;

/// Why keys could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key-encryption secret is missing or unusable.
    #[error("key-encryption secret: {0}")]
    Kek(String),
    /// A sealed key could not be opened: wrong secret, or the database was altered.
    #[error("signing key {kid} cannot be opened ({reason}): wrong key-encryption secret?")]
    Unseal {
        /// The key's id, hex.
        kid: String,
        /// The record error.
        reason: tessera_shared::Error,
    },
    /// The key-encryption secret given does not open the hub's newest published signing
    /// key, so it is not the secret the hub's keys are sealed under: a key sealed under it
    /// would never open with the right one. Checked before any key is written.
    #[error(
        "the key-encryption secret does not open signing key {kid}, the newest key the hub \
         published: wrong `kek_file` or {KEK_ENV}? Nothing was written ({reason})"
    )]
    KekMismatch {
        /// The key's id, hex.
        kid: String,
        /// The record error.
        reason: tessera_shared::Error,
    },
    /// The database holds no signing key (run `tessera-hub init`).
    #[error("no signing key in the database: run `tessera-hub init` first")]
    NoKeys,
    /// The OS random number generator failed.
    #[error("random number generator: {0}")]
    Random(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The core refused a key or key set.
    #[error("key: {0}")]
    Core(tessera_shared::Error),
}

/// The key-encryption secret.
pub struct Kek(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the secret: the file's bytes if `path` is given, else the hex in [`KEK_ENV`].
    pub fn load(path: Option<&Path>) -> Result<Self, KeyError> {
        match path {
            Some(p) => Self::from_file(p),
            None => {
                let hex = std::env::var(KEK_ENV).map_err(|_| {
                    KeyError::Kek(format!("set `kek_file` in the config or {KEK_ENV} (hex)"))
                })?;
                Self::from_hex(&hex)
            }
        }
    }

    /// The raw bytes of a file (at least [`MIN_KEK_LEN`] of them).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path)
            .map_err(|e| KeyError::Kek(format!("cannot read {}: {e}", path.display())))?;
        Self::from_bytes(bytes)
    }

    /// A hex string.
    pub fn from_hex(hex_str: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_str.trim())
            .map_err(|e| KeyError::Kek(format!("{KEK_ENV} is not hex: {e}")))?;
        Self::from_bytes(bytes)
    }

    /// Raw bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEK_LEN {
            return Err(KeyError::Kek(format!(
                "too short: {} bytes, need at least {MIN_KEK_LEN}",
                bytes.len()
            )));
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// A fresh random secret, for `init`.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new(vec![0u8; 32]);
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// The secret's bytes, for writing it to a file at `init`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn record_key(&self, hub_id: &str) -> Result<RecordKey, KeyError> {
        RecordKey::derive(&self.0, hub_id).map_err(KeyError::Core)
    }
}

/// A new random signing key for the hub, from the OS RNG.
pub fn generate_key() -> Result<AwsLcSigner, KeyError> {
    AwsLcSigner::generate().map_err(|e| KeyError::Random(e.to_string()))
}

/// A new random P-256 key for a client (`tessera-hub keygen`): devices, apps and operators
/// sign with the core's `p256` backend, and their key files are written by
/// [`keyfile`](crate::keyfile).
pub fn generate_client_key() -> Result<P256Signer, KeyError> {
    loop {
        let mut scalar = Zeroizing::new([0u8; 32]);
        getrandom::fill(scalar.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        // A uniformly random 32-byte value is a valid scalar except with negligible
        // probability (zero or above the group order); draw again then.
        if let Ok(signer) = P256Signer::from_scalar(&scalar) {
            return Ok(signer);
        }
    }
}

fn seal_key(
    kek: &Kek,
    hub_id: &str,
    signer: &AwsLcSigner,
    created_at: u64,
) -> Result<Vec<u8>, KeyError> {
    let key = kek.record_key(hub_id)?;
    let mut nonce = [0u8; record::NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| KeyError::Random(e.to_string()))?;
    let mut buf = Zeroizing::new(vec![0u8; record::sealed_len(32)]);
    record::plaintext_mut(&mut buf)[..32]
        .copy_from_slice(&*signer.to_scalar().map_err(KeyError::Core)?);
    let n = record::seal(&key, hub_id, created_at, nonce, &mut buf, 32).map_err(KeyError::Core)?;
    Ok(buf[..n].to_vec())
}

fn unseal_key(kek: &Kek, hub_id: &str, rec: &KeyRecord) -> Result<AwsLcSigner, KeyError> {
    let unseal_err = |reason| KeyError::Unseal {
        kid: hex::encode(rec.kid),
        reason,
    };
    let key = kek.record_key(hub_id)?;
    let mut buf = Zeroizing::new(rec.sealed_private_key.clone());
    let opened = record::open(&key, hub_id, 0, &mut buf).map_err(unseal_err)?;
    let scalar: Zeroizing<[u8; 32]> = Zeroizing::new(
        opened
            .plaintext
            .try_into()
            .map_err(|_| unseal_err(tessera_shared::error::RecordError::Malformed.into()))?,
    );
    // The scalar is authenticated by the seal; the stored public key and kid are not, so
    // both are checked against it.
    let signer = AwsLcSigner::from_scalar_and_public_key(&scalar, &rec.public_key)
        .map_err(|_| unseal_err(tessera_shared::error::RecordError::Tampered.into()))?;
    if signer.kid() != rec.kid {
        return Err(unseal_err(
            tessera_shared::error::RecordError::Tampered.into(),
        ));
    }
    Ok(signer)
}

/// Checks that `kek` is the secret the hub's keys are sealed under, by opening the newest
/// published key (the one that signs, or signed last): [`KeyError::KekMismatch`] if it
/// cannot, [`KeyError::NoKeys`] if there is none. Every command that writes a key calls
/// this first, so a wrong secret is refused before it seals anything.
pub async fn check_kek<S: Store>(store: &S, kek: &Kek, hub_id: &str) -> Result<(), KeyError> {
    let newest = store
        .keys()
        .await?
        .into_iter()
        .filter(|r| r.published_at.is_some())
        .max_by_key(|r| (r.active_from, r.created_at))
        .ok_or(KeyError::NoKeys)?;
    match unseal_key(kek, hub_id, &newest) {
        Ok(_) => Ok(()),
        Err(KeyError::Unseal { kid, reason }) => Err(KeyError::KekMismatch { kid, reason }),
        Err(e) => Err(e),
    }
}

/// Creates a signing key that becomes active at `active_from`, stores it sealed, and
/// returns its public half. `published_at` is `Some(now)` only for the first key, which
/// devices receive out of band as their trust anchor; any other key counts as published
/// once the running hub has put it in a key set ([`Store::mark_key_published`]).
pub async fn create_key<S: Store>(
    store: &S,
    kek: &Kek,
    hub_id: &str,
    now: u64,
    active_from: u64,
    published_at: Option<u64>,
) -> Result<PublicKey, KeyError> {
    let signer = generate_key()?;
    let public = signer.public_key();
    store
        .add_key(KeyRecord {
            kid: signer.kid(),
            public_key: public.to_sec1().to_vec(),
            sealed_private_key: seal_key(kek, hub_id, &signer, now)?,
            created_at: now,
            active_from,
            retire_after: None,
            published_at,
        })
        .await?;
    Ok(public)
}

/// The hub's keys as loaded: the signer in use, and the published key set.
pub struct KeyRing {
    signers: Vec<(KeyRecord, AwsLcSigner)>,
    version: u64,
}

/// Key set versions count events in this many steps per second (see
/// [`KeyRing::keyset_version`]): more keys than this created or retired in one second
/// share a version.
const VERSIONS_PER_SECOND: u64 = 1024;

/// The key set version of the keys `loaded` when `retired` were retired (PROTOCOL.md §10:
/// it increases with every change). A function of the stored keys alone, so a restarted
/// hub, or another replica, numbers the same set the same way and devices keep the set
/// they hold; and it grows whenever a key joins or leaves the set: the set only changes
/// by an event (a key created, a key retired), every event has a time, and an event
/// happens at its time or later. The version is the time of the latest event, in
/// [`VERSIONS_PER_SECOND`] steps, plus the number of events at that time, so two keys
/// created in one second still give two versions.
fn keyset_version<'a>(
    loaded: impl Iterator<Item = &'a KeyRecord>,
    retired: impl Iterator<Item = &'a KeyRecord>,
) -> u64 {
    let events = loaded
        .map(|r| r.created_at)
        .chain(retired.filter_map(|r| r.retire_after));
    let (latest, count) = events.fold((0u64, 0u64), |(latest, count), t| match t.cmp(&latest) {
        std::cmp::Ordering::Greater => (t, 1),
        std::cmp::Ordering::Equal => (latest, count + 1),
        std::cmp::Ordering::Less => (latest, count),
    });
    latest
        .saturating_mul(VERSIONS_PER_SECOND)
        .saturating_add(count.min(VERSIONS_PER_SECOND - 1))
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .signers
            .iter()
            .map(|(r, _)| hex::encode(r.kid))
            .collect();
        f.debug_struct("KeyRing").field("kids", &kids).finish()
    }
}

impl KeyRing {
    /// Loads and unseals every stored key that is not retired at `now`.
    ///
    /// A key never published that cannot be opened is left out, with a warning: it was
    /// sealed under another secret (a `keys rotate` run with a wrong one, before rotation
    /// checked the secret), no verifier knows it, and it must not stop the hub; the next
    /// `keys rotate` makes a good one. A published key that cannot be opened is an error
    /// ([`KeyError::Unseal`]): the secret is wrong, or the database was altered.
    ///
    /// When no published key is left (the key that signed was retired on the schedule of
    /// a next key that was never published, for instance because it was left out), the
    /// newest published key is kept although its retirement time has passed, so the hub
    /// goes on signing with a key its verifiers know.
    pub async fn load<S: Store>(
        store: &S,
        kek: &Kek,
        hub_id: &str,
        now: u64,
    ) -> Result<Self, KeyError> {
        let mut signers = Vec::new();
        let mut retired = Vec::new();
        for rec in store.keys().await? {
            if rec.retire_after.is_some_and(|t| t <= now) {
                retired.push(rec);
                continue;
            }
            match unseal_key(kek, hub_id, &rec) {
                Ok(signer) => signers.push((rec, signer)),
                Err(KeyError::Unseal { kid, reason }) if rec.published_at.is_none() => {
                    tracing::warn!(
                        kid = %kid,
                        reason = %reason,
                        "signing key {kid} was never published and cannot be opened with this \
                         key-encryption secret (sealed under another one?): it is left out \
                         and never used; run `tessera-hub keys rotate` for a next key"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if !signers.iter().any(|(r, _)| r.published_at.is_some()) {
            let newest = retired
                .iter()
                .enumerate()
                .filter(|(_, r)| r.published_at.is_some())
                .max_by_key(|(_, r)| (r.active_from, r.created_at))
                .map(|(i, _)| i);
            if let Some(i) = newest {
                let rec = retired.remove(i);
                let signer = unseal_key(kek, hub_id, &rec)?;
                tracing::warn!(
                    kid = %hex::encode(rec.kid),
                    "no signing key published after key {} took over from it: it goes on \
                     signing past its retirement time",
                    hex::encode(rec.kid)
                );
                signers.push((rec, signer));
                // Oldest first, as the store lists them.
                signers.sort_by_key(|(r, _)| r.created_at);
            }
        }
        if signers.is_empty() {
            return Err(KeyError::NoKeys);
        }
        let version = keyset_version(signers.iter().map(|(r, _)| r), retired.iter());
        Ok(Self { signers, version })
    }

    /// The version of the key set these keys make (see [`KeyRing::keyset`]): the same for
    /// the same stored keys, whichever hub loads them and however often, and higher after
    /// any key was created or retired. Publishing with it rather than with a counter bumped
    /// at each start means a hub restart does not make every device rewrite its store.
    pub fn keyset_version(&self) -> u64 {
        self.version
    }

    /// The key to sign with at `now`: the newest one already published and active. Keys
    /// announced for the future, or not yet published at all, are not used, so verifiers
    /// know them first.
    pub fn active(&self, now: u64) -> &AwsLcSigner {
        &self.signers[self.active_index(now)].1
    }

    fn active_index(&self, now: u64) -> usize {
        let published = |r: &KeyRecord| r.published_at.is_some();
        self.signers
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| published(r) && r.active_from <= now)
            .max_by_key(|(_, (r, _))| (r.active_from, r.created_at))
            .or_else(|| {
                self.signers
                    .iter()
                    .enumerate()
                    .find(|(_, (r, _))| published(r))
            })
            .map_or(0, |(i, _)| i)
    }

    /// The loaded keys the key set at `now` holds, at most
    /// [`MAX_KEYS`](tessera_shared::keyset::MAX_KEYS), oldest first. When more keys are
    /// loaded than fit, they are chosen in this order: the active key (it signs the set
    /// itself and everything the hub sends); keys already published that sign next
    /// (receivers trust them already, and must keep them to verify the set they will sign);
    /// keys that signed before, newest first (the tokens they signed last are the ones most
    /// likely still live); keys never published, oldest first (a key left out is not
    /// announced and so does not sign: rotation waits for room); last, published keys that
    /// never signed (another key announced with them took over at once).
    fn published(&self, now: u64) -> Vec<&(KeyRecord, AwsLcSigner)> {
        let active = self.active_index(now);
        let order = |r: &KeyRecord| (r.active_from, r.created_at);
        // A key published with another of the same `active_from` but created later was
        // never the newest active key: it signed nothing.
        let never_signed = |r: &KeyRecord| {
            self.signers.iter().any(|(k, _)| {
                k.published_at.is_some()
                    && k.active_from == r.active_from
                    && k.created_at > r.created_at
            })
        };
        let (mut upcoming, mut earlier, mut unpublished, mut idle) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (r, _)) in self.signers.iter().enumerate() {
            if i == active {
                continue;
            }
            match r.published_at {
                None => unpublished.push(i),
                Some(_) if r.active_from > now => upcoming.push(i),
                Some(_) if never_signed(r) => idle.push(i),
                Some(_) => earlier.push(i),
            }
        }
        upcoming.sort_by_key(|i| order(&self.signers[*i].0));
        earlier.sort_by_key(|i| std::cmp::Reverse(order(&self.signers[*i].0)));
        let mut chosen: Vec<usize> = std::iter::once(active)
            .chain(upcoming)
            .chain(earlier)
            .chain(unpublished)
            .chain(idle)
            .take(tessera_shared::keyset::MAX_KEYS)
            .collect();
        chosen.sort_unstable();
        chosen.into_iter().map(|i| &self.signers[i]).collect()
    }

    /// The ids of loaded keys no key set has been published with yet.
    pub fn unpublished(&self) -> Vec<[u8; 8]> {
        self.signers
            .iter()
            .filter(|(r, _)| r.published_at.is_none())
            .map(|(r, _)| r.kid)
            .collect()
    }

    /// The ids of the keys the key set at `now` holds, oldest first.
    pub fn published_kids(&self, now: u64) -> Vec<[u8; 8]> {
        self.published(now).iter().map(|(r, _)| r.kid).collect()
    }

    /// Replaces the stored record of a loaded key (after [`Store::mark_key_published`]).
    pub fn update_record(&mut self, record: KeyRecord) {
        if let Some((r, _)) = self.signers.iter_mut().find(|(r, _)| r.kid == record.kid) {
            *r = record;
        }
    }

    /// Every loaded public key, oldest first (the key set may hold fewer: see
    /// [`KeyRing::published_kids`]).
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.signers.iter().map(|(_, s)| s.public_key()).collect()
    }

    /// The key set to publish at `now`, at `version`: see [`KeyRing::published_kids`] for
    /// which keys it holds when more are loaded than a set holds. Newest first.
    pub fn keyset(&self, version: u64, now: u64) -> Result<KeySet, KeyError> {
        let keys: Vec<PublicKey> = self
            .published(now)
            .iter()
            .rev()
            .map(|(_, s)| s.public_key())
            .collect();
        KeySet::new(version, now, &keys).map_err(KeyError::Core)
    }

    /// The key set signed by the active key, ready to publish.
    pub fn signed_keyset(&self, version: u64, now: u64) -> Result<Vec<u8>, KeyError> {
        let set = self.keyset(version, now)?;
        let mut out = vec![0u8; 1024];
        let n = set
            .sign(self.active(now), &mut out)
            .map_err(KeyError::Core)?;
        out.truncate(n);
        Ok(out)
    }

    /// The ids of the loaded keys, oldest first.
    pub fn kids(&self) -> Vec<[u8; 8]> {
        self.signers.iter().map(|(r, _)| r.kid).collect()
    }

    /// Whether some key verifies for `kid` (current or retiring).
    pub fn public_key(&self, kid: &[u8]) -> Option<PublicKey> {
        self.signers
            .iter()
            .find(|(r, _)| r.kid == kid)
            .map(|(_, s)| s.public_key())
    }
}

/// Every loaded key verifies what it signed, with the hub's backend: the hub checks its own
/// messages seen back from the broker with this rather than with a key set (which would
/// verify with the core's `p256`).
impl KeyLookup for KeyRing {
    fn verifier(&self, kid: &[u8]) -> Option<&dyn Verifier> {
        self.signers
            .iter()
            .find(|(r, _)| r.kid == kid)
            .map(|(_, s)| s as &dyn Verifier)
    }
}

/// Rotates: creates the next key, active `announce_s` from now at the earliest (the running
/// hub publishes it at its next heartbeat and then counts the announce period again from
/// that publication, [`announce_published`]), and schedules every current key to retire
/// once the tokens it signed have expired (`announce_s + max_token_lifetime_s + leeway_s`
/// from now, pushed back in step when the publication is later).
///
/// Refuses with [`KeyError::KekMismatch`], writing nothing, when `kek` does not open the
/// hub's newest published key ([`check_kek`]).
pub async fn rotate<S: Store>(
    store: &S,
    kek: &Kek,
    hub_id: &str,
    now: u64,
    announce_s: u64,
    max_token_lifetime_s: u64,
    leeway_s: u64,
) -> Result<PublicKey, KeyError> {
    check_kek(store, kek, hub_id).await?;
    let current = store.keys().await?;
    let next = create_key(store, kek, hub_id, now, now + announce_s, None).await?;
    let retire = now + announce_s + max_token_lifetime_s + leeway_s;
    for rec in current {
        if rec.retire_after.is_none() {
            store.retire_key(&rec.kid, retire).await?;
        }
    }
    Ok(next)
}

/// After a key set was published at `now`: records the first publication of every key of
/// that set ([`KeyRing::published_kids`]) that had none, so it signs only `announce_s`
/// after it (PROTOCOL.md §10), and
/// keeps every other key until the tokens signed before the switch have expired
/// (`max_token_lifetime_s + leeway_s` after it). Returns whether a key changed.
pub async fn announce_published<S: Store>(
    store: &S,
    ring: &mut KeyRing,
    now: u64,
    announce_s: u64,
    max_token_lifetime_s: u64,
    leeway_s: u64,
) -> Result<bool, KeyError> {
    // Only the keys the published set held: one left out for want of room was not
    // announced, and its announce period has not started.
    let in_set = ring.published_kids(now);
    let unpublished: Vec<[u8; 8]> = ring
        .unpublished()
        .into_iter()
        .filter(|kid| in_set.contains(kid))
        .collect();
    for kid in &unpublished {
        let record = store
            .mark_key_published(kid, now, now.saturating_add(announce_s))
            .await?;
        let retire = record
            .active_from
            .saturating_add(max_token_lifetime_s)
            .saturating_add(leeway_s);
        // Only the keys loaded: a key already retired signed nothing still live and must
        // not come back into the key set.
        let loaded = ring.kids();
        for other in store.keys().await? {
            if other.kid != *kid
                && loaded.contains(&other.kid)
                && other.retire_after.is_some_and(|t| t < retire)
            {
                store.retire_key(&other.kid, retire).await?;
            }
        }
        ring.update_record(record);
    }
    Ok(!unpublished.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Sqlite;

    const NOW: u64 = 1_700_000_000;

    #[tokio::test]
    async fn a_rotated_key_signs_only_the_announce_period_after_its_first_publication() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        let first = create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        // `keys rotate` at NOW with a 300 s announce period; the hub publishes the new key
        // set only at its heartbeat, 25 s later.
        let next = rotate(&store, &kek, "hub", NOW, 300, 900, 30)
            .await
            .expect("rotate");
        let mut ring = KeyRing::load(&store, &kek, "hub", NOW + 25)
            .await
            .expect("load");
        assert_eq!(ring.unpublished(), [next.kid()]);
        // Never published: never used, however late.
        assert_eq!(ring.active(NOW + 10_000).kid(), first.kid());

        assert!(
            announce_published(&store, &mut ring, NOW + 25, 300, 900, 30)
                .await
                .expect("announce")
        );
        assert!(ring.unpublished().is_empty());
        // 300 s from the publication, not from `keys rotate`.
        assert_eq!(ring.active(NOW + 300).kid(), first.kid());
        assert_eq!(ring.active(NOW + 324).kid(), first.kid());
        assert_eq!(ring.active(NOW + 325).kid(), next.kid());
        // The old key stays until the tokens it signed up to the switch have expired.
        let old = store
            .keys()
            .await
            .expect("keys")
            .into_iter()
            .find(|k| k.kid == first.kid())
            .expect("old key");
        assert_eq!(old.retire_after, Some(NOW + 325 + 900 + 30));
        // A second publication changes nothing.
        assert!(
            !announce_published(&store, &mut ring, NOW + 60, 300, 900, 30)
                .await
                .expect("announce")
        );
        assert_eq!(ring.active(NOW + 325).kid(), next.kid());
    }

    #[tokio::test]
    async fn a_key_ring_built_from_a_sealed_key_signs_with_aws_lc() {
        use tessera_shared::claims::Claims;
        use tessera_shared::scope::Scopes;
        use tessera_shared::token::{self, MAX_TOKEN_LEN, Validation};

        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        let anchor = create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("key");
        let ring = KeyRing::load(&store, &kek, "hub", NOW).await.expect("load");
        let active: &AwsLcSigner = ring.active(NOW);
        assert_eq!(active.public_key(), anchor);
        // aws-lc-rs signs with a random nonce; the core's p256 backend (RFC 6979) would
        // sign the same message the same way twice.
        let (a, b) = (
            active.sign(&[b"m"]).expect("sign"),
            active.sign(&[b"m"]).expect("sign"),
        );
        assert_ne!(a, b);

        let holder = generate_client_key().expect("rng");
        let claims = Claims {
            iss: "hub",
            sub: "dev-1",
            aud: "tessera",
            exp: NOW + 900,
            nbf: None,
            iat: NOW,
            cti: &[1; 16],
            cnf: holder.public_key(),
            scope: Scopes::parse("telemetry:write").expect("scope"),
        };
        let mut out = [0u8; MAX_TOKEN_LEN];
        let n = token::issue(&claims, active, &mut out).expect("issue");
        let validation = Validation::new(NOW, "tessera");
        // A device: the trust anchor, verified with the core's p256.
        assert!(token::verify(&out[..n], &KeySet::from_anchor(anchor), &validation).is_ok());
        // The hub itself: its ring, verified with aws-lc-rs.
        assert!(token::verify(&out[..n], &ring, &validation).is_ok());
        // The signed key set verifies for a device holding the anchor.
        let signed = ring.signed_keyset(1, NOW).expect("key set");
        let mut device = KeySet::from_anchor(anchor);
        assert!(device.update(&signed).is_ok());
        assert_eq!(device.version(), 1);
    }

    #[tokio::test]
    async fn a_sealed_key_whose_stored_public_key_was_replaced_is_refused() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("key");
        let mut rec = store.keys().await.expect("keys").remove(0);
        assert!(unseal_key(&kek, "hub", &rec).is_ok());
        let other = generate_key().expect("rng");
        // Both the public key and the kid swapped for another key's: the sealed scalar
        // does not match them.
        rec.public_key = other.public_key().to_sec1().to_vec();
        rec.kid = other.kid();
        assert!(matches!(
            unseal_key(&kek, "hub", &rec),
            Err(KeyError::Unseal { .. })
        ));
        // A wrong key-encryption secret opens nothing.
        let rec = store.keys().await.expect("keys").remove(0);
        let wrong = Kek::from_bytes(vec![8; 32]).expect("kek");
        assert!(matches!(
            unseal_key(&wrong, "hub", &rec),
            Err(KeyError::Unseal { .. })
        ));
    }

    #[tokio::test]
    async fn rotating_with_a_wrong_secret_is_refused_before_any_key_is_written() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        let wrong = Kek::from_bytes(vec![8; 32]).expect("kek");
        let err = rotate(&store, &wrong, "hub", NOW, 300, 900, 30)
            .await
            .expect_err("a wrong secret");
        assert!(matches!(err, KeyError::KekMismatch { .. }), "{err}");
        assert!(err.to_string().contains("Nothing was written"), "{err}");
        let stored = store.keys().await.expect("keys");
        assert_eq!(stored.len(), 1, "no key written");
        assert_eq!(
            stored[0].retire_after, None,
            "the current key is not retired"
        );
        // The right secret rotates.
        rotate(&store, &kek, "hub", NOW, 300, 900, 30)
            .await
            .expect("rotate");
    }

    #[tokio::test]
    async fn a_next_key_that_cannot_be_opened_is_left_out_and_the_published_key_signs_on() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        let first = create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        // What `keys rotate` did with a wrong secret before it checked it: a next key
        // sealed under that secret, and the current key scheduled to retire.
        let wrong = Kek::from_bytes(vec![8; 32]).expect("kek");
        create_key(&store, &wrong, "hub", NOW, NOW + 300, None)
            .await
            .expect("bad next key");
        store
            .retire_key(&first.kid(), NOW + 1230)
            .await
            .expect("retire");
        let healthy = Sqlite::open_in_memory().expect("store");
        create_key(&healthy, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("key");

        for at in [NOW + 10, NOW + 5000] {
            let ring = KeyRing::load(&store, &kek, "hub", at).await.expect("load");
            assert_eq!(ring.kids(), [first.kid()], "at {at}");
            assert_eq!(ring.active(at).kid(), first.kid());
        }
        // The right secret still rotates, and the good next key takes over as usual.
        let next = rotate(&store, &kek, "hub", NOW + 5000, 300, 900, 30)
            .await
            .expect("rotate");
        let mut ring = KeyRing::load(&store, &kek, "hub", NOW + 5000)
            .await
            .expect("load");
        assert_eq!(ring.kids(), [first.kid(), next.kid()]);
        announce_published(&store, &mut ring, NOW + 5000, 300, 900, 30)
            .await
            .expect("announce");
        assert_eq!(ring.active(NOW + 5300).kid(), next.kid());
        // A published key that cannot be opened is an error, not skipped.
        assert!(matches!(
            KeyRing::load(&store, &wrong, "hub", NOW + 5000).await,
            Err(KeyError::Unseal { .. })
        ));
    }

    #[tokio::test]
    async fn the_key_set_version_changes_only_when_a_key_is_created_or_retired() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        let load = |at| {
            let (store, kek) = (&store, &kek);
            async move {
                KeyRing::load(store, kek, "hub", at)
                    .await
                    .expect("load")
                    .keyset_version()
            }
        };
        // Loading again (a hub restart, another replica) numbers the same set the same.
        let v0 = load(NOW).await;
        assert_eq!(load(NOW).await, v0);
        assert_eq!(load(NOW + 100).await, v0);
        // Two rotations in one second: two versions, each higher.
        rotate(&store, &kek, "hub", NOW + 100, 300, 900, 30)
            .await
            .expect("rotate");
        let v1 = load(NOW + 100).await;
        rotate(&store, &kek, "hub", NOW + 100, 300, 900, 30)
            .await
            .expect("rotate");
        let v2 = load(NOW + 100).await;
        assert!(v0 < v1 && v1 < v2, "{v0} {v1} {v2}");
        assert_eq!(load(NOW + 200).await, v2);
        // The first key retires (100 + 300 + 900 + 30 s after the rotation).
        let v3 = load(NOW + 1330).await;
        assert!(v3 > v2, "{v2} {v3}");
        assert_eq!(load(NOW + 2000).await, v3);
    }

    #[tokio::test]
    async fn a_key_already_retired_stays_retired_when_a_later_key_is_published() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        let first = create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        rotate(&store, &kek, "hub", NOW, 300, 900, 30)
            .await
            .expect("rotate");
        let mut ring = KeyRing::load(&store, &kek, "hub", NOW).await.expect("load");
        announce_published(&store, &mut ring, NOW, 300, 900, 30)
            .await
            .expect("announce");
        // Long after the first key retired, a second rotation is published.
        let later = NOW + 10_000;
        rotate(&store, &kek, "hub", later, 300, 900, 30)
            .await
            .expect("rotate");
        let mut ring = KeyRing::load(&store, &kek, "hub", later)
            .await
            .expect("load");
        assert!(!ring.kids().contains(&first.kid()));
        announce_published(&store, &mut ring, later, 300, 900, 30)
            .await
            .expect("announce");
        let ring = KeyRing::load(&store, &kek, "hub", later)
            .await
            .expect("load");
        assert!(
            !ring.kids().contains(&first.kid()),
            "a retired key came back into the key set"
        );
    }

    fn kids_of(set: &KeySet) -> Vec<[u8; 8]> {
        let mut kids: Vec<[u8; 8]> = set.keys().iter().map(PublicKey::kid).collect();
        kids.sort_unstable();
        kids
    }

    fn sorted(mut kids: Vec<[u8; 8]>) -> Vec<[u8; 8]> {
        kids.sort_unstable();
        kids
    }

    #[tokio::test]
    async fn the_key_set_always_holds_the_signing_key_and_then_the_keys_that_signed_live_tokens() {
        let store = Sqlite::open_in_memory().expect("store");
        let kek = Kek::from_bytes(vec![7; 32]).expect("kek");
        let first = create_key(&store, &kek, "hub", NOW, NOW, Some(NOW))
            .await
            .expect("first key");
        // Five rotations before the hub published any: six keys, more than a set holds.
        let mut next = Vec::new();
        for i in 0..5 {
            next.push(
                rotate(&store, &kek, "hub", NOW + i, 300, 900, 30)
                    .await
                    .expect("rotate"),
            );
        }
        let mut ring = KeyRing::load(&store, &kek, "hub", NOW + 10)
            .await
            .expect("load");
        assert_eq!(ring.kids().len(), 6);
        let set = ring.keyset(1, NOW + 10).expect("key set");
        // The signing key, and the oldest keys waiting to be announced; not the newest
        // four, which would leave out the key that signs the set.
        assert_eq!(
            kids_of(&set),
            sorted(vec![
                first.kid(),
                next[0].kid(),
                next[1].kid(),
                next[2].kid()
            ])
        );
        assert_eq!(ring.active(NOW + 10).kid(), first.kid());
        // Only the keys the set held count as announced: the others have not started
        // their announce period.
        assert!(
            announce_published(&store, &mut ring, NOW + 10, 300, 900, 30)
                .await
                .expect("announce")
        );
        assert_eq!(ring.unpublished(), [next[3].kid(), next[4].kid()]);

        // After the announce period the newest announced key signs. The first key signed
        // the tokens still live: it stays. The two announced with the new signer never
        // signed anything: they make room for the two keys still to announce.
        let later = NOW + 310;
        assert_eq!(ring.active(later).kid(), next[2].kid());
        assert_eq!(
            sorted(ring.published_kids(later)),
            sorted(vec![
                first.kid(),
                next[2].kid(),
                next[3].kid(),
                next[4].kid()
            ])
        );
        let set = ring.keyset(2, later).expect("key set");
        assert!(kids_of(&set).contains(&ring.active(later).kid()));
        assert!(kids_of(&set).contains(&first.kid()));
    }
}
