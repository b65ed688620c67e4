//! The nonces of recently accepted presentations, so that a presentation copied off the
//! wire is refused if it is shown to the device again within its freshness window.

use crate::message::NONCE_LEN;

/// Most presentation nonces remembered at once.
///
/// Each entry is 24 bytes. When the cache is full of entries still inside their window, the
/// oldest is forgotten and everything issued at or before it is refused from then on: the
/// cache fails closed (a burst of presentations may see some refused) rather than open.
pub const MAX_SEEN_PRESENTATIONS: usize = 32;

#[derive(Debug, Clone, Copy)]
struct Seen {
    nonce: [u8; NONCE_LEN],
    issued_at: u64,
}

/// A bounded replay cache for presentation nonces.
#[derive(Debug, Clone)]
pub(super) struct ReplayCache {
    seen: heapless::Vec<Seen, MAX_SEEN_PRESENTATIONS>,
    /// The latest `issued_at` of any nonce forgotten so far; anything issued at or before it
    /// might be one of them, so it is refused.
    floor: Option<u64>,
}

impl ReplayCache {
    pub(super) const fn new() -> Self {
        Self {
            seen: heapless::Vec::new(),
            floor: None,
        }
    }

    /// Admits a presentation's nonce the first time it is seen; `false` if it may be a
    /// replay. `now` and `window` (seconds) are those the presentation's freshness was
    /// checked with, so a nonce is kept for as long as its presentation could pass that check.
    pub(super) fn admit(
        &mut self,
        nonce: &[u8; NONCE_LEN],
        issued_at: u64,
        now: u64,
        window: u64,
    ) -> bool {
        let mut floor = self.floor;
        self.seen.retain(|s| {
            let live = s.issued_at.saturating_add(window) >= now;
            if !live {
                // Raising the floor too means a clock that steps back cannot revive it.
                floor = floor.max(Some(s.issued_at));
            }
            live
        });
        self.floor = floor;
        if self.floor.is_some_and(|f| issued_at <= f) || self.seen.iter().any(|s| s.nonce == *nonce)
        {
            return false;
        }
        if self.seen.is_full() {
            let oldest = self
                .seen
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.issued_at)
                .map(|(i, s)| (i, s.issued_at));
            if let Some((i, at)) = oldest {
                self.seen.swap_remove(i);
                self.floor = self.floor.max(Some(at));
            }
            if self.floor.is_some_and(|f| issued_at <= f) {
                return false;
            }
        }
        self.seen
            .push(Seen {
                nonce: *nonce,
                issued_at,
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn nonce(n: u32) -> [u8; NONCE_LEN] {
        let mut out = [0u8; NONCE_LEN];
        out[..4].copy_from_slice(&n.to_be_bytes());
        out
    }

    #[test]
    fn a_nonce_is_admitted_once_within_its_window() {
        let mut c = ReplayCache::new();
        assert!(c.admit(&nonce(1), NOW, NOW, 60));
        assert!(!c.admit(&nonce(1), NOW, NOW + 60, 60));
        assert!(c.admit(&nonce(2), NOW, NOW + 60, 60));
    }

    #[test]
    fn a_forgotten_nonce_stays_refused_even_if_the_clock_steps_back() {
        let mut c = ReplayCache::new();
        assert!(c.admit(&nonce(1), NOW, NOW, 60));
        // Forgotten once its window has passed...
        assert!(c.admit(&nonce(2), NOW + 100, NOW + 100, 60));
        // ...but a clock that steps back into the window does not bring it back.
        assert!(!c.admit(&nonce(1), NOW, NOW + 10, 60));
    }

    #[test]
    fn a_full_cache_fails_closed_for_what_it_forgot() {
        let mut c = ReplayCache::new();
        let n = u32::try_from(MAX_SEEN_PRESENTATIONS).expect("small");
        for i in 0..n {
            assert!(c.admit(&nonce(i), NOW + u64::from(i), NOW, 3600));
        }
        // One more evicts the oldest (issued at NOW); a replay of it is still refused.
        assert!(c.admit(&nonce(n), NOW + u64::from(n), NOW, 3600));
        assert!(!c.admit(&nonce(0), NOW, NOW, 3600));
        // Newer presentations keep being admitted.
        assert!(c.admit(&nonce(n + 1), NOW + u64::from(n) + 1, NOW, 3600));
    }
}
