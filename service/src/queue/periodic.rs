//! Periodic tasks: a schedule declared in an application's code, run by
//! whichever workers have it, with no singleton.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # use tidepool::task::{Task, TaskContext, TaskError};
//! # #[derive(Serialize, Deserialize)] struct NightlyReport { top: u32 }
//! # impl Task for NightlyReport {
//! #     const NAME: &'static str = "nightly_report";
//! #     type State = (); type Output = ();
//! #     async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> { Ok(()) }
//! # }
//! use std::time::Duration;
//! use tidepool::queue::periodic::{Cadence, Missed, Periodic};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let nightly = Periodic::new(
//!     "nightly_report",
//!     Cadence::cron("30 2 * * *", chrono_tz::Europe::Berlin)?,
//!     &NightlyReport { top: 10 },
//! )?
//! .missed(Missed::RunOnce);
//! let app = tidepool::Application::new("shop").task::<NightlyReport>().periodic(nightly);
//! # Ok(())
//! # }
//! ```
//!
//! **Exactly once per occurrence.** An occurrence is a schedule's name and
//! the instant it names. The schedule's row in `tidepool_schedules` holds a
//! cursor, the latest occurrence settled; a worker enqueues occurrences
//! only by moving the cursor forward from the value it read, in the same
//! statement that inserts their jobs and their rows in
//! `tidepool_occurrences` (primary key: schedule and instant), and only for
//! instants at or before the *database's* `now()`. Two workers that read
//! the same cursor race on one row: the first moves it and the second finds
//! it moved and writes nothing. So every worker may check every schedule,
//! any may die at any point, their clocks may disagree, and no occurrence
//! is enqueued twice or before its time. A worker's own clock only decides
//! when it next looks, corrected by the database's clock at every look.
//!
//! **Deploys.** A worker declares its schedules when it starts and every
//! [`DECLARE_EVERY`]; a row no worker has declared for [`FORGET_AFTER`] is
//! deleted, so a schedule removed from the code goes away by itself. A
//! changed schedule keeps its cursor: the new version's occurrences follow
//! the last one settled. While old and new workers both run, each enqueues
//! the next occurrence of its own version after the shared cursor, and the
//! cursor still moves only forward: no occurrence runs twice.
//!
//! **Missed occurrences.** An occurrence is on time while it is at most its
//! schedule's grace ([`DEFAULT_GRACE`] unless set) old; older ones found
//! after downtime are missed and follow [`Missed`]. Both are counted in the
//! schedule's row and in `tidepool_schedule_missed_occurrences`.
//!
//! The time rules of cron schedules are [`super::cron`]'s; interval
//! schedules ([`Cadence::every`]) fall on whole multiples of their period
//! since the Unix epoch, in UTC, so every worker agrees on them.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::cron::{Cron, CronError};
use super::job::{InvalidJob, NewJob};
use super::EnqueueOptions;
use crate::task::Task;

/// How long an occurrence stays on time: due, not yet missed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// The longest grace and the longest interval a schedule may have.
pub const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Most missed occurrences [`Missed::RunEach`] runs.
pub const MAX_RUN_EACH: u32 = 1_000;
/// Most occurrences one look enqueues for one schedule; more wait for the
/// next look, at once.
pub const MAX_RUNS_PER_LOOK: usize = 1_000;
/// Most occurrences one look walks through for one schedule (a one-second
/// schedule after three hours down); the rest are walked at the next look.
const MAX_WALK: usize = 10_000;
/// How often a worker declares its schedules and its rate limits again.
pub const DECLARE_EVERY: Duration = Duration::from_secs(30);
/// A schedule no worker has declared for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Longest schedule name.
pub const MAX_NAME_BYTES: usize = 128;

/// Whether what a worker declared at `declared` (`None`: never) is due to be
/// declared again, [`DECLARE_EVERY`] later.
pub(crate) fn declaration_due(declared: Option<std::time::Instant>) -> bool {
    declared.map_or(true, |at| at.elapsed() >= DECLARE_EVERY)
}

/// When a schedule's occurrences fall.
#[derive(Clone, PartialEq, Eq)]
pub enum Cadence {
    /// The instants a cron expression names in a time zone.
    Cron(Cron),
    /// Every whole multiple of the period since the Unix epoch.
    Every(Duration),
}

impl fmt::Debug for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Cadence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cron(cron) => write!(f, "cron {cron}"),
            Self::Every(period) => write!(f, "every {}", humantime::format_duration(*period)),
        }
    }
}

impl Cadence {
    /// A cron expression (see [`super::cron`]) read in `zone`.
    pub fn cron(expression: &str, zone: Tz) -> Result<Self, CronError> {
        Cron::parse(expression, zone).map(Self::Cron)
    }

    /// Every `period`: a whole number of seconds, from one second to a day.
    pub fn every(period: Duration) -> Result<Self, InvalidPeriodic> {
        if period < Duration::from_secs(1) || period > MAX_GRACE || period.subsec_nanos() != 0 {
            return Err(InvalidPeriodic::Period(period));
        }
        Ok(Self::Every(period))
    }

    /// The first occurrence after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron(cron) => cron.next_after(after),
            Self::Every(period) => {
                let period = i64::try_from(period.as_millis()).ok()?;
                let millis = after.timestamp_millis();
                let next = (millis.div_euclid(period) + 1).checked_mul(period)?;
                DateTime::from_timestamp_millis(next)
            }
        }
    }
}

/// What becomes of occurrences missed while no worker could enqueue them
/// (older than the schedule's grace when first seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// None of them runs.
    Skip,
    /// The latest of them runs, once; the rest are skipped. Celery beat's
    /// behaviour.
    #[default]
    RunOnce,
    /// The latest `at_most` of them run (up to [`MAX_RUN_EACH`]), each as
    /// its own job; older ones are skipped.
    RunEach {
        /// How many at most.
        at_most: u32,
    },
}

/// Why a schedule was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidPeriodic {
    /// The name is empty, too long or has other characters.
    #[error("schedule name {0:?}: 1 to {MAX_NAME_BYTES} of a-z A-Z 0-9 _ - . :")]
    Name(String),
    /// The interval is out of bounds.
    #[error("an interval is a whole number of seconds from 1 s to 24 h, got {0:?}")]
    Period(Duration),
    /// The grace is out of bounds.
    #[error("a schedule's grace is at most 24 h, got {0:?}")]
    Grace(Duration),
    /// [`Missed::RunEach`] asks for too many.
    #[error("Missed::RunEach runs 1 to {MAX_RUN_EACH} missed occurrences, got {0}")]
    RunEach(u32),
    /// The job it would enqueue is invalid.
    #[error("schedule {name}: {source}")]
    Job {
        /// The schedule.
        name: String,
        /// What is wrong with its job.
        source: InvalidJob,
    },
}

/// A schedule: a task's arguments to enqueue at every occurrence of a
/// [`Cadence`]. Add it to an application with
/// [`crate::Application::periodic`].
#[derive(Debug, Clone, PartialEq)]
pub struct Periodic {
    name: String,
    cadence: Cadence,
    job: NewJob,
    missed: Missed,
    grace: Duration,
}

impl Periodic {
    /// Enqueues `task` (its arguments as they are now) at every occurrence
    /// of `cadence`, on the task's queue with its attempts, under `name`
    /// (the schedule's identity in the database: keep it when the cadence
    /// changes, and two applications sharing a database must not share
    /// one).
    pub fn new<T: Task>(name: &str, cadence: Cadence, task: &T) -> Result<Self, InvalidPeriodic> {
        Self::with_options(name, cadence, task, EnqueueOptions::default())
    }

    /// [`Periodic::new`] with another queue, priority or attempts (the
    /// schedule and unique key of `options` are not used: the occurrence is
    /// the schedule, and the identity).
    pub fn with_options<T: Task>(
        name: &str,
        cadence: Cadence,
        task: &T,
        options: EnqueueOptions,
    ) -> Result<Self, InvalidPeriodic> {
        let valid_name = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if !valid_name {
            return Err(InvalidPeriodic::Name(name.to_owned()));
        }
        let options = EnqueueOptions { unique_key: None, schedule: Default::default(), ..options };
        let job = super::typed_job(task, options).map_err(|e| InvalidPeriodic::Job {
            name: name.to_owned(),
            source: match e {
                super::EnqueueError::Invalid(invalid) => invalid,
                other => InvalidJob::InvalidArgs { task: T::NAME.to_owned(), reason: other.to_string() },
            },
        })?;
        Ok(Self { name: name.to_owned(), cadence, job, missed: Missed::default(), grace: DEFAULT_GRACE })
    }

    /// What becomes of missed occurrences ([`Missed::RunOnce`] by default).
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// How old an occurrence may be and still be on time
    /// ([`DEFAULT_GRACE`] by default).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Checks the bounds of the setters.
    pub fn validate(&self) -> Result<(), InvalidPeriodic> {
        if self.grace > MAX_GRACE {
            return Err(InvalidPeriodic::Grace(self.grace));
        }
        if let Missed::RunEach { at_most } = self.missed {
            if !(1..=MAX_RUN_EACH).contains(&at_most) {
                return Err(InvalidPeriodic::RunEach(at_most));
            }
        }
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When it runs.
    pub fn cadence(&self) -> &Cadence {
        &self.cadence
    }

    /// The job each occurrence enqueues (due at the occurrence).
    pub fn job(&self) -> &NewJob {
        &self.job
    }

    /// Its grace.
    pub fn grace_period(&self) -> Duration {
        self.grace
    }

    /// What one look at the database's clock `now` does, given the
    /// schedule's `cursor` (the latest occurrence settled).
    pub fn plan(&self, cursor: DateTime<Utc>, now: DateTime<Utc>) -> Plan {
        let grace = chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX);
        let on_time_from = now - grace;
        let keep = match self.missed {
            Missed::Skip => 0,
            Missed::RunOnce => 1,
            Missed::RunEach { at_most } => at_most as usize,
        };
        let mut late: VecDeque<DateTime<Utc>> = VecDeque::with_capacity(keep.min(64));
        let mut run = Vec::new();
        let mut missed = 0u64;
        let mut settled = cursor;
        let mut walked = 0;
        let next = loop {
            let Some(at) = self.cadence.next_after(settled) else { break None };
            if at > now || walked == MAX_WALK || run.len() + late.len() == MAX_RUNS_PER_LOOK {
                break Some(at);
            }
            walked += 1;
            settled = at;
            if at >= on_time_from {
                run.push(at);
            } else if keep == 0 {
                missed += 1;
            } else {
                if late.len() == keep {
                    late.pop_front();
                    missed += 1;
                }
                late.push_back(at);
            }
        };
        if walked == MAX_WALK && run.is_empty() {
            // The walk stops short of now: later looks hold later missed
            // occurrences, so these are not the latest.
            missed += late.len() as u64;
            late.clear();
        }
        let mut runs: Vec<DateTime<Utc>> = late.into_iter().collect();
        runs.extend(run);
        Plan { runs, missed, cursor: settled, next }
    }
}

/// What one look at a schedule does: enqueue `runs`, count `missed`, and
/// move the cursor to `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Occurrences to enqueue, oldest first.
    pub runs: Vec<DateTime<Utc>>,
    /// Occurrences skipped by the [`Missed`] policy.
    pub missed: u64,
    /// The latest occurrence settled (enqueued or skipped); the cursor's
    /// value before the look if nothing was due.
    pub cursor: DateTime<Utc>,
    /// The first occurrence after `cursor`: due now already if the look
    /// stopped at a bound, else in the future; `None` if there is none.
    pub next: Option<DateTime<Utc>>,
}

/// Where a worker's scheduler reads the wall clock: only to decide when to
/// look next (corrected by the database's clock at every look). Tests
/// inject a skewed one with [`crate::queue::Worker::with_clock`].
pub trait Clock: Send + Sync + 'static {
    /// This machine's idea of now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::task::{TaskContext, TaskError};

    #[derive(Serialize, Deserialize)]
    struct Tick {
        n: u32,
    }

    impl Task for Tick {
        const NAME: &'static str = "tick";
        const QUEUE: &'static str = "clock";
        type State = ();
        type Output = ();
        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    fn every(seconds: u64, missed: Missed) -> Periodic {
        let cadence = Cadence::every(Duration::from_secs(seconds)).expect("valid period");
        Periodic::new("tick", cadence, &Tick { n: 1 })
            .expect("valid")
            .missed(missed)
            .grace(Duration::from_secs(2))
    }

    #[test]
    fn intervals_fall_on_multiples_of_the_period_since_the_epoch() {
        let cadence = Cadence::every(Duration::from_secs(60)).expect("valid");
        let after = DateTime::from_timestamp(1_800_000_030, 0).unwrap_or_default();
        assert_eq!(cadence.next_after(after), DateTime::from_timestamp(1_800_000_060, 0));
        let exact = DateTime::from_timestamp(1_800_000_060, 0).unwrap_or_default();
        assert_eq!(cadence.next_after(exact), DateTime::from_timestamp(1_800_000_120, 0));
        for bad in [Duration::ZERO, Duration::from_millis(1500), Duration::from_secs(86_401)] {
            assert_eq!(Cadence::every(bad), Err(InvalidPeriodic::Period(bad)));
        }
    }

    #[test]
    fn a_look_enqueues_what_is_due_and_nothing_ahead() {
        let tick = every(1, Missed::Skip);
        let plan = tick.plan(at(0), at(1));
        assert_eq!(plan, Plan { runs: vec![at(1)], missed: 0, cursor: at(1), next: Some(at(2)) });
        // Nothing due: the cursor stays, the next is in the future.
        let idle = tick.plan(at(1), at(1));
        assert_eq!(idle, Plan { runs: vec![], missed: 0, cursor: at(1), next: Some(at(2)) });
        // Within the grace (2 s) late occurrences are on time, whatever the policy.
        assert_eq!(tick.plan(at(0), at(3)).runs, [at(1), at(2), at(3)]);
    }

    /// 10 s down, grace 2 s: occurrences 1..=7 are missed, 8..=10 on time.
    #[test]
    fn each_missed_policy_does_what_it_says() {
        let (cursor, now) = (at(0), at(10));
        let skip = every(1, Missed::Skip).plan(cursor, now);
        assert_eq!((skip.runs, skip.missed), ((8..=10).map(at).collect(), 7));
        let once = every(1, Missed::RunOnce).plan(cursor, now);
        assert_eq!((once.runs, once.missed), ((7..=10).map(at).collect(), 6));
        let each = every(1, Missed::RunEach { at_most: 3 }).plan(cursor, now);
        assert_eq!((each.runs, each.missed), ((5..=10).map(at).collect(), 4));
        let all = every(1, Missed::RunEach { at_most: 100 }).plan(cursor, now);
        assert_eq!((all.runs, all.missed), ((1..=10).map(at).collect(), 0));
        for plan in [&every(1, Missed::Skip).plan(cursor, now), &every(1, Missed::RunOnce).plan(cursor, now)]
        {
            assert_eq!((plan.cursor, plan.next), (at(10), Some(at(11))));
        }
    }

    #[test]
    fn a_long_outage_is_walked_in_bounded_steps_and_counted_whole() {
        let tick = every(1, Missed::Skip);
        let (mut cursor, now) = (at(0), at(25_000));
        let mut missed = 0;
        let mut looks = 0;
        loop {
            let plan = tick.plan(cursor, now);
            assert!(plan.runs.len() <= MAX_RUNS_PER_LOOK);
            missed += plan.missed;
            cursor = plan.cursor;
            looks += 1;
            if plan.next.is_none_or(|next| next > now) {
                assert_eq!(plan.runs.len(), 3, "the last look runs those within the grace");
                break;
            }
        }
        assert_eq!((missed, looks, cursor), (25_000 - 3, 3, now));
    }

    #[test]
    fn refuses_out_of_bounds_schedules() {
        let cadence = Cadence::every(Duration::from_secs(1)).expect("valid");
        for name in ["", "has space", &"x".repeat(129)] {
            assert!(matches!(
                Periodic::new(name, cadence.clone(), &Tick { n: 1 }),
                Err(InvalidPeriodic::Name(_))
            ));
        }
        let tick = every(1, Missed::RunEach { at_most: 0 });
        assert_eq!(tick.validate(), Err(InvalidPeriodic::RunEach(0)));
        let tick = every(1, Missed::Skip).grace(Duration::from_secs(90_000));
        assert!(matches!(tick.validate(), Err(InvalidPeriodic::Grace(_))));
        assert_eq!(every(1, Missed::Skip).job().queue, "clock", "the task's queue");
    }
}
