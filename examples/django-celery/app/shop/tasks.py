"""The seed's slow task: `pg_sleep` on a connection through the pod's
PgBouncer, recorded in `shop_taskrun` with its start and end, its row of
`shop_backlog` deleted when it ends (the count the worker tier scales on);
and the
periodic `tick` that Celery beat sends, recorded in `shop_tick` with the
beat that sent it."""
import socket

from celery import shared_task
from django.db import connection, transaction
from django.utils import timezone

from .models import Backlog, Tick, TaskRun


@shared_task(bind=True)
def slow_query_task(self, batch, seconds=5.0):
    started = timezone.now()
    backlog = Backlog.objects.filter(task_id=self.request.id)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s)", [float(seconds)])
    except Exception:
        backlog.delete()
        raise
    # The run and the end of its backlog row in one transaction: a reader
    # sees both or neither (a run counted while its row still counted as
    # backlog was seen once in CI).
    with transaction.atomic():
        TaskRun.objects.create(batch=batch, hostname=socket.gethostname(), started=started, finished=timezone.now())
        backlog.delete()
    return "Slow query completed"


@shared_task(bind=True)
def tick(self):
    Tick.objects.create(origin=self.request.origin or "", ran_at=timezone.now())
