//! Encoded size of a typical device token and access token, next to the same claims as a
//! JWT (ES256, base64url JSON, the holder's key as a JWK in `cnf`).
//!
//!     cargo run -q -p tessera-shared --example token_size
//!
//! Both forms carry the same information: `alg` and `kid` in the protected header; iss, sub,
//! aud, exp, iat, a 16-byte token id (`cti` / `jti`), the holder's key with its kid and alg
//! (COSE_Key / JWK) and two scopes. Both are signed for real and checked before printing.

use serde_json::json;
use tessera_shared::claims::Claims;
use tessera_shared::crypto::{P256Signer, PublicKey, Signer, Verifier};
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, MAX_TOKEN_LEN, Validation};

const IAT: u64 = 1_750_000_000;

fn signer(seed: u8) -> P256Signer {
    let mut s = [seed; 32];
    s[0] = 0x01;
    P256Signer::from_scalar(&s).expect("valid scalar")
}

fn main() {
    // RFC 4648 §10 vectors, unpadded, and the two URL-safe characters: the JWT sizes below
    // are only right if the encoding is.
    for (input, want) in [
        (&b"f"[..], "Zg"),
        (b"fo", "Zm8"),
        (b"foob", "Zm9vYg"),
        (b"foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(b64url(input), want);
    }
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");

    let hub = signer(0x11);
    let cti = [0x5a; 16];
    let device_token = Claims {
        iss: "hub-1",
        sub: "device-42",
        aud: "telemetry",
        exp: IAT + 900,
        nbf: None,
        iat: IAT,
        cti: &cti,
        cnf: signer(0x22).public_key(),
        scope: Scopes::parse("telemetry:write firmware:read").expect("scope"),
    };
    let access_token = Claims {
        iss: "hub-1",
        sub: "app-7",
        aud: "device-42",
        exp: IAT + 300,
        nbf: None,
        iat: IAT,
        cti: &cti,
        cnf: signer(0x33).public_key(),
        scope: Scopes::parse("door:open telemetry:read").expect("scope"),
    };

    println!("| token | CWT bytes | JWT bytes | JWT ÷ CWT |");
    println!("|---|---:|---:|---:|");
    for (name, claims) in [
        ("device token", &device_token),
        ("access token", &access_token),
    ] {
        let cwt = cwt_len(claims, &hub);
        let jwt = jwt(claims, &hub);
        println!(
            "| {name} | {cwt} | {} | {:.2} |",
            jwt.len(),
            jwt.len() as f64 / cwt as f64
        );
    }
}

/// Issues the CWT and checks that it verifies; returns its length.
fn cwt_len(claims: &Claims<'_>, hub: &P256Signer) -> usize {
    let mut out = [0u8; MAX_TOKEN_LEN];
    let len = token::issue(claims, hub, &mut out).expect("issue");
    let verified = token::verify(
        &out[..len],
        &hub.public_key(),
        &Validation::new(claims.iat, claims.aud),
    )
    .expect("the CWT verifies");
    assert_eq!(verified.claims(), claims);
    len
}

/// The same claims as a compact JWS (RFC 7515/7519, ES256 with a raw `r‖s` signature), with
/// `cnf` holding a JWK (RFC 7800). Checks the signature before returning it.
fn jwt(claims: &Claims<'_>, hub: &P256Signer) -> String {
    let header = json!({ "alg": "ES256", "kid": b64url(&hub.kid()) });
    let payload = json!({
        "iss": claims.iss,
        "sub": claims.sub,
        "aud": claims.aud,
        "exp": claims.exp,
        "iat": claims.iat,
        "jti": b64url(claims.cti),
        "cnf": { "jwk": jwk(&claims.cnf) },
        "scope": claims.scope.as_str(),
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.to_string().as_bytes())
    );
    let sig = hub.sign(&[signing_input.as_bytes()]).expect("sign");
    hub.public_key()
        .verify(&[signing_input.as_bytes()], &sig)
        .expect("the JWT verifies");
    format!("{signing_input}.{}", b64url(&sig.0))
}

/// The JWK twin of the COSE_Key the CWT carries: kty, kid, alg, crv, x, y.
fn jwk(key: &PublicKey) -> serde_json::Value {
    let (x, y) = key.coordinates();
    json!({
        "kty": "EC",
        "kid": b64url(&key.kid()),
        "alg": "ES256",
        "crv": "P-256",
        "x": b64url(&x),
        "y": b64url(&y),
    })
}

/// base64url without padding (RFC 7515 §2).
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}
