//! `firmware-sim run --scenario storm` end to end: 30 devices with 8-second tokens boot and
//! enroll at the same moment (no ramp), then refresh for 16 s; every one gets a token, none
//! lapses, all hold one at the end.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 30;

#[test]
fn a_fleet_booting_all_at_once_enrolls_and_never_lapses() -> Result<()> {
    // Bounded: 16 s of run plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "30",
            "--lifetime",
            "8s",
            "--duration",
            "16s",
            "--scenario",
            "storm",
        ],
        Duration::from_secs(120),
    )?;
    let field = |name: &str| field(&summary, name);
    ensure!(field("devices")? == DEVICES, "{summary}");
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    // All at once: (nearly) the whole fleet was in its enrollment exchange at the same
    // time; a ramp of 4 s would have had one or two at a time.
    ensure!(
        field("peak_refreshing")? >= DEVICES * 2 / 3,
        "the devices did not boot together: {summary}"
    );
    ensure!(field("never_held")? == 0, "{summary}\n{stderr}");
    ensure!(
        summary["all_holding_ms"].is_u64() && summary["first_token_ms"]["count"] == DEVICES,
        "{summary}"
    );
    ensure!(
        field("lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field("holding_at_end")? == DEVICES, "{summary}\n{stderr}");
    ensure!(field("min_tokens_per_device")? >= 2, "{summary}");
    ensure!(field("attacks_accepted")? == 0, "{summary}");
    Ok(())
}
