"""Runs of the CDS import: the one entry point for cron, the admin, the pages and the tasks.

A run claims its source with a conditional update, so that one source is imported by one run
at a time on any number of processes and hosts. The claim names the run, and the run its host
and process: when that process dies, the next run on the same host takes over at once, any
other host after the lease, and the dead run is marked interrupted. Every log line and every
file of a run is stored while it runs, so an interrupted run keeps its audit.
"""

import logging
import os
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.tasks import TaskResultStatus
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from . import cds
from .models import CdsSource, ImportedFile, ImportLogEntry, ImportRun
from .processes import HOST, died_on_this_host

log = logging.getLogger("imports.cds")

STATUS_OF_RESULT = {
    cds.SUCCESS: ImportRun.SUCCESS,
    cds.NOTHING: ImportRun.NOTHING,
    cds.LOCKED: ImportRun.LOCKED,
    cds.FAILED: ImportRun.FAILED,
}


class RunInterrupted(Exception):
    """The process carrying out a run died before the run ended."""


class RunLogHandler(logging.Handler):
    """Stores the records logged by the thread of one run as log entries of that run."""

    def __init__(self, run: ImportRun):
        super().__init__()
        self.run = run
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return  # another run in this process
        ImportLogEntry.objects.create(
            run=self.run,
            time=datetime.fromtimestamp(record.created, tz=UTC),
            level=record.levelname,
            message=record.getMessage(),
            traceback="".join(traceback.format_exception(record.exc_info[1]))
            if record.exc_info
            else "",
        )


def lease() -> timedelta:
    return timedelta(seconds=settings.CDS_CLAIM_LEASE)


def claim(source: CdsSource, run: ImportRun) -> bool:
    """Claim `source` for `run` unless another run holds a claim that has not expired.

    The claim of a run whose process died on this host is taken over at once, and that run
    is marked interrupted.
    """
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    claimed = CdsSource.objects.filter(free, pk=source.pk).update(
        claimed_by=run, claimed_until=now + lease()
    )
    if claimed:
        return True
    holder = CdsSource.objects.select_related("claimed_by").get(pk=source.pk).claimed_by
    if holder is None or not died_on_this_host(holder.host, holder.pid):
        return False
    taken = CdsSource.objects.filter(pk=source.pk, claimed_by=holder).update(
        claimed_by=run, claimed_until=now + lease()
    )
    if taken:
        log.warning(
            "Run %s (host %s, process %s) died; this run takes over.",
            holder,
            holder.host,
            holder.pid,
        )
        mark_interrupted(holder)
    return taken == 1


def release(source: CdsSource, run: ImportRun) -> None:
    CdsSource.objects.filter(pk=source.pk, claimed_by=run).update(
        claimed_by=None, claimed_until=None
    )


def mark_interrupted(run: ImportRun) -> bool:
    """Mark a run whose process died as interrupted, with what it had done; also the task
    that carried it, so that nothing stays "running" for ever."""
    now = timezone.now()
    reason = f"The process running it (host {run.host or '?'}, process {run.pid}) died."
    marked = ImportRun.objects.filter(pk=run.pk, status=ImportRun.RUNNING).update(
        status=ImportRun.INTERRUPTED, finished=now, error=reason
    )
    if not marked:
        return False
    ImportLogEntry.objects.create(run=run, time=now, level="ERROR", message=reason)
    if run.task_id:
        DBTaskResult.objects.filter(id=run.task_id, status=TaskResultStatus.RUNNING).update(
            status=TaskResultStatus.FAILED,
            finished_at=now,
            exception_class_path=f"{__name__}.{RunInterrupted.__name__}",
            traceback=f"{__name__}.{RunInterrupted.__name__}: {reason}\n",
        )
    return True


def interrupt_dead_runs() -> int:
    """Mark every running run that is known to be dead as interrupted: its process is gone
    from this host, its claim was taken over, or the claim's lease ran out."""
    now = timezone.now()
    dead = [
        run
        for run in ImportRun.objects.filter(status=ImportRun.RUNNING).select_related("source")
        if died_on_this_host(run.host, run.pid)
        or run.source.claimed_by_id != run.pk
        or run.source.claimed_until < now
    ]
    return sum(mark_interrupted(run) for run in dead)


def enqueue_import(source: CdsSource, *, trigger: str, user=None) -> ImportRun:
    """Queue a run of `source` for a background worker and return it."""
    from .tasks import run_import_task

    run = ImportRun.objects.create(source=source, trigger=trigger, user=user)

    def enqueue():
        result = run_import_task.enqueue(run.pk)
        ImportRun.objects.filter(pk=run.pk).update(task_id=str(result.id))

    transaction.on_commit(enqueue)
    return run


def run_import(
    source: CdsSource,
    *,
    trigger: str,
    user=None,
    run: ImportRun | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportRun:
    """Import the new files of `source` now, recorded as `run` (a new one by default).

    Ends at once as "busy" while another run of the source is in progress anywhere.
    """
    if run is None:
        run = ImportRun.objects.create(source=source, trigger=trigger, user=user)
    run.host, run.pid = HOST, os.getpid()
    run.save(update_fields=["host", "pid"])
    handler = RunLogHandler(run)
    log.addHandler(handler)
    try:
        interrupt_dead_runs()
        if not claim(source, run):
            log.warning("Another import of %s is running; this run ends.", source.name)
            _finish(run, ImportRun.BUSY)
            return run
        try:
            run.status, run.started = ImportRun.RUNNING, timezone.now()
            run.save(update_fields=["status", "started"])
            result = _import(source, run, progress)
            run.files, run.bytes, run.error = len(result.delivered), result.bytes, result.error
            _finish(run, STATUS_OF_RESULT[result.status])
        finally:
            release(source, run)
    finally:
        log.removeHandler(handler)
    return run


def _import(source: CdsSource, run: ImportRun, progress) -> cds.ImportResult:
    def on_progress(done: int, total: int) -> None:
        ImportRun.objects.filter(pk=run.pk).update(files_done=done, files_listed=total)
        CdsSource.objects.filter(pk=source.pk, claimed_by=run).update(
            claimed_until=timezone.now() + lease()
        )
        run.files_done, run.files_listed = done, total
        if progress:
            progress(done, total)

    def on_file(file: cds.FileOutcome) -> None:
        ImportedFile.objects.create(
            run=run,
            name=file.name,
            size=file.size,
            sha256=file.sha256,
            local_name=file.local_name,
            outcome=file.outcome,
            reason=file.reason,
        )
        if file.outcome == "delivered":
            ImportRun.objects.filter(pk=run.pk).update(
                files=F("files") + 1, bytes=F("bytes") + (file.size or 0)
            )

    try:
        return cds.import_(
            source.spool_dir,
            source.host,
            source.port,
            source.user,
            source.password,
            source.remote_dir,
            protocol=source.protocol,
            ca_file=source.ca_file or None,
            timeout=source.timeout,
            passive=source.passive,
            stable_after=source.stable_after,
            claimed=True,
            run_label=f"{source.name} #{run.pk}",
            progress=on_progress,
            on_file=on_file,
        )
    except Exception as exc:  # a fault of ours must still end the run with its reason
        log.exception("Exiting with exception:")
        return cds.ImportResult(status=cds.FAILED, error=f"{type(exc).__name__}: {exc}")


def _finish(run: ImportRun, status: str) -> None:
    run.status, run.finished = status, timezone.now()
    run.save(update_fields=["status", "finished", "files", "bytes", "error"])
