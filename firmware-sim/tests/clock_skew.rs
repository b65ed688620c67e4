//! `firmware-sim run --scenario clock-skew` end to end: 20 devices with 8-second tokens for
//! 16 s, each with a clock of its own. Half do not trust theirs (`trust_local_clock =
//! false`) and have a wrong one (up to a day off, or counting from zero, drifting up to
//! 2 %); the other half trust a nearly right one. The wrong clocks reach the hub (it
//! refuses requests as `stale`), every machine that distrusts its clock learns the hub's
//! time, and no device lapses.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 20;

#[test]
fn devices_with_wrong_clocks_learn_the_hubs_time_and_never_lapse() -> Result<()> {
    // Bounded: 16 s of run plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "20",
            "--lifetime",
            "8s",
            "--duration",
            "16s",
            "--untrusted-clock-share",
            "0.5",
            "--scenario",
            "clock-skew",
        ],
        Duration::from_secs(120),
    )?;
    let field = |name: &str| field(&summary, name);
    let clocks = &summary["clocks"];
    ensure!(field("devices")? == DEVICES, "{summary}");
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    ensure!(clocks["untrusted"] == DEVICES / 2, "{summary}");
    // The wrong clocks are wrong by more than the hub's freshness window (60 s)...
    ensure!(
        clocks["untrusted_max_error_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 60_000),
        "{summary}"
    );
    // ...so the hub saw their time and refused it, and each such machine moved its clock
    // to the hub's.
    ensure!(
        summary["errors"]["stale"].as_u64().is_some_and(|n| n >= 1),
        "no request carried a wrong time: {summary}"
    );
    ensure!(
        clocks["adjustments"]
            .as_u64()
            .is_some_and(|n| n >= DEVICES / 2),
        "{summary}"
    );
    ensure!(
        clocks["untrusted_never_held"] == 0 && clocks["trusted_never_held"] == 0,
        "{summary}\n{stderr}"
    );
    ensure!(
        field("lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field("holding_at_end")? == DEVICES, "{summary}\n{stderr}");
    Ok(())
}
