//! Requests: `SignedRequest::decode` on arbitrary bytes (then every accessor, and
//! `verify` with the enrollment key or the fixed key) never panics; `Request::decode`
//! of a payload never panics, and what decodes round-trips through `encode_to`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{encode_buffer, issuer_key};
use tessera_shared::message::{Request, SignedRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedRequest::decode(data) {
        let _ = (
            signed.client(),
            signed.correlation(),
            signed.operation(),
            signed.kid(),
        );
        let key = signed.enrollment_key().unwrap_or(*issuer_key());
        if let Ok(request) = signed.verify(&key) {
            assert_eq!(request.operation(), signed.operation());
        }
    }
    let Ok(request) = Request::decode(data) else {
        return;
    };
    let mut buf = encode_buffer(data);
    let n = request
        .encode_to(&mut buf)
        .expect("decoded request encodes");
    let back = Request::decode(&buf[..n]).expect("encoded request decodes");
    assert_eq!(back, request);
    let mut again = encode_buffer(data);
    let m = back.encode_to(&mut again).expect("decoded request encodes");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
