//! The committed revocation vectors (`testdata/revocation_vectors.json`) against the core.
//!
//! The JSON is what other implementations run (`interop/verify_revocation_vectors.py`),
//! so its shape and reason strings are a contract (`testdata/README.md`). These tests check
//! that the core gives every message its committed verdict for its stated reason and
//! decodes the valid ones to the committed content, that each invalid message has exactly
//! one defect, that tokens hash and devices map to streams as committed, that a list
//! reaches every committed state, and that the file is exactly what
//! `vectors/revocation.rs` makes.

#[path = "vectors/generator.rs"]
mod generator;
#[path = "vectors/revocation.rs"]
mod revocation_gen;

use serde::Deserialize;
use tessera_shared::cose::Sign1;
use tessera_shared::crypto::{PublicKey, Signer as _};
use tessera_shared::revocation::{
    Bounded, EntryStore, Indexed, RevocationList, Stream, StreamMessage, token_hash,
};
use tessera_shared::token::{self, Validation};

use generator::Expect;
use revocation_gen::{JsonDecoded, JsonEntry, REASONS, State, decode, expected_error};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    about: String,
    hub_public_key_cose_hex: String,
    hub_kid_hex: String,
    leeway: u64,
    default_max_age: u64,
    streams: Vec<JsonStream>,
    tokens: Vec<JsonToken>,
    messages: Vec<JsonMessage>,
    lists: Vec<JsonList>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStream {
    audience: String,
    follows: String,
    stream: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonToken {
    name: String,
    #[allow(dead_code)] // for people
    description: String,
    token_hex: String,
    token_hash_hex: String,
    same_token_as: Option<String>,
    audience: Option<String>,
    subject: Option<String>,
    issued_at: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonMessage {
    name: String,
    #[allow(dead_code)] // for people
    description: String,
    message_hex: String,
    expect: String,
    reason: String,
    decoded: Option<JsonDecoded>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonList {
    name: String,
    #[allow(dead_code)] // for people
    description: String,
    audience: String,
    follows: String,
    capacity: usize,
    steps: Vec<JsonStep>,
    revoked: Vec<JsonRevoked>,
    fresh: Vec<JsonFresh>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonStep {
    message: String,
    now: u64,
    outcome: String,
    state: State,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRevoked {
    token: String,
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonFresh {
    now: u64,
    fresh: bool,
}

fn committed() -> (String, VectorFile) {
    let path = revocation_gen::REVOCATION_VECTORS_PATH;
    let raw = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let file = serde_json::from_str(&raw).expect("revocation_vectors.json has the committed shape");
    (raw, file)
}

fn hub_key(file: &VectorFile) -> PublicKey {
    let cose = hex::decode(&file.hub_public_key_cose_hex).expect("COSE key hex");
    PublicKey::from_cose_key(&cose).expect("the hub COSE_Key decodes")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

#[test]
fn the_committed_file_is_what_the_generator_makes_byte_for_byte() {
    let (raw, file) = committed();
    let fresh = revocation_gen::generate();
    // Twice, so a generator that varied between runs would show here too.
    assert_eq!(fresh, revocation_gen::generate());
    assert!(
        raw == fresh,
        "testdata/revocation_vectors.json is stale: run \
         `cargo run -p tessera-shared --example make_vectors`"
    );
    assert!(file.about.contains("README"));
}

#[test]
fn the_hub_key_is_the_token_vectors_issuer_key() {
    let (_, file) = committed();
    let key = hub_key(&file);
    assert_eq!(key, generator::issuer().public_key());
    assert_eq!(unhex(&file.hub_kid_hex), key.kid());
    assert_eq!(file.leeway, tessera_shared::revocation::DEFAULT_LEEWAY);
    assert_eq!(
        file.default_max_age,
        tessera_shared::revocation::DEFAULT_MAX_AGE
    );
}

#[test]
fn every_message_gets_its_committed_verdict_for_its_stated_reason_and_content() {
    let (_, file) = committed();
    let key = hub_key(&file);
    let mut failures = Vec::new();
    for case in &file.messages {
        let bytes = unhex(&case.message_hex);
        let got = decode(&key, &bytes);
        let want = match case.expect.as_str() {
            "valid" => {
                assert_eq!(
                    case.reason, "",
                    "{}: a valid case gives no reason",
                    case.name
                );
                Ok(())
            }
            "invalid" => {
                assert!(
                    case.decoded.is_none(),
                    "{}: invalid cases decode to nothing",
                    case.name
                );
                Err(expected_error(&case.reason)
                    .unwrap_or_else(|| panic!("{}: unknown reason {:?}", case.name, case.reason)))
            }
            other => panic!("{}: expect is valid or invalid, not {other:?}", case.name),
        };
        let verdict = match &got {
            Ok(_) => "valid".to_owned(),
            Err(e) => format!("invalid: {e}"),
        };
        println!(
            "{:<44} {:<8} {:<22} -> {verdict}",
            case.name, case.expect, case.reason
        );
        match (&got, &want) {
            (Ok(message), Ok(())) => {
                let decoded = revocation_gen::decoded_of(message);
                if case.decoded.as_ref() != Some(&decoded) {
                    failures.push(format!(
                        "{}: decodes to {decoded:?}, committed {:?}",
                        case.name, case.decoded
                    ));
                }
            }
            (Err(g), Err(w)) if g == w => {}
            _ => failures.push(format!(
                "{}: want {want:?}, got {:?}",
                case.name,
                got.map(|_| ())
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "messages with the wrong verdict or content:\n{}",
        failures.join("\n")
    );
}

#[test]
fn each_invalid_message_has_exactly_one_defect() {
    let hub = generator::issuer().public_key();
    let other = generator::other_issuer().public_key();
    for case in revocation_gen::messages() {
        match case.expect {
            Expect::Valid => {
                assert!(decode(&hub, &case.bytes).is_ok(), "{}", case.name);
                assert!(case.repaired.is_none(), "{}", case.name);
            }
            Expect::Invalid { reason, error } => {
                assert_eq!(
                    decode(&hub, &case.bytes).map(|_| ()),
                    Err(error),
                    "{}",
                    case.name
                );
                // Undoing its one change gives a valid message: nothing else is wrong.
                let repaired = case
                    .repaired
                    .as_ref()
                    .expect("invalid cases carry a repair");
                assert!(
                    decode(&hub, repaired).is_ok(),
                    "{}: the repaired message is not valid",
                    case.name
                );
                // A signature defect leaves the payload valid; any other defect is in
                // what the hub signed (or after it), not in the signature.
                match reason {
                    "unknown_key" | "wrong_key" => assert!(
                        Sign1::decode(&case.bytes)
                            .and_then(|m| m.verify_with(&other))
                            .and_then(StreamMessage::decode)
                            .is_ok(),
                        "{}: valid under the key that signed it",
                        case.name
                    ),
                    "bad_signature" => {}
                    _ if case.bytes.starts_with(repaired) => {
                        assert_eq!(reason, "trailing_bytes", "{}", case.name);
                    }
                    _ => assert!(
                        Sign1::decode(&case.bytes)
                            .and_then(|m| m.verify(&hub))
                            .is_ok(),
                        "{}: the hub's signature must verify",
                        case.name
                    ),
                }
            }
        }
    }
}

#[test]
fn there_are_enough_cases_and_every_reason_is_covered() {
    let (_, file) = committed();
    let count = |expect: &str| file.messages.iter().filter(|m| m.expect == expect).count();
    assert!(count("valid") >= 10 && count("invalid") >= 25);
    for (reason, _) in REASONS {
        assert!(
            file.messages
                .iter()
                .any(|m| m.expect == "invalid" && m.reason == reason),
            "no invalid vector for reason {reason}"
        );
    }
    let valid: Vec<&JsonDecoded> = file
        .messages
        .iter()
        .filter_map(|m| m.decoded.as_ref())
        .collect();
    // Every payload and entry kind, on both kinds of streams, and an empty page.
    let pages = |p: &dyn Fn(&str, &[JsonEntry]) -> bool| {
        valid.iter().any(|d| match d {
            JsonDecoded::Page {
                stream, entries, ..
            } => p(stream, entries),
            JsonDecoded::Heartbeat { .. } => false,
        })
    };
    assert!(pages(&|s, e| s.starts_with("devices/")
        && e.iter().any(|e| matches!(e, JsonEntry::Token { .. }))
        && e.iter().any(|e| matches!(e, JsonEntry::Subject { .. }))));
    assert!(pages(&|s, e| s.starts_with("service/") && !e.is_empty()));
    assert!(pages(&|_, e| e.is_empty()));
    assert!(
        valid
            .iter()
            .any(|d| matches!(d, JsonDecoded::Heartbeat { .. }))
    );
    let mut names: Vec<&str> = file.messages.iter().map(|m| m.name.as_str()).collect();
    names.extend(file.tokens.iter().map(|t| t.name.as_str()));
    names.extend(file.lists.iter().map(|l| l.name.as_str()));
    let all = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all, "names must be unique");
}

#[test]
fn tokens_and_their_re_encodings_have_the_committed_hash() {
    let (_, file) = committed();
    let key = hub_key(&file);
    for t in &file.tokens {
        let bytes = unhex(&t.token_hex);
        assert_eq!(
            hex::encode(token_hash(&bytes)),
            t.token_hash_hex,
            "{}",
            t.name
        );
        match (&t.audience, &t.subject, t.issued_at) {
            (Some(aud), Some(sub), Some(iat)) => {
                let claims = token::dangerous_verify_signature_only(&bytes, &key)
                    .unwrap_or_else(|e| panic!("{}: {e}", t.name));
                assert_eq!((claims.aud, claims.sub, claims.iat), (&**aud, &**sub, iat));
                // Every re-encoding is a token a verifier accepts.
                let at = Validation::new(iat + 60, aud);
                assert!(token::verify(&bytes, &key, &at).is_ok(), "{}", t.name);
            }
            (None, None, None) => {
                assert!(Sign1::decode(&bytes).is_err(), "{}", t.name);
                assert_eq!(
                    token_hash(&bytes),
                    tessera_shared::crypto::sha256(&[&bytes]),
                    "{}: bytes that are no COSE_Sign1 are hashed as they are",
                    t.name
                );
            }
            _ => panic!("{}: claims are all given or none", t.name),
        }
        if let Some(of) = &t.same_token_as {
            let original = file
                .tokens
                .iter()
                .find(|o| &o.name == of)
                .unwrap_or_else(|| panic!("{}: no token {of}", t.name));
            assert_ne!(original.token_hex, t.token_hex, "{}", t.name);
            assert_eq!(original.token_hash_hex, t.token_hash_hex, "{}", t.name);
        }
    }
    assert!(
        file.tokens
            .iter()
            .filter(|t| t.same_token_as.is_some())
            .count()
            >= 4,
        "re-encodings of one token"
    );
}

#[test]
fn audiences_follow_the_committed_streams() {
    let (_, file) = committed();
    for s in &file.streams {
        let stream = match s.follows.as_str() {
            "device" => Stream::of_device(&s.audience),
            "service" => Stream::of_service(&s.audience).expect("an identifier"),
            other => panic!("follows {other:?}"),
        };
        assert_eq!(stream.name().as_str(), s.stream, "{}", s.audience);
        assert_eq!(Stream::parse(&s.stream), Ok(stream));
        assert!(stream.carries(&s.audience));
    }
}

/// Runs one list vector on `list`; returns what disagrees.
fn run<S: EntryStore>(
    mut list: RevocationList<S>,
    case: &JsonList,
    file: &VectorFile,
    key: &PublicKey,
) -> Vec<String> {
    let mut failures = Vec::new();
    let initial = revocation_gen::state_of(&list);
    assert_eq!(
        (initial.prefix, initial.latest, initial.fresh_as_of),
        (0, 0, None)
    );
    for (i, step) in case.steps.iter().enumerate() {
        let m = file
            .messages
            .iter()
            .find(|m| m.name == step.message && m.expect == "valid")
            .unwrap_or_else(|| panic!("{}: no valid message {}", case.name, step.message));
        let bytes = unhex(&m.message_hex);
        let message = decode(key, &bytes).expect("a valid message");
        let outcome = revocation_gen::apply(&mut list, &message, step.now)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let state = revocation_gen::state_of(&list);
        if outcome != step.outcome || state != step.state {
            failures.push(format!(
                "{} step {i} ({}): got {outcome} {state:?}, committed {} {:?}",
                case.name, step.message, step.outcome, step.state
            ));
        }
    }
    for probe in &case.revoked {
        let t = file
            .tokens
            .iter()
            .find(|t| t.name == probe.token)
            .unwrap_or_else(|| panic!("{}: no token {}", case.name, probe.token));
        let bytes = unhex(&t.token_hex);
        let claims = token::dangerous_verify_signature_only(&bytes, key).expect("a token");
        let got = list.is_revoked(&token_hash(&bytes), claims.sub, claims.iat);
        if got != probe.revoked {
            failures.push(format!(
                "{}: {} revoked {got}, committed {}",
                case.name, probe.token, probe.revoked
            ));
        }
    }
    for f in &case.fresh {
        let got = list.is_fresh(f.now, list.max_age(None));
        if got != f.fresh {
            failures.push(format!(
                "{}: fresh at {} is {got}, committed {}",
                case.name, f.now, f.fresh
            ));
        }
    }
    failures
}

#[test]
fn every_list_reaches_the_committed_states_and_revokes_the_committed_tokens() {
    let (_, file) = committed();
    let key = hub_key(&file);
    let leeway = file.leeway;
    let mut failures = Vec::new();
    for case in &file.lists {
        let aud = case.audience.as_str();
        println!(
            "{:<48} {} {aud}, {} entries, {} steps",
            case.name,
            case.follows,
            case.capacity,
            case.steps.len()
        );
        // The store a device or a service would use, and the other one: both must agree.
        let (bounded, indexed) = match (case.follows.as_str(), case.capacity) {
            ("device", 64) => (
                run(
                    RevocationList::<Bounded<64>>::for_device(aud, leeway).expect("id"),
                    case,
                    &file,
                    &key,
                ),
                run(
                    RevocationList::for_device_in(Indexed::with_capacity(64), aud, leeway)
                        .expect("id"),
                    case,
                    &file,
                    &key,
                ),
            ),
            ("device", 2) => (
                run(
                    RevocationList::for_device_in(Bounded::<2>::new(), aud, leeway).expect("id"),
                    case,
                    &file,
                    &key,
                ),
                run(
                    RevocationList::for_device_in(Indexed::with_capacity(2), aud, leeway)
                        .expect("id"),
                    case,
                    &file,
                    &key,
                ),
            ),
            ("service", 64) => (
                run(
                    RevocationList::for_service(Bounded::<64>::new(), aud, leeway).expect("id"),
                    case,
                    &file,
                    &key,
                ),
                run(
                    RevocationList::for_service(Indexed::with_capacity(64), aud, leeway)
                        .expect("id"),
                    case,
                    &file,
                    &key,
                ),
            ),
            (follows, capacity) => {
                panic!(
                    "{}: add a {follows} list of {capacity} to the test",
                    case.name
                )
            }
        };
        failures.extend(bounded.into_iter().map(|f| format!("Bounded: {f}")));
        failures.extend(indexed.into_iter().map(|f| format!("Indexed: {f}")));
    }
    assert!(
        failures.is_empty(),
        "lists that disagree with the vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_list_vectors_use_the_devices_own_capacity_and_cover_every_outcome() {
    let (_, file) = committed();
    assert!(
        file.lists
            .iter()
            .any(|l| l.capacity == tessera_shared::revocation::MAX_REVOKED)
    );
    for outcome in [
        "applied",
        "already_applied",
        "gap",
        "overflow",
        "refused_other_stream",
        "in_sync",
        "behind",
        "outdated",
    ] {
        assert!(
            file.lists
                .iter()
                .any(|l| l.steps.iter().any(|s| s.outcome == outcome)),
            "no step with outcome {outcome}"
        );
    }
}
