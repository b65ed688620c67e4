//! Writes the committed token vectors to `shared/testdata/vectors.json`.
//!
//! ```text
//! cargo run -p tessera-shared --example make_vectors            # (re)write the file
//! cargo run -p tessera-shared --example make_vectors -- --check # exit 1 if it is stale
//! ```
//!
//! The output is the same byte for byte on every run (fixed keys, times and claims;
//! deterministic ES256), and `tests/vectors.rs` fails when the committed file differs from
//! what the generator in `tests/vectors/generator.rs` makes; that file documents each case.

#[path = "../tests/vectors/generator.rs"]
mod generator;

use std::process::ExitCode;

fn main() -> ExitCode {
    let check_only = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("make_vectors: unknown argument {other:?}; usage: make_vectors [--check]");
            return ExitCode::from(2);
        }
    };
    let cases = generator::cases();
    let json = generator::to_json(&cases);
    let path = generator::VECTORS_PATH;

    if check_only {
        return match std::fs::read_to_string(path) {
            Ok(committed) if committed == json => {
                println!("make_vectors: {path} is up to date ({} cases)", cases.len());
                ExitCode::SUCCESS
            }
            Ok(_) => {
                eprintln!("make_vectors: {path} differs from the generator; rerun without --check");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("make_vectors: cannot read {path}: {e}");
                ExitCode::FAILURE
            }
        };
    }

    if let Err(e) = std::fs::write(path, &json) {
        eprintln!("make_vectors: cannot write {path}: {e}");
        return ExitCode::FAILURE;
    }
    for c in &cases {
        let verdict = match c.expect {
            generator::Expect::Valid => "valid".to_owned(),
            generator::Expect::Invalid { reason, error } => format!("invalid {reason} ({error})"),
        };
        println!(
            "{:<34} {:>4} bytes  now={}  aud={}  {verdict}",
            c.name,
            c.check.token.len(),
            c.check.now,
            c.check.audience
        );
    }
    println!("make_vectors: wrote {} cases to {path}", cases.len());
    ExitCode::SUCCESS
}
