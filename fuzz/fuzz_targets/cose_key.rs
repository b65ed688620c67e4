//! `PublicKey::from_cose_key` on arbitrary bytes: never panics, and a key that decodes
//! round-trips: `to_cose_key` → `from_cose_key` gives the same key, in exactly
//! `COSE_KEY_LEN` bytes, and its SEC1 form round-trips too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_shared::crypto::{COSE_KEY_LEN, PublicKey};

fuzz_target!(|data: &[u8]| {
    let Ok(key) = PublicKey::from_cose_key(data) else {
        return;
    };
    let mut buf = [0u8; COSE_KEY_LEN];
    let n = key.to_cose_key(&mut buf).expect("COSE_KEY_LEN is enough");
    assert_eq!(n, COSE_KEY_LEN);
    assert_eq!(PublicKey::from_cose_key(&buf[..n]), Ok(key));
    assert_eq!(PublicKey::from_sec1(&key.to_sec1()), Ok(key));
    let (x, y) = key.coordinates();
    assert_eq!(PublicKey::from_coordinates(&x, &y), Ok(key));
});
