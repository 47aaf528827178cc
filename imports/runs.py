"""Runs of the CDS import: the one entry point for cron, the admin, the pages and the tasks.

A run claims its source with a conditional update, so that one source is imported by one run
at a time on any number of processes and hosts; a claim whose process died expires after the
lease. Every log line of the run is stored as an ImportLogEntry while it runs.
"""

import logging
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import cds
from .models import CdsSource, ImportedFile, ImportLogEntry, ImportRun

log = logging.getLogger("imports.cds")

STATUS_OF_RESULT = {
    cds.SUCCESS: ImportRun.SUCCESS,
    cds.NOTHING: ImportRun.NOTHING,
    cds.LOCKED: ImportRun.LOCKED,
    cds.FAILED: ImportRun.FAILED,
}


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
    """Claim `source` for `run` unless another run holds a claim that has not expired."""
    now = timezone.now()
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    claimed = CdsSource.objects.filter(free, pk=source.pk).update(
        claimed_by=run, claimed_until=now + lease()
    )
    return claimed == 1


def release(source: CdsSource, run: ImportRun) -> None:
    CdsSource.objects.filter(pk=source.pk, claimed_by=run).update(
        claimed_by=None, claimed_until=None
    )


def enqueue_import(source: CdsSource, *, trigger: str, user=None) -> ImportRun:
    """Queue a run of `source` for a background worker and return it."""
    from .tasks import run_import_task

    run = ImportRun.objects.create(source=source, trigger=trigger, user=user)
    transaction.on_commit(lambda: run_import_task.enqueue(run.pk))
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
    handler = RunLogHandler(run)
    log.addHandler(handler)
    try:
        if not claim(source, run):
            log.warning("Another import of %s is running; this run ends.", source.name)
            _finish(run, ImportRun.BUSY)
            return run
        run.status, run.started = ImportRun.RUNNING, timezone.now()
        run.save(update_fields=["status", "started"])
        try:
            result = _import(source, run, progress)
        finally:
            release(source, run)
        ImportedFile.objects.bulk_create(
            ImportedFile(
                run=run,
                name=file.name,
                size=file.size,
                sha256=file.sha256,
                local_name=file.local_name,
                outcome=file.outcome,
                reason=file.reason,
            )
            for file in result.files
        )
        run.files, run.bytes, run.error = len(result.delivered), result.bytes, result.error
        _finish(run, STATUS_OF_RESULT[result.status])
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

    try:
        return cds.import_(
            source.spool_dir,
            source.host,
            source.port,
            source.user,
            source.password,
            source.remote_dir,
            timeout=source.timeout,
            passive=source.passive,
            encoding=source.encoding,
            stable_after=source.stable_after,
            run_label=f"{source.name} #{run.pk}",
            progress=on_progress,
        )
    except Exception as exc:  # a fault of ours must still end the run with its reason
        log.exception("Exiting with exception:")
        return cds.ImportResult(status=cds.FAILED, error=f"{type(exc).__name__}: {exc}")


def _finish(run: ImportRun, status: str) -> None:
    run.status, run.finished = status, timezone.now()
    run.save()
