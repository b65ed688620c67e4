//! Tessera firmware simulator: many simulated devices in one process, each running the
//! `shared` agent state machine ([`tessera_shared::agent::Agent`]) as firmware would, with
//! its own P-256 key, its own in-memory flash and its own MQTT connection, against a
//! Mosquitto and a `tessera-hub` that the simulator starts itself, or a running pair.
//!
//! - [`device`]: one simulated device: the machine, its flash, its clock, its connection,
//!   and what it saw (tokens, lapses, latencies, refusals, power cuts).
//! - [`flash`]: the simulated flash: sealed records in two slots, torn by power loss.
//! - [`clock`]: a device's own clock, off and drifting.
//! - [`attack`]: the `malicious` scenario's attacker and the book of verdicts.
//! - [`processes`]: the broker and the hub as child processes in a temporary directory,
//!   and where their binaries are found.
//! - [`external`]: a running broker and hub instead (`--hub-config`, `--broker`).
//! - [`usage`]: CPU time and memory of the hub, the broker and the simulator; the
//!   open-file limit.
//! - [`fleet`]: a whole run ([`fleet::run`]) and its [`fleet::Summary`].
//! - [`duration`]: `6s`, `10m`, `1h` on the command line.
//!
//! Scenarios: `steady`, `storm`, `hub-crash`, `broker-restart`, `revoke`, `clock-skew`,
//! `power-loss`, `malicious` (see README.md).

#![forbid(unsafe_code)]

pub mod attack;
pub mod clock;
pub mod device;
pub mod duration;
pub mod external;
pub mod flash;
pub mod fleet;
pub mod processes;
pub mod usage;

mod error;

pub use error::Error;
