//! The committed token vectors, generated deterministically.
//!
//! `examples/make_vectors.rs` writes [`to_json`] to `testdata/vectors.json`;
//! `tests/vectors.rs` regenerates it in memory, compares it with the committed file byte for
//! byte and runs every case through the core. Nothing varies between runs: the keys are
//! fixed (`keys.rs`), so are the times and claims, and ES256 with the `p256` backend is
//! deterministic (RFC 6979).
//!
//! Every token is assembled from the same parts (optional CWT tag, protected header,
//! unprotected header, claims, signing key), and every invalid case changes exactly one
//! part of a valid token, or only the `now` or audience it is checked with. Each invalid
//! case carries its `repaired` check (the same parts with that one change undone) that the
//! test requires to verify, so an invalid vector cannot fail for a second, unintended
//! reason. The expected Rust error of each case lives here and in the test, not in the
//! JSON, whose shape other implementations rely on.

// Included by an example and by a test, each of which uses only part of it.
#![allow(dead_code)]

use base64::Engine as _;
use serde::Serialize;
use tessera_shared::Error;
use tessera_shared::claims::{CTI_LEN, Claims};
use tessera_shared::crypto::{COSE_KEY_LEN, Kid, P256Signer, PublicKey, Signer};
use tessera_shared::error::{ClaimsError, DecodeError, SignatureError};
use tessera_shared::scope::Scopes;
use tessera_shared::token;

include!("keys.rs");

/// Where the vectors are committed.
pub(crate) const VECTORS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vectors.json");

/// `iat` of every vector token, Unix seconds.
pub(crate) const IAT: u64 = 1_700_000_000;
/// Lifetime of the vector tokens (a device token's default, 15 min).
pub(crate) const LIFETIME: u64 = 900;
/// `exp` of the baseline token.
pub(crate) const EXP: u64 = IAT + LIFETIME;
/// The `now` most cases are checked at: one minute after issue.
pub(crate) const FRESH: u64 = IAT + 60;
/// The clock-skew leeway the vectors assume: the core's default.
pub(crate) const LEEWAY: u64 = token::DEFAULT_LEEWAY;

pub(crate) const ISSUER_ID: &str = "hub-1";
pub(crate) const SUBJECT: &str = "app-7";
pub(crate) const AUDIENCE: &str = "device-42";
pub(crate) const OTHER_AUDIENCE: &str = "device-43";
pub(crate) const SCOPE: &str = "door:open telemetry:read";
pub(crate) const CTI: [u8; CTI_LEN] = *b"tessera-vector-1";

/// DER of a P-256 SubjectPublicKeyInfo up to the key bits (RFC 5480): SEQUENCE, the
/// AlgorithmIdentifier {id-ecPublicKey, prime256v1}, then the BIT STRING head (66 bytes, no
/// unused bits). The 65-byte uncompressed point follows.
pub(crate) const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The first item of every COSE `Sig_structure`: array(4), then the text "Signature1".
const SIG_STRUCTURE_PREFIX: &[u8] = b"\x84\x6aSignature1";

/// COSE algorithm ES256 and, for the `unsupported_algorithm` case, ES384.
const ALG_ES256: i64 = -7;
const ALG_ES384: i64 = -35;
/// A private-use header label that no implementation understands, listed as critical.
const PRIVATE_HEADER: i64 = -65537;

pub(crate) fn issuer() -> P256Signer {
    P256Signer::from_scalar(&ISSUER_SCALAR).expect("the issuer scalar is a valid P-256 key")
}

pub(crate) fn other_issuer() -> P256Signer {
    P256Signer::from_scalar(&OTHER_ISSUER_SCALAR).expect("the other scalar is a valid P-256 key")
}

pub(crate) fn holder() -> P256Signer {
    P256Signer::from_scalar(&HOLDER_SCALAR).expect("the holder scalar is a valid P-256 key")
}

/// The issuer's COSE_Key exactly as [`PublicKey::to_cose_key`] writes it.
pub(crate) fn cose_key(key: &PublicKey) -> Vec<u8> {
    let mut buf = [0u8; COSE_KEY_LEN];
    let n = key
        .to_cose_key(&mut buf)
        .expect("a COSE_Key fits COSE_KEY_LEN");
    buf[..n].to_vec()
}

/// The issuer's public key as an SPKI PEM block, 64 base64 characters a line.
pub(crate) fn issuer_pem() -> String {
    let der = [&P256_SPKI_PREFIX[..], &issuer().public_key().to_sec1()[..]].concat();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

// ------------------------------------------------------------------------------------------
// A minimal CBOR encoder, so the invalid cases can say exactly which bytes they hold.

pub(crate) fn head(major: u8, arg: u64) -> Vec<u8> {
    let mt = major << 5;
    let b = arg.to_be_bytes();
    match arg {
        0..=23 => vec![mt | b[7]],
        24..=0xff => vec![mt | 24, b[7]],
        0x100..=0xffff => vec![mt | 25, b[6], b[7]],
        0x1_0000..=0xffff_ffff => vec![mt | 26, b[4], b[5], b[6], b[7]],
        _ => [&[mt | 27][..], &b[..]].concat(),
    }
}

pub(crate) fn len64(n: usize) -> u64 {
    u64::try_from(n).expect("lengths fit in u64")
}

pub(crate) fn uint(v: u64) -> Vec<u8> {
    head(0, v)
}

pub(crate) fn int(v: i64) -> Vec<u8> {
    if v >= 0 {
        head(0, v.unsigned_abs())
    } else {
        head(1, v.unsigned_abs() - 1)
    }
}

pub(crate) fn text(s: &str) -> Vec<u8> {
    [head(3, len64(s.len())), s.as_bytes().to_vec()].concat()
}

pub(crate) fn bstr(b: &[u8]) -> Vec<u8> {
    [head(2, len64(b.len())), b.to_vec()].concat()
}

pub(crate) fn array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = head(4, len64(items.len()));
    for item in items {
        out.extend_from_slice(item);
    }
    out
}

/// How a map's length is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapForm {
    Definite,
    /// `bf ... ff`, which the core refuses everywhere.
    Indefinite,
}

/// A map of integer labels to already encoded values, in the order given.
pub(crate) fn map(entries: &[(i64, Vec<u8>)], form: MapForm) -> Vec<u8> {
    let mut out = match form {
        MapForm::Definite => head(5, len64(entries.len())),
        MapForm::Indefinite => vec![0xbf],
    };
    for (label, value) in entries {
        out.extend_from_slice(&int(*label));
        out.extend_from_slice(value);
    }
    if form == MapForm::Indefinite {
        out.push(0xff);
    }
    out
}

// ------------------------------------------------------------------------------------------
// Claims and tokens from parts.

/// The claims of one vector token.
#[derive(Clone, Copy)]
pub(crate) struct ClaimSet {
    pub(crate) exp: u64,
    pub(crate) nbf: Option<u64>,
    pub(crate) iat: u64,
    pub(crate) cnf: PublicKey,
}

impl ClaimSet {
    /// The baseline: issued at [`IAT`], expiring at [`EXP`], no `nbf`, bound to the holder.
    pub(crate) fn baseline() -> Self {
        Self {
            exp: EXP,
            nbf: None,
            iat: IAT,
            cnf: holder().public_key(),
        }
    }

    pub(crate) fn as_claims(&self) -> Claims<'static> {
        Claims {
            iss: ISSUER_ID,
            sub: SUBJECT,
            aud: AUDIENCE,
            exp: self.exp,
            nbf: self.nbf,
            iat: self.iat,
            cti: &CTI,
            cnf: self.cnf,
            scope: Scopes::parse(SCOPE).expect("the vector scope is valid"),
        }
    }

    /// `(label, encoded value)` in the order the core's encoder writes them.
    fn entries(&self) -> Vec<(i64, Vec<u8>)> {
        let mut e = vec![
            (1, text(ISSUER_ID)),
            (2, text(SUBJECT)),
            (3, text(AUDIENCE)),
            (4, uint(self.exp)),
        ];
        if let Some(nbf) = self.nbf {
            e.push((5, uint(nbf)));
        }
        e.push((6, uint(self.iat)));
        e.push((7, bstr(&CTI)));
        e.push((8, map(&[(1, cose_key(&self.cnf))], MapForm::Definite)));
        e.push((9, text(SCOPE)));
        e
    }

    /// The claims map as the hub issues it. Built by hand like the invalid variants, and
    /// checked against the core's own encoder, so the valid vectors are exactly what the
    /// core issues.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let by_hand = map(&self.entries(), MapForm::Definite);
        let mut buf = [0u8; 512];
        let n = self
            .as_claims()
            .encode_to(&mut buf)
            .expect("claims fit 512 bytes");
        assert_eq!(
            by_hand,
            buf[..n],
            "hand-built claims differ from Claims::encode_to"
        );
        by_hand
    }

    /// The claims map with its entries changed by `edit` (a claim dropped or repeated).
    fn encode_edited(&self, edit: impl FnOnce(&mut Vec<(i64, Vec<u8>)>)) -> Vec<u8> {
        let mut e = self.entries();
        edit(&mut e);
        map(&e, MapForm::Definite)
    }
}

/// Which fixed key signs a token.
#[derive(Clone, Copy)]
pub(crate) enum SigningKey {
    Issuer,
    OtherIssuer,
}

/// Everything a vector token is made of.
#[derive(Clone)]
pub(crate) struct Parts {
    /// Wrap the tagged COSE_Sign1 in the CWT tag 61.
    pub(crate) cwt_tag: bool,
    /// The protected header map, as the bstr's content.
    pub(crate) protected: Vec<u8>,
    /// The unprotected header map.
    pub(crate) unprotected: Vec<u8>,
    /// The payload: the claims map (or, for the revocation vectors, a page or heartbeat).
    pub(crate) claims: Vec<u8>,
    /// The key whose signature the token carries.
    pub(crate) key: SigningKey,
}

/// `{1: alg, 4: kid}`: what the core writes, with a choice of algorithm.
fn protected_header(alg: i64, kid: &Kid) -> Vec<u8> {
    map(&[(1, int(alg)), (4, bstr(kid))], MapForm::Definite)
}

impl Parts {
    /// A token as the issuer signs it: tag 18, `{1: -7, 4: issuer kid}`, `{}`.
    pub(crate) fn issued(claims: Vec<u8>) -> Self {
        Self {
            cwt_tag: false,
            protected: protected_header(ALG_ES256, &issuer().kid()),
            unprotected: map(&[], MapForm::Definite),
            claims,
            key: SigningKey::Issuer,
        }
    }

    /// Signs the `Sig_structure` over these parts exactly as `cose.rs` does (low-`s`
    /// signature) and lays out `[61(] 18([protected, unprotected, payload, signature]) [)]`.
    pub(crate) fn assemble(&self) -> Vec<u8> {
        let signer = match self.key {
            SigningKey::Issuer => issuer(),
            SigningKey::OtherIssuer => other_issuer(),
        };
        let protected_head = head(2, len64(self.protected.len()));
        let payload_head = head(2, len64(self.claims.len()));
        let signature = signer
            .sign(&[
                SIG_STRUCTURE_PREFIX,
                &protected_head,
                &self.protected,
                &[0x40], // external_aad: empty bstr
                &payload_head,
                &self.claims,
            ])
            .expect("p256 signs");
        let signature = low_s(&signature.0);
        let mut out = Vec::new();
        if self.cwt_tag {
            out.extend_from_slice(&[0xd8, 61]);
        }
        out.extend_from_slice(&[0xd2, 0x84]); // tag 18, array(4)
        out.extend_from_slice(&bstr(&self.protected));
        out.extend_from_slice(&self.unprotected);
        out.extend_from_slice(&bstr(&self.claims));
        out.extend_from_slice(&bstr(&signature));
        out
    }
}

/// The signature with `s` replaced by `n - s` if it is above `n / 2`: the form
/// `cose::sign` writes, so the hand-built vectors carry the signature the core would.
pub(crate) fn low_s(signature: &[u8; 64]) -> [u8; 64] {
    let sig = p256::ecdsa::Signature::from_slice(signature).expect("a p256 signature");
    sig.normalize_s().to_bytes().into()
}

/// The other valid signature over the same message: `s` replaced by `n - s`.
pub(crate) fn twin_s(signature: &[u8]) -> [u8; 64] {
    let sig = p256::ecdsa::Signature::from_slice(signature).expect("a p256 signature");
    let (r, s) = sig.split_scalars();
    p256::ecdsa::Signature::from_scalars(r, -*s)
        .expect("n - s is a valid s")
        .to_bytes()
        .into()
}

/// Signs `claims` with the core's own issuer and checks the parts assemble to the same
/// bytes, so the assembler is proven to match `token::issue`.
fn issue(claims: &ClaimSet) -> Vec<u8> {
    let mut buf = [0u8; 1024];
    let n = token::issue(&claims.as_claims(), &issuer(), &mut buf).expect("token fits");
    let by_parts = Parts::issued(claims.encode()).assemble();
    assert_eq!(
        by_parts,
        buf[..n],
        "assembled token differs from token::issue"
    );
    by_parts
}

// ------------------------------------------------------------------------------------------
// The cases.

/// A token, the `now` and the audience it is checked with.
#[derive(Clone)]
pub(crate) struct Check {
    pub(crate) token: Vec<u8>,
    pub(crate) now: u64,
    pub(crate) audience: &'static str,
}

/// What a case must produce.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Expect {
    Valid,
    Invalid {
        /// The reason string in the JSON, which other implementations key on.
        reason: &'static str,
        /// The core's error for it.
        error: Error,
    },
}

/// One vector.
#[derive(Clone)]
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) check: Check,
    pub(crate) expect: Expect,
    /// For an invalid case: the same token with its one defect undone (or the same token
    /// checked at a `now` or audience that suits it), which must verify.
    pub(crate) repaired: Option<Check>,
}

fn check(token: Vec<u8>, now: u64, audience: &'static str) -> Check {
    Check {
        token,
        now,
        audience,
    }
}

fn valid(name: &'static str, check: Check) -> Case {
    Case {
        name,
        check,
        expect: Expect::Valid,
        repaired: None,
    }
}

fn invalid(
    name: &'static str,
    reason: &'static str,
    error: impl Into<Error>,
    check: Check,
    repaired: Check,
) -> Case {
    Case {
        name,
        check,
        expect: Expect::Invalid {
            reason,
            error: error.into(),
        },
        repaired: Some(repaired),
    }
}

/// Every vector, in the order they are committed.
pub(crate) fn cases() -> Vec<Case> {
    let base = ClaimSet::baseline();
    let good_parts = Parts::issued(base.encode());
    let good = issue(&base);
    let fresh = || check(good.clone(), FRESH, AUDIENCE);
    let signed = |parts: &Parts| check(parts.assemble(), FRESH, AUDIENCE);

    let with_nbf = ClaimSet {
        nbf: Some(IAT),
        ..base
    };
    // nbf 29 s after now: inside the 30 s leeway.
    let nbf_in_leeway = ClaimSet {
        nbf: Some(FRESH + LEEWAY - 1),
        ..base
    };
    // Valid from an hour after now, for a full lifetime from then, so only nbf is wrong.
    let later_nbf = FRESH + 3600;
    let not_yet = ClaimSet {
        nbf: Some(later_nbf),
        exp: later_nbf + LIFETIME,
        ..base
    };
    let not_yet_token = issue(&not_yet);

    // The same signed message with the high-`s` twin of its signature: ECDSA accepts both,
    // and issuers other than the core (OpenSSL, Python `cwt`) do not normalise `s`.
    let mut high_s = good.clone();
    let at = high_s.len() - 64;
    let twin = twin_s(&high_s[at..]);
    high_s[at..].copy_from_slice(&twin);

    let mut bad_signature = good.clone();
    *bad_signature.last_mut().expect("a token is not empty") ^= 0x01;
    let trailing = [&good[..], &[0x00][..]].concat();
    let truncated = good[..good.len() - 1].to_vec();

    let mut crit = Parts::issued(base.encode());
    crit.protected = map(
        &[
            (1, int(ALG_ES256)),
            (2, array(&[int(PRIVATE_HEADER)])),
            (4, bstr(&issuer().kid())),
            (PRIVATE_HEADER, uint(1)),
        ],
        MapForm::Definite,
    );

    vec![
        valid("valid", fresh()),
        // exp + 29 s: still inside the 30 s leeway (the core expires at exp + leeway).
        valid(
            "valid_within_leeway",
            check(good.clone(), EXP + LEEWAY - 1, AUDIENCE),
        ),
        valid("valid_with_nbf", check(issue(&with_nbf), FRESH, AUDIENCE)),
        valid(
            "valid_nbf_within_leeway",
            check(issue(&nbf_in_leeway), FRESH, AUDIENCE),
        ),
        valid(
            "valid_cwt_tag_61",
            signed(&Parts {
                cwt_tag: true,
                ..good_parts.clone()
            }),
        ),
        valid("valid_high_s_signature", check(high_s, FRESH, AUDIENCE)),
        invalid(
            "expired",
            "expired",
            ClaimsError::Expired,
            check(good.clone(), EXP + 3600, AUDIENCE),
            fresh(),
        ),
        invalid(
            "not_yet_valid",
            "not_yet_valid",
            ClaimsError::NotYetValid,
            check(not_yet_token.clone(), FRESH, AUDIENCE),
            check(not_yet_token, later_nbf, AUDIENCE),
        ),
        invalid(
            "wrong_audience",
            "wrong_audience",
            ClaimsError::WrongAudience,
            check(good.clone(), FRESH, OTHER_AUDIENCE),
            fresh(),
        ),
        invalid(
            "bad_signature_last_byte_flipped",
            "bad_signature",
            SignatureError::Invalid,
            check(bad_signature, FRESH, AUDIENCE),
            fresh(),
        ),
        invalid(
            "wrong_key_with_issuer_kid",
            "wrong_key",
            SignatureError::Invalid,
            signed(&Parts {
                key: SigningKey::OtherIssuer,
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "unsupported_algorithm_es384",
            "unsupported_algorithm",
            SignatureError::UnsupportedAlgorithm,
            signed(&Parts {
                protected: protected_header(ALG_ES384, &issuer().kid()),
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "trailing_zero_byte",
            "trailing_bytes",
            DecodeError::TrailingBytes,
            check(trailing, FRESH, AUDIENCE),
            fresh(),
        ),
        invalid(
            "truncated_last_byte",
            "truncated",
            DecodeError::Malformed,
            check(truncated, FRESH, AUDIENCE),
            fresh(),
        ),
        invalid(
            "duplicate_exp_claim",
            "duplicate_claim",
            DecodeError::DuplicateKey(4),
            // A second exp a day later, right after the first: a reader that keeps the
            // last value would extend the token's life.
            signed(&Parts {
                claims: base.encode_edited(|e| {
                    let at = e.iter().position(|(k, _)| *k == 4).expect("exp") + 1;
                    e.insert(at, (4, uint(EXP + 86_400)));
                }),
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "alg_in_unprotected_header",
            "unprotected_alg",
            DecodeError::UnprotectedHeaderNotEmpty,
            signed(&Parts {
                unprotected: map(&[(1, int(ALG_ES256))], MapForm::Definite),
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "missing_exp",
            "missing_exp",
            DecodeError::MissingField("exp"),
            signed(&Parts {
                claims: base.encode_edited(|e| e.retain(|(k, _)| *k != 4)),
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "missing_cnf",
            "missing_cnf",
            DecodeError::MissingField("cnf"),
            signed(&Parts {
                claims: base.encode_edited(|e| e.retain(|(k, _)| *k != 8)),
                ..good_parts.clone()
            }),
            fresh(),
        ),
        invalid(
            "unknown_critical_header",
            "unknown_critical_header",
            DecodeError::UnknownCriticalHeader,
            signed(&crit),
            fresh(),
        ),
        invalid(
            "indefinite_length_claims",
            "indefinite_length",
            DecodeError::IndefiniteLength,
            signed(&Parts {
                claims: map(&base.entries(), MapForm::Indefinite),
                ..good_parts
            }),
            fresh(),
        ),
    ]
}

// ------------------------------------------------------------------------------------------
// The JSON file.

#[derive(Serialize)]
struct VectorFile {
    issuer_public_key_pem: String,
    issuer_public_key_cose_hex: String,
    cases: Vec<JsonCase>,
}

#[derive(Serialize)]
struct JsonCase {
    name: &'static str,
    token_hex: String,
    now: u64,
    audience: &'static str,
    expect: &'static str,
    reason: &'static str,
}

/// The content of `vectors.json`: pretty-printed, ending in a newline.
pub(crate) fn to_json(cases: &[Case]) -> String {
    let file = VectorFile {
        issuer_public_key_pem: issuer_pem(),
        issuer_public_key_cose_hex: hex::encode(cose_key(&issuer().public_key())),
        cases: cases
            .iter()
            .map(|c| {
                let (expect, reason) = match c.expect {
                    Expect::Valid => ("valid", ""),
                    Expect::Invalid { reason, .. } => ("invalid", reason),
                };
                JsonCase {
                    name: c.name,
                    token_hex: hex::encode(&c.check.token),
                    now: c.check.now,
                    audience: c.check.audience,
                    expect,
                    reason,
                }
            })
            .collect(),
    };
    let mut json = serde_json::to_string_pretty(&file).expect("the vectors serialise");
    json.push('\n');
    json
}
