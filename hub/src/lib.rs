//! Tessera hub: issues short-lived, scoped, proof-of-possession tokens over MQTT and
//! broadcasts revocations.
//!
//! The request pipeline is decode → verify the sender's signature → freshness and nonce
//! reuse → per-client rate limit → policy → issue or refuse → record durably → respond.
//! Before it, every message passes the in-memory admission limit of the client id in its
//! topic ([`limiter`]), and the serving loop ([`server`]) queues it for a worker or, when
//! the queue is full, answers `overloaded`.

pub mod acl;
pub mod anomaly;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dashboard;
pub mod events;
pub mod http;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod policy_change;
pub mod revocation;
pub mod rng;
pub mod server;
pub mod store;
pub mod text;
pub mod webhooks;

/// The client library (crate `tessera-client`), which the CLI's remote commands use.
pub use tessera_client as client;
/// Key files in standard formats (the client library's: one implementation).
pub use tessera_client::keyfile;
/// The MQTT transport (re-exported: the hub's public API names its types).
pub use tessera_mqtt as mqtt;
