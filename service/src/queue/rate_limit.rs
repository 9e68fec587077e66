//! Global rate limits: at most N claims in any window of a period, across
//! every worker of a deployment.
//!
//! Celery's `rate_limit` is a token bucket in each worker: four workers with
//! `10/s` run 40 a second. A Tidepool limit is decided in the claim
//! statement itself ([`crate::queue::sql::claim_limited`]): the limit's row
//! in `tidepool_rate_limits` holds the claim times of the latest window (a
//! sliding log), and a claim locks it, claims what fits and appends. So no
//! window of the period, wherever it starts, holds more than `max_claims`
//! claims, whichever workers made them.
//!
//! A limit is on a task (`Task::RATE_LIMIT`, every job of the task in
//! whatever queue) or on a queue ([`crate::task::Registry::rate_limit_queue`],
//! every job claimed from it). It counts **claims**: every attempt, retries
//! included, because each attempt is the work the limit protects (an API
//! called again). Jobs that wait for a limit stay available and due: they
//! show in `tidepool_queue_available_jobs` and the oldest-job age, and are
//! not failures; a worker whose claim found a limit full sleeps until its
//! oldest claim leaves the window, not a whole poll interval.
//!
//! Limits are declared by the workers whose application has them (at start
//! and every 30 s, in the maintenance loop); one no worker declares for 10
//! minutes is forgotten, and until the first declaration a limited queue or
//! task is not claimed at all. Two versions of an application with different
//! numbers for one limit: the one that declared last holds.
//!
//! ```
//! use std::time::Duration;
//! use tidepool::queue::rate_limit::RateLimit;
//!
//! let limit = RateLimit::per(20, Duration::from_secs(1));
//! assert_eq!(limit.validate(), Ok(()));
//! assert!(RateLimit::per(0, Duration::from_secs(1)).validate().is_err());
//! ```

use std::time::Duration;

/// Most claims a limit allows in one period (the log's length).
pub const MAX_CLAIMS: u32 = 10_000;
/// Shortest period.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);
/// Longest period.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// At most `max_claims` claims in any window of `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    max_claims: u32,
    period: Duration,
}

/// A limit out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRateLimit {
    /// Zero claims, or more than the log holds.
    #[error("a rate limit allows 1 to {MAX_CLAIMS} claims per period, got {0}")]
    Claims(u32),
    /// The period is out of bounds.
    #[error("a rate limit's period is 100ms to 24h, got {}", humantime::format_duration(*.0))]
    Period(Duration),
}

impl RateLimit {
    /// `max_claims` per `period`; checked when it is registered
    /// ([`RateLimit::validate`]).
    pub const fn per(max_claims: u32, period: Duration) -> Self {
        Self { max_claims, period }
    }

    /// `max_claims` a second.
    pub const fn per_second(max_claims: u32) -> Self {
        Self::per(max_claims, Duration::from_secs(1))
    }

    /// `max_claims` a minute.
    pub const fn per_minute(max_claims: u32) -> Self {
        Self::per(max_claims, Duration::from_secs(60))
    }

    /// Claims allowed per period.
    pub fn max_claims(&self) -> u32 {
        self.max_claims
    }

    /// The window's length.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Whether it is within bounds (whole milliseconds are kept).
    pub fn validate(&self) -> Result<(), InvalidRateLimit> {
        if !(1..=MAX_CLAIMS).contains(&self.max_claims) {
            return Err(InvalidRateLimit::Claims(self.max_claims));
        }
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&self.period) {
            return Err(InvalidRateLimit::Period(self.period));
        }
        Ok(())
    }
}

/// The row of task `name`'s limit.
pub fn task_key(name: &str) -> String {
    format!("task:{name}")
}

/// The row of queue `queue`'s limit.
pub fn queue_key(queue: &str) -> String {
    format!("queue:{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let second = Duration::from_secs(1);
        assert_eq!(RateLimit::per_second(1).validate(), Ok(()));
        assert_eq!(RateLimit::per(MAX_CLAIMS, MAX_PERIOD).validate(), Ok(()));
        assert_eq!(RateLimit::per(MAX_CLAIMS + 1, second).validate(), Err(InvalidRateLimit::Claims(10_001)));
        assert_eq!(RateLimit::per(0, second).validate(), Err(InvalidRateLimit::Claims(0)));
        let short = Duration::from_millis(99);
        assert_eq!(RateLimit::per(1, short).validate(), Err(InvalidRateLimit::Period(short)));
        let long = MAX_PERIOD + Duration::from_millis(1);
        let err = RateLimit::per(1, long).validate().map_err(|e| e.to_string());
        assert_eq!(err, Err("a rate limit's period is 100ms to 24h, got 1day 1ms".to_owned()));
        assert_eq!(RateLimit::per_minute(5).period(), Duration::from_secs(60));
        assert_eq!((task_key("a"), queue_key("b")), ("task:a".to_owned(), "queue:b".to_owned()));
    }
}
