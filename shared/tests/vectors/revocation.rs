//! The committed revocation vectors (PROTOCOL.md §11), generated deterministically.
//!
//! `examples/make_vectors.rs` writes [`to_json`] to `testdata/revocation_vectors.json`
//! (schema: `testdata/README.md`); `tests/revocation_vectors.rs` regenerates it in memory,
//! compares it with the committed file byte for byte and runs every case through the core;
//! `interop/verify_revocation_vectors.py` checks the same file independently.
//!
//! The file has four parts:
//!
//! - **streams**: the stream each of a few audiences follows (§11.2);
//! - **tokens**: hub-issued tokens with their token hash (§6.6), among them re-encodings of
//!   one token that must share its hash;
//! - **messages**: signed pages and heartbeats (§11.3), valid ones with their decoded
//!   content, invalid ones with the one reason they are refused;
//! - **lists**: verifier-state vectors (§11.5): messages applied in order to the list of one
//!   audience, with the outcome and state after each step, then which tokens it revokes
//!   and when its knowledge is fresh.
//!
//! Everything is fixed: the keys (`keys.rs`), the times, the tokens; ES256 signatures are
//! RFC 6979 with low `s`, as the core signs. Every valid payload is written by hand here
//! *and* checked against the core's encoder, so the valid vectors are exactly what the hub
//! publishes. Every invalid message is one valid message with one change; it carries that
//! valid message as its `repaired` form, which the test requires to pass, so an invalid
//! vector cannot fail for a second, unintended reason. Payload defects are signed by the
//! hub over the defective payload: only the payload is wrong. The expected outcomes and
//! states of the lists are written out by hand from §11.5, not computed by the core: the
//! test holds the core to them.

// Included by an example and by a test, each of which uses only part of it.
#![allow(dead_code)]

use serde::Serialize;
use tessera_shared::Error;
use tessera_shared::claims::Claims;
use tessera_shared::cose;
use tessera_shared::crypto::{PublicKey, Signer as _};
use tessera_shared::error::{CapacityError, DecodeError, SignatureError};
use tessera_shared::revocation::{
    self, Addressed, DEFAULT_MAX_AGE, Entry, EntryStore, HeartbeatOutcome, PageOutcome,
    RevocationList, Stream, StreamMessage, TokenHash, partition,
};
use tessera_shared::scope::Scopes;
use tessera_shared::token;

use crate::generator::{
    Expect, MapForm, Parts, SigningKey, array, bstr, cose_key, holder, issuer, map, other_issuer,
    text, twin_s, uint,
};

/// Where the revocation vectors are committed.
pub(crate) const REVOCATION_VECTORS_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/revocation_vectors.json"
);

/// The token vectors' `iat`: the start of the vectors' timeline.
pub(crate) const T: u64 = crate::generator::IAT;
/// Lifetime of every vector token.
const LIFETIME: u64 = crate::generator::LIFETIME;
/// The leeway of the hub (added to `expires_at`) and of the verifiers (spent entries).
pub(crate) const LEEWAY: u64 = revocation::DEFAULT_LEEWAY;

pub(crate) const HUB: &str = crate::generator::ISSUER_ID;
/// The device whose partition most vectors use: `devices/03`.
pub(crate) const DEVICE: &str = crate::generator::AUDIENCE;
/// Another device of `DEVICE`'s partition (the first `device-n{i}` there).
pub(crate) const NEIGHBOUR: &str = "device-n4";
/// A device of another partition, `devices/5e`.
pub(crate) const OTHER_DEVICE: &str = crate::generator::OTHER_AUDIENCE;
/// The service whose stream the vectors use.
pub(crate) const SERVICE: &str = "svc.telemetry";
const OTHER_SERVICE: &str = "svc.other";
const APP: &str = crate::generator::SUBJECT;
const OTHER_APP: &str = "app-8";

/// Change 1 of `devices/03`: the subject `app-7` is revoked (kind 2).
const R1: u64 = T + 300;
/// Change 2 of `devices/03`: `app-8`'s token for `device-42` is revoked by hash.
const R2: u64 = T + 400;
/// The heartbeat of `devices/03` after change 1.
const HB1: u64 = T + 330;
/// The snapshot of `devices/03` is republished at the first heartbeat after change 2…
const SNAPSHOT: u64 = T + 430;
/// …and the next heartbeat names change 2.
const HB2: u64 = T + 460;
/// Every entry of `devices/03` is spent by then (the latest `expires_at` is `T + 1230`).
const ALL_SPENT: u64 = T + 1300;
const HB_LATE: u64 = ALL_SPENT + 30;
/// Changes 1 and 2 of `service/svc.telemetry`: `device-43` revoked (kind 3), then
/// `device-42`'s device token by hash.
const S1: u64 = T + 500;
const S2: u64 = T + 510;
const SERVICE_PAGE: u64 = T + 520;
const SERVICE_HB: u64 = T + 530;
/// `max_age` the hub announces: `min(3H, max(2H, L/2))` with `H = 30` s, for 120 s access
/// tokens on device partitions and 900 s device tokens on service streams.
const DEVICE_MAX_AGE: u64 = 60;
const SERVICE_MAX_AGE: u64 = 90;

// ------------------------------------------------------------------------------------------
// Tokens.

/// A hub-issued test token.
#[derive(Clone)]
pub(crate) struct TestToken {
    pub(crate) name: &'static str,
    pub(crate) description: &'static str,
    pub(crate) bytes: Vec<u8>,
    /// `aud`, `sub`, `iat`, `exp`; `None` for bytes that are no COSE_Sign1.
    pub(crate) claims: Option<(&'static str, &'static str, u64, u64)>,
    /// The token this is a re-encoding of (same signed message, same hash).
    pub(crate) same_token_as: Option<&'static str>,
}

impl TestToken {
    pub(crate) fn hash(&self) -> TokenHash {
        revocation::token_hash(&self.bytes)
    }

    fn exp(&self) -> u64 {
        self.claims.expect("a token").3
    }

    fn iat(&self) -> u64 {
        self.claims.expect("a token").2
    }
}

fn issue(aud: &'static str, sub: &'static str, iat: u64, cti: &'static [u8; 16]) -> Vec<u8> {
    let scope = if aud == SERVICE {
        "telemetry:write"
    } else {
        crate::generator::SCOPE
    };
    let claims = Claims {
        iss: HUB,
        sub,
        aud,
        exp: iat + LIFETIME,
        nbf: None,
        iat,
        cti,
        cnf: holder().public_key(),
        scope: Scopes::parse(scope).expect("the scope is valid"),
    };
    let mut buf = [0u8; 1024];
    let n = token::issue(&claims, &issuer(), &mut buf).expect("the token fits");
    buf[..n].to_vec()
}

fn token(
    name: &'static str,
    description: &'static str,
    (aud, sub, iat): (&'static str, &'static str, u64),
    cti: &'static [u8; 16],
) -> TestToken {
    TestToken {
        name,
        description,
        bytes: issue(aud, sub, iat, cti),
        claims: Some((aud, sub, iat, iat + LIFETIME)),
        same_token_as: None,
    }
}

/// Splits a token as the hub issues it into its protected header, payload and signature.
fn parts_of(issued: &[u8]) -> (&[u8], &[u8], [u8; 64]) {
    // d2 84 4d <13 bytes> a0 <payload head> <payload> 58 40 <64 bytes>
    assert_eq!(issued[..3], [0xd2, 0x84, 0x4d]);
    let protected = &issued[3..16];
    assert_eq!(issued[16], 0xa0);
    let (at, len) = match issued[17] {
        0x58 => (19, usize::from(issued[18])),
        0x59 => (
            20,
            usize::from(u16::from_be_bytes([issued[18], issued[19]])),
        ),
        h => panic!("unexpected payload head {h:#x}"),
    };
    let payload = &issued[at..at + len];
    let signature = issued[issued.len() - 64..]
        .try_into()
        .expect("64-byte signature");
    (protected, payload, signature)
}

/// The same signed message with every head in a longer form than needed (protected header
/// and signature with a 1-byte length, payload with a 2-byte one); with the CWT tag and
/// the high-`s` signature if asked.
fn long_heads(issued: &[u8], cwt_tag: bool, high_s: bool) -> Vec<u8> {
    let (protected, payload, signature) = parts_of(issued);
    let signature = if high_s {
        twin_s(&signature)
    } else {
        signature
    };
    let mut out = Vec::new();
    if cwt_tag {
        out.extend_from_slice(&[0xd8, 61]);
    }
    out.extend_from_slice(&[0xd2, 0x84, 0x58, 13]);
    out.extend_from_slice(protected);
    out.push(0xa0);
    out.push(0x59);
    out.extend_from_slice(&u16::try_from(payload.len()).expect("short").to_be_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&[0x59, 0x00, 0x40]);
    out.extend_from_slice(&signature);
    out
}

/// Every test token, in the order they are committed.
pub(crate) fn tokens() -> Vec<TestToken> {
    let a = token(
        "access_app7",
        "app-7's token for device-42, issued at T: the `valid` token of vectors.json",
        (DEVICE, APP, T),
        &crate::generator::CTI,
    );
    assert_eq!(
        a.bytes,
        {
            let mut buf = [0u8; 1024];
            let claims = crate::generator::ClaimSet::baseline().as_claims();
            let n = token::issue(&claims, &issuer(), &mut buf).expect("fits");
            buf[..n].to_vec()
        },
        "access_app7 is the token vectors' `valid` token"
    );
    let copy = |name, description, bytes| TestToken {
        name,
        description,
        bytes,
        claims: a.claims,
        same_token_as: Some("access_app7"),
    };
    let mut high_s = a.bytes.clone();
    let at = high_s.len() - 64;
    let twin = twin_s(&high_s[at..]);
    high_s[at..].copy_from_slice(&twin);
    let untagged = a.bytes[1..].to_vec();
    let tag_61 = [&[0xd8, 61][..], &a.bytes].concat();
    let longer = long_heads(&a.bytes, false, false);
    let everything = long_heads(&a.bytes, true, true);
    let truncated = a.bytes[..a.bytes.len() - 1].to_vec();
    let rest = vec![
        copy(
            "access_app7_untagged",
            "access_app7 without tag 18",
            untagged,
        ),
        copy(
            "access_app7_cwt_tag_61",
            "access_app7 wrapped in the CWT tag 61",
            tag_61,
        ),
        copy(
            "access_app7_high_s",
            "access_app7 with the high-s twin of its signature (n - s)",
            high_s,
        ),
        copy(
            "access_app7_long_heads",
            "access_app7 with the protected header, payload and signature behind longer \
             heads than needed (58 0d, 59 00 nn, 59 00 40)",
            longer,
        ),
        copy(
            "access_app7_every_re_encoding",
            "access_app7 with tag 61, longer heads and the high-s signature at once",
            everything,
        ),
        TestToken {
            name: "not_a_cose_sign1",
            description: "access_app7 without its last byte: no COSE_Sign1, so hashed as it is",
            bytes: truncated,
            claims: None,
            same_token_as: None,
        },
        token(
            "access_app7_same_second",
            "app-7's token for device-42 issued in the second of change 1 (T+300, where \
             T = 1700000000): revoked by hash, not by the subject entry (iat < issued_before \
             is strict)",
            (DEVICE, APP, R1),
            b"tessera-revoc-0b",
        ),
        token(
            "access_app7_after",
            "app-7's token for device-42 issued the second after change 1: not revoked",
            (DEVICE, APP, R1 + 1),
            b"tessera-revoc-0c",
        ),
        token(
            "access_app8",
            "app-8's token for device-42: revoked by hash in change 2",
            (DEVICE, OTHER_APP, T + 10),
            b"tessera-revoc-0d",
        ),
        token(
            "access_app7_for_neighbour",
            "app-7's token for device-n4, a device of the same partition: revoked by the \
             subject entry of change 1 addressed to device-n4",
            (NEIGHBOUR, APP, T),
            b"tessera-revoc-0e",
        ),
        token(
            "device_token_42",
            "device-42's device token for svc.telemetry: revoked by hash on its service stream",
            (SERVICE, DEVICE, T),
            b"tessera-revoc-0f",
        ),
        token(
            "device_token_43",
            "device-43's device token for svc.telemetry: revoked by the subject entry of \
             device-43's revocation",
            (SERVICE, OTHER_DEVICE, T),
            b"tessera-revoc-10",
        ),
    ];
    std::iter::once(a).chain(rest).collect()
}

fn find<'a>(tokens: &'a [TestToken], name: &str) -> &'a TestToken {
    tokens
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no token {name}"))
}

// ------------------------------------------------------------------------------------------
// Streams.

/// An audience and the stream it follows.
pub(crate) struct StreamOf {
    pub(crate) audience: &'static str,
    pub(crate) service: bool,
    pub(crate) stream: String,
}

pub(crate) fn streams() -> Vec<StreamOf> {
    let device = |audience: &'static str| StreamOf {
        audience,
        service: false,
        stream: Stream::of_device(audience).name().to_string(),
    };
    let service = |audience: &'static str| StreamOf {
        audience,
        service: true,
        stream: Stream::of_service(audience)
            .expect("an identifier")
            .name()
            .to_string(),
    };
    assert_eq!(partition(NEIGHBOUR), partition(DEVICE));
    assert_ne!(partition(OTHER_DEVICE), partition(DEVICE));
    vec![
        device(DEVICE),
        device(NEIGHBOUR),
        device(OTHER_DEVICE),
        // Partitions 00 and ff, one with hex letters, a one-byte id, a 64-byte id.
        device("device-324"),
        device("device-725"),
        device("device-17"),
        device("a"),
        device("DD._-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
        service(SERVICE),
        service("A.b_c-9"),
    ]
}

// ------------------------------------------------------------------------------------------
// Messages.

/// An entry as it travels in a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ent {
    Token {
        audience: &'static str,
        hash: TokenHash,
        expires_at: u64,
    },
    Subject {
        audience: &'static str,
        subject: &'static str,
        issued_before: u64,
        expires_at: u64,
    },
}

impl Ent {
    fn encode(&self) -> Vec<u8> {
        match self {
            Ent::Token {
                audience,
                hash,
                expires_at,
            } => array(&[uint(0), text(audience), bstr(hash), uint(*expires_at)]),
            Ent::Subject {
                audience,
                subject,
                issued_before,
                expires_at,
            } => array(&[
                uint(1),
                text(audience),
                text(subject),
                uint(*issued_before),
                uint(*expires_at),
            ]),
        }
    }

    fn addressed(&self) -> Addressed {
        match self {
            Ent::Token {
                audience,
                hash,
                expires_at,
            } => Addressed::new(
                audience,
                Entry::Token {
                    hash: *hash,
                    expires_at: *expires_at,
                },
            ),
            Ent::Subject {
                audience,
                subject,
                issued_before,
                expires_at,
            } => Addressed::new(
                audience,
                Entry::for_subject(subject, *issued_before, *expires_at).expect("a subject"),
            ),
        }
        .expect("an identifier audience")
    }
}

/// The content of a page or heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Msg {
    Page {
        seq: u64,
        issued_at: u64,
        stream: String,
        from: u64,
        to: u64,
        entries: Vec<Ent>,
    },
    Heartbeat {
        seq: u64,
        issued_at: u64,
        stream: String,
        max_age: u64,
    },
}

const TYPE_PAGE: u64 = 20;
const TYPE_HEARTBEAT: u64 = 22;
const TYPE_RETIRED: u64 = 21;

impl Msg {
    /// `(key, encoded value)` in the order the hub writes them.
    fn fields(&self) -> Vec<(i64, Vec<u8>)> {
        match self {
            Msg::Page {
                seq,
                issued_at,
                stream,
                from,
                to,
                entries,
            } => vec![
                (0, uint(TYPE_PAGE)),
                (1, uint(*seq)),
                (2, uint(*issued_at)),
                (
                    3,
                    array(&entries.iter().map(Ent::encode).collect::<Vec<_>>()),
                ),
                (4, text(stream)),
                (5, uint(*from)),
                (6, uint(*to)),
            ],
            Msg::Heartbeat {
                seq,
                issued_at,
                stream,
                max_age,
            } => vec![
                (0, uint(TYPE_HEARTBEAT)),
                (1, uint(*seq)),
                (2, uint(*issued_at)),
                (4, text(stream)),
                (7, uint(*max_age)),
            ],
        }
    }

    /// The payload built by hand, checked against the core's encoder.
    fn payload(&self) -> Vec<u8> {
        let by_hand = map(&self.fields(), MapForm::Definite);
        let core = match self {
            Msg::Page {
                seq,
                issued_at,
                stream,
                from,
                to,
                entries,
            } => {
                let stream = Stream::parse(stream).expect("a valid stream name");
                let entries: Vec<Addressed> = entries.iter().map(Ent::addressed).collect();
                let len = entries.iter().map(Addressed::encoded_len).sum();
                let mut out = vec![0u8; revocation::max_page_len(&stream, len)];
                let n = revocation::encode_page(
                    *seq, *issued_at, &stream, *from, *to, &entries, &mut out,
                )
                .expect("the core encodes the page");
                out.truncate(n);
                out
            }
            Msg::Heartbeat {
                seq,
                issued_at,
                stream,
                max_age,
            } => {
                let stream = Stream::parse(stream).expect("a valid stream name");
                let mut out = [0u8; revocation::MAX_HEARTBEAT_LEN];
                let n = revocation::encode_heartbeat(*seq, *issued_at, &stream, *max_age, &mut out)
                    .expect("the core encodes the heartbeat");
                out[..n].to_vec()
            }
        };
        assert_eq!(by_hand, core, "hand-built payload differs from the core's");
        by_hand
    }

    /// The payload with its fields changed by `edit`.
    fn payload_edited(&self, edit: impl FnOnce(&mut Vec<(i64, Vec<u8>)>)) -> Vec<u8> {
        let mut f = self.fields();
        edit(&mut f);
        map(&f, MapForm::Definite)
    }

    /// The payload with its entries replaced by `entries` (already encoded entries, in an
    /// array head of `entries.len()` items).
    fn payload_with_entries(&self, entries: &[Vec<u8>]) -> Vec<u8> {
        self.payload_edited(|f| set(f, 3, array(entries)))
    }

    fn entries(&self) -> &[Ent] {
        match self {
            Msg::Page { entries, .. } => entries,
            Msg::Heartbeat { .. } => &[],
        }
    }
}

/// Replaces the value of `key`.
fn set(fields: &mut [(i64, Vec<u8>)], key: i64, value: Vec<u8>) {
    let slot = fields
        .iter_mut()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no key {key}"));
    slot.1 = value;
}

/// Inserts `key: value` where the deterministic order puts it.
fn insert(fields: &mut Vec<(i64, Vec<u8>)>, key: i64, value: Vec<u8>) {
    let at = fields
        .iter()
        .position(|(k, _)| *k > key)
        .unwrap_or(fields.len());
    fields.insert(at, (key, value));
}

/// The hub's COSE_Sign1 over `payload`, as the core signs it.
fn hub_signed(payload: &[u8]) -> Vec<u8> {
    signed_by(&issuer(), payload)
}

fn signed_by(signer: &tessera_shared::crypto::P256Signer, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; payload.len() + cose::OVERHEAD];
    let n = cose::sign(signer, payload, &mut out).expect("the message fits");
    out.truncate(n);
    let by_parts = Parts::issued(payload.to_vec());
    if signer.public_key() == issuer().public_key() {
        assert_eq!(
            by_parts.assemble(),
            out,
            "assembled message differs from cose::sign"
        );
    }
    out
}

/// One message vector.
#[derive(Clone)]
pub(crate) struct MessageCase {
    pub(crate) name: &'static str,
    pub(crate) description: &'static str,
    pub(crate) bytes: Vec<u8>,
    pub(crate) expect: Expect,
    /// For a valid case: what it decodes to.
    pub(crate) decoded: Option<Msg>,
    /// For an invalid case: the valid message it was made from by one change.
    pub(crate) repaired: Option<Vec<u8>>,
}

/// Every reason an invalid message vector may give, and the core's error for it (the
/// first error on the path `Sign1::decode` → `verify` → `StreamMessage::decode`). Other
/// implementations key on these strings, so they never change meaning.
pub(crate) const REASONS: [(&str, Error); 18] = [
    ("unknown_key", Error::Signature(SignatureError::UnknownKey)),
    ("bad_signature", Error::Signature(SignatureError::Invalid)),
    // Signed by another key but carrying the hub's kid.
    ("wrong_key", Error::Signature(SignatureError::Invalid)),
    (
        "entry_on_other_stream",
        Error::Decode(DecodeError::InvalidValue(
            "entry audience not on the page's stream",
        )),
    ),
    (
        "page_range",
        Error::Decode(DecodeError::InvalidValue("page range")),
    ),
    (
        "unknown_payload_key",
        Error::Decode(DecodeError::InvalidValue("revocation payload key")),
    ),
    // A key of the other payload (from/to/entries in a heartbeat, max_age in a page): the
    // core refuses it as it refuses any key its layout does not define.
    (
        "field_not_allowed",
        Error::Decode(DecodeError::InvalidValue("revocation payload key")),
    ),
    (
        "unknown_entry_kind",
        Error::Decode(DecodeError::InvalidValue("revocation entry kind")),
    ),
    (
        "invalid_audience",
        Error::Decode(DecodeError::InvalidValue("audience")),
    ),
    (
        "invalid_stream",
        Error::Decode(DecodeError::InvalidValue("stream")),
    ),
    ("trailing_bytes", Error::Decode(DecodeError::TrailingBytes)),
    (
        "retired_message_type",
        Error::Decode(DecodeError::InvalidValue("message type")),
    ),
    (
        "indefinite_length",
        Error::Decode(DecodeError::IndefiniteLength),
    ),
    ("duplicate_key", Error::Decode(DecodeError::DuplicateKey(1))),
    (
        "missing_max_age",
        Error::Decode(DecodeError::MissingField("max_age")),
    ),
    ("missing_to", Error::Decode(DecodeError::MissingField("to"))),
    (
        "invalid_token_hash",
        Error::Decode(DecodeError::InvalidValue("token hash")),
    ),
    // An entry array of the wrong length for its kind.
    (
        "entry_length",
        Error::Decode(DecodeError::InvalidValue("array length")),
    ),
];

/// The core's error for a reason string.
pub(crate) fn expected_error(reason: &str) -> Option<Error> {
    REASONS.iter().find(|(r, _)| *r == reason).map(|(_, e)| *e)
}

fn valid(name: &'static str, description: &'static str, msg: &Msg) -> MessageCase {
    MessageCase {
        name,
        description,
        bytes: hub_signed(&msg.payload()),
        expect: Expect::Valid,
        decoded: Some(msg.clone()),
        repaired: None,
    }
}

fn valid_bytes(
    name: &'static str,
    description: &'static str,
    msg: &Msg,
    bytes: Vec<u8>,
) -> MessageCase {
    MessageCase {
        name,
        description,
        bytes,
        expect: Expect::Valid,
        decoded: Some(msg.clone()),
        repaired: None,
    }
}

fn invalid(
    name: &'static str,
    description: &'static str,
    reason: &'static str,
    bytes: Vec<u8>,
    repaired: &Msg,
) -> MessageCase {
    MessageCase {
        name,
        description,
        bytes,
        expect: Expect::Invalid {
            reason,
            error: expected_error(reason).unwrap_or_else(|| panic!("unknown reason {reason}")),
        },
        decoded: None,
        repaired: Some(hub_signed(&repaired.payload())),
    }
}

/// The valid messages of the vectors' streams, by name.
pub(crate) struct Streams {
    pub(crate) delta_1: Msg,
    pub(crate) delta_2: Msg,
    pub(crate) snapshot: Msg,
    pub(crate) empty: Msg,
    pub(crate) service_page: Msg,
    pub(crate) hb_1: Msg,
    pub(crate) hb_2: Msg,
    pub(crate) hb_late: Msg,
    pub(crate) service_hb: Msg,
    pub(crate) empty_stream_hb: Msg,
}

fn history(tokens: &[TestToken]) -> Streams {
    let devices_03 = Stream::of_device(DEVICE).name().to_string();
    let devices_5e = Stream::of_device(OTHER_DEVICE).name().to_string();
    let service = Stream::of_service(SERVICE)
        .expect("an identifier")
        .name()
        .to_string();
    assert_eq!(devices_03, "devices/03");
    assert_eq!(devices_5e, "devices/5e");

    let a = find(tokens, "access_app7");
    let b = find(tokens, "access_app7_same_second");
    let d = find(tokens, "access_app8");
    let e = find(tokens, "access_app7_for_neighbour");
    let f = find(tokens, "device_token_42");
    let g = find(tokens, "device_token_43");
    assert_eq!(b.iat(), R1);

    // Change 1 of devices/03 (kind 2, subject app-7, at R1): per audience app-7 holds live
    // tokens for, a subject entry cut at R1 lasting as long as the latest of those tokens,
    // and a token entry for each token issued within R1 itself.
    let change_1 = vec![
        Ent::Token {
            audience: DEVICE,
            hash: b.hash(),
            expires_at: b.exp() + LEEWAY,
        },
        Ent::Subject {
            audience: DEVICE,
            subject: APP,
            issued_before: R1,
            expires_at: a.exp().max(b.exp()) + LEEWAY,
        },
        Ent::Subject {
            audience: NEIGHBOUR,
            subject: APP,
            issued_before: R1,
            expires_at: e.exp() + LEEWAY,
        },
    ];
    // Change 2 (kind 0): app-8's token by hash.
    let change_2 = vec![Ent::Token {
        audience: DEVICE,
        hash: d.hash(),
        expires_at: d.exp() + LEEWAY,
    }];
    let latest_expiry = change_1
        .iter()
        .chain(&change_2)
        .map(|e| match e {
            Ent::Token { expires_at, .. } | Ent::Subject { expires_at, .. } => *expires_at,
        })
        .max()
        .expect("entries");
    assert!(ALL_SPENT > latest_expiry + LEEWAY);

    let page = |seq, issued_at, stream: &String, from, to, entries: Vec<Ent>| Msg::Page {
        seq,
        issued_at,
        stream: stream.clone(),
        from,
        to,
        entries,
    };
    let heartbeat = |seq, issued_at, stream: &String, max_age| Msg::Heartbeat {
        seq,
        issued_at,
        stream: stream.clone(),
        max_age,
    };
    Streams {
        delta_1: page(1, R1, &devices_03, 1, 1, change_1.clone()),
        delta_2: page(2, R2, &devices_03, 2, 2, change_2.clone()),
        snapshot: page(
            2,
            SNAPSHOT,
            &devices_03,
            1,
            2,
            [change_1, change_2].concat(),
        ),
        empty: page(2, ALL_SPENT, &devices_03, 1, 2, vec![]),
        service_page: page(
            2,
            SERVICE_PAGE,
            &service,
            1,
            2,
            vec![
                // Change 1 (kind 3, device-43 at S1): a subject entry on the service its
                // device token names.
                Ent::Subject {
                    audience: SERVICE,
                    subject: OTHER_DEVICE,
                    issued_before: S1,
                    expires_at: g.exp() + LEEWAY,
                },
                // Change 2 (kind 0 at S2): device-42's device token by hash.
                Ent::Token {
                    audience: SERVICE,
                    hash: f.hash(),
                    expires_at: f.exp() + LEEWAY,
                },
            ],
        ),
        hb_1: heartbeat(1, HB1, &devices_03, DEVICE_MAX_AGE),
        hb_2: heartbeat(2, HB2, &devices_03, DEVICE_MAX_AGE),
        hb_late: heartbeat(2, HB_LATE, &devices_03, DEVICE_MAX_AGE),
        service_hb: heartbeat(2, SERVICE_HB, &service, SERVICE_MAX_AGE),
        empty_stream_hb: heartbeat(0, HB2, &devices_5e, DEVICE_MAX_AGE),
    }
}

/// `signed` with the bytes of its payload at `offset` (within the payload) replaced: the
/// signature no longer covers what the message carries.
fn alter_payload(signed: &[u8], payload: &[u8], offset: usize, new: u8) -> Vec<u8> {
    let at = signed
        .windows(payload.len())
        .position(|w| w == payload)
        .expect("the payload is in the message");
    let mut out = signed.to_vec();
    assert_ne!(out[at + offset], new);
    out[at + offset] = new;
    out
}

/// Every message vector, in the order they are committed.
pub(crate) fn messages() -> Vec<MessageCase> {
    let tokens = tokens();
    let s = history(&tokens);
    let delta_2_signed = hub_signed(&s.delta_2.payload());
    let hb_2_payload = s.hb_2.payload();
    let hb_2_signed = hub_signed(&hb_2_payload);

    let delta_1_signed = hub_signed(&s.delta_1.payload());
    let mut delta_1_high_s = delta_1_signed.clone();
    let at = delta_1_high_s.len() - 64;
    let twin = twin_s(&delta_1_high_s[at..]);
    delta_1_high_s[at..].copy_from_slice(&twin);

    let mut flipped = delta_2_signed.clone();
    *flipped.last_mut().expect("not empty") ^= 0x01;

    let d_hash = find(&tokens, "access_app8").hash();
    let d_exp = find(&tokens, "access_app8").exp() + LEEWAY;
    let on_stream = |f: &mut Vec<(i64, Vec<u8>)>, s: &str| set(f, 4, text(s));
    let page_range = |from: u64, to: u64| {
        s.snapshot.payload_edited(|f| {
            set(f, 5, uint(from));
            set(f, 6, uint(to));
        })
    };
    // The first entry of the service page, addressed to another service.
    let mut service_entries: Vec<Vec<u8>> =
        s.service_page.entries().iter().map(Ent::encode).collect();
    if let Ent::Subject {
        subject,
        issued_before,
        expires_at,
        ..
    } = &s.service_page.entries()[0]
    {
        service_entries[0] = Ent::Subject {
            audience: OTHER_SERVICE,
            subject,
            issued_before: *issued_before,
            expires_at: *expires_at,
        }
        .encode();
    }
    assert_ne!(partition(OTHER_DEVICE), partition(DEVICE));
    // An indefinite-length entry array: 9f, the entries, ff.
    let indefinite: Vec<u8> = [
        vec![0x9f],
        s.delta_1
            .entries()
            .iter()
            .flat_map(Ent::encode)
            .collect::<Vec<_>>(),
        vec![0xff],
    ]
    .concat();

    vec![
        valid(
            "delta_devices_03_change_1",
            "Change 1 of devices/03 (subject app-7 revoked at T+300 = 1700000300): a token \
             entry and a subject entry addressed to device-42, and a subject entry addressed to \
             device-n4 of the same partition",
            &s.delta_1,
        ),
        valid(
            "delta_devices_03_change_2",
            "Change 2 of devices/03: app-8's token for device-42 revoked by hash",
            &s.delta_2,
        ),
        valid(
            "snapshot_devices_03",
            "The snapshot page of devices/03: changes 1..=2 in one page, every entry still in \
             force",
            &s.snapshot,
        ),
        valid(
            "page_devices_03_empty",
            "A page of changes 1..=2 built after every one of their entries was spent: no \
             entries",
            &s.empty,
        ),
        valid(
            "page_service_svc_telemetry",
            "The snapshot page of service/svc.telemetry: device-43 revoked (subject entry), \
             then device-42's device token (token entry)",
            &s.service_page,
        ),
        valid(
            "heartbeat_devices_03_seq_2",
            "Heartbeat of devices/03 naming change 2, max_age 60",
            &s.hb_2,
        ),
        valid(
            "heartbeat_devices_03_seq_1",
            "An older heartbeat of devices/03, naming change 1",
            &s.hb_1,
        ),
        valid(
            "heartbeat_devices_03_late",
            "Heartbeat of devices/03 naming change 2, after every entry was spent",
            &s.hb_late,
        ),
        valid(
            "heartbeat_service_svc_telemetry",
            "Heartbeat of service/svc.telemetry naming change 2, max_age 90",
            &s.service_hb,
        ),
        valid(
            "heartbeat_devices_5e_empty_stream",
            "Heartbeat of devices/5e (device-43's partition) naming change 0: the stream is \
             empty",
            &s.empty_stream_hb,
        ),
        valid_bytes(
            "delta_devices_03_change_1_untagged",
            "delta_devices_03_change_1 without tag 18 (receivers accept it, PROTOCOL §5.4)",
            &s.delta_1,
            delta_1_signed[1..].to_vec(),
        ),
        valid_bytes(
            "delta_devices_03_change_1_high_s",
            "delta_devices_03_change_1 with the high-s twin of its signature (receivers \
             accept both, §4.1)",
            &s.delta_1,
            delta_1_high_s,
        ),
        invalid(
            "page_signed_by_unknown_key",
            "delta_devices_03_change_2 signed by a key that is not the hub's, with that key's \
             own kid",
            "unknown_key",
            signed_by(&other_issuer(), &s.delta_2.payload()),
            &s.delta_2,
        ),
        invalid(
            "page_signed_by_other_key_with_hub_kid",
            "delta_devices_03_change_2 signed by another key but carrying the hub's kid",
            "wrong_key",
            Parts {
                key: SigningKey::OtherIssuer,
                ..Parts::issued(s.delta_2.payload())
            }
            .assemble(),
            &s.delta_2,
        ),
        invalid(
            "page_signature_last_byte_flipped",
            "delta_devices_03_change_2 with the last byte of its signature flipped",
            "bad_signature",
            flipped,
            &s.delta_2,
        ),
        invalid(
            "heartbeat_seq_altered_after_signing",
            "heartbeat_devices_03_seq_2 with seq changed from 2 to 3 after signing (a broker \
             claiming a change that does not exist)",
            "bad_signature",
            alter_payload(&hb_2_signed, &hb_2_payload, 4, 0x03),
            &s.hb_2,
        ),
        invalid(
            "page_entry_for_device_of_other_partition",
            "delta_devices_03_change_2 with its entry addressed to device-43, whose partition \
             is devices/5e (PROTOCOL §11.3: refused whole)",
            "entry_on_other_stream",
            hub_signed(
                &s.delta_2.payload_with_entries(&[Ent::Token {
                    audience: OTHER_DEVICE,
                    hash: d_hash,
                    expires_at: d_exp,
                }
                .encode()]),
            ),
            &s.delta_2,
        ),
        invalid(
            "service_page_entry_for_other_service",
            "page_service_svc_telemetry with its first entry addressed to svc.other",
            "entry_on_other_stream",
            hub_signed(&s.service_page.payload_with_entries(&service_entries)),
            &s.service_page,
        ),
        invalid(
            "page_from_after_to",
            "snapshot_devices_03 with from 2, to 1",
            "page_range",
            hub_signed(&page_range(2, 1)),
            &s.snapshot,
        ),
        invalid(
            "page_to_after_seq",
            "snapshot_devices_03 with to 3, beyond its seq 2",
            "page_range",
            hub_signed(&page_range(1, 3)),
            &s.snapshot,
        ),
        invalid(
            "page_from_zero",
            "snapshot_devices_03 with from 0 (change 0 is the empty stream)",
            "page_range",
            hub_signed(&page_range(0, 2)),
            &s.snapshot,
        ),
        invalid(
            "page_unknown_key_8",
            "delta_devices_03_change_2 with an extra key 8: 0",
            "unknown_payload_key",
            hub_signed(&s.delta_2.payload_edited(|f| insert(f, 8, uint(0)))),
            &s.delta_2,
        ),
        invalid(
            "heartbeat_with_from",
            "heartbeat_devices_03_seq_2 with a page's key 5 (from): 1",
            "field_not_allowed",
            hub_signed(&s.hb_2.payload_edited(|f| insert(f, 5, uint(1)))),
            &s.hb_2,
        ),
        invalid(
            "page_with_max_age",
            "delta_devices_03_change_2 with a heartbeat's key 7 (max_age): 60",
            "field_not_allowed",
            hub_signed(&s.delta_2.payload_edited(|f| insert(f, 7, uint(60)))),
            &s.delta_2,
        ),
        invalid(
            "entry_with_unknown_kind_2",
            "delta_devices_03_change_2 with its token entry's kind 0 replaced by 2",
            "unknown_entry_kind",
            hub_signed(&s.delta_2.payload_with_entries(&[array(&[
                uint(2),
                text(DEVICE),
                bstr(&d_hash),
                uint(d_exp),
            ])])),
            &s.delta_2,
        ),
        invalid(
            "entry_audience_not_an_identifier",
            "delta_devices_03_change_2 with its entry addressed to \"device 42\" (a space)",
            "invalid_audience",
            hub_signed(&s.delta_2.payload_with_entries(&[array(&[
                uint(0),
                text("device 42"),
                bstr(&d_hash),
                uint(d_exp),
            ])])),
            &s.delta_2,
        ),
        invalid(
            "entry_token_hash_of_31_bytes",
            "delta_devices_03_change_2 with the last byte of its token hash dropped",
            "invalid_token_hash",
            hub_signed(&s.delta_2.payload_with_entries(&[array(&[
                uint(0),
                text(DEVICE),
                bstr(&d_hash[..31]),
                uint(d_exp),
            ])])),
            &s.delta_2,
        ),
        invalid(
            "entry_token_with_five_items",
            "delta_devices_03_change_2 with a fifth item (0) in its token entry",
            "entry_length",
            hub_signed(&s.delta_2.payload_with_entries(&[array(&[
                uint(0),
                text(DEVICE),
                bstr(&d_hash),
                uint(d_exp),
                uint(0),
            ])])),
            &s.delta_2,
        ),
        invalid(
            "heartbeat_stream_one_hex_digit",
            "heartbeat_devices_03_seq_2 on stream \"devices/3\"",
            "invalid_stream",
            hub_signed(&s.hb_2.payload_edited(|f| on_stream(f, "devices/3"))),
            &s.hb_2,
        ),
        invalid(
            "heartbeat_stream_three_hex_digits",
            "heartbeat_devices_03_seq_2 on stream \"devices/003\"",
            "invalid_stream",
            hub_signed(&s.hb_2.payload_edited(|f| on_stream(f, "devices/003"))),
            &s.hb_2,
        ),
        invalid(
            "heartbeat_stream_uppercase_hex",
            "heartbeat_devices_5e_empty_stream on stream \"devices/5E\"",
            "invalid_stream",
            hub_signed(
                &s.empty_stream_hb
                    .payload_edited(|f| on_stream(f, "devices/5E")),
            ),
            &s.empty_stream_hb,
        ),
        invalid(
            "heartbeat_stream_unknown_prefix",
            "heartbeat_devices_03_seq_2 on stream \"device/03\"",
            "invalid_stream",
            hub_signed(&s.hb_2.payload_edited(|f| on_stream(f, "device/03"))),
            &s.hb_2,
        ),
        invalid(
            "heartbeat_service_name_not_an_identifier",
            "heartbeat_service_svc_telemetry on stream \"service/svc telemetry\"",
            "invalid_stream",
            hub_signed(
                &s.service_hb
                    .payload_edited(|f| on_stream(f, "service/svc telemetry")),
            ),
            &s.service_hb,
        ),
        invalid(
            "heartbeat_service_name_of_two_levels",
            "heartbeat_service_svc_telemetry on stream \"service/svc/telemetry\"",
            "invalid_stream",
            hub_signed(
                &s.service_hb
                    .payload_edited(|f| on_stream(f, "service/svc/telemetry")),
            ),
            &s.service_hb,
        ),
        invalid(
            "page_stream_one_hex_digit",
            "page_devices_03_empty on stream \"devices/3\"",
            "invalid_stream",
            hub_signed(&s.empty.payload_edited(|f| on_stream(f, "devices/3"))),
            &s.empty,
        ),
        invalid(
            "page_trailing_byte_in_payload",
            "delta_devices_03_change_2 with a 00 byte after the payload map, inside the signed \
             payload",
            "trailing_bytes",
            hub_signed(&[&s.delta_2.payload()[..], &[0x00]].concat()),
            &s.delta_2,
        ),
        invalid(
            "page_trailing_byte_after_message",
            "delta_devices_03_change_2 with a 00 byte after the COSE_Sign1",
            "trailing_bytes",
            [&delta_2_signed[..], &[0x00]].concat(),
            &s.delta_2,
        ),
        invalid(
            "page_of_retired_type_21",
            "delta_devices_03_change_2 with message type 21, the retired delta",
            "retired_message_type",
            hub_signed(&s.delta_2.payload_edited(|f| set(f, 0, uint(TYPE_RETIRED)))),
            &s.delta_2,
        ),
        invalid(
            "page_indefinite_length_entries",
            "delta_devices_03_change_1 with its entry array in indefinite-length form \
             (9f ... ff)",
            "indefinite_length",
            hub_signed(&s.delta_1.payload_edited(|f| set(f, 3, indefinite))),
            &s.delta_1,
        ),
        invalid(
            "heartbeat_duplicate_seq",
            "heartbeat_devices_03_seq_2 with key 1 (seq) twice, both 2",
            "duplicate_key",
            hub_signed(&s.hb_2.payload_edited(|f| insert(f, 1, uint(2)))),
            &s.hb_2,
        ),
        invalid(
            "heartbeat_missing_max_age",
            "heartbeat_devices_03_seq_2 without key 7 (max_age)",
            "missing_max_age",
            hub_signed(&s.hb_2.payload_edited(|f| f.retain(|(k, _)| *k != 7))),
            &s.hb_2,
        ),
        invalid(
            "page_missing_to",
            "delta_devices_03_change_2 without key 6 (to)",
            "missing_to",
            hub_signed(&s.delta_2.payload_edited(|f| f.retain(|(k, _)| *k != 6))),
            &s.delta_2,
        ),
    ]
}

// ------------------------------------------------------------------------------------------
// Verifier-state vectors.

/// A list's state, as §11.5 defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub(crate) prefix: u64,
    pub(crate) latest: u64,
    pub(crate) complete: bool,
    pub(crate) fresh_as_of: Option<u64>,
    /// Where to fetch from: `prefix + 1` while incomplete.
    pub(crate) wanted_from: Option<u64>,
    /// The max_age to hold knowledge to: the newest heartbeat's, else 90.
    pub(crate) max_age: u64,
    /// Entries held.
    pub(crate) entries: usize,
}

fn state(
    (prefix, latest): (u64, u64),
    fresh_as_of: Option<u64>,
    max_age: u64,
    entries: usize,
) -> State {
    let complete = prefix >= latest;
    State {
        prefix,
        latest,
        complete,
        fresh_as_of,
        wanted_from: (!complete).then_some(prefix + 1),
        max_age,
        entries,
    }
}

/// One message applied to a list.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    /// The name of a valid message vector.
    pub(crate) message: &'static str,
    /// The verifier's clock (only pages use it: entries spent at `now` are skipped).
    pub(crate) now: u64,
    /// `applied`, `already_applied`, `gap`, `overflow` (pages); `in_sync`, `behind`,
    /// `outdated` (heartbeats); `refused_other_stream` (either).
    pub(crate) outcome: &'static str,
    pub(crate) state: State,
}

/// Messages applied in order to one verifier's list.
#[derive(Clone, Debug)]
pub(crate) struct ListCase {
    pub(crate) name: &'static str,
    pub(crate) description: &'static str,
    pub(crate) audience: &'static str,
    /// Whether the list is a service's (it follows `service/{audience}`).
    pub(crate) service: bool,
    /// Entries the list holds at most.
    pub(crate) capacity: usize,
    pub(crate) steps: Vec<Step>,
    /// Whether the list revokes each named token afterwards.
    pub(crate) revoked: Vec<(&'static str, bool)>,
    /// Whether its knowledge is fresh at each `now` afterwards, with its `max_age`.
    pub(crate) fresh: Vec<(u64, bool)>,
}

fn step(message: &'static str, now: u64, outcome: &'static str, state: State) -> Step {
    Step {
        message,
        now,
        outcome,
        state,
    }
}

/// Every list vector, in the order they are committed. The states are written out from
/// §11.5, step by step.
pub(crate) fn lists() -> Vec<ListCase> {
    const DEFAULT: u64 = DEFAULT_MAX_AGE;
    const FULL: usize = revocation::MAX_REVOKED;
    let initial = state((0, 0), None, DEFAULT, 0);
    vec![
        ListCase {
            name: "device_42_from_the_snapshot",
            description: "device-42 takes the retained snapshot, then a duplicate delta, the \
                          heartbeat, and an older heartbeat replayed",
            audience: DEVICE,
            service: false,
            capacity: FULL,
            steps: vec![
                // device-n4's entry is skipped: three entries are device-42's.
                step(
                    "snapshot_devices_03",
                    SNAPSHOT + 5,
                    "applied",
                    state((2, 2), Some(SNAPSHOT), DEFAULT, 3),
                ),
                // Changes it holds: nothing changes; seq 1 is not the latest, so freshness
                // does not move either.
                step(
                    "delta_devices_03_change_1",
                    SNAPSHOT + 10,
                    "already_applied",
                    state((2, 2), Some(SNAPSHOT), DEFAULT, 3),
                ),
                step(
                    "heartbeat_devices_03_seq_2",
                    HB2 + 1,
                    "in_sync",
                    state((2, 2), Some(HB2), DEVICE_MAX_AGE, 3),
                ),
                step(
                    "heartbeat_devices_03_seq_1",
                    HB2 + 2,
                    "outdated",
                    state((2, 2), Some(HB2), DEVICE_MAX_AGE, 3),
                ),
            ],
            revoked: vec![
                ("access_app7", true),
                ("access_app7_high_s", true),
                ("access_app7_same_second", true),
                ("access_app7_after", false),
                ("access_app8", true),
                ("device_token_42", false),
            ],
            fresh: vec![
                (HB2 + DEVICE_MAX_AGE, true),
                (HB2 + DEVICE_MAX_AGE + 1, false),
            ],
        },
        ListCase {
            name: "device_42_from_deltas_out_of_order",
            description: "device-42 receives change 2 before change 1: a gap, a heartbeat it \
                          is behind, the missing delta, then the heartbeat that makes it fresh",
            audience: DEVICE,
            service: false,
            capacity: FULL,
            steps: vec![
                step(
                    "delta_devices_03_change_2",
                    R2 + 1,
                    "gap",
                    state((0, 2), None, DEFAULT, 1),
                ),
                step(
                    "heartbeat_devices_03_seq_1",
                    R2 + 2,
                    "behind",
                    // A heartbeat's max_age is taken whatever the list's state.
                    state((0, 2), None, DEVICE_MAX_AGE, 1),
                ),
                // Complete now, but the page was built at change 1, not at the latest (2):
                // it says nothing about how current the list is.
                step(
                    "delta_devices_03_change_1",
                    R2 + 3,
                    "applied",
                    state((2, 2), None, DEVICE_MAX_AGE, 3),
                ),
                step(
                    "heartbeat_devices_03_seq_2",
                    HB2 + 1,
                    "in_sync",
                    state((2, 2), Some(HB2), DEVICE_MAX_AGE, 3),
                ),
            ],
            revoked: vec![
                ("access_app7", true),
                ("access_app7_same_second", true),
                ("access_app7_after", false),
                ("access_app8", true),
            ],
            fresh: vec![(HB2 + DEVICE_MAX_AGE, true)],
        },
        ListCase {
            name: "device_42_after_every_entry_is_spent",
            description: "device-42 starts after every entry of devices/03 is spent: the \
                          empty page, then the old snapshot (its entries skipped, freshness \
                          not moved back), then a heartbeat",
            audience: DEVICE,
            service: false,
            capacity: FULL,
            steps: vec![
                step(
                    "page_devices_03_empty",
                    ALL_SPENT + 5,
                    "applied",
                    state((2, 2), Some(ALL_SPENT), DEFAULT, 0),
                ),
                step(
                    "snapshot_devices_03",
                    ALL_SPENT + 6,
                    "already_applied",
                    state((2, 2), Some(ALL_SPENT), DEFAULT, 0),
                ),
                step(
                    "heartbeat_devices_03_late",
                    HB_LATE + 1,
                    "in_sync",
                    state((2, 2), Some(HB_LATE), DEVICE_MAX_AGE, 0),
                ),
            ],
            revoked: vec![
                ("access_app7", false),
                ("access_app7_same_second", false),
                ("access_app8", false),
            ],
            fresh: vec![(HB_LATE + DEVICE_MAX_AGE, true)],
        },
        ListCase {
            name: "device_42_refuses_other_streams",
            description: "device-42 is given a service stream's page and heartbeat and \
                          another partition's heartbeat: each is refused and changes nothing",
            audience: DEVICE,
            service: false,
            capacity: FULL,
            steps: vec![
                step(
                    "page_service_svc_telemetry",
                    SERVICE_PAGE + 5,
                    "refused_other_stream",
                    initial,
                ),
                step(
                    "heartbeat_service_svc_telemetry",
                    SERVICE_HB + 1,
                    "refused_other_stream",
                    initial,
                ),
                step(
                    "heartbeat_devices_5e_empty_stream",
                    HB2 + 1,
                    "refused_other_stream",
                    initial,
                ),
            ],
            revoked: vec![("device_token_42", false), ("access_app7", false)],
            // Complete (nothing heard of) but never shown current.
            fresh: vec![(HB2 + 1, false)],
        },
        ListCase {
            name: "device_n4_keeps_only_its_own_entries",
            description: "device-n4, of the same partition, takes the snapshot: it keeps the \
                          one entry addressed to it",
            audience: NEIGHBOUR,
            service: false,
            capacity: FULL,
            steps: vec![step(
                "snapshot_devices_03",
                SNAPSHOT + 5,
                "applied",
                state((2, 2), Some(SNAPSHOT), DEFAULT, 1),
            )],
            revoked: vec![
                ("access_app7_for_neighbour", true),
                ("access_app7_same_second", false),
                ("access_app8", false),
            ],
            fresh: vec![(SNAPSHOT + DEFAULT, true), (SNAPSHOT + DEFAULT + 1, false)],
        },
        ListCase {
            name: "device_42_with_room_for_2_entries_fails_closed",
            description: "device-42 holding at most 2 entries takes the snapshot, whose three \
                          entries for it do not fit: it keeps the first two in page order, \
                          does not count changes 1..=2 as applied and is not fresh; the \
                          heartbeat then shows it behind",
            audience: DEVICE,
            service: false,
            capacity: 2,
            steps: vec![
                step(
                    "snapshot_devices_03",
                    SNAPSHOT + 5,
                    "overflow",
                    state((0, 2), None, DEFAULT, 2),
                ),
                step(
                    "heartbeat_devices_03_seq_2",
                    HB2 + 1,
                    "behind",
                    state((0, 2), None, DEVICE_MAX_AGE, 2),
                ),
            ],
            revoked: vec![
                ("access_app7", true),
                ("access_app7_same_second", true),
                ("access_app8", false),
            ],
            fresh: vec![(HB2 + 1, false)],
        },
        ListCase {
            name: "service_svc_telemetry",
            description: "svc.telemetry takes its stream's page and heartbeat, and refuses a \
                          device partition's page",
            audience: SERVICE,
            service: true,
            capacity: FULL,
            steps: vec![
                step(
                    "page_service_svc_telemetry",
                    SERVICE_PAGE + 5,
                    "applied",
                    state((2, 2), Some(SERVICE_PAGE), DEFAULT, 2),
                ),
                step(
                    "heartbeat_service_svc_telemetry",
                    SERVICE_HB + 1,
                    "in_sync",
                    state((2, 2), Some(SERVICE_HB), SERVICE_MAX_AGE, 2),
                ),
                step(
                    "delta_devices_03_change_1",
                    SERVICE_HB + 2,
                    "refused_other_stream",
                    state((2, 2), Some(SERVICE_HB), SERVICE_MAX_AGE, 2),
                ),
            ],
            revoked: vec![
                ("device_token_42", true),
                ("device_token_43", true),
                ("access_app7", false),
            ],
            fresh: vec![
                (SERVICE_HB + SERVICE_MAX_AGE, true),
                (SERVICE_HB + SERVICE_MAX_AGE + 1, false),
            ],
        },
        ListCase {
            name: "device_43_on_an_empty_stream",
            description: "device-43's partition has no change: a heartbeat naming 0 makes its \
                          list complete and fresh",
            audience: OTHER_DEVICE,
            service: false,
            capacity: FULL,
            steps: vec![step(
                "heartbeat_devices_5e_empty_stream",
                HB2 + 1,
                "in_sync",
                state((0, 0), Some(HB2), DEVICE_MAX_AGE, 0),
            )],
            revoked: vec![("device_token_43", false)],
            fresh: vec![
                (HB2 + DEVICE_MAX_AGE, true),
                (HB2 + DEVICE_MAX_AGE + 1, false),
            ],
        },
    ]
}

// ------------------------------------------------------------------------------------------
// The JSON file.

#[derive(Serialize)]
struct JsonFile {
    about: &'static str,
    hub_public_key_cose_hex: String,
    hub_kid_hex: String,
    leeway: u64,
    default_max_age: u64,
    streams: Vec<JsonStream>,
    tokens: Vec<JsonToken>,
    messages: Vec<JsonMessage>,
    lists: Vec<JsonList>,
}

#[derive(Serialize)]
struct JsonStream {
    audience: &'static str,
    follows: &'static str,
    stream: String,
}

#[derive(Serialize)]
struct JsonToken {
    name: &'static str,
    description: &'static str,
    token_hex: String,
    token_hash_hex: String,
    same_token_as: Option<&'static str>,
    audience: Option<&'static str>,
    subject: Option<&'static str>,
    issued_at: Option<u64>,
}

#[derive(Serialize)]
struct JsonMessage {
    name: &'static str,
    description: &'static str,
    message_hex: String,
    expect: &'static str,
    reason: &'static str,
    decoded: Option<JsonDecoded>,
}

/// What a valid message decodes to.
#[derive(Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum JsonDecoded {
    Page {
        seq: u64,
        issued_at: u64,
        stream: String,
        from: u64,
        to: u64,
        entries: Vec<JsonEntry>,
    },
    Heartbeat {
        seq: u64,
        issued_at: u64,
        stream: String,
        max_age: u64,
    },
}

#[derive(Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum JsonEntry {
    Token {
        audience: String,
        hash_hex: String,
        expires_at: u64,
    },
    Subject {
        audience: String,
        subject: String,
        issued_before: u64,
        expires_at: u64,
    },
}

impl From<&Msg> for JsonDecoded {
    fn from(m: &Msg) -> Self {
        match m {
            Msg::Page {
                seq,
                issued_at,
                stream,
                from,
                to,
                entries,
            } => JsonDecoded::Page {
                seq: *seq,
                issued_at: *issued_at,
                stream: stream.clone(),
                from: *from,
                to: *to,
                entries: entries
                    .iter()
                    .map(|e| match e {
                        Ent::Token {
                            audience,
                            hash,
                            expires_at,
                        } => JsonEntry::Token {
                            audience: (*audience).to_owned(),
                            hash_hex: hex::encode(hash),
                            expires_at: *expires_at,
                        },
                        Ent::Subject {
                            audience,
                            subject,
                            issued_before,
                            expires_at,
                        } => JsonEntry::Subject {
                            audience: (*audience).to_owned(),
                            subject: (*subject).to_owned(),
                            issued_before: *issued_before,
                            expires_at: *expires_at,
                        },
                    })
                    .collect(),
            },
            Msg::Heartbeat {
                seq,
                issued_at,
                stream,
                max_age,
            } => JsonDecoded::Heartbeat {
                seq: *seq,
                issued_at: *issued_at,
                stream: stream.clone(),
                max_age: *max_age,
            },
        }
    }
}

#[derive(Serialize)]
struct JsonList {
    name: &'static str,
    description: &'static str,
    audience: &'static str,
    follows: &'static str,
    capacity: usize,
    steps: Vec<JsonStep>,
    revoked: Vec<JsonRevoked>,
    fresh: Vec<JsonFresh>,
}

#[derive(Serialize)]
struct JsonStep {
    message: &'static str,
    now: u64,
    outcome: &'static str,
    state: State,
}

#[derive(Serialize)]
struct JsonRevoked {
    token: &'static str,
    revoked: bool,
}

#[derive(Serialize)]
struct JsonFresh {
    now: u64,
    fresh: bool,
}

fn follows(service: bool) -> &'static str {
    if service { "service" } else { "device" }
}

/// The content of `revocation_vectors.json`: pretty-printed, ending in a newline.
pub(crate) fn to_json(
    streams: &[StreamOf],
    tokens: &[TestToken],
    messages: &[MessageCase],
    lists: &[ListCase],
) -> String {
    let hub: PublicKey = issuer().public_key();
    let file = JsonFile {
        about: "Tessera revocation vectors (PROTOCOL.md §11); schema in shared/testdata/README.md; \
                generated by `cargo run -p tessera-shared --example make_vectors`",
        hub_public_key_cose_hex: hex::encode(cose_key(&hub)),
        hub_kid_hex: hex::encode(hub.kid()),
        leeway: LEEWAY,
        default_max_age: DEFAULT_MAX_AGE,
        streams: streams
            .iter()
            .map(|s| JsonStream {
                audience: s.audience,
                follows: follows(s.service),
                stream: s.stream.clone(),
            })
            .collect(),
        tokens: tokens
            .iter()
            .map(|t| JsonToken {
                name: t.name,
                description: t.description,
                token_hex: hex::encode(&t.bytes),
                token_hash_hex: hex::encode(t.hash()),
                same_token_as: t.same_token_as,
                audience: t.claims.map(|c| c.0),
                subject: t.claims.map(|c| c.1),
                issued_at: t.claims.map(|c| c.2),
            })
            .collect(),
        messages: messages
            .iter()
            .map(|m| {
                let (expect, reason) = match m.expect {
                    Expect::Valid => ("valid", ""),
                    Expect::Invalid { reason, .. } => ("invalid", reason),
                };
                JsonMessage {
                    name: m.name,
                    description: m.description,
                    message_hex: hex::encode(&m.bytes),
                    expect,
                    reason,
                    decoded: m.decoded.as_ref().map(JsonDecoded::from),
                }
            })
            .collect(),
        lists: lists
            .iter()
            .map(|l| JsonList {
                name: l.name,
                description: l.description,
                audience: l.audience,
                follows: follows(l.service),
                capacity: l.capacity,
                steps: l
                    .steps
                    .iter()
                    .map(|s| JsonStep {
                        message: s.message,
                        now: s.now,
                        outcome: s.outcome,
                        state: s.state,
                    })
                    .collect(),
                revoked: l
                    .revoked
                    .iter()
                    .map(|(token, revoked)| JsonRevoked {
                        token,
                        revoked: *revoked,
                    })
                    .collect(),
                fresh: l
                    .fresh
                    .iter()
                    .map(|(now, fresh)| JsonFresh {
                        now: *now,
                        fresh: *fresh,
                    })
                    .collect(),
            })
            .collect(),
    };
    let mut json = serde_json::to_string_pretty(&file).expect("the vectors serialise");
    json.push('\n');
    json
}

/// The whole file, from the generator's cases.
pub(crate) fn generate() -> String {
    to_json(&streams(), &tokens(), &messages(), &lists())
}

// ------------------------------------------------------------------------------------------
// The core in the vectors' words: shared by `tests/revocation_vectors.rs` and
// `examples/check_python_revocations.rs`.

/// What a verifier does with a message from a stream topic: decode the COSE_Sign1, verify
/// it with the hub key named by its kid, decode the payload as a page or a heartbeat.
pub(crate) fn decode<'a>(key: &PublicKey, message: &'a [u8]) -> Result<StreamMessage<'a>, Error> {
    StreamMessage::decode(tessera_shared::revocation::verify(message, key)?)
}

/// The decoded content in the JSON's form, from the core's own accessors.
pub(crate) fn decoded_of(message: &StreamMessage<'_>) -> JsonDecoded {
    match message {
        StreamMessage::Page(p) => JsonDecoded::Page {
            seq: p.seq(),
            issued_at: p.issued_at(),
            stream: p.stream().name().to_string(),
            from: p.from(),
            to: p.to(),
            entries: p
                .entries()
                .iter()
                .map(|e| {
                    let e = e.expect("a decoded page's entries decode");
                    let audience = e.audience.to_string();
                    match e.entry {
                        Entry::Token { hash, expires_at } => JsonEntry::Token {
                            audience,
                            hash_hex: hex::encode(hash),
                            expires_at,
                        },
                        Entry::Subject {
                            subject,
                            issued_before,
                            expires_at,
                        } => JsonEntry::Subject {
                            audience,
                            subject: subject.to_string(),
                            issued_before,
                            expires_at,
                        },
                    }
                })
                .collect(),
        },
        StreamMessage::Heartbeat(h) => JsonDecoded::Heartbeat {
            seq: h.seq(),
            issued_at: h.issued_at(),
            stream: h.stream().name().to_string(),
            max_age: h.max_age(),
        },
    }
}

/// A list's state in the vectors' words.
pub(crate) fn state_of<S: EntryStore>(list: &RevocationList<S>) -> State {
    State {
        prefix: list.seq(),
        latest: list.latest(),
        complete: list.is_complete(),
        fresh_as_of: list.fresh_as_of(),
        wanted_from: list.wanted_from(),
        max_age: list.max_age(None),
        entries: list.len(),
    }
}

/// Applies a verified message to `list` at `now`; the outcome in the vectors' words, or
/// an error no step of the vectors expects.
pub(crate) fn apply<S: EntryStore>(
    list: &mut RevocationList<S>,
    message: &StreamMessage<'_>,
    now: u64,
) -> Result<&'static str, Error> {
    let other_stream = Error::Decode(DecodeError::InvalidValue("stream"));
    match message {
        StreamMessage::Page(page) => match list.apply_page(page, now) {
            Ok(PageOutcome::Applied) => Ok("applied"),
            Ok(PageOutcome::AlreadyApplied) => Ok("already_applied"),
            Ok(PageOutcome::Gap { have, latest }) => {
                assert_eq!((have, latest), (list.seq(), list.latest()));
                Ok("gap")
            }
            Err(Error::Capacity(CapacityError::Revocations)) => Ok("overflow"),
            Err(e) if e == other_stream => Ok("refused_other_stream"),
            Err(e) => Err(e),
        },
        StreamMessage::Heartbeat(hb) => match list.apply_heartbeat(hb) {
            Ok(HeartbeatOutcome::InSync) => Ok("in_sync"),
            Ok(HeartbeatOutcome::Behind) => Ok("behind"),
            Ok(HeartbeatOutcome::Outdated) => Ok("outdated"),
            Err(e) if e == other_stream => Ok("refused_other_stream"),
            Err(e) => Err(e),
        },
    }
}
