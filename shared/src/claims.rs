//! The claims set of a Tessera token (RFC 8392 §3) and its strict codec.
//!
//! Registered integer keys only: iss 1, sub 2, aud 3, exp 4, nbf 5, iat 6, cti 7,
//! cnf 8 (RFC 8747, holding the holder's COSE_Key), scope 9 (RFC 9200). Times are
//! NumericDate as unsigned integers (no floating point). Every Tessera token is
//! proof-of-possession, so `cnf` is required; `nbf` is the only optional claim.
//! Unknown claims are skipped (but still may not repeat a key).

use crate::MAX_ID_LEN;
use crate::cbor::{Reader, SeenKeys, Writer};
use crate::crypto::PublicKey;
use crate::error::{DecodeError, Error};
use crate::scope::{MAX_SCOPE_LEN, Scopes};

/// Longest `cti` accepted, in bytes.
pub const MAX_CTI_LEN: usize = 32;

/// Length of the `cti` the hub issues.
pub const CTI_LEN: usize = 16;

/// Longest `aud` accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 128;

/// Claim keys (RFC 8392 §4 and the IANA CWT Claims registry).
pub mod key {
    /// Issuer.
    pub const ISS: i64 = 1;
    /// Subject.
    pub const SUB: i64 = 2;
    /// Audience.
    pub const AUD: i64 = 3;
    /// Expiration time.
    pub const EXP: i64 = 4;
    /// Not before.
    pub const NBF: i64 = 5;
    /// Issued at.
    pub const IAT: i64 = 6;
    /// CWT ID.
    pub const CTI: i64 = 7;
    /// Confirmation (RFC 8747).
    pub const CNF: i64 = 8;
    /// Scope (RFC 9200).
    pub const SCOPE: i64 = 9;
}

/// `cnf` method label for a full COSE_Key (RFC 8747 §3.2).
const CNF_COSE_KEY: i64 = 1;

/// A token's claims, borrowing strings from the token bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims<'a> {
    /// Issuer: the hub's id.
    pub iss: &'a str,
    /// Subject: the device or app the token was issued to.
    pub sub: &'a str,
    /// Audience: the service or device the token is for.
    pub aud: &'a str,
    /// Expiration time, Unix seconds.
    pub exp: u64,
    /// Not-before time, Unix seconds.
    pub nbf: Option<u64>,
    /// Issued-at time, Unix seconds.
    pub iat: u64,
    /// Token id, unique per issued token.
    pub cti: &'a [u8],
    /// The holder's public key; the token is useless without its private half.
    pub cnf: PublicKey,
    /// What the token allows.
    pub scope: Scopes<'a>,
}

impl<'a> Claims<'a> {
    /// Writes the claims map in ascending key order.
    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<(), Error> {
        let n = 8 + u64::from(self.nbf.is_some());
        w.map(n)?
            .i64(key::ISS)?
            .str(self.iss)?
            .i64(key::SUB)?
            .str(self.sub)?
            .i64(key::AUD)?
            .str(self.aud)?
            .i64(key::EXP)?
            .u64(self.exp)?;
        if let Some(nbf) = self.nbf {
            w.i64(key::NBF)?.u64(nbf)?;
        }
        w.i64(key::IAT)?
            .u64(self.iat)?
            .i64(key::CTI)?
            .bytes(self.cti)?
            .i64(key::CNF)?
            .map(1)?
            .i64(CNF_COSE_KEY)?;
        self.cnf.encode(w)?;
        w.i64(key::SCOPE)?.str(self.scope.as_str())?;
        Ok(())
    }

    /// Writes the claims map into `out`; returns the length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        self.encode(&mut w)?;
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a claims map strictly; nothing may follow it.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let n = r.map(crate::cbor::MAX_MAP_ENTRIES)?;
        let mut seen = SeenKeys::default();
        let (mut iss, mut sub, mut aud) = (None, None, None);
        let (mut exp, mut nbf, mut iat) = (None, None, None);
        let (mut cti, mut cnf, mut scope) = (None, None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                key::ISS => iss = Some(r.str(MAX_ID_LEN)?),
                key::SUB => sub = Some(r.str(MAX_ID_LEN)?),
                key::AUD => aud = Some(r.str(MAX_AUDIENCE_LEN)?),
                key::EXP => exp = Some(r.uint()?),
                key::NBF => nbf = Some(r.uint()?),
                key::IAT => iat = Some(r.uint()?),
                key::CTI => {
                    let b = r.bytes(MAX_CTI_LEN)?;
                    if b.is_empty() {
                        return Err(DecodeError::InvalidValue("cti").into());
                    }
                    cti = Some(b);
                }
                key::CNF => cnf = Some(decode_cnf(&mut r)?),
                key::SCOPE => scope = Some(Scopes::parse(r.str(MAX_SCOPE_LEN)?)?),
                _ => r.skip()?,
            }
        }
        r.finish()?;
        Ok(Self {
            iss: iss.ok_or(DecodeError::MissingField("iss"))?,
            sub: sub.ok_or(DecodeError::MissingField("sub"))?,
            aud: aud.ok_or(DecodeError::MissingField("aud"))?,
            exp: exp.ok_or(DecodeError::MissingField("exp"))?,
            nbf,
            iat: iat.ok_or(DecodeError::MissingField("iat"))?,
            cti: cti.ok_or(DecodeError::MissingField("cti"))?,
            cnf: cnf.ok_or(DecodeError::MissingField("cnf"))?,
            scope: scope.ok_or(DecodeError::MissingField("scope"))?,
        })
    }
}

/// `cnf` must be `{1: COSE_Key}`; key-id and encrypted-key methods are not supported.
fn decode_cnf(r: &mut Reader<'_>) -> Result<PublicKey, Error> {
    if r.map(1)? != 1 || r.key()? != CNF_COSE_KEY {
        return Err(DecodeError::InvalidValue("cnf").into());
    }
    PublicKey::decode(r)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::crypto::Signer;
    use crate::crypto::testing::signer;

    /// A plausible access token's claims at `iat`.
    pub(crate) fn claims(iat: u64) -> Claims<'static> {
        Claims {
            iss: "hub-1",
            sub: "app-7",
            aud: "device-42",
            exp: iat + 300,
            nbf: None,
            iat,
            cti: &[9; CTI_LEN],
            cnf: signer(5).public_key(),
            scope: Scopes::parse("door:open telemetry:read").expect("valid"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::claims;
    use super::*;

    #[test]
    fn claims_round_trip_with_and_without_nbf() {
        let mut buf = [0u8; 512];
        for nbf in [None, Some(1_000)] {
            let c = Claims {
                nbf,
                ..claims(1_000)
            };
            let n = c.encode_to(&mut buf).expect("encode");
            assert_eq!(Claims::decode(&buf[..n]), Ok(c));
        }
    }

    #[test]
    fn each_required_claim_is_required() {
        // Encode, then rename one key to an unknown private claim so it is skipped.
        let mut buf = [0u8; 512];
        let n = claims(1_000).encode_to(&mut buf).expect("encode");
        for (k, name) in [
            (0x01u8, "iss"),
            (0x04, "exp"),
            (0x08, "cnf"),
            (0x09, "scope"),
        ] {
            let mut b = buf;
            let at = find_key(&b[..n], k);
            b[at] = 0x0a + k; // unknown key 10+k, skipped
            assert_eq!(
                Claims::decode(&b[..n]),
                Err(DecodeError::MissingField(name).into()),
                "{name}"
            );
        }
    }

    #[test]
    fn duplicate_claim_key_is_refused() {
        let mut buf = [0u8; 512];
        let n = claims(1_000).encode_to(&mut buf).expect("encode");
        let at = find_key(&buf[..n], 0x06); // iat
        buf[at] = 0x04; // now a second exp
        assert_eq!(
            Claims::decode(&buf[..n]),
            Err(DecodeError::DuplicateKey(4).into())
        );
    }

    #[test]
    fn floating_point_times_are_refused() {
        // {4: 1.5}
        assert_eq!(
            Claims::decode(&[0xa1, 0x04, 0xf9, 0x3e, 0x00]),
            Err(DecodeError::UnexpectedType.into())
        );
    }

    /// Position of top-level claim key `k` (a one-byte uint) in an encoded claims map.
    fn find_key(enc: &[u8], k: u8) -> usize {
        let mut r = Reader::new(enc);
        let n = r.map(32).expect("map");
        for _ in 0..n {
            let at = r.position();
            if r.key().expect("key") == i64::from(k) {
                return at;
            }
            r.skip().expect("skip");
        }
        panic!("key {k} not found")
    }
}
