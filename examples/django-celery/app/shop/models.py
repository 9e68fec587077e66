from django.db import models


class TaskRun(models.Model):
    """One run of `slow_query_task`: when it slept and where, so a test can
    count the runs and how many overlapped."""

    batch = models.CharField(max_length=64, db_index=True)
    hostname = models.CharField(max_length=255)
    started = models.DateTimeField()
    finished = models.DateTimeField()


class Tick(models.Model):
    """One run of the periodic `tick` task that Celery beat (the example's
    clock tier) sends every TICK_SECONDS: `origin` is the beat process that
    sent it (Celery's message header, `gen<pid>@<pod>`), so a test sees
    whether two beats ever sent at once."""

    origin = models.CharField(max_length=255)
    ran_at = models.DateTimeField(db_index=True)


class Backlog(models.Model):
    """One slow task sent and not yet done: the count the operator scales
    the worker tier on (`worker.autoscaling.query` reads
    `SELECT count(*) FROM shop_backlog`; the broker, Redis, is not
    PostgreSQL). The view writes the row before it sends the task, and the
    task deletes it when it ends, so a task that Celery delivers again (its
    worker killed mid-run, `acks_late`) is counted until it has run."""

    task_id = models.UUIDField(primary_key=True)
    batch = models.CharField(max_length=64)
    sent_at = models.DateTimeField()
