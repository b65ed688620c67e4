//! Randomness as the hub draws it (token ids, refresh grants, grant families), injectable
//! so tests can make it reproducible.

use std::sync::Mutex;

use tessera_shared::crypto::sha256;

/// A source of random bytes.
pub trait Rng: Send + Sync + 'static {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]) -> Result<(), RngError>;
}

/// The operating system's generator failed.
#[derive(Debug, thiserror::Error)]
#[error("random number generator: {0}")]
pub struct RngError(String);

/// The operating system's cryptographically secure generator: what the hub uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRng;

impl Rng for OsRng {
    fn fill(&self, buf: &mut [u8]) -> Result<(), RngError> {
        getrandom::fill(buf).map_err(|e| RngError(e.to_string()))
    }
}

/// A reproducible stream of bytes from a seed, **for tests only**: block `i` is
/// SHA-256(seed ‖ i), so the same seed gives the same tokens ids and grants, and anyone who
/// knows the seed knows them all.
#[derive(Debug)]
pub struct SeededRng {
    seed: [u8; 32],
    next: Mutex<u64>,
}

impl SeededRng {
    /// A stream determined by `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            next: Mutex::new(0),
        }
    }
}

impl Rng for SeededRng {
    fn fill(&self, buf: &mut [u8]) -> Result<(), RngError> {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for chunk in buf.chunks_mut(32) {
            let block = sha256(&[&self.seed, &next.to_be_bytes()]);
            chunk.copy_from_slice(&block[..chunk.len()]);
            *next += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(rng: &dyn Rng, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        rng.fill(&mut buf).expect("fill");
        buf
    }

    #[test]
    fn a_seed_gives_the_same_stream_and_another_seed_another() {
        let (a, b, c) = (
            SeededRng::new([1; 32]),
            SeededRng::new([1; 32]),
            SeededRng::new([2; 32]),
        );
        let first = draw(&a, 48);
        assert_eq!(first, draw(&b, 48));
        assert_ne!(first, draw(&c, 48));
        assert_ne!(draw(&a, 48), first, "the stream moves on");
    }

    #[test]
    fn the_os_generator_does_not_repeat_itself() {
        assert_ne!(draw(&OsRng, 32), draw(&OsRng, 32));
    }
}
