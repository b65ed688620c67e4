//! Encrypted records: `record::open` and `record::peek_counter` on arbitrary bytes with a
//! fixed key never panic (and a forged record never opens); the input, sealed as a
//! plaintext, opens to the same plaintext and counter (seal → open round trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{RECORD_DEVICE, record_key};
use tessera_shared::record::{self, HEADER_LEN, MAX_PLAINTEXT_LEN};

fuzz_target!(|data: &[u8]| {
    let _ = record::peek_counter(data);
    let mut buf = data.to_vec();
    if let Ok(opened) = record::open(record_key(), RECORD_DEVICE, 0, &mut buf) {
        // Only the seeds, sealed with this key, can get here.
        assert!(opened.plaintext.len() <= MAX_PLAINTEXT_LEN);
    }
    let mut buf = data.to_vec();
    let _ = record::open(record_key(), "another-device", 0, &mut buf);

    if data.len() > MAX_PLAINTEXT_LEN {
        return;
    }
    let counter = u64::try_from(data.len()).expect("small");
    let mut sealed = vec![0u8; record::sealed_len(data.len())];
    sealed[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
    let n = record::seal(
        record_key(),
        RECORD_DEVICE,
        counter,
        [7; 12],
        &mut sealed,
        data.len(),
    )
    .expect("a plaintext within MAX_PLAINTEXT_LEN seals");
    let opened = record::open(record_key(), RECORD_DEVICE, counter, &mut sealed[..n])
        .expect("a sealed record opens");
    assert_eq!((opened.counter, opened.plaintext), (counter, data));
});
