//! Key sets: `KeySet::update` of a set anchored on the fixed key never panics on arbitrary
//! bytes and only ever moves to a higher version; `KeySet::decode` of a payload never
//! panics, and what decodes round-trips through `encode_to`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{encode_buffer, issuer_key};
use tessera_shared::keyset::{KeySet, KeySetOutcome};

fuzz_target!(|data: &[u8]| {
    let mut held = KeySet::from_anchor(*issuer_key());
    let before = held.clone();
    match held.update(data) {
        Ok(KeySetOutcome::Updated) => assert!(held.version() > before.version()),
        Ok(KeySetOutcome::NotNewer) | Err(_) => assert_eq!(held, before),
    }
    let Ok(set) = KeySet::decode(data) else {
        return;
    };
    assert!(!set.keys().is_empty());
    let mut buf = encode_buffer(data);
    let n = set.encode_to(&mut buf).expect("decoded key set encodes");
    let back = KeySet::decode(&buf[..n]).expect("encoded key set decodes");
    assert_eq!(back, set);
    let mut again = encode_buffer(data);
    let m = back.encode_to(&mut again).expect("decoded key set encodes");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
