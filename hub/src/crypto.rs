//! The hub's ES256 backend: aws-lc-rs behind the core's [`Signer`] and [`Verifier`]
//! traits, for everything the hub signs (tokens, responses, pages, heartbeats, key sets,
//! control messages) and for checking the signatures of clients' requests.
//!
//! Devices keep the core's RustCrypto `p256` backend; both produce and accept the same
//! bytes (raw `r‖s`, SHA-256 over the concatenated message), so nothing above the traits
//! changes. Two differences, neither visible on the wire:
//!
//! - aws-lc-rs signatures are randomized, not RFC 6979: signing the same message twice gives
//!   two different valid signatures. The protocol never relies on deterministic signatures.
//! - Either half of the group order may come out as `s`. The core writes every signature
//!   through `cose::sign_with`, which normalises it to low `s`, and hashes tokens in that
//!   canonical form (`revocation::token_hash`), so a token the hub issues is still hashed
//!   by its exact bytes. Both verifiers accept either `s`, as the core's does.
//!
//! The message reaches the traits as a list of slices; it is hashed part by part into one
//! SHA-256 digest and the digest signed or verified, so a large message (a 1 MiB revoke
//! request, a 16 KiB page) is never copied into one buffer.

use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    ParsedPublicKey,
};
use tessera_shared::Error;
use tessera_shared::crypto::{
    KeyLookup, Kid, PublicKey, SIGNATURE_LEN, Signature, Signer, Verifier,
};
use tessera_shared::error::SignatureError;
use zeroize::Zeroizing;

/// SHA-256 over the concatenation of `message`, as aws-lc-rs takes it.
fn digest(message: &[&[u8]]) -> Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in message {
        ctx.update(part);
    }
    ctx.finish()
}

/// RFC 5915 `ECPrivateKey` of a P-256 scalar, without the optional public key (aws-lc
/// computes it): `SEQUENCE { INTEGER 1, OCTET STRING d, [0] OID prime256v1 }`.
const EC_PRIVATE_KEY_PREFIX: [u8; 7] = [0x30, 0x31, 0x02, 0x01, 0x01, 0x04, 0x20];
const EC_PRIVATE_KEY_SUFFIX: [u8; 12] = [
    0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
];
const EC_PRIVATE_KEY_LEN: usize = EC_PRIVATE_KEY_PREFIX.len() + 32 + EC_PRIVATE_KEY_SUFFIX.len();

/// A P-256 public key ready for aws-lc-rs to verify with: a client's registered key for
/// its requests, or one of the hub's own keys.
///
/// Built from the core's [`PublicKey`] (the point is validated there, as for every key the
/// hub handles) and parsed once by aws-lc-rs.
#[derive(Clone)]
pub struct AwsLcVerifier {
    public: PublicKey,
    kid: Kid,
    parsed: ParsedPublicKey,
}

impl std::fmt::Debug for AwsLcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsLcVerifier")
            .field("kid", &hex::encode(self.kid))
            .finish_non_exhaustive()
    }
}

impl AwsLcVerifier {
    /// A verifier for `key`.
    pub fn new(key: &PublicKey) -> Result<Self, Error> {
        let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.to_sec1())
            .map_err(|_| SignatureError::InvalidKey)?;
        Ok(Self {
            public: *key,
            kid: key.kid(),
            parsed,
        })
    }

    /// A verifier for a key in SEC1 encoding (compressed or uncompressed), as the store
    /// keeps a client's registered key. Fails with
    /// [`SignatureError::InvalidKey`] if it is not a point on P-256.
    pub fn from_sec1(sec1: &[u8]) -> Result<Self, Error> {
        Self::new(&PublicKey::from_sec1(sec1)?)
    }

    /// The key, as the core's type.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The key's identifier.
    pub fn kid(&self) -> Kid {
        self.kid
    }
}

impl Verifier for AwsLcVerifier {
    fn verify(&self, message: &[&[u8]], signature: &Signature) -> Result<(), Error> {
        self.parsed
            .verify_digest_sig(&digest(message), &signature.0)
            .map_err(|_| SignatureError::Invalid.into())
    }
}

impl KeyLookup for AwsLcVerifier {
    fn verifier(&self, kid: &[u8]) -> Option<&dyn Verifier> {
        (kid == self.kid).then_some(self as &dyn Verifier)
    }
}

/// The verifier the request pipeline checks a client's request with: its registered key,
/// in the SEC1 encoding the store keeps. Same as [`AwsLcVerifier::from_sec1`].
pub fn request_verifier(sec1: &[u8]) -> Result<AwsLcVerifier, Error> {
    AwsLcVerifier::from_sec1(sec1)
}

/// A P-256 private key signing with aws-lc-rs: the hub's signing keys.
///
/// It also verifies with its own public key, so the hub checks its own messages (echoed
/// back by the broker) with the same backend.
pub struct AwsLcSigner {
    key: EcdsaKeyPair,
    verifier: AwsLcVerifier,
}

impl std::fmt::Debug for AwsLcSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsLcSigner")
            .field("kid", &hex::encode(self.verifier.kid))
            .finish_non_exhaustive()
    }
}

impl AwsLcSigner {
    /// Builds a signer from a 32-byte big-endian scalar; fails with
    /// [`SignatureError::InvalidKey`] if it is zero or not below the group order.
    pub fn from_scalar(secret: &[u8; 32]) -> Result<Self, Error> {
        let mut der = Zeroizing::new([0u8; EC_PRIVATE_KEY_LEN]);
        let (prefix, rest) = der.split_at_mut(EC_PRIVATE_KEY_PREFIX.len());
        let (scalar, suffix) = rest.split_at_mut(32);
        prefix.copy_from_slice(&EC_PRIVATE_KEY_PREFIX);
        scalar.copy_from_slice(secret);
        suffix.copy_from_slice(&EC_PRIVATE_KEY_SUFFIX);
        let key = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &*der)
            .map_err(|_| SignatureError::InvalidKey)?;
        Self::from_key_pair(key)
    }

    /// Builds a signer from a scalar and the public key it should have (uncompressed
    /// SEC1, as the store keeps it); fails if they do not belong together.
    pub fn from_scalar_and_public_key(secret: &[u8; 32], sec1: &[u8]) -> Result<Self, Error> {
        let key = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            secret,
            sec1,
        )
        .map_err(|_| SignatureError::InvalidKey)?;
        Self::from_key_pair(key)
    }

    fn from_key_pair(key: EcdsaKeyPair) -> Result<Self, Error> {
        let verifier = AwsLcVerifier::from_sec1(key.public_key().as_ref())?;
        Ok(Self { key, verifier })
    }

    /// A new key from the OS random number generator (the same draw as the core's keys:
    /// 32 random bytes, drawn again in the negligible case they are not a valid scalar).
    pub fn generate() -> Result<Self, getrandom::Error> {
        loop {
            let mut scalar = Zeroizing::new([0u8; 32]);
            getrandom::fill(scalar.as_mut())?;
            if let Ok(signer) = Self::from_scalar(&scalar) {
                return Ok(signer);
            }
        }
    }

    /// The 32-byte secret scalar, for sealing the key. Handle with care.
    pub fn to_scalar(&self) -> Result<Zeroizing<[u8; 32]>, Error> {
        // aws-lc-rs zeroes its own copy when it is dropped.
        let bin = self
            .key
            .private_key()
            .as_be_bytes()
            .map_err(|_| SignatureError::InvalidKey)?;
        let mut scalar = Zeroizing::new([0u8; 32]);
        let bytes: &[u8] = bin.as_ref();
        if bytes.len() != 32 {
            return Err(SignatureError::InvalidKey.into());
        }
        scalar.copy_from_slice(bytes);
        Ok(scalar)
    }

    /// A verifier for this key's public half.
    pub fn verifier(&self) -> &AwsLcVerifier {
        &self.verifier
    }
}

impl Signer for AwsLcSigner {
    fn kid(&self) -> Kid {
        self.verifier.kid
    }

    fn public_key(&self) -> PublicKey {
        self.verifier.public
    }

    fn sign(&self, message: &[&[u8]]) -> Result<Signature, Error> {
        let sig = self
            .key
            .sign_digest(&digest(message))
            .map_err(|_| SignatureError::SigningFailed)?;
        let mut out = [0u8; SIGNATURE_LEN];
        let bytes = sig.as_ref();
        if bytes.len() != SIGNATURE_LEN {
            return Err(SignatureError::SigningFailed.into());
        }
        out.copy_from_slice(bytes);
        Ok(Signature(out))
    }
}

impl Verifier for AwsLcSigner {
    fn verify(&self, message: &[&[u8]], signature: &Signature) -> Result<(), Error> {
        self.verifier.verify(message, signature)
    }
}

#[cfg(test)]
mod tests;
