//! Micro-benchmarks of the core's hot paths, next to the limits they are judged against.
//!
//! The limits are bare ECDSA P-256 with the same library (`p256`), one sign and one verify
//! over a 32-byte message, the size of a digest. Everything else is reported as a ratio to
//! them by `scripts/bench-shared`, because this machine is shared and noisy: absolute times
//! move between runs, ratios measured in one run much less. Nothing here asserts a time.
//!
//! Times are the benchmark thread's CPU time, not wall time: on a shared 2-core machine
//! wall time mostly measures the neighbours' load. `openssl speed`, which the script runs
//! next to these, also divides by CPU time.
//!
//! Groups and ids are read back from `target/criterion/<group>/<id>/new/estimates.json`
//! by `scripts/bench-shared`; keep the two in step.

use std::hint::black_box;
use std::time::Duration;

use cpu_time::ThreadTime;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, criterion_group, criterion_main};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use tessera_shared::claims::Claims;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer};
use tessera_shared::message::{NONCE_LEN, Request, RequestBody, SignedRequest};
use tessera_shared::revocation::{
    Addressed, Entry, MAX_REVOKED, Page, PageOutcome, RevocationList, Stream, encode_page,
    max_page_len, token_hash,
};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, MAX_TOKEN_LEN, Validation};

const IAT: u64 = 1_750_000_000;

fn scalar(seed: u8) -> [u8; 32] {
    let mut s = [seed; 32];
    s[0] = 0x01;
    s
}

fn signer(seed: u8) -> P256Signer {
    P256Signer::from_scalar(&scalar(seed)).expect("valid scalar")
}

/// A typical access token's claims: cnf with the app's COSE_Key, 16-byte cti, two scopes.
fn access_claims(holder: PublicKey) -> Claims<'static> {
    Claims {
        iss: "hub-1",
        sub: "app-7",
        aud: "device-42",
        exp: IAT + 300,
        nbf: None,
        iat: IAT,
        cti: &[0x5a; 16],
        cnf: holder,
        scope: Scopes::parse("door:open telemetry:read").expect("valid scope"),
    }
}

/// CPU time of the benchmark thread (`CLOCK_THREAD_CPUTIME_ID`), in nanoseconds.
struct ThreadCpuTime;

/// Wall time's formatter prints nanoseconds with the same units, so it serves CPU time too.
static NANOSECONDS: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = ThreadTime;
    type Value = Duration;

    fn start(&self) -> ThreadTime {
        ThreadTime::now()
    }

    fn end(&self, started: ThreadTime) -> Duration {
        started.elapsed()
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        NANOSECONDS.formatter()
    }
}

type Bench = Criterion<ThreadCpuTime>;

fn config() -> Bench {
    Criterion::default()
        .with_measurement(ThreadCpuTime)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
}

/// The limits: bare `p256` sign and verify of 32 bytes, no COSE, no CBOR. Measured first
/// and again last, so the script can tell how much the machine's load drifted in between.
fn limits(c: &mut Bench) {
    limits_in(c, "limit");
}

fn limits_again(c: &mut Bench) {
    limits_in(c, "limit_again");
}

fn limits_in(c: &mut Bench, group: &str) {
    let key = p256::ecdsa::SigningKey::from_slice(&scalar(0x11)).expect("valid scalar");
    let public = *key.verifying_key();
    let msg = [0xa5u8; 32];
    let sig: p256::ecdsa::Signature = key.sign(&msg);
    let mut g = c.benchmark_group(group);
    g.bench_function("p256_sign", |b| {
        b.iter(|| -> p256::ecdsa::Signature { key.sign(black_box(&msg)) })
    });
    g.bench_function("p256_verify", |b| {
        b.iter(|| public.verify(black_box(&msg), black_box(&sig)).is_ok())
    });
    g.finish();
}

fn tokens(c: &mut Bench) {
    let hub = signer(0x11);
    let claims = access_claims(signer(0x33).public_key());
    let mut out = [0u8; MAX_TOKEN_LEN];
    let len = token::issue(&claims, &hub, &mut out).expect("issue");
    let issued = out;
    let anchor = hub.public_key();
    let validation = Validation::new(IAT + 10, "device-42").with_scope("door:open");

    let mut g = c.benchmark_group("token");
    g.bench_function("encode_claims", |b| {
        let mut buf = [0u8; MAX_TOKEN_LEN];
        b.iter(|| black_box(&claims).encode_to(&mut buf).expect("encode"))
    });
    g.bench_function("issue", |b| {
        let mut buf = [0u8; MAX_TOKEN_LEN];
        b.iter(|| token::issue(black_box(&claims), &hub, &mut buf).expect("issue"))
    });
    g.bench_function("verify", |b| {
        b.iter(|| {
            token::verify(black_box(&issued[..len]), &anchor, &validation)
                .expect("valid")
                .claims()
                .exp
        })
    });
    g.finish();
}

fn requests(c: &mut Bench) {
    let device = signer(0x22);
    let device_key = device.public_key();
    let request = Request {
        client: "device-42",
        request_id: 7,
        issued_at: IAT,
        nonce: [0x6e; NONCE_LEN],
        body: RequestBody::DeviceToken,
    };
    let mut out = [0u8; 512];
    let len = request.sign(&device, &mut out).expect("sign");
    let signed = out;

    let mut g = c.benchmark_group("request");
    g.bench_function("sign", |b| {
        let mut buf = [0u8; 512];
        b.iter(|| black_box(&request).sign(&device, &mut buf).expect("sign"))
    });
    g.bench_function("decode_verify", |b| {
        b.iter(|| {
            SignedRequest::decode(black_box(&signed[..len]))
                .and_then(|r| r.verify(&device_key))
                .expect("valid")
                .request_id
        })
    });
    g.finish();
}

/// A full default-size list (half token entries, half subject entries) and a token it does
/// not revoke, so every lookup scans every entry; and the page that fills it.
fn revocations(c: &mut Bench) {
    let device = "device-42";
    let entries: Vec<Addressed> = (0..MAX_REVOKED)
        .map(|i| {
            let entry = if i % 2 == 0 {
                Entry::Token {
                    hash: token_hash(&i.to_be_bytes()),
                    expires_at: IAT + 900,
                }
            } else {
                Entry::for_subject(&format!("app-{i}"), IAT - 1, IAT + 900).expect("id")
            };
            Addressed::new(device, entry).expect("id")
        })
        .collect();
    let stream = Stream::of_device(device);
    let len = entries.iter().map(Addressed::encoded_len).sum();
    let mut payload = vec![0u8; max_page_len(&stream, len)];
    let n = encode_page(1, IAT, &stream, 1, 1, &entries, &mut payload).expect("encode");
    let page = Page::decode(&payload[..n]).expect("decode");
    let empty = RevocationList::for_device(device, 30).expect("id");
    let mut list: RevocationList = empty.clone();
    assert_eq!(list.apply_page(&page, IAT), Ok(PageOutcome::Applied));
    assert_eq!(list.len(), MAX_REVOKED);

    let hub = signer(0x11);
    let mut out = [0u8; MAX_TOKEN_LEN];
    let len =
        token::issue(&access_claims(signer(0x33).public_key()), &hub, &mut out).expect("issue");
    let anchor = hub.public_key();
    let verified =
        token::verify(&out[..len], &anchor, &Validation::new(IAT, "device-42")).expect("valid");
    let hash = verified.hash();

    let mut g = c.benchmark_group("revocation");
    // The page's 64 entries into a list that already holds them all: each one is compared
    // with every entry held before it merges, the most a full list does per page.
    g.bench_function("apply_page_64", |b| {
        let mut full = list.clone();
        b.iter(|| full.apply_page(black_box(&page), IAT).expect("fits"))
    });
    // The same page into an empty list: decoding and inserting 64 entries.
    g.bench_function("apply_page_64_empty", |b| {
        b.iter(|| {
            let mut fresh = empty.clone();
            fresh.apply_page(black_box(&page), IAT).expect("fits")
        })
    });
    g.bench_function("lookup_64", |b| {
        b.iter(|| list.is_revoked(black_box(&hash), black_box("app-7"), black_box(IAT)))
    });
    g.bench_function("check_token_64", |b| {
        b.iter(|| black_box(&verified).check_not_revoked(&list).is_ok())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = limits, tokens, requests, revocations, limits_again
}
criterion_main!(benches);
