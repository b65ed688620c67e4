use super::*;
use proptest::prelude::*;
use std::vec::Vec;

const NOW: u64 = 1_700_000_000;
const DEV: &str = "device-42";

fn stream() -> Stream<'static> {
    Stream::of_device(DEV)
}

/// Another device id in the same partition as `DEV`.
fn neighbour() -> std::string::String {
    (0..10_000)
        .map(|i| std::format!("device-n{i}"))
        .find(|id| partition(id) == partition(DEV))
        .expect("a neighbour in 10 000 tries")
}

fn token(n: u8, expires_at: u64) -> Entry {
    Entry::Token {
        hash: [n; TOKEN_HASH_LEN],
        expires_at,
    }
}

fn subject(s: &str, issued_before: u64, expires_at: u64) -> Entry {
    Entry::for_subject(s, issued_before, expires_at).unwrap()
}

fn to(audience: &str, entry: Entry) -> Addressed {
    Addressed::new(audience, entry).unwrap()
}

fn page_bytes(
    stream: &Stream<'_>,
    seq: u64,
    issued_at: u64,
    from: u64,
    to: u64,
    entries: &[Addressed],
) -> Vec<u8> {
    let len = entries.iter().map(Addressed::encoded_len).sum();
    let mut out = std::vec![0u8; max_page_len(stream, len)];
    let n = encode_page(seq, issued_at, stream, from, to, entries, &mut out).unwrap();
    out.truncate(n);
    out
}

fn heartbeat_bytes(stream: &Stream<'_>, seq: u64, issued_at: u64, max_age: u64) -> Vec<u8> {
    let mut out = [0u8; MAX_HEARTBEAT_LEN];
    let n = encode_heartbeat(seq, issued_at, stream, max_age, &mut out).unwrap();
    out[..n].to_vec()
}

fn list<const N: usize>() -> RevocationList<Bounded<N>> {
    RevocationList::for_device(DEV, DEFAULT_LEEWAY).unwrap()
}

/// Applies a page of `DEV`'s stream carrying `entries` for `DEV`.
fn apply<S: EntryStore>(
    l: &mut RevocationList<S>,
    (seq, from, to): (u64, u64, u64),
    issued_at: u64,
    entries: &[Entry],
) -> Result<PageOutcome, Error> {
    let entries: Vec<Addressed> = entries.iter().cloned().map(|e| self::to(DEV, e)).collect();
    let bytes = page_bytes(&stream(), seq, issued_at, from, to, &entries);
    l.apply_page(&Page::decode(&bytes).unwrap(), issued_at)
}

fn beat<S: EntryStore>(l: &mut RevocationList<S>, seq: u64, issued_at: u64) -> HeartbeatOutcome {
    let bytes = heartbeat_bytes(&l.stream(), seq, issued_at, 60);
    l.apply_heartbeat(&Heartbeat::decode(&bytes).unwrap())
        .unwrap()
}

fn entries_of(page: &Page<'_>) -> Vec<Addressed> {
    page.entries().iter().map(Result::unwrap).collect()
}

// --- streams ---

#[test]
fn devices_follow_their_partition_and_services_their_own_stream() {
    assert_eq!(
        stream().name().as_str(),
        std::format!("devices/{:02x}", partition(DEV))
    );
    assert_eq!(Stream::parse(&stream().name()).unwrap(), stream());
    let svc = Stream::of_service("svc.telemetry").unwrap();
    assert_eq!(svc.name().as_str(), "service/svc.telemetry");
    assert_eq!(Stream::parse("service/svc.telemetry").unwrap(), svc);
    assert!(svc.carries("svc.telemetry") && !svc.carries("svc.other"));
    assert!(stream().carries(DEV) && stream().carries(&neighbour()));
}

#[test]
fn malformed_stream_names_are_refused() {
    for bad in [
        "devices/3F",
        "devices/3",
        "devices/123",
        "devices/zz",
        "service/",
        "service/a/b",
        "service/a+",
        "device/3f",
        "",
    ] {
        assert!(Stream::parse(bad).is_err(), "{bad:?}");
    }
    assert!(Stream::of_service("has space").is_err());
}

#[test]
fn an_entry_for_another_stream_cannot_be_encoded() {
    let other = Stream::Devices(partition(DEV).wrapping_add(1));
    let mut out = [0u8; 512];
    assert!(encode_page(1, NOW, &other, 1, 1, [to(DEV, token(1, NOW))], &mut out).is_err());
}

// --- payloads ---

#[test]
fn a_page_round_trips_with_its_range_stream_and_entries() {
    let entries = [
        to(DEV, token(1, NOW + 60)),
        to(&neighbour(), subject("app-7", NOW, NOW + 330)),
    ];
    let bytes = page_bytes(&stream(), 9, NOW, 3, 7, &entries);
    assert!(
        bytes.len() <= max_page_len(&stream(), entries.iter().map(Addressed::encoded_len).sum())
    );
    let page = Page::decode(&bytes).unwrap();
    assert_eq!(
        (
            page.seq(),
            page.issued_at(),
            page.from(),
            page.to(),
            page.stream()
        ),
        (9, NOW, 3, 7, stream())
    );
    assert_eq!(entries_of(&page), entries);
    assert_eq!(
        StreamMessage::decode(&bytes).unwrap(),
        StreamMessage::Page(page)
    );
}

#[test]
fn a_heartbeat_round_trips_with_its_max_age() {
    let svc = Stream::of_service("svc.telemetry").unwrap();
    let bytes = heartbeat_bytes(&svc, 12, NOW, 75);
    let hb = Heartbeat::decode(&bytes).unwrap();
    assert_eq!(
        (hb.seq(), hb.issued_at(), hb.stream(), hb.max_age()),
        (12, NOW, svc, 75)
    );
    assert_eq!(
        StreamMessage::decode(&bytes).unwrap(),
        StreamMessage::Heartbeat(hb)
    );
    // A heartbeat is not a page and a page is not a heartbeat.
    assert!(Page::decode(&bytes).is_err());
    let page = page_bytes(&svc, 1, NOW, 1, 1, &[]);
    assert!(Heartbeat::decode(&page).is_err());
}

#[test]
fn page_ranges_must_be_ordered_and_within_the_stream() {
    let mut out = [0u8; 256];
    for (seq, from, to) in [(5, 0, 3), (5, 4, 3), (5, 3, 6)] {
        assert!(
            encode_page(seq, NOW, &stream(), from, to, &[] as &[Addressed], &mut out).is_err(),
            "{from}..={to} of {seq}"
        );
    }
    // Hand-edit a valid page's `to` (the last byte) beyond its seq.
    let mut bytes = page_bytes(&stream(), 5, NOW, 3, 5, &[]);
    *bytes.last_mut().unwrap() = 6;
    assert_eq!(
        Page::decode(&bytes),
        Err(DecodeError::InvalidValue("page range").into())
    );
}

#[test]
fn a_page_with_an_entry_for_another_stream_is_refused_whole() {
    // Built by hand: the encoder refuses to write it.
    let good = page_bytes(&stream(), 1, NOW, 1, 1, &[to(DEV, token(1, NOW))]);
    // Same length as DEV, so the CBOR heads stay right.
    let other = (0..100)
        .map(|i| std::format!("device-{i:02}"))
        .find(|id| partition(id) != partition(DEV))
        .expect("a device of another partition");
    let mut bytes = good;
    let at = bytes
        .windows(DEV.len())
        .position(|w| w == DEV.as_bytes())
        .expect("the audience");
    bytes[at..at + DEV.len()].copy_from_slice(other.as_bytes());
    assert_eq!(
        Page::decode(&bytes),
        Err(DecodeError::InvalidValue("entry audience not on the page's stream").into())
    );
}

#[test]
fn a_heartbeat_is_recognised_whatever_the_position_of_its_type() {
    // {1: seq, 2: issued_at, 4: stream, 7: max_age, 0: 22}: the type last.
    let name = stream().name();
    let mut bytes = std::vec![0xa5, 0x01, 0x05, 0x02, 0x1a];
    bytes.extend_from_slice(&u32::try_from(NOW).unwrap().to_be_bytes());
    bytes.push(0x04);
    bytes.push(0x60 | u8::try_from(name.len()).unwrap());
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(&[0x07, 0x18, 60, 0x00, 0x16]);
    let hb = Heartbeat::decode(&bytes).unwrap();
    assert_eq!(
        StreamMessage::decode(&bytes),
        Ok(StreamMessage::Heartbeat(hb))
    );
    assert_eq!((hb.seq(), hb.max_age()), (5, 60));
}

#[test]
fn unknown_keys_duplicates_and_trailing_bytes_are_refused() {
    let good = heartbeat_bytes(&stream(), 1, NOW, 60);
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        Heartbeat::decode(&trailing),
        Err(DecodeError::TrailingBytes.into())
    );
    // {0: 22, 1: 1, 1: 1, ...}: replace key 2 by key 1.
    let mut dup = good.clone();
    let at = dup.iter().position(|b| *b == 0x02).unwrap();
    dup[at] = 0x01;
    assert!(matches!(
        Heartbeat::decode(&dup),
        Err(Error::Decode(DecodeError::DuplicateKey(1)))
    ));
    // A page key (5: from) in a heartbeat.
    let mut extra = good;
    extra[0] += 1; // one more map entry
    extra.extend_from_slice(&[0x05, 0x01]);
    assert_eq!(
        Heartbeat::decode(&extra),
        Err(DecodeError::InvalidValue("revocation payload key").into())
    );
}

#[test]
fn entries_with_an_invalid_audience_or_kind_are_refused() {
    // [0, "a b", h'..', 1]: an audience that is not an identifier.
    let mut bad = std::vec![0x84, 0x00, 0x63, b'a', b' ', b'b', 0x58, 0x20];
    bad.extend_from_slice(&[7; 32]);
    bad.push(0x01);
    let mut r = Reader::new(&bad);
    assert_eq!(
        Addressed::decode(&mut r),
        Err(DecodeError::InvalidValue("audience"))
    );
    // [2, ...]: an unknown kind.
    let unknown = [0x82, 0x02, 0x61, b'a'];
    assert_eq!(
        Addressed::decode(&mut Reader::new(&unknown)),
        Err(DecodeError::InvalidValue("revocation entry kind"))
    );
    // A token entry with a subject entry's length.
    let mut long = std::vec![0x85, 0x00, 0x61, b'a', 0x58, 0x20];
    long.extend_from_slice(&[7; 32]);
    long.extend_from_slice(&[0x01, 0x01]);
    assert_eq!(
        Addressed::decode(&mut Reader::new(&long)),
        Err(DecodeError::InvalidValue("array length"))
    );
}

#[test]
fn a_subject_that_is_not_an_identifier_is_refused() {
    // [1, "a", "app 7", 1, 1]: the subject holds a space.
    let bad = [
        0x85, 0x01, 0x61, b'a', 0x65, b'a', b'p', b'p', b' ', b'7', 0x01, 0x01,
    ];
    assert_eq!(
        Addressed::decode(&mut Reader::new(&bad)),
        Err(DecodeError::InvalidValue("subject"))
    );
    let mut good = bad;
    good[8] = b'-';
    assert!(Addressed::decode(&mut Reader::new(&good)).is_ok());
}

#[test]
fn a_signed_message_above_the_page_limit_is_refused_before_its_signature() {
    use crate::crypto::Signer as _;
    let signer = crate::crypto::testing::signer(1);
    let keys = signer.public_key();
    // Neighbour entries on DEV's stream, enough to pass 16 000 bytes signed.
    let n = neighbour();
    let entry = |i: u16| {
        let mut hash = [0u8; TOKEN_HASH_LEN];
        hash[..2].copy_from_slice(&i.to_be_bytes());
        to(
            &n,
            Entry::Token {
                hash,
                expires_at: NOW,
            },
        )
    };
    // Just past the page limit, within the general message limit.
    let count = u16::try_from(MAX_PAGE_LEN / entry(0).encoded_len() + 1).unwrap();
    let entries: Vec<Addressed> = (0..count).map(entry).collect();
    let sign = |entries: &[Addressed]| {
        let payload = page_bytes(&stream(), 1, NOW, 1, 1, entries);
        let mut out = std::vec![0u8; payload.len() + 200];
        let len = crate::cose::sign(&signer, &payload, &mut out).unwrap();
        out.truncate(len);
        out
    };
    let big = sign(&entries);
    assert!(big.len() > MAX_PAGE_LEN && big.len() <= crate::cose::MAX_SIGN1_LEN);
    assert_eq!(verify(&big, &keys), Err(DecodeError::TooLarge.into()));
    let small = sign(&entries[..100]);
    let payload = verify(&small, &keys).unwrap();
    assert!(matches!(
        StreamMessage::decode(payload),
        Ok(StreamMessage::Page(_))
    ));
}

#[test]
fn the_longest_entry_fits_its_bound() {
    let long = "x".repeat(MAX_ID_LEN);
    let e = to(&long, subject(&long, u64::MAX, u64::MAX));
    assert_eq!(e.encoded_len(), MAX_ENTRY_LEN);
}

#[test]
fn a_full_page_stays_within_the_message_limit() {
    // Pack the longest token entries the way the hub does, and sign the result.
    let svc_name = "s".repeat(MAX_ID_LEN);
    let svc = Stream::of_service(&svc_name).unwrap();
    let entry = to(&svc_name, token(1, u64::MAX));
    let per = entry.encoded_len();
    let fit = (MAX_PAGE_PAYLOAD_LEN - page_overhead(&svc)) / per;
    let entries = std::vec![entry; fit];
    let payload = page_bytes(&svc, u64::MAX, u64::MAX, 1, u64::MAX, &entries);
    assert!(payload.len() <= MAX_PAGE_PAYLOAD_LEN);
    let mut signed = std::vec![0u8; MAX_PAGE_LEN];
    let n = crate::cose::sign(&crate::crypto::testing::signer(1), &payload, &mut signed).unwrap();
    assert!(n <= MAX_PAGE_LEN);
    const {
        assert!(
            MAX_PAGE_LEN + 200 < crate::cose::MAX_SIGN1_LEN,
            "a page fits in a response"
        )
    };
}

#[test]
fn max_age_lies_between_two_and_three_heartbeats_and_tracks_short_lifetimes() {
    // Long lifetimes: three heartbeats.
    assert_eq!(recommended_max_age(30, 900), 90);
    // 120 s tokens: half their lifetime, 60 s.
    assert_eq!(recommended_max_age(30, 120), 60);
    // Very short tokens: never below two heartbeats (one may still be in flight).
    assert_eq!(recommended_max_age(30, 20), 60);
    assert_eq!(recommended_max_age(0, 100), 0);
}

// --- the list ---

#[test]
fn a_new_list_is_at_change_zero_complete_and_not_fresh() {
    let l: RevocationList<Bounded<4>> = list();
    assert_eq!((l.seq(), l.latest(), l.wanted_from()), (0, 0, None));
    assert!(l.is_complete() && l.is_empty());
    assert_eq!(l.fresh_as_of(), None);
    assert!(!l.is_fresh(NOW, u64::MAX));
    assert_eq!(l.max_age(None), DEFAULT_MAX_AGE);
    assert_eq!(l.max_age(Some(300)), DEFAULT_MAX_AGE);
    assert_eq!(l.max_age(Some(20)), 20);
}

#[test]
fn revoked_tokens_and_subjects_are_recognised() {
    let mut l: RevocationList<Bounded<4>> = list();
    let r = apply(
        &mut l,
        (5, 1, 5),
        NOW,
        &[token(1, NOW + 60), subject("app-7", NOW - 10, NOW + 300)],
    );
    assert_eq!(r, Ok(PageOutcome::Applied));
    assert!(l.is_revoked(&[1; 32], "anyone", NOW));
    assert!(!l.is_revoked(&[2; 32], "anyone", NOW));
    // Issued before the cut-off: revoked; at or after: not.
    assert!(l.is_revoked(&[2; 32], "app-7", NOW - 11));
    assert!(!l.is_revoked(&[2; 32], "app-7", NOW - 10));
    assert!(!l.is_revoked(&[2; 32], "app-8", NOW - 11));
    assert!(l.is_fresh(NOW, 0));
}

#[test]
fn entries_addressed_to_other_verifiers_are_not_kept() {
    let mut l: RevocationList<Bounded<2>> = list();
    let other = neighbour();
    // Far more entries for the neighbour than the list could hold: none is kept, and the
    // list stays complete and fresh.
    let entries: Vec<Addressed> = (0..50).map(|n| to(&other, token(n, NOW + 60))).collect();
    let bytes = page_bytes(&stream(), 1, NOW, 1, 1, &entries);
    assert_eq!(
        l.apply_page(&Page::decode(&bytes).unwrap(), NOW),
        Ok(PageOutcome::Applied)
    );
    assert!(l.is_empty());
    assert!(l.is_fresh(NOW, 0));
}

#[test]
fn a_page_or_heartbeat_of_another_stream_is_refused() {
    let mut l: RevocationList<Bounded<4>> = list();
    let other = Stream::Devices(partition(DEV).wrapping_add(1));
    let bytes = page_bytes(&other, 1, NOW, 1, 1, &[]);
    assert_eq!(
        l.apply_page(&Page::decode(&bytes).unwrap(), NOW),
        Err(DecodeError::InvalidValue("stream").into())
    );
    let hb = heartbeat_bytes(&other, 0, NOW, 60);
    assert_eq!(
        l.apply_heartbeat(&Heartbeat::decode(&hb).unwrap()),
        Err(DecodeError::InvalidValue("stream").into())
    );
    assert_eq!(
        l.fresh_as_of(),
        None,
        "another stream's heartbeat proves nothing"
    );
}

#[test]
fn pages_apply_in_any_order_and_the_list_is_complete_when_the_prefix_is() {
    let mut l: RevocationList<Bounded<8>> = list();
    // Changes 4..=6 arrive first: kept, but 1..=3 are missing.
    assert_eq!(
        apply(&mut l, (6, 4, 6), NOW, &[token(4, NOW + 60)]),
        Ok(PageOutcome::Gap { have: 0, latest: 6 })
    );
    assert!(
        l.is_revoked(&[4; 32], "x", 0),
        "entries beyond a gap are enforced"
    );
    assert_eq!(l.wanted_from(), Some(1));
    assert!(!l.is_fresh(NOW, u64::MAX));
    // 1..=3 closes the gap and reaches 6.
    assert_eq!(
        apply(&mut l, (6, 1, 3), NOW + 1, &[token(1, NOW + 60)]),
        Ok(PageOutcome::Applied)
    );
    assert_eq!((l.seq(), l.wanted_from()), (6, None));
    assert_eq!(l.fresh_as_of(), Some(NOW + 1));
}

#[test]
fn a_delta_after_a_gap_asks_for_the_missing_changes() {
    let mut l: RevocationList<Bounded<8>> = list();
    assert_eq!(apply(&mut l, (3, 1, 3), NOW, &[]), Ok(PageOutcome::Applied));
    assert_eq!(
        apply(&mut l, (5, 5, 5), NOW + 2, &[token(5, NOW + 60)]),
        Ok(PageOutcome::Gap { have: 3, latest: 5 })
    );
    assert_eq!(l.wanted_from(), Some(4));
    // Knowledge stays dated from before the gap.
    assert_eq!(l.fresh_as_of(), Some(NOW));
    assert!(!l.is_fresh(NOW, u64::MAX), "but it is not complete");
    assert_eq!(
        apply(&mut l, (5, 4, 4), NOW + 3, &[]),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(l.seq(), 5);
}

#[test]
fn a_replayed_or_duplicate_page_changes_nothing() {
    let mut l: RevocationList<Bounded<8>> = list();
    assert_eq!(
        apply(&mut l, (2, 1, 2), NOW, &[token(1, NOW + 60)]),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(
        apply(&mut l, (2, 2, 2), NOW - 50, &[token(1, NOW + 60)]),
        Ok(PageOutcome::AlreadyApplied)
    );
    assert_eq!(l.len(), 1);
    assert_eq!(
        l.fresh_as_of(),
        Some(NOW),
        "a replay never makes knowledge newer"
    );
}

#[test]
fn a_page_built_before_a_later_change_does_not_refresh_knowledge() {
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = beat(&mut l, 4, NOW);
    assert_eq!(l.latest(), 4);
    // A page of 1..=3 built when the stream was at 3 (a lagging replica, or an old
    // retained page) says nothing about being current at its issue time.
    assert_eq!(
        apply(&mut l, (3, 1, 3), NOW + 5, &[]),
        Ok(PageOutcome::Gap { have: 3, latest: 4 })
    );
    assert_eq!(l.fresh_as_of(), None);
}

#[test]
fn heartbeats_date_complete_knowledge_and_ask_for_what_is_missing() {
    let mut l: RevocationList<Bounded<8>> = list();
    assert_eq!(beat(&mut l, 0, NOW), HeartbeatOutcome::InSync);
    assert_eq!(l.fresh_as_of(), Some(NOW));
    assert_eq!(l.max_age(None), 60, "the announced max age");
    assert_eq!(l.max_age(Some(20)), 20, "a smaller configured one applies");
    assert_eq!(l.max_age(Some(300)), 60, "a larger configured one does not");
    // A replayed older heartbeat does not move freshness backwards.
    assert_eq!(beat(&mut l, 0, NOW - 30), HeartbeatOutcome::InSync);
    assert_eq!(l.fresh_as_of(), Some(NOW));
    // A heartbeat naming a change the list lacks.
    assert_eq!(beat(&mut l, 2, NOW + 30), HeartbeatOutcome::Behind);
    assert_eq!((l.wanted_from(), l.fresh_as_of()), (Some(1), Some(NOW)));
    // Once a replayed old heartbeat (seq 0) arrives, it is recognised as outdated.
    assert_eq!(beat(&mut l, 0, NOW + 40), HeartbeatOutcome::Outdated);
    assert_eq!(l.fresh_as_of(), Some(NOW));
}

#[test]
fn knowledge_goes_stale_when_heartbeats_stop() {
    // What a broker that suppresses revocation traffic looks like to a verifier.
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = beat(&mut l, 0, NOW);
    assert!(l.is_fresh(NOW + 60, 60));
    assert!(!l.is_fresh(NOW + 61, 60));
    // A hub clock slightly ahead of ours is not staleness.
    assert!(l.is_fresh(NOW - 5, 0));
}

#[test]
fn entries_drop_out_after_the_tokens_they_cover_expire() {
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = apply(
        &mut l,
        (1, 1, 1),
        NOW,
        &[token(1, NOW + 60), subject("app-7", NOW, NOW + 900)],
    );
    l.prune(NOW + 60 + DEFAULT_LEEWAY);
    assert_eq!(l.len(), 2, "kept through the leeway");
    l.prune(NOW + 61 + DEFAULT_LEEWAY);
    assert_eq!(l.len(), 1);
    assert!(!l.is_revoked(&[1; 32], "x", 0));
    l.prune(NOW + 931);
    assert!(l.is_empty());
}

#[test]
fn spent_entries_are_not_even_added() {
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = apply(
        &mut l,
        (1, 1, 1),
        NOW,
        &[token(1, NOW - 31), token(2, NOW - 30)],
    );
    assert_eq!(l.len(), 1);
    assert!(l.is_revoked(&[2; 32], "x", 0));
}

#[test]
fn duplicates_are_stored_once_with_the_later_cut_off_and_expiry() {
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = apply(
        &mut l,
        (3, 1, 3),
        NOW,
        &[
            token(1, NOW + 60),
            token(1, NOW + 90),
            subject("app-7", NOW - 100, NOW + 800),
            subject("app-7", NOW, NOW + 900),
            subject("app-7", NOW - 50, NOW + 850),
        ],
    );
    let mut held: Vec<Entry> = l.entries().collect();
    held.sort_by_key(Entry::expires_at);
    assert_eq!(held, [token(1, NOW + 90), subject("app-7", NOW, NOW + 900)]);
}

#[test]
fn a_full_list_makes_room_by_forgetting_spent_entries() {
    let mut l: RevocationList<Bounded<2>> = RevocationList::for_device(DEV, 0).unwrap();
    let _ = apply(
        &mut l,
        (1, 1, 1),
        NOW,
        &[token(1, NOW + 10), token(2, NOW + 100)],
    );
    assert_eq!(
        apply(&mut l, (2, 2, 2), NOW + 20, &[token(3, NOW + 100)]),
        Ok(PageOutcome::Applied)
    );
    assert!(l.is_revoked(&[3; 32], "x", 0));
    assert!(l.is_fresh(NOW + 20, 0));
}

/// Applies a page of `DEV`'s stream issued at `issued_at` when the verifier's clock reads
/// `now`.
fn apply_at<S: EntryStore>(
    l: &mut RevocationList<S>,
    (seq, from, to): (u64, u64, u64),
    issued_at: u64,
    now: u64,
    entries: &[Entry],
) -> Result<PageOutcome, Error> {
    let entries: Vec<Addressed> = entries.iter().cloned().map(|e| self::to(DEV, e)).collect();
    let bytes = page_bytes(&stream(), seq, issued_at, from, to, &entries);
    l.apply_page(&Page::decode(&bytes).unwrap(), now)
}

#[test]
fn a_verifier_without_a_known_time_skips_no_entry_as_spent() {
    // Time 0: an entry spent by any real clock is kept, and a full list forgets nothing to
    // make room (it fails closed instead).
    let mut l: RevocationList<Bounded<2>> = list();
    let long_spent = [token(1, 10), token(2, 20)];
    assert_eq!(
        apply_at(&mut l, (1, 1, 1), NOW, 0, &long_spent),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(l.len(), 2);
    assert_eq!(
        apply_at(&mut l, (2, 2, 2), NOW, 0, &[token(3, NOW + 60)]),
        Err(CapacityError::Revocations.into())
    );
    assert_eq!((l.len(), l.wanted_from()), (2, Some(2)));
    // Nothing was judged spent, so no later clock asks to fetch again.
    assert!(!l.must_refetch(0));
}

#[test]
fn a_clock_set_back_beyond_the_leeway_refetches_and_keeps_its_entries() {
    let mut l: RevocationList<Bounded<8>> = list();
    // Applied by a clock an hour fast: the entry expiring at NOW + 60 is skipped as spent.
    let ahead = NOW + 3600;
    assert_eq!(
        apply_at(
            &mut l,
            (1, 1, 1),
            NOW,
            ahead,
            &[token(1, NOW + 60), token(2, NOW + 7200)]
        ),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(beat(&mut l, 1, NOW), HeartbeatOutcome::InSync);
    assert_eq!(l.len(), 1);
    // A clock back by at most the leeway changes nothing.
    assert!(!l.must_refetch(ahead - DEFAULT_LEEWAY));
    assert!(l.is_fresh(ahead - DEFAULT_LEEWAY, 3600));
    // Set back by more: the list cannot vouch for what it skipped.
    assert!(l.must_refetch(ahead - DEFAULT_LEEWAY - 1));
    assert!(!l.is_fresh(NOW, 3600));
    l.refetch();
    assert_eq!((l.seq(), l.latest(), l.wanted_from()), (0, 1, Some(1)));
    assert_eq!((l.len(), l.fresh_as_of()), (1, None), "the entries stay");
    assert!(l.is_revoked(&[2; 32], "x", 0));
    assert!(!l.must_refetch(NOW), "asked once");
    // The stream fetched again at the right time holds the entry skipped before.
    assert_eq!(
        apply_at(
            &mut l,
            (1, 1, 1),
            NOW + 1,
            NOW + 1,
            &[token(1, NOW + 60), token(2, NOW + 7200)]
        ),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(l.len(), 2);
    assert!(l.is_revoked(&[1; 32], "x", 0));
    assert!(l.is_fresh(NOW + 1, 60));
}

#[test]
fn pruning_by_a_clock_later_set_back_also_refetches() {
    let mut l: RevocationList<Bounded<8>> = list();
    let _ = apply(&mut l, (1, 1, 1), NOW, &[token(1, NOW + 60)]);
    l.prune(NOW + 3600);
    assert!(l.is_empty());
    assert!(l.must_refetch(NOW + 10));
}

#[test]
fn at_capacity_every_kind_fits_and_one_more_fails_closed() {
    // The documented capacity: MAX_REVOKED live entries addressed to this device, of any
    // mix of kinds.
    let mut l: RevocationList = list::<MAX_REVOKED>();
    let full: Vec<Entry> = (0..MAX_REVOKED)
        .map(|i| {
            let i = u8::try_from(i).unwrap();
            if i % 2 == 0 {
                token(i, NOW + 330)
            } else {
                subject(&std::format!("app-{i}"), NOW, NOW + 330)
            }
        })
        .collect();
    assert_eq!(
        apply(&mut l, (1, 1, 1), NOW, &full),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(l.len(), MAX_REVOKED);
    assert!(l.is_fresh(NOW, 0));
    // One entry past it, of either kind.
    for (seq, one_more) in [
        (2, token(200, NOW + 330)),
        (3, subject("app-x", NOW, NOW + 330)),
    ] {
        assert_eq!(
            apply(&mut l, (seq, seq, seq), NOW + 1, &[one_more]),
            Err(Error::Capacity(CapacityError::Revocations))
        );
        assert!(!l.is_fresh(NOW + 1, u64::MAX), "an overflow is never fresh");
        assert_eq!(l.fresh_as_of(), None);
        assert_eq!(
            l.wanted_from(),
            Some(2),
            "the change is not counted as applied"
        );
        // What fitted is still enforced.
        assert!(l.is_revoked(&[0; 32], "x", 0));
        let _ = beat(&mut l, seq, NOW + 2);
        assert!(!l.is_fresh(NOW + 2, u64::MAX));
    }
    // Once the first entries are spent, the missing changes fit when fetched again, and the
    // list is complete and fresh.
    let later = NOW + 330 + DEFAULT_LEEWAY + 1;
    assert_eq!(
        apply(
            &mut l,
            (3, 2, 3),
            later,
            &[
                token(200, later + 300),
                subject("app-x", later, later + 300)
            ]
        ),
        Ok(PageOutcome::Applied)
    );
    assert_eq!(l.len(), 2);
    assert!(l.is_fresh(later, 0));
}

#[test]
fn an_overflowing_page_still_adds_every_entry_that_fits() {
    // Room for one: the first subject entry takes it, the token cannot, and the later
    // entry for the same subject still folds its later cut-off in (§11.5 step 3).
    let mut l = list::<1>();
    assert_eq!(
        apply(
            &mut l,
            (1, 1, 1),
            NOW,
            &[
                subject("app-7", NOW + 100, NOW + 900),
                token(9, NOW + 900),
                subject("app-7", NOW + 500, NOW + 900),
            ]
        ),
        Err(Error::Capacity(CapacityError::Revocations))
    );
    assert!(l.is_revoked(&[0; 32], "app-7", NOW + 400));
    assert!(!l.is_revoked(&[9; 32], "app-8", 0), "the token did not fit");
    assert_eq!((l.wanted_from(), l.fresh_as_of()), (Some(1), None));
}

#[test]
fn max_age_comes_from_the_newest_heartbeat_whatever_the_lists_state() {
    let mut l = list::<4>();
    let hb = |seq, at, max_age| heartbeat_bytes(&stream(), seq, at, max_age);
    // Behind: the newer heartbeat's max_age is taken all the same.
    let newer = hb(1, NOW + 30, 60);
    assert_eq!(
        l.apply_heartbeat(&Heartbeat::decode(&newer).unwrap()),
        Ok(HeartbeatOutcome::Behind)
    );
    assert_eq!(l.max_age(None), 60);
    assert_eq!(apply(&mut l, (1, 1, 1), NOW, &[]), Ok(PageOutcome::Applied));
    // An older heartbeat (delayed, or replayed) that finds the list in sync dates the
    // knowledge but does not override the newer announcement.
    let older = hb(1, NOW + 10, 45);
    assert_eq!(
        l.apply_heartbeat(&Heartbeat::decode(&older).unwrap()),
        Ok(HeartbeatOutcome::InSync)
    );
    assert_eq!(l.max_age(None), 60);
    assert_eq!(l.fresh_as_of(), Some(NOW + 10));
    let later = hb(1, NOW + 40, 45);
    assert_eq!(
        l.apply_heartbeat(&Heartbeat::decode(&later).unwrap()),
        Ok(HeartbeatOutcome::InSync)
    );
    assert_eq!((l.max_age(None), l.fresh_as_of()), (45, Some(NOW + 40)));
}

#[test]
fn pending_ranges_beyond_the_limit_are_fetched_again() {
    let mut l: RevocationList<Bounded<16>> = list();
    // Changes 3, 5, 7, 9, 11 arrive with 1 missing; only MAX_PENDING_RANGES are remembered.
    for c in [3, 5, 7, 9, 11] {
        let _ = apply(
            &mut l,
            (11, c, c),
            NOW,
            &[token(u8::try_from(c).unwrap(), NOW + 60)],
        );
    }
    assert_eq!(l.len(), 5, "every entry is enforced");
    // Filling 1..=10 in order: the prefix picks up every remembered range, and change 11,
    // which was not remembered, is still missing.
    for c in [1, 2, 4, 6, 8, 10] {
        let _ = apply(&mut l, (11, c, c), NOW, &[]);
    }
    assert_eq!(l.wanted_from(), Some(11));
    assert_eq!(
        apply(&mut l, (11, 11, 11), NOW, &[]),
        Ok(PageOutcome::Applied)
    );
}

#[test]
fn a_service_list_holds_a_hundred_thousand_entries() {
    const N: usize = 100_000;
    let mut l =
        RevocationList::for_service(Indexed::with_capacity(N), "svc.telemetry", 30).unwrap();
    let svc = Stream::of_service("svc.telemetry").unwrap();
    let mut seq = 0;
    let mut batch = Vec::new();
    for i in 0..N {
        let entry = if i % 2 == 0 {
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Entry::Token {
                hash,
                expires_at: NOW + 900,
            }
        } else {
            subject(&std::format!("device-{i}"), NOW, NOW + 900)
        };
        batch.push(to("svc.telemetry", entry));
        if batch.len() == 300 || i + 1 == N {
            seq += 1;
            let bytes = page_bytes(&svc, seq, NOW, seq, seq, &batch);
            assert!(bytes.len() <= MAX_PAGE_PAYLOAD_LEN);
            assert_eq!(
                l.apply_page(&Page::decode(&bytes).unwrap(), NOW),
                Ok(PageOutcome::Applied)
            );
            batch.clear();
        }
    }
    assert_eq!(l.len(), N);
    assert!(l.is_revoked(&[0; 32], "x", 0));
    assert!(l.is_revoked(&[7; 32], "device-99999", NOW - 1));
    assert!(!l.is_revoked(&[7; 32], "device-99999", NOW));
    assert!(
        !l.is_revoked(&[7; 32], "device-99998", NOW - 1),
        "even ids were tokens"
    );
    // One past its capacity fails closed like a device's list.
    let one_more = page_bytes(
        &svc,
        seq + 1,
        NOW,
        seq + 1,
        seq + 1,
        &[to("svc.telemetry", token(9, NOW + 900))],
    );
    assert_eq!(
        l.apply_page(&Page::decode(&one_more).unwrap(), NOW),
        Err(Error::Capacity(CapacityError::Revocations))
    );
}

// --- properties ---

fn any_entry() -> impl Strategy<Value = Addressed> {
    let id = "[A-Za-z0-9._-]{1,64}";
    prop_oneof![
        (id, any::<[u8; 32]>(), any::<u64>())
            .prop_map(|(aud, hash, expires_at)| { to(&aud, Entry::Token { hash, expires_at }) }),
        (id, id, any::<u64>(), any::<u64>()).prop_map(|(aud, s, issued_before, expires_at)| {
            to(&aud, subject(&s, issued_before, expires_at))
        }),
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_returns_the_same_page(
        entries in proptest::collection::vec(any_entry(), 0..40),
        seq in 1..u64::MAX,
        issued_at in any::<u64>(),
        svc in "[A-Za-z0-9._-]{1,64}",
    ) {
        let entries: Vec<Addressed> = entries
            .into_iter()
            .map(|e| Addressed { audience: heapless::String::try_from(svc.as_str()).unwrap(), ..e })
            .collect();
        let stream = Stream::of_service(&svc).unwrap();
        let bytes = page_bytes(&stream, seq, issued_at, 1, seq, &entries);
        let p = Page::decode(&bytes).unwrap();
        prop_assert_eq!((p.seq(), p.issued_at(), p.from(), p.to()), (seq, issued_at, 1, seq));
        prop_assert_eq!(entries_of(&p), entries);
        let hb = heartbeat_bytes(&stream, seq, issued_at, 90);
        let h = Heartbeat::decode(&hb).unwrap();
        prop_assert_eq!((h.seq(), h.issued_at(), h.max_age()), (seq, issued_at, 90));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = Page::decode(&bytes);
        let _ = Heartbeat::decode(&bytes);
        let _ = StreamMessage::decode(&bytes);
    }

    #[test]
    fn a_truncated_page_either_fails_or_iterates_cleanly(
        entries in proptest::collection::vec(any_entry(), 0..10),
        cut in any::<prop::sample::Index>(),
    ) {
        let entries: Vec<Addressed> = entries
            .into_iter()
            .map(|e| Addressed { audience: heapless::String::try_from(DEV).unwrap(), ..e })
            .collect();
        let bytes = page_bytes(&stream(), 1, 2, 1, 1, &entries);
        let cut = cut.index(bytes.len() + 1);
        if let Ok(p) = Page::decode(&bytes[..cut]) {
            prop_assert!(p.entries().iter().all(|e| e.is_ok()));
        }
    }

    #[test]
    fn pages_in_any_order_reach_the_same_list(
        order in Just((1..=8u64).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        // Changes 1..=8, each revoking one token; applied one by one in any order, the list
        // ends complete with all eight, whatever the order.
        let mut l: RevocationList<Bounded<16>> = list();
        for c in order {
            let _ = apply(&mut l, (8, c, c), NOW, &[token(u8::try_from(c).unwrap(), NOW + 60)]);
        }
        // At most MAX_PENDING_RANGES could be remembered beyond a gap; fetching from
        // `wanted_from` (as a verifier does) completes the list.
        while let Some(from) = l.wanted_from() {
            let _ = apply(&mut l, (8, from, 8), NOW, &[]);
        }
        prop_assert_eq!(l.len(), 8);
        prop_assert!(l.is_complete());
        prop_assert_eq!(l.seq(), 8);
    }
}
