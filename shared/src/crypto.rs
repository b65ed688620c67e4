//! Signing and verification behind two small traits, and the P-256 key types.
//!
//! The core only ever signs and verifies ES256 (ECDSA P-256 with SHA-256, raw `r‖s`
//! signatures). [`Signer`] and [`Verifier`] take the message as a list of slices, so COSE
//! can feed the `Sig_structure` piece by piece without a buffer; a backend that needs one
//! contiguous message (aws-lc-rs, ring) concatenates them itself. The RustCrypto `p256`
//! backend here is the one firmware uses; the hub may plug in a faster one.

use p256::ecdsa::signature::{MultipartSigner, MultipartVerifier};
use sha2::{Digest, Sha256};

use crate::cbor::{Reader, SeenKeys, Writer};
use crate::error::{DecodeError, Error, SignatureError};

/// Length of an ES256 signature: `r‖s`, 32 bytes each.
pub const SIGNATURE_LEN: usize = 64;

/// Length of a key identifier: the first bytes of the RFC 9679 COSE Key Thumbprint.
pub const KID_LEN: usize = 8;

/// COSE algorithm identifier of ES256.
pub const ALG_ES256: i64 = -7;

/// A key identifier, as carried in the COSE `kid` header.
pub type Kid = [u8; KID_LEN];

/// An ES256 signature, `r‖s`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl core::fmt::Debug for Signature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Signature(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Produces ES256 signatures with one private key.
pub trait Signer {
    /// The identifier of this key, as verifiers will look it up.
    fn kid(&self) -> Kid;
    /// The public half of this key.
    fn public_key(&self) -> PublicKey;
    /// Signs the concatenation of `message` (SHA-256, then ECDSA P-256).
    fn sign(&self, message: &[&[u8]]) -> Result<Signature, Error>;
}

/// Checks ES256 signatures made by one key.
pub trait Verifier {
    /// Verifies `signature` over the concatenation of `message`.
    fn verify(&self, message: &[&[u8]], signature: &Signature) -> Result<(), Error>;
}

/// Finds the verifier for a `kid`: a key set, a single trust anchor, a registry.
pub trait KeyLookup {
    /// The verifier for `kid`, if the caller trusts such a key.
    fn verifier(&self, kid: &[u8]) -> Option<&dyn Verifier>;
}

/// A P-256 public key; always a valid curve point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    key: p256::ecdsa::VerifyingKey,
}

impl core::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PublicKey(kid=")?;
        for b in self.kid() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

// COSE_Key labels and values (RFC 9052 §7, RFC 9053 §7.1).
const KEY_KTY: i64 = 1;
const KEY_KID: i64 = 2;
const KEY_ALG: i64 = 3;
const KEY_CRV: i64 = -1;
const KEY_X: i64 = -2;
const KEY_Y: i64 = -3;
const KEY_D: i64 = -4;
const KTY_EC2: i64 = 2;
const CRV_P256: i64 = 1;

/// Encoded size of a COSE_Key as [`PublicKey::encode`] writes it (with a kid).
pub const COSE_KEY_LEN: usize = 1 + 2 + (2 + KID_LEN) + 2 + 2 + 2 * (3 + 32);

impl PublicKey {
    /// Builds a key from its affine coordinates; fails if they are not a point on P-256.
    pub fn from_coordinates(x: &[u8; 32], y: &[u8; 32]) -> Result<Self, Error> {
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..33].copy_from_slice(x);
        sec1[33..].copy_from_slice(y);
        Self::from_sec1(&sec1)
    }

    /// Builds a key from its SEC1 encoding (compressed or uncompressed).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, Error> {
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
            .map_err(|_| SignatureError::InvalidKey)?;
        Ok(Self { key })
    }

    /// The uncompressed SEC1 encoding, `0x04‖x‖y`.
    pub fn to_sec1(&self) -> [u8; 65] {
        let point = self.key.to_sec1_point(false);
        let mut out = [0u8; 65];
        out.copy_from_slice(point.as_bytes());
        out
    }

    /// The x and y coordinates.
    pub fn coordinates(&self) -> ([u8; 32], [u8; 32]) {
        let sec1 = self.to_sec1();
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        x.copy_from_slice(&sec1[1..33]);
        y.copy_from_slice(&sec1[33..]);
        (x, y)
    }

    /// The RFC 9679 COSE Key Thumbprint: SHA-256 over the deterministic encoding of the
    /// required parameters `{1: 2, -1: 1, -2: x, -3: y}`.
    pub fn thumbprint(&self) -> [u8; 32] {
        let (x, y) = self.coordinates();
        let mut h = Sha256::new();
        // {1: 2, -1: 1, -2: h'x', -3: h'y'} in core deterministic order.
        h.update([0xa4, 0x01, 0x02, 0x20, 0x01, 0x21, 0x58, 0x20]);
        h.update(x);
        h.update([0x22, 0x58, 0x20]);
        h.update(y);
        h.finalize().into()
    }

    /// The key identifier: the first [`KID_LEN`] bytes of [`thumbprint`](Self::thumbprint).
    pub fn kid(&self) -> Kid {
        let mut kid = [0u8; KID_LEN];
        kid.copy_from_slice(&self.thumbprint()[..KID_LEN]);
        kid
    }

    /// Writes the key as a COSE_Key map `{1: 2, 2: kid, 3: -7, -1: 1, -2: x, -3: y}`.
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        let (x, y) = self.coordinates();
        w.map(6)?
            .i64(KEY_KTY)?
            .i64(KTY_EC2)?
            .i64(KEY_KID)?
            .bytes(&self.kid())?
            .i64(KEY_ALG)?
            .i64(ALG_ES256)?
            .i64(KEY_CRV)?
            .i64(CRV_P256)?
            .i64(KEY_X)?
            .bytes(&x)?
            .i64(KEY_Y)?
            .bytes(&y)?;
        Ok(())
    }

    /// Writes the key as a standalone COSE_Key into `out`; returns the length written.
    pub fn to_cose_key(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        self.encode(&mut w)?;
        Ok(crate::cbor::written(&w))
    }

    /// Reads a COSE_Key; see [`from_cose_key`](Self::from_cose_key) for what is accepted.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let n = r.map(8)?;
        let mut seen = SeenKeys::default();
        let (mut x, mut y) = (None, None);
        let mut kid: Option<Kid> = None;
        for _ in 0..n {
            let label = r.key()?;
            seen.insert(label)?;
            match label {
                KEY_KTY if r.int()? != KTY_EC2 => {
                    return Err(DecodeError::InvalidValue("COSE_Key kty").into());
                }
                KEY_CRV if r.int()? != CRV_P256 => {
                    return Err(DecodeError::InvalidValue("COSE_Key crv").into());
                }
                KEY_ALG if r.int()? != ALG_ES256 => {
                    return Err(SignatureError::UnsupportedAlgorithm.into());
                }
                KEY_KTY | KEY_CRV | KEY_ALG => {}
                KEY_KID => kid = Some(r.bytes_exact::<KID_LEN>("COSE_Key kid")?),
                KEY_X => x = Some(r.bytes_exact::<32>("COSE_Key x")?),
                KEY_Y => y = Some(r.bytes_exact::<32>("COSE_Key y")?),
                // A private key has no business on the wire: refuse it rather than
                // silently ignore a leaked secret.
                KEY_D => return Err(DecodeError::InvalidValue("COSE_Key d (private key)").into()),
                _ => r.skip()?,
            }
        }
        if !seen.contains(KEY_KTY) {
            return Err(DecodeError::MissingField("COSE_Key kty").into());
        }
        if !seen.contains(KEY_CRV) {
            return Err(DecodeError::MissingField("COSE_Key crv").into());
        }
        let x = x.ok_or(DecodeError::MissingField("COSE_Key x"))?;
        let y = y.ok_or(DecodeError::MissingField("COSE_Key y"))?;
        let key = Self::from_coordinates(&x, &y)?;
        if kid.is_some_and(|kid| kid != key.kid()) {
            return Err(DecodeError::InvalidValue("COSE_Key kid").into());
        }
        Ok(key)
    }

    /// Decodes one COSE_Key: EC2 (`kty` 2) on P-256 (`crv` 1) with `x` and `y`; `alg`, if
    /// present, must be ES256 and `kid`, if present, must equal the key's own thumbprint
    /// prefix. Other labels are ignored. Nothing may follow the map.
    pub fn from_cose_key(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let key = Self::decode(&mut r)?;
        r.finish()?;
        Ok(key)
    }
}

impl Verifier for PublicKey {
    fn verify(&self, message: &[&[u8]], signature: &Signature) -> Result<(), Error> {
        let sig = p256::ecdsa::Signature::from_slice(&signature.0)
            .map_err(|_| SignatureError::Invalid)?;
        self.key
            .multipart_verify(message, &sig)
            .map_err(|_| SignatureError::Invalid.into())
    }
}

impl KeyLookup for PublicKey {
    fn verifier(&self, kid: &[u8]) -> Option<&dyn Verifier> {
        (kid == self.kid()).then_some(self as &dyn Verifier)
    }
}

/// A P-256 private key with the RustCrypto backend (deterministic RFC 6979 signatures).
pub struct P256Signer {
    key: p256::ecdsa::SigningKey,
    public: PublicKey,
}

impl core::fmt::Debug for P256Signer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("P256Signer")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl P256Signer {
    /// Builds a signer from a 32-byte big-endian scalar; fails if it is zero or not below
    /// the group order. Callers generate it from their own RNG.
    pub fn from_scalar(secret: &[u8; 32]) -> Result<Self, Error> {
        let key =
            p256::ecdsa::SigningKey::from_slice(secret).map_err(|_| SignatureError::InvalidKey)?;
        let public = PublicKey {
            key: *key.verifying_key(),
        };
        Ok(Self { key, public })
    }

    /// The 32-byte secret scalar, for storing the key. Handle with care.
    pub fn to_scalar(&self) -> [u8; 32] {
        self.key.to_bytes().into()
    }
}

impl Signer for P256Signer {
    fn kid(&self) -> Kid {
        self.public.kid()
    }

    fn public_key(&self) -> PublicKey {
        self.public
    }

    fn sign(&self, message: &[&[u8]]) -> Result<Signature, Error> {
        let sig: p256::ecdsa::Signature = self
            .key
            .try_multipart_sign(message)
            .map_err(|_| SignatureError::SigningFailed)?;
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(&sig.to_bytes());
        Ok(Signature(out))
    }
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Deterministic keys for unit tests.
    use super::P256Signer;

    /// A signer whose scalar is `seed` repeated (valid for small seeds).
    pub(crate) fn signer(seed: u8) -> P256Signer {
        let mut s = [seed; 32];
        s[0] = 0x01;
        P256Signer::from_scalar(&s).expect("valid test scalar")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::signer;
    use super::*;

    #[test]
    fn signature_verifies_regardless_of_how_the_message_is_split() {
        let s = signer(7);
        let sig = s.sign(&[b"hello ", b"world"]).expect("sign");
        assert!(s.public_key().verify(&[b"hello world"], &sig).is_ok());
        assert!(s.public_key().verify(&[b"hello", b" world"], &sig).is_ok());
        assert_eq!(
            s.public_key().verify(&[b"hello world!"], &sig),
            Err(SignatureError::Invalid.into())
        );
    }

    #[test]
    fn another_keys_signature_is_refused() {
        let sig = signer(7).sign(&[b"m"]).expect("sign");
        assert!(signer(8).public_key().verify(&[b"m"], &sig).is_err());
    }

    #[test]
    fn cose_key_round_trips_and_kid_is_checked() {
        let k = signer(3).public_key();
        let mut buf = [0u8; COSE_KEY_LEN];
        let n = k.to_cose_key(&mut buf).expect("encode");
        assert_eq!(n, COSE_KEY_LEN);
        assert_eq!(PublicKey::from_cose_key(&buf[..n]), Ok(k));
        // Flip one kid byte: the kid no longer matches the key.
        let kid_at = buf[..n]
            .windows(2)
            .position(|w| w == [0x02, 0x48])
            .expect("kid")
            + 2;
        buf[kid_at] ^= 1;
        assert_eq!(
            PublicKey::from_cose_key(&buf[..n]),
            Err(DecodeError::InvalidValue("COSE_Key kid").into())
        );
    }

    #[test]
    fn point_off_the_curve_is_refused() {
        let (x, mut y) = signer(3).public_key().coordinates();
        y[31] ^= 1;
        assert_eq!(
            PublicKey::from_coordinates(&x, &y),
            Err(SignatureError::InvalidKey.into())
        );
    }
}
