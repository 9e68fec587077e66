from django.db import models


class TaskRun(models.Model):
    """One run of `slow_query_task`: when it slept and where, so a test can
    count the runs and how many overlapped."""

    batch = models.CharField(max_length=64, db_index=True)
    hostname = models.CharField(max_length=255)
    started = models.DateTimeField()
    finished = models.DateTimeField()
