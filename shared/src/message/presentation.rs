//! Proof of possession: how an app presents an access token to a device.
//!
//! The app signs `{0: 40, 1: token, 2: audience, 3: issued_at, 4: nonce}` with the key the
//! token's `cnf` names. The device checks the token (hub signature, expiry, audience =
//! itself, scope, revocation) and then that the presentation is signed by the `cnf` key,
//! names it as audience, and is fresh. A copied token is useless without the app's key,
//! and a copied presentation is useless at another device or after its window; the device
//! refuses a nonce it has seen within the window.

use super::request::NONCE_LEN;
use super::{MessageType, read_id, read_type};
use crate::cbor::{Reader, SeenKeys};
use crate::cose::{self, Sign1};
use crate::crypto::{KeyLookup, Signer};
use crate::error::{ClaimsError, DecodeError, Error};
use crate::token::{self, MAX_TOKEN_LEN, Validation, VerifiedToken};

/// Longest signed presentation accepted, in bytes: a token of [`MAX_TOKEN_LEN`] with the
/// audience, time, nonce and the COSE_Sign1 around them.
pub const MAX_PRESENTATION_LEN: usize = MAX_TOKEN_LEN + 512;

/// A token holder's signed presentation of its token to one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presentation<'a> {
    /// The access token.
    pub token: &'a [u8],
    /// The device it is presented to.
    pub audience: &'a str,
    /// The holder's time when presenting, Unix seconds.
    pub issued_at: u64,
    /// Fresh random bytes, or a challenge the device handed out.
    pub nonce: [u8; NONCE_LEN],
}

impl<'a> Presentation<'a> {
    /// Writes the payload map into `out`; returns its length.
    pub fn encode_to(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = crate::cbor::writer(out);
        w.map(5)?
            .u8(0)?
            .u64(MessageType::Presentation.as_u64())?
            .u8(1)?
            .bytes(self.token)?
            .u8(2)?
            .str(self.audience)?
            .u8(3)?
            .u64(self.issued_at)?
            .u8(4)?
            .bytes(&self.nonce)?;
        Ok(crate::cbor::written(&w))
    }

    /// Decodes a payload map strictly.
    pub fn decode(payload: &'a [u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let n = read_type(&mut r, MessageType::Presentation, 4)?;
        let mut seen = SeenKeys::default();
        let (mut tok, mut audience, mut issued_at, mut nonce) = (None, None, None, None);
        for _ in 0..n {
            let k = r.key()?;
            seen.insert(k)?;
            match k {
                1 => tok = Some(r.bytes(MAX_TOKEN_LEN)?),
                2 => audience = Some(read_id(&mut r)?),
                3 => issued_at = Some(r.uint()?),
                4 => nonce = Some(r.bytes_exact::<NONCE_LEN>("nonce")?),
                _ => return Err(DecodeError::InvalidValue("presentation key").into()),
            }
        }
        r.finish()?;
        Ok(Self {
            token: tok.ok_or(DecodeError::MissingField("token"))?,
            audience: audience.ok_or(DecodeError::MissingField("audience"))?,
            issued_at: issued_at.ok_or(DecodeError::MissingField("issued_at"))?,
            nonce: nonce.ok_or(DecodeError::MissingField("nonce"))?,
        })
    }

    /// Signs the presentation with the holder's key into `out`; returns the length.
    pub fn sign(&self, holder: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
        cose::sign_with(holder, out, |buf| self.encode_to(buf))
    }
}

/// A presentation whose token and possession proof have both been checked.
#[derive(Debug, Clone, Copy)]
pub struct SignedPresentation<'a> {
    /// The verified token.
    pub token: VerifiedToken<'a>,
    /// The presentation's nonce, for the verifier's replay cache.
    pub nonce: [u8; NONCE_LEN],
    /// When the holder made the presentation.
    pub issued_at: u64,
}

impl<'a> SignedPresentation<'a> {
    /// Checks a presentation for the device named by `validation.audience`:
    /// the token against the hub's `keys` and `validation`, then the holder's signature
    /// with the token's `cnf` key, the presentation's audience, and that `issued_at` is
    /// within `window` seconds of `validation.now`. Revocation and the nonce cache are the
    /// caller's next steps ([`VerifiedToken::check_not_revoked`]).
    pub fn verify(
        bytes: &'a [u8],
        keys: &dyn KeyLookup,
        validation: &Validation<'_>,
        window: u64,
    ) -> Result<Self, Error> {
        let envelope = Sign1::decode(bytes)?;
        let p = Presentation::decode(envelope.unverified_payload())?;
        let token = token::verify(p.token, keys, validation)?;
        envelope
            .verify_with(&token.claims().cnf)
            .map_err(|_| Error::Claims(ClaimsError::ProofOfPossession))?;
        if p.audience != validation.audience {
            return Err(ClaimsError::WrongAudience.into());
        }
        if p.issued_at.abs_diff(validation.now) > window {
            return Err(ClaimsError::PresentationOutsideWindow.into());
        }
        Ok(Self {
            token,
            nonce: p.nonce,
            issued_at: p.issued_at,
        })
    }

    /// Checks a presentation as evidence after the fact, as the hub does when a device
    /// reports one it refused: everything [`verify`](Self::verify) checks (hub signature,
    /// audience, the holder's signature), judged at the presentation's own `issued_at`
    /// with `leeway` for the token's lifetime. Whether `issued_at` itself is recent is the
    /// caller's check, against its own clock.
    pub fn verify_as_presented(
        bytes: &'a [u8],
        keys: &dyn KeyLookup,
        audience: &str,
        leeway: u64,
    ) -> Result<Self, Error> {
        let envelope = Sign1::decode(bytes)?;
        let p = Presentation::decode(envelope.unverified_payload())?;
        let validation = Validation {
            leeway,
            ..Validation::new(p.issued_at, audience)
        };
        Self::verify(bytes, keys, &validation, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::testing::claims;
    use crate::crypto::testing::signer;

    const NOW: u64 = 1_700_000_000;

    fn presented(holder: u8, audience: &str, at: u64) -> ([u8; 1024], usize) {
        let mut tok = [0u8; 512];
        let tn = token::issue(&claims(NOW), &signer(1), &mut tok).expect("issue");
        let p = Presentation {
            token: &tok[..tn],
            audience,
            issued_at: at,
            nonce: [8; NONCE_LEN],
        };
        let mut out = [0u8; 1024];
        let n = p.sign(&signer(holder), &mut out).expect("sign");
        (out, n)
    }

    #[test]
    fn the_holder_can_present_its_token() {
        let (out, n) = presented(5, "device-42", NOW);
        let v = Validation::new(NOW + 1, "device-42").with_scope("door:open");
        let p =
            SignedPresentation::verify(&out[..n], &signer(1).public_key(), &v, 60).expect("valid");
        assert_eq!(p.token.claims().sub, "app-7");
        assert_eq!(p.nonce, [8; NONCE_LEN]);
    }

    #[test]
    fn a_copied_token_without_the_holder_key_is_refused() {
        let (out, n) = presented(6, "device-42", NOW);
        let v = Validation::new(NOW, "device-42");
        assert_eq!(
            SignedPresentation::verify(&out[..n], &signer(1).public_key(), &v, 60).map(|_| ()),
            Err(ClaimsError::ProofOfPossession.into())
        );
    }

    #[test]
    fn an_old_presentation_is_refused() {
        let (out, n) = presented(5, "device-42", NOW);
        let v = Validation::new(NOW + 61, "device-42");
        assert_eq!(
            SignedPresentation::verify(&out[..n], &signer(1).public_key(), &v, 60).map(|_| ()),
            Err(ClaimsError::PresentationOutsideWindow.into())
        );
    }

    #[test]
    fn a_presentation_is_judged_as_presented_after_the_fact() {
        // Presented while the token lived; checked long after it expired.
        let (out, n) = presented(5, "device-42", NOW + 10);
        let keys = signer(1).public_key();
        let p = SignedPresentation::verify_as_presented(&out[..n], &keys, "device-42", 0)
            .expect("valid as presented");
        assert_eq!((p.issued_at, p.token.claims().sub), (NOW + 10, "app-7"));
        // Another device cannot report it, nor a forger without the holder's key.
        assert_eq!(
            SignedPresentation::verify_as_presented(&out[..n], &keys, "device-43", 0).map(|_| ()),
            Err(ClaimsError::WrongAudience.into())
        );
        let (forged, n) = presented(6, "device-42", NOW + 10);
        let forged = SignedPresentation::verify_as_presented(&forged[..n], &keys, "device-42", 0);
        assert_eq!(
            forged.map(|_| ()),
            Err(ClaimsError::ProofOfPossession.into())
        );
        // Presented after the token expired: not a valid presentation then either.
        let (late, n) = presented(5, "device-42", NOW + 100_000);
        assert!(
            SignedPresentation::verify_as_presented(&late[..n], &keys, "device-42", 0).is_err()
        );
    }

    #[test]
    fn a_presentation_to_another_device_is_refused() {
        let (out, n) = presented(5, "device-43", NOW);
        let v = Validation::new(NOW, "device-42");
        assert_eq!(
            SignedPresentation::verify(&out[..n], &signer(1).public_key(), &v, 60).map(|_| ()),
            Err(ClaimsError::WrongAudience.into())
        );
    }
}
