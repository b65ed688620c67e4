//! End-to-end tests of whole binaries against a real Mosquitto. None yet.
