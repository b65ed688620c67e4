//! `firmware-sim run --scenario hub-crash` end to end: a third of the way into a 36-second
//! run of 20 devices with 8-second tokens the hub is killed with SIGKILL and started again
//! 3 s later; no device lapses beyond the outage and every one holds a valid token at the
//! end.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

#[test]
fn a_fleet_rides_out_a_hub_killed_and_restarted_and_holds_tokens_again() -> anyhow::Result<()> {
    common::ride_out_outage("hub-crash", false)
}
