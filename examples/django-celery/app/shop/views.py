"""The seed's `/slow-query/`, and a way to start and count its slow tasks.

Bad input gets a 400 with a JSON error; a database that does not answer a
503, never a traceback.
"""
import os
import uuid

from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.utils import timezone

from .models import Backlog, Tick, TaskRun
from .tasks import slow_query_task

MAX_TASKS = 1000
MAX_SECONDS = 60.0


def healthz(request):
    return JsonResponse({"status": "ok"})


def readyz(request):
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as error:
        return JsonResponse({"status": "unavailable", "error": str(error).strip()}, status=503)
    return JsonResponse({"status": "ok"})


def _number(request, name, default, cast, low, high):
    raw = request.GET.get(name)
    if raw is None:
        return default, None
    try:
        value = cast(raw)
    except ValueError:
        return None, f"{name} must be a number"
    if not low <= value <= high:
        return None, f"{name} must be from {low} to {high}"
    return value, None


def slow_query(request):
    seconds, error = _number(request, "seconds", 5.0, float, 0.0, MAX_SECONDS)
    if error:
        return JsonResponse({"error": error}, status=400)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s)", [seconds])
    except DatabaseError as error:
        return JsonResponse({"error": str(error).strip()}, status=503)
    return JsonResponse({"message": "Slow query completed", "pod": os.environ.get("HOSTNAME", "")})


def enqueue_slow(request):
    if request.method != "POST":
        return JsonResponse({"error": "POST only"}, status=405)
    count, error = _number(request, "count", 1, int, 1, MAX_TASKS)
    seconds = None
    if not error:
        seconds, error = _number(request, "seconds", 5.0, float, 0.0, MAX_SECONDS)
    batch = request.GET.get("batch", "")
    if not error and not (1 <= len(batch) <= 64 and batch.replace("-", "").replace("_", "").isalnum()):
        error = "batch must be 1 to 64 of letters, digits, '-' and '_'"
    if error:
        return JsonResponse({"error": error}, status=400)
    # The backlog rows first, in one statement: a worker that finishes a
    # task before the rest are sent finds its row to delete.
    ids = [uuid.uuid4() for _ in range(count)]
    now = timezone.now()
    try:
        Backlog.objects.bulk_create([Backlog(task_id=i, batch=batch, sent_at=now) for i in ids])
    except DatabaseError as error:
        return JsonResponse({"error": str(error).strip()}, status=503)
    for sent, task_id in enumerate(ids):
        try:
            slow_query_task.apply_async((batch, seconds), task_id=str(task_id))
        except Exception as error:  # the broker away: what was not sent is no backlog
            Backlog.objects.filter(task_id__in=ids[sent:]).delete()
            return JsonResponse({"error": f"the broker: {error}", "enqueued": sent}, status=503)
    return JsonResponse({"enqueued": count, "batch": batch}, status=202)


def task_runs(request):
    batch = request.GET.get("batch", "")
    if not batch:
        return JsonResponse({"error": "batch is required"}, status=400)
    try:
        runs = list(TaskRun.objects.filter(batch=batch).values_list("started", "finished", "hostname"))
        backlog = Backlog.objects.filter(batch=batch).count()
    except DatabaseError as error:
        return JsonResponse({"error": str(error).strip()}, status=503)
    # The most runs that overlapped: a sweep over starts and ends.
    events = sorted([(s, 1) for s, _, _ in runs] + [(f, -1) for _, f, _ in runs], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    first_start = min((s for s, _, _ in runs), default=None)
    last_finish = max((f for _, f, _ in runs), default=None)
    span = (last_finish - first_start).total_seconds() if runs else None
    return JsonResponse(
        {
            "batch": batch,
            "runs": len(runs),
            # Tasks sent and not yet done.
            "backlog": backlog,
            "peak_overlap": peak,
            "hosts": sorted({h for _, _, h in runs}),
            "first_start": first_start,
            "last_finish": last_finish,
            # From the first run's start to the last one's end, in seconds.
            "span_seconds": span,
        }
    )


def ticks(request):
    """The clock's ticks in order: how many, from which beats (each beat's
    ticks in one run, so `switches` counts the hand-overs and `alternations`
    a beat that sent again after another had: two beats at once), and the
    gaps between ticks."""
    try:
        rows = list(Tick.objects.order_by("ran_at", "id").values_list("origin", "ran_at"))
    except DatabaseError as error:
        return JsonResponse({"error": str(error).strip()}, status=503)
    runs = []
    latest = 0
    for origin, _ in rows:
        if not runs or runs[-1] != origin:
            runs.append(origin)
            latest = 0
        latest += 1
    pairs = list(zip(rows, rows[1:]))
    gaps = [(b - a).total_seconds() for (_, a), (_, b) in pairs]
    # From one beat's last tick to the next beat's first: each hand-over.
    handovers = [(b - a).total_seconds() for (x, a), (y, b) in pairs if x != y]
    return JsonResponse(
        {
            "count": len(rows),
            "origins": sorted(set(runs)),
            "switches": max(len(runs) - 1, 0),
            "alternations": len(runs) - len(set(runs)),
            "longest_gap_seconds": max(gaps, default=None),
            "shortest_gap_seconds": min(gaps, default=None),
            "handover_gaps_seconds": handovers,
            # Ticks of the newest beat so far.
            "latest_count": latest,
        }
    )
