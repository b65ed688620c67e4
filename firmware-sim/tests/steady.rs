//! `firmware-sim run --scenario steady` end to end: the binary starts its own Mosquitto
//! (loopback, free port) and `tessera-hub`, 30 devices enroll with one-time codes and
//! refresh 6-second tokens for 20 seconds, and none of them ever goes without a valid token.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 30;

#[test]
fn a_steady_fleet_with_short_lifetimes_refreshes_and_never_lapses() -> Result<()> {
    // Bounded: the run takes 20 s plus setup and teardown (a few seconds).
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "30",
            "--lifetime",
            "6s",
            "--duration",
            "20s",
            "--scenario",
            "steady",
        ],
        Duration::from_secs(120),
    )?;
    let field = |name: &str| field(&summary, name);
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
    // The hub the run started was measured.
    ensure!(
        summary["hub_rss_mb"].as_f64().is_some_and(|mb| mb > 0.0),
        "{summary}"
    );
    Ok(())
}
