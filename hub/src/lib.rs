//! Tessera hub: issues scoped tokens over MQTT and broadcasts revocations. Not built out yet.
