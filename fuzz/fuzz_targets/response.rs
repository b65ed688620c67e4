//! Responses: `SignedResponse::decode` and `verify` with the fixed key never panic on
//! arbitrary bytes; `Response::decode` of a payload never panics, and what decodes
//! round-trips through `encode_to`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{encode_buffer, issuer_key};
use tessera_shared::message::{Response, SignedResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedResponse::decode(data) {
        let _ = signed.verify(issuer_key());
    }
    let Ok(response) = Response::decode(data) else {
        return;
    };
    let mut buf = encode_buffer(data);
    let n = response
        .encode_to(&mut buf)
        .expect("decoded response encodes");
    let back = Response::decode(&buf[..n]).expect("encoded response decodes");
    assert_eq!(back, response);
    assert!(back.answers(response.client, response.request_id, &response.nonce));
    let mut again = encode_buffer(data);
    let m = back
        .encode_to(&mut again)
        .expect("decoded response encodes");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");
});
