//! The Tessera device agent (`tessera-agent`): the tokio shell around the protocol core's
//! sans-I/O state machine ([`tessera_shared::agent`]).
//!
//! It enrolls the device's key with the hub, keeps a valid device token at all times
//! (refreshing at a jittered point, backing off on failure), keeps tokens and grants only in
//! an encrypted, rollback-checked store, follows the hub's key set, revocation list and
//! control messages (wiping and stopping when the device is revoked), and checks the
//! presentations apps make to the device. Device programs reach it over a local Unix socket.
//!
//! - [`config`]: the TOML configuration, environment and flag overrides.
//! - [`identity`]: the device key, the hub's trust anchor and the device secret.
//! - [`store`]: the encrypted record on disk and its rollback counter.
//! - [`lock`]: the single-instance lock on the state directory.
//! - [`shell`]: the event loop that drives the state machine over MQTT.
//! - [`local`]: the socket and its line protocol.
//! - [`status`]: what `status` reports.
//! - [`metrics`]: the same facts as Prometheus metrics (`status --prometheus`, the textfile).
//! - [`system`]: the wall clock and the OS random number generator the core takes as inputs.
//! - [`error`]: the error type and the process exit codes.
//!
//! `docs/DEVICE.md` is the operator's guide.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod identity;
pub mod local;
pub mod lock;
pub mod metrics;
pub mod shell;
pub mod status;
pub mod store;
pub mod system;

pub use error::{Error, exit};
