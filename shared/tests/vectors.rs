//! The committed token vectors (`testdata/vectors.json`) against the core.
//!
//! The JSON is what other implementations run (`interop/verify_vectors.py`), so its shape
//! and reason strings are a contract; these tests check that the core gives every case its
//! committed verdict for its stated reason, that each invalid case has exactly one defect,
//! and that the file is exactly what `vectors/generator.rs` makes.

#[path = "vectors/generator.rs"]
mod generator;

use base64::Engine as _;
use serde::Deserialize;
use tessera_shared::Error;
use tessera_shared::crypto::{PublicKey, Signer as _};
use tessera_shared::error::{ClaimsError, DecodeError, SignatureError};
use tessera_shared::token::{self, DEFAULT_LEEWAY, Validation};

use generator::{Expect, P256_SPKI_PREFIX};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    issuer_public_key_pem: String,
    issuer_public_key_cose_hex: String,
    cases: Vec<JsonCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCase {
    name: String,
    token_hex: String,
    now: u64,
    audience: String,
    expect: String,
    reason: String,
}

/// Every reason an invalid vector may give, and the core's error for it. Other
/// implementations key on these strings, so they never change meaning.
const REASONS: [(&str, Error); 14] = [
    ("expired", Error::Claims(ClaimsError::Expired)),
    ("not_yet_valid", Error::Claims(ClaimsError::NotYetValid)),
    ("wrong_audience", Error::Claims(ClaimsError::WrongAudience)),
    ("bad_signature", Error::Signature(SignatureError::Invalid)),
    // Signed by another key but carrying the issuer's kid: the key is found, the
    // signature does not verify under it.
    ("wrong_key", Error::Signature(SignatureError::Invalid)),
    (
        "unsupported_algorithm",
        Error::Signature(SignatureError::UnsupportedAlgorithm),
    ),
    ("trailing_bytes", Error::Decode(DecodeError::TrailingBytes)),
    ("truncated", Error::Decode(DecodeError::Malformed)),
    (
        "duplicate_claim",
        Error::Decode(DecodeError::DuplicateKey(4)),
    ),
    (
        "unprotected_alg",
        Error::Decode(DecodeError::UnprotectedHeaderNotEmpty),
    ),
    (
        "missing_exp",
        Error::Decode(DecodeError::MissingField("exp")),
    ),
    (
        "missing_cnf",
        Error::Decode(DecodeError::MissingField("cnf")),
    ),
    (
        "unknown_critical_header",
        Error::Decode(DecodeError::UnknownCriticalHeader),
    ),
    (
        "indefinite_length",
        Error::Decode(DecodeError::IndefiniteLength),
    ),
];

fn expected_error(reason: &str) -> Option<Error> {
    REASONS.iter().find(|(r, _)| *r == reason).map(|(_, e)| *e)
}

fn committed() -> (String, VectorFile) {
    let raw = std::fs::read_to_string(generator::VECTORS_PATH)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", generator::VECTORS_PATH));
    let file = serde_json::from_str(&raw).expect("vectors.json has the committed shape");
    (raw, file)
}

fn issuer_key(file: &VectorFile) -> PublicKey {
    let cose = hex::decode(&file.issuer_public_key_cose_hex).expect("COSE key hex");
    PublicKey::from_cose_key(&cose).expect("the issuer COSE_Key decodes")
}

fn verify(key: &PublicKey, token: &[u8], now: u64, audience: &str) -> Result<(), Error> {
    let validation = Validation::new(now, audience);
    assert_eq!(validation.leeway, DEFAULT_LEEWAY);
    assert_eq!(DEFAULT_LEEWAY, 30, "the vectors assume a 30 s leeway");
    token::verify(token, key, &validation).map(|_| ())
}

#[test]
fn every_committed_vector_gets_its_committed_verdict_for_its_stated_reason() {
    let (_, file) = committed();
    let key = issuer_key(&file);
    let mut failures = Vec::new();
    for case in &file.cases {
        let token = hex::decode(&case.token_hex).expect("token hex");
        let got = verify(&key, &token, case.now, &case.audience);
        let want = match case.expect.as_str() {
            "valid" => {
                assert!(
                    expected_error(&case.reason).is_none(),
                    "{}: a valid case must not give an invalid reason",
                    case.name
                );
                Ok(())
            }
            "invalid" => Err(expected_error(&case.reason)
                .unwrap_or_else(|| panic!("{}: unknown reason {:?}", case.name, case.reason))),
            other => panic!(
                "{}: expect must be valid or invalid, not {other:?}",
                case.name
            ),
        };
        let verdict = match &got {
            Ok(()) => "valid".to_owned(),
            Err(e) => format!("invalid: {e}"),
        };
        println!(
            "{:<34} {:<8} {:<24} -> {verdict}",
            case.name, case.expect, case.reason
        );
        if got != want {
            failures.push(format!("{}: want {want:?}, got {got:?}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "vectors with the wrong verdict:\n{}",
        failures.join("\n")
    );
}

#[test]
fn there_are_enough_cases_and_every_reason_is_covered() {
    let (_, file) = committed();
    assert!(file.cases.len() >= 12, "only {} cases", file.cases.len());
    assert!(file.cases.iter().filter(|c| c.expect == "valid").count() >= 2);
    for (reason, _) in REASONS {
        assert!(
            file.cases
                .iter()
                .any(|c| c.expect == "invalid" && c.reason == reason),
            "no invalid vector for reason {reason}"
        );
    }
    let mut names: Vec<&str> = file.cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), file.cases.len(), "case names must be unique");
}

#[test]
fn the_pem_and_the_cose_key_are_the_same_issuer_key() {
    let (_, file) = committed();
    let pem = &file.issuer_public_key_pem;
    let body = pem
        .strip_prefix("-----BEGIN PUBLIC KEY-----\n")
        .and_then(|p| p.strip_suffix("-----END PUBLIC KEY-----\n"))
        .expect("one SPKI PEM block");
    assert!(
        body.lines().all(|l| l.len() <= 64),
        "PEM lines are at most 64 characters"
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.replace('\n', ""))
        .expect("PEM body is base64");
    assert_eq!(der.len(), P256_SPKI_PREFIX.len() + 65);
    assert_eq!(
        der[..P256_SPKI_PREFIX.len()],
        P256_SPKI_PREFIX,
        "P-256 SPKI header"
    );
    let key = issuer_key(&file);
    assert_eq!(
        der[der.len() - 65..],
        key.to_sec1(),
        "PEM and COSE_Key hold different points"
    );
    assert_eq!(key, generator::issuer().public_key());
}

#[test]
fn the_committed_file_is_what_the_generator_makes_byte_for_byte() {
    let (raw, _) = committed();
    let fresh = generator::to_json(&generator::cases());
    // Twice, so a generator that varied between runs would show here too.
    assert_eq!(fresh, generator::to_json(&generator::cases()));
    assert!(
        raw == fresh,
        "testdata/vectors.json is stale: run `cargo run -p tessera-shared --example make_vectors`"
    );
}

#[test]
fn each_invalid_vector_has_exactly_one_defect() {
    let key = generator::issuer().public_key();
    for case in generator::cases() {
        let c = &case.check;
        let got = verify(&key, &c.token, c.now, c.audience);
        match case.expect {
            Expect::Valid => {
                assert_eq!(got, Ok(()), "{}", case.name);
                assert!(case.repaired.is_none(), "{}", case.name);
            }
            Expect::Invalid { reason, error } => {
                // The generator's expectation and this file's table agree.
                assert_eq!(expected_error(reason), Some(error), "{}", case.name);
                assert_eq!(got, Err(error), "{}", case.name);
                // Undoing its one change makes the token valid: nothing else is wrong.
                let r = case
                    .repaired
                    .as_ref()
                    .expect("invalid cases carry a repair");
                assert_eq!(
                    verify(&key, &r.token, r.now, r.audience),
                    Ok(()),
                    "{}: the repaired token does not verify",
                    case.name
                );
            }
        }
    }
}

#[test]
fn valid_vectors_carry_the_documented_claims() {
    let (_, file) = committed();
    let key = issuer_key(&file);
    let holder = generator::holder().public_key();
    for case in file.cases.iter().filter(|c| c.expect == "valid") {
        let token = hex::decode(&case.token_hex).expect("token hex");
        let v = Validation::new(case.now, &case.audience)
            .with_issuer(generator::ISSUER_ID)
            .with_scope("door:open");
        let t = token::verify(&token, &key, &v).expect(&case.name);
        let c = t.claims();
        assert_eq!(
            (c.sub, c.aud),
            (generator::SUBJECT, generator::AUDIENCE),
            "{}",
            case.name
        );
        assert_eq!(c.scope.as_str(), generator::SCOPE, "{}", case.name);
        assert_eq!(c.cti, generator::CTI, "{}", case.name);
        assert_eq!(c.cnf, holder, "{}", case.name);
        assert_eq!(t.kid(), key.kid(), "{}", case.name);
    }
}

#[test]
fn structural_vectors_are_signed_by_the_issuer_over_what_they_carry() {
    // Every invalid case except the signature ones carries a correct issuer signature
    // over its own protected header and payload: its structure is the only thing wrong.
    use tessera_shared::crypto::Verifier as _;
    let key = generator::issuer().public_key();
    for case in generator::cases() {
        let Expect::Invalid { reason, .. } = case.expect else {
            continue;
        };
        if matches!(reason, "bad_signature" | "wrong_key" | "truncated") {
            continue;
        }
        let (protected, payload, signature) = split_sign1(&case.check.token);
        let sig =
            tessera_shared::crypto::Signature(signature.try_into().expect("64-byte signature"));
        let head = |n: usize| -> Vec<u8> {
            match n {
                0..=23 => vec![0x40 | u8::try_from(n).expect("small")],
                24..=255 => vec![0x58, u8::try_from(n).expect("one byte")],
                _ => [
                    &[0x59][..],
                    &u16::try_from(n).expect("two bytes").to_be_bytes(),
                ]
                .concat(),
            }
        };
        let message: [&[u8]; 6] = [
            b"\x84\x6aSignature1",
            &head(protected.len()),
            protected,
            &[0x40],
            &head(payload.len()),
            payload,
        ];
        assert_eq!(key.verify(&message, &sig), Ok(()), "{}", case.name);
    }
}

/// Splits a (possibly tag-61-wrapped) tag-18 COSE_Sign1 into protected header, payload
/// and signature, skipping whatever unprotected header it has. Only for the vectors'
/// shapes: protected headers and payloads under 256 bytes.
fn split_sign1(token: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let mut at = 0;
    if token.starts_with(&[0xd8, 61]) {
        at += 2;
    }
    assert_eq!(token[at..at + 2], [0xd2, 0x84]);
    at += 2;
    let (head_len, plen) = match token[at] {
        0x58 => (2, usize::from(token[at + 1])),
        h => (1, usize::from(h - 0x40)),
    };
    let protected = &token[at + head_len..at + head_len + plen];
    at += head_len + plen;
    // Unprotected header: `a0` or `a1 01 26`.
    at += if token[at] == 0xa0 { 1 } else { 3 };
    assert_eq!(token[at], 0x58, "payload bstr with a one-byte length");
    let len = usize::from(token[at + 1]);
    let payload = &token[at + 2..at + 2 + len];
    at += 2 + len;
    assert_eq!(token[at..at + 2], [0x58, 0x40]);
    (protected, payload, &token[at + 2..at + 66])
}

#[test]
fn re_encodings_of_one_token_share_its_revocation_hash() {
    // The tag-61 and high-`s` vectors carry the same signed message as `valid`: a holder
    // re-encoding a revoked token must not give it a new name on the revocation list.
    let (_, file) = committed();
    let token = |name: &str| {
        let case = file.cases.iter().find(|c| c.name == name).expect(name);
        hex::decode(&case.token_hex).expect("token hex")
    };
    let valid = token("valid");
    let hash = tessera_shared::revocation::token_hash(&valid);
    for name in ["valid_cwt_tag_61", "valid_high_s_signature"] {
        let other = token(name);
        assert_ne!(other, valid, "{name}");
        assert_eq!(
            tessera_shared::revocation::token_hash(&other),
            hash,
            "{name}"
        );
    }
}
