"""The seed's recipe: every connection is closed when its request ends."""
from django.core import signals
from django.db import connections


def force_close_old_connections(**kwargs):
    for conn in connections.all(initialized_only=True):
        conn.close()


signals.request_finished.connect(force_close_old_connections)
