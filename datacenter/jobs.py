"""Long work of the data center as jobs: processing a file (or its dry run), relocating the
storage and exporting records, recorded in the database and followed on the job's page.

Small work runs at once, in the request: a file of at most DATACENTER_RUN_AT_ONCE_SIZE
bytes, a relocation that moves no files, an export of at most
DATACENTER_EXPORT_AT_ONCE_ROWS records. Anything larger goes to the task worker.

A processing job writes its outputs to a folder of its own in the storage (JOBS_FOLDER) and
records, in the very transaction that commits its rows, that they are ready and where they go
(the plan of the distribution). A job whose process died is recovered by the next one to look:
a committed job has its distribution finished from that plan, any other is marked
interrupted, having changed nothing (processing, export: its partial file is removed) or moved
whole files only (relocation, which is finished by relocating to the same path again).

Progress of processing is kept in a small file beside the outputs, because the rows'
transaction holds the database (SQLite allows one writer at a time); progress of a relocation
or an export goes to the database, which they do not hold.
"""

import logging
import os
import shutil
import time
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import exports
from .exports import ExportError
from .limits import check_site_storage_path
from .models import Job, StorageLocation, current_datacenter
from .processes import HOST, died_on_this_host, fail_running_task
from .processing import CHANGES_KEPT, ProcessingError, check_processing, process_file
from .relocation import tree_size
from .storage import JOBS_FOLDER, DataCenter, Distribution, StorageError

log = logging.getLogger(__name__)

#: Errors of a request that cannot work, whose message is for staff (no traceback logged).
EXPECTED_ERRORS = (ProcessingError, StorageError, ExportError, FileNotFoundError)

#: How many failed rows a job keeps to show (all are in the pending file).
ERRORS_KEPT = 1000
PROGRESS_SECONDS = 0.5


class JobInterrupted(Exception):
    """The process carrying out a job died before the job ended."""


# Starting jobs


def start_processing(
    *,
    name: str,
    processor: str,
    mode: str,
    dry_run: bool,
    user,
    after_dry_run: int | str | None = None,
) -> Job:
    """Process (or try) the pending file `name`: at once when it is small, else queued.
    Processing `after_dry_run` (the number of a dry run's job) processes the file that dry
    run checked, or nothing.

    Raises ProcessingError, StorageError or FileNotFoundError, before any job is recorded,
    for a request that cannot work.
    """
    sha256 = _checked_by_dry_run(after_dry_run, name, processor, mode) if after_dry_run else ""
    file = check_processing(current_datacenter(), name, processor, mode, user, sha256)
    _refuse_while_relocating("process the file")
    job = Job.objects.create(
        kind=Job.PROCESS,
        user=user,
        file_name=name,
        processor=processor,
        mode=mode,
        dry_run=dry_run,
        sha256=sha256,
    )
    return _start(job, at_once=file.size <= settings.DATACENTER_RUN_AT_ONCE_SIZE)


def _checked_by_dry_run(pk: int | str, name: str, processor: str, mode: str) -> str:
    """The SHA-256 of the file that the dry run `pk` of `name` checked."""
    dry_run = Job.objects.filter(
        pk=int(pk) if str(pk).isdigit() else None,
        kind=Job.PROCESS,
        dry_run=True,
        status=Job.SUCCESS,
        file_name=name,
        processor=processor,
        mode=mode,
    ).first()
    if dry_run is None or not dry_run.sha256:
        raise ProcessingError(
            f"There is no finished dry run #{pk} of {name} in {mode} mode; check it again."
        )
    return dry_run.sha256


def start_relocation(*, path: str, move: bool, overwrite: bool, user) -> Job:
    """Relocate the storage to `path`: at once without `move`, else queued.

    Raises StorageError, before any job is recorded, for a path that cannot be used and
    while other jobs are in progress (their files would move under their feet).
    """
    recover_jobs()
    busy = list(Job.objects.filter(status__in=Job.IN_PROGRESS).values_list("pk", flat=True))
    if busy:
        numbers = ", ".join(f"#{pk}" for pk in busy)
        raise StorageError(f"Jobs are in progress ({numbers}); relocate when they have ended.")
    new_path = check_site_storage_path(current_datacenter(), path)
    job = Job.objects.create(
        kind=Job.RELOCATE, user=user, path=new_path, move=move, overwrite=overwrite
    )
    return _start(job, at_once=not move)


def start_export(*, processor: str, user, file_format: str = "csv") -> Job:
    """Export the records of `processor` in `file_format` (see exports.FORMATS): at once
    when they are few, else queued.

    Raises ExportError, before any job is recorded, when `user` may not or the format is
    unknown, and StorageError while the storage is being relocated.
    """
    exporter = exports.check_export(processor, user)
    exports.check_format(file_format)
    _refuse_while_relocating("export")
    job = Job.objects.create(
        kind=Job.EXPORT, user=user, processor=exporter.name, export_format=file_format
    )
    at_once = exports.record_count(exporter) <= settings.DATACENTER_EXPORT_AT_ONCE_ROWS
    return _start(job, at_once=at_once)


def downloadable_exports(user, names: list[str]) -> set[str]:
    """Those of the exports `names` that `user` may download: exports are private to the
    person whose job made them, and one holding secrets reaches superusers only (so do the
    exports of commands, which no job made)."""
    made = Job.objects.filter(kind=Job.EXPORT, status=Job.SUCCESS, file_name__in=names)
    makers = {job.file_name: job for job in made.order_by("created", "pk")}
    return {
        name
        for name in names
        if exports.may_download(
            user,
            made_by_id=makers[name].user_id if name in makers else None,
            secrets=name not in makers or makers[name].result.get("secrets", True),
        )
    }


def _refuse_while_relocating(action: str) -> None:
    if StorageLocation.objects.filter(pk=1, relocating__status__in=Job.IN_PROGRESS).exists():
        raise StorageError(f"The storage is being relocated; {action} when that ends.")


def _start(job: Job, *, at_once: bool) -> Job:
    if at_once:
        return run_job(job)
    from .tasks import run_job_task

    def enqueue():
        result = run_job_task.enqueue(job.pk)
        Job.objects.filter(pk=job.pk).update(task_id=str(result.id))

    transaction.on_commit(enqueue)
    return job


# Carrying out jobs


def run_job(job: Job) -> Job:
    """Carry out a queued job in this process; a job that has begun elsewhere is left."""
    recover_jobs()
    now = timezone.now()
    began = Job.objects.filter(pk=job.pk, status=Job.QUEUED).update(
        status=Job.RUNNING, host=HOST, pid=os.getpid(), started=now, updated=now
    )
    job.refresh_from_db()
    if not began:
        return job
    try:
        {Job.PROCESS: _process, Job.RELOCATE: _relocate, Job.EXPORT: _export}[job.kind](job)
    except Exception as exc:
        if not isinstance(exc, EXPECTED_ERRORS):
            log.exception("Job %s failed.", job.pk)
        _failed(job, exc)
    return job


def _failed(job: Job, exc: Exception) -> None:
    if isinstance(exc, ProcessingError | StorageError | ExportError):
        message = str(exc)
    elif isinstance(exc, FileNotFoundError):
        message = f"The file is gone: {exc.filename}."
    else:
        message = f"{type(exc).__name__}: {exc}"
    if Job.objects.filter(pk=job.pk, status=Job.COMMITTED).exists():
        # The rows are committed: their distribution must still happen. Without a process
        # of its own, the job is finished by the next recover_jobs() of this host.
        Job.objects.filter(pk=job.pk).update(pid=None, error=f"Distributing failed: {message}")
        return
    _remove_partial_work(job)
    _end(job, Job.FAILED, error=message)


def _remove_partial_work(job: Job) -> None:
    if job.kind == Job.PROCESS:
        shutil.rmtree(job_folder(current_datacenter(), job), ignore_errors=True)
    elif job.kind == Job.EXPORT:
        exports.remove_part(current_datacenter(), _part_name(job))


def job_folder(datacenter: DataCenter, job: Job) -> str:
    return os.path.join(datacenter.storage, JOBS_FOLDER, str(job.pk))


def _process(job: Job) -> None:
    if job.user is None:
        raise ProcessingError("The account that started the job no longer exists.")
    datacenter = current_datacenter()
    file = datacenter.get_file(job.file_name)
    Job.objects.filter(pk=job.pk).update(total=file.rows)
    folder = job_folder(datacenter, job)
    os.makedirs(folder, exist_ok=True)
    progress = ProgressFile(folder)
    output_dir = None if job.dry_run else os.path.join(folder, "outputs")

    def on_commit(result, plan: Distribution) -> None:
        # In the transaction of the rows: committed and "ready to distribute" are one step.
        Job.objects.filter(pk=job.pk).update(
            status=Job.COMMITTED,
            done=result.total,
            succeeded=result.succeeded,
            failed=result.failed,
            updated=timezone.now(),
            result={
                "plan": plan.as_dict(),
                "outputs": output_dir,
                "errors": result.errors[:ERRORS_KEPT],
                "pending_lines": result.pending_lines[:ERRORS_KEPT],
            },
        )

    result = process_file(
        datacenter,
        job.file_name,
        job.processor,
        job.mode,
        user=job.user,
        dry_run=job.dry_run,
        progress=progress.rows,
        output_dir=output_dir,
        on_commit=on_commit,
        expected_sha256="" if job.dry_run else job.sha256,
    )
    job.done, job.succeeded, job.failed = result.total, result.succeeded, result.failed
    if job.dry_run:
        job.sha256 = result.sha256
    job.result = {
        "seconds": round(result.seconds, 3),
        "errors": result.errors[:ERRORS_KEPT],
        "pending_lines": result.pending_lines[:ERRORS_KEPT],
        "finished_name": result.finished_file and os.path.basename(result.finished_file),
        "pending_name": result.pending_file and os.path.basename(result.pending_file),
    }
    if job.dry_run:
        job.result |= {
            "changes": [
                [change.line, change.action, change.key, change.fields]
                for change in result.changes
            ],
            "change_counts": result.change_counts,
            "changes_kept": CHANGES_KEPT,
        }
    shutil.rmtree(folder, ignore_errors=True)
    _end(job, Job.SUCCESS)


class ProgressFile:
    """The rows done so far, in a file that the job's page reads, at most twice a second."""

    NAME = "progress"

    def __init__(self, folder: str):
        self.path = os.path.join(folder, self.NAME)
        self.written = 0.0

    def rows(self, done: int) -> None:
        if time.monotonic() - self.written < PROGRESS_SECONDS:
            return
        temp_path = f"{self.path}.new"
        with open(temp_path, "w") as handle:
            handle.write(str(done))
        os.replace(temp_path, self.path)
        self.written = time.monotonic()

    @classmethod
    def read(cls, folder: str) -> tuple[int, float] | None:
        """(rows done, when written) or None when nothing was written."""
        path = os.path.join(folder, cls.NAME)
        try:
            with open(path) as handle:
                return int(handle.read() or 0), os.stat(path).st_mtime
        except (OSError, ValueError):
            return None


def _progress_in_database(job: Job):
    """progress(done, total) that records the job's progress and sign of life, at most
    twice a second (and at the end)."""
    written = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal written
        if time.monotonic() - written >= PROGRESS_SECONDS or done == total:
            Job.objects.filter(pk=job.pk).update(done=done, total=total, updated=timezone.now())
            written = time.monotonic()

    return progress


def _part_name(job: Job) -> str:
    return f".job-{job.pk}{exports.PART_SUFFIX}"


def _export(job: Job) -> None:
    if job.user is None:
        raise ExportError("The account that started the job no longer exists.")
    exporter = exports.check_export(job.processor, job.user)
    datacenter = current_datacenter()
    exports.remove_expired(datacenter)
    total = exports.record_count(exporter)
    progress = _progress_in_database(job)
    file, count = exports.export_to_storage(
        datacenter,
        exporter,
        part_name=_part_name(job),
        progress=lambda done: progress(done, max(total, done)),
        file_format=job.export_format,
    )
    datacenter.log_action(
        job.user, "export", f"{exporter.name}: {count} records -> {file.rel_path}"
    )
    job.done, job.file_name = count, file.name
    job.result = {
        "size": file.get_size(),
        "records": count,
        "secrets": exports.holds_secrets(exporter),
    }
    _end(job, Job.SUCCESS)


def _relocate(job: Job) -> None:
    claimed = StorageLocation.objects.filter(
        Q(relocating__isnull=True) | ~Q(relocating__status__in=Job.IN_PROGRESS), pk=1
    ).update(relocating=job)
    if not claimed and not _location_created_for(job):
        raise StorageError("Another relocation of the storage is in progress.")
    try:
        old = current_datacenter()
        old_path = old.storage
        check_site_storage_path(old, job.path)  # the spools may have changed since
        before = old.contents_size() if job.move else (0, 0)
        not_moved = old.relocate(
            job.path,
            move=job.move,
            overwrite=job.overwrite,
            progress=_progress_in_database(job),
            literal=True,
        )
        StorageLocation.objects.filter(pk=1).update(
            path=old.storage, changed=timezone.now(), changed_by=job.user
        )
    finally:
        StorageLocation.objects.filter(pk=1, relocating=job).update(relocating=None)
    old.log_action(
        job.user,
        "relocate",
        f"{old_path} -> {old.storage}, move={job.move}, overwrite={job.overwrite}, "
        f"not moved: {', '.join(sorted(not_moved)) or 'none'}",
    )
    job.refresh_from_db(fields=["done", "total"])
    left = tree_size(old_path, skip=JOBS_FOLDER) if job.move else (0, 0)
    job.result = {
        "old_path": old_path,
        "new_path": old.storage,
        "not_moved": sorted(not_moved.items()),
        "moved_files": before[0] - left[0],
        "moved_bytes": before[1] - left[1],
    }
    _end(job, Job.SUCCESS)


def _location_created_for(job: Job) -> bool:
    """Claim the storage for `job` by recording its location for the first time."""
    _, created = StorageLocation.objects.get_or_create(
        pk=1, defaults={"path": settings.DATACENTER_STORAGE_ROOT, "relocating": job}
    )
    return created


def _end(job: Job, status: str, error: str = "") -> None:
    job.status, job.error, job.finished = status, error, timezone.now()
    job.save(
        update_fields=[
            *("status", "error", "finished", "done", "succeeded", "failed", "result"),
            *("file_name", "sha256"),
        ]
    )


# What the job's page shows


def live_progress(job: Job) -> int:
    """The rows or files done so far, read where the running job writes them."""
    if job.kind == Job.PROCESS and job.status == Job.RUNNING:
        written = ProgressFile.read(job_folder(current_datacenter(), job))
        if written:
            return written[0]
    return job.done


# Recovering jobs whose process died


def recover_jobs() -> int:
    """Finish or mark interrupted every job whose process died; return how many.

    A job dies with its process on this host at once, on another host when it has given no
    sign of life for DATACENTER_JOB_LEASE seconds.
    """
    recovered = 0
    for job in Job.objects.filter(status__in=[Job.RUNNING, Job.COMMITTED]):
        if not _is_dead(job):
            continue
        # Only one process recovers a job: the one that takes it over.
        taken = Job.objects.filter(pk=job.pk, status=job.status, host=job.host, pid=job.pid)
        if not taken.update(host=HOST, pid=os.getpid(), updated=timezone.now()):
            continue
        if job.status == Job.COMMITTED:
            try:
                _finish_distribution(job)
            except OSError as exc:  # a full disk, say: tried again by the next recovery
                log.exception("Distributing the results of job %s failed.", job.pk)
                _failed(job, exc)
                continue
            log.warning("Job %s had committed; its results are now distributed.", job.pk)
        else:
            _interrupt(job)
        recovered += 1
    return recovered


def _is_dead(job: Job) -> bool:
    if died_on_this_host(job.host, job.pid):
        return True
    last = job.updated or job.started or job.created
    if job.kind == Job.PROCESS:
        written = ProgressFile.read(job_folder(current_datacenter(), job))
        if written:
            last = max(last, datetime.fromtimestamp(written[1], tz=UTC))
    return timezone.now() - last > timedelta(seconds=settings.DATACENTER_JOB_LEASE)


def _finish_distribution(job: Job) -> None:
    plan = Distribution.from_dict(job.result["plan"])
    outputs = job.result["outputs"]
    plan.apply(os.path.join(outputs, "finished.csv"), os.path.join(outputs, "pending.csv"))
    shutil.rmtree(os.path.dirname(outputs), ignore_errors=True)
    job.refresh_from_db()
    job.result = {
        "errors": job.result["errors"],
        "finished_name": os.path.basename(plan.finished_result),
        "pending_name": plan.pending_result and os.path.basename(plan.pending_result),
        "recovered": True,
    }
    _end(job, Job.SUCCESS)


def _interrupt(job: Job) -> None:
    reason = f"The process carrying it out (host {job.host or '?'}, process {job.pid}) died."
    _remove_partial_work(job)
    if job.kind == Job.PROCESS:
        reason += " Nothing was changed; start it again."
    elif job.kind == Job.EXPORT:
        reason += " No export was written; start it again."
    elif job.move:
        reason += (
            " The storage is still at its old path; the files moved so far are at the new "
            "one. Relocate to the same path again to move the rest."
        )
    StorageLocation.objects.filter(pk=1, relocating=job).update(relocating=None)
    job.refresh_from_db()
    _end(job, Job.INTERRUPTED, error=reason)
    fail_running_task(job.task_id, JobInterrupted, reason)
