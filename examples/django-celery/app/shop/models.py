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
