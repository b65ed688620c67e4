//! Applies revocation messages that Python built and signed (`interop/make_revocations.py`)
//! to the Rust core, and exits non-zero on any disagreement.
//!
//! ```text
//! cargo run -p tessera-shared --example check_python_revocations -- <python-revocations.json>
//! ```
//!
//! For the file Python wrote, with the core alone: the stream of every audience and the
//! token hash of every token must be Python's; every message is decoded and verified with
//! Python's hub key (`Sign1::decode`, `verify`, `StreamMessage::decode`), a valid one must
//! decode to Python's content and, applied to a `RevocationList` of Python's device, give
//! Python's outcome and state; an invalid one must be refused for Python's reason; then the
//! list must revoke exactly the tokens Python's list revokes and be fresh when Python's is.
//!
//! `spec_probes` are messages PROTOCOL.md says to refuse that are easy to get wrong (a
//! subject that is not an identifier, a page above 16 000 bytes): the core must refuse
//! each.

#[path = "../tests/vectors/generator.rs"]
mod generator;
#[path = "../tests/vectors/revocation.rs"]
mod revocation;

use std::process::ExitCode;

use serde::Deserialize;
use tessera_shared::crypto::PublicKey;
use tessera_shared::revocation::{Bounded, RevocationList, Stream, token_hash};

use revocation::{JsonDecoded, State};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PythonFile {
    hub_public_key_cose_hex: String,
    leeway: u64,
    audience: String,
    follows: String,
    capacity: usize,
    streams: Vec<StreamOf>,
    token_hashes: Vec<TokenHash>,
    messages: Vec<Message>,
    revoked: Vec<Probe>,
    fresh: Vec<Fresh>,
    spec_probes: Vec<SpecProbe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOf {
    audience: String,
    follows: String,
    stream: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenHash {
    name: String,
    token_hex: String,
    token_hash_hex: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    name: String,
    message_hex: String,
    now: u64,
    expect: String,
    reason: String,
    decoded: Option<JsonDecoded>,
    outcome: Option<String>,
    state: Option<State>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    token_hash_hex: String,
    subject: String,
    issued_at: u64,
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fresh {
    now: u64,
    fresh: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecProbe {
    name: String,
    message_hex: String,
    protocol: String,
    reason: String,
}

/// Counts agreements and prints each check.
#[derive(Default)]
struct Tally {
    agreed: usize,
    disagreed: usize,
}

impl Tally {
    fn check(&mut self, ok: bool, line: impl std::fmt::Display) {
        if ok {
            self.agreed += 1;
            println!("ok    {line}");
        } else {
            self.disagreed += 1;
            println!("FAIL  {line}");
        }
    }
}

fn unhex(what: &str, s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("{what}: not hex: {e}"))
}

fn run(file: &PythonFile) -> Result<Tally, String> {
    let mut t = Tally::default();
    let key = PublicKey::from_cose_key(&unhex("hub key", &file.hub_public_key_cose_hex)?)
        .map_err(|e| format!("Python's hub COSE_Key does not decode: {e}"))?;
    if (file.follows.as_str(), file.capacity) != ("device", 64) {
        return Err(format!(
            "only a device list of 64 entries is supported, not {} of {}",
            file.follows, file.capacity
        ));
    }

    for s in &file.streams {
        let ours = match s.follows.as_str() {
            "device" => Stream::of_device(&s.audience).name(),
            _ => Stream::of_service(&s.audience)
                .map_err(|e| format!("{}: {e}", s.audience))?
                .name(),
        };
        t.check(
            ours.as_str() == s.stream,
            format_args!("stream {}: Rust {ours}, Python {}", s.audience, s.stream),
        );
    }
    for h in &file.token_hashes {
        let ours = hex::encode(token_hash(&unhex(&h.name, &h.token_hex)?));
        t.check(
            ours == h.token_hash_hex,
            format_args!(
                "token hash {}: Rust {}…, Python {}…",
                h.name,
                &ours[..16],
                &h.token_hash_hex[..16.min(h.token_hash_hex.len())]
            ),
        );
    }

    let mut list = RevocationList::<Bounded<64>>::for_device(&file.audience, file.leeway)
        .map_err(|e| format!("{}: {e}", file.audience))?;
    for m in &file.messages {
        let bytes = unhex(&m.name, &m.message_hex)?;
        let got = revocation::decode(&key, &bytes);
        match (m.expect.as_str(), got) {
            ("valid", Ok(message)) => {
                let decoded = revocation::decoded_of(&message);
                t.check(
                    m.decoded.as_ref() == Some(&decoded),
                    format_args!("{}: decodes to Python's content", m.name),
                );
                let outcome = revocation::apply(&mut list, &message, m.now)
                    .map_err(|e| format!("{}: the list refuses it: {e}", m.name))?;
                let state = revocation::state_of(&list);
                t.check(
                    m.outcome.as_deref() == Some(outcome) && m.state.as_ref() == Some(&state),
                    format_args!(
                        "{}: {outcome} {state:?} (Python: {:?} {:?})",
                        m.name, m.outcome, m.state
                    ),
                );
            }
            ("valid", Err(e)) => {
                t.check(false, format_args!("{}: valid, but refused: {e}", m.name))
            }
            ("invalid", got) => {
                let want = revocation::expected_error(&m.reason)
                    .ok_or_else(|| format!("{}: unknown reason {:?}", m.name, m.reason))?;
                let got = got.map(|_| ());
                t.check(
                    got == Err(want),
                    format_args!("{}: refused as {} (Rust: {got:?})", m.name, m.reason),
                );
            }
            (other, _) => return Err(format!("{}: expect {other:?}", m.name)),
        }
    }
    for p in &file.revoked {
        let hash: [u8; 32] = unhex("probe", &p.token_hash_hex)?
            .try_into()
            .map_err(|_| "a probe hash is not 32 bytes".to_owned())?;
        let got = list.is_revoked(&hash, &p.subject, p.issued_at);
        t.check(
            got == p.revoked,
            format_args!(
                "revoked {}… by {} at {}: Rust {got}, Python {}",
                &p.token_hash_hex[..16],
                p.subject,
                p.issued_at,
                p.revoked
            ),
        );
    }
    for f in &file.fresh {
        let got = list.is_fresh(f.now, list.max_age(None));
        t.check(
            got == f.fresh,
            format_args!("fresh at {}: Rust {got}, Python {}", f.now, f.fresh),
        );
    }

    for p in &file.spec_probes {
        let bytes = unhex(&p.name, &p.message_hex)?;
        match revocation::decode(&key, &bytes) {
            Err(e) => t.check(
                true,
                format_args!(
                    "spec probe {} ({} bytes): refused ({e}), as PROTOCOL {} requires",
                    p.name,
                    bytes.len(),
                    p.protocol
                ),
            ),
            Ok(_) => t.check(
                false,
                format_args!(
                    "the core accepts {} ({} bytes) where PROTOCOL {} requires a refusal ({}); \
                     Python refuses it",
                    p.name,
                    bytes.len(),
                    p.protocol,
                    p.reason
                ),
            ),
        }
    }
    Ok(t)
}

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check_python_revocations <python-revocations.json>");
        return ExitCode::from(2);
    };
    let file: PythonFile = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|raw| serde_json::from_str(&raw).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("check_python_revocations: cannot read {path}: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&file) {
        Ok(t) => {
            println!("{} agreed, {} disagreed", t.agreed, t.disagreed);
            if t.disagreed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("check_python_revocations: {e}");
            ExitCode::FAILURE
        }
    }
}
