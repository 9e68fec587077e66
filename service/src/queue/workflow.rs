//! Workflows: chains, groups and chords, decided in SQL.
//!
//! A workflow is a list of **stages**; the jobs of a stage run in parallel,
//! and a stage starts when every job of the one before it has succeeded.
//! The three shapes Celery has are workflows:
//!
//! - a **group**: one stage of N jobs ([`Workflow::group`]);
//! - a **chord**: a group, then a callback ([`Workflow::chord`]);
//! - a **chain**: one stage per link ([`Workflow::chain`], [`Workflow::then`]).
//!
//! A job of a later stage reads the outputs of the stage before it through
//! its context ([`crate::task::TaskContext::inputs`], or `input` for the one
//! output of a chain's previous link), not through its arguments: 10,000
//! outputs do not fit a job's 64 KiB of arguments.
//!
//! **Exactly once.** Each stage is a row with a count of its members that
//! succeeded. The statement that records a member's success adds to that
//! count under the row's lock; the one that makes it the stage's total marks
//! the stage succeeded and inserts the next stage's jobs, in the same
//! statement. Two members finishing at the same instant on two workers queue
//! on the row: the second sees the first's count, so one of them, never both
//! and never neither, starts the next stage.
//!
//! **How each end of a member counts:**
//!
//! | member ends | its workflow |
//! |---|---|
//! | succeeds | counted; its output kept for the next stage |
//! | fails and is retried | nothing yet: it is still a member |
//! | its lease expires (worker killed) | rescued like any job: retried, so nothing yet; dead if out of attempts |
//! | dies (out of attempts, or a fatal error) | **failed**: every stage not yet ended fails with the member's id and error; no later stage runs (no callback) |
//! | is cancelled (pending or running) | **cancelled**: as failed, with the state `cancelled` |
//!
//! The other members of a failed stage still run to their end (cancel them
//! if they should not); their outcomes no longer count.
//!
//! **Outputs are kept** (in `tidepool_group_outputs`) for every stage that
//! has a next one, whatever `--result-retention` says of the jobs' own
//! results (also 0), until the workflow has ended: then its record and its
//! outputs go after the result retention (succeeded) or the dead retention
//! (failed, cancelled). Look at a workflow with [`crate::queue::lookup_workflow`].
//!
//! Jobs of a workflow are due at once and have no unique key; a stage holds
//! up to [`MAX_STAGE_JOBS`] jobs, a workflow up to [`MAX_STAGES`] stages.
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # use tidepool::task::{Task, TaskContext, TaskError};
//! # #[derive(Serialize, Deserialize)] struct Resize { image: i64 }
//! # impl Task for Resize {
//! #     const NAME: &'static str = "resize"; type State = (); type Output = i64;
//! #     async fn run(self, _: TaskContext<()>) -> Result<i64, TaskError> { Ok(self.image) }
//! # }
//! #[derive(Serialize, Deserialize)]
//! struct Album {
//!     title: String,
//! }
//!
//! impl Task for Album {
//!     const NAME: &'static str = "album";
//!     type State = ();
//!     type Output = usize;
//!
//!     async fn run(self, ctx: TaskContext<()>) -> Result<usize, TaskError> {
//!         let thumbnails: Vec<i64> = ctx.inputs().await?;
//!         Ok(thumbnails.len())
//!     }
//! }
//!
//! # fn main() -> Result<(), tidepool::queue::EnqueueError> {
//! use tidepool::queue::workflow::Workflow;
//!
//! let resizes: Vec<Resize> = (1..=3).map(|image| Resize { image }).collect();
//! let chord = Workflow::chord(&resizes, &Album { title: "holiday".into() })?;
//! assert_eq!(chord.stages().len(), 2);
//! // queue::enqueue_workflow(&conn, &chord).await?;
//! # Ok(())
//! # }
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::job::{NewJob, Schedule};
use super::{typed_job, EnqueueError, EnqueueOptions, MAX_BATCH};
use crate::task::Task;

/// Most jobs in one stage.
pub const MAX_STAGE_JOBS: usize = MAX_BATCH;
/// Most stages in one workflow.
pub const MAX_STAGES: usize = 100;
/// Most jobs in one workflow, all stages together.
pub const MAX_WORKFLOW_JOBS: usize = 2 * MAX_BATCH;

/// Stages of jobs, run one after the other. Build it with the constructors
/// and [`Workflow::then`]; enqueue it with [`crate::queue::enqueue_workflow`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workflow {
    stages: Vec<Vec<NewJob>>,
}

/// Why a workflow was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWorkflow {
    /// Nothing to run.
    #[error("a workflow needs at least one stage")]
    NoStages,
    /// A stage without jobs.
    #[error("stage {0} has no jobs")]
    EmptyStage(usize),
    /// Too many stages.
    #[error("a workflow has at most {MAX_STAGES} stages, got {0}")]
    TooManyStages(usize),
    /// A stage too large.
    #[error("stage {stage} has {jobs} jobs; a stage holds at most {MAX_STAGE_JOBS}")]
    StageTooLarge {
        /// The stage, from 1.
        stage: usize,
        /// Its jobs.
        jobs: usize,
    },
    /// Too many jobs in all.
    #[error("a workflow has at most {MAX_WORKFLOW_JOBS} jobs, got {0}")]
    TooManyJobs(usize),
    /// A job scheduled later or with a unique key.
    #[error("stage {0}: a workflow's jobs are due when their stage starts and have no unique key")]
    Scheduled(usize),
}

impl Workflow {
    /// No stages yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A group: `tasks` in parallel, one stage.
    pub fn group<'a, T: Task>(tasks: impl IntoIterator<Item = &'a T>) -> Result<Self, EnqueueError> {
        Self::new().then_all(tasks)
    }

    /// A chord: `tasks` in parallel, then `callback` once all succeeded,
    /// reading their outputs.
    pub fn chord<'a, T: Task, C: Task>(
        tasks: impl IntoIterator<Item = &'a T>,
        callback: &C,
    ) -> Result<Self, EnqueueError> {
        Self::group(tasks)?.then(callback)
    }

    /// A chain's first link; add the others with [`Workflow::then`].
    pub fn chain<T: Task>(first: &T) -> Result<Self, EnqueueError> {
        Self::new().then(first)
    }

    /// Adds a stage of one job: it runs once the stage before succeeded,
    /// and reads its output(s).
    pub fn then<T: Task>(self, task: &T) -> Result<Self, EnqueueError> {
        self.then_all(std::iter::once(task))
    }

    /// Adds a stage of `tasks`, in parallel.
    pub fn then_all<'a, T: Task>(self, tasks: impl IntoIterator<Item = &'a T>) -> Result<Self, EnqueueError> {
        let jobs =
            tasks.into_iter().map(|t| typed_job(t, EnqueueOptions::default())).collect::<Result<_, _>>()?;
        Ok(self.then_jobs(jobs))
    }

    /// Adds a stage of jobs given by name (of several tasks, say); checked
    /// when the workflow is enqueued.
    pub fn then_jobs(mut self, jobs: Vec<NewJob>) -> Self {
        self.stages.push(jobs);
        self
    }

    /// Its stages, in order.
    pub fn stages(&self) -> &[Vec<NewJob>] {
        &self.stages
    }

    /// Checks its shape and every job ([`NewJob::validate`], `now` the
    /// caller's clock).
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), EnqueueError> {
        if self.stages.is_empty() {
            return Err(InvalidWorkflow::NoStages.into());
        }
        if self.stages.len() > MAX_STAGES {
            return Err(InvalidWorkflow::TooManyStages(self.stages.len()).into());
        }
        let total: usize = self.stages.iter().map(Vec::len).sum();
        if total > MAX_WORKFLOW_JOBS {
            return Err(InvalidWorkflow::TooManyJobs(total).into());
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let number = i + 1;
            if stage.is_empty() {
                return Err(InvalidWorkflow::EmptyStage(number).into());
            }
            if stage.len() > MAX_STAGE_JOBS {
                return Err(InvalidWorkflow::StageTooLarge { stage: number, jobs: stage.len() }.into());
            }
            for job in stage {
                job.validate(now)?;
                if job.schedule != Schedule::Now || job.unique_key.is_some() {
                    return Err(InvalidWorkflow::Scheduled(number).into());
                }
            }
        }
        Ok(())
    }
}

/// A job of a later stage as its stage's row holds it until the stage starts.
pub(crate) fn job_spec(job: &NewJob) -> Value {
    json!({
        "queue": job.queue,
        "task": job.task,
        "args": job.args,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
    })
}

/// Where a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// The stage before it has not succeeded yet.
    Waiting,
    /// Its jobs are enqueued.
    Running,
    /// Every job succeeded.
    Succeeded,
    /// A member of the workflow died.
    Failed,
    /// A member of the workflow was cancelled.
    Cancelled,
}

impl StageState {
    /// From the database's text.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "waiting" => Self::Waiting,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// One stage as [`crate::queue::lookup_workflow`] reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageView {
    /// From 1.
    pub stage: i32,
    /// Where it is.
    pub state: StageState,
    /// Its jobs.
    pub total: i32,
    /// Those that succeeded.
    pub succeeded: i32,
    /// Why the workflow failed or was cancelled: the member's last error.
    pub error: Option<String>,
    /// The member that ended it.
    pub failed_job: Option<i64>,
    /// When the workflow was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its jobs were enqueued.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A workflow and its stages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkflowView {
    /// Its id (its first stage's).
    pub id: i64,
    /// Failed or cancelled if a stage is; succeeded when the last stage
    /// is; running otherwise.
    pub state: StageState,
    /// Its stages, in order.
    pub stages: Vec<StageView>,
}

impl WorkflowView {
    /// The view of workflow `id` with `stages` (in order).
    pub fn new(id: i64, stages: Vec<StageView>) -> Self {
        let ended =
            stages.iter().map(|s| s.state).find(|s| matches!(s, StageState::Failed | StageState::Cancelled));
        let state = match (ended, stages.last().map(|s| s.state)) {
            (Some(state), _) => state,
            (None, Some(StageState::Succeeded)) => StageState::Succeeded,
            _ => StageState::Running,
        };
        Self { id, state, stages }
    }

    /// Why it failed, if it did: the member's error.
    pub fn error(&self) -> Option<&str> {
        self.stages.iter().find_map(|s| s.error.as_deref())
    }
}

/// An enqueued workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueuedWorkflow {
    /// Its id, for [`crate::queue::lookup_workflow`].
    pub id: i64,
    /// The first stage's jobs, in order.
    pub jobs: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskContext;
    use crate::task::TaskError;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize)]
    struct Step {
        n: i64,
    }

    impl Task for Step {
        const NAME: &'static str = "step";
        type State = ();
        type Output = i64;

        fn validate(&self) -> Result<(), String> {
            (self.n >= 0).then_some(()).ok_or_else(|| "n must not be negative".to_owned())
        }

        async fn run(self, _: TaskContext<()>) -> Result<i64, TaskError> {
            Ok(self.n)
        }
    }

    fn err(result: Result<(), EnqueueError>) -> String {
        result.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn shapes() -> Result<(), EnqueueError> {
        let steps: Vec<Step> = (0..3).map(|n| Step { n }).collect();
        let chain = Workflow::chain(&steps[0])?.then(&steps[1])?.then(&steps[2])?;
        assert_eq!(chain.stages().iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
        let chord = Workflow::chord(&steps, &Step { n: 9 })?;
        assert_eq!(chord.stages().iter().map(Vec::len).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(chord.stages()[1][0].args, json!({"n": 9}));
        assert_eq!(Workflow::group(&steps)?.stages().len(), 1);
        assert_eq!(chord.validate(Utc::now()).ok(), Some(()));
        // Typed members are checked as they are added.
        assert!(Workflow::chain(&Step { n: -1 }).is_err());
        Ok(())
    }

    #[test]
    fn bounds() {
        let now = Utc::now();
        let job = || NewJob::new("step", json!({"n": 1}));
        assert_eq!(err(Workflow::new().validate(now)), "a workflow needs at least one stage");
        assert_eq!(err(Workflow::new().then_jobs(vec![]).validate(now)), "stage 1 has no jobs");
        let wide = Workflow::new().then_jobs(vec![job(); MAX_STAGE_JOBS + 1]);
        assert_eq!(err(wide.validate(now)), "stage 1 has 10001 jobs; a stage holds at most 10000");
        let full = Workflow::new().then_jobs(vec![job(); MAX_STAGE_JOBS]);
        assert_eq!(full.validate(now).ok(), Some(()));
        let long = (0..=MAX_STAGES).fold(Workflow::new(), |w, _| w.then_jobs(vec![job()]));
        assert_eq!(err(long.validate(now)), "a workflow has at most 100 stages, got 101");
        let many = (0..3).fold(Workflow::new(), |w, _| w.then_jobs(vec![job(); MAX_STAGE_JOBS]));
        assert_eq!(err(many.validate(now)), "a workflow has at most 20000 jobs, got 30000");
        let keyed = Workflow::new().then_jobs(vec![job()]).then_jobs(vec![job().unique_key("k")]);
        assert!(err(keyed.validate(now)).starts_with("stage 2: "));
        let later = Workflow::new()
            .then_jobs(vec![job().schedule(Schedule::After(std::time::Duration::from_secs(1)))]);
        assert!(err(later.validate(now)).starts_with("stage 1: "));
        let bad_queue = Workflow::new().then_jobs(vec![job().queue("no spaces")]);
        assert!(err(bad_queue.validate(now)).contains("no spaces"));
    }

    fn stage(state: StageState, error: Option<&str>) -> StageView {
        StageView {
            stage: 1,
            state,
            total: 1,
            succeeded: 0,
            error: error.map(str::to_owned),
            failed_job: None,
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn a_workflows_state_is_its_stages() {
        use StageState::*;
        let view =
            |states: &[StageState]| WorkflowView::new(1, states.iter().map(|s| stage(*s, None)).collect());
        assert_eq!(view(&[Running, Waiting]).state, Running);
        assert_eq!(view(&[Succeeded, Running]).state, Running);
        assert_eq!(view(&[Succeeded, Succeeded]).state, Succeeded);
        assert_eq!(view(&[Succeeded, Failed]).state, Failed);
        assert_eq!(view(&[Cancelled, Cancelled]).state, Cancelled);
        let failed = WorkflowView::new(1, vec![stage(Failed, Some("boom")), stage(Failed, Some("boom"))]);
        assert_eq!(failed.error(), Some("boom"));
        for s in [Waiting, Running, Succeeded, Failed, Cancelled] {
            let text = serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned));
            assert_eq!(text.as_deref().and_then(StageState::parse), Some(s));
        }
    }
}
