//! `cose::Sign1::decode` on arbitrary bytes: never panics; what decodes verifies (or not)
//! with the fixed key without panicking, and its `canonical_hash` is its revocation
//! `token_hash`; its payload, signed again, decodes to the same payload (sign → decode
//! round trip), and what `cose::sign` writes is already canonical (its plain SHA-256 is its
//! canonical hash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{DangerousAcceptAnySignature, issuer, issuer_key};
use tessera_shared::cose::{self, MAX_KID_LEN, MAX_SIGN1_LEN, Sign1};
use tessera_shared::crypto::{Signer as _, sha256};
use tessera_shared::revocation::token_hash;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Sign1::decode(data) else {
        return;
    };
    assert!(msg.kid().len() <= MAX_KID_LEN);
    assert_eq!(token_hash(data), msg.canonical_hash());
    let _ = msg.verify(issuer_key());
    let payload = msg
        .verify_with(&DangerousAcceptAnySignature)
        .expect("a fake verifier accepts");
    if payload.len() + cose::OVERHEAD > MAX_SIGN1_LEN {
        return;
    }
    let mut out = vec![0u8; payload.len() + cose::OVERHEAD];
    let n = cose::sign(issuer(), payload, &mut out).expect("OVERHEAD is enough room");
    let again = Sign1::decode(&out[..n]).expect("our own COSE_Sign1 decodes");
    assert_eq!(again.kid(), issuer().kid());
    assert_eq!(again.verify(issuer_key()), Ok(payload));
    assert_eq!(
        again.canonical_hash(),
        sha256(&[&out[..n]]),
        "sign is not canonical"
    );
});
