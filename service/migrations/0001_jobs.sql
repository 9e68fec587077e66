-- The task queue. Three tables, so the one that is claimed from stays small:
--
-- tidepool_jobs         pending jobs only: available (run_at may be in the
--                       future: "scheduled") or running (claimed, under a
--                       lease). A job leaves it in the statement that
--                       finishes it.
-- tidepool_job_results  succeeded jobs whose task returned a result.
-- tidepool_dead_jobs    jobs that ran out of attempts or were cancelled,
--                       with every attempt's error.
--
-- Workers prune both archives by finished_at after their retention
-- (`tidepool worker --result-retention / --dead-retention`).
--
-- Only built-in types: tokio-postgres looks up enums and domains with a
-- named statement, which PgBouncer 1.18 in transaction mode breaks. States
-- are text with a CHECK.

CREATE TABLE tidepool_jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL,
    task             text        NOT NULL,
    args             jsonb       NOT NULL,
    -- Higher runs first.
    priority         smallint    NOT NULL DEFAULT 0,
    state            text        NOT NULL DEFAULT 'available'
                                 CHECK (state IN ('available', 'running')),
    run_at           timestamptz NOT NULL DEFAULT now(),
    -- Attempts started so far; also the fencing token of the current lease:
    -- a worker finishes a job only if the attempt it ran is still current.
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    unique_key       text,
    -- One object per failed attempt: {"attempt", "at", "error"}.
    errors           jsonb       NOT NULL DEFAULT '[]',
    worker           text,
    lease_expires_at timestamptz,
    cancel_requested boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempted_at     timestamptz
);

-- The claim: one queue, highest priority first, then the oldest due job.
CREATE INDEX tidepool_jobs_claim ON tidepool_jobs (queue, priority DESC, run_at, id)
    WHERE state = 'available';
-- Heartbeats, lease rescue and shutdown hand-back look at running jobs only.
-- Indexing `id` (not the lease) keeps heartbeat updates HOT.
CREATE INDEX tidepool_jobs_running ON tidepool_jobs (id) WHERE state = 'running';
-- A unique key is unique among pending jobs: finished ones have left.
CREATE UNIQUE INDEX tidepool_jobs_unique_key ON tidepool_jobs (unique_key)
    WHERE unique_key IS NOT NULL;

-- The hot table churns all the time but stays small: vacuum it after a few
-- thousand changes, not after 20 % of its size, and at full speed.
ALTER TABLE tidepool_jobs SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_vacuum_insert_threshold = 2000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0
);

CREATE TABLE tidepool_job_results (
    id          bigint      PRIMARY KEY,
    queue       text        NOT NULL,
    task        text        NOT NULL,
    args        jsonb       NOT NULL,
    attempts    integer     NOT NULL,
    result      jsonb       NOT NULL,
    errors      jsonb       NOT NULL,
    run_at      timestamptz NOT NULL,
    created_at  timestamptz NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL
);
CREATE INDEX tidepool_job_results_finished ON tidepool_job_results (finished_at);

CREATE TABLE tidepool_dead_jobs (
    id          bigint      PRIMARY KEY,
    queue       text        NOT NULL,
    task        text        NOT NULL,
    args        jsonb       NOT NULL,
    -- 'dead' (out of attempts, or the task said not to retry) or 'cancelled'.
    state       text        NOT NULL CHECK (state IN ('dead', 'cancelled')),
    attempts    integer     NOT NULL,
    errors      jsonb       NOT NULL,
    unique_key  text,
    run_at      timestamptz NOT NULL,
    created_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL
);
CREATE INDEX tidepool_dead_jobs_finished ON tidepool_dead_jobs (finished_at);

-- Both archives are insert-then-delete in expiry order: vacuum after
-- modest churn.
ALTER TABLE tidepool_job_results SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_insert_scale_factor = 0.05
);
ALTER TABLE tidepool_dead_jobs SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_insert_scale_factor = 0.05
);

-- Workers that have a direct connection LISTEN on tidepool_jobs to claim at
-- once instead of at their next poll; the payload is the queue. One
-- notification per statement and queue (PostgreSQL also folds identical
-- ones within a transaction), sent at commit, so a rolled-back enqueue
-- wakes nobody. Polling alone stays correct: this only cuts latency.
CREATE FUNCTION tidepool_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    due_queue text;
BEGIN
    FOR due_queue IN SELECT DISTINCT queue FROM inserted_jobs WHERE run_at <= now() LOOP
        PERFORM pg_notify('tidepool_jobs', due_queue);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tidepool_jobs_notify
    AFTER INSERT ON tidepool_jobs
    REFERENCING NEW TABLE AS inserted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION tidepool_jobs_notify();
