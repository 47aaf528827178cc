"""Runs of the CDS import and export: the one entry point for cron, the admin, the pages and
the tasks.

A run claims its source for its direction with a conditional update, so that one source is
imported by one run at a time on any number of processes and hosts, and exported by one run
(an import and an export of the same source may go on together: they hold different locks
in different directories of the server). The claim names the run, and the run its host
and process: when that process dies, the next run on the same host takes over at once, any
other host after the lease, and the dead run is marked interrupted.

Every log line and every file of a run is stored while it runs, so that the run page follows it
and an interrupted run keeps its audit. The import itself goes on in threads of its own; the
run's thread writes what they report in one transaction about twice a second (RunRecorder),
which keeps the database from costing more than the transfers.
"""

import contextlib
import contextvars
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connections, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from datacenter.files import sha256_of
from datacenter.processes import HOST, died_on_this_host, fail_running_task

from . import alerts, cds
from .models import CdsSource, ImportedFile, ImportLogEntry, ImportRun

log = logging.getLogger("imports.cds")

STATUS_OF_RESULT = {
    cds.SUCCESS: ImportRun.SUCCESS,
    cds.NOTHING: ImportRun.NOTHING,
    cds.LOCKED: ImportRun.LOCKED,
    cds.FAILED: ImportRun.FAILED,
}


class RunInterrupted(Exception):
    """The process carrying out a run died before the run ended."""


# The run whose log a thread's records belong to; the import's threads inherit it.
_current_run: contextvars.ContextVar = contextvars.ContextVar("current_run", default=None)
FLUSH_SECONDS = 0.5
CLAIM_RENEWAL_SECONDS = 1.0
# The fields of CdsSource that hold each direction's claim.
CLAIM_FIELDS = {
    ImportRun.IMPORT: ("claimed_by", "claimed_until"),
    ImportRun.EXPORT: ("export_claimed_by", "export_claimed_until"),
}


def claim_values(run: ImportRun, holder, until) -> dict:
    """The update of `run`'s direction's claim to `holder` until `until`."""
    by, until_field = CLAIM_FIELDS[run.direction]
    return {by: holder, until_field: until}


def claimed_by(run: ImportRun):
    """The filter of the sources whose claim of `run`'s direction `run` holds."""
    return Q(**{CLAIM_FIELDS[run.direction][0]: run})


class RunRecorder:
    """Collects what a run does from any of its threads; `flush()`, called in the run's own
    thread, writes it to the database in one transaction: log entries, file records, progress
    and, once a second, the renewal of the claim."""

    LOG_COLUMNS = ("run", "time", "level", "message", "traceback")
    FILE_COLUMNS = ("run", "name", "size", "sha256", "local_name", "outcome", "reason")

    def __init__(self, source: CdsSource, run: ImportRun):
        self.source, self.run = source, run
        self.lock = threading.Lock()
        self.entries: list[tuple] = []
        self.file_records: list[tuple] = []
        self.done = self.listed = self.files = self.bytes = 0
        self.claim_renewed = time.monotonic()

    def add_record(self, record: logging.LogRecord) -> None:
        entry = (
            self.run.pk,
            datetime.fromtimestamp(record.created, tz=UTC),
            record.levelname,
            record.getMessage(),
            "".join(traceback.format_exception(record.exc_info[1])) if record.exc_info else "",
        )
        with self.lock:
            self.entries.append(entry)

    def add_file(self, file: cds.FileOutcome) -> None:
        record = (
            self.run.pk,
            file.name,
            file.size,
            file.sha256,
            file.local_name,
            file.outcome,
            file.reason,
        )
        with self.lock:
            self.file_records.append(record)
            if file.outcome == "delivered":
                self.files += 1
                self.bytes += file.size or 0

    def progress(self, done: int, total: int) -> None:
        with self.lock:
            self.done, self.listed = done, total

    def flush(self) -> None:
        with self.lock:
            entries, self.entries = self.entries, []
            file_records, self.file_records = self.file_records, []
            progress = {
                "files_done": self.done,
                "files_listed": self.listed,
                "files": self.files,
                "bytes": self.bytes,
            }
        renew = time.monotonic() - self.claim_renewed >= CLAIM_RENEWAL_SECONDS
        with transaction.atomic():
            insert_rows(ImportLogEntry, self.LOG_COLUMNS, entries)
            insert_rows(ImportedFile, self.FILE_COLUMNS, file_records)
            ImportRun.objects.filter(pk=self.run.pk).update(**progress)
            if renew:
                until = CLAIM_FIELDS[self.run.direction][1]
                CdsSource.objects.filter(claimed_by(self.run), pk=self.source.pk).update(
                    **{until: timezone.now() + lease()}
                )
        if renew:
            self.claim_renewed = time.monotonic()
        for name, value in progress.items():
            setattr(self.run, name, value)


def insert_rows(model, names: tuple[str, ...], rows: list[tuple]) -> None:
    """INSERT `rows` of values of the fields `names` of `model`: one statement run for all.

    bulk_create builds a model instance per row, which costs more than the database's own
    work for the thousands of log lines of a run.
    """
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    fields = [model._meta.get_field(name) for name in names]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})"
    params = [
        [
            field.get_db_prep_save(value, connection)
            for field, value in zip(fields, row, strict=True)
        ]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


class RunLogHandler(logging.Handler):
    """Hands the records logged for one run, by any of its threads, to its recorder."""

    def __init__(self, run: ImportRun, recorder: RunRecorder):
        super().__init__()
        self.run, self.recorder = run, recorder

    def emit(self, record: logging.LogRecord) -> None:
        if _current_run.get() is self.run:
            self.recorder.add_record(record)


def lease() -> timedelta:
    return timedelta(seconds=settings.CDS_CLAIM_LEASE)


def claim(source: CdsSource, run: ImportRun) -> bool:
    """Claim `source` for `run` (in its direction) unless another run holds a claim that has
    not expired.

    The claim of a run whose process died on this host is taken over at once, and that run
    is marked interrupted.
    """
    now = timezone.now()
    by, until = CLAIM_FIELDS[run.direction]
    free = Q(**{f"{until}__isnull": True}) | Q(**{f"{until}__lt": now})
    claimed = CdsSource.objects.filter(free, pk=source.pk).update(
        **claim_values(run, run, now + lease())
    )
    if claimed:
        return True
    holder = getattr(CdsSource.objects.select_related(by).get(pk=source.pk), by)
    if holder is None or not died_on_this_host(holder.host, holder.pid):
        return False
    taken = CdsSource.objects.filter(claimed_by(holder), pk=source.pk).update(
        **claim_values(run, run, now + lease())
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
    CdsSource.objects.filter(claimed_by(run), pk=source.pk).update(**claim_values(run, None, None))


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
    recorded = record_lost_deliveries(run)
    if recorded:
        message = (
            f"{recorded} file(s) it had delivered were not yet recorded; they are recorded "
            "now, as delivered by this run."
        )
        ImportLogEntry.objects.create(run=run, time=now, level="WARNING", message=message)
    fail_running_task(run.task_id, RunInterrupted, reason)
    return True


def record_lost_deliveries(run: ImportRun) -> int:
    """Record the files that `run`, whose process died, delivered without living to record
    them (its records are written about twice a second): the files that came into the
    spool's delivered folders (new/ and cur/ of an import, out/cur/ of an export) since the
    run started and that no run of the source recorded. Returns how many there were."""
    source = run.source
    if run.direction == ImportRun.IMPORT:
        store, folders = source.store, ("new", "cur")
    else:
        store, folders = source.outgoing_store, ("cur",)
    # A rename into the folder sets the file's change time; a little slack for clocks.
    since = (run.started or run.queued).timestamp() - 60
    arrived = {}
    for folder in folders:
        with contextlib.suppress(FileNotFoundError), os.scandir(store.folder(folder)) as scan:
            for entry in scan:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
                if stat.st_ctime >= since:
                    arrived[entry.name] = (entry.path, stat.st_size)
    recorded = set(
        ImportedFile.objects.filter(
            run__source=source,
            run__direction=run.direction,
            outcome="delivered",
            local_name__in=list(arrived),
        ).values_list("local_name", flat=True)
    )
    rows = [
        (run.pk, name, size, _sha256(path), name, "delivered", "recorded after its process died")
        for name, (path, size) in sorted(arrived.items())
        if name not in recorded
    ]
    with transaction.atomic():
        insert_rows(ImportedFile, RunRecorder.FILE_COLUMNS, rows)
        ImportRun.objects.filter(pk=run.pk).update(
            files=F("files") + len(rows), bytes=F("bytes") + sum(row[2] for row in rows)
        )
    return len(rows)


def _sha256(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return sha256_of(handle.fileno())
    except OSError:  # taken away meanwhile: the record says so by its empty hash
        return ""


def interrupt_dead_runs() -> int:
    """Mark every running run that is known to be dead as interrupted: its process is gone
    from this host, its claim was taken over, or the claim's lease ran out."""
    now = timezone.now()
    dead = []
    for run in ImportRun.objects.filter(status=ImportRun.RUNNING).select_related("source"):
        by, until = CLAIM_FIELDS[run.direction]
        if (
            died_on_this_host(run.host, run.pid)
            or getattr(run.source, f"{by}_id") != run.pk
            or getattr(run.source, until) < now
        ):
            dead.append(run)
    return sum(mark_interrupted(run) for run in dead)


def enqueue_import(
    source: CdsSource, *, trigger: str, user=None, direction: str = ImportRun.IMPORT
) -> ImportRun:
    """Queue a run of `source` (an import, or an export) for a background worker and
    return it."""
    from .tasks import run_import_task

    run = ImportRun.objects.create(source=source, direction=direction, trigger=trigger, user=user)

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
    direction: str = ImportRun.IMPORT,
) -> ImportRun:
    """Import the new files of `source` now (or, with `direction` "export", deliver the
    files of its outgoing spool), recorded as `run` (a new one by default).

    Ends at once as "busy" while another run of the source in the same direction is in
    progress anywhere. Brings the source's alert up to date at the end (see alerts.py).
    `progress(done, total)` may be called from the transfer's threads.
    """
    if run is None:
        run = ImportRun.objects.create(
            source=source, direction=direction, trigger=trigger, user=user
        )
    run.host, run.pid = HOST, os.getpid()
    run.save(update_fields=["host", "pid"])
    recorder = RunRecorder(source, run)
    handler = RunLogHandler(run, recorder)
    log.addHandler(handler)
    token = _current_run.set(run)
    try:
        interrupt_dead_runs()
        if not claim(source, run):
            log.warning("Another %s of %s is running; this run ends.", run.direction, source.name)
            recorder.flush()
            _finish(run, ImportRun.BUSY)
            return run
        try:
            run.status, run.started = ImportRun.RUNNING, timezone.now()
            run.save(update_fields=["status", "started"])
            result = _transfer(source, recorder, progress)
            run.files, run.bytes, run.error = len(result.delivered), result.bytes, result.error
            if result.offered_host_key:
                CdsSource.objects.filter(pk=source.pk).update(
                    offered_host_key=result.offered_host_key
                )
            _finish(run, STATUS_OF_RESULT[result.status])
        finally:
            release(source, run)
    finally:
        _current_run.reset(token)
        log.removeHandler(handler)
    if run.status != ImportRun.BUSY:
        alerts.check_source(source)
    return run


def run_export(source: CdsSource, **options) -> ImportRun:
    """Deliver the files of the outgoing spool of `source` now (see run_import)."""
    return run_import(source, direction=ImportRun.EXPORT, **options)


def _transfer(source: CdsSource, recorder: RunRecorder, progress) -> cds.RunResult:
    """Run the import or export in a thread of its own while this one writes what it
    reports."""
    run = recorder.run

    def on_progress(done: int, total: int) -> None:
        recorder.progress(done, total)
        if progress:
            progress(done, total)

    outcome: list[cds.RunResult] = []
    options = {
        "claimed": True,
        "run_label": f"{source.name} #{run.pk}",
        "progress": on_progress,
        "on_file": recorder.add_file,
    }

    def target() -> None:
        try:
            if run.direction == ImportRun.EXPORT:
                result = cds.export_to(
                    source.outgoing_store.path, source.connection(), source.export_dir, **options
                )
            else:
                result = cds.import_from(
                    source.spool_dir,
                    source.connection(),
                    source.remote_dir,
                    parallel=source.parallel,
                    stable_after=source.stable_after,
                    **options,
                )
            outcome.append(result)
        except Exception as exc:  # a fault of ours must still end the run with its reason
            log.exception("Exiting with exception:")
            outcome.append(cds.RunResult(status=cds.FAILED, error=f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    thread.start()
    while thread.is_alive():
        thread.join(FLUSH_SECONDS)
        recorder.flush()
    recorder.flush()
    return outcome[0]


def _finish(run: ImportRun, status: str) -> None:
    run.status, run.finished = status, timezone.now()
    run.save(update_fields=["status", "finished", "files", "bytes", "error"])
