//! `tessera-agent` under operator mistakes and faults, end to end (the real binary, a real
//! hub and a real Mosquitto): a second agent started on the same state directory, and a
//! store that cannot be written.

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::{DEVICE_ROLE, Device, GROUP, Hub, HubOptions};

/// Runs blocking test code (processes, files, sockets) without starving the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Makes every write of the record fail, as a full or read-only disk would, even for root:
/// a directory where the store puts its temporary file.
fn block_store_writes(state: &Path) -> Result<()> {
    std::fs::create_dir(state.join(".store.tsr.tmp")).context("blocking store writes")
}

fn unblock_store_writes(state: &Path) -> Result<()> {
    std::fs::remove_dir(state.join(".store.tsr.tmp")).context("unblocking store writes")
}

fn renewals(status: &serde_json::Value) -> u64 {
    status["renewals"].as_u64().unwrap_or(0)
}

fn unsaved(status: &serde_json::Value) -> bool {
    !status["store_unsaved_since_ms"].is_null()
}

/// The log lines in which the hub refused a refresh grant as spent or revoked.
fn grant_refusals(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("hub refused") && l.contains("refresh") && l.contains("revoked"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_refuses_to_start_and_a_killed_one_leaves_no_lock()
-> Result<()> {
    let hub = Hub::start(HubOptions::default()).await?;
    let code = blocking(|| hub.dir.add_device_with_code("lk-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "lk-1", "")?;
    blocking(|| device.enroll(Some(&code)))?;
    let mut first = blocking(|| device.spawn())?;
    let state = device.state_dir().display().to_string();

    // Another socket, the same state directory: refused at once, naming both.
    let other_socket = device.path().join("other.sock");
    let other = other_socket.to_string_lossy().into_owned();
    let out = blocking(|| device.output(&["--socket", &other, "run"]))?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "a second agent ran: {err}");
    ensure!(
        err.contains(&state)
            && err.contains("another tessera-agent")
            && err.contains(&format!("pid {}", first.id())),
        "the refusal names the directory and the agent holding it: {err}"
    );
    ensure!(!other_socket.exists(), "the second agent served a socket");

    // Enrolling would write the store under the running agent: refused the same way.
    let out = blocking(|| device.output(&["enroll", "--timeout-s", "5"]))?;
    let err = stderr(&out);
    ensure!(
        !out.status.success() && err.contains(&state) && err.contains("another tessera-agent"),
        "enroll beside a running agent: {err}"
    );
    blocking(|| device.token()).context("the first agent still serves")?;

    // A crash leaves no stale lock: the kernel released it with the process.
    blocking(|| first.kill_9())?;
    let _second = blocking(|| device.spawn()).context("an agent after a kill -9")?;
    blocking(|| {
        device.wait_status("a valid token", Duration::from_secs(20), |s| {
            s["token_valid"] == true
        })
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_write_its_store_keeps_the_grant_in_force_retries_and_never_strands_the_device()
-> Result<()> {
    // Six-second tokens: a renewal every 3 to 4.5 s.
    let hub = Hub::start(HubOptions {
        device_token_lifetime_s: 6,
        ..HubOptions::default()
    })
    .await?;
    let code = blocking(|| hub.dir.add_device_with_code("st-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "st-1", "")?;
    let state = device.state_dir();
    blocking(|| device.enroll(Some(&code)))?;
    let mut agent = blocking(|| device.spawn())?;
    let wait = Duration::from_secs(30);
    let before = blocking(|| {
        device.wait_status("a first renewal", wait, |s| {
            renewals(s) >= 1 && s["state"] == "holding"
        })
    })?;

    // The disk stops taking writes. The next renewal is held in memory, said loudly, and
    // not taken for done.
    block_store_writes(&state)?;
    let failing = blocking(|| {
        device.wait_status("a renewal that cannot be saved", wait, |s| {
            renewals(s) > renewals(&before) && unsaved(s)
        })
    })?;
    let log = device.log();
    ensure!(
        log.contains("device token renewed in memory only"),
        "no clear error for the unsaved renewal:\n{log}"
    );
    ensure!(
        failing["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("store write failed")),
        "status: {failing}"
    );
    // Renewing goes on with the grant the hub rotated to (the one on disk is spent): no
    // refusal, the token stays valid.
    let still = blocking(|| {
        device.wait_status("another renewal while unsaved", wait, |s| {
            renewals(s) > renewals(&failing) && unsaved(s) && s["token_valid"] == true
        })
    })?;
    ensure!(
        grant_refusals(&device.log()) == 0,
        "a grant was refused while the store failed:\n{}",
        device.log()
    );

    // The disk is back: the state in force is written by the retry.
    unblock_store_writes(&state)?;
    blocking(|| {
        device.wait_status("the store written again", wait, |s| {
            !unsaved(s) && s["store_counter"].as_u64() > still["store_counter"].as_u64()
        })
    })?;
    ensure!(
        device.log().contains("token store written again"),
        "{}",
        device.log()
    );

    // A crash while unsaved: the record on disk holds a spent grant. The next agent must
    // still end up with a valid token (the hub refuses the grant; the device key asks).
    block_store_writes(&state)?;
    let failing = blocking(|| device.status())?;
    blocking(|| {
        device.wait_status("an unsaved renewal before the crash", wait, |s| {
            renewals(s) > renewals(&failing) && unsaved(s)
        })
    })?;
    blocking(|| agent.kill_9())?;
    unblock_store_writes(&state)?;
    let mut agent = blocking(|| device.spawn())?;
    blocking(|| {
        device.wait_status("a valid token after the restart", wait, |s| {
            s["token_valid"] == true && s["state"] == "holding" && renewals(s) >= 1 && !unsaved(s)
        })
    })?;
    ensure!(blocking(|| agent.terminate(wait))?.success());

    // A store that cannot be written at all: `run` stops at once with a clear message.
    block_store_writes(&state)?;
    let out = blocking(|| device.output(&["run"]))?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(1) && err.contains("the token store cannot be written"),
        "run on an unwritable store: {:?} {err}",
        out.status
    );
    unblock_store_writes(&state)?;
    Ok(())
}

#[test]
fn a_state_directory_that_cannot_be_used_is_reported_with_its_cause_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A file where the state directory should be: its lock file cannot be opened.
    std::fs::write(dir.path().join("state"), b"not a directory")?;
    std::fs::write(dir.path().join("anchor.pem"), b"")?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "device_id = \"d-1\"\ntrust_anchor_file = \"anchor.pem\"\n[store]\ndir = \"state\"\n",
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera-agent"))
        .arg("-c")
        .arg(&config)
        .arg("keygen")
        .output()
        .context("running tessera-agent")?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "{err}");
    ensure!(err.contains("state"), "names the path: {err}");
    ensure!(
        err.matches("(os error").count() == 1,
        "each cause is said once: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_with_another_hubs_trust_anchor_stops_at_the_first_answer_saying_so() -> Result<()>
{
    let hub = Hub::start(HubOptions::default()).await?;
    let code = blocking(|| hub.dir.add_device_with_code("ta-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "ta-1", "")?;
    // A trust anchor that is not this hub's: the device's own public key will do.
    let not_the_hub = blocking(|| device.run_ok(&["keygen"]))?;
    let anchor = device.path().join("other-anchor.pem");
    std::fs::write(&anchor, not_the_hub)?;
    let config = device.path().join("agent.toml");
    let text = std::fs::read_to_string(&config)?;
    let hub_anchor = hub.dir.trust_anchor_path().display().to_string();
    ensure!(text.contains(&hub_anchor), "{text}");
    std::fs::write(
        &config,
        text.replace(&hub_anchor, &anchor.display().to_string()),
    )?;
    let out = blocking(|| device.output(&["enroll", "--code", &code, "--timeout-s", "60"]))?;
    let err = stderr(&out);
    ensure!(!out.status.success(), "{err}");
    ensure!(
        err.contains("does not name") && err.contains("other-anchor.pem"),
        "it says the trust anchor is not this hub's, not that the hub is silent: {err}"
    );
    Ok(())
}

/// Polls `path` until its text satisfies `done`, for at most 30 s.
fn wait_for_file(path: &Path, done: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return Ok(text);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{} never showed it:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_keeps_its_metrics_in_the_textfile_and_says_when_it_stopped() -> Result<()>
{
    let hub = Hub::start(HubOptions::default()).await?;
    let code = blocking(|| hub.dir.add_device_with_code("mx-1", DEVICE_ROLE, &[GROUP]))?;
    let device = Device::new(&hub, "mx-1", "metrics_textfile = \"metrics.prom\"")?;
    blocking(|| device.enroll(Some(&code)))?;
    let mut agent = blocking(|| device.spawn())?;
    let textfile = device.path().join("metrics.prom");
    let text = blocking(|| {
        wait_for_file(&textfile, |t| {
            t.contains("tessera_agent_token_valid{device=\"mx-1\"} 1")
                && t.contains("tessera_agent_running{device=\"mx-1\"} 1")
        })
    })?;
    ensure!(
        text.contains("tessera_agent_refresh_failures_total{device=\"mx-1\"} 0"),
        "{text}"
    );
    let printed = blocking(|| device.run_ok(&["status", "--prometheus"]))?;
    ensure!(
        printed.contains("tessera_agent_running{device=\"mx-1\"} 1")
            && printed.contains("tessera_agent_token_expires_in_seconds{device=\"mx-1\"}"),
        "{printed}"
    );
    blocking(|| agent.terminate(Duration::from_secs(15)))?;
    let text = blocking(|| {
        wait_for_file(&textfile, |t| {
            t.contains("tessera_agent_info{device=\"mx-1\",state=\"stopped\"} 1")
        })
    })?;
    ensure!(
        text.contains("tessera_agent_running{device=\"mx-1\"} 0"),
        "{text}"
    );
    Ok(())
}
