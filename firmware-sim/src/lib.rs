//! Tessera firmware simulator: many devices running the `shared` core. Not built out yet.
