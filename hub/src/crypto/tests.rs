//! The aws-lc-rs backend agrees with the core's `p256` backend on every byte that crosses
//! the wire: each verifies what the other signs, tokens the hub issues verify the way a
//! device checks them, and requests devices sign verify the way the hub checks them.

use super::*;
use tessera_shared::claims::Claims;
use tessera_shared::crypto::P256Signer;
use tessera_shared::keyset::KeySet;
use tessera_shared::message::{NONCE_LEN, Request, RequestBody, SignedRequest};
use tessera_shared::revocation::token_hash;
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, MAX_TOKEN_LEN, Validation};

const IAT: u64 = 1_750_000_000;

/// The P-256 group order `n`, big-endian.
const ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

fn scalar(seed: u8) -> [u8; 32] {
    let mut s = [seed; 32];
    s[0] = 0x01;
    s
}

/// The same key in both backends.
fn pair(seed: u8) -> (AwsLcSigner, P256Signer) {
    let s = scalar(seed);
    (
        AwsLcSigner::from_scalar(&s).expect("valid scalar"),
        P256Signer::from_scalar(&s).expect("valid scalar"),
    )
}

fn s_is_low(signature: &[u8]) -> bool {
    let sig = p256::ecdsa::Signature::from_slice(signature).expect("well-formed");
    sig.normalize_s() == sig
}

/// The other valid signature over the same message: `s` replaced by `n - s`.
fn twin_s(signature: &[u8]) -> [u8; 64] {
    let sig = p256::ecdsa::Signature::from_slice(signature).expect("well-formed");
    let (r, s) = sig.split_scalars();
    p256::ecdsa::Signature::from_scalars(r, -*s)
        .expect("n - s is a valid s")
        .to_bytes()
        .into()
}

fn access_claims(holder: PublicKey, cti: &[u8; 16]) -> Claims<'_> {
    Claims {
        iss: "hub-1",
        sub: "app-7",
        aud: "device-42",
        exp: IAT + 300,
        nbf: None,
        iat: IAT,
        cti,
        cnf: holder,
        scope: Scopes::parse("door:open telemetry:read").expect("valid scope"),
    }
}

#[test]
fn both_backends_derive_the_same_public_key_and_kid_from_a_scalar() {
    for seed in [1, 7, 0x42, 0xfe] {
        let (aws, p256) = pair(seed);
        assert_eq!(aws.public_key(), p256.public_key());
        assert_eq!(aws.kid(), p256.kid());
        assert_eq!(*aws.to_scalar().expect("scalar"), scalar(seed));
    }
}

#[test]
fn each_backend_verifies_what_the_other_signs_however_the_message_is_split() {
    let (aws, p256) = pair(7);
    let verifier = AwsLcVerifier::new(&p256.public_key()).expect("key");

    let by_aws = aws.sign(&[b"hello ", b"world"]).expect("sign");
    assert_eq!(p256.public_key().verify(&[b"hello world"], &by_aws), Ok(()));
    assert_eq!(
        verifier.verify(&[b"hello", b" ", b"world"], &by_aws),
        Ok(())
    );

    let by_p256 = p256.sign(&[b"hello world"]).expect("sign");
    assert_eq!(verifier.verify(&[b"hello ", b"world"], &by_p256), Ok(()));
    assert_eq!(aws.verify(&[b"hello world"], &by_p256), Ok(()));
}

#[test]
fn a_wrong_key_an_altered_message_or_an_altered_signature_is_refused() {
    let (aws, _) = pair(7);
    let (other, _) = pair(8);
    let sig = aws.sign(&[b"m"]).expect("sign");
    let invalid = Err(SignatureError::Invalid.into());

    assert_eq!(other.verifier().verify(&[b"m"], &sig), invalid);
    assert_eq!(aws.verifier().verify(&[b"m!"], &sig), invalid);
    assert_eq!(aws.verifier().verify(&[b"m", b"!"], &sig), invalid);
    let mut flipped = sig;
    flipped.0[40] ^= 1;
    assert_eq!(aws.verifier().verify(&[b"m"], &flipped), invalid);
    // r = 0 and s = n are not signatures at all.
    let mut zero_r = sig;
    zero_r.0[..32].fill(0);
    assert_eq!(aws.verifier().verify(&[b"m"], &zero_r), invalid);
    let mut s_is_n = sig;
    s_is_n.0[32..].copy_from_slice(&ORDER);
    assert_eq!(aws.verifier().verify(&[b"m"], &s_is_n), invalid);
}

#[test]
fn signatures_are_randomized_and_may_come_out_high_s_which_both_backends_accept() {
    let (aws, p256) = pair(9);
    let core_verifier = p256.public_key();
    let mut high = 0;
    let mut previous: Option<Signature> = None;
    for _ in 0..32 {
        let sig = aws.sign(&[b"the same message"]).expect("sign");
        assert_ne!(
            Some(sig),
            previous,
            "aws-lc-rs signatures are not deterministic"
        );
        previous = Some(sig);
        if !s_is_low(&sig.0) {
            high += 1;
        }
        // (r, s) and (r, n - s) both verify, with either backend.
        let twin = Signature(twin_s(&sig.0));
        for s in [sig, twin] {
            assert_eq!(core_verifier.verify(&[b"the same message"], &s), Ok(()));
            assert_eq!(aws.verify(&[b"the same message"], &s), Ok(()));
        }
    }
    // Half of the raw signatures are high-s (all 32 low: probability 2^-32): what keeps
    // the hub's messages canonical is the core's normalisation, checked next.
    assert!(high > 0, "no high-s signature in 32");
}

#[test]
fn tokens_issued_with_aws_lc_verify_as_a_device_checks_them_and_hash_canonically() {
    let (hub, _) = pair(0x11);
    let (_, holder) = pair(0x33);
    // A device holds the hub's key as its trust anchor, verified with the core's p256.
    let device_keys = KeySet::from_anchor(hub.public_key());
    let validation = Validation::new(IAT + 10, "device-42")
        .with_scope("door:open")
        .with_issuer("hub-1");
    for i in 0..32u8 {
        let cti = [i; 16];
        let claims = access_claims(holder.public_key(), &cti);
        let mut out = [0u8; MAX_TOKEN_LEN];
        let n = token::issue(&claims, &hub, &mut out).expect("issue");
        let issued = &out[..n];

        let verified = token::verify(issued, &device_keys, &validation).expect("valid");
        assert_eq!(verified.claims().sub, "app-7");
        assert_eq!(verified.kid(), hub.kid());
        // Always written low-s, so the revocation hash is the hash of the bytes as issued
        // (RFC 9770's token hash), whichever s aws-lc-rs produced.
        assert!(s_is_low(&issued[n - 64..]));
        assert_eq!(
            token_hash(issued),
            tessera_shared::crypto::sha256(&[issued])
        );
        assert_eq!(verified.hash(), token_hash(issued));

        // The high-s re-encoding still verifies and still hashes the same: it cannot dodge
        // a revocation by hash.
        let mut twin = issued.to_vec();
        let twin_sig = twin_s(&issued[n - 64..]);
        twin[n - 64..].copy_from_slice(&twin_sig);
        let twin_verified = token::verify(&twin, &device_keys, &validation).expect("valid");
        assert_eq!(twin_verified.hash(), verified.hash());

        // The hub's own backend checks it too.
        assert!(token::verify(issued, hub.verifier(), &validation).is_ok());
    }
}

#[test]
fn a_token_signed_by_another_hub_key_is_refused_by_a_device() {
    let (hub, _) = pair(0x11);
    let (other, _) = pair(0x12);
    let (_, holder) = pair(0x33);
    let cti = [1; 16];
    let mut out = [0u8; MAX_TOKEN_LEN];
    let n =
        token::issue(&access_claims(holder.public_key(), &cti), &other, &mut out).expect("issue");
    assert_eq!(
        token::verify(
            &out[..n],
            &KeySet::from_anchor(hub.public_key()),
            &Validation::new(IAT, "device-42")
        )
        .map(|_| ()),
        Err(SignatureError::UnknownKey.into())
    );
}

fn device_request(device: &P256Signer) -> Vec<u8> {
    let request = Request {
        client: "device-42",
        request_id: 7,
        issued_at: IAT,
        nonce: [0x6e; NONCE_LEN],
        body: RequestBody::DeviceToken,
    };
    let mut out = [0u8; 512];
    let n = request.sign(device, &mut out).expect("sign");
    out[..n].to_vec()
}

#[test]
fn a_request_a_device_signs_with_p256_verifies_with_its_registered_key() {
    let (_, device) = pair(0x22);
    let signed = device_request(&device);
    // The store keeps the uncompressed SEC1 encoding.
    let verifier = request_verifier(&device.public_key().to_sec1()).expect("registered key");
    let request = SignedRequest::decode(&signed)
        .and_then(|r| r.verify(&verifier))
        .expect("verifies");
    assert_eq!(request.request_id, 7);
    assert_eq!(verifier.kid(), device.kid());
    // As a key lookup it answers for its own kid only.
    assert!(verifier.verifier(&device.kid()).is_some());
    assert!(verifier.verifier(&[0; 8]).is_none());
}

#[test]
fn a_request_is_refused_with_another_clients_key_or_when_altered() {
    let (_, device) = pair(0x22);
    let (_, other) = pair(0x23);
    let signed = device_request(&device);
    let wrong = request_verifier(&other.public_key().to_sec1()).expect("key");
    assert_eq!(
        SignedRequest::decode(&signed)
            .and_then(|r| r.verify(&wrong))
            .map(|_| ()),
        Err(SignatureError::Invalid.into())
    );
    // Change request_id 7 to 8 (key 3 of the payload map, a one-byte uint).
    let mut altered = signed.clone();
    let at = altered
        .windows(2)
        .position(|w| w == [0x03, 0x07])
        .expect("request_id");
    altered[at + 1] = 0x08;
    let altered = SignedRequest::decode(&altered).expect("still a request");
    assert_eq!(altered.correlation().0, 8);
    let right = request_verifier(&device.public_key().to_sec1()).expect("key");
    assert_eq!(
        altered.verify(&right).map(|_| ()),
        Err(SignatureError::Invalid.into())
    );
}

#[test]
fn a_registered_key_that_is_not_a_point_is_refused() {
    let (_, device) = pair(0x22);
    let mut sec1 = device.public_key().to_sec1();
    sec1[64] ^= 1;
    assert_eq!(
        request_verifier(&sec1).map(|_| ()),
        Err(SignatureError::InvalidKey.into())
    );
    assert_eq!(
        request_verifier(&[]).map(|_| ()),
        Err(SignatureError::InvalidKey.into())
    );
    // The compressed form is the same key.
    let point =
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&device.public_key().to_sec1()).expect("point");
    let compressed = point.to_sec1_point(true);
    let verifier = request_verifier(compressed.as_bytes()).expect("compressed key");
    assert_eq!(verifier.public_key(), device.public_key());
}

#[test]
fn scalars_outside_one_to_n_minus_one_are_refused() {
    let invalid = Err(SignatureError::InvalidKey.into());
    assert_eq!(AwsLcSigner::from_scalar(&[0; 32]).map(|_| ()), invalid);
    assert_eq!(AwsLcSigner::from_scalar(&ORDER).map(|_| ()), invalid);
    assert_eq!(AwsLcSigner::from_scalar(&[0xff; 32]).map(|_| ()), invalid);
    let mut n_minus_1 = ORDER;
    n_minus_1[31] -= 1;
    let (aws, p256) = (
        AwsLcSigner::from_scalar(&n_minus_1).expect("n - 1 is a valid scalar"),
        P256Signer::from_scalar(&n_minus_1).expect("n - 1 is a valid scalar"),
    );
    assert_eq!(aws.public_key(), p256.public_key());
    let mut one = [0; 32];
    one[31] = 1;
    assert!(AwsLcSigner::from_scalar(&one).is_ok());
}

#[test]
fn a_scalar_with_someone_elses_public_key_is_refused() {
    let (a, _) = pair(1);
    let (b, _) = pair(2);
    let scalar = a.to_scalar().expect("scalar");
    assert!(AwsLcSigner::from_scalar_and_public_key(&scalar, &a.public_key().to_sec1()).is_ok());
    assert_eq!(
        AwsLcSigner::from_scalar_and_public_key(&scalar, &b.public_key().to_sec1()).map(|_| ()),
        Err(SignatureError::InvalidKey.into())
    );
}

#[test]
fn generated_keys_are_distinct_and_sign() {
    let a = AwsLcSigner::generate().expect("rng");
    let b = AwsLcSigner::generate().expect("rng");
    assert_ne!(a.kid(), b.kid());
    let sig = a.sign(&[b"x"]).expect("sign");
    assert_eq!(a.public_key().verify(&[b"x"], &sig), Ok(()));
}

#[test]
fn debug_output_names_the_key_and_never_the_secret() {
    let (aws, _) = pair(5);
    let shown = format!("{aws:?}");
    assert!(shown.contains(&hex::encode(aws.kid())), "{shown}");
    assert!(!shown.contains(&hex::encode(scalar(5))), "{shown}");
}

/// The committed vectors (shared/testdata) get the same verdict, for the same reason, from
/// either backend: every token case, and the signature check of every revocation message.
#[test]
fn both_backends_give_every_committed_vector_the_same_verdict() {
    let tokens: serde_json::Value =
        serde_json::from_str(include_str!("../../../shared/testdata/vectors.json"))
            .expect("token vectors");
    let issuer = |field: &str, doc: &serde_json::Value| {
        let cose = hex::decode(doc[field].as_str().expect("issuer key")).expect("hex");
        PublicKey::from_cose_key(&cose).expect("issuer COSE_Key")
    };
    let key = issuer("issuer_public_key_cose_hex", &tokens);
    let aws = AwsLcVerifier::new(&key).expect("key");
    let cases = tokens["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20, "{} token cases", cases.len());
    let mut valid = 0;
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let bytes = hex::decode(case["token_hex"].as_str().expect("token")).expect("hex");
        let validation = Validation::new(
            case["now"].as_u64().expect("now"),
            case["audience"].as_str().expect("audience"),
        );
        let by_p256 = token::verify(&bytes, &key, &validation).map(|t| t.hash());
        let by_aws = token::verify(&bytes, &aws, &validation).map(|t| t.hash());
        assert_eq!(by_aws, by_p256, "{name}");
        assert_eq!(by_aws.is_ok(), case["expect"] == "valid", "{name}");
        valid += usize::from(by_aws.is_ok());
    }
    assert!(valid >= 6, "{valid} valid token cases");

    let revocations: serde_json::Value = serde_json::from_str(include_str!(
        "../../../shared/testdata/revocation_vectors.json"
    ))
    .expect("revocation vectors");
    let key = issuer("hub_public_key_cose_hex", &revocations);
    let aws = AwsLcVerifier::new(&key).expect("key");
    let messages = revocations["messages"].as_array().expect("messages");
    assert!(!messages.is_empty());
    let mut verified = 0;
    for m in messages {
        let name = m["name"].as_str().expect("name");
        let bytes = hex::decode(m["message_hex"].as_str().expect("message")).expect("hex");
        let by_p256 = tessera_shared::revocation::verify(&bytes, &key);
        let by_aws = tessera_shared::revocation::verify(&bytes, &aws);
        assert_eq!(by_aws, by_p256, "{name}");
        verified += usize::from(by_aws.is_ok());
    }
    assert!(verified > 0, "no revocation message verified");
}
