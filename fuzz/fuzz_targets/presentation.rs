//! Presentations: `SignedPresentation::verify` never panics on arbitrary bytes, with the
//! fixed hub key and with a fake lookup that accepts any hub signature (so the holder's
//! proof-of-possession check runs too); `Presentation::decode` of a payload never panics,
//! and what decodes round-trips through `encode_to`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{DangerousAcceptAnySignature, encode_buffer, issuer_key, validation};
use tessera_shared::message::{Presentation, SignedPresentation};

/// Freshness window of a presentation, seconds.
const WINDOW: u64 = 60;

fuzz_target!(|data: &[u8]| {
    let v = validation();
    let _ = SignedPresentation::verify(data, issuer_key(), &v, WINDOW);
    if let Ok(p) = SignedPresentation::verify(data, &DangerousAcceptAnySignature, &v, WINDOW) {
        assert!(p.issued_at.abs_diff(v.now) <= WINDOW);
        assert_eq!(p.token.claims().aud, v.audience);
    }
    let Ok(presentation) = Presentation::decode(data) else {
        return;
    };
    let mut buf = encode_buffer(data);
    let n = presentation
        .encode_to(&mut buf)
        .expect("decoded presentation encodes");
    let back = Presentation::decode(&buf[..n]).expect("encoded presentation decodes");
    assert_eq!(back, presentation);
    let mut again = encode_buffer(data);
    let m = back
        .encode_to(&mut again)
        .expect("decoded presentation encodes");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
