//! The simulator's one error type.

use std::path::PathBuf;

/// What can stop a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the run could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A binary the run needs (Mosquitto, `tessera-hub`) is not where it was looked for.
    #[error("cannot find {name}: {looked}")]
    BinaryNotFound {
        /// The binary.
        name: String,
        /// Where it was looked for, and how to point at it.
        looked: String,
    },
    /// A child process (Mosquitto, `tessera-hub`) failed to start or did what was not
    /// expected; the message holds the tail of its log.
    #[error("{0}")]
    Process(String),
    /// The protocol core refused something (a device id, a key, an event).
    #[error("protocol core: {0}")]
    Core(tessera_shared::Error),
    /// A device's MQTT connection could not be set up.
    #[error("MQTT: {0}")]
    Mqtt(#[from] tessera_mqtt::MqttError),
    /// The operating system's random number generator failed.
    #[error("random number generator: {0}")]
    Random(getrandom::Error),
}

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::File { path, source }
    }
}
