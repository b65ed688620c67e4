//! `firmware-sim run --scenario revoke` end to end: 30 devices with 8-second tokens; a
//! third of the way into a 20-second run an operator registered with `operator add --role
//! ops` revokes a fifth of them, three with one `revoke --group` and three with one
//! `revoke --device` each. Every revoked device wipes itself, no other device is told it
//! is revoked, and no device lapses.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 30;

#[test]
fn every_revoked_device_wipes_itself_and_the_rest_of_the_fleet_never_lapses() -> Result<()> {
    // Bounded: 20 s of run plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "30",
            "--lifetime",
            "8s",
            "--duration",
            "20s",
            "--revoke-share",
            "0.2",
            "--scenario",
            "revoke",
        ],
        Duration::from_secs(120),
    )?;
    ensure!(field(&summary, "devices")? == DEVICES, "{summary}");
    ensure!(
        field(&summary, "device_failures")? == 0,
        "{summary}\n{stderr}"
    );
    ensure!(field(&summary, "revoked")? == 6, "{summary}");
    ensure!(
        field(&summary, "revoked_wiped")? == 6,
        "a revoked device did not wipe itself: {summary}\n{stderr}"
    );
    ensure!(
        field(&summary, "revoked_flash_empty")? == 6,
        "a revoked device's flash still holds a record: {summary}"
    );
    ensure!(
        field(&summary, "revoked_unexpectedly")? == 0,
        "a device was revoked that the operator did not name: {summary}"
    );
    // Timed from the operator's request seen on the broker, one figure per device; the
    // hub answered each of the 4 commands.
    ensure!(summary["revocation_ack_ms"]["count"] == 4, "{summary}");
    ensure!(
        summary["revocation_fanout_ms"]["count"] == 6
            && summary["revocation_fanout_ms"]["p50"].is_u64()
            && summary["revocation_fanout_ms"]["p99"].is_u64(),
        "{summary}"
    );
    // Revoked devices lose their token on purpose; lapses count only the others.
    ensure!(
        field(&summary, "lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field(&summary, "never_held")? == 0, "{summary}");
    ensure!(
        field(&summary, "holding_at_end")? == DEVICES - 6,
        "not every device left unrevoked holds a token: {summary}"
    );
    ensure!(summary["hub_ran_throughout"] == true, "{summary}");
    Ok(())
}
