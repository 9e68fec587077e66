"""The seed's slow task: `pg_sleep` on a connection through the pod's
PgBouncer, recorded in `shop_taskrun` with its start and end."""
import socket

from celery import shared_task
from django.db import connection
from django.utils import timezone

from .models import TaskRun


@shared_task
def slow_query_task(batch, seconds=5.0):
    started = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [float(seconds)])
    TaskRun.objects.create(batch=batch, hostname=socket.gethostname(), started=started, finished=timezone.now())
    return "Slow query completed"
