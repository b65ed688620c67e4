//! The hub's signed key set: which keys verifiers trust for tokens and hub messages.
//!
//! `{0: 10, 1: version, 2: issued_at, 3: [COSE_Key, ...]}`, signed by a key the receiver
//! already trusts and published retained on `tessera/v1/hub/keys`. A device starts from
//! the trust anchor it got at enrollment; the hub announces its next key in a key set
//! signed by the current one before it signs anything with the next key, and keeps the
//! old key in the set until the tokens it signed have expired. A receiver accepts a set
//! only with a higher version, so an old set cannot be replayed to bring back a retired
//! key.

use crate::cbor::{Reader, SeenKeys};
use crate::cose::{self, Sign1};
use crate::crypto::{KeyLookup, PublicKey, Signer, Verifier};
use crate::error::{CapacityError, DecodeError, Error};
use crate::message::{MessageType, read_type};

/// Most keys in one key set (current, next, and retiring ones).
pub const MAX_KEYS: usize = 4;

/// A bounded set of trusted hub keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    version: u64,
    issued_at: u64,
    keys: heapless::Vec<PublicKey, MAX_KEYS>,
}

/// What [`KeySet::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySetOutcome {
    /// The new set replaced the old one.
    Updated,
    /// The set was not newer than the one held; nothing changed.
    NotNewer,
}

impl KeySet {
    /// A set holding only the trust anchor, at version 0.
    pub fn from_anchor(anchor: PublicKey) -> Self {
        let mut keys = heapless::Vec::new();
        // A fresh Vec with MAX_KEYS >= 1 always has room for one key.
        let _ = keys.push(anchor);
        Self {
            version: 0,
            issued_at: 0,
            keys,
        }
    }

    /// A set of `keys` at `version`, as the hub publishes it.
    pub fn new(version: u64, issued_at: u64, keys: &[PublicKey]) -> Result<Self, Error> {
        Ok(Self {
            version,
            issued_at,
            keys: heapless::Vec::from_slice(keys).map_err(|_| CapacityError::Keys)?,
        })
    }

    /// The set's version; higher replaces lower.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the hub published it, Unix seconds.
    pub fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Writes the payload map into `out`; returns its length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        w.map(4)?
            .u8(0)?
            .u64(MessageType::KeySet.as_u64())?
            .u8(1)?
            .u64(self.version)?
            .u8(2)?
            .u64(self.issued_at)?
            .u8(3)?
            .array(self.keys.len() as u64)?;
        for k in &self.keys {
            k.encode(&mut w)?;
        }
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a payload map strictly. A set must hold at least one key.
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::KeySet, 3)?;
        let mut seen = SeenKeys::default();
        let (mut version, mut issued_at, mut keys) = (None, None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                1 => version = Some(r.uint()?),
                2 => issued_at = Some(r.uint()?),
                3 => {
                    let count = r.array(MAX_KEYS)?;
                    if count == 0 {
                        return Err(DecodeError::InvalidValue("keys").into());
                    }
                    let mut v = heapless::Vec::<PublicKey, MAX_KEYS>::new();
                    for _ in 0..count {
                        v.push(PublicKey::decode(&mut r)?)
                            .map_err(|_| CapacityError::Keys)?;
                    }
                    keys = Some(v);
                }
                _ => return Err(DecodeError::InvalidValue("key set key").into()),
            }
        }
        r.finish()?;
        Ok(Self {
            version: version.ok_or(DecodeError::MissingField("version"))?,
            issued_at: issued_at.ok_or(DecodeError::MissingField("issued_at"))?,
            keys: keys.ok_or(DecodeError::MissingField("keys"))?,
        })
    }

    /// Signs the set with one of the hub's keys into `out`; returns the length.
    pub fn sign(&self, signer: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
        cose::sign_with(signer, out, |buf| self.encode_to(buf))
    }

    /// Replaces this set with a signed newer one, if a key of this set signed it.
    pub fn update(&mut self, signed: &[u8]) -> Result<KeySetOutcome, Error> {
        let payload = Sign1::decode(signed)?.verify(self)?;
        let next = Self::decode(payload)?;
        if next.version <= self.version {
            return Ok(KeySetOutcome::NotNewer);
        }
        *self = next;
        Ok(KeySetOutcome::Updated)
    }
}

impl KeyLookup for KeySet {
    fn verifier(&self, kid: &[u8]) -> Option<&dyn Verifier> {
        self.keys
            .iter()
            .find(|k| k.kid() == kid)
            .map(|k| k as &dyn Verifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testing::signer;
    use crate::error::SignatureError;

    #[test]
    fn rotation_adds_the_next_key_only_through_a_trusted_signature() {
        let (current, next) = (signer(1), signer(2));
        let mut device = KeySet::from_anchor(current.public_key());
        let set = KeySet::new(1, 100, &[current.public_key(), next.public_key()]).expect("fits");
        let mut out = [0u8; 512];
        let n = set.sign(&current, &mut out).expect("sign");
        assert_eq!(device.update(&out[..n]), Ok(KeySetOutcome::Updated));
        assert!(device.verifier(&next.kid()).is_some());

        // The next key can now publish a set that retires the first.
        let set2 = KeySet::new(2, 200, &[next.public_key()]).expect("fits");
        let n2 = set2.sign(&next, &mut out).expect("sign");
        assert_eq!(device.update(&out[..n2]), Ok(KeySetOutcome::Updated));
        assert!(device.verifier(&current.kid()).is_none());
    }

    #[test]
    fn an_untrusted_signer_cannot_change_the_set() {
        let mut device = KeySet::from_anchor(signer(1).public_key());
        let evil = KeySet::new(9, 100, &[signer(3).public_key()]).expect("fits");
        let mut out = [0u8; 512];
        let n = evil.sign(&signer(3), &mut out).expect("sign");
        assert_eq!(
            device.update(&out[..n]),
            Err(SignatureError::UnknownKey.into())
        );
        assert_eq!(device.version(), 0);
    }

    #[test]
    fn an_older_set_is_not_replayed() {
        let k = signer(1);
        let mut device = KeySet::from_anchor(k.public_key());
        let mut out = [0u8; 512];
        let v2 = KeySet::new(2, 100, &[k.public_key()]).expect("fits");
        let n = v2.sign(&k, &mut out).expect("sign");
        assert_eq!(device.update(&out[..n]), Ok(KeySetOutcome::Updated));
        let v1 = KeySet::new(1, 50, &[k.public_key(), signer(4).public_key()]).expect("fits");
        let n = v1.sign(&k, &mut out).expect("sign");
        assert_eq!(device.update(&out[..n]), Ok(KeySetOutcome::NotNewer));
        assert_eq!(device.keys().len(), 1);
    }

    #[test]
    fn an_empty_set_is_refused() {
        let mut out = [0u8; 64];
        let n = KeySet::new(1, 1, &[])
            .expect("ok")
            .encode_to(&mut out)
            .expect("enc");
        assert_eq!(
            KeySet::decode(&out[..n]),
            Err(DecodeError::InvalidValue("keys").into())
        );
    }
}
