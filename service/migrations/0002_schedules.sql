-- Periodic tasks (`tidepool::queue::periodic`). A schedule is declared in
-- an application's code; every worker that has it may enqueue its
-- occurrences, and these two tables make each occurrence one job.
--
-- tidepool_schedules    one row per schedule name: the cursor (the latest
--                       occurrence settled, enqueued or skipped as missed)
--                       that workers move forward, never back, in the
--                       statement that enqueues; the latest run and the
--                       missed count for metrics; when a worker last
--                       declared it (rows no worker declares are forgotten).
-- tidepool_occurrences  one row per occurrence enqueued: its identity
--                       (schedule, instant) as the primary key, its job and
--                       who enqueued it. Pruned after a week.

CREATE TABLE tidepool_schedules (
    name        text        PRIMARY KEY,
    cursor_at   timestamptz NOT NULL,
    last_run_at timestamptz,
    missed      bigint      NOT NULL DEFAULT 0,
    declared_at timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tidepool_occurrences (
    schedule     text        NOT NULL,
    scheduled_at timestamptz NOT NULL,
    job_id       bigint      NOT NULL,
    enqueued_by  text        NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, scheduled_at)
);
CREATE INDEX tidepool_occurrences_enqueued ON tidepool_occurrences (enqueued_at);
