"""Whether this site can do its work: for load balancers and monitoring (``/healthz``)."""

import logging
import os
import tempfile
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from .models import WorkerHeartbeat, current_datacenter
from .processes import HOST, died_on_this_host

log = logging.getLogger(__name__)

#: The task queues and what their workers carry out; each has a worker of its own, so that
#: a CDS run never waits behind a long job (see datacenter.tasks and imports.tasks).
QUEUES = {"datacenter": "the data center's jobs", "imports": "CDS import and export runs"}


def beat(queues: str = "*") -> None:
    """Record that the task worker of this process, serving `queues` (comma-separated
    names, or ``*`` for all), is alive; forget workers gone a day."""
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        host=HOST, pid=os.getpid(), defaults={"seen": now, "queues": queues}
    )
    WorkerHeartbeat.objects.filter(seen__lt=now - timedelta(days=1)).delete()


def stop_beating() -> None:
    """Forget the heartbeat of this process: its worker has stopped."""
    WorkerHeartbeat.objects.filter(host=HOST, pid=os.getpid()).delete()


def check() -> tuple[int, dict]:
    """The HTTP status (200, or 503 when the database or the storage fails) and a report.

    A queue whose task worker has not been heard from is reported ("degraded") without
    failing the check: the web processes still serve, and a load balancer should keep them.
    """
    report = {"database": "ok", "storage": "ok", "workers": {}}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        log.exception("Health check: the database cannot be reached.")
        report["database"] = "unreachable"
    else:
        report["workers"] = {queue: worker_status(queue) for queue in QUEUES}
    try:
        with tempfile.NamedTemporaryFile(dir=current_datacenter().storage, prefix=".healthz-"):
            pass
    except (OSError, DatabaseError):
        log.exception("Health check: the storage cannot be written.")
        report["storage"] = "not writable"
    failing = report["database"] != "ok" or report["storage"] != "ok"
    workers_ok = report["workers"] and all(
        worker["status"] == "ok" for worker in report["workers"].values()
    )
    report["status"] = "failing" if failing else "ok" if workers_ok else "degraded"
    return (503 if failing else 200), report


def worker_status(queue: str) -> dict:
    """How the task workers serving `queue` are: "ok", "stale" or "never seen", with the
    last heartbeat. A worker of this host whose process is gone counts as stale at once."""
    beats = [
        heartbeat
        for heartbeat in WorkerHeartbeat.objects.order_by("-seen")
        if queue in heartbeat.queues.split(",") or heartbeat.queues == "*"
    ]
    alive = [
        heartbeat for heartbeat in beats if not died_on_this_host(heartbeat.host, heartbeat.pid)
    ]
    report = {"queue": queue, "serves": QUEUES.get(queue, queue)}
    if not beats:
        return report | {"status": "never seen", "last_heartbeat": None, "age_seconds": None}
    last = (alive or beats)[0].seen
    age = (timezone.now() - last).total_seconds()
    fresh = alive and age <= settings.DATACENTER_WORKER_STALE
    return report | {
        "status": "ok" if fresh else "stale",
        "last_heartbeat": last.isoformat(),
        "age_seconds": round(age, 1),
    }
