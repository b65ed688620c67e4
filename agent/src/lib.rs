//! Tessera device agent: keeps a valid device token, encrypted at rest. Not built out yet.
