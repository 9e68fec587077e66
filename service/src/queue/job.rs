//! What a job is, on the way in (a [`NewJob`] and its validation) and on
//! the way out (a [`ClaimedJob`] a worker runs, a [`JobView`] a client reads).
//! Pure: no database here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

/// The queue a job goes to when none is named.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a job gets when neither the caller nor its task says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 10;
/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS_LIMIT: i32 = 100;
/// Largest `args`, as JSON text. Larger is refused (HTTP 413): a queue row
/// is not a place for payloads; store them and pass a reference.
pub const MAX_ARGS_BYTES: usize = 64 * 1024;
/// Longest queue name and unique key.
pub const MAX_QUEUE_NAME_BYTES: usize = 64;
/// Longest unique key.
pub const MAX_UNIQUE_KEY_BYTES: usize = 256;
/// Furthest a job may be scheduled ahead.
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// When a new job becomes available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// At once (the database's clock at enqueue).
    #[default]
    Now,
    /// At a point in time; a time in the past means at once.
    At(DateTime<Utc>),
    /// This long after enqueue, by the database's clock.
    After(Duration),
}

/// A job to enqueue. Build it with [`NewJob::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The task's name.
    pub task: String,
    /// A JSON object: the task's arguments.
    pub args: Value,
    /// The queue it goes to.
    pub queue: String,
    /// Higher runs first; 0 by default.
    pub priority: i16,
    /// When it becomes available.
    pub schedule: Schedule,
    /// While a job with this key is pending (scheduled, available or
    /// running), enqueuing another with the same key returns the pending
    /// job's id instead.
    pub unique_key: Option<String>,
    /// Attempts it gets, from 1 to 100.
    pub max_attempts: i32,
}

impl NewJob {
    /// A job of `task` with `args`, on the default queue, due at once.
    pub fn new(task: impl Into<String>, args: Value) -> Self {
        Self {
            task: task.into(),
            args,
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            schedule: Schedule::Now,
            unique_key: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// On `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// With `priority`.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Due as `schedule` says.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// With a unique key.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// With `attempts` attempts.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Checks every field against the limits above; `now` is the caller's
    /// clock, used only to bound how far ahead a job may be scheduled.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), InvalidJob> {
        if self.task.is_empty() || self.task.len() > MAX_QUEUE_NAME_BYTES {
            return Err(InvalidJob::TaskName);
        }
        if !self.args.is_object() {
            return Err(InvalidJob::ArgsNotObject);
        }
        let size = self.args.to_string().len();
        if size > MAX_ARGS_BYTES {
            return Err(InvalidJob::ArgsTooLarge { size });
        }
        if !is_valid_queue_name(&self.queue) {
            return Err(InvalidJob::QueueName(self.queue.clone()));
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(InvalidJob::MaxAttempts(self.max_attempts));
        }
        if let Some(key) = &self.unique_key {
            if key.is_empty() || key.len() > MAX_UNIQUE_KEY_BYTES {
                return Err(InvalidJob::UniqueKey);
            }
        }
        let ahead = match self.schedule {
            Schedule::Now => Duration::ZERO,
            Schedule::At(at) => (at - now).to_std().unwrap_or(Duration::ZERO),
            Schedule::After(delay) => delay,
        };
        if ahead > MAX_SCHEDULE_AHEAD {
            return Err(InvalidJob::TooFarAhead);
        }
        Ok(())
    }
}

/// Queue names: 1 to 64 of `a-z A-Z 0-9 _ - .`, so they are safe as metric
/// labels and on command lines.
pub fn is_valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_QUEUE_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Why a job was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    #[error("task must be a name of 1 to {MAX_QUEUE_NAME_BYTES} bytes")]
    /// The task name is empty or too long.
    TaskName,
    #[error("unknown task {0:?}; known tasks: {1}")]
    /// No task of that name; the known ones follow.
    UnknownTask(String, String),
    #[error("invalid args for task {task:?}: {reason}")]
    /// The args do not fit the task.
    InvalidArgs {
        /// The task.
        task: String,
        /// What is wrong.
        reason: String,
    },
    #[error("args must be a JSON object")]
    /// The args are not a JSON object.
    ArgsNotObject,
    #[error("args are {size} bytes of JSON; the limit is {MAX_ARGS_BYTES}")]
    /// The args are over [`MAX_ARGS_BYTES`].
    ArgsTooLarge {
        /// Their size as JSON.
        size: usize,
    },
    #[error(
        "queue {0:?} is not a valid name: use 1 to {MAX_QUEUE_NAME_BYTES} of a-z, A-Z, 0-9, '_', '-', '.'"
    )]
    /// The queue's name is not valid.
    QueueName(String),
    #[error("max_attempts must be from 1 to {MAX_ATTEMPTS_LIMIT}, got {0}")]
    /// The attempts are out of range.
    MaxAttempts(i32),
    #[error("unique_key must be 1 to {MAX_UNIQUE_KEY_BYTES} bytes")]
    /// The unique key is empty or too long.
    UniqueKey,
    #[error("a job may be scheduled at most 366 days ahead")]
    /// The job is scheduled too far ahead.
    TooFarAhead,
    #[error("run_at must be an RFC 3339 time such as 2026-12-01T09:00:00Z, got {0:?}")]
    /// `run_at` is not an RFC 3339 time.
    RunAt(String),
}

/// A `run_at` as clients write it: RFC 3339, any offset.
pub fn parse_run_at(text: &str) -> Result<DateTime<Utc>, InvalidJob> {
    DateTime::parse_from_rfc3339(text).map(|at| at.to_utc()).map_err(|_| InvalidJob::RunAt(text.to_owned()))
}

/// The outcome of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The job's id.
    pub id: i64,
    /// The job was not inserted: a pending job with the same unique key
    /// exists, and `id` is that job's.
    pub duplicate: bool,
}

/// A job a worker has claimed and is to run.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    /// The job's id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its task's name.
    pub task: String,
    /// Its arguments.
    pub args: Value,
    /// This attempt's number, from 1; also the lease's fencing token.
    pub attempt: i32,
    /// Attempts it may have.
    pub max_attempts: i32,
    /// Seconds from when the job was due to when it was claimed.
    pub latency_seconds: f64,
    /// The workflow stage it is a member of, if any.
    pub group_id: Option<i64>,
}

/// Where a job is in its life, as `GET /tasks/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Pending, due in the future (scheduled, or waiting out a retry's backoff).
    Scheduled,
    /// Due and waiting for a worker.
    Available,
    /// Claimed by a worker, under a lease.
    Running,
    /// Finished; kept only when its task returned a result.
    Succeeded,
    /// Out of attempts.
    Dead,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobState {
    /// Every state, in a job's order.
    pub const ALL: [JobState; 6] =
        [Self::Scheduled, Self::Available, Self::Running, Self::Succeeded, Self::Dead, Self::Cancelled];

    /// Its name, as the tables write it and `GET /tasks/{id}` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `text`, as the tables write it.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// One job as a client sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    /// The job's id.
    pub id: i64,
    /// Its task's name.
    pub task: String,
    /// Its queue.
    pub queue: String,
    /// Where it is.
    pub state: JobState,
    /// Its arguments.
    pub args: Value,
    /// Attempts started so far.
    pub attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Attempts it may have (pending jobs only).
    pub max_attempts: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Its priority (pending jobs only).
    pub priority: Option<i16>,
    /// One `{"attempt", "at", "error"}` per failed attempt.
    pub errors: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// What its task returned, if kept.
    pub result: Option<Value>,
    /// When it was (or is) due.
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// When it finished, if it did.
    pub finished_at: Option<DateTime<Utc>>,
    /// A cancellation was asked for while the job was running; the worker
    /// stops it at its next heartbeat.
    pub cancel_requested: bool,
}

/// What a cancellation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cancelled {
    /// The job was pending and is now cancelled.
    Cancelled,
    /// The job is running; its worker stops it at its next heartbeat.
    Requested,
    /// No pending job has this id (it finished, or never existed).
    NotPending,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_state_is_named_as_it_parses_and_serializes() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
            assert_eq!(serde_json::to_value(state).ok(), Some(json!(state.as_str())));
        }
        assert_eq!(JobState::parse("done"), None);
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid() {
        let job = NewJob::new("noop", json!({}));
        assert_eq!(job.queue, DEFAULT_QUEUE);
        assert_eq!(job.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(job.validate(now()), Ok(()));
    }

    #[test]
    fn args_must_be_a_small_object() {
        assert_eq!(NewJob::new("t", json!([1])).validate(now()), Err(InvalidJob::ArgsNotObject));
        assert_eq!(NewJob::new("t", json!(null)).validate(now()), Err(InvalidJob::ArgsNotObject));
        let big = json!({ "blob": "x".repeat(MAX_ARGS_BYTES) });
        assert!(matches!(NewJob::new("t", big).validate(now()), Err(InvalidJob::ArgsTooLarge { .. })));
        let fits = json!({ "b": "x".repeat(MAX_ARGS_BYTES - 10) });
        assert_eq!(NewJob::new("t", fits).validate(now()), Ok(()));
    }

    #[test]
    fn queue_names_are_label_safe() {
        for good in ["default", "a", "emails.high", "q_1-2", &"q".repeat(MAX_QUEUE_NAME_BYTES)] {
            assert!(is_valid_queue_name(good), "{good}");
        }
        for bad in ["", "with space", "ünï", "a/b", "a,b", &"q".repeat(MAX_QUEUE_NAME_BYTES + 1)] {
            assert!(!is_valid_queue_name(bad), "{bad}");
            let job = NewJob::new("t", json!({})).queue(bad);
            assert!(matches!(job.validate(now()), Err(InvalidJob::QueueName(_))), "{bad}");
        }
    }

    #[test]
    fn attempts_unique_keys_and_task_names_are_bounded() {
        let job = || NewJob::new("t", json!({}));
        assert_eq!(job().max_attempts(0).validate(now()), Err(InvalidJob::MaxAttempts(0)));
        assert_eq!(job().max_attempts(101).validate(now()), Err(InvalidJob::MaxAttempts(101)));
        assert_eq!(job().max_attempts(1).validate(now()), Ok(()));
        assert_eq!(job().unique_key("").validate(now()), Err(InvalidJob::UniqueKey));
        assert_eq!(job().unique_key("k".repeat(257)).validate(now()), Err(InvalidJob::UniqueKey));
        assert_eq!(NewJob::new("", json!({})).validate(now()), Err(InvalidJob::TaskName));
    }

    #[test]
    fn schedules_are_bounded_ahead_but_not_behind() {
        let job = |s| NewJob::new("t", json!({})).schedule(s);
        let day = chrono::Duration::days(1);
        assert_eq!(job(Schedule::At(now() - day * 1000)).validate(now()), Ok(()));
        assert_eq!(job(Schedule::At(now() + day * 366)).validate(now()), Ok(()));
        assert_eq!(job(Schedule::At(now() + day * 367)).validate(now()), Err(InvalidJob::TooFarAhead));
        assert_eq!(
            job(Schedule::After(MAX_SCHEDULE_AHEAD + Duration::from_secs(1))).validate(now()),
            Err(InvalidJob::TooFarAhead)
        );
    }

    #[test]
    fn run_at_is_rfc3339_with_any_offset() {
        let expected = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        assert_eq!(parse_run_at("2027-01-15T08:00:00Z"), Ok(expected));
        assert_eq!(parse_run_at("2027-01-15T10:00:00+02:00"), Ok(expected));
        for bad in ["tomorrow", "2027-01-15 08:00", "2027-01-15", ""] {
            assert_eq!(parse_run_at(bad), Err(InvalidJob::RunAt(bad.to_owned())), "{bad}");
        }
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in JobState::ALL {
            let name = serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_owned));
            assert_eq!(name.as_deref().and_then(JobState::parse), Some(state));
        }
        assert_eq!(JobState::parse("lost"), None);
    }
}
