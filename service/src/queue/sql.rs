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
//! orders would deadlock. The two statements every job goes through,
//! [`claim`] and [`complete`], then reach the rows they locked by `ctid`
//! (one heap page each) rather than joining `id` back; each says why that
//! is exact.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Error, Row};

use crate::db::Executor;

use super::job::{Cancelled, ClaimedJob, Enqueued, JobState, JobView, NewJob, Schedule};
use super::rate_limit::RateLimit;
use super::workflow::{self, StageState, StageView, Workflow, WorkflowView};

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
///
/// The update reaches the rows it locked by their `ctid` (a TID scan: one
/// heap page each), not by joining `id` back (a primary-key descent each,
/// or a hash of the whole table, as the planner's estimates fall). That is
/// exact here because an available job is never updated into another
/// available version: a row locked at a version this statement's snapshot
/// cannot see (claimed and handed back since) is passed over, stays
/// available and is claimed next time.
const CLAIM: &str = "
WITH picked AS (
    SELECT ctid FROM tidepool_jobs
    WHERE state = 'available' AND queue = $1 AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tidepool_jobs j
SET state = 'running', attempt = j.attempt + 1, worker = $3, attempted_at = now(),
    lease_expires_at = now() + $4 * interval '1 millisecond'
WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM picked))
RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.max_attempts,
          EXTRACT(epoch FROM now() - j.run_at)::float8, j.group_id";

/// [`CLAIM`] under global rate limits: `$5` the keys of the limits that
/// apply ('queue:<queue>', 'task:<name>' for each limited task).
///
/// Each limit's row is locked (in key order, so concurrent claimers queue
/// on it rather than deadlock) and read at its latest version. The claim
/// time `at` is the clock, or the latest time in any of the logs if that is
/// later: a limit's log only ever grows at its end, so trimming what is
/// older than one period can never drop a claim a later window needs. A
/// limit has room for `max_claims` minus the log's claims after
/// `at - period`; a limit without a row (not declared yet) has none. Jobs
/// of a limit without room are passed over in the scan (they stay available,
/// in the queue gauges, and are claimed once it has room; a queue whose own
/// limit has no room is not scanned at all, and a queue limit's room bounds
/// the scan); the rest are
/// ranked per task and in all, and claimed as far as each limit's room
/// goes, reached by `ctid` as in [`CLAIM`]. Every claimed job is appended
/// to the logs of its limits at `at`, which is also its `attempted_at`.
///
/// Besides the claimed jobs, one row with a NULL id tells, when a limit is
/// full, how many seconds until its oldest claim leaves the window.
const CLAIM_LIMITED: &str = "
WITH keys AS (
    SELECT DISTINCT k AS key FROM unnest($5::text[]) AS k
), lim AS (
    SELECT l.key, l.max_claims, l.period_ms, l.recent FROM tidepool_rate_limits l
    WHERE l.key IN (SELECT key FROM keys)
    ORDER BY l.key
    FOR UPDATE
), clock AS (
    SELECT greatest(clock_timestamp(), (SELECT max(t) FROM lim, unnest(lim.recent) AS t)) AS at
), room AS (
    SELECT k.key, l.period_ms,
           COALESCE(l.max_claims - w.claims, 0) AS room,
           COALESCE(w.oldest, c.at) + COALESCE(l.period_ms, 1000) * interval '1 millisecond' AS frees_at
    FROM keys k CROSS JOIN clock c
    LEFT JOIN lim l ON l.key = k.key
    LEFT JOIN LATERAL (
        SELECT count(*) AS claims, min(t) AS oldest FROM unnest(l.recent) AS t
        WHERE t > c.at - l.period_ms * interval '1 millisecond'
    ) w ON true
), candidates AS (
    SELECT j.ctid, j.id, j.task, j.priority, j.run_at FROM tidepool_jobs j
    WHERE j.state = 'available' AND j.queue = $1 AND j.run_at <= now()
      -- Evaluated once: a queue without room is not scanned at all.
      AND NOT EXISTS (SELECT 1 FROM room r WHERE r.key = 'queue:' || $1 AND r.room <= 0)
      AND NOT EXISTS (SELECT 1 FROM room r WHERE r.key = 'task:' || j.task AND r.room <= 0)
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT least($2, (SELECT r.room FROM room r WHERE r.key = 'queue:' || $1))
    FOR UPDATE OF j SKIP LOCKED
), ranked AS (
    SELECT c.ctid, c.task,
           row_number() OVER (PARTITION BY c.task ORDER BY c.priority DESC, c.run_at, c.id) AS nth_of_task,
           row_number() OVER (ORDER BY c.priority DESC, c.run_at, c.id) AS nth
    FROM candidates c
), picked AS (
    SELECT r.ctid FROM ranked r
    LEFT JOIN room t ON t.key = 'task:' || r.task
    LEFT JOIN room q ON q.key = 'queue:' || $1
    WHERE (t.key IS NULL OR r.nth_of_task <= t.room) AND (q.key IS NULL OR r.nth <= q.room)
), claimed AS (
    UPDATE tidepool_jobs j
    SET state = 'running', attempt = j.attempt + 1, worker = $3, attempted_at = (SELECT at FROM clock),
        lease_expires_at = now() + $4 * interval '1 millisecond'
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.max_attempts,
              EXTRACT(epoch FROM now() - j.run_at)::float8 AS latency, j.group_id
), used AS (
    SELECT r.key, count(*)::int AS n FROM claimed c
    JOIN room r ON r.key = 'task:' || c.task OR r.key = 'queue:' || c.queue
    GROUP BY r.key
), logged AS (
    UPDATE tidepool_rate_limits l
    SET recent = ARRAY(SELECT t FROM unnest(l.recent) AS t
                       WHERE t > c.at - l.period_ms * interval '1 millisecond' ORDER BY t)
                 || array_fill(c.at, ARRAY[u.n])
    FROM used u CROSS JOIN clock c
    WHERE l.key = u.key
)
SELECT id, queue, task, args, attempt, max_attempts, latency, group_id FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL,
       EXTRACT(epoch FROM min(r.frees_at) - clock_timestamp())::float8, NULL
FROM room r LEFT JOIN used u ON u.key = r.key
WHERE r.room - COALESCE(u.n, 0) <= 0
HAVING count(*) > 0";

/// Finishes succeeded jobs: out of the hot table, and into the results table
/// when a result is given. Returns the ids it finished.
///
/// The delete reaches the rows it locked by `ctid`, as [`CLAIM`] does, with
/// one exception: a running job's lease may be renewed (a new version)
/// after this statement's snapshot was taken and before it locked the row;
/// it is then locked at a version the TID scan cannot see, and the second
/// delete finds it by `id` instead (PostgreSQL follows the row to the
/// version it locked).
const COMPLETE: &str = "
WITH d AS (
    SELECT * FROM unnest($1::int8[], $2::int4[], $3::jsonb[]) AS d(id, attempt, result)
), locked AS (
    SELECT j.ctid, j.id, d.result FROM tidepool_jobs j JOIN d ON j.id = d.id AND j.attempt = d.attempt
    WHERE j.state = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), by_ctid AS (
    DELETE FROM tidepool_jobs j
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM locked))
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.run_at, j.created_at, j.attempted_at
), by_id AS (
    DELETE FROM tidepool_jobs j
    WHERE j.id = ANY(ARRAY(SELECT id FROM locked EXCEPT ALL SELECT id FROM by_ctid))
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.run_at, j.created_at, j.attempted_at
), done AS (
    SELECT * FROM by_ctid UNION ALL SELECT * FROM by_id
), kept AS (
    INSERT INTO tidepool_job_results
        (id, queue, task, args, attempts, result, errors, run_at, created_at, started_at, finished_at)
    SELECT done.id, queue, task, args, attempt, l.result, errors, run_at, created_at, attempted_at, now()
    FROM done JOIN locked l ON l.id = done.id
    WHERE l.result IS NOT NULL
)
SELECT id FROM done";

/// [`COMPLETE`] for a batch that holds members of workflows (`$4`: keep
/// results in the results table). Per stage that members finished, one
/// update adds them to `succeeded`: concurrent statements finishing
/// members of one stage queue on its row and each adds to what the one
/// before left, so exactly one of them sees the stage complete. That one
/// marks it succeeded, starts the next stage and inserts its jobs. Outputs
/// are kept for the next stage to read (the last stage's are not needed).
/// Members of a stage that has ended otherwise (failed, cancelled) finish
/// as plain jobs. Each row: a finished id, and how many jobs of next stages
/// this statement inserted.
const COMPLETE_MEMBERS: &str = "
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
              j.attempted_at, d.result, j.group_id
), kept AS (
    INSERT INTO tidepool_job_results
        (id, queue, task, args, attempts, result, errors, run_at, created_at, started_at, finished_at)
    SELECT id, queue, task, args, attempt, result, errors, run_at, created_at, attempted_at, now()
    FROM done WHERE result IS NOT NULL AND $4
), finished AS (
    SELECT group_id AS id, count(*)::int AS n FROM done WHERE group_id IS NOT NULL GROUP BY group_id
), stages AS (
    SELECT g.id, f.n FROM tidepool_groups g JOIN finished f ON g.id = f.id
    WHERE g.state = 'running'
    ORDER BY g.id
    FOR UPDATE OF g
), counted AS (
    UPDATE tidepool_groups g
    SET succeeded = g.succeeded + s.n,
        state = CASE WHEN g.succeeded + s.n >= g.total THEN 'succeeded' ELSE 'running' END,
        finished_at = CASE WHEN g.succeeded + s.n >= g.total THEN now() END
    FROM stages s
    WHERE g.id = s.id
    RETURNING g.id, g.workflow_id, g.stage, g.state, g.last
), outputs AS (
    INSERT INTO tidepool_group_outputs (group_id, job_id, output)
    SELECT done.group_id, done.id, COALESCE(done.result, 'null'::jsonb)
    FROM done JOIN counted c ON c.id = done.group_id
    WHERE NOT c.last
), next_stage AS (
    UPDATE tidepool_groups n
    SET state = 'running', started_at = now()
    FROM counted c
    WHERE c.state = 'succeeded' AND NOT c.last
      AND n.workflow_id = c.workflow_id AND n.stage = c.stage + 1 AND n.state = 'waiting'
    RETURNING n.id, n.jobs
), next_jobs AS (
    INSERT INTO tidepool_jobs (queue, task, args, priority, max_attempts, group_id)
    SELECT m.job->>'queue', m.job->>'task', m.job->'args', (m.job->>'priority')::int2,
           (m.job->>'max_attempts')::int4, n.id
    FROM next_stage n CROSS JOIN LATERAL jsonb_array_elements(n.jobs) WITH ORDINALITY AS m(job, ord)
    ORDER BY n.id, m.ord
    RETURNING 1
)
SELECT id, (SELECT count(*) FROM next_jobs) FROM done";

/// Ends the workflows of the members in `buried` (`id`, `group_id`,
/// `final_state`, `last_error`) that died or were cancelled: every stage
/// of such a workflow not yet ended becomes 'failed' (or 'cancelled' for a
/// cancelled member), with the member and its error. So no later stage
/// runs, and a chord's callback never does. Stages are locked in id order
/// (the order [`COMPLETE_MEMBERS`] locks them in).
macro_rules! end_workflows {
    () => {
        "
, ending AS (
    SELECT DISTINCT ON (g.workflow_id) g.workflow_id, b.id AS job_id, b.final_state, b.last_error
    FROM buried b JOIN tidepool_groups g ON g.id = b.group_id
    ORDER BY g.workflow_id, b.id
), doomed AS (
    SELECT g.id, e.job_id, e.final_state, e.last_error
    FROM tidepool_groups g JOIN ending e ON e.workflow_id = g.workflow_id
    WHERE g.state IN ('running', 'waiting')
    ORDER BY g.id
    FOR UPDATE OF g
), ended AS (
    UPDATE tidepool_groups g
    SET state = CASE WHEN d.final_state = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
        error = d.last_error, failed_job_id = d.job_id, finished_at = now()
    FROM doomed d
    WHERE g.id = d.id
)"
    };
}

/// The tail shared by [`FAIL`] and [`RESCUE`]: given `f(id, attempt, error,
/// retry_in_ms, final_state)`, each running job either goes back to
/// available after its backoff (error recorded), or, when it is out of
/// attempts, was asked to be cancelled, or `final_state` says so, moves to
/// the dead table (and ends its workflow, if it is a member). Returns
/// `(id, outcome)`: 'retried', 'dead' or 'cancelled'.
macro_rules! settle_failed {
    () => {
        concat!(
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
              failed.final_state, j.group_id, failed.error AS last_error
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, final_state, attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
)",
            end_workflows!(),
            "
SELECT id, 'retried' FROM retried
UNION ALL
SELECT id, final_state FROM buried"
        )
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
const HAND_BACK: &str = concat!(
    "
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
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.unique_key, j.run_at, j.created_at,
              j.group_id, 'cancelled' AS final_state, 'cancelled while running' AS last_error
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, 'cancelled', attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
)",
    end_workflows!(),
    "
SELECT id FROM handed"
);

/// Cancels job `$1`: a pending one moves to the dead table as cancelled; a
/// running one is flagged, and its worker stops it at its next heartbeat.
const CANCEL: &str = concat!(
    "
WITH target AS (
    SELECT id, state FROM tidepool_jobs WHERE id = $1 FOR UPDATE
), buried AS (
    DELETE FROM tidepool_jobs j USING target t
    WHERE j.id = t.id AND t.state = 'available'
    RETURNING j.id, j.queue, j.task, j.args, j.attempt, j.errors, j.unique_key, j.run_at, j.created_at,
              j.group_id, 'cancelled' AS final_state, 'cancelled before it ran' AS last_error
), archived AS (
    INSERT INTO tidepool_dead_jobs
        (id, queue, task, args, state, attempts, errors, unique_key, run_at, created_at, finished_at)
    SELECT id, queue, task, args, 'cancelled', attempt, errors, unique_key, run_at, created_at, now()
    FROM buried
)",
    end_workflows!(),
    "
, flagged AS (
    UPDATE tidepool_jobs j SET cancel_requested = true FROM target t
    WHERE j.id = t.id AND t.state = 'running'
    RETURNING j.id
)
SELECT CASE WHEN EXISTS (SELECT 1 FROM buried) THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM flagged) THEN 'requested'
            ELSE 'not_pending' END"
);

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

/// Enqueues a workflow: one row per stage (`$1` totals, `$2` the jobs of
/// stages after the first, NULL for the first) and the first stage's jobs
/// (`$3`..`$7`), members of the first stage. Returns the workflow's id (its
/// first stage's) and the first stage's job ids, in input order.
const ENQUEUE_WORKFLOW: &str = "
WITH stages AS (
    SELECT s.stage::int AS stage, s.total, s.jobs, s.stage = cardinality($1::int4[]) AS last,
           nextval(pg_get_serial_sequence('tidepool_groups', 'id')) AS id
    FROM unnest($1::int4[], $2::jsonb[]) WITH ORDINALITY AS s(total, jobs, stage)
), first AS (
    SELECT id FROM stages WHERE stage = 1
), groups AS (
    INSERT INTO tidepool_groups (id, workflow_id, stage, total, last, state, jobs, started_at)
    OVERRIDING SYSTEM VALUE
    SELECT s.id, f.id, s.stage, s.total, s.last, CASE WHEN s.stage = 1 THEN 'running' ELSE 'waiting' END,
           s.jobs, CASE WHEN s.stage = 1 THEN now() END
    FROM stages s CROSS JOIN first f
), members AS (
    INSERT INTO tidepool_jobs (queue, task, args, priority, max_attempts, group_id)
    SELECT m.queue, m.task, m.args, m.priority, m.max_attempts, f.id
    FROM unnest($3::text[], $4::text[], $5::jsonb[], $6::int2[], $7::int4[]) WITH ORDINALITY
         AS m(queue, task, args, priority, max_attempts, ord)
    CROSS JOIN first f
    ORDER BY m.ord
    RETURNING id
)
SELECT (SELECT id FROM first), COALESCE((SELECT array_agg(id ORDER BY id) FROM members), '{}')";

/// Every stage of workflow `$1`, in order.
const LOOKUP_WORKFLOW: &str = "
SELECT stage, state, total, succeeded, error, failed_job_id, created_at, started_at, finished_at
FROM tidepool_groups WHERE workflow_id = $1 ORDER BY stage";

/// The outputs of the stage before stage `$1`, in member order.
const STAGE_INPUTS: &str = "
SELECT o.output FROM tidepool_groups g
JOIN tidepool_groups p ON p.workflow_id = g.workflow_id AND p.stage = g.stage - 1
JOIN tidepool_group_outputs o ON o.group_id = p.id
WHERE g.id = $1
ORDER BY o.job_id";

/// Deletes up to `$3` workflows that ended more than their retention ago
/// (`$1` ms if it succeeded, `$2` ms if not), with their outputs.
const PRUNE_WORKFLOWS: &str = "
WITH ended AS (
    SELECT workflow_id FROM tidepool_groups
    WHERE last AND finished_at < now() - CASE WHEN state = 'succeeded' THEN $1 ELSE $2 END
                                         * interval '1 millisecond'
    ORDER BY finished_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM tidepool_groups g USING ended e WHERE g.workflow_id = e.workflow_id
    RETURNING g.id
), outputs AS (
    DELETE FROM tidepool_group_outputs o USING gone WHERE o.group_id = gone.id
)
SELECT count(DISTINCT workflow_id) FROM ended";

/// Declares rate limits (`$1` keys, `$2` claims, `$3` periods in ms): new
/// ones are inserted, changed ones take the new numbers (their log stays).
/// Limits no worker has declared for `$4` ms are forgotten.
const DECLARE_RATE_LIMITS: &str = "
WITH forgotten AS (
    DELETE FROM tidepool_rate_limits
    WHERE declared_at < now() - $4 * interval '1 millisecond' AND key <> ALL($1::text[])
)
INSERT INTO tidepool_rate_limits (key, max_claims, period_ms)
SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[])
ON CONFLICT (key) DO UPDATE
SET max_claims = EXCLUDED.max_claims, period_ms = EXCLUDED.period_ms, declared_at = now()";

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

/// What a claim under rate limits got.
#[derive(Debug, Default)]
pub struct LimitedClaim {
    /// The jobs claimed.
    pub jobs: Vec<ClaimedJob>,
    /// When a limit is full: how long until its oldest claim leaves its
    /// window (zero if it already has).
    pub full_for: Option<Duration>,
}

/// [`claim`] under the global rate limits `keys` (their rows in
/// `tidepool_rate_limits`, [`crate::queue::rate_limit::task_key`], `queue_key`).
pub async fn claim_limited(
    client: &impl Executor,
    queue: &str,
    limit: i64,
    worker: &str,
    lease: Duration,
    keys: &[String],
) -> Result<LimitedClaim, Error> {
    let rows = client
        .query_unnamed(
            CLAIM_LIMITED,
            &[
                (&queue, Type::TEXT),
                (&limit, Type::INT8),
                (&worker, Type::TEXT),
                (&millis(lease), Type::INT8),
                (&keys, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let mut claim = LimitedClaim::default();
    for row in &rows {
        if row.get::<_, Option<i64>>(0).is_some() {
            claim.jobs.push(claimed_job(row));
        } else {
            let seconds = row.get::<_, Option<f64>>(6).unwrap_or(0.0);
            claim.full_for = Some(Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::ZERO));
        }
    }
    Ok(claim)
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
        group_id: row.get(7),
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

/// [`complete`] for a batch that holds members of workflows: a member's
/// output is kept for the next stage (whatever `keep_results` says of the
/// results table), and the member that completes its stage starts the next
/// one, in this statement. Returns the ids finished and how many jobs of
/// next stages it inserted.
pub async fn complete_members(
    client: &impl Executor,
    done: &[(Lease, Option<Value>)],
    keep_results: bool,
) -> Result<(Vec<i64>, i64), Error> {
    let (ids, attempts) = lease_columns(done.iter().map(|(l, _)| *l));
    let results: Vec<Option<&Value>> = done.iter().map(|(_, r)| r.as_ref()).collect();
    let rows = client
        .query_unnamed(
            COMPLETE_MEMBERS,
            &[
                (&ids, Type::INT8_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&results, Type::JSONB_ARRAY),
                (&keep_results, Type::BOOL),
            ],
        )
        .await?;
    let started = rows.first().map_or(0, |r| r.get(1));
    Ok((rows.iter().map(|r| r.get(0)).collect(), started))
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

/// Inserts a (validated) workflow: its stages, and its first stage's jobs.
/// Returns the workflow's id and the first stage's job ids, in order.
pub async fn enqueue_workflow(client: &impl Executor, workflow: &Workflow) -> Result<(i64, Vec<i64>), Error> {
    let stages = workflow.stages();
    let totals: Vec<i32> = stages.iter().map(|s| i32::try_from(s.len()).unwrap_or(i32::MAX)).collect();
    let later: Vec<Option<Value>> = stages
        .iter()
        .enumerate()
        .map(|(i, stage)| (i > 0).then(|| Value::Array(stage.iter().map(workflow::job_spec).collect())))
        .collect();
    let first = stages.first().map(Vec::as_slice).unwrap_or_default();
    let queues: Vec<&str> = first.iter().map(|j| j.queue.as_str()).collect();
    let tasks: Vec<&str> = first.iter().map(|j| j.task.as_str()).collect();
    let args: Vec<&Value> = first.iter().map(|j| &j.args).collect();
    let priorities: Vec<i16> = first.iter().map(|j| j.priority).collect();
    let attempts: Vec<i32> = first.iter().map(|j| j.max_attempts).collect();
    let row = client
        .query_unnamed(
            ENQUEUE_WORKFLOW,
            &[
                (&totals, Type::INT4_ARRAY),
                (&later, Type::JSONB_ARRAY),
                (&queues, Type::TEXT_ARRAY),
                (&tasks, Type::TEXT_ARRAY),
                (&args, Type::JSONB_ARRAY),
                (&priorities, Type::INT2_ARRAY),
                (&attempts, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(row.first().map_or((0, Vec::new()), |r| (r.get(0), r.get(1))))
}

/// Workflow `id`'s stages, if its record is kept.
pub async fn lookup_workflow(client: &impl Executor, id: i64) -> Result<Option<WorkflowView>, Error> {
    let rows = client.query_unnamed(LOOKUP_WORKFLOW, &[(&id, Type::INT8)]).await?;
    let stages: Vec<StageView> = rows
        .iter()
        .map(|r| StageView {
            stage: r.get(0),
            state: StageState::parse(r.get(1)).unwrap_or(StageState::Waiting),
            total: r.get(2),
            succeeded: r.get(3),
            error: r.get(4),
            failed_job: r.get(5),
            created_at: r.get(6),
            started_at: r.get(7),
            finished_at: r.get(8),
        })
        .collect();
    Ok((!stages.is_empty()).then(|| WorkflowView::new(id, stages)))
}

/// The outputs of the stage before `stage` (a group's id), in member order:
/// what the jobs of `stage` read through their context.
pub async fn stage_inputs(client: &impl Executor, stage: i64) -> Result<Vec<Value>, Error> {
    let rows = client.query_unnamed(STAGE_INPUTS, &[(&stage, Type::INT8)]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Deletes up to `limit` workflows that ended more than their retention
/// ago (`succeeded` if they did, `failed` if not). Returns how many.
pub async fn prune_workflows(
    client: &impl Executor,
    succeeded: Duration,
    failed: Duration,
    limit: i64,
) -> Result<i64, Error> {
    let rows = client
        .query_unnamed(
            PRUNE_WORKFLOWS,
            &[(&millis(succeeded), Type::INT8), (&millis(failed), Type::INT8), (&limit, Type::INT8)],
        )
        .await?;
    Ok(rows.first().map_or(0, |r| r.get(0)))
}

/// Declares `limits` (new ones inserted, changed ones updated) and forgets
/// limits nobody has declared for `forget_after`.
pub async fn declare_rate_limits(
    client: &impl Executor,
    limits: &[(String, RateLimit)],
    forget_after: Duration,
) -> Result<(), Error> {
    let keys: Vec<&str> = limits.iter().map(|(k, _)| k.as_str()).collect();
    let claims: Vec<i32> =
        limits.iter().map(|(_, l)| i32::try_from(l.max_claims()).unwrap_or(i32::MAX)).collect();
    let periods: Vec<i64> = limits.iter().map(|(_, l)| millis(l.period())).collect();
    client
        .query_unnamed(
            DECLARE_RATE_LIMITS,
            &[
                (&keys, Type::TEXT_ARRAY),
                (&claims, Type::INT4_ARRAY),
                (&periods, Type::INT8_ARRAY),
                (&millis(forget_after), Type::INT8),
            ],
        )
        .await?;
    Ok(())
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
