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
use tessera_shared::revocation::{self, Entry, RevocationList, Snapshot};
use tessera_shared::token;

/// A list that revokes the token with `hash`, valid until `expires_at`.
fn revoking(hash: revocation::TokenHash, expires_at: u64) -> RevocationList<4> {
    let mut buf = [0u8; 256];
    let entries = [Entry::Token { hash, expires_at }];
    let n = revocation::encode_snapshot(1, NOW, &entries, &mut buf).expect("one entry fits");
    let snapshot = Snapshot::decode(&buf[..n]).expect("our snapshot decodes");
    let mut list = RevocationList::new();
    list.apply_snapshot(&snapshot, NOW).expect("one entry fits");
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
    assert_eq!(t.check_not_revoked(&RevocationList::<4>::new()), Ok(()));
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
