"""Whether this site can do its work: for load balancers and monitoring (``/healthz``)."""

import logging
import os
import tempfile
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from .models import WorkerHeartbeat, current_datacenter
from .processes import HOST

log = logging.getLogger(__name__)


def beat() -> None:
    """Record that the task worker of this process is alive; forget workers gone a day."""
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(host=HOST, pid=os.getpid(), defaults={"seen": now})
    WorkerHeartbeat.objects.filter(seen__lt=now - timedelta(days=1)).delete()


def check() -> tuple[int, dict]:
    """The HTTP status (200, or 503 when the database or the storage fails) and a report.

    A task worker that has not been heard from is reported ("degraded") without failing the
    check: the web processes still serve, and a load balancer should keep them.
    """
    report = {"database": "ok", "storage": "ok", "worker": {"status": "unknown"}}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        log.exception("Health check: the database cannot be reached.")
        report["database"] = "unreachable"
    else:
        report["worker"] = worker_status()
    try:
        with tempfile.NamedTemporaryFile(dir=current_datacenter().storage, prefix=".healthz-"):
            pass
    except (OSError, DatabaseError):
        log.exception("Health check: the storage cannot be written.")
        report["storage"] = "not writable"
    failing = report["database"] != "ok" or report["storage"] != "ok"
    report["status"] = (
        "failing" if failing else "ok" if report["worker"]["status"] == "ok" else "degraded"
    )
    return (503 if failing else 200), report


def worker_status() -> dict:
    """How the task workers are: "ok", "stale" or "never seen", with the last heartbeat."""
    last = WorkerHeartbeat.objects.order_by("-seen").values_list("seen", flat=True).first()
    if last is None:
        return {"status": "never seen", "last_heartbeat": None, "age_seconds": None}
    age = (timezone.now() - last).total_seconds()
    return {
        "status": "ok" if age <= settings.DATACENTER_WORKER_STALE else "stale",
        "last_heartbeat": last.isoformat(),
        "age_seconds": round(age, 1),
    }
