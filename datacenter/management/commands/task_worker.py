"""The task worker of the site: django-tasks-db's db_worker that also records, every
WORKER_HEARTBEAT_SECONDS, that it is alive and which queues it serves, for /healthz and the
pages of waiting work, and that recovers the data center's jobs whose process died: first,
and then with every heartbeat."""

import logging
import threading

from django.conf import settings
from django.db import DatabaseError, connection
from django_tasks_db.management.commands import db_worker

from datacenter import health, recovery

log = logging.getLogger(__name__)


class Command(db_worker.Command):
    help = (
        "Run the tasks of the database queues (--queue-name datacenter, imports, or * for "
        "all), with a heartbeat."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        # One worker for every queue unless told otherwise: the simplest site has one.
        parser.set_defaults(queue_name="*")

    def handle(self, *args, **options):
        # Jobs whose worker died on this host (a reboot, the OOM killer) go on now, not later.
        recovery.recover_jobs()
        queues = options["queue_name"]
        stopped = threading.Event()
        beating = threading.Thread(
            target=self.beat, args=(queues, stopped), name="heartbeat", daemon=True
        )
        beating.start()
        try:
            return super().handle(*args, **options)
        finally:
            stopped.set()
            beating.join(timeout=settings.WORKER_HEARTBEAT_SECONDS + 5)
            try:
                health.stop_beating()
            except DatabaseError:
                log.exception("Could not remove the heartbeat.")

    def beat(self, queues: str, stopped: threading.Event) -> None:
        # Its own thread has its own connection: the heartbeat never waits on a job's
        # transaction, only on another process's batch.
        while not stopped.is_set():
            try:
                health.beat(queues)
                recovery.recover_jobs()
            except DatabaseError:
                log.exception("Could not record the heartbeat; trying again.")
                connection.close()
            except Exception:
                log.exception("Recovering jobs failed; trying again.")
            stopped.wait(settings.WORKER_HEARTBEAT_SECONDS)
        connection.close()
