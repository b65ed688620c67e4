//! The agent's one error type, grouped by what an operator has to do about it, and the
//! process exit codes each category maps to.

use std::path::PathBuf;

/// Process exit codes of `tessera-agent`. Documented in `docs/DEVICE.md`; the systemd unit
/// there stops restarting on [`exit::NOT_ENROLLED`], [`exit::STORE`] and [`exit::REVOKED`],
/// which need an operator.
pub mod exit {
    /// Success; for `verify`, the presentation is accepted; for `status`, a valid token is held.
    pub const OK: u8 = 0;
    /// The command failed (a presentation refused, no valid token, the hub refused, a
    /// runtime error).
    pub const FAILURE: u8 = 1;
    /// Bad command line or configuration.
    pub const USAGE: u8 = 2;
    /// The device is not enrolled (no store): run `tessera-agent enroll`.
    pub const NOT_ENROLLED: u8 = 3;
    /// The encrypted store was tampered with, rolled back, or opened with the wrong key.
    pub const STORE: u8 = 4;
    /// The device is revoked: its tokens and grants are wiped; it needs re-provisioning.
    pub const REVOKED: u8 = 5;
}

/// Everything that can stop the agent or one of its commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file, an environment variable or a flag is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// A key file (device key, trust anchor, device secret) is missing or unreadable.
    #[error("{path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The encrypted store cannot be trusted or read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The store cannot be written: nothing the hub issues could be kept.
    #[error(
        "the token store cannot be written: {0}. Every token and refresh grant the hub issues \
         would be lost at the next restart: make the store writable (disk space, mount, \
         permissions) and start again"
    )]
    StoreNotWritable(#[source] crate::store::StoreError),
    /// Another process holds the state directory's lock ([`crate::lock`]).
    #[error(
        "state directory {} is in use: another tessera-agent{} holds its lock {}; only one \
         agent may use a state directory at a time: stop the other one first",
        dir.display(),
        holder.map_or(String::new(), |pid| format!(" (pid {pid})")),
        lock.display()
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, as it wrote it in the lock file.
        holder: Option<u32>,
    },
    /// No store: the device has not enrolled yet (or its store was removed on purpose).
    #[error("not enrolled: no token store at {0} (run `tessera-agent enroll`)")]
    NotEnrolled(PathBuf),
    /// The device was revoked by the hub; its tokens and grants were wiped.
    #[error("{0}")]
    Revoked(String),
    /// The broker connection could not be set up (TLS files, options).
    #[error("MQTT: {0}")]
    Mqtt(#[from] tessera_mqtt::MqttError),
    /// The local socket could not be served or reached.
    #[error("local socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The hub refused, or did not answer in time, during `enroll`.
    #[error("{0}")]
    Hub(String),
    /// The protocol core refused something (a local fault: the persisted state does not
    /// decode, the signer failed, too many actions).
    #[error("protocol core: {0}")]
    Core(tessera_shared::Error),
    /// The operating system's random number generator failed.
    #[error("random number generator: {0}")]
    Random(String),
    /// Another I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// The exit code this error ends the process with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => exit::USAGE,
            Error::NotEnrolled(_) => exit::NOT_ENROLLED,
            Error::Store(e) if e.is_integrity() => exit::STORE,
            Error::Revoked(_) => exit::REVOKED,
            _ => exit::FAILURE,
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
