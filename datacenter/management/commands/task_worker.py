"""The task worker of the site: django-tasks-db's db_worker that also records, every
WORKER_HEARTBEAT_SECONDS, that it is alive, for /healthz and monitoring, and that first
recovers the data center's jobs whose process died."""

import logging
import threading
import time

from django.conf import settings
from django.db import DatabaseError, connection
from django_tasks_db.management.commands import db_worker

from datacenter import health, jobs

log = logging.getLogger(__name__)


class Command(db_worker.Command):
    help = db_worker.Command.help or "Run the tasks of the database queue, with a heartbeat."

    def handle(self, *args, **options):
        # Jobs whose worker died on this host (a reboot, the OOM killer) end now, not later.
        jobs.recover_jobs()
        threading.Thread(target=self.beat, name="heartbeat", daemon=True).start()
        return super().handle(*args, **options)

    def beat(self) -> None:
        while True:
            try:
                health.beat()
            except DatabaseError:
                log.exception("Could not record the heartbeat; trying again.")
                connection.close()
            time.sleep(settings.WORKER_HEARTBEAT_SECONDS)
