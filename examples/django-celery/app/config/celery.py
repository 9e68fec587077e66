"""The Celery app, with the seed's fixup: every task closes its database
connection when it ends, so a greenlet never keeps one between tasks."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

Celery.builtin_fixups = {"config.celery_fixups:custom_fixup"}

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
