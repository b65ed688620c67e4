//! Revocation stream payloads: `Page::decode`, `Heartbeat::decode` and
//! `StreamMessage::decode` on arbitrary bytes never panic and agree with each other.
//! Whatever decodes round-trips: `encode_page` / `encode_heartbeat` of the decoded value
//! decodes to an equal value and encodes to the same bytes again (a page holding an entry its
//! stream does not carry is the one exception: the decoder leaves such entries to the
//! verifier, the encoder refuses them). Iterating a page's entries never fails. Applied to
//! a small list that follows its stream, a page never fails but for capacity, a list that
//! overflowed is never fresh, one that did not holds every entry addressed to it, and
//! applying the same page twice changes nothing; a heartbeat is compared as the list's
//! rules say; a list of another stream refuses both.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tessera_fuzz::{AUDIENCE, NOW};
use tessera_shared::Error;
use tessera_shared::error::{DecodeError, EncodeError};
use tessera_shared::revocation::{
    self, Addressed, Bounded, Entry, Heartbeat, HeartbeatOutcome, MAX_HEARTBEAT_LEN, PARTITIONS,
    Page, PageOutcome, RevocationList, Stream, StreamMessage, partition,
};

/// A small list, so the fuzzer reaches the overflow paths.
type List = RevocationList<Bounded<4>>;

const LEEWAY: u64 = 30;

/// A device id in each partition, so every `devices/{pp}` stream has a list to apply to.
static DEVICE_IN: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut ids = vec![String::new(); PARTITIONS];
    let mut left = PARTITIONS;
    for i in 0u64.. {
        let id = format!("device-{i}");
        let slot = &mut ids[usize::from(partition(&id))];
        if slot.is_empty() {
            *slot = id;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    ids
});

/// A list that follows `stream`, for `preferred` if the stream carries it (so the entries
/// addressed to it are kept), else for some audience of the stream.
fn list_for(stream: &Stream<'_>, preferred: Option<&str>) -> List {
    let list = match stream {
        Stream::Service(name) => List::for_service(Bounded::new(), name, LEEWAY),
        Stream::Devices(p) => {
            let device = preferred
                .filter(|a| stream.carries(a))
                .unwrap_or(&DEVICE_IN[usize::from(*p)]);
            List::for_device(device, LEEWAY)
        }
    };
    let list = list.expect("a decoded stream names a valid audience");
    assert_eq!(list.stream(), *stream);
    list
}

/// A list of some other stream than `stream`.
fn list_elsewhere(stream: &Stream<'_>) -> List {
    let device = if Stream::of_device(AUDIENCE) == *stream {
        &DEVICE_IN[usize::from(partition(AUDIENCE).wrapping_add(1))]
    } else {
        AUDIENCE
    };
    List::for_device(device, LEEWAY).expect("a valid id")
}

/// Everything a page says, decoded. (`Page`'s own `==` compares its entries' wire bytes,
/// which the lenient decoder may have read in a longer form than the encoder writes.)
fn content(p: &Page<'_>) -> (u64, u64, String, u64, u64, Vec<Addressed>) {
    let entries: Vec<Addressed> = p
        .entries()
        .iter()
        .map(|e| e.expect("entries of a decoded page decode"))
        .collect();
    assert_eq!(entries.len(), p.entries().len());
    let stream = p.stream().name().to_string();
    (p.seq(), p.issued_at(), stream, p.from(), p.to(), entries)
}

fn check_page(p: &Page<'_>) {
    let decoded = content(p);
    let entries = &decoded.5;
    assert!(1 <= p.from() && p.from() <= p.to() && p.to() <= p.seq());

    let stream = p.stream();
    let len = entries.iter().map(Addressed::encoded_len).sum();
    let mut buf = vec![0u8; revocation::max_page_len(&stream, len)];
    let encoded = revocation::encode_page(
        p.seq(),
        p.issued_at(),
        &stream,
        p.from(),
        p.to(),
        entries,
        &mut buf,
    );
    if entries.iter().all(|e| stream.carries(&e.audience)) {
        let n = encoded.expect("a decoded page encodes within max_page_len");
        let back = Page::decode(&buf[..n]).expect("an encoded page decodes");
        assert_eq!(content(&back), decoded);
        let mut again = vec![0u8; n];
        let m = revocation::encode_page(
            back.seq(),
            back.issued_at(),
            &back.stream(),
            back.from(),
            back.to(),
            back.entries().iter().map(|e| e.expect("decodes")),
            &mut again,
        )
        .expect("encodes again");
        assert_eq!(buf[..n], again[..m], "encoding is not stable");
    } else {
        assert_eq!(
            encoded,
            Err(EncodeError::InvalidValue("entry audience is not on this stream").into())
        );
    }

    // A list of the page's stream, for the first audience the page is addressed to.
    let mut list = list_for(&stream, entries.first().map(|e| e.audience.as_str()));
    match list.apply_page(p, NOW) {
        Ok(outcome) => {
            assert_eq!(list.latest(), p.seq());
            assert!(list.len() <= 4);
            let mine = entries
                .iter()
                .filter(|e| e.audience == list.audience() && !e.entry.is_spent(NOW, LEEWAY));
            for e in mine {
                let revoked = match &e.entry {
                    Entry::Token { hash, .. } => list.is_revoked(hash, "", 0),
                    Entry::Subject {
                        subject,
                        issued_before,
                        ..
                    } => *issued_before == 0 || list.is_revoked(&[0; 32], subject, 0),
                };
                assert!(revoked, "an applied entry is not held: {e:?}");
            }
            if p.from() == 1 {
                assert_eq!(list.seq(), p.to());
                assert_eq!(
                    outcome == PageOutcome::Applied,
                    p.to() == p.seq(),
                    "{outcome:?}"
                );
                assert_eq!(list.is_fresh(p.issued_at(), 0), p.to() == p.seq());
                let held = list.len();
                assert_eq!(list.apply_page(p, NOW), Ok(PageOutcome::AlreadyApplied));
                assert_eq!(list.len(), held);
            } else {
                assert_eq!(
                    outcome,
                    PageOutcome::Gap {
                        have: 0,
                        latest: p.seq()
                    }
                );
                assert_eq!(list.seq(), 0);
                assert_eq!(list.wanted_from(), Some(1));
                assert!(!list.is_fresh(NOW, u64::MAX));
            }
        }
        Err(Error::Capacity(_)) => {
            assert_eq!(list.fresh_as_of(), None);
            assert!(!list.is_fresh(NOW, u64::MAX));
            assert!(list.wanted_from().is_some());
        }
        Err(e) => panic!("a page of the list's own stream is refused: {e:?}"),
    }
    assert_eq!(
        list_elsewhere(&stream).apply_page(p, NOW),
        Err(DecodeError::InvalidValue("stream").into())
    );
}

fn check_heartbeat(h: &Heartbeat<'_>) {
    let stream = h.stream();
    let mut buf = [0u8; MAX_HEARTBEAT_LEN];
    let n = revocation::encode_heartbeat(h.seq(), h.issued_at(), &stream, h.max_age(), &mut buf)
        .expect("a decoded heartbeat encodes");
    let back = Heartbeat::decode(&buf[..n]).expect("an encoded heartbeat decodes");
    assert_eq!(&back, h);
    assert_eq!(
        StreamMessage::decode(&buf[..n]),
        Ok(StreamMessage::Heartbeat(back))
    );
    let mut again = [0u8; MAX_HEARTBEAT_LEN];
    let m = revocation::encode_heartbeat(
        back.seq(),
        back.issued_at(),
        &back.stream(),
        back.max_age(),
        &mut again,
    )
    .expect("encodes again");
    assert_eq!(buf[..n], again[..m], "encoding is not stable");

    let mut list = list_for(&stream, None);
    if h.seq() == 0 {
        assert_eq!(list.apply_heartbeat(h), Ok(HeartbeatOutcome::InSync));
        assert_eq!(list.fresh_as_of(), Some(h.issued_at()));
        assert_eq!(list.max_age(None), h.max_age());
        assert_eq!(list.max_age(Some(7)), 7);
    } else {
        assert_eq!(list.apply_heartbeat(h), Ok(HeartbeatOutcome::Behind));
        assert_eq!(list.wanted_from(), Some(1));
        assert_eq!(list.latest(), h.seq());
        assert!(!list.is_fresh(h.issued_at(), u64::MAX));
    }
    assert_eq!(
        list_elsewhere(&stream).apply_heartbeat(h),
        Err(DecodeError::InvalidValue("stream").into())
    );
}

fuzz_target!(|data: &[u8]| {
    let message = StreamMessage::decode(data);
    let page = Page::decode(data);
    let heartbeat = Heartbeat::decode(data);
    match (&message, &page, &heartbeat) {
        (Ok(StreamMessage::Page(m)), Ok(p), Err(_)) => assert_eq!(m, p),
        (Ok(StreamMessage::Heartbeat(m)), Err(_), Ok(h)) => assert_eq!(m, h),
        // `StreamMessage` tells the kinds apart by the first key, which producers write
        // first: a heartbeat with its keys in another order is decoded (and refused) as a
        // page. Its re-encoding, type first, is checked in `check_heartbeat`.
        (Err(_), Err(_), Ok(_)) => {}
        (Err(_), Err(_), Err(_)) => {}
        other => panic!("the decoders disagree: {other:?}"),
    }
    if let Ok(p) = &page {
        check_page(p);
    }
    if let Ok(h) = &heartbeat {
        check_heartbeat(h);
    }
});
