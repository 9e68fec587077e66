"""The seed's recipe: psycopg2 made cooperative under gevent (psycogreen),
before anything imports it; the Celery app is loaded with Django."""
from psycogreen.gevent import patch_psycopg

patch_psycopg()

from .celery import app as celery_app  # noqa: E402

__all__ = ("celery_app",)
