//! COSE_Sign1 (RFC 9052 §4.2) with ES256 only: strict decoding and signing into a
//! caller's buffer.
//!
//! Accepted shape, and nothing else:
//! `[optional tag 61] [optional tag 18] [protected: bstr .cbor {1: -7, 4: kid, ...},
//! unprotected: {}, payload: bstr, signature: bstr .size 64]`.
//! The algorithm must be ES256 and sit in the protected header; the unprotected header
//! must be empty, so nothing security-relevant can be changed without breaking the
//! signature; any `crit` header is refused because the core understands no extension.
//! The same envelope carries tokens and every signed protocol message.

use crate::cbor::{Head, Reader, SeenKeys};
use crate::crypto::{ALG_ES256, KID_LEN, KeyLookup, SIGNATURE_LEN, Signature, Signer, Verifier};
use crate::error::{DecodeError, EncodeError, Error, SignatureError};

/// Largest COSE_Sign1 the core decodes, in bytes: the protocol's message limit. Revocation
/// lists of any size travel as pages within it.
pub const MAX_SIGN1_LEN: usize = 16 * 1024;

/// Largest signed request the hub decodes, in bytes: a `revoke` naming up to
/// [`MAX_REVOKE_LIST`](crate::message::MAX_REVOKE_LIST) devices in one request. Only the hub
/// decodes requests, so devices never need a buffer this large; the hub refuses any other
/// request above its own, much smaller limit.
pub const MAX_REQUEST_LEN: usize = 1024 * 1024;

/// Largest protected header accepted, in bytes.
pub const MAX_PROTECTED_LEN: usize = 64;

/// Longest `kid` accepted in a protected header.
pub const MAX_KID_LEN: usize = 32;

/// CBOR tag of COSE_Sign1.
pub const TAG_COSE_SIGN1: u64 = 18;

/// CBOR tag of a CWT (RFC 8392 §6).
pub const TAG_CWT: u64 = 61;

// Header labels (RFC 9052 §3.1).
const HDR_ALG: i64 = 1;
const HDR_CRIT: i64 = 2;
const HDR_KID: i64 = 4;

/// Bytes [`sign`] adds around the payload: tag, array head, protected header, empty
/// unprotected header, the payload's bstr head (at most 5 bytes) and the signature.
pub const OVERHEAD: usize = PREFIX_LEN + 5 + 2 + SIGNATURE_LEN;

/// `d2 84 4d {a2 01 26 04 48 <kid>} a0`: tag 18, array(4), protected bstr, empty map.
const PREFIX_LEN: usize = 3 + PROTECTED_LEN + 1;

/// `{1: -7, 4: h'<kid>'}`: map head, alg label and value, kid label, bstr head, kid.
const PROTECTED_LEN: usize = 5 + KID_LEN;

// The one-byte bstr heads below hold lengths up to 23.
const _: () = assert!(PROTECTED_LEN <= 23 && KID_LEN <= 23 && SIGNATURE_LEN <= 255);

/// The first item of every `Sig_structure`: `["Signature1", ...]` as array(4) + text.
const SIG_STRUCTURE_PREFIX: &[u8] = b"\x84\x6aSignature1";

/// A decoded COSE_Sign1 whose signature has not been checked yet.
///
/// The only way to reach the payload is [`verify`](Self::verify), so an unverified payload
/// cannot be used by mistake.
#[derive(Debug, Clone, Copy)]
pub struct Sign1<'a> {
    protected: &'a [u8],
    kid: &'a [u8],
    payload: &'a [u8],
    signature: Signature,
}

impl<'a> Sign1<'a> {
    /// Decodes a COSE_Sign1 of at most [`MAX_SIGN1_LEN`] bytes strictly (see the module
    /// documentation).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        Self::decode_within(bytes, MAX_SIGN1_LEN)
    }

    /// Like [`decode`](Self::decode), with another size limit (requests: see
    /// [`MAX_REQUEST_LEN`]).
    pub fn decode_within(bytes: &'a [u8], limit: usize) -> Result<Self, Error> {
        if bytes.len() > limit {
            return Err(DecodeError::TooLarge.into());
        }
        let mut r = Reader::new(bytes);
        let mut tag = r.tag()?;
        if tag == Some(TAG_CWT) {
            tag = r.tag()?;
        }
        if let Some(t) = tag.filter(|t| *t != TAG_COSE_SIGN1) {
            return Err(DecodeError::UnexpectedTag(t).into());
        }
        r.array_exact(4)?;
        let protected = r.bytes(MAX_PROTECTED_LEN)?;
        let kid = decode_protected(protected)?;
        if r.map(usize::MAX)? != 0 {
            return Err(DecodeError::UnprotectedHeaderNotEmpty.into());
        }
        let payload = r.bytes(limit)?;
        let signature = Signature(r.bytes_exact::<SIGNATURE_LEN>("signature")?);
        r.finish()?;
        Ok(Self {
            protected,
            kid,
            payload,
            signature,
        })
    }

    /// The key identifier from the protected header.
    pub fn kid(&self) -> &'a [u8] {
        self.kid
    }

    /// The payload before its signature is checked: only for finding which key to check it
    /// with (the sender's id in a request) and never to act on.
    pub(crate) fn unverified_payload(&self) -> &'a [u8] {
        self.payload
    }

    /// SHA-256 over the canonical encoding of this message: tag 18, shortest heads, empty
    /// unprotected header, low-`s` signature — exactly the bytes [`sign`] produces.
    ///
    /// The decoder accepts a few re-encodings of one signed message (without the tag, with
    /// tag 61, with a high-`s` signature that still verifies), and each would hash
    /// differently. Hashing the canonical form gives every encoding of the same signed
    /// token one name, so a revocation by token hash cannot be dodged by re-encoding.
    pub fn canonical_hash(&self) -> [u8; 32] {
        let protected_head = Head::bytes(self.protected.len());
        let payload_head = Head::bytes(self.payload.len());
        let signature = low_s(self.signature);
        crate::crypto::sha256(&[
            &[0xd2, 0x84],
            protected_head.as_slice(),
            self.protected,
            &[0xa0],
            payload_head.as_slice(),
            self.payload,
            &[0x58, SIGNATURE_LEN_U8],
            &signature.0,
        ])
    }

    /// Verifies the signature with the key `keys` holds for [`kid`](Self::kid) and returns
    /// the now authenticated payload.
    pub fn verify(&self, keys: &dyn KeyLookup) -> Result<&'a [u8], Error> {
        let verifier = keys.verifier(self.kid).ok_or(SignatureError::UnknownKey)?;
        self.verify_with(verifier)
    }

    /// Verifies the signature with one given key and returns the payload.
    pub fn verify_with(&self, verifier: &dyn Verifier) -> Result<&'a [u8], Error> {
        let protected_head = Head::bytes(self.protected.len());
        let payload_head = Head::bytes(self.payload.len());
        verifier.verify(
            &[
                SIG_STRUCTURE_PREFIX,
                protected_head.as_slice(),
                self.protected,
                &[0x40], // external_aad: empty bstr
                payload_head.as_slice(),
                self.payload,
            ],
            &self.signature,
        )?;
        Ok(self.payload)
    }
}

/// `SIGNATURE_LEN` as the byte of its bstr head.
const SIGNATURE_LEN_U8: u8 = 64;
const _: () = assert!(SIGNATURE_LEN_U8 as usize == SIGNATURE_LEN);

/// The same signature with `s` in the lower half of the group order. `(r, s)` and
/// `(r, n - s)` both verify; producing and hashing only one of them keeps a signed message
/// from having two valid encodings. A signature that is not even well-formed is returned
/// as it is (it never verifies).
fn low_s(signature: Signature) -> Signature {
    match p256::ecdsa::Signature::from_slice(&signature.0) {
        Ok(sig) => {
            let mut out = [0u8; SIGNATURE_LEN];
            out.copy_from_slice(&sig.normalize_s().to_bytes());
            Signature(out)
        }
        Err(_) => signature,
    }
}

/// Parses the protected header map and returns the `kid`.
fn decode_protected(protected: &[u8]) -> Result<&[u8], Error> {
    let mut r = Reader::new(protected);
    let n = r.map(8)?;
    let mut seen = SeenKeys::default();
    let mut alg = None;
    let mut kid = None;
    for _ in 0..n {
        let label = r.key()?;
        seen.insert(label)?;
        match label {
            HDR_ALG => alg = Some(r.int()?),
            HDR_KID => kid = Some(r.bytes(MAX_KID_LEN)?),
            HDR_CRIT => return Err(DecodeError::UnknownCriticalHeader.into()),
            // Other headers (content type, ...) are not critical and carry nothing the
            // core acts on.
            _ => r.skip()?,
        }
    }
    r.finish()?;
    match alg {
        Some(ALG_ES256) => {}
        Some(_) => return Err(SignatureError::UnsupportedAlgorithm.into()),
        None => return Err(DecodeError::MissingField("alg").into()),
    }
    kid.ok_or(DecodeError::MissingField("kid").into())
}

/// Signs a payload that a closure writes, producing a tagged COSE_Sign1 in `out`.
///
/// `write_payload` gets the space after the envelope's head and returns how many bytes of
/// payload it wrote. Returns the length of the whole COSE_Sign1.
// The casts of the fixed lengths to u8 are checked by the assertion above.
#[allow(clippy::cast_possible_truncation)]
pub fn sign_with(
    signer: &dyn Signer,
    out: &mut [u8],
    write_payload: impl FnOnce(&mut [u8]) -> Result<usize, Error>,
) -> Result<usize, Error> {
    let kid = signer.kid();
    if out.len() < OVERHEAD {
        return Err(EncodeError::BufferTooSmall.into());
    }
    out[0] = 0xd2; // tag 18
    out[1] = 0x84; // array(4)
    out[2] = 0x40 | PROTECTED_LEN as u8; // bstr: the protected header below
    out[3..7].copy_from_slice(&[0xa2, 0x01, 0x26, 0x04]); // {1: -7, 4: ...
    out[7] = 0x40 | KID_LEN as u8;
    out[8..8 + KID_LEN].copy_from_slice(&kid);
    out[PREFIX_LEN - 1] = 0xa0; // unprotected: {}

    // Write the payload after room for its longest head, then close the gap.
    let reserved = PREFIX_LEN + 5;
    let tail = SIGNATURE_LEN + 2;
    let room = out.len() - reserved - tail;
    let n = write_payload(&mut out[reserved..reserved + room])?;
    if n > room {
        return Err(EncodeError::BufferTooSmall.into());
    }
    let head = Head::bytes(n);
    let payload_at = PREFIX_LEN + head.as_slice().len();
    out[PREFIX_LEN..payload_at].copy_from_slice(head.as_slice());
    out.copy_within(reserved..reserved + n, payload_at);
    let end = payload_at + n;

    let protected = &out[3..3 + PROTECTED_LEN];
    let protected_head = Head::bytes(protected.len());
    let signature = low_s(signer.sign(&[
        SIG_STRUCTURE_PREFIX,
        protected_head.as_slice(),
        protected,
        &[0x40],
        head.as_slice(),
        &out[payload_at..end],
    ])?);
    out[end] = 0x58;
    out[end + 1] = SIGNATURE_LEN as u8;
    out[end + 2..end + 2 + SIGNATURE_LEN].copy_from_slice(&signature.0);
    Ok(end + 2 + SIGNATURE_LEN)
}

/// Signs an already encoded payload; returns the length of the COSE_Sign1 in `out`.
pub fn sign(signer: &dyn Signer, payload: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    sign_with(signer, out, |buf| {
        let dst = buf
            .get_mut(..payload.len())
            .ok_or(EncodeError::BufferTooSmall)?;
        dst.copy_from_slice(payload);
        Ok(payload.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testing::signer;

    fn signed(payload: &[u8]) -> ([u8; 512], usize) {
        let mut out = [0u8; 512];
        let n = sign(&signer(1), payload, &mut out).expect("sign");
        (out, n)
    }

    #[test]
    fn signed_message_verifies_and_returns_its_payload() {
        let (out, n) = signed(b"\xa1\x00\x01");
        let msg = Sign1::decode(&out[..n]).expect("decode");
        assert_eq!(msg.kid(), signer(1).kid());
        let key = signer(1).public_key();
        assert_eq!(msg.verify(&key), Ok(&b"\xa1\x00\x01"[..]));
    }

    #[test]
    fn payload_of_every_head_size_round_trips() {
        let mut big = [0u8; 400];
        for len in [0usize, 23, 24, 255, 256, 400] {
            big[..len].fill(0x5a);
            let mut out = [0u8; 600];
            let n = sign(&signer(1), &big[..len], &mut out).expect("sign");
            let msg = Sign1::decode(&out[..n]).expect("decode");
            assert_eq!(msg.verify(&signer(1).public_key()), Ok(&big[..len]));
        }
    }

    #[test]
    fn a_flipped_payload_byte_breaks_the_signature() {
        let (mut out, n) = signed(b"\xa1\x00\x01");
        out[n - SIGNATURE_LEN - 3] ^= 0x01;
        let msg = Sign1::decode(&out[..n]).expect("decode");
        assert_eq!(
            msg.verify(&signer(1).public_key()),
            Err(SignatureError::Invalid.into())
        );
    }

    #[test]
    fn unknown_kid_is_refused() {
        let (out, n) = signed(b"\x00");
        let msg = Sign1::decode(&out[..n]).expect("decode");
        assert_eq!(
            msg.verify(&signer(2).public_key()),
            Err(SignatureError::UnknownKey.into())
        );
    }

    #[test]
    fn trailing_bytes_and_truncation_are_refused() {
        let (out, n) = signed(b"\x00");
        assert_eq!(
            Sign1::decode(&out[..n + 1]).map(|_| ()),
            Err(DecodeError::TrailingBytes.into())
        );
        assert_eq!(
            Sign1::decode(&out[..n - 1]).map(|_| ()),
            Err(DecodeError::Malformed.into())
        );
    }

    #[test]
    fn untagged_and_cwt_tagged_forms_are_accepted_other_tags_are_not() {
        let (out, n) = signed(b"\x00");
        assert!(Sign1::decode(&out[1..n]).is_ok());
        let mut cwt = [0u8; 600];
        cwt[..2].copy_from_slice(&[0xd8, 61]);
        cwt[2..2 + n].copy_from_slice(&out[..n]);
        assert!(Sign1::decode(&cwt[..n + 2]).is_ok());
        let mut other = [0u8; 600];
        other[..2].copy_from_slice(&[0xd8, 98]);
        other[2..2 + n - 1].copy_from_slice(&out[1..n]);
        assert_eq!(
            Sign1::decode(&other[..n + 1]).map(|_| ()),
            Err(DecodeError::UnexpectedTag(98).into())
        );
    }

    #[test]
    fn non_empty_unprotected_header_is_refused() {
        let (out, n) = signed(b"\x00");
        // Replace `a0` with `a1 01 26` (alg in the unprotected header).
        let mut bad = [0u8; 600];
        bad[..PREFIX_LEN - 1].copy_from_slice(&out[..PREFIX_LEN - 1]);
        bad[PREFIX_LEN - 1..PREFIX_LEN + 2].copy_from_slice(&[0xa1, 0x01, 0x26]);
        bad[PREFIX_LEN + 2..n + 2].copy_from_slice(&out[PREFIX_LEN..n]);
        assert_eq!(
            Sign1::decode(&bad[..n + 2]).map(|_| ()),
            Err(DecodeError::UnprotectedHeaderNotEmpty.into())
        );
    }

    #[test]
    fn protected_header_rules() {
        assert_eq!(
            decode_protected(&[0xa2, 0x01, 0x38, 0x22, 0x04, 0x41, 0x00]),
            Err(SignatureError::UnsupportedAlgorithm.into())
        );
        assert_eq!(
            decode_protected(&[0xa1, 0x04, 0x41, 0x00]),
            Err(DecodeError::MissingField("alg").into())
        );
        assert_eq!(
            decode_protected(&[0xa3, 0x01, 0x26, 0x04, 0x41, 0x00, 0x02, 0x81, 0x01]),
            Err(DecodeError::UnknownCriticalHeader.into())
        );
        assert_eq!(
            decode_protected(&[0xa3, 0x01, 0x26, 0x04, 0x41, 0x00, 0x01, 0x26]),
            Err(DecodeError::DuplicateKey(1).into())
        );
        assert_eq!(
            decode_protected(&[0xa2, 0x01, 0x26, 0x04, 0x41, 0x07]),
            Ok(&[0x07][..])
        );
    }

    #[test]
    fn every_accepted_encoding_of_one_message_has_the_same_canonical_hash() {
        let (out, n) = signed(b"\xa1\x00\x01");
        let canonical = Sign1::decode(&out[..n]).expect("decode").canonical_hash();
        assert_eq!(canonical, crate::crypto::sha256(&[&out[..n]]));
        // Untagged.
        assert_eq!(
            Sign1::decode(&out[1..n]).expect("decode").canonical_hash(),
            canonical
        );
        // Wrapped in tag 61.
        let mut cwt = [0u8; 600];
        cwt[..2].copy_from_slice(&[0xd8, 61]);
        cwt[2..2 + n].copy_from_slice(&out[..n]);
        assert_eq!(
            Sign1::decode(&cwt[..n + 2])
                .expect("decode")
                .canonical_hash(),
            canonical
        );
        // High-s twin of the signature: still verifies, same hash.
        let sig = p256::ecdsa::Signature::from_slice(&out[n - 64..n]).expect("sig");
        let (r, s) = sig.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -*s).expect("sig");
        let mut twin = out;
        twin[n - 64..n].copy_from_slice(&high.to_bytes());
        assert_ne!(twin[..n], out[..n]);
        let msg = Sign1::decode(&twin[..n]).expect("decode");
        assert!(msg.verify(&signer(1).public_key()).is_ok());
        assert_eq!(msg.canonical_hash(), canonical);
    }

    #[test]
    fn small_output_buffer_is_an_error_not_a_panic() {
        let mut out = [0u8; OVERHEAD + 2];
        assert_eq!(
            sign(&signer(1), b"abcdef", &mut out),
            Err(EncodeError::BufferTooSmall.into())
        );
        let mut tiny = [0u8; 10];
        assert_eq!(
            sign(&signer(1), b"", &mut tiny),
            Err(EncodeError::BufferTooSmall.into())
        );
    }
}
