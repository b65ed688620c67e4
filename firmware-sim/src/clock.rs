//! A simulated device's own clock: the real (system) clock plus a fixed offset and a
//! drift, as a device's crystal or RC oscillator and its real-time clock (or the lack of
//! one) would have it. The hub runs on the same machine, so the system clock is the hub's
//! time: the simulator judges lapses by it, the device's machine sees only its own clock.

use std::time::Duration;

use crate::device::now_ms;
use crate::flash::Dice;

/// Parts per million.
const PPM: i128 = 1_000_000;

/// One device's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceClock {
    /// Local minus real time at `start`, ms.
    pub offset_ms: i64,
    /// How much faster (positive) or slower the clock runs, parts per million.
    pub drift_ppm: i64,
    /// Real time (Unix ms) the drift is counted from.
    start: u64,
}

impl DeviceClock {
    /// The system clock itself.
    pub fn exact() -> Self {
        Self {
            offset_ms: 0,
            drift_ppm: 0,
            start: now_ms(),
        }
    }

    /// A clock right to within a `NTP`-disciplined device's error: up to ±200 ms off and
    /// ±100 ppm fast or slow. For devices that set `trust_local_clock`.
    pub fn disciplined(dice: &mut Dice) -> Self {
        Self {
            offset_ms: signed(dice, 200),
            drift_ppm: signed(dice, 100),
            start: now_ms(),
        }
    }

    /// A clock nobody set: a quarter of them count from zero (no real-time clock: time
    /// since boot, January 1970 to the machine), the rest are off by up to a day either
    /// way; each runs up to 2 % fast or slow (an RC oscillator).
    pub fn wrong(dice: &mut Dice) -> Self {
        let start = now_ms();
        let offset_ms = if dice.below(4) == 0 {
            i64::try_from(start).map_or(0, |s| -s)
        } else {
            signed(dice, 86_400_000)
        };
        Self {
            offset_ms,
            drift_ppm: signed(dice, 20_000),
            start,
        }
    }

    /// The local time now, ms.
    pub fn now(&self) -> u64 {
        self.local(now_ms())
    }

    /// The local time at real time `real_ms`.
    pub fn local(&self, real_ms: u64) -> u64 {
        let elapsed = i128::from(real_ms) - i128::from(self.start);
        let local = i128::from(real_ms)
            + i128::from(self.offset_ms)
            + elapsed * i128::from(self.drift_ppm) / PPM;
        u64::try_from(local.max(0)).unwrap_or(u64::MAX)
    }

    /// How long, in real time, until the local clock reads `at` (zero if it already does).
    pub fn real_until(&self, at: u64) -> Duration {
        let local_left = i128::from(at) - i128::from(self.now());
        if local_left <= 0 {
            return Duration::ZERO;
        }
        let real = local_left * PPM / (PPM + i128::from(self.drift_ppm)).max(1);
        Duration::from_millis(u64::try_from(real).unwrap_or(u64::MAX))
    }

    /// How far the clock is from real time now, ms (absolute).
    pub fn error_ms(&self) -> u64 {
        let real = now_ms();
        self.local(real).abs_diff(real)
    }
}

/// A number in `-max..=max`.
fn signed(dice: &mut Dice, max: u64) -> i64 {
    let span = max.saturating_mul(2).saturating_add(1);
    i64::try_from(dice.below(span)).unwrap_or(0) - i64::try_from(max).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drifting_clock_moves_away_from_real_time_at_its_rate() {
        let c = DeviceClock {
            offset_ms: 5_000,
            drift_ppm: 20_000,
            start: 1_000_000,
        };
        assert_eq!(c.local(1_000_000), 1_005_000);
        // 100 s later a clock 2 % fast has gained 2 s more.
        assert_eq!(c.local(1_100_000), 1_107_000);
        let slow = DeviceClock {
            drift_ppm: -20_000,
            ..c
        };
        assert_eq!(slow.local(1_100_000), 1_103_000);
    }

    #[test]
    fn wrong_clocks_are_off_and_disciplined_ones_nearly_right() {
        let mut dice = Dice::new(42);
        for _ in 0..200 {
            let good = DeviceClock::disciplined(&mut dice);
            assert!(good.offset_ms.abs() <= 200 && good.drift_ppm.abs() <= 100);
            let bad = DeviceClock::wrong(&mut dice);
            assert!(bad.drift_ppm.abs() <= 20_000);
        }
    }
}
