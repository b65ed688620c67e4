//! Control messages: `Control::verify` with the fixed key never panics on arbitrary
//! bytes; `Control::decode` of a payload never panics, and what decodes round-trips
//! through `encode_to`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{encode_buffer, issuer_key};
use tessera_shared::message::Control;

fuzz_target!(|data: &[u8]| {
    let _ = Control::verify(data, issuer_key());
    let Ok(control) = Control::decode(data) else {
        return;
    };
    let mut buf = encode_buffer(data);
    let n = control
        .encode_to(&mut buf)
        .expect("decoded control encodes");
    let back = Control::decode(&buf[..n]).expect("encoded control decodes");
    assert_eq!(back, control);
    let mut again = encode_buffer(data);
    let m = back.encode_to(&mut again).expect("decoded control encodes");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
