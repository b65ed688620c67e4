use super::*;
use tessera_shared::revocation::MAX_PAGE_LEN;

const NOW: u64 = 1_700_000_000;
const LEEWAY: u64 = 30;

fn client(id: &str, kind: ClientKind, enrolled: bool) -> ClientRecord {
    ClientRecord {
        id: id.to_owned(),
        kind,
        public_key: None,
        role: "r".to_owned(),
        groups: Vec::new(),
        enrollment_code_key: None,
        enrolled_at: enrolled.then_some(NOW - 1000),
        revoked_at: None,
        created_at: NOW - 2000,
    }
}

fn token(n: u8, kind: TokenKind, subject: &str, audience: &str, iat: u64, exp: u64) -> IssuedToken {
    IssuedToken {
        cti: [n; 16],
        hash: [n; 32],
        kind,
        subject: subject.to_owned(),
        audience: audience.to_owned(),
        scope: "door:open".to_owned(),
        issued_at: iat,
        expires_at: exp,
    }
}

fn addressed(audience: &str, entry: Entry) -> Addressed {
    Addressed::new(audience, entry).expect("valid audience")
}

fn whole(id: &str, enrolled: bool, live: Vec<IssuedToken>) -> ResolvedSubject {
    ResolvedSubject {
        id: id.to_owned(),
        client: Some(client(id, ClientKind::Device, enrolled)),
        whole: true,
        live_tokens: live,
    }
}

#[test]
fn a_device_is_revoked_on_its_service_stream_and_told_only_if_it_ever_enrolled() {
    let resolved = Resolved {
        tokens: Vec::new(),
        subjects: vec![
            whole(
                "dev-a",
                true,
                vec![
                    token(
                        1,
                        TokenKind::Device,
                        "dev-a",
                        "tessera",
                        NOW - 600,
                        NOW + 300,
                    ),
                    token(
                        2,
                        TokenKind::Device,
                        "dev-a",
                        "tessera",
                        NOW - 100,
                        NOW + 800,
                    ),
                ],
            ),
            whole("dev-never", false, Vec::new()),
        ],
    };
    let plan = plan(&resolved, NOW, LEEWAY).expect("plan");
    assert_eq!(plan.revoked, 2);
    assert_eq!(
        plan.changes,
        BTreeMap::from([(
            "service/tessera".to_owned(),
            vec![vec![addressed(
                "tessera",
                Entry::for_subject("dev-a", NOW, NOW + 800 + LEEWAY).expect("id")
            )]]
        )])
    );
    assert_eq!(
        plan.controls,
        [PendingControl {
            device: "dev-a".into(),
            command: Command::Revoked,
            issued_at: NOW,
        }]
    );
}

#[test]
fn a_subject_gets_one_entry_per_audience_and_hash_entries_for_its_last_second() {
    let app = ResolvedSubject {
        id: "app-7".into(),
        client: Some(client("app-7", ClientKind::App, false)),
        whole: false,
        live_tokens: vec![
            token(1, TokenKind::Access, "app-7", "dev-a", NOW - 100, NOW + 20),
            token(2, TokenKind::Access, "app-7", "dev-a", NOW - 50, NOW + 250),
            token(3, TokenKind::Access, "app-7", "dev-b", NOW - 5, NOW + 115),
            token(4, TokenKind::Access, "app-7", "dev-a", NOW, NOW + 300),
        ],
    };
    let plan = plan(
        &Resolved {
            tokens: Vec::new(),
            subjects: vec![app],
        },
        NOW,
        LEEWAY,
    )
    .expect("plan");
    let mut entries: Vec<Addressed> = plan.changes.values().flatten().flatten().cloned().collect();
    entries.sort_by_key(|e| (e.audience.clone(), e.entry.expires_at()));
    assert_eq!(
        entries,
        [
            addressed(
                "dev-a",
                Entry::for_subject("app-7", NOW, NOW + 250 + LEEWAY).expect("id")
            ),
            addressed(
                "dev-a",
                Entry::Token {
                    hash: [4; 32],
                    expires_at: NOW + 300 + LEEWAY
                }
            ),
            addressed(
                "dev-b",
                Entry::for_subject("app-7", NOW, NOW + 115 + LEEWAY).expect("id")
            ),
        ]
    );
    for (stream, changes) in &plan.changes {
        for e in changes.iter().flatten() {
            assert_eq!(stream, &Stream::of_device(&e.audience).name().to_string());
        }
    }
    assert_eq!((plan.revoked, plan.controls.len()), (1, 0));
}

#[test]
fn the_entry_of_a_subject_lives_as_long_as_its_tokens_whatever_the_policy_says_now() {
    // The attack of the issue: a 3600 s token, then every lifetime cut to 20 s. The entry
    // must last until the token's own expiry, not 20 s.
    let app = ResolvedSubject {
        id: "app-7".into(),
        client: Some(client("app-7", ClientKind::App, false)),
        whole: false,
        live_tokens: vec![token(
            1,
            TokenKind::Access,
            "app-7",
            "dev-a",
            NOW - 60,
            NOW + 3540,
        )],
    };
    let plan = plan(
        &Resolved {
            tokens: Vec::new(),
            subjects: vec![app],
        },
        NOW,
        LEEWAY,
    )
    .expect("plan");
    let e = plan
        .changes
        .values()
        .flatten()
        .flatten()
        .next()
        .expect("an entry");
    assert_eq!(e.entry.expires_at(), NOW + 3540 + LEEWAY);
}

#[test]
fn a_device_token_revoked_by_hash_tells_its_device_to_refresh() {
    let t = token(
        9,
        TokenKind::Device,
        "dev-a",
        "tessera",
        NOW - 10,
        NOW + 890,
    );
    let access = token(8, TokenKind::Access, "app-7", "dev-a", NOW - 10, NOW + 290);
    let plan = plan(
        &Resolved {
            tokens: vec![
                (t, Some(client("dev-a", ClientKind::Device, true))),
                (access, Some(client("app-7", ClientKind::App, false))),
            ],
            subjects: Vec::new(),
        },
        NOW,
        LEEWAY,
    )
    .expect("plan");
    assert_eq!(plan.revoked, 2);
    assert_eq!(plan.entry_count(), 2);
    assert_eq!(
        plan.controls,
        [PendingControl {
            device: "dev-a".into(),
            command: Command::RefreshNow,
            issued_at: NOW,
        }]
    );
}

#[test]
fn an_already_revoked_device_counts_nothing_and_is_not_told_again() {
    // Even with a token still live (it was covered when the device was revoked).
    let mut s = whole(
        "dev-a",
        true,
        vec![token(
            1,
            TokenKind::Device,
            "dev-a",
            "tessera",
            NOW - 60,
            NOW + 800,
        )],
    );
    if let Some(c) = &mut s.client {
        c.revoked_at = Some(NOW - 5);
        c.enrolled_at = None;
    }
    let plan = plan(
        &Resolved {
            tokens: Vec::new(),
            subjects: vec![s],
        },
        NOW,
        LEEWAY,
    )
    .expect("plan");
    assert_eq!(
        (plan.revoked, plan.controls.len(), plan.entry_count()),
        (0, 0, 0)
    );
}

#[test]
fn a_device_token_whose_audience_is_not_an_identifier_cannot_be_addressed() {
    let t = token(1, TokenKind::Device, "dev-a", "not an id", NOW, NOW + 10);
    let r = plan(
        &Resolved {
            tokens: vec![(t, None)],
            subjects: Vec::new(),
        },
        NOW,
        LEEWAY,
    );
    assert!(r.is_err());
}

/// `n` subject entries for the service `tessera`, as a mass device revocation makes.
fn many(n: usize) -> Vec<Addressed> {
    (0..n)
        .map(|i| {
            addressed(
                "tessera",
                Entry::for_subject(&format!("device-{i:05}"), NOW, NOW + 900).expect("id"),
            )
        })
        .collect()
}

fn signed_len(stream: &Stream<'_>, page: &PagePlan, seq: u64) -> usize {
    let len: usize = page.entries.iter().map(Addressed::encoded_len).sum();
    let mut out = vec![0u8; tessera_shared::revocation::max_page_len(stream, len)];
    let n = tessera_shared::revocation::encode_page(
        seq,
        NOW,
        stream,
        page.from,
        page.to,
        &page.entries,
        &mut out,
    )
    .expect("encode");
    n + tessera_shared::cose::OVERHEAD
}

#[test]
fn changes_and_pages_fit_the_message_limit_and_keep_every_entry_once() {
    let stream = Stream::of_service("tessera").expect("id");
    let entries = many(10_000);
    let changes = chunk(&stream, entries.clone());
    assert!(changes.len() > 1);
    let seq = changes.len() as u64;
    for (i, c) in changes.iter().enumerate() {
        let page = PagePlan {
            from: i as u64 + 1,
            to: i as u64 + 1,
            entries: c.clone(),
        };
        assert!(signed_len(&stream, &page, seq) <= MAX_PAGE_LEN);
    }
    assert_eq!(changes.concat(), entries, "in order, none lost or repeated");

    // The snapshot of those changes: pages tile 1..=seq and hold every entry.
    let read: Vec<(u64, Vec<Addressed>)> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 + 1, c.clone()))
        .collect();
    let pages = pack(&stream, 1, seq, &read, true, None);
    assert_eq!(pages.first().map(|p| p.from), Some(1));
    assert_eq!(pages.last().map(|p| p.to), Some(seq));
    for w in pages.windows(2) {
        assert_eq!(w[1].from, w[0].to + 1, "pages tile the range");
    }
    for p in &pages {
        assert!(signed_len(&stream, p, seq) <= MAX_PAGE_LEN);
    }
    let all: Vec<Addressed> = pages.iter().flat_map(|p| p.entries.clone()).collect();
    assert_eq!(all, entries);
}

#[test]
fn a_page_reaches_the_latest_change_past_changes_left_without_entries() {
    let stream = Stream::of_device("dev-a");
    let e = |n: u8| {
        addressed(
            "dev-a",
            Entry::Token {
                hash: [n; 32],
                expires_at: NOW + 60,
            },
        )
    };
    // Changes 2 and 5 still carry entries; 1, 3, 4, 6, 7 carry none any more.
    let read = vec![(2, vec![e(2)]), (5, vec![e(5)])];
    assert_eq!(
        pack(&stream, 1, 7, &read, true, Some(1)),
        [PagePlan {
            from: 1,
            to: 7,
            entries: vec![e(2), e(5)],
        }]
    );
    // Nothing left at all: one empty page still covers the range.
    assert_eq!(
        pack(&stream, 3, 7, &[], true, None),
        [PagePlan {
            from: 3,
            to: 7,
            entries: Vec::new(),
        }]
    );
    // Nothing to cover.
    assert_eq!(pack(&stream, 8, 7, &[], true, None), []);
}

#[test]
fn a_read_cut_by_its_limit_leaves_its_last_change_for_the_next_page() {
    let stream = Stream::of_device("dev-a");
    let e = |n: u8| {
        addressed(
            "dev-a",
            Entry::Token {
                hash: [n; 32],
                expires_at: NOW + 60,
            },
        )
    };
    // The store stopped inside change 4: it may have more entries than these.
    let read = vec![(2, vec![e(2)]), (4, vec![e(4)])];
    assert_eq!(
        pack(&stream, 1, 9, &read, false, Some(1)),
        [PagePlan {
            from: 1,
            to: 2,
            entries: vec![e(2)],
        }]
    );
}

#[test]
fn a_read_cut_inside_its_only_change_gives_no_page_rather_than_claim_that_change_whole() {
    let stream = Stream::of_device("dev-a");
    let e = |n: u8| {
        addressed(
            "dev-a",
            Entry::Token {
                hash: [n; 32],
                expires_at: NOW + 60,
            },
        )
    };
    // The store stopped inside change 4, the only one read: a page covering it would tell
    // a verifier it holds change 4 whole, and it would never fetch the entries cut.
    assert_eq!(
        pack(&stream, 1, 9, &[(4, vec![e(4), e(5)])], false, Some(1)),
        []
    );
    assert_eq!(pack(&stream, 1, 9, &[(4, vec![e(4)])], false, None), []);
    assert_eq!(pack(&stream, 1, 9, &[], false, Some(1)), []);
}

#[test]
fn one_page_for_a_fetch_stops_where_the_next_change_does_not_fit() {
    let stream = Stream::of_service("tessera").expect("id");
    let changes = chunk(&stream, many(2_000));
    let read: Vec<(u64, Vec<Addressed>)> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64 + 11, c.clone()))
        .collect();
    let latest = 10 + changes.len() as u64;
    let pages = pack(&stream, 11, latest, &read, true, Some(1));
    assert_eq!(pages.len(), 1);
    let first = &pages[0];
    assert_eq!(first.from, 11);
    assert!(first.to < latest);
    assert_eq!(
        first.entries,
        changes[..usize::try_from(first.to - 10).expect("small")].concat()
    );
    assert!(signed_len(&stream, first, latest) <= MAX_PAGE_LEN);
}

#[test]
fn targets_name_themselves_for_the_audit_log() {
    assert_eq!(
        Target::Devices(vec!["a".into(), "b".into(), "c".into()]).describe(),
        "3 devices (a, …)"
    );
    assert_eq!(Target::Group("hall".into()).describe(), "group hall");
}
