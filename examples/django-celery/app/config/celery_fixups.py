"""The seed's Celery fixup: close the database connection after every task
(Celery's own keeps it for reuse, which under gevent means one connection
per greenlet held between tasks)."""
from __future__ import annotations

from celery.fixups.django import DjangoFixup, DjangoWorkerFixup


class CustomDjangoWorkerFixup(DjangoWorkerFixup):
    def close_database(self, **kwargs) -> None:
        if not self.db_reuse_max:
            return self._close_database(force=True)
        if self._db_recycles >= self.db_reuse_max * 2:
            self._db_recycles = 0
            self._close_database()
        self._db_recycles += 1


class CustomDjangoFixup(DjangoFixup):
    @property
    def worker_fixup(self):
        if self._worker_fixup is None:
            self._worker_fixup = CustomDjangoWorkerFixup(self.app)
        return self._worker_fixup


def custom_fixup(app, env="DJANGO_SETTINGS_MODULE"):
    return CustomDjangoFixup(app).install()
