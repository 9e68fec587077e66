-- Global rate limits and workflows (chains, groups, chords) of the task
-- queue. Both are decided inside the queue's own statements: a limit in
-- the claim, a workflow's next stage in the statement that finishes the
-- member that completes a stage.
--
-- tidepool_rate_limits    one row per limit, 'task:<name>' or
--                         'queue:<name>', declared by the workers whose
--                         application has it: at most max_claims claims in
--                         any window of period_ms, across every worker.
--                         `recent` is a sliding log: the claim times of the
--                         latest window, oldest first, at most max_claims of
--                         them. A claim locks the row, counts the log,
--                         claims what fits, appends and trims it.
-- tidepool_groups         one row per stage of a workflow (a group is a
--                         workflow of one stage; a chord two, the callback
--                         the second; a chain one stage per link).
--                         `succeeded` counts the stage's members that
--                         succeeded; the statement that makes it `total`
--                         marks the stage succeeded and inserts the next
--                         stage's jobs (held in `jobs` until then). A member
--                         that dies or is cancelled ends every stage of its
--                         workflow not yet ended, with its error.
-- tidepool_group_outputs  each member's output, for the next stage to read
--                         (kept only for stages that have a next one), until
--                         the workflow has ended and its retention passed
--                         (the workers' result retention if it succeeded,
--                         their dead retention if not), whatever the
--                         retention of the members' own results.

CREATE TABLE tidepool_rate_limits (
    key         text          PRIMARY KEY,
    max_claims  integer       NOT NULL CHECK (max_claims BETWEEN 1 AND 10000),
    period_ms   bigint        NOT NULL CHECK (period_ms BETWEEN 100 AND 86400000),
    recent      timestamptz[] NOT NULL DEFAULT '{}',
    declared_at timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE tidepool_groups (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The first stage's id.
    workflow_id   bigint      NOT NULL,
    -- From 1.
    stage         integer     NOT NULL CHECK (stage >= 1),
    total         integer     NOT NULL CHECK (total >= 1),
    -- The workflow's last stage: it keeps no outputs, and its end is the
    -- workflow's (a failure ends every stage at once).
    last          boolean     NOT NULL,
    succeeded     integer     NOT NULL DEFAULT 0,
    state         text        NOT NULL
                              CHECK (state IN ('waiting', 'running', 'succeeded', 'failed', 'cancelled')),
    -- The stage's jobs before they are inserted:
    -- [{"queue", "task", "args", "priority", "max_attempts"}]; NULL for the
    -- first stage (inserted at enqueue).
    jobs          jsonb,
    -- Why the workflow ended without succeeding, and the member it was.
    error         text,
    failed_job_id bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    UNIQUE (workflow_id, stage)
);
-- Pruning finds ended workflows by their last stage.
CREATE INDEX tidepool_groups_ended ON tidepool_groups (finished_at) WHERE last;

CREATE TABLE tidepool_group_outputs (
    group_id bigint NOT NULL,
    job_id   bigint NOT NULL,
    output   jsonb  NOT NULL,
    PRIMARY KEY (group_id, job_id)
);

-- A member's stage. NULL for every job outside a workflow: no default, so
-- adding it rewrites nothing, and the plain path never reads it.
ALTER TABLE tidepool_jobs ADD COLUMN group_id bigint;
