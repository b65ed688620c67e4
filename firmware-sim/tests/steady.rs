//! `firmware-sim run --scenario steady` end to end: the binary starts its own Mosquitto
//! (loopback, free port) and `tessera-hub`, 30 devices enroll with one-time codes and
//! refresh 6-second tokens for 20 seconds, and none of them ever goes without a valid token.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

const DEVICES: u64 = 30;

#[test]
fn a_steady_fleet_with_short_lifetimes_refreshes_and_never_lapses() -> Result<()> {
    let hub = tessera_tests::cargo_bin("tessera-hub")?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_firmware-sim"));
    command
        .args(["run", "--devices", &DEVICES.to_string()])
        .args([
            "--lifetime",
            "6s",
            "--duration",
            "20s",
            "--scenario",
            "steady",
        ])
        .arg("--json")
        .arg("--hub-bin")
        .arg(&hub);
    // Bounded: the run takes 20 s plus setup and teardown (a few seconds).
    let output = run_with_timeout(&mut command, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "firmware-sim failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let last = stdout
        .lines()
        .last()
        .context("firmware-sim printed nothing")?;
    let summary: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?;
    let field = |name: &str| {
        summary[name]
            .as_u64()
            .with_context(|| format!("no `{name}` in {summary}"))
    };
    ensure!(field("devices")? == DEVICES, "{summary}");
    ensure!(
        field("lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    // Every device enrolled and refreshed at least once (6 s tokens, refreshed at 50 to
    // 75 % of their life: about five tokens each in 20 s).
    ensure!(field("min_tokens_per_device")? >= 2, "{summary}");
    ensure!(field("tokens_issued")? >= 2 * DEVICES, "{summary}");
    ensure!(
        summary["refresh_latency_ms"]["p50"].is_u64()
            && summary["refresh_latency_ms"]["p99"].is_u64(),
        "{summary}"
    );
    ensure!(summary["errors"].is_object(), "{summary}");
    ensure!(summary["hub_ran_throughout"] == true, "{summary}");
    Ok(())
}

/// Runs `command` to completion, killing it after `timeout`.
fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<std::process::Output> {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting firmware-sim")?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child
                .wait_with_output()
                .context("reading firmware-sim's output");
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            anyhow::bail!(
                "firmware-sim did not finish within {timeout:?}:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
