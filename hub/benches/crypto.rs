//! The hub's ES256 backends side by side: the core's RustCrypto `p256` (with
//! `precomputed-tables`, as the hub built it before it signed with aws-lc-rs) against
//! aws-lc-rs (`tessera_hub::crypto`), for what the hub does per request: sign, verify,
//! `token::issue`, a response, and the request check as the pipeline does it (decode, build
//! a verifier from the registered SEC1 key, verify).
//!
//! `scripts/bench-hub-crypto` runs it and prints each aws-lc-rs time as a ratio to the
//! `p256` time measured in the same run: the machine is shared and noisy, so ratios mean
//! more than absolute times. Times are the benchmark thread's CPU time, as in
//! `shared/benches/token.rs`. Nothing here asserts a time.
//!
//! Groups and ids are read back from `target/criterion/<group>/<id>/new/estimates.json` by
//! the script; keep the two in step.

use std::hint::black_box;
use std::time::Duration;

use cpu_time::ThreadTime;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tessera_hub::crypto::{AwsLcSigner, AwsLcVerifier, request_verifier};
use tessera_shared::claims::Claims;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer, Verifier};
use tessera_shared::message::{
    NONCE_LEN, Operation, Request, RequestBody, Response, ResponseBody, SignedRequest,
};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, MAX_TOKEN_LEN};

const IAT: u64 = 1_750_000_000;

fn scalar(seed: u8) -> [u8; 32] {
    let mut s = [seed; 32];
    s[0] = 0x01;
    s
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

/// The hub's key in both backends (same scalar, same public key and kid).
fn hub_keys() -> (P256Signer, AwsLcSigner) {
    let s = scalar(0x11);
    (
        P256Signer::from_scalar(&s).expect("valid scalar"),
        AwsLcSigner::from_scalar(&s).expect("valid scalar"),
    )
}

/// A backend under test, as the hub would hold it.
struct Backend {
    id: &'static str,
    signer: Box<dyn Signer>,
    verifier: Box<dyn Verifier>,
}

fn backends() -> Vec<Backend> {
    let (p256, aws) = hub_keys();
    let public = p256.public_key();
    vec![
        Backend {
            id: "p256",
            signer: Box::new(p256),
            verifier: Box::new(public),
        },
        Backend {
            id: "aws_lc",
            signer: Box::new(aws),
            verifier: Box::new(AwsLcVerifier::new(&public).expect("key")),
        },
    ]
}

/// Bare `Signer::sign` and `Verifier::verify` of a 32-byte message, through the traits.
fn bare(c: &mut Bench) {
    let msg = [0xa5u8; 32];
    let mut g = c.benchmark_group("sign");
    for b in backends() {
        g.bench_function(BenchmarkId::from_parameter(b.id), |bench| {
            bench.iter(|| b.signer.sign(&[black_box(&msg)]).expect("sign"))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("verify");
    for b in backends() {
        let sig = b.signer.sign(&[&msg]).expect("sign");
        g.bench_function(BenchmarkId::from_parameter(b.id), |bench| {
            bench.iter(|| b.verifier.verify(&[black_box(&msg)], black_box(&sig)))
        });
    }
    g.finish();
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

/// What the hub signs per access token: the token, and the response carrying it.
fn issuing(c: &mut Bench) {
    let app = P256Signer::from_scalar(&scalar(0x33)).expect("valid scalar");
    let claims = access_claims(app.public_key());
    let mut g = c.benchmark_group("token_issue");
    for b in backends() {
        g.bench_function(BenchmarkId::from_parameter(b.id), |bench| {
            let mut buf = [0u8; MAX_TOKEN_LEN];
            bench.iter(|| token::issue(black_box(&claims), &*b.signer, &mut buf).expect("issue"))
        });
    }
    g.finish();

    let (p256, _) = hub_keys();
    let mut buf = [0u8; MAX_TOKEN_LEN];
    let n = token::issue(&claims, &p256, &mut buf).expect("issue");
    let token = &buf[..n];
    let grant = [0x47u8; 32];
    let response = Response {
        op: Some(Operation::AccessToken),
        client: "app-7",
        request_id: 7,
        hub_time: IAT,
        nonce: [0x6e; NONCE_LEN],
        outcome: Ok(ResponseBody::Token {
            token,
            grant: Some((&grant, IAT + 86_400)),
        }),
    };
    let mut g = c.benchmark_group("response_sign");
    for b in backends() {
        g.bench_function(BenchmarkId::from_parameter(b.id), |bench| {
            let mut out = [0u8; 2048];
            bench.iter(|| {
                black_box(&response)
                    .sign(&*b.signer, &mut out)
                    .expect("sign")
            })
        });
    }
    g.finish();
}

/// The pipeline's request check: decode, the sender's registered key (uncompressed SEC1
/// from the store) into a verifier, verify. `p256` is what `pipeline.rs` does today
/// (`PublicKey::from_sec1`); `aws_lc` is `crypto::request_verifier`; `aws_lc_cached` keeps
/// the parsed verifier, to show what building it per request costs.
fn requests(c: &mut Bench) {
    let app = P256Signer::from_scalar(&scalar(0x33)).expect("valid scalar");
    let registered = app.public_key().to_sec1();
    let request = Request {
        client: "app-7",
        request_id: 7,
        issued_at: IAT,
        nonce: [0x6e; NONCE_LEN],
        body: RequestBody::AccessToken {
            device: "device-42",
            scope: Scopes::parse("door:open").expect("valid scope"),
        },
    };
    let mut out = [0u8; 512];
    let len = request.sign(&app, &mut out).expect("sign");
    let signed = &out[..len];

    let mut g = c.benchmark_group("request_verify");
    g.bench_function("p256", |bench| {
        bench.iter(|| {
            let key = PublicKey::from_sec1(black_box(&registered)).expect("key");
            SignedRequest::decode(black_box(signed))
                .and_then(|r| r.verify(&key))
                .expect("valid")
                .request_id
        })
    });
    g.bench_function("aws_lc", |bench| {
        bench.iter(|| {
            let verifier = request_verifier(black_box(&registered)).expect("key");
            SignedRequest::decode(black_box(signed))
                .and_then(|r| r.verify(&verifier))
                .expect("valid")
                .request_id
        })
    });
    let cached = request_verifier(&registered).expect("key");
    g.bench_function("aws_lc_cached", |bench| {
        bench.iter(|| {
            SignedRequest::decode(black_box(signed))
                .and_then(|r| r.verify(&cached))
                .expect("valid")
                .request_id
        })
    });
    g.finish();

    let mut g = c.benchmark_group("key_parse");
    g.bench_function("p256", |bench| {
        bench.iter(|| PublicKey::from_sec1(black_box(&registered)).expect("key"))
    });
    g.bench_function("aws_lc", |bench| {
        bench.iter(|| request_verifier(black_box(&registered)).expect("key"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bare, issuing, requests
}
criterion_main!(benches);
