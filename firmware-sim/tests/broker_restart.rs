//! `firmware-sim run --scenario broker-restart` end to end: a third of the way into a
//! 36-second run of 20 devices with 8-second tokens Mosquitto is stopped and started again
//! on the same port 3 s later; devices and hub reconnect, no device lapses beyond the
//! outage and every one holds a valid token at the end.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

#[test]
fn a_fleet_rides_out_a_broker_restart_on_the_same_port_and_holds_tokens_again() -> anyhow::Result<()>
{
    common::ride_out_outage("broker-restart", true)
}
