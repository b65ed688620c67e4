//! `firmware-sim run --scenario broker-restart` end to end: a third of the way into a 20-second run of 20
//! devices with 8-second tokens Mosquitto is stopped and started again on the same port
//! 3 s later; devices and hub reconnect, no device lapses beyond the outage and every one
//! holds a valid token at the end.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 20;

#[test]
fn a_fleet_rides_out_a_broker_restart_on_the_same_port_and_holds_tokens_again() -> Result<()> {
    // Bounded: 20 s of run (the fault at about 7 s, 3 s down) plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "20",
            "--lifetime",
            "8s",
            "--duration",
            "20s",
            "--outage",
            "3s",
            "--scenario",
            "broker-restart",
        ],
        Duration::from_secs(120),
    )?;
    ensure!(field(&summary, "devices")? == DEVICES, "{summary}");
    ensure!(
        field(&summary, "device_failures")? == 0,
        "{summary}\n{stderr}"
    );
    // Lapses while the broker was down (and one retry window after) are not counted;
    // any other is a fault of the fleet's.
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
    ensure!(summary["hub_ran_throughout"] == true, "{summary}");
    Ok(())
}
