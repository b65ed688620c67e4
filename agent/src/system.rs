//! The two inputs the protocol core never reads itself: the wall clock and the operating
//! system's random number generator.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;

/// The local wall clock, milliseconds since the Unix epoch (0 before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 32 fresh bytes from the operating system's RNG, as every [`Agent::handle`] call takes.
///
/// [`Agent::handle`]: tessera_shared::agent::Agent::handle
pub fn random32() -> Result<[u8; 32], Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes)
}
