//! Verifies one token with the core, as any verifier of Tessera tokens would.
//!
//! ```text
//! cargo run -q -p tessera-shared --example verify_token -- case.json
//! ```
//!
//! `case.json` holds:
//!
//! ```json
//! {"issuer_public_key_cose_hex": "a601…", "token_hex": "d284…", "now": 1700000060,
//!  "audience": "device-42", "required_scope": "door:open", "issuer": "hub-1"}
//! ```
//!
//! `required_scope` and `issuer` are optional; other fields are ignored. The token goes
//! through `token::verify` with the default 30 s leeway and those options.
//!
//! Prints the verdict and, for a valid token, its claims. Exit status: 0 valid, 1 invalid
//! (the core's reason is printed), 2 bad input (unreadable file, bad JSON or hex, an
//! issuer key that is not a P-256 COSE_Key).

use std::process::ExitCode;

use serde::Deserialize;
use tessera_shared::crypto::PublicKey;
use tessera_shared::token::{self, Validation};

#[derive(Deserialize)]
struct Input {
    issuer_public_key_cose_hex: String,
    token_hex: String,
    now: u64,
    audience: String,
    #[serde(default)]
    required_scope: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
}

fn read_input() -> Result<(Input, PublicKey, Vec<u8>), String> {
    let mut args = std::env::args().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        return Err("usage: verify_token <case.json>".to_owned());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let input: Input =
        serde_json::from_str(&text).map_err(|e| format!("{path} is not a token case: {e}"))?;
    let cose = hex::decode(input.issuer_public_key_cose_hex.trim())
        .map_err(|e| format!("issuer_public_key_cose_hex is not hex: {e}"))?;
    let key = PublicKey::from_cose_key(&cose)
        .map_err(|e| format!("issuer_public_key_cose_hex is not a P-256 COSE_Key: {e}"))?;
    let token =
        hex::decode(input.token_hex.trim()).map_err(|e| format!("token_hex is not hex: {e}"))?;
    Ok((input, key, token))
}

fn main() -> ExitCode {
    let (input, key, token) = match read_input() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("verify_token: bad input: {e}");
            return ExitCode::from(2);
        }
    };
    let mut validation = Validation::new(input.now, &input.audience);
    if let Some(scope) = &input.required_scope {
        validation = validation.with_scope(scope);
    }
    if let Some(issuer) = &input.issuer {
        validation = validation.with_issuer(issuer);
    }

    match token::verify(&token, &key, &validation) {
        Ok(t) => {
            let c = t.claims();
            println!(
                "valid: {}-byte token, signed by kid {}",
                token.len(),
                hex::encode(t.kid())
            );
            println!("  iss   {}", c.iss);
            println!("  sub   {}", c.sub);
            println!("  aud   {}", c.aud);
            println!("  scope {}", c.scope.as_str());
            println!("  iat   {}", c.iat);
            if let Some(nbf) = c.nbf {
                println!("  nbf   {nbf}");
            }
            println!(
                "  exp   {} ({} s after now)",
                c.exp,
                c.exp.saturating_sub(input.now)
            );
            println!("  cti   {}", hex::encode(c.cti));
            println!("  cnf   kid {}", hex::encode(c.cnf.kid()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("invalid: {e}");
            ExitCode::from(1)
        }
    }
}
