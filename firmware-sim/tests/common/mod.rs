//! What the end-to-end tests share: running `firmware-sim run` bounded in time and reading
//! the JSON summary on its last line.

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
