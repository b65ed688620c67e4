//! Tessera protocol core.
//!
//! Everything the hub, the agent and firmware must agree on, byte for byte: CBOR Web Tokens
//! (RFC 8392) in COSE_Sign1 (RFC 9052) signed with ES256, the signed request and response
//! envelopes and every protocol message, the revocation list, the refresh schedule, the
//! encrypted record format of the device store, and the agent's sans-I/O state machine.
//!
//! The crate is `#![no_std]` and never allocates. It never reads a clock, a random number
//! generator, the network or a disk: callers pass `now` (Unix seconds), random bytes and
//! keys in, so every rule about time and randomness is testable with plain values.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(any(feature = "std", test))]
extern crate std;

pub mod agent;
mod cbor;
pub mod claims;
pub mod cose;
pub mod crypto;
pub mod error;
pub mod keyset;
pub mod message;
pub mod record;
pub mod revocation;
pub mod schedule;
pub mod scope;
pub mod token;
pub mod topic;

pub use error::Error;

/// Longest client identifier (device, app, operator or hub id) in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 64;
