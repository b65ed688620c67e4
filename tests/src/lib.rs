//! The end-to-end test harness: whole binaries against a real Mosquitto.
//!
//! - [`Broker`]: a `mosquitto` started by the test on a free loopback port with its own
//!   config (ACL, passwords, TLS), killed on drop; [`Broker::stop`] / [`Broker::restart`]
//!   for broker-restart tests. Never the shared broker on 127.0.0.1:1883.
//! - [`TestPki`]: a CA, server and client certificates generated with rcgen, as PEM files.
//! - [`MqttProbe`]: an MQTT v5 client (rumqttc, TCP_NODELAY, optional TLS) to publish,
//!   subscribe and `expect_message` in tests.
//! - [`ChildGuard`] and [`cargo_bin`]: run the workspace's binaries (`tessera-hub`, ...)
//!   and never leak them.
//! - [`free_port`], [`wait_for_port`]: loopback ports.
//! - [`agent`]: a real `tessera-agent` enrolled against a test hub.
//! - [`hub`]: a real `tessera-hub` (init, register, serve, kill, restart) and clients that
//!   talk to it, for the hub's end-to-end tests.
//! - [`flood`]: publishers, fast signing and measurements (RSS, database rows) for the
//!   hub's flood and burst tests.
//! - [`http`]: plain HTTP GETs and Prometheus series for the hub's listener.
//! - [`replicas`]: hub replicas on one PostgreSQL database of the test's own.
//! - [`python`]: the Python package (`pip install ./python`) in a venv, for Python apps.
//! - [`wait_until`], [`wait_until_every`], [`wait_until_blocking`]: bounded waits on an observable condition,
//!   instead of fixed sleeps.
//!
//! Everything binds and connects to 127.0.0.1 only. Waits are bounded: each has a timeout
//! of a few seconds and fails with diagnostics (the broker's log tail, the child's output).
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use tessera_tests::{Broker, QoS};
//!
//! let broker = Broker::start()?;
//! let mut watcher = broker.probe("watcher").await?;
//! watcher.subscribe_granted("tessera/v1/#", QoS::AtLeastOnce).await?;
//! let sender = broker.probe("sender").await?;
//! sender.publish("tessera/v1/events", QoS::AtLeastOnce, false, "hello").await?;
//! let message = watcher.expect_message("tessera/v1/events", Duration::from_secs(2)).await?;
//! assert_eq!(message.payload, b"hello");
//! # Ok(())
//! # }
//! ```
//!
//! Real processes and sockets run in real time: do not combine these with
//! `tokio::time::pause()`.

#![forbid(unsafe_code)]

pub mod agent;
pub mod broker;
pub mod flood;
pub mod http;
pub mod hub;
pub mod pki;
pub mod port;
pub mod probe;
pub mod process;
pub mod python;
pub mod replicas;
pub mod wait;

pub use broker::{Broker, BrokerBuilder};
pub use pki::{CertKeyFiles, TestPki};
pub use port::{free_port, wait_for_port};
pub use probe::{Message, MqttProbe, ProbeOptions, QoS, topic_matches};
pub use process::{ChildGuard, cargo_bin, cargo_bin_of, cargo_example};
pub use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
pub use rustix::process::Signal;
pub use wait::{wait_until, wait_until_blocking, wait_until_every};
