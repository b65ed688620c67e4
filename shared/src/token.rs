//! Issuing and verifying tokens: a CWT (RFC 8392) in a COSE_Sign1 signed with ES256.
//!
//! Untrusted bytes become a [`VerifiedToken`] only through [`verify`]:
//! decode the envelope → verify the signature with the key named by `kid` → decode the
//! claims → check them against a [`Validation`]. No other constructor exists, so holding a
//! `VerifiedToken` means all of that happened.

use crate::claims::Claims;
use crate::cose::{self, Sign1};
use crate::crypto::{KeyLookup, Signature, Signer, Verifier};
use crate::error::{ClaimsError, Error};
use crate::revocation::{EntryStore, RevocationList, TokenHash, token_hash};

/// Default clock-skew leeway, in seconds.
pub const DEFAULT_LEEWAY: u64 = 30;

/// Largest token the core accepts, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// What a token must satisfy to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct Validation<'a> {
    /// The verifier's current time, Unix seconds.
    pub now: u64,
    /// The audience the token must name (this device's or service's id).
    pub audience: &'a str,
    /// Clock-skew leeway applied to `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
    /// The issuer the token must name, if the verifier knows it.
    pub issuer: Option<&'a str>,
    /// A scope the token must grant.
    pub required_scope: Option<&'a str>,
}

impl<'a> Validation<'a> {
    /// Checks for `audience` at `now` with the default leeway and no issuer or scope check.
    pub fn new(now: u64, audience: &'a str) -> Self {
        Self {
            now,
            audience,
            leeway: DEFAULT_LEEWAY,
            issuer: None,
            required_scope: None,
        }
    }

    /// Also requires `scope` to be granted.
    pub fn with_scope(mut self, scope: &'a str) -> Self {
        self.required_scope = Some(scope);
        self
    }

    /// Also requires the issuer to be `issuer`.
    pub fn with_issuer(mut self, issuer: &'a str) -> Self {
        self.issuer = Some(issuer);
        self
    }

    fn check(&self, c: &Claims<'_>) -> Result<(), ClaimsError> {
        if self.now >= c.exp.saturating_add(self.leeway) {
            return Err(ClaimsError::Expired);
        }
        if c.nbf
            .is_some_and(|nbf| nbf > self.now.saturating_add(self.leeway))
        {
            return Err(ClaimsError::NotYetValid);
        }
        if c.iat > self.now.saturating_add(self.leeway) {
            return Err(ClaimsError::IssuedInFuture);
        }
        if c.aud != self.audience {
            return Err(ClaimsError::WrongAudience);
        }
        if self.issuer.is_some_and(|iss| iss != c.iss) {
            return Err(ClaimsError::WrongIssuer);
        }
        if self.required_scope.is_some_and(|s| !c.scope.grants(s)) {
            return Err(ClaimsError::MissingScope);
        }
        Ok(())
    }
}

/// A token whose signature and claims have been checked.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedToken<'a> {
    raw: &'a [u8],
    kid: &'a [u8],
    claims: Claims<'a>,
}

impl<'a> VerifiedToken<'a> {
    /// The checked claims.
    pub fn claims(&self) -> &Claims<'a> {
        &self.claims
    }

    /// The `kid` of the key that signed the token.
    pub fn kid(&self) -> &'a [u8] {
        self.kid
    }

    /// The token bytes as presented.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// The hash that names this token on the revocation list.
    pub fn hash(&self) -> TokenHash {
        token_hash(self.raw)
    }

    /// Fails with [`ClaimsError::Revoked`] if `list` revokes this token, by its hash or by
    /// its subject and issue time.
    pub fn check_not_revoked<S: EntryStore, const P: usize>(
        &self,
        list: &RevocationList<S, P>,
    ) -> Result<(), Error> {
        if list.is_revoked(&self.hash(), self.claims.sub, self.claims.iat) {
            return Err(ClaimsError::Revoked.into());
        }
        Ok(())
    }

    /// Checks that the presenter holds the `cnf` key: `signature` must verify over
    /// `message` (a challenge the verifier chose, see
    /// [`message::Presentation`](crate::message)) with the holder's key.
    pub fn check_possession(&self, message: &[&[u8]], signature: &Signature) -> Result<(), Error> {
        self.claims
            .cnf
            .verify(message, signature)
            .map_err(|_| ClaimsError::ProofOfPossession.into())
    }
}

/// Decodes, verifies and checks a token. See the module documentation for the order.
pub fn verify<'a>(
    token: &'a [u8],
    keys: &dyn KeyLookup,
    validation: &Validation<'_>,
) -> Result<VerifiedToken<'a>, Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(crate::error::DecodeError::TooLarge.into());
    }
    let envelope = Sign1::decode(token)?;
    let payload = envelope.verify(keys)?;
    let claims = Claims::decode(payload)?;
    validation.check(&claims)?;
    Ok(VerifiedToken {
        raw: token,
        kid: envelope.kid(),
        claims,
    })
}

/// Verifies a token's signature with one key and decodes its claims, without checking
/// time, audience or scope. For the hub reading back its own tokens and for diagnostics.
pub fn dangerous_verify_signature_only<'a>(
    token: &'a [u8],
    key: &dyn Verifier,
) -> Result<Claims<'a>, Error> {
    let envelope = Sign1::decode(token)?;
    Claims::decode(envelope.verify_with(key)?)
}

/// Signs `claims` into a token in `out`; returns its length.
pub fn issue(claims: &Claims<'_>, signer: &dyn Signer, out: &mut [u8]) -> Result<usize, Error> {
    cose::sign_with(signer, out, |buf| claims.encode_to(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::testing::claims;
    use crate::crypto::testing::signer;
    use crate::error::{DecodeError, SignatureError};
    use crate::revocation::{
        Addressed, Bounded, Entry, Page, PageOutcome, RevocationList, Stream, encode_page,
    };

    const IAT: u64 = 1_700_000_000;

    fn issued() -> ([u8; 512], usize) {
        let mut out = [0u8; 512];
        let n = issue(&claims(IAT), &signer(1), &mut out).expect("issue");
        (out, n)
    }

    #[test]
    fn a_fresh_token_verifies_for_its_audience_and_scope() {
        let (out, n) = issued();
        let v = Validation::new(IAT + 10, "device-42")
            .with_scope("door:open")
            .with_issuer("hub-1");
        let t = verify(&out[..n], &signer(1).public_key(), &v).expect("valid");
        assert_eq!(t.claims().sub, "app-7");
        assert_eq!(t.kid(), signer(1).kid());
    }

    #[test]
    fn claims_failures_have_their_own_reasons() {
        let (out, n) = issued();
        let key = signer(1).public_key();
        let t = &out[..n];
        let cases = [
            (
                Validation::new(IAT + 300 + 30, "device-42"),
                ClaimsError::Expired,
            ),
            (
                Validation::new(IAT - 31, "device-42"),
                ClaimsError::IssuedInFuture,
            ),
            (
                Validation::new(IAT, "device-43"),
                ClaimsError::WrongAudience,
            ),
            (
                Validation::new(IAT, "device-42").with_scope("door:unlock"),
                ClaimsError::MissingScope,
            ),
            (
                Validation::new(IAT, "device-42").with_issuer("hub-2"),
                ClaimsError::WrongIssuer,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(
                verify(t, &key, &v).map(|_| ()),
                Err(want.into()),
                "{want:?}"
            );
        }
        // Inside the leeway on both ends is accepted.
        assert!(verify(t, &key, &Validation::new(IAT + 300 + 29, "device-42")).is_ok());
        assert!(verify(t, &key, &Validation::new(IAT - 30, "device-42")).is_ok());
    }

    #[test]
    fn not_before_is_enforced_with_leeway() {
        let c = Claims {
            nbf: Some(IAT + 100),
            ..claims(IAT)
        };
        let mut out = [0u8; 512];
        let n = issue(&c, &signer(1), &mut out).expect("issue");
        let key = signer(1).public_key();
        assert_eq!(
            verify(&out[..n], &key, &Validation::new(IAT + 69, "device-42")).map(|_| ()),
            Err(ClaimsError::NotYetValid.into())
        );
        assert!(verify(&out[..n], &key, &Validation::new(IAT + 70, "device-42")).is_ok());
    }

    #[test]
    fn another_issuers_token_is_refused() {
        let (out, n) = issued();
        assert_eq!(
            verify(
                &out[..n],
                &signer(2).public_key(),
                &Validation::new(IAT, "device-42")
            )
            .map(|_| ()),
            Err(SignatureError::UnknownKey.into())
        );
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = [0u8; MAX_TOKEN_LEN + 1];
        assert_eq!(
            verify(&big, &signer(1).public_key(), &Validation::new(IAT, "d")).map(|_| ()),
            Err(DecodeError::TooLarge.into())
        );
    }

    #[test]
    fn revoked_tokens_are_refused_by_hash_and_by_subject() {
        let (out, n) = issued();
        let key = signer(1).public_key();
        let t = verify(&out[..n], &key, &Validation::new(IAT, "device-42")).expect("valid");
        let empty = || RevocationList::<Bounded<8>>::for_device("device-42", 30).expect("id");
        let revoke = |entry: Entry| {
            let mut list = empty();
            let mut buf = [0u8; 256];
            let stream = Stream::of_device("device-42");
            let entry = Addressed::new("device-42", entry).expect("id");
            let len = encode_page(1, IAT, &stream, 1, 1, [entry], &mut buf).expect("encode");
            let page = Page::decode(&buf[..len]).expect("decode");
            assert_eq!(list.apply_page(&page, IAT), Ok(PageOutcome::Applied));
            list
        };
        assert!(t.check_not_revoked(&empty()).is_ok());
        let by_hash = revoke(Entry::Token {
            hash: t.hash(),
            expires_at: IAT + 300,
        });
        assert_eq!(
            t.check_not_revoked(&by_hash),
            Err(ClaimsError::Revoked.into())
        );
        let by_subject = revoke(Entry::for_subject("app-7", IAT + 1, IAT + 300).expect("id"));
        assert_eq!(
            t.check_not_revoked(&by_subject),
            Err(ClaimsError::Revoked.into())
        );
        // Issued-before is exclusive: a token issued at that instant is a new one.
        let earlier = revoke(Entry::for_subject("app-7", IAT, IAT + 300).expect("id"));
        assert!(t.check_not_revoked(&earlier).is_ok());
    }

    #[test]
    fn possession_is_proved_only_by_the_holder_key() {
        let (out, n) = issued();
        let key = signer(1).public_key();
        let t = verify(&out[..n], &key, &Validation::new(IAT, "device-42")).expect("valid");
        let holder = signer(5); // claims() binds signer(5)
        let sig = holder.sign(&[b"challenge"]).expect("sign");
        assert!(t.check_possession(&[b"challenge"], &sig).is_ok());
        let thief = signer(6).sign(&[b"challenge"]).expect("sign");
        assert_eq!(
            t.check_possession(&[b"challenge"], &thief),
            Err(ClaimsError::ProofOfPossession.into())
        );
    }
}
