//! `token::verify` on arbitrary bytes with a fixed trusted key: never panics. The same
//! bytes also go through a fake key lookup that accepts any signature, so the claims
//! decoder and the claim checks run on every envelope that decodes; whatever that accepts
//! must satisfy the validation it was checked against, must not be revoked by an empty
//! list, and must be revoked by a list naming its hash, also when presented with its
//! COSE tag dropped (a re-encoding must not dodge a revocation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{AUDIENCE, DangerousAcceptAnySignature, NOW, issuer_key, validation};
use tessera_shared::Error;
use tessera_shared::error::ClaimsError;
use tessera_shared::revocation::{
    self, Addressed, Bounded, Entry, Page, PageOutcome, RevocationList, Stream,
};
use tessera_shared::token;

type List = RevocationList<Bounded<4>>;

/// The list of the device the tokens are checked for, before any revocation.
fn empty() -> List {
    List::for_device(AUDIENCE, 30).expect("a valid id")
}

/// The device's list after a page revoking the token with `hash` until `expires_at`.
fn revoking(hash: revocation::TokenHash, expires_at: u64) -> List {
    let mut buf = [0u8; 256];
    let entry = Addressed::new(AUDIENCE, Entry::Token { hash, expires_at }).expect("valid");
    let stream = Stream::of_device(AUDIENCE);
    let n =
        revocation::encode_page(1, NOW, &stream, 1, 1, [entry], &mut buf).expect("one entry fits");
    let page = Page::decode(&buf[..n]).expect("our page decodes");
    let mut list = empty();
    assert_eq!(list.apply_page(&page, NOW), Ok(PageOutcome::Applied));
    list
}

fuzz_target!(|data: &[u8]| {
    let v = validation();
    if let Ok(t) = token::verify(data, issuer_key(), &v) {
        assert_eq!(t.as_bytes(), data);
    }
    let _ = token::dangerous_verify_signature_only(data, issuer_key());
    let Ok(t) = token::verify(data, &DangerousAcceptAnySignature, &v) else {
        return;
    };
    let c = t.claims();
    assert_eq!(c.aud, AUDIENCE);
    assert!(
        v.now < c.exp.saturating_add(v.leeway),
        "expired token accepted"
    );
    assert!(
        c.nbf
            .is_none_or(|nbf| nbf <= v.now.saturating_add(v.leeway))
    );
    assert!(c.iat <= v.now.saturating_add(v.leeway));

    let revoked: Result<(), Error> = Err(ClaimsError::Revoked.into());
    assert_eq!(t.check_not_revoked(&empty()), Ok(()));
    let list = revoking(t.hash(), c.exp);
    assert_eq!(t.check_not_revoked(&list), revoked);
    if let Some(untagged) = data.strip_prefix(&[0xd2]) {
        let u = token::verify(untagged, &DangerousAcceptAnySignature, &v)
            .expect("the untagged form of a valid token is valid");
        assert_eq!(
            u.check_not_revoked(&list),
            revoked,
            "dropping the tag dodges revocation"
        );
    }
});
