//! docs/PROTOCOL.md is normative, and clients are written from it alone: the limits it
//! states next to a reference constant must be the constants' values.

use tessera_shared::{claims, cose, message, revocation, token};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// `16384` → `16 384`, the way PROTOCOL.md writes numbers.
fn spaced(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[test]
fn every_limit_named_after_a_constant_is_that_constant() {
    let limits: &[(&str, usize)] = &[
        ("cose::MAX_SIGN1_LEN", cose::MAX_SIGN1_LEN),
        ("cose::MAX_REQUEST_LEN", cose::MAX_REQUEST_LEN),
        ("cose::MAX_PROTECTED_LEN", cose::MAX_PROTECTED_LEN),
        ("cose::MAX_KID_LEN", cose::MAX_KID_LEN),
        ("token::MAX_TOKEN_LEN", token::MAX_TOKEN_LEN),
        ("claims::MAX_AUDIENCE_LEN", claims::MAX_AUDIENCE_LEN),
        ("claims::CTI_LEN", claims::CTI_LEN),
        ("message::NONCE_LEN", message::NONCE_LEN),
        ("message::MAX_GRANT_LEN", message::MAX_GRANT_LEN),
        ("message::MAX_REASON_LEN", message::MAX_REASON_LEN),
        ("message::MAX_REVOKE_LIST", message::MAX_REVOKE_LIST),
        ("revocation::MAX_PAGE_LEN", revocation::MAX_PAGE_LEN),
        (
            "revocation::MAX_ENTRIES_PER_PAGE",
            revocation::MAX_ENTRIES_PER_PAGE,
        ),
        (
            "revocation::MAX_STREAM_NAME_LEN",
            revocation::MAX_STREAM_NAME_LEN,
        ),
        ("revocation::MAX_REVOKED", revocation::MAX_REVOKED),
    ];
    for (name, value) in limits {
        let marker = format!("[`{name}`]");
        let at = DOC
            .find(&marker)
            .unwrap_or_else(|| panic!("PROTOCOL.md does not name {name}"));
        let before = &DOC[DOC[..at].rfind('|').unwrap_or(0)..at];
        assert!(
            before.contains(&spaced(*value)),
            "PROTOCOL.md gives {name} as {before:?}; the code says {}",
            spaced(*value)
        );
    }
}

#[test]
fn the_partition_count_and_the_default_max_age_are_the_documented_ones() {
    assert!(DOC.contains("(256 partitions)"));
    assert_eq!(revocation::PARTITIONS, 256);
    assert!(DOC.contains("90 s before any heartbeat"));
    assert_eq!(revocation::DEFAULT_MAX_AGE, 90);
    assert!(DOC.contains("max_age = min(3·H, max(2·H, L_min / 2))"));
    assert_eq!(revocation::recommended_max_age(30, 120), 60);
    assert_eq!(revocation::recommended_max_age(30, 900), 90);
}
