//! Tessera firmware simulator: many simulated devices in one process, each running the
//! `shared` agent state machine ([`tessera_shared::agent::Agent`]) as firmware would, with
//! its own P-256 key, its own in-memory flash and its own MQTT connection, against a
//! Mosquitto and a `tessera-hub` that the simulator starts itself.
//!
//! - [`device`]: one simulated device: the machine, its flash, its connection, and what it
//!   saw (tokens, lapses, latencies, refusals).
//! - [`processes`]: the broker and the hub as child processes in a temporary directory,
//!   and where their binaries are found.
//! - [`fleet`]: a whole run ([`fleet::run`]) and its [`fleet::Summary`].
//! - [`duration`]: `6s`, `10m`, `1h` on the command line.
//!
//! Scenarios so far: `steady`, `hub-crash`, `broker-restart`, `revoke` (see README.md).

#![forbid(unsafe_code)]

pub mod device;
pub mod duration;
pub mod fleet;
pub mod processes;

mod error;

pub use error::Error;
