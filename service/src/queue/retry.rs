//! Backoff between attempts: exponential, capped, with jitter.

use std::time::Duration;

/// How long a failed job waits before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay after attempt `attempt` (from 1) failed: `base · 2^(attempt−1)`,
    /// capped at `max`, then "equal jitter": half of it fixed, the other half
    /// scaled by `unit_random` (from [0, 1)), so jobs that failed together
    /// (a database blip) do not all come back at the same instant.
    pub fn delay(&self, attempt: i32, unit_random: f64) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(30);
        let full = self.base.saturating_mul(1 << exponent).min(self.max);
        let half = full / 2;
        half + half.mul_f64(unit_random.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(60) };

    #[test]
    fn doubles_per_attempt_until_the_cap() {
        let at_most = |attempt| POLICY.delay(attempt, 1.0);
        assert_eq!(at_most(1), Duration::from_secs(1));
        assert_eq!(at_most(2), Duration::from_secs(2));
        assert_eq!(at_most(3), Duration::from_secs(4));
        assert_eq!(at_most(6), Duration::from_secs(32));
        assert_eq!(at_most(7), Duration::from_secs(60));
        assert_eq!(at_most(100), Duration::from_secs(60));
        assert_eq!(at_most(i32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_keeps_at_least_half() {
        for attempt in 1..40 {
            let low = POLICY.delay(attempt, 0.0);
            let high = POLICY.delay(attempt, 1.0);
            assert_eq!(low * 2, high, "attempt {attempt}");
            let mid = POLICY.delay(attempt, 0.5);
            assert!(low < mid && mid < high, "attempt {attempt}");
        }
        assert_eq!(POLICY.delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(POLICY.delay(-5, 7.0), Duration::from_secs(1));
    }
}
