//! When to refresh a token, and when to retry after a failed attempt.
//!
//! Pure functions of plain values: times are milliseconds since the Unix epoch (tests run
//! tokens that live a few seconds, so seconds would be too coarse), and randomness is a
//! `u32` the caller draws from its own RNG. Nothing here reads a clock.

/// Shortest delay [`Backoff::retry_at`] ever schedules, in milliseconds.
///
/// Full jitter can draw a delay of zero, and the clamp towards a token's expiry shrinks
/// the window as expiry nears; without a floor both would turn into a hot loop that floods
/// the broker exactly when the hub is struggling.
pub const MIN_RETRY_DELAY_MS: u64 = 100;

/// When to refresh a token issued at `issued_at_ms` that expires at `expires_at_ms`: a point
/// between 50 % and 75 % of its lifetime, chosen by `jitter` (0 gives 50 %, `u32::MAX`
/// gives 75 %, values between spread uniformly).
///
/// Refreshing at half the lifetime leaves the other half for retries if the hub is
/// unreachable; the jitter spreads a fleet that booted, and so was issued tokens, together,
/// so its refreshes do not arrive at the hub as one burst. A token that is already expired
/// or has no lifetime (`expires_at_ms <= issued_at_ms`) is refreshed at once, at
/// `issued_at_ms`; the result is never before `issued_at_ms`.
pub fn refresh_at(issued_at_ms: u64, expires_at_ms: u64, jitter: u32) -> u64 {
    let lifetime = expires_at_ms.saturating_sub(issued_at_ms);
    let earliest = lifetime / 2;
    let latest = earliest + lifetime / 4;
    issued_at_ms.saturating_add(earliest + scale(latest - earliest, jitter))
}

/// Capped exponential backoff with full jitter, for retrying a failed refresh or enrollment.
///
/// Full jitter (a uniform delay between zero and the current limit) rather than a fixed
/// delay keeps devices that failed together (say, when the hub restarted) from retrying
/// together and knocking it over again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Limit of the first retry's delay; each further attempt doubles it.
    pub base_ms: u64,
    /// Largest delay ever drawn, however many attempts have failed.
    pub cap_ms: u64,
}

impl Default for Backoff {
    /// 500 ms doubling to a cap of 60 s: quick enough to ride out a blip, and a minute apart
    /// at worst, which a 15-minute token survives many times over.
    fn default() -> Self {
        Self {
            base_ms: 500,
            cap_ms: 60_000,
        }
    }
}

impl Backoff {
    /// The upper end of the delay window for retry number `attempt` (0 for the first retry
    /// after a failure): `min(cap_ms, base_ms * 2^attempt)`, without overflow for any
    /// `attempt`.
    pub fn limit_ms(&self, attempt: u32) -> u64 {
        if self.base_ms == 0 {
            return 0;
        }
        let grown = 1u64
            .checked_shl(attempt)
            .and_then(|factor| self.base_ms.checked_mul(factor))
            .unwrap_or(u64::MAX);
        grown.min(self.cap_ms)
    }

    /// The delay before retry number `attempt`: uniform in `0..=limit_ms(attempt)`, chosen
    /// by `random` (0 gives 0, `u32::MAX` gives the limit).
    pub fn delay_ms(&self, attempt: u32, random: u32) -> u64 {
        scale(self.limit_ms(attempt), random)
    }

    /// When to make retry number `attempt` if the last attempt failed at `now_ms`.
    ///
    /// `token_expires_at_ms` is the expiry of the token the caller still holds, if any.
    /// While it is valid, the retry is drawn from no further than halfway to its expiry
    /// (with the same full jitter), and never sooner than [`MIN_RETRY_DELAY_MS`].
    pub fn retry_at(
        &self,
        now_ms: u64,
        attempt: u32,
        random: u32,
        token_expires_at_ms: Option<u64>,
    ) -> u64 {
        let mut limit = self.limit_ms(attempt);
        if let Some(remaining) = token_expires_at_ms
            .and_then(|expires| expires.checked_sub(now_ms))
            .filter(|remaining| *remaining > 0)
        {
            // The backoff alone can grow past the time the token has left: after a long
            // outage a device would sleep through the hub's return and let its token lapse.
            // Retrying at most halfway to expiry halves the remaining time on every failure,
            // so attempts keep coming, closer and closer together, until the token expires;
            // a hub that comes back at any point before then is asked again in time.
            limit = limit.min(remaining / 2);
        }
        now_ms.saturating_add(scale(limit, random).max(MIN_RETRY_DELAY_MS))
    }
}

/// `span * random / u32::MAX`: 0 maps to 0 and `u32::MAX` to `span` exactly, so the whole
/// `u32` range covers the closed interval `0..=span`.
fn scale(span: u64, random: u32) -> u64 {
    let scaled = u128::from(span) * u128::from(random) / u128::from(u32::MAX);
    // `random <= u32::MAX`, so `scaled <= span` and always fits.
    u64::try_from(scaled).unwrap_or(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn jitter_extremes_hit_both_ends_of_the_refresh_window() {
        assert_eq!(refresh_at(T0, T0 + 1000, 0), T0 + 500);
        assert_eq!(refresh_at(T0, T0 + 1000, u32::MAX), T0 + 750);
        assert_eq!(refresh_at(T0, T0 + 1000, u32::MAX / 2), T0 + 624);
    }

    #[test]
    fn jitter_spreads_a_fleet_across_the_window() {
        // Sixteen devices issued tokens at the same moment refresh at sixteen different
        // times when their jitter differs.
        let lifetime = 900_000;
        let mut times: std::vec::Vec<u64> = (0..16u32)
            .map(|i| refresh_at(T0, T0 + lifetime, i * (u32::MAX / 15)))
            .collect();
        times.dedup();
        assert_eq!(times.len(), 16);
        assert_eq!(times.first(), Some(&(T0 + lifetime / 2)));
        assert_eq!(times.last(), Some(&(T0 + lifetime * 3 / 4)));
    }

    #[test]
    fn a_token_without_lifetime_is_refreshed_at_its_issue_time() {
        assert_eq!(refresh_at(T0, T0, u32::MAX), T0);
        assert_eq!(refresh_at(T0, T0 - 1, u32::MAX), T0);
        assert_eq!(refresh_at(T0, 0, 12345), T0);
    }

    #[test]
    fn refresh_near_the_end_of_time_does_not_overflow() {
        assert_eq!(
            refresh_at(0, u64::MAX, u32::MAX),
            u64::MAX / 2 + u64::MAX / 4
        );
        let late = u64::MAX - 1000;
        assert_eq!(refresh_at(late, u64::MAX, u32::MAX), late + 750);
    }

    #[test]
    fn backoff_limit_doubles_per_attempt_until_the_cap() {
        let b = Backoff::default();
        let limits: std::vec::Vec<u64> = (0..9).map(|a| b.limit_ms(a)).collect();
        assert_eq!(
            limits,
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
    }

    #[test]
    fn backoff_delay_spans_zero_to_the_limit() {
        let b = Backoff::default();
        assert_eq!(b.delay_ms(3, 0), 0);
        assert_eq!(b.delay_ms(3, u32::MAX), 4000);
        assert_eq!(b.delay_ms(3, u32::MAX / 2), 1999);
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let b = Backoff {
            base_ms: u64::MAX / 3,
            cap_ms: u64::MAX,
        };
        assert_eq!(b.limit_ms(1), u64::MAX / 3 * 2);
        assert_eq!(b.limit_ms(2), u64::MAX);
        assert_eq!(b.limit_ms(63), u64::MAX);
        assert_eq!(b.limit_ms(64), u64::MAX);
        assert_eq!(b.limit_ms(u32::MAX), u64::MAX);
        assert_eq!(Backoff::default().limit_ms(u32::MAX), 60_000);
        assert_eq!(
            Backoff {
                base_ms: 0,
                cap_ms: 10
            }
            .limit_ms(u32::MAX),
            0
        );
    }

    #[test]
    fn retry_without_a_token_follows_the_backoff() {
        let b = Backoff::default();
        assert_eq!(b.retry_at(T0, 2, u32::MAX, None), T0 + 2000);
        // An expired token gives no reason to hurry either.
        assert_eq!(b.retry_at(T0, 2, u32::MAX, Some(T0)), T0 + 2000);
        assert_eq!(b.retry_at(T0, 2, u32::MAX, Some(T0 - 5)), T0 + 2000);
    }

    #[test]
    fn retry_is_clamped_to_halfway_before_the_token_expires() {
        let b = Backoff::default();
        // The backoff would wait up to 60 s; the token has 10 s left.
        assert_eq!(b.retry_at(T0, 20, u32::MAX, Some(T0 + 10_000)), T0 + 5000);
        assert_eq!(
            b.retry_at(T0, 20, 0, Some(T0 + 10_000)),
            T0 + MIN_RETRY_DELAY_MS
        );
        // Far from expiry the backoff's own limit is the smaller one.
        assert_eq!(b.retry_at(T0, 0, u32::MAX, Some(T0 + 900_000)), T0 + 500);
    }

    #[test]
    fn retry_is_never_sooner_than_the_floor() {
        let b = Backoff::default();
        assert_eq!(b.retry_at(T0, 0, 0, None), T0 + MIN_RETRY_DELAY_MS);
        assert_eq!(
            b.retry_at(T0, 9, u32::MAX, Some(T0 + 50)),
            T0 + MIN_RETRY_DELAY_MS
        );
    }

    #[test]
    fn retries_keep_coming_until_the_token_expires() {
        // However the jitter falls, a hub that returns while the token is still valid is
        // asked again before it lapses, unless it returns within the last two floors.
        let b = Backoff::default();
        let expires = T0 + 10_000;
        for random in [0, 1, u32::MAX / 3, u32::MAX / 2, u32::MAX] {
            let (mut now, mut attempt) = (T0, 0);
            loop {
                let next = b.retry_at(now, attempt, random, Some(expires));
                if next >= expires {
                    assert!(
                        now + 2 * MIN_RETRY_DELAY_MS >= expires,
                        "random {random}: last retry {} ms before expiry",
                        expires - now
                    );
                    break;
                }
                assert!(next - now <= (expires - now) / 2 || next - now == MIN_RETRY_DELAY_MS);
                now = next;
                attempt += 1;
            }
        }
    }

    proptest! {
        #[test]
        fn refresh_point_is_within_half_and_three_quarters_of_the_lifetime(
            issued in 0u64..=u64::MAX / 2,
            lifetime in 0u64..=u64::MAX / 2,
            jitter in any::<u32>(),
        ) {
            let at = refresh_at(issued, issued + lifetime, jitter);
            prop_assert!(at >= issued + lifetime / 2);
            prop_assert!(at <= issued + lifetime / 2 + lifetime / 4);
            prop_assert!(u128::from(at - issued) * 4 <= u128::from(lifetime) * 3);
        }

        #[test]
        fn refresh_point_grows_with_jitter(
            lifetime in 0u64..=u64::MAX / 2,
            a in any::<u32>(),
            b in any::<u32>(),
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(refresh_at(T0, T0 + lifetime, lo) <= refresh_at(T0, T0 + lifetime, hi));
        }

        #[test]
        fn backoff_delay_never_exceeds_the_cap_or_the_limit(
            base in any::<u64>(),
            cap in any::<u64>(),
            attempt in any::<u32>(),
            random in any::<u32>(),
        ) {
            let b = Backoff { base_ms: base, cap_ms: cap };
            let limit = b.limit_ms(attempt);
            prop_assert!(limit <= cap);
            prop_assert!(b.delay_ms(attempt, random) <= limit);
        }

        #[test]
        fn backoff_limit_never_shrinks_with_attempts(
            base in 0u64..=10_000_000,
            cap in any::<u64>(),
            attempt in 0u32..200,
        ) {
            let b = Backoff { base_ms: base, cap_ms: cap };
            prop_assert!(b.limit_ms(attempt) <= b.limit_ms(attempt + 1));
        }

        #[test]
        fn retry_is_never_later_than_halfway_to_a_valid_token_expiry(
            now in 0u64..=u64::MAX / 2,
            remaining in 1u64..=10_000_000,
            attempt in any::<u32>(),
            random in any::<u32>(),
        ) {
            let at = Backoff::default().retry_at(now, attempt, random, Some(now + remaining));
            prop_assert!(at >= now + MIN_RETRY_DELAY_MS);
            prop_assert!(at <= now + (remaining / 2).max(MIN_RETRY_DELAY_MS));
        }
    }
}
