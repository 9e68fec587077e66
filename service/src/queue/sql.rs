//! Every statement of the task queue, in one place.
//!
//! Each is a single statement (data-modifying CTEs where a job moves between
//! tables), so it is atomic without an explicit transaction and safe through
//! PgBouncer in transaction mode. All run as unnamed, typed statements
//! (`query_typed`): no named prepared statements, which PgBouncer 1.18 breaks.
//!
//! A running job is fenced by its `attempt`: every statement that settles a
//! running job matches `(id, attempt)` and `state = 'running'`, so a worker
//! whose lease was taken away (it stalled, the job was rescued and claimed
//! again) cannot finish or fail the new attempt.
//!
//! Statements that change many running jobs lock them first, in id order
//! (`ORDER BY id FOR UPDATE`): a worker's heartbeat and its recorder run at
//! the same time on overlapping jobs, and rows locked in two different
//! orders would deadlock.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Error, Row};

use crate::db::Executor;

use super::job::{Cancelled, ClaimedJob, Enqueued, JobState, JobView, NewJob, Schedule};

const ENQUEUE: &str = "
WITH inserted AS (
    INSERT INTO tidepool_jobs (queue, task, args, priority, run_at, max_attempts, unique_key)
    VALUES ($1, $2, $3, $4, COALESCE($5, now() + $6 * interval '1 millisecond'), $7, $8)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT id, false FROM inserted
UNION ALL
SELECT id, true FROM tidepool_jobs
WHERE $8 IS NOT NULL AND unique_key = $8 AND NOT EXISTS (SELECT 1 FROM inserted)";

/// Rows come out of `unnest` in input order, so identities are assigned in
/// input order: the caller maps ids back to its jobs by that.
const ENQUEUE_MANY: &str = "
INSERT INTO tidepool_jobs (queue, task, args, priority, run_at, max_attempts, unique_key)
SELECT queue, task, args, priority, COALESCE(at, now() + delay_ms * interval '1 millisecond'),
       max_attempts, unique_key
FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::timestamptz[], $6::int8[],
            $7::int4[], $8::text[]) WITH ORDINALITY
     AS i(queue, task, args, priority, at, delay_ms, max_attempts, unique_key, ord)
ORDER BY ord
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id, unique_key";

const PENDING_BY_UNIQUE_KEY: &str =
    "SELECT unique_key, id FROM tidepool_jobs WHERE unique_key = ANY($1::text[])";

/// Claims up to `$2` due jobs of queue `$1` for worker `$3` with a lease of
/// `$4` ms. `SKIP LOCKED` lets concurrent claimers pass each other's rows;
/// the row locks last only for this statement.
const CLAIM: &str = "
WITH picked AS (
    SELECT id FROM tidepool_jobs
    WHERE state = 'available' AND queue = $1 AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tidepool_jobs j
SET state = 'running', attempt = j.attempt + 1, worker = $3, attempted_at = now(),
    lease_expires_at = now() + $4 * interval '1 millisecond'
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.max_attempts,
          EXTRACT(epoch FROM now() - j.run_at)::float8";

/// Finishes succeeded jobs: out of the hot table, and into the results table
/// when a result is given. Returns the ids it finished.
const COMPLETE: &str = "
WITH d AS (
    SELECT * FROM unnest($1::int8[], $2::int4[], $3::jsonb[]) AS d(id, attempt, result)
), locked AS (
    SELECT j.id, d.result FROM tidepool_jobs j JOIN d ON j.id = d.id AND j.attempt = d.attempt
    WHERE j.state = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), done AS (
    DELETE FROM tidepool_jobs j
    USING locked d
    WHERE j.id = d.id
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.run_at, j.created_at,
              j.attempted_at, d.result
), kept AS (
    INSERT INTO tidepool_job_results
        (id, queue, task, args, attempts, result, errors, run_at, created_at, started_at, finished_at)
    SELECT id, queue, task, args, attempt, result, errors, run_at, created_at, attempted_at, now()
    FROM done WHERE result IS NOT NULL
)
SELECT id FROM done";

/// The tail shared by [`FAIL`] and [`RESCUE`]: given `f(id, attempt, error,
/// retry_in_ms, final_state)`, each running job either goes back to
/// available after its backoff (error recorded), or, when it is out of
/// attempts, was asked to be cancelled, or `final_state` says so, moves to
/// the dead table. Returns `(id, outcome)`: 'retried', 'dead' or 'cancelled'.
macro_rules! settle_failed {
    () => {
        "
, failed AS (
    SELECT j.id, f.attempt, f.error, f.retry_in_ms,
           COALESCE(f.final_state,
                    CASE WHEN j.cancel_requested THEN 'cancelled'
                         WHEN j.attempt >= j.max_attempts THEN 'dead' END) AS final_state
    FROM tidepool_jobs j JOIN f ON j.id = f.id AND j.attempt = f.attempt AND j.state = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), retried AS (
    UPDATE tidepool_jobs j
    SET state = 'available', worker = NULL, lease_expires_at = NULL,
        run_at = now() + failed.retry_in_ms * interval '1 millisecond',
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'error', failed.error))
    FROM failed
    WHERE j.id = failed.id AND j.attempt = failed.attempt AND j.state = 'running'
      AND failed.final_state IS NULL
    RETURNING j.id
), buried AS (
    DELETE FROM tidepool_jobs j
    USING failed
    WHERE j.id = failed.id AND j.attempt = failed.attempt AND j.state = 'running'
      AND failed.final_state IS NOT NULL
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.unique_key, j.run_at, j.created_at,
              j.errors || jsonb_build_array(jsonb_build_object(
                  'attempt', j.attempt, 'at', now(), 'error', failed.error)) AS errors,
              failed.final_state
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, final_state, attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
)
SELECT id, 'retried' FROM retried
UNION ALL
SELECT id, final_state FROM buried"
    };
}

const FAIL: &str = concat!(
    "WITH f AS (
    SELECT * FROM unnest($1::int8[], $2::int4[], $3::text[], $4::int8[], $5::text[])
        AS f(id, attempt, error, retry_in_ms, final_state)
)",
    settle_failed!()
);

/// Jobs whose lease expired (their worker was killed or cut off) are failed
/// like any other attempt, to run again at once or to die if out of
/// attempts. At most `$1` per call.
const RESCUE: &str = concat!(
    "WITH f AS (
    SELECT id, attempt,
           'lease expired: worker ' || COALESCE(worker, '?')
               || ' stopped renewing it (killed, hung or cut off from the database)' AS error,
           0::int8 AS retry_in_ms, NULL::text AS final_state
    FROM tidepool_jobs
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)",
    settle_failed!()
);

/// Renews the leases of `(id, attempt)` by `$3` ms. Returns the jobs still
/// held, and whether a cancellation was asked for; a job not returned was
/// taken away (its lease expired and it was rescued).
const HEARTBEAT: &str = "
WITH locked AS (
    SELECT j.id FROM tidepool_jobs j
    JOIN unnest($1::int8[], $2::int4[]) AS h(id, attempt) ON j.id = h.id AND j.attempt = h.attempt
    WHERE j.state = 'running'
    ORDER BY j.id
    FOR NO KEY UPDATE OF j
)
UPDATE tidepool_jobs j
SET lease_expires_at = now() + $3 * interval '1 millisecond'
FROM locked
WHERE j.id = locked.id
RETURNING j.id, j.cancel_requested";

/// Gives claimed jobs back at once (shutdown), as if never claimed: the
/// attempt does not count, the job keeps its place in line. A job whose
/// cancellation was asked for meanwhile is cancelled instead. Returns the
/// ids handed back.
const HAND_BACK: &str = "
WITH locked AS (
    SELECT j.id, j.cancel_requested FROM tidepool_jobs j
    JOIN unnest($1::int8[], $2::int4[]) AS h(id, attempt) ON j.id = h.id AND j.attempt = h.attempt
    WHERE j.state = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), handed AS (
    UPDATE tidepool_jobs j
    SET state = 'available', attempt = j.attempt - 1, worker = NULL, lease_expires_at = NULL
    FROM locked
    WHERE j.id = locked.id AND NOT locked.cancel_requested
    RETURNING j.id
), buried AS (
    DELETE FROM tidepool_jobs j USING locked
    WHERE j.id = locked.id AND locked.cancel_requested
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.unique_key, j.run_at, j.created_at
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, 'cancelled', attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
)
SELECT id FROM handed";

/// Cancels job `$1`: a pending one moves to the dead table as cancelled; a
/// running one is flagged, and its worker stops it at its next heartbeat.
const CANCEL: &str = "
WITH target AS (
    SELECT id, state FROM tidepool_jobs WHERE id = $1 FOR UPDATE
), buried AS (
    DELETE FROM tidepool_jobs j USING target t
    WHERE j.id = t.id AND t.state = 'available'
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.unique_key, j.run_at, j.created_at
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, 'cancelled', attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
), flagged AS (
    UPDATE tidepool_jobs j SET cancel_requested = true FROM target t
    WHERE j.id = t.id AND t.state = 'running'
    RETURNING j.id
)
SELECT CASE WHEN EXISTS (SELECT 1 FROM buried) THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM flagged) THEN 'requested'
            ELSE 'not_pending' END";

/// Job `$1` wherever it is: pending, succeeded with a result, dead or cancelled.
const LOOKUP: &str = "
SELECT id, task, queue,
       CASE WHEN state = 'available' AND run_at > now() THEN 'scheduled' ELSE state END,
       args, attempt, max_attempts, priority, errors, NULL::jsonb, run_at, created_at,
       NULL::timestamptz, cancel_requested
FROM tidepool_jobs WHERE id = $1
UNION ALL
SELECT id, task, queue, 'succeeded', args, attempts, NULL::int4, NULL::int2, errors, result,
       run_at, created_at, finished_at, false
FROM tidepool_job_results WHERE id = $1
UNION ALL
SELECT id, task, queue, state, args, attempts, NULL::int4, NULL::int2, errors, NULL::jsonb,
       run_at, created_at, finished_at, false
FROM tidepool_dead_jobs WHERE id = $1
LIMIT 1";

const PRUNE_RESULTS: &str = "
WITH gone AS (
    DELETE FROM tidepool_job_results WHERE id IN (
        SELECT id FROM tidepool_job_results
        WHERE finished_at < now() - $1 * interval '1 millisecond'
        ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT count(*) FROM gone";

const PRUNE_DEAD: &str = "
WITH gone AS (
    DELETE FROM tidepool_dead_jobs WHERE id IN (
        SELECT id FROM tidepool_dead_jobs
        WHERE finished_at < now() - $1 * interval '1 millisecond'
        ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT count(*) FROM gone";

/// Per queue in `$1`: available jobs that are due, the age of the oldest,
/// and running jobs. The available ones are counted on the claim index
/// (its leading column is the queue, its predicate the state), the running
/// ones on the running index.
const QUEUE_STATS: &str = "
SELECT q.queue, a.available, COALESCE(EXTRACT(epoch FROM now() - a.oldest), 0)::float8,
       (SELECT count(*) FROM tidepool_jobs r WHERE r.state = 'running' AND r.queue = q.queue)
FROM unnest($1::text[]) AS q(queue)
CROSS JOIN LATERAL (
    SELECT count(*) AS available, min(j.run_at) AS oldest FROM tidepool_jobs j
    WHERE j.state = 'available' AND j.queue = q.queue AND j.run_at <= now()
) a";

/// Inserts the rows of schedules `$1` that are missing (their cursor at
/// the database's now: a new schedule does not run its past) and marks
/// the others declared now.
const DECLARE_SCHEDULES: &str = "
INSERT INTO tidepool_schedules (name, cursor_at)
SELECT name, now() FROM unnest($1::text[]) AS d(name)
ON CONFLICT (name) DO UPDATE SET declared_at = now()";

/// The database's clock and, per schedule of `$1`, its row (NULLs where it
/// has none yet).
const LOOK_AT_SCHEDULES: &str = "
SELECT now(), d.name, s.cursor_at, s.last_run_at, s.missed
FROM unnest($1::text[]) AS d(name)
LEFT JOIN tidepool_schedules s ON s.name = d.name";

/// Moves each schedule's cursor from the value the caller saw to the one
/// it planned (only if the row still holds the seen value: a worker that
/// lost the race writes nothing), and for the schedules moved, inserts the
/// planned occurrences that are due by the database's clock, each with its
/// job. Returns, per schedule moved, how many jobs it enqueued.
const ADVANCE_SCHEDULES: &str = "
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::timestamptz[])
        AS s(name, seen, cursor_at, missed, last_run)
), moved AS (
    UPDATE tidepool_schedules t
    SET cursor_at = s.cursor_at, missed = t.missed + s.missed,
        last_run_at = COALESCE(s.last_run, t.last_run_at), declared_at = now()
    FROM s
    WHERE t.name = s.name AND t.cursor_at = s.seen AND s.cursor_at <= now()
    RETURNING t.name
), due AS (
    SELECT o.*, nextval(pg_get_serial_sequence('tidepool_jobs', 'id')) AS job_id
    FROM unnest($6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::jsonb[], $11::int2[],
                $12::int4[])
        AS o(schedule, scheduled_at, queue, task, args, priority, max_attempts)
    WHERE o.schedule IN (SELECT name FROM moved) AND o.scheduled_at <= now()
), occurred AS (
    INSERT INTO tidepool_occurrences (schedule, scheduled_at, job_id, enqueued_by)
    SELECT schedule, scheduled_at, job_id, $13 FROM due
    ON CONFLICT (schedule, scheduled_at) DO NOTHING
    RETURNING schedule, job_id
), enqueued AS (
    INSERT INTO tidepool_jobs (id, queue, task, args, priority, run_at, max_attempts)
    OVERRIDING SYSTEM VALUE
    SELECT due.job_id, due.queue, due.task, due.args, due.priority, due.scheduled_at, due.max_attempts
    FROM due JOIN occurred USING (job_id)
)
SELECT m.name, (SELECT count(*) FROM occurred o WHERE o.schedule = m.name) FROM moved m";

/// Forgets schedules no worker has declared for `$1` ms, and prunes up to
/// `$3` occurrences older than `$2` ms.
const FORGET_SCHEDULES: &str = "
WITH forgotten AS (
    DELETE FROM tidepool_schedules WHERE declared_at < now() - $1 * interval '1 millisecond'
    RETURNING name
), pruned AS (
    DELETE FROM tidepool_occurrences WHERE (schedule, scheduled_at) IN (
        SELECT schedule, scheduled_at FROM tidepool_occurrences
        WHERE enqueued_at < now() - $2 * interval '1 millisecond'
        ORDER BY enqueued_at LIMIT $3 FOR UPDATE SKIP LOCKED)
    RETURNING 1
)
SELECT (SELECT count(*) FROM forgotten), (SELECT count(*) FROM pruned)";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn schedule_params(schedule: Schedule) -> (Option<DateTime<Utc>>, i64) {
    match schedule {
        Schedule::Now => (None, 0),
        Schedule::At(at) => (Some(at), 0),
        Schedule::After(delay) => (None, millis(delay)),
    }
}

/// A unique key's holder can finish between the conflict and the lookup;
/// the insert is then tried again, this many times at most.
const UNIQUE_RACE_RETRIES: usize = 5;

/// Inserts one (validated) job, or finds the pending job holding its unique
/// key. `None` only if the key's holders kept finishing between the
/// conflict and the lookup, `UNIQUE_RACE_RETRIES` (5) times in a row.
pub async fn enqueue(client: &impl Executor, job: &NewJob) -> Result<Option<Enqueued>, Error> {
    for _ in 0..UNIQUE_RACE_RETRIES {
        if let Some(enqueued) = enqueue_once(client, job).await? {
            return Ok(Some(enqueued));
        }
    }
    Ok(None)
}

async fn enqueue_once(client: &impl Executor, job: &NewJob) -> Result<Option<Enqueued>, Error> {
    let (at, delay_ms) = schedule_params(job.schedule);
    let rows = client
        .query_unnamed(
            ENQUEUE,
            &[
                (&job.queue, Type::TEXT),
                (&job.task, Type::TEXT),
                (&job.args, Type::JSONB),
                (&job.priority, Type::INT2),
                (&at, Type::TIMESTAMPTZ),
                (&delay_ms, Type::INT8),
                (&job.max_attempts, Type::INT4),
                (&job.unique_key, Type::TEXT),
            ],
        )
        .await?;
    Ok(rows.first().map(|row| Enqueued { id: row.get(0), duplicate: row.get(1) }))
}

/// Inserts `jobs` in one statement. The result is in input order; a job whose
/// unique key is held by a pending job (or by an earlier job of the same
/// batch) gets that job's id with `duplicate` set, and `None` if the holder
/// finished before it could be looked up.
pub async fn enqueue_many(client: &impl Executor, jobs: &[NewJob]) -> Result<Vec<Option<Enqueued>>, Error> {
    let mut queues = Vec::with_capacity(jobs.len());
    let mut tasks = Vec::with_capacity(jobs.len());
    let mut args = Vec::with_capacity(jobs.len());
    let mut priorities = Vec::with_capacity(jobs.len());
    let mut ats = Vec::with_capacity(jobs.len());
    let mut delays = Vec::with_capacity(jobs.len());
    let mut attempts = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (at, delay_ms) = schedule_params(job.schedule);
        queues.push(job.queue.as_str());
        tasks.push(job.task.as_str());
        args.push(&job.args);
        priorities.push(job.priority);
        ats.push(at);
        delays.push(delay_ms);
        attempts.push(job.max_attempts);
        keys.push(job.unique_key.as_deref());
    }
    let rows = client
        .query_unnamed(
            ENQUEUE_MANY,
            &[
                (&queues, Type::TEXT_ARRAY),
                (&tasks, Type::TEXT_ARRAY),
                (&args, Type::JSONB_ARRAY),
                (&priorities, Type::INT2_ARRAY),
                (&ats, Type::TIMESTAMPTZ_ARRAY),
                (&delays, Type::INT8_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let mut inserted: Vec<(i64, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    inserted.sort_unstable_by_key(|(id, _)| *id);
    let mut keyless = inserted.iter().filter(|(_, key)| key.is_none()).map(|(id, _)| *id);
    let by_key: HashMap<&str, i64> =
        inserted.iter().filter_map(|(id, key)| Some((key.as_deref()?, *id))).collect();
    // Keys whose inserted job has been handed out: later jobs of the batch
    // with the same key are its duplicates.
    let mut handed_out: HashSet<&str> = HashSet::new();

    let held: Vec<&str> =
        jobs.iter().filter_map(|j| j.unique_key.as_deref()).filter(|k| !by_key.contains_key(k)).collect();
    let mut holders: HashMap<String, i64> = HashMap::new();
    if !held.is_empty() {
        let rows = client.query_unnamed(PENDING_BY_UNIQUE_KEY, &[(&held, Type::TEXT_ARRAY)]).await?;
        holders = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }

    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let outcome = match job.unique_key.as_deref() {
            None => keyless.next().map(|id| Enqueued { id, duplicate: false }),
            Some(key) => match by_key.get(key) {
                Some(&id) => Some(Enqueued { id, duplicate: !handed_out.insert(key) }),
                None => holders.get(key).map(|&id| Enqueued { id, duplicate: true }),
            },
        };
        out.push(outcome);
    }
    Ok(out)
}

/// Claims up to `limit` due jobs of `queue` for `worker` with a lease.
pub async fn claim(
    client: &impl Executor,
    queue: &str,
    limit: i64,
    worker: &str,
    lease: Duration,
) -> Result<Vec<ClaimedJob>, Error> {
    let rows = client
        .query_unnamed(
            CLAIM,
            &[
                (&queue, Type::TEXT),
                (&limit, Type::INT8),
                (&worker, Type::TEXT),
                (&millis(lease), Type::INT8),
            ],
        )
        .await?;
    Ok(rows.iter().map(claimed_job).collect())
}

fn claimed_job(row: &Row) -> ClaimedJob {
    ClaimedJob {
        id: row.get(0),
        queue: row.get(1),
        task: row.get(2),
        args: row.get(3),
        attempt: row.get(4),
        max_attempts: row.get(5),
        latency_seconds: row.get::<_, f64>(6).max(0.0),
    }
}

/// A job's identity under its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The job.
    pub id: i64,
    /// The attempt that holds it.
    pub attempt: i32,
}

fn lease_columns(leases: impl Iterator<Item = Lease>) -> (Vec<i64>, Vec<i32>) {
    leases.map(|l| (l.id, l.attempt)).unzip()
}

/// Finishes succeeded jobs; each result (if any) is kept in the results
/// table. Returns the ids finished: a job missing from it had lost its lease.
pub async fn complete(client: &impl Executor, done: &[(Lease, Option<Value>)]) -> Result<Vec<i64>, Error> {
    let (ids, attempts) = lease_columns(done.iter().map(|(l, _)| *l));
    let results: Vec<Option<&Value>> = done.iter().map(|(_, r)| r.as_ref()).collect();
    let rows = client
        .query_unnamed(
            COMPLETE,
            &[(&ids, Type::INT8_ARRAY), (&attempts, Type::INT4_ARRAY), (&results, Type::JSONB_ARRAY)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// One failed attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The attempt that failed.
    pub lease: Lease,
    /// Why.
    pub error: String,
    /// Backoff before the next attempt, if there is one.
    pub retry_in: Duration,
    /// Stop here whatever attempts are left.
    pub give_up: Option<GiveUp>,
}

/// How a failed job ends when it is not to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Retrying cannot help (a fatal error).
    Dead,
    /// Its cancellation was asked for.
    Cancelled,
}

/// What [`fail`] and [`rescue`] did to one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Due again after its backoff.
    Retried,
    /// Out of attempts, or given up.
    Dead,
    /// Cancelled.
    Cancelled,
}

fn settled_rows(rows: &[Row]) -> Vec<(i64, Settled)> {
    rows.iter()
        .map(|r| {
            let outcome = match r.get::<_, &str>(1) {
                "retried" => Settled::Retried,
                "cancelled" => Settled::Cancelled,
                _ => Settled::Dead,
            };
            (r.get(0), outcome)
        })
        .collect()
}

/// Records failed attempts: each job is retried after its backoff or, out
/// of attempts (or told to stop), moved to the dead table with its errors.
pub async fn fail(client: &impl Executor, failures: &[Failure]) -> Result<Vec<(i64, Settled)>, Error> {
    let (ids, attempts) = lease_columns(failures.iter().map(|f| f.lease));
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let retry_in: Vec<i64> = failures.iter().map(|f| millis(f.retry_in)).collect();
    let final_states: Vec<Option<&str>> = failures
        .iter()
        .map(|f| {
            f.give_up.map(|g| match g {
                GiveUp::Dead => "dead",
                GiveUp::Cancelled => "cancelled",
            })
        })
        .collect();
    let rows = client
        .query_unnamed(
            FAIL,
            &[
                (&ids, Type::INT8_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&errors, Type::TEXT_ARRAY),
                (&retry_in, Type::INT8_ARRAY),
                (&final_states, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    Ok(settled_rows(&rows))
}

/// Fails up to `limit` jobs whose lease expired, so they run again (or die).
pub async fn rescue(client: &impl Executor, limit: i64) -> Result<Vec<(i64, Settled)>, Error> {
    let rows = client.query_unnamed(RESCUE, &[(&limit, Type::INT8)]).await?;
    Ok(settled_rows(&rows))
}

/// Renews leases. Returns, for each job still held, whether it is to be cancelled.
pub async fn heartbeat(
    client: &impl Executor,
    leases: &[Lease],
    lease: Duration,
) -> Result<HashMap<i64, bool>, Error> {
    let (ids, attempts) = lease_columns(leases.iter().copied());
    let rows = client
        .query_unnamed(
            HEARTBEAT,
            &[(&ids, Type::INT8_ARRAY), (&attempts, Type::INT4_ARRAY), (&millis(lease), Type::INT8)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Hands claimed jobs back as available. Returns the ids handed back.
pub async fn hand_back(client: &impl Executor, leases: &[Lease]) -> Result<Vec<i64>, Error> {
    let (ids, attempts) = lease_columns(leases.iter().copied());
    let rows =
        client.query_unnamed(HAND_BACK, &[(&ids, Type::INT8_ARRAY), (&attempts, Type::INT4_ARRAY)]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Cancels a pending job at once, or asks a running one's worker to stop it.
pub async fn cancel(client: &impl Executor, id: i64) -> Result<Cancelled, Error> {
    let rows = client.query_unnamed(CANCEL, &[(&id, Type::INT8)]).await?;
    Ok(match rows.first().map(|r| r.get::<_, &str>(0)) {
        Some("cancelled") => Cancelled::Cancelled,
        Some("requested") => Cancelled::Requested,
        _ => Cancelled::NotPending,
    })
}

/// A job wherever it is, if its record is kept.
pub async fn lookup(client: &impl Executor, id: i64) -> Result<Option<JobView>, Error> {
    let rows = client.query_unnamed(LOOKUP, &[(&id, Type::INT8)]).await?;
    Ok(rows.first().map(|r| JobView {
        id: r.get(0),
        task: r.get(1),
        queue: r.get(2),
        state: JobState::parse(r.get(3)).unwrap_or(JobState::Available),
        args: r.get(4),
        attempts: r.get(5),
        max_attempts: r.get(6),
        priority: r.get(7),
        errors: r.get(8),
        result: r.get(9),
        run_at: r.get(10),
        created_at: r.get(11),
        finished_at: r.get(12),
        cancel_requested: r.get(13),
    }))
}

/// Deletes up to `limit` kept results and up to `limit` dead jobs that
/// finished more than their retention ago. Returns how many of each.
pub async fn prune(
    client: &impl Executor,
    result_retention: Duration,
    dead_retention: Duration,
    limit: i64,
) -> Result<(i64, i64), Error> {
    let results = client
        .query_unnamed(PRUNE_RESULTS, &[(&millis(result_retention), Type::INT8), (&limit, Type::INT8)])
        .await?;
    let dead = client
        .query_unnamed(PRUNE_DEAD, &[(&millis(dead_retention), Type::INT8), (&limit, Type::INT8)])
        .await?;
    let count = |rows: &[Row]| rows.first().map_or(0, |r| r.get::<_, i64>(0));
    Ok((count(&results), count(&dead)))
}

/// One queue's state, as [`queue_stats`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Jobs that are due and not claimed.
    pub available: i64,
    /// Seconds the oldest of them has been due (0 without any).
    pub oldest_available_age: f64,
    /// Jobs claimed and not finished.
    pub running: i64,
}

/// Per queue of `queues`, in one statement: what [`QueueStats`] holds.
pub async fn queue_stats(client: &impl Executor, queues: &[String]) -> Result<Vec<QueueStats>, Error> {
    let rows = client.query_unnamed(QUEUE_STATS, &[(&queues, Type::TEXT_ARRAY)]).await?;
    Ok(rows
        .iter()
        .map(|r| QueueStats {
            queue: r.get(0),
            available: r.get(1),
            oldest_available_age: r.get(2),
            running: r.get(3),
        })
        .collect())
}

/// Declares `names`: inserts the rows of those that have none (their
/// cursor at the database's now: a new schedule does not run its past) and
/// marks the others declared now.
pub async fn declare_schedules(client: &impl Executor, names: &[&str]) -> Result<(), Error> {
    client.query_unnamed(DECLARE_SCHEDULES, &[(&names, Type::TEXT_ARRAY)]).await?;
    Ok(())
}

/// A schedule's row as a look reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleRow {
    /// The schedule.
    pub name: String,
    /// The latest occurrence settled; `None` if the schedule has no row.
    pub cursor: Option<DateTime<Utc>>,
    /// The latest occurrence enqueued.
    pub last_run: Option<DateTime<Utc>>,
    /// Occurrences skipped as missed, in all.
    pub missed: i64,
}

/// The database's clock and the rows of `names`, in one statement.
pub async fn look_at_schedules(
    client: &impl Executor,
    names: &[&str],
) -> Result<(DateTime<Utc>, Vec<ScheduleRow>), Error> {
    let rows = client.query_unnamed(LOOK_AT_SCHEDULES, &[(&names, Type::TEXT_ARRAY)]).await?;
    let now = rows.first().map_or_else(Utc::now, |r| r.get(0));
    let schedules = rows
        .iter()
        .map(|r| ScheduleRow {
            name: r.get(1),
            cursor: r.get(2),
            last_run: r.get(3),
            missed: r.get::<_, Option<i64>>(4).unwrap_or(0),
        })
        .collect();
    Ok((now, schedules))
}

/// One schedule's planned move: its cursor from `seen` to `cursor`,
/// `missed` skipped, `runs` to enqueue as `job`.
#[derive(Debug, Clone)]
pub struct Advance<'a> {
    /// The schedule.
    pub name: &'a str,
    /// The cursor as the look read it.
    pub seen: DateTime<Utc>,
    /// The cursor after the move.
    pub cursor: DateTime<Utc>,
    /// Occurrences skipped.
    pub missed: i64,
    /// Occurrences to enqueue.
    pub runs: &'a [DateTime<Utc>],
    /// The job each occurrence enqueues.
    pub job: &'a NewJob,
}

/// Moves schedules' cursors and enqueues their due occurrences, in one
/// statement as `worker` (only where the cursor still holds the value the
/// look saw, and only occurrences due by the database's clock). Returns,
/// per schedule that this call moved, the jobs it enqueued; a schedule
/// missing from it had been moved by another worker first.
pub async fn advance_schedules(
    client: &impl Executor,
    advances: &[Advance<'_>],
    worker: &str,
) -> Result<Vec<(String, i64)>, Error> {
    let names: Vec<&str> = advances.iter().map(|a| a.name).collect();
    let seen: Vec<DateTime<Utc>> = advances.iter().map(|a| a.seen).collect();
    let cursors: Vec<DateTime<Utc>> = advances.iter().map(|a| a.cursor).collect();
    let missed: Vec<i64> = advances.iter().map(|a| a.missed).collect();
    let last_runs: Vec<Option<DateTime<Utc>>> = advances.iter().map(|a| a.runs.last().copied()).collect();
    let runs = advances.iter().flat_map(|a| a.runs.iter().map(move |at| (a, *at)));
    let mut schedules = Vec::new();
    let mut ats = Vec::new();
    let mut queues = Vec::new();
    let mut tasks = Vec::new();
    let mut args = Vec::new();
    let mut priorities = Vec::new();
    let mut attempts = Vec::new();
    for (advance, at) in runs {
        schedules.push(advance.name);
        ats.push(at);
        queues.push(advance.job.queue.as_str());
        tasks.push(advance.job.task.as_str());
        args.push(&advance.job.args);
        priorities.push(advance.job.priority);
        attempts.push(advance.job.max_attempts);
    }
    let rows = client
        .query_unnamed(
            ADVANCE_SCHEDULES,
            &[
                (&names, Type::TEXT_ARRAY),
                (&seen, Type::TIMESTAMPTZ_ARRAY),
                (&cursors, Type::TIMESTAMPTZ_ARRAY),
                (&missed, Type::INT8_ARRAY),
                (&last_runs, Type::TIMESTAMPTZ_ARRAY),
                (&schedules, Type::TEXT_ARRAY),
                (&ats, Type::TIMESTAMPTZ_ARRAY),
                (&queues, Type::TEXT_ARRAY),
                (&tasks, Type::TEXT_ARRAY),
                (&args, Type::JSONB_ARRAY),
                (&priorities, Type::INT2_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&worker, Type::TEXT),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Forgets schedules not declared for `forget_after` and prunes up to
/// `limit` occurrences older than `retention`. Returns how many of each.
pub async fn forget_schedules(
    client: &impl Executor,
    forget_after: Duration,
    retention: Duration,
    limit: i64,
) -> Result<(i64, i64), Error> {
    let rows = client
        .query_unnamed(
            FORGET_SCHEDULES,
            &[(&millis(forget_after), Type::INT8), (&millis(retention), Type::INT8), (&limit, Type::INT8)],
        )
        .await?;
    Ok(rows.first().map_or((0, 0), |r| (r.get(0), r.get(1))))
}
