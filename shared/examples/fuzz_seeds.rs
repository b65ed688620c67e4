//! Writes the seed corpus of the fuzz targets: `fuzz/corpus/<target>/<seed>`.
//!
//! ```text
//! cargo run -p tessera-shared --example fuzz_seeds
//! ```
//!
//! Every seed is a small valid input (plus, for `sign1`, `token` and `claims`, the invalid
//! token vectors, each one defect away from valid), built with the token vectors' fixed
//! keys and times, so the output is the same on every run and the fuzzers start from
//! inputs that pass signature checks. The example only (re)writes its own files; inputs
//! that libFuzzer or a person added to a corpus folder stay. See `docs/FUZZING.md`.

#[path = "../tests/vectors/generator.rs"]
mod generator;

// The fuzz targets' fixed keys, times and record secret: one source for both. The module is
// a library's root there, so items it exports are unused or unreachable here.
#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tessera_shared::claims::Claims;
use tessera_shared::cose::Sign1;
use tessera_shared::crypto::{P256Signer, Signer};
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{
    Command, Control, EnrollmentCode, ErrorCode, IdList, NONCE_LEN, Operation, Presentation,
    Request, RequestBody, Response, ResponseBody, RevokeTarget, WireError,
};
use tessera_shared::revocation::{self, Addressed, Entry, Stream, token_hash};
use tessera_shared::scope::Scopes;
use tessera_shared::{Error, record};

use fuzz_support::{AUDIENCE, NOW, RECORD_DEVICE};

const NONCE: [u8; NONCE_LEN] = *b"fuzz-seed-nonce!";

/// The service audience of the revocation seeds' service stream.
const SERVICE: &str = "svc.telemetry";
/// The devices of the `revoke` seed that names a list.
const DEVICE_LIST: [&str; 2] = [AUDIENCE, "device-43"];

/// Seeds of one target, by file name.
type Seeds = Vec<(String, Vec<u8>)>;

/// Encodes with `f` into a fresh buffer and keeps what it wrote.
fn encoded(f: impl FnOnce(&mut [u8]) -> Result<usize, Error>) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let n = f(&mut buf).expect("seed encodes");
    buf.truncate(n);
    buf
}

/// A payload seed and the same payload signed, as `<name>.payload` and `<name>.signed`.
fn payload_and_signed(
    seeds: &mut Seeds,
    name: &str,
    signer: &P256Signer,
    encode: impl Fn(&mut [u8]) -> Result<usize, Error>,
) {
    let payload = encoded(&encode);
    let signed = encoded(|out| tessera_shared::cose::sign(signer, &payload, out));
    seeds.push((format!("{name}.payload"), payload));
    seeds.push((format!("{name}.signed"), signed));
}

fn vector_seeds() -> (Seeds, Seeds) {
    let issuer = generator::issuer().public_key();
    let mut tokens = Seeds::new();
    let mut claims = Seeds::new();
    for case in generator::cases() {
        let token = case.check.token;
        // The claims the issuer really signed, malformed ones included.
        if let Ok(payload) = Sign1::decode(&token).and_then(|m| m.verify(&issuer)) {
            claims.push((case.name.to_owned(), payload.to_vec()));
        }
        tokens.push((case.name.to_owned(), token));
    }
    (tokens, claims)
}

fn cose_key_seeds() -> Seeds {
    let issuer = generator::issuer().public_key();
    let (x, y) = issuer.coordinates();
    // Only the required parameters, as in the RFC 9679 thumbprint input.
    let minimal = [
        &[0xa4, 0x01, 0x02, 0x20, 0x01, 0x21, 0x58, 0x20][..],
        &x,
        &[0x22, 0x58, 0x20],
        &y,
    ]
    .concat();
    vec![
        ("issuer".to_owned(), generator::cose_key(&issuer)),
        (
            "holder".to_owned(),
            generator::cose_key(&generator::holder().public_key()),
        ),
        ("required_parameters_only".to_owned(), minimal),
    ]
}

fn request_seeds() -> Seeds {
    let issuer = generator::issuer();
    let holder = generator::holder();
    let proof = EnrollmentCode::proof(
        &EnrollmentCode::derive_key("ABCD-EFGH-IJKL"),
        AUDIENCE,
        &holder.kid(),
        &NONCE,
    );
    let bodies = [
        (
            "enroll",
            RequestBody::Enroll {
                key: holder.public_key(),
                code_proof: Some(proof),
            },
        ),
        ("device_token", RequestBody::DeviceToken),
        (
            "access_token",
            RequestBody::AccessToken {
                device: AUDIENCE,
                scope: Scopes::parse("door:open telemetry:read").expect("valid scope"),
            },
        ),
        ("refresh", RequestBody::Refresh { grant: &[0x42; 32] }),
        (
            "revoke_token_hash",
            RequestBody::Revoke(RevokeTarget::TokenHash([0x11; 32])),
        ),
        (
            "revoke_token_id",
            RequestBody::Revoke(RevokeTarget::TokenId(&generator::CTI)),
        ),
        (
            "revoke_subject",
            RequestBody::Revoke(RevokeTarget::Subject("app-7")),
        ),
        (
            "revoke_device",
            RequestBody::Revoke(RevokeTarget::Device(AUDIENCE)),
        ),
        (
            "revoke_group",
            RequestBody::Revoke(RevokeTarget::Group("building-a")),
        ),
        (
            "revoke_role",
            RequestBody::Revoke(RevokeTarget::Role("controller")),
        ),
        (
            "revoke_devices",
            RequestBody::Revoke(RevokeTarget::Devices(IdList::new(&DEVICE_LIST))),
        ),
        (
            "fetch_revocations",
            RequestBody::FetchRevocations {
                stream: Stream::of_device(AUDIENCE),
                from: 1,
            },
        ),
        (
            "fetch_revocations_service",
            RequestBody::FetchRevocations {
                stream: Stream::Service(SERVICE),
                from: 3,
            },
        ),
    ];
    let mut seeds = Seeds::new();
    for (name, body) in bodies {
        let request = Request {
            client: AUDIENCE,
            request_id: 7,
            issued_at: NOW,
            nonce: NONCE,
            body,
        };
        // The fuzz target checks an enrollment with its own key and others with the issuer's.
        let signer = if matches!(body, RequestBody::Enroll { .. }) {
            &holder
        } else {
            &issuer
        };
        payload_and_signed(&mut seeds, name, signer, |out| request.encode_to(out));
    }
    seeds
}

fn response_seeds(token: &[u8], page: &[u8]) -> Seeds {
    let outcomes = [
        (
            "enrolled",
            Some(Operation::Enroll),
            Ok(ResponseBody::Enrolled),
        ),
        (
            "token_with_grant",
            Some(Operation::DeviceToken),
            Ok(ResponseBody::Token {
                token,
                grant: Some((&[0x42; 32], NOW + 86_400)),
            }),
        ),
        (
            "token",
            Some(Operation::AccessToken),
            Ok(ResponseBody::Token { token, grant: None }),
        ),
        (
            "revoked",
            Some(Operation::Revoke),
            Ok(ResponseBody::Revoked {
                revoked: 2,
                entries: 3,
                notified: 1,
            }),
        ),
        (
            "revocations",
            Some(Operation::FetchRevocations),
            Ok(ResponseBody::Revocations { page }),
        ),
        (
            "error_denied",
            Some(Operation::AccessToken),
            Err(WireError {
                code: ErrorCode::Denied,
                reason: "role app cannot get door:unlock on device-42",
            }),
        ),
        (
            "error_malformed",
            None,
            Err(WireError {
                code: ErrorCode::Malformed,
                reason: "not CBOR",
            }),
        ),
    ];
    let mut seeds = Seeds::new();
    for (name, op, outcome) in outcomes {
        let response = Response {
            op,
            client: AUDIENCE,
            request_id: 7,
            hub_time: NOW,
            nonce: NONCE,
            outcome,
        };
        payload_and_signed(&mut seeds, name, &generator::issuer(), |out| {
            response.encode_to(out)
        });
    }
    seeds
}

fn control_seeds() -> Seeds {
    let mut seeds = Seeds::new();
    for (name, command) in [
        ("revoked", Command::Revoked),
        ("refresh_now", Command::RefreshNow),
    ] {
        let control = Control {
            device: AUDIENCE,
            command,
            issued_at: NOW,
        };
        payload_and_signed(&mut seeds, name, &generator::issuer(), |out| {
            control.encode_to(out)
        });
    }
    seeds
}

fn presentation_seeds(token: &[u8]) -> Seeds {
    let presentation = Presentation {
        token,
        audience: AUDIENCE,
        issued_at: NOW,
        nonce: NONCE,
    };
    let mut seeds = Seeds::new();
    // Signed by the holder, whose key is the token's cnf: the whole check passes.
    payload_and_signed(&mut seeds, "holder", &generator::holder(), |out| {
        presentation.encode_to(out)
    });
    seeds
}

fn keyset_seeds() -> Seeds {
    let issuer = generator::issuer();
    let next = generator::other_issuer();
    let mut seeds = Seeds::new();
    let rotation = KeySet::new(1, NOW, &[issuer.public_key(), next.public_key()]).expect("fits");
    payload_and_signed(&mut seeds, "rotation", &issuer, |out| {
        rotation.encode_to(out)
    });
    let single = KeySet::new(2, NOW, &[issuer.public_key()]).expect("fits");
    payload_and_signed(&mut seeds, "single_key", &issuer, |out| {
        single.encode_to(out)
    });
    seeds
}

fn revocation_seeds(token: &[u8]) -> Seeds {
    // The fuzz target's device follows its partition; the entries are addressed to it.
    let device = Stream::of_device(AUDIENCE);
    let to_device = |entry| Addressed::new(AUDIENCE, entry).expect("valid audience");
    let entries = [
        to_device(Entry::Token {
            hash: token_hash(token),
            expires_at: generator::EXP,
        }),
        to_device(Entry::for_subject("app-7", NOW, NOW + generator::LIFETIME).expect("subject")),
    ];
    let service = Stream::Service(SERVICE);
    let service_entry = Addressed::new(
        SERVICE,
        Entry::Token {
            hash: [0x5e; 32],
            expires_at: NOW + generator::LIFETIME,
        },
    )
    .expect("valid audience");
    let page = |seq, from, to, stream, entries: &[Addressed]| {
        encoded(|out| revocation::encode_page(seq, NOW, stream, from, to, entries, out))
    };
    vec![
        // A delta: one change, the latest.
        ("delta".to_owned(), page(1, 1, 1, &device, &entries[..1])),
        // A snapshot page: every change so far.
        ("snapshot".to_owned(), page(2, 1, 2, &device, &entries)),
        // A page whose changes' entries have all expired.
        ("page_empty".to_owned(), page(4, 3, 4, &device, &[])),
        (
            "service_page".to_owned(),
            page(5, 5, 5, &service, core::slice::from_ref(&service_entry)),
        ),
        (
            "heartbeat".to_owned(),
            encoded(|out| revocation::encode_heartbeat(2, NOW + 30, &device, 90, out)),
        ),
        (
            "heartbeat_service".to_owned(),
            encoded(|out| revocation::encode_heartbeat(5, NOW + 30, &service, 180, out)),
        ),
    ]
}

fn record_seeds(token: &[u8]) -> Seeds {
    let mut seeds = Seeds::new();
    for (name, plaintext) in [("token", token), ("empty", &[][..])] {
        let mut buf = vec![0u8; record::sealed_len(plaintext.len())];
        record::plaintext_mut(&mut buf)[..plaintext.len()].copy_from_slice(plaintext);
        let n = record::seal(
            fuzz_support::record_key(),
            RECORD_DEVICE,
            1,
            [0x0a; record::NONCE_LEN],
            &mut buf,
            plaintext.len(),
        )
        .expect("seed seals");
        buf.truncate(n);
        seeds.push((name.to_owned(), buf));
    }
    seeds
}

fn write_all(root: &Path, target: &str, seeds: &Seeds) -> std::io::Result<()> {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("{:<13} {} seeds", target, seeds.len());
    Ok(())
}

fn main() -> ExitCode {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("shared/ sits in the repository root")
        .join("fuzz/corpus");
    let (tokens, claims) = vector_seeds();
    let token = generator::cases()
        .into_iter()
        .find(|c| c.name == "valid")
        .expect("the vectors have a valid token")
        .check
        .token;
    let snapshot = revocation_seeds(&token)
        .into_iter()
        .find(|(name, _)| name == "snapshot")
        .expect("a snapshot seed")
        .1;
    let signed_page =
        encoded(|out| tessera_shared::cose::sign(&generator::issuer(), &snapshot, out));

    // A claims seed that decodes: the claims the core issues, with nbf.
    let mut claims = claims;
    let with_nbf = Claims {
        nbf: Some(NOW),
        ..generator::ClaimSet::baseline().as_claims()
    };
    claims.push((
        "issued_with_nbf".to_owned(),
        encoded(|out| with_nbf.encode_to(out)),
    ));

    let targets: [(&str, Seeds); 11] = [
        ("sign1", tokens.clone()),
        ("token", tokens),
        ("claims", claims),
        ("cose_key", cose_key_seeds()),
        ("request", request_seeds()),
        ("response", response_seeds(&token, &signed_page)),
        ("control", control_seeds()),
        ("presentation", presentation_seeds(&token)),
        ("keyset", keyset_seeds()),
        ("revocation", revocation_seeds(&token)),
        ("record", record_seeds(&token)),
    ];
    for (target, seeds) in &targets {
        if let Err(e) = write_all(&root, target, seeds) {
            eprintln!(
                "fuzz_seeds: cannot write {}: {e}",
                root.join(target).display()
            );
            return ExitCode::FAILURE;
        }
    }
    println!("fuzz_seeds: wrote {}", root.display());
    ExitCode::SUCCESS
}
