//! The admission limiter: a token bucket per client id, in memory, that every message on
//! a request topic passes before anything else is done with it (no decoding, no signature
//! check, no store access, no queueing).
//!
//! The id is the one in the topic, which the broker's ACL ties to the client's
//! credentials, so one client can only spend its own bucket. Over its limit a client gets
//! one `rate_limited` answer per [`ANSWER_INTERVAL_MS`] and the rest of its messages are
//! dropped unanswered: answering each would have the hub sign for the attacker.
//!
//! Memory stays bounded whatever ids arrive (a broker without an ACL lets anyone publish
//! on any id's topic): at most [`MAX_TRACKED_CLIENTS`] buckets are kept. A bucket that has
//! filled up again is the same as a new one, so it is forgotten when room is needed. When
//! every bucket is still in use (an attacker keeping thousands of ids busy), ids without a
//! bucket share one overflow bucket, so many ids buy an attacker no more than one bucket's
//! worth, and the clients already tracked keep their own.
//!
//! The store keeps its own per-client limit (`requests.rate_burst`), shared by replicas
//! and charged only for requests whose signature verified; this one is cheaper and
//! coarser, and is there so that a flood costs the hub a hash lookup per message.
//!
//! Pure: the caller passes the time (milliseconds of a monotonic clock).

use std::collections::HashMap;

/// Buckets kept at most (each about 150 bytes with its id: 2.5 MB at most).
pub const MAX_TRACKED_CLIENTS: usize = 16_384;

/// A limited client gets at most one `rate_limited` answer in this many milliseconds.
pub const ANSWER_INTERVAL_MS: u64 = 1_000;

/// How often, at most, a full map is searched for buckets that filled up again.
const SWEEP_INTERVAL_MS: u64 = 1_000;

/// The limit: a burst, then a sustained rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Messages a client may send at once.
    pub burst: u32,
    /// Messages per second after that.
    pub per_second: f64,
}

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the client's limit: handle it.
    Admit,
    /// Over the limit, and the client was not told in the last [`ANSWER_INTERVAL_MS`]:
    /// answer `rate_limited` (without handling it).
    Refuse,
    /// Over the limit and already told: drop it unanswered.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    /// When the client was last answered `rate_limited`.
    refused_at_ms: Option<u64>,
}

impl Bucket {
    fn full(limit: Limit, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(limit.burst),
            at_ms: now_ms,
            refused_at_ms: None,
        }
    }

    fn refill(&mut self, limit: Limit, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        #[allow(clippy::cast_precision_loss)] // milliseconds: exact far beyond any uptime
        let earned = elapsed as f64 * limit.per_second / 1000.0;
        self.tokens = (self.tokens + earned).min(f64::from(limit.burst));
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn take(&mut self, limit: Limit, now_ms: u64) -> Admission {
        self.refill(limit, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admission::Admit;
        }
        match self.refused_at_ms {
            Some(at) if now_ms.saturating_sub(at) < ANSWER_INTERVAL_MS => Admission::Drop,
            _ => {
                self.refused_at_ms = Some(now_ms);
                Admission::Refuse
            }
        }
    }

    /// Whether forgetting it changes nothing: it is full again and the client may be
    /// answered again.
    fn is_idle(&self, limit: Limit, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(limit, now_ms);
        b.tokens >= f64::from(limit.burst)
            && self
                .refused_at_ms
                .is_none_or(|at| now_ms.saturating_sub(at) >= ANSWER_INTERVAL_MS)
    }
}

/// The buckets of the clients seen recently. See the module docs.
#[derive(Debug)]
pub struct Limiter {
    limit: Limit,
    max_clients: usize,
    buckets: HashMap<String, Bucket>,
    /// Shared by the ids that found the map full.
    overflow: Bucket,
    next_sweep_ms: u64,
}

impl Limiter {
    /// A limiter with this limit, tracking at most [`MAX_TRACKED_CLIENTS`] clients.
    pub fn new(limit: Limit) -> Self {
        Self::with_capacity(limit, MAX_TRACKED_CLIENTS)
    }

    /// A limiter tracking at most `max_clients` clients.
    pub fn with_capacity(limit: Limit, max_clients: usize) -> Self {
        Self {
            limit,
            max_clients: max_clients.max(1),
            buckets: HashMap::new(),
            overflow: Bucket::full(limit, 0),
            next_sweep_ms: 0,
        }
    }

    /// Charges one message of `client` at `now_ms`.
    pub fn admit(&mut self, client: &str, now_ms: u64) -> Admission {
        let limit = self.limit;
        if let Some(bucket) = self.buckets.get_mut(client) {
            return bucket.take(limit, now_ms);
        }
        if self.buckets.len() >= self.max_clients && now_ms >= self.next_sweep_ms {
            self.sweep(now_ms);
            self.next_sweep_ms = now_ms.saturating_add(SWEEP_INTERVAL_MS);
        }
        if self.buckets.len() >= self.max_clients {
            return self.overflow.take(limit, now_ms);
        }
        let mut bucket = Bucket::full(limit, now_ms);
        let admission = bucket.take(limit, now_ms);
        self.buckets.insert(client.to_owned(), bucket);
        admission
    }

    /// Forgets the buckets that filled up again (nothing is lost: a new bucket is full).
    pub fn sweep(&mut self, now_ms: u64) {
        let limit = self.limit;
        self.buckets.retain(|_, b| !b.is_idle(limit, now_ms));
        if self.buckets.capacity() > 2 * self.buckets.len().max(64) {
            self.buckets.shrink_to_fit();
        }
    }

    /// How many clients have a bucket now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        burst: 3,
        per_second: 2.0,
    };

    fn outcomes(limiter: &mut Limiter, client: &str, n: usize, now_ms: u64) -> Vec<Admission> {
        (0..n).map(|_| limiter.admit(client, now_ms)).collect()
    }

    #[test]
    fn a_client_gets_its_burst_then_one_refusal_then_nothing_until_the_next_interval() {
        use Admission::*;
        let mut limiter = Limiter::new(LIMIT);
        assert_eq!(
            outcomes(&mut limiter, "app", 6, 0),
            [Admit, Admit, Admit, Refuse, Drop, Drop]
        );
        // Half a second: one token back (2 per second), no new answer yet.
        assert_eq!(outcomes(&mut limiter, "app", 2, 500), [Admit, Drop]);
        // A second after the refusal: answered once more.
        assert_eq!(outcomes(&mut limiter, "app", 2, 1000), [Admit, Refuse]);
    }

    #[test]
    fn one_clients_flood_leaves_the_others_their_own_burst() {
        let mut limiter = Limiter::new(LIMIT);
        for _ in 0..10_000 {
            limiter.admit("attacker", 0);
        }
        assert_eq!(
            outcomes(&mut limiter, "device", 3, 0),
            [Admission::Admit; 3]
        );
    }

    #[test]
    fn a_flood_of_new_ids_shares_one_bucket_once_the_map_is_full_and_tracked_clients_keep_theirs() {
        let mut limiter = Limiter::with_capacity(LIMIT, 4);
        limiter.admit("device", 0);
        let mut admitted = 0;
        let mut refused = 0;
        for i in 0..10_000 {
            match limiter.admit(&format!("id-{i}"), 0) {
                Admission::Admit => admitted += 1,
                Admission::Refuse => refused += 1,
                Admission::Drop => {}
            }
        }
        assert_eq!(limiter.tracked(), 4, "memory stays bounded");
        // Three ids got their own bucket; the rest shared the overflow bucket's burst and
        // its one refusal.
        assert_eq!((admitted, refused), (3 + 3, 1));
        // The tracked client is unaffected.
        assert_eq!(limiter.admit("device", 0), Admission::Admit);
    }

    #[test]
    fn buckets_that_filled_up_again_are_forgotten_to_make_room_and_nothing_changes_for_them() {
        let mut limiter = Limiter::with_capacity(LIMIT, 2);
        limiter.admit("a", 0);
        limiter.admit("b", 0);
        // Two seconds later both are full again: "c" takes a freed place.
        assert_eq!(limiter.admit("c", 2_000), Admission::Admit);
        assert!(limiter.tracked() <= 2);
        assert_eq!(
            outcomes(&mut limiter, "a", 3, 2_000),
            [Admission::Admit; 3],
            "a forgotten client starts with a full bucket, as it had"
        );
    }

    #[test]
    fn a_clock_that_does_not_move_forward_earns_nothing() {
        let mut limiter = Limiter::new(LIMIT);
        outcomes(&mut limiter, "app", 3, 5_000);
        assert_eq!(limiter.admit("app", 4_000), Admission::Refuse);
        assert_eq!(limiter.admit("app", 4_500), Admission::Drop);
    }
}
