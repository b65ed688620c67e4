//! Writes the committed test vectors: the token vectors to `shared/testdata/vectors.json`
//! and the revocation vectors to `shared/testdata/revocation_vectors.json`.
//!
//! ```text
//! cargo run -p tessera-shared --example make_vectors            # (re)write the files
//! cargo run -p tessera-shared --example make_vectors -- --check # exit 1 if one is stale
//! ```
//!
//! The output is the same byte for byte on every run (fixed keys, times and claims;
//! deterministic ES256), and `tests/vectors.rs` and `tests/revocation_vectors.rs` fail when
//! a committed file differs from what the generators in `tests/vectors/` make; those files
//! document each case, and `testdata/README.md` the files' shape.

#[path = "../tests/vectors/generator.rs"]
mod generator;
#[path = "../tests/vectors/revocation.rs"]
mod revocation;

use std::process::ExitCode;

/// Writes `json` to `path`, or with `check_only` compares it with what is there.
fn write_or_check(path: &str, json: &str, check_only: bool, what: &str) -> bool {
    if check_only {
        return match std::fs::read_to_string(path) {
            Ok(committed) if committed == json => {
                println!("make_vectors: {path} is up to date ({what})");
                true
            }
            Ok(_) => {
                eprintln!("make_vectors: {path} differs from the generator; rerun without --check");
                false
            }
            Err(e) => {
                eprintln!("make_vectors: cannot read {path}: {e}");
                false
            }
        };
    }
    if let Err(e) = std::fs::write(path, json) {
        eprintln!("make_vectors: cannot write {path}: {e}");
        return false;
    }
    println!("make_vectors: wrote {what} to {path}");
    true
}

fn verdict(expect: &generator::Expect) -> String {
    match expect {
        generator::Expect::Valid => "valid".to_owned(),
        generator::Expect::Invalid { reason, error } => format!("invalid {reason} ({error})"),
    }
}

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
    if !check_only {
        for c in &cases {
            println!(
                "{:<34} {:>4} bytes  now={}  aud={}  {}",
                c.name,
                c.check.token.len(),
                c.check.now,
                c.check.audience,
                verdict(&c.expect)
            );
        }
    }
    let tokens_ok = write_or_check(
        generator::VECTORS_PATH,
        &generator::to_json(&cases),
        check_only,
        &format!("{} token cases", cases.len()),
    );

    let messages = revocation::messages();
    let lists = revocation::lists();
    if !check_only {
        for m in &messages {
            println!(
                "{:<44} {:>4} bytes  {}",
                m.name,
                m.bytes.len(),
                verdict(&m.expect)
            );
        }
    }
    let revocation_ok = write_or_check(
        revocation::REVOCATION_VECTORS_PATH,
        &revocation::to_json(
            &revocation::streams(),
            &revocation::tokens(),
            &messages,
            &lists,
        ),
        check_only,
        &format!(
            "{} revocation messages and {} lists",
            messages.len(),
            lists.len()
        ),
    );

    if tokens_ok && revocation_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
