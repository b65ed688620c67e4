//! `firmware-sim run --scenario power-loss` end to end: 20 devices with 8-second tokens for
//! 16 s, the power failing during 30 % of their flash writes. Each cut tears the record
//! being written; the device boots again from what its flash reads back (the previous
//! record: a token that may still be valid and a spent grant) and recovers through the
//! machine's own rules. No store is lost, no device lapses while powered, and every device
//! holds a token at the end unless the end caught it off or just booted.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 20;

#[test]
fn devices_whose_flash_writes_are_cut_boot_from_the_previous_record_and_recover() -> Result<()> {
    // Bounded: 16 s of run plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "20",
            "--lifetime",
            "8s",
            "--duration",
            "16s",
            "--power-cut-rate",
            "0.3",
            "--scenario",
            "power-loss",
        ],
        Duration::from_secs(120),
    )?;
    let field = |name: &str| field(&summary, name);
    let power = &summary["power"];
    let count = |name: &str| power[name].as_u64().unwrap_or(0);
    ensure!(field("devices")? == DEVICES, "{summary}");
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    // About 5 writes per device (enrollment, tokens, key set) at 30 %: some 30 cuts.
    ensure!(count("cuts") >= 3, "too few power cuts: {summary}");
    ensure!(
        power["recovery_ms"]["count"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "no device came back to a valid token after a cut: {summary}\n{stderr}"
    );
    ensure!(
        count("flash_lost") == 0,
        "a torn write lost a store: {summary}"
    );
    ensure!(field("never_held")? == 0, "{summary}\n{stderr}");
    ensure!(
        field("lapses")? == 0,
        "a powered device lapsed: {summary}\n{stderr}"
    );
    ensure!(
        field("holding_at_end")? + count("off_at_end") == DEVICES,
        "a device did not recover: {summary}\n{stderr}"
    );
    Ok(())
}
