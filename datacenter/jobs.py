"""Long work of the data center as jobs: processing a file (or its dry run), relocating the
storage and exporting records, recorded in the database and followed on the job's page.

Small work runs at once, in the request: a file of at most DATACENTER_RUN_AT_ONCE_SIZE
bytes, a relocation that moves no files, an export of at most
DATACENTER_EXPORT_AT_ONCE_ROWS records. Anything larger goes to the task worker.

A processing job writes its outputs to a folder of its own in the storage (JOBS_FOLDER) and
commits its rows a batch at a time, each batch together with the job's position (the last
line done, the lengths of its outputs, its counts). After the last batch it records, in one
commit, that its results are ready and where they go (the plan of the distribution). A job
whose process died is recovered by the next one to look (see datacenter.recovery): a
committed job has its distribution finished from that plan, processing is queued again to
resume after its last committed batch (a dry run starts again), and any other job is marked
interrupted, having changed nothing (export: its partial file is removed) or moved whole
files only (relocation, which is finished by relocating to the same path again).
"""

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import exports
from .exports import ExportError
from .limits import check_site_storage_path
from .models import Job, StorageLocation, current_datacenter, storage_for_writing
from .processes import HOST
from .processing import (
    CHANGES_KEPT,
    ERRORS_KEPT,
    FileChanged,
    Position,
    ProcessingError,
    ProcessingStopped,
    check_processing,
    cut_back,
    process_file,
)
from .relocation import tree_size
from .storage import JOBS_FOLDER, DataCenter, Distribution, StorageError

log = logging.getLogger(__name__)

#: Errors of a request that cannot work, whose message is for staff (no traceback logged).
EXPECTED_ERRORS = (ProcessingError, StorageError, ExportError, FileNotFoundError)

PROGRESS_SECONDS = 0.5


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
    if not dry_run:
        check_file_free(name)
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
    from .recovery import recover_jobs  # recovery builds on this module

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
    enqueue(job)
    return job


def enqueue(job: Job) -> None:
    """Queue `job` for the task worker once the transaction that recorded it commits."""
    from .tasks import run_job_task

    def enqueue():
        result = run_job_task.enqueue(job.pk)
        Job.objects.filter(pk=job.pk).update(task_id=str(result.id))

    transaction.on_commit(enqueue)


def resume_job(job: Job, user) -> Job:
    """Queue the stopped processing `job` to go on after its last committed batch.

    Raises ProcessingError when it cannot be resumed or `user` may not: the person who
    started it may, and a superuser.
    """
    if not job.resumable:
        raise ProcessingError(
            f"Job #{job.pk} has not stopped half-way; there is nothing to resume."
        )
    if not may_resume(job, user):
        raise ProcessingError("Only the person who started the job, or a superuser, resumes it.")
    if Job.objects.filter(pk=job.pk, status=Job.INTERRUPTED).update(
        status=Job.QUEUED, error="", finished=None, host="", pid=None, updated=timezone.now()
    ):
        enqueue(job)
    job.refresh_from_db()
    return job


def may_resume(job: Job, user) -> bool:
    """Whether `user` may resume `job`: the person who started it, and a superuser, who may
    process files."""
    return user.has_perm("datacenter.process_files") and (
        job.user_id == user.pk or user.is_superuser
    )


@contextmanager
def changing_pending_file(name: str) -> Iterator[DataCenter]:
    """The data center, held for changing (replacing, editing, deleting) the pending file
    `name`: StorageError while a job needs the file as it is, or a relocation is under way."""
    check_file_free(name)
    with storage_for_writing() as datacenter:
        yield datacenter


def check_file_free(name: str) -> None:
    """StorageError while a job that has applied rows of the pending file `name` waits to
    go on: resuming needs the file as it was."""
    holder = (
        Job.objects.filter(kind=Job.PROCESS, dry_run=False, file_name=name)
        .filter(
            Q(status__in=Job.IN_PROGRESS) | Q(status=Job.INTERRUPTED, result__has_key="position")
        )
        .order_by("pk")
        .first()
    )
    if holder is not None:
        action = "is being processed by" if holder.in_progress else "was processed in part by"
        raise StorageError(
            f"{name} {action} job #{holder.pk}; nothing was changed. "
            + ("Try again when it has ended." if holder.in_progress else "Resume that job first.")
        )


# Carrying out jobs


def run_job(job: Job) -> Job:
    """Carry out a queued job in this process; a job that has begun elsewhere is left."""
    from .recovery import recover_jobs  # recovery builds on this module

    recover_jobs()
    now = timezone.now()
    began = Job.objects.filter(pk=job.pk, status=Job.QUEUED).update(
        status=Job.RUNNING,
        host=HOST,
        pid=os.getpid(),
        started=Coalesce("started", Value(now)),
        updated=now,
    )
    job.refresh_from_db()
    if not began:
        return job
    try:
        {Job.PROCESS: _process, Job.RELOCATE: _relocate, Job.EXPORT: _export}[job.kind](job)
    except Exception as exc:
        if not isinstance(exc, EXPECTED_ERRORS) or isinstance(exc, ProcessingStopped):
            log.exception("Job %s failed.", job.pk)
        fail_job(job, exc)
    return job


def fail_job(job: Job, exc: Exception) -> None:
    if isinstance(exc, ProcessingError | StorageError | ExportError):
        message = str(exc)
    elif isinstance(exc, FileNotFoundError):
        message = f"The file is gone: {exc.filename}."
    elif isinstance(exc, OSError) and exc.strerror:  # a full disk, say
        about = f" ({os.path.basename(exc.filename)})" if exc.filename else ""
        message = f"The storage failed: {exc.strerror}{about}."
    else:
        message = f"{type(exc).__name__}: {exc}"
    job.refresh_from_db()
    if job.status == Job.COMMITTED:
        # The rows are committed: their distribution must still happen. Without a process
        # of its own, the job is finished by the next recover_jobs() of this host.
        Job.objects.filter(pk=job.pk).update(pid=None, error=f"Distributing failed: {message}")
        return
    position = resume_position(job)
    if isinstance(exc, FileChanged):
        # The outputs of the rows applied stay, for staff to see what was done.
        datacenter = current_datacenter()
        outputs = outputs_folder(datacenter, job)
        cut_back(outputs, position)
        end_job(
            job,
            Job.FAILED,
            error=f"{message} The rows up to line {position.line} are applied; their finished "
            f"and failed rows are kept in the storage's "
            f"{os.path.relpath(outputs, datacenter.storage)} folder.",
        )
        return
    if position is not None:
        # Rows are committed: the outputs and the position stay, to go on from there.
        cause = exc.__cause__ if isinstance(exc, ProcessingStopped) else exc
        end_job(
            job,
            Job.INTERRUPTED,
            error=f"Stopped after line {position.line}: {cause}. The rows up to there are "
            "applied; resume the job to process the rest.",
        )
        return
    remove_partial_work(job)
    end_job(job, Job.FAILED, error=message)


def remove_partial_work(job: Job) -> None:
    if job.kind == Job.PROCESS:
        shutil.rmtree(job_folder(current_datacenter(), job), ignore_errors=True)
    elif job.kind == Job.EXPORT:
        exports.remove_part(current_datacenter(), _part_name(job))


def job_folder(datacenter: DataCenter, job: Job) -> str:
    return os.path.join(datacenter.storage, JOBS_FOLDER, str(job.pk))


def outputs_folder(datacenter: DataCenter, job: Job) -> str:
    """Where a processing job writes its finished and failed rows until they are
    distributed."""
    return os.path.join(job_folder(datacenter, job), "outputs")


def _process(job: Job) -> None:
    if job.user is None:
        raise ProcessingError("The account that started the job no longer exists.")
    datacenter = current_datacenter()
    file = datacenter.get_file(job.file_name)
    Job.objects.filter(pk=job.pk).update(total=file.rows)
    output_dir = None if job.dry_run else outputs_folder(datacenter, job)
    resume = resume_position(job)

    def checkpoint(position: Position) -> None:
        # In the transaction of the batch: its rows and the position are one commit.
        job.result["position"] = position.as_dict()
        Job.objects.filter(pk=job.pk).update(
            done=position.total,
            succeeded=position.succeeded,
            failed=position.failed,
            updated=timezone.now(),
            result=job.result,
        )

    def on_commit(result, plan: Distribution) -> None:
        # Committed and "ready to distribute" are one step.
        Job.objects.filter(pk=job.pk).update(
            status=Job.COMMITTED,
            done=result.total,
            succeeded=result.succeeded,
            failed=result.failed,
            updated=timezone.now(),
            result=job.result
            | {
                "plan": plan.as_dict(),
                "outputs": output_dir,
                "errors": result.errors[:ERRORS_KEPT],
                "pending_lines": result.pending_lines[:ERRORS_KEPT],
            },
        )

    progress = _progress_in_database(job)
    result = process_file(
        datacenter,
        job.file_name,
        job.processor,
        job.mode,
        user=job.user,
        dry_run=job.dry_run,
        progress=(lambda done: progress(done, None)) if job.dry_run else None,
        output_dir=output_dir,
        on_commit=on_commit,
        expected_sha256="" if job.dry_run else job.sha256,
        checkpoint=checkpoint,
        resume=resume,
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
        "resumed": job.result.get("resumed", []),
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
    shutil.rmtree(job_folder(datacenter, job), ignore_errors=True)
    end_job(job, Job.SUCCESS)


def resume_position(job: Job) -> Position | None:
    """Where the processing `job` stands after its last committed batch (None: at the
    start)."""
    position = (job.result or {}).get("position")
    return Position.from_dict(position) if position else None


def _progress_in_database(job: Job):
    """progress(done, total) that records the job's progress and sign of life, at most
    twice a second (and at the end); a total of None leaves the total as it is."""
    written = 0.0

    def progress(done: int, total: int | None) -> None:
        nonlocal written
        if time.monotonic() - written >= PROGRESS_SECONDS or done == total:
            totals = {} if total is None else {"total": total}
            Job.objects.filter(pk=job.pk).update(done=done, updated=timezone.now(), **totals)
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
    end_job(job, Job.SUCCESS)


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
        with old.held(exclusive=True):
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
    end_job(job, Job.SUCCESS)


def _location_created_for(job: Job) -> bool:
    """Claim the storage for `job` by recording its location for the first time."""
    _, created = StorageLocation.objects.get_or_create(
        pk=1, defaults={"path": settings.DATACENTER_STORAGE_ROOT, "relocating": job}
    )
    return created


def end_job(job: Job, status: str, error: str = "") -> None:
    job.status, job.error, job.finished = status, error, timezone.now()
    job.save(
        update_fields=[
            *("status", "error", "finished", "done", "succeeded", "failed", "result"),
            *("file_name", "sha256"),
        ]
    )
