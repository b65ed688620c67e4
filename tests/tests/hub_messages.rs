//! What the `tessera-hub` binary tells an operator (issue 9, "Messages"): each cause of an
//! error once, `init` advised only when there is no configuration, no colour codes in a
//! redirected log and no line logged twice, and counts in the singular when there is one.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tessera_tests::cargo_bin;
use tessera_tests::hub::{HubDir, TestHub};

/// How long a hub may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The text of a missing file's I/O error, as Rust prints it.
const NOT_FOUND: &str = "(os error 2)";

/// Runs `tessera-hub` with these arguments, which must fail; returns its stderr.
fn run_failing(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {shown}"))?;
    ensure!(
        !output.status.success(),
        "{shown} succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_missing_config_file_is_reported_once_with_the_advice_to_run_init() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let missing = temp.path().join("absent.toml");
    let stderr = run_failing(
        Command::new(cargo_bin("tessera-hub")?)
            .arg("--config")
            .arg(&missing)
            .arg("trust-anchor"),
    )?;
    assert_eq!(stderr.matches(NOT_FOUND).count(), 1, "{stderr}");
    assert!(stderr.contains("absent.toml"), "{stderr}");
    assert!(stderr.contains("tessera-hub init"), "{stderr}");
    Ok(())
}

#[test]
fn a_missing_key_file_is_reported_once() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    let missing = dir.path().join("keys").join("absent.pem.pub");
    let missing = missing.to_string_lossy();
    let stderr = dir.run_failing(&[
        "app",
        "add",
        "app-1",
        "--role",
        "controller",
        "--key",
        &missing,
    ])?;
    assert_eq!(stderr.matches(NOT_FOUND).count(), 1, "{stderr}");
    assert_eq!(stderr.matches("absent.pem.pub").count(), 1, "{stderr}");
    Ok(())
}

#[test]
fn a_mistyped_config_key_is_reported_by_file_line_and_key_without_advising_init() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    dir.replace_in_config("rotation_announce_s = 300", "rotation_anounce_s = 300")?;
    let text = std::fs::read_to_string(dir.config_path())?;
    let line = text
        .lines()
        .position(|l| l.starts_with("rotation_anounce_s"))
        .context("the mistyped key is in the file")?
        + 1;

    let stderr = dir.run_failing(&["keys", "list"])?;
    assert!(stderr.contains("tessera-hub.toml"), "{stderr}");
    assert!(stderr.contains(&format!("line {line}")), "{stderr}");
    assert!(
        stderr.contains("unknown field `rotation_anounce_s`"),
        "{stderr}"
    );
    assert!(!stderr.contains("init"), "the file exists: {stderr}");
    assert_eq!(
        stderr.matches("unknown field").count(),
        1,
        "said once: {stderr}"
    );
    Ok(())
}

#[test]
fn serve_that_cannot_start_says_why_once() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    dir.append_to_config("[mqtt.tls]\nca_file = \"missing-ca.pem\"\n")?;
    let stderr = dir.run_failing(&["serve"])?;
    // Neither logged and then printed, nor its cause repeated.
    assert_eq!(stderr.matches("missing-ca.pem").count(), 1, "{stderr}");
    assert_eq!(stderr.matches(NOT_FOUND).count(), 1, "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes in a pipe: {stderr:?}"
    );
    Ok(())
}

#[tokio::test]
async fn serve_writes_a_redirected_log_without_colour_codes_or_repeated_lines() -> Result<()> {
    let hub = TestHub::builder().hub_id("hub-msgs").start().await?;
    let status = hub.terminate(STOP_TIMEOUT)?;
    assert!(status.success(), "{status}");
    let log = std::fs::read(hub.dir().log_path())?;
    let text = String::from_utf8_lossy(&log);
    assert!(!log.contains(&0x1b), "escape codes in the log:\n{text}");
    for line in ["hub serving", "shutdown requested", "hub stopped"] {
        assert_eq!(text.matches(line).count(), 1, "{line:?} once:\n{text}");
    }
    Ok(())
}

#[test]
fn policy_check_counts_one_group_and_one_rule_in_the_singular() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    let printed = dir.run(&["policy", "check"])?;
    // The default policy declares one group and one access rule.
    assert!(
        printed.contains(" roles, 1 group, 1 access rule)"),
        "{printed}"
    );
    Ok(())
}

#[test]
fn policy_check_of_a_named_file_needs_no_hub() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let hub = || -> Result<Command> {
        let mut c = Command::new(cargo_bin("tessera-hub")?);
        c.current_dir(temp.path());
        Ok(c)
    };
    let policy = hub()?.args(["default", "policy"]).output()?;
    std::fs::write(temp.path().join("policy.toml"), &policy.stdout)?;
    let out = hub()?.args(["policy", "check", "policy.toml"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("policy.toml: ok") && stdout.contains("checked the file alone"),
        "{stdout}"
    );
    // A bad file is still refused, by line.
    std::fs::write(temp.path().join("bad.toml"), "[roles.x]\nkind = 3\n")?;
    let stderr = run_failing(hub()?.args(["policy", "check", "bad.toml"]))?;
    ensure!(stderr.contains("bad.toml"), "{stderr}");
    Ok(())
}

#[test]
fn a_role_of_another_kind_is_named_with_the_right_article() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    let key = dir.keygen("app-1")?;
    let public = key.public_path().to_string_lossy();
    let stderr = dir.run_failing(&["app", "add", "app-1", "--role", "sensor", "--key", &public])?;
    assert!(
        stderr.contains("role `sensor` is a device role, not an app role"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn policy_explain_exits_non_zero_on_a_denial_and_zero_when_allowed() -> Result<()> {
    let dir = HubDir::init("hub-msgs")?;
    dir.add_device("door-1", "sensor", &["building-a"])?;
    dir.add_app("app-1", "controller")?;
    let explain = |scope: &str| -> Result<Output> {
        dir.command()?
            .args([
                "policy", "explain", "--app", "app-1", "--device", "door-1", "--scope", scope,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .context("running policy explain")
    };

    let allowed = explain("door:open")?;
    let printed = String::from_utf8_lossy(&allowed.stdout);
    assert!(allowed.status.success(), "{printed}");
    assert!(printed.contains("verdict: allowed"), "{printed}");

    let denied = explain("door:unlock")?;
    let printed = String::from_utf8_lossy(&denied.stdout);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{printed}{stderr}");
    assert!(printed.contains("verdict: denied"), "{printed}");
    assert!(stderr.contains("error: denied (not_allowed)"), "{stderr}");
    Ok(())
}
