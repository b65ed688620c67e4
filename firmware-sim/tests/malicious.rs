//! `firmware-sim run --scenario malicious` end to end: 20 devices with 8-second tokens for
//! 16 s; from a third of the way in, a compromised device of the fleet (`sim-mallory`)
//! replays requests, responses and presentations, forges tokens and control messages,
//! presents a stolen refresh grant and a stolen access token, sends requests in other
//! devices' names and floods the hub (see `src/attack.rs`). Every kind of attack is tried
//! and rejected, for its own reason where the machine or the hub names one, none is
//! accepted, the app's genuine presentations pass, no device obeys the forged revocation,
//! and no device lapses.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{field, run_sim};

const DEVICES: u64 = 20;

const KINDS: [&str; 9] = [
    "replay",
    "impersonation",
    "stolen_grant",
    "stolen_token",
    "forged_token",
    "forged_control",
    "replayed_response",
    "replayed_presentation",
    "flood",
];

#[test]
fn every_attack_is_rejected_and_the_fleet_keeps_its_tokens() -> Result<()> {
    // Bounded: 16 s of run plus setup and teardown.
    let (summary, stderr) = run_sim(
        &[
            "--devices",
            "20",
            "--lifetime",
            "8s",
            "--duration",
            "16s",
            "--scenario",
            "malicious",
        ],
        Duration::from_secs(120),
    )?;
    let field = |name: &str| field(&summary, name);
    ensure!(field("devices")? == DEVICES, "{summary}");
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    ensure!(
        field("attacks_accepted")? == 0,
        "an attack was accepted: {summary}\n{stderr}"
    );
    for kind in KINDS {
        let v = &summary["attacks"][kind];
        ensure!(
            v["rejected"].as_u64().is_some_and(|n| n >= 1) && v["accepted"] == 0,
            "attack `{kind}` was not tried and rejected: {summary}\n{stderr}"
        );
    }
    ensure!(
        field("attacks_rejected")? >= KINDS.len() as u64,
        "{summary}"
    );
    // The victims accept the app's own presentations (the control), and refuse the
    // others for the reason each attack should meet: a token presented with another key,
    // a presentation seen before.
    ensure!(
        summary["presentations_legit"]["accepted"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "no genuine presentation passed, so the refusals prove nothing: {summary}\n{stderr}"
    );
    for (kind, code) in [
        ("stolen_token", "proof_of_possession"),
        ("replayed_presentation", "presentation_replayed"),
        ("replay", "replay"),
        ("impersonation", "bad_signature"),
    ] {
        ensure!(
            summary["attacks"][kind]["codes"][code]
                .as_u64()
                .is_some_and(|n| n >= 1),
            "`{kind}` was never refused as `{code}`: {summary}"
        );
    }
    // The forged `Revoked` control message was not obeyed.
    ensure!(field("revoked_unexpectedly")? == 0, "{summary}\n{stderr}");
    ensure!(field("never_held")? == 0, "{summary}\n{stderr}");
    ensure!(
        field("lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field("holding_at_end")? == DEVICES, "{summary}\n{stderr}");
    ensure!(summary["hub_ran_throughout"] == true, "{summary}");
    Ok(())
}
