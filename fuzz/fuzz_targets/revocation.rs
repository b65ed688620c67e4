//! Revocation payloads: `Snapshot::decode`, `Delta::decode` and `Heartbeat::decode` on
//! arbitrary bytes never panic; what decodes round-trips through `encode_snapshot`,
//! `encode_delta` and `encode_heartbeat`, iterating its entries never fails, and applying
//! it to a small `RevocationList` never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::NOW;
use tessera_shared::revocation::{
    self, Delta, Entry, Heartbeat, RevocationList, Snapshot, max_payload_len,
};

/// A small list, so the fuzzer reaches the overflow paths.
type List = RevocationList<4>;

fn entries(it: impl IntoIterator<Item = Result<Entry, tessera_shared::Error>>) -> Vec<Entry> {
    it.into_iter()
        .map(|e| e.expect("entries of a decoded payload decode"))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data) {
        let list = entries(s.entries());
        assert_eq!(list.len(), s.entries().len());
        let mut buf = vec![0u8; max_payload_len(list.len())];
        let n = revocation::encode_snapshot(s.seq(), s.issued_at(), &list, &mut buf)
            .expect("decoded snapshot encodes");
        let back = Snapshot::decode(&buf[..n]).expect("encoded snapshot decodes");
        assert_eq!((back.seq(), back.issued_at()), (s.seq(), s.issued_at()));
        assert_eq!(entries(back.entries()), list);
        let mut held = List::new();
        let _ = held.apply_snapshot(&s, NOW);
        assert!(held.len() <= 4);
    }
    if let Ok(d) = Delta::decode(data) {
        let list = entries(d.entries());
        let mut buf = vec![0u8; max_payload_len(list.len())];
        let n = revocation::encode_delta(d.seq(), d.issued_at(), &list, &mut buf)
            .expect("decoded delta encodes");
        let back = Delta::decode(&buf[..n]).expect("encoded delta decodes");
        assert_eq!((back.seq(), back.issued_at()), (d.seq(), d.issued_at()));
        assert_eq!(entries(back.entries()), list);
        let mut held = List::new();
        let _ = held.apply_delta(&d, NOW);
    }
    if let Ok(h) = Heartbeat::decode(data) {
        let mut buf = [0u8; 64];
        let n = revocation::encode_heartbeat(h.seq(), h.issued_at(), &mut buf)
            .expect("decoded heartbeat encodes");
        assert_eq!(Heartbeat::decode(&buf[..n]), Ok(h));
        let mut held = List::new();
        let _ = held.apply_heartbeat(&h);
    }
});
