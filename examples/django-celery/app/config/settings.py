"""Settings for Tidepool's Django + Celery example.

Everything about the database comes from the plan Tidepool puts in the
container's environment: libpq's PGHOST, PGPORT, PGDATABASE, PGUSER and
PGPASSFILE point at the pod's own PgBouncer (127.0.0.1:6432) as the pod's own
user, whose password is in a file only that pod has. No password is set
here: libpq reads it from PGPASSFILE. The migration Job gets the same
variables pointing at PostgreSQL itself.
"""
import os
import secrets

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The example keeps no sessions or signed data: a key per process is enough.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = ["django.contrib.contenttypes", "shop.apps.ShopConfig"]
MIDDLEWARE = []
ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        # Empty values leave libpq to its variables (PGHOST, PGPASSFILE...).
        "NAME": os.environ.get("PGDATABASE", ""),
        "USER": os.environ.get("PGUSER", ""),
        "HOST": os.environ.get("PGHOST", ""),
        "PORT": os.environ.get("PGPORT", ""),
        # Transaction pooling: a connection per request or task, closed at
        # its end (the seed's recipe), and no server-side cursors, which
        # would outlive the transaction PgBouncer lends a server for.
        "CONN_MAX_AGE": 0,
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"connect_timeout": 5},
    }
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# One task at a time per greenlet: the concurrency is the pool's.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = True
# The clock tier's one Celery beat sends `tick` every TICK_SECONDS; its
# schedule file lives in the pod's memory /tmp (`--schedule`).
TICK_SECONDS = float(os.environ.get("TICK_SECONDS", "10"))
CELERY_BEAT_SCHEDULE = {"tick": {"task": "shop.tasks.tick", "schedule": TICK_SECONDS}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "WARNING")},
}
