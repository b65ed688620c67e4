//! `Claims::decode` on arbitrary bytes: never panics, and whatever decodes re-encodes
//! (`encode_to`) to bytes that decode to equal claims and re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::encode_buffer;
use tessera_shared::claims::Claims;

fuzz_target!(|data: &[u8]| {
    let Ok(claims) = Claims::decode(data) else {
        return;
    };
    let mut buf = encode_buffer(data);
    let n = claims.encode_to(&mut buf).expect("decoded claims encode");
    let back = Claims::decode(&buf[..n]).expect("encoded claims decode");
    assert_eq!(back, claims);
    let mut again = encode_buffer(data);
    let m = back.encode_to(&mut again).expect("decoded claims encode");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
