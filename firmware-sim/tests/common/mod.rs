//! What the end-to-end tests share: running `firmware-sim run` bounded in time and reading
//! the JSON summary on its last line.
#![allow(dead_code)] // each test file uses its own part

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

/// Runs `firmware-sim run <args> --json --hub-bin <hub>` (the hub built if needed), at most
/// `timeout`; returns the summary and the human summary (stderr) for messages.
pub(crate) fn run_sim(args: &[&str], timeout: Duration) -> Result<(serde_json::Value, String)> {
    let hub = tessera_tests::cargo_bin("tessera-hub")?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_firmware-sim"));
    command
        .arg("run")
        .args(args)
        .arg("--json")
        .arg("--hub-bin")
        .arg(&hub);
    let output = run_with_timeout(&mut command, timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ensure!(
        output.status.success(),
        "firmware-sim failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let last = stdout
        .lines()
        .last()
        .context("firmware-sim printed nothing")?;
    let summary = serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))?;
    Ok((summary, stderr))
}

/// A whole-number field of the summary.
pub(crate) fn field(summary: &serde_json::Value, name: &str) -> Result<u64> {
    summary[name]
        .as_u64()
        .with_context(|| format!("no `{name}` in {summary}"))
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

/// Runs 20 devices with 8-second tokens for 36 s through `scenario`, an outage of 3 s a
/// third of the way in (at 12 s), and checks the fleet rode it out: no lapse beyond the outage (and
/// one retry window after it), no device that never held a token, every one holding a
/// valid token at the end; `hub_ran_throughout` as the scenario implies.
pub(crate) fn ride_out_outage(scenario: &str, hub_ran_throughout: bool) -> Result<()> {
    const DEVICES: u64 = 20;
    // Bounded: 36 s of run plus setup and teardown. After the 3 s outage the hub may wait
    // up to its transport's reconnect backoff cap (10 s) before it is back, then devices
    // get one retry window (4 s): 12 + 3 + 10 + 4 = 29 s leaves a token lifetime's room
    // for every device to hold a valid token at the end.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "20",
            "--lifetime",
            "8s",
            "--duration",
            "36s",
            "--outage",
            "3s",
            "--scenario",
            scenario,
        ],
        Duration::from_secs(120),
    )?;
    ensure!(field(&summary, "devices")? == DEVICES, "{summary}");
    ensure!(
        field(&summary, "device_failures")? == 0,
        "{summary}\n{stderr}"
    );
    // Lapses during the outage (and one retry window after) are not counted; any other
    // is a fault of the fleet's.
    ensure!(
        field(&summary, "lapses")? == 0,
        "a device lapsed beyond the outage: {summary}\n{stderr}"
    );
    ensure!(field(&summary, "never_held")? == 0, "{summary}");
    ensure!(
        field(&summary, "holding_at_end")? == DEVICES,
        "not every device holds a valid token again: {summary}\n{stderr}"
    );
    ensure!(field(&summary, "outage_ms")? >= 3_000, "{summary}");
    ensure!(
        field(&summary, "lapses_not_counted_ms")? >= field(&summary, "outage_ms")?,
        "{summary}"
    );
    ensure!(field(&summary, "devices_retried")? <= DEVICES, "{summary}");
    ensure!(
        summary["hub_ran_throughout"] == hub_ran_throughout,
        "{summary}"
    );
    Ok(())
}
