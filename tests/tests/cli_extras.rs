//! The command-line extras of both binaries, run as an operator would run them:
//! `--log-format json` / `TESSERA_LOG_FORMAT=json` (one JSON object per stderr line, for log
//! collectors) and `completions <shell>`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tessera_tests::hub::{HubDir, run_checked};
use tessera_tests::{ChildGuard, cargo_bin, free_port};

/// Every line of `output` is a JSON log event (`timestamp`, `level`, `fields.message`,
/// `target`); `allowed_plain` lines (the final `error:` a command prints) excepted.
fn assert_json_lines(output: &str, allowed_plain: &str) -> Result<usize> {
    let mut events = 0;
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        if !allowed_plain.is_empty() && line.starts_with(allowed_plain) {
            continue;
        }
        let event: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!("a log line is not JSON: {line:?}\nwhole output:\n{output}")
        })?;
        for key in ["timestamp", "level", "target"] {
            ensure!(event.get(key).is_some(), "no `{key}` in {line}");
        }
        ensure!(
            event["fields"]["message"].is_string(),
            "no fields.message in {line}"
        );
        ensure!(!line.contains('\u{1b}'), "an escape code in {line:?}");
        events += 1;
    }
    Ok(events)
}

#[test]
fn the_hub_logs_one_json_object_per_line_with_log_format_json() -> Result<()> {
    let dir = HubDir::init("hub-json-log")?;
    // Nothing listens on this port: the hub logs that it serves, then each failed connection.
    let port = free_port()?.to_string();
    let mut serve = ChildGuard::spawn(
        dir.command()?
            .args(["--log-format", "json", "serve", "--mqtt-port", &port])
            .env("RUST_LOG", "info"),
    )?;
    serve.wait_for_output("disconnected from broker", Duration::from_secs(20))?;
    let status = serve.terminate(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "serve exited {status}:\n{}",
        serve.output()
    );
    let output = serve.output();
    let events = assert_json_lines(&output, "")?;
    ensure!(
        events >= 3,
        "expected serving, disconnected and shutdown events:\n{output}"
    );
    assert!(output.contains(r#""message":"hub serving""#), "{output}");
    Ok(())
}

#[test]
fn the_agent_logs_json_with_tessera_log_format_json() -> Result<()> {
    let dir = HubDir::init("hub-json-agent")?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("agent.toml");
    let port = free_port()?;
    std::fs::write(
        &config,
        format!(
            "device_id = \"json-device\"\ntrust_anchor_file = {:?}\nsocket = {:?}\n\
             [store]\ndir = {:?}\n[mqtt]\nport = {port}\n",
            dir.trust_anchor_path(),
            state.path().join("agent.sock"),
            state.path().join("state"),
        ),
    )?;
    // No broker: `enroll` logs each failed connection, then gives up after its timeout.
    let output = Command::new(cargo_bin_agent()?)
        .arg("--config")
        .arg(&config)
        .args([
            "enroll",
            "--code",
            "AAAAA-AAAAA-AAAAA-AAAAA",
            "--timeout-s",
            "2",
        ])
        .env("TESSERA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(
        !output.status.success(),
        "enroll without a broker succeeded"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let events = assert_json_lines(&stderr, "error:")?;
    ensure!(events >= 1, "the agent logged nothing:\n{stderr}");
    Ok(())
}

fn cargo_bin_agent() -> Result<std::path::PathBuf> {
    cargo_bin("tessera-agent")
}

fn completions(binary: &Path, shell: &str) -> Result<String> {
    run_checked(Command::new(binary).args(["completions", shell]))
}

#[test]
fn both_binaries_print_completions_for_bash_zsh_and_fish() -> Result<()> {
    let hub = cargo_bin("tessera-hub")?;
    let agent = cargo_bin_agent()?;
    for (binary, name, subcommand) in [
        (&hub, "tessera-hub", "present"),
        (&agent, "tessera-agent", "verify"),
    ] {
        let bash = completions(binary, "bash")?;
        assert!(
            bash.contains(&format!("complete -F _{}", name.replace('-', "__"))),
            "{bash}"
        );
        assert!(bash.contains(subcommand), "bash completes `{subcommand}`");
        let zsh = completions(binary, "zsh")?;
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{zsh}");
        let fish = completions(binary, "fish")?;
        assert!(fish.contains(&format!("complete -c {name}")), "{fish}");
        assert!(fish.contains(subcommand), "fish completes `{subcommand}`");
    }
    let refused = Command::new(&hub).args(["completions", "tcsh"]).output()?;
    assert!(!refused.status.success(), "an unknown shell is refused");
    Ok(())
}
