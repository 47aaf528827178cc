"""Recovering the data center's jobs whose process died (SIGKILL, OOM, a reboot), and the
queued jobs whose task is gone.

A job dies with its process on this host at once, on another host when it has given no sign
of life for DATACENTER_JOB_LEASE seconds. Whoever looks first takes the job over: a job page,
a job starting, or a task worker (at its start and with every heartbeat).
"""

import logging
import os
import shutil
from datetime import timedelta

from django.conf import settings
from django.db.models.functions import Coalesce
from django.utils import timezone

from .jobs import end_job, enqueue, fail_job, remove_partial_work, resume_position
from .models import Job, StorageLocation
from .processes import HOST, died_on_this_host, fail_running_task
from .processing import output_paths
from .storage import Distribution

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """The process carrying out a job died before the job ended."""


def recover_jobs() -> int:
    """Go on with, finish or end every job whose process died, and end the queued jobs
    whose task is gone; return how many.

    A job dies with its process on this host at once, on another host when it has given no
    sign of life for DATACENTER_JOB_LEASE seconds. Processing is queued again to resume
    after its last committed batch (a dry run starts again), unless it died twice at the
    same place.
    """
    recovered = 0
    for job in Job.objects.filter(status__in=[Job.RUNNING, Job.COMMITTED]):
        if not _is_dead(job):
            continue
        # Only one process recovers a job: the one that takes it over.
        taken = Job.objects.filter(pk=job.pk, status=job.status, host=job.host, pid=job.pid)
        if not taken.update(host=HOST, pid=os.getpid(), updated=timezone.now()):
            continue
        reason = f"The process carrying it out (host {job.host or '?'}, process {job.pid}) died."
        if job.status == Job.COMMITTED:
            try:
                _finish_distribution(job)
            except OSError as exc:  # a full disk, say: tried again by the next recovery
                log.exception("Distributing the results of job %s failed.", job.pk)
                fail_job(job, exc)
                continue
            log.warning("Job %s had committed; its results are now distributed.", job.pk)
        elif job.kind == Job.PROCESS:
            _go_on(job, reason)
        else:
            _interrupt(job, reason)
        recovered += 1
    return recovered + _end_lost_jobs()


def _is_dead(job: Job) -> bool:
    if died_on_this_host(job.host, job.pid):
        return True
    last = job.updated or job.started or job.created
    return timezone.now() - last > timedelta(seconds=settings.DATACENTER_JOB_LEASE)


def _go_on(job: Job, reason: str) -> None:
    """Queue the processing `job`, whose process died, to resume where it stands."""
    job.refresh_from_db()
    position = resume_position(job)
    line = position.line if position else 1
    resumed = job.result.get("resumed", [])
    fail_running_task(job.task_id, JobInterrupted, reason)
    if resumed and resumed[-1]["line"] == line:
        _interrupt(job, f"{reason} It died before at the same place, after line {line}.")
        return
    resumed.append({"line": line, "at": timezone.now().isoformat(), "reason": reason})
    job.result["resumed"] = resumed
    if job.dry_run:
        job.done = 0
    Job.objects.filter(pk=job.pk).update(
        status=Job.QUEUED,
        host="",
        pid=None,
        task_id="",
        done=job.done,
        result=job.result,
        updated=timezone.now(),
    )
    enqueue(job)
    log.warning("Job %s: %s It is queued to go on after line %s.", job.pk, reason, line)


#: A queued job's task is recorded this many seconds after the job at the latest.
ENQUEUE_SECONDS = 60


def _end_lost_jobs() -> int:
    """End the queued jobs whose task is no longer in the queue (removed in the admin, or
    never written): no worker would ever start them."""
    from django.tasks import TaskResultStatus
    from django_tasks_db.models import DBTaskResult

    # Queued, or queued again (resumed), at least that long ago.
    queued = Job.objects.alias(since=Coalesce("updated", "created")).filter(
        status=Job.QUEUED, since__lt=timezone.now() - timedelta(seconds=ENQUEUE_SECONDS)
    )
    queued = list(queued.only("pk", "task_id"))
    waiting = {
        str(pk)
        for pk in DBTaskResult.objects.filter(
            id__in=[job.task_id for job in queued if job.task_id],
            status__in=[TaskResultStatus.READY, TaskResultStatus.RUNNING],
        ).values_list("id", flat=True)
    }
    lost = 0
    for job in queued:
        if job.task_id in waiting:
            continue
        job.refresh_from_db()
        if job.status == Job.QUEUED:
            _interrupt(job, "Its task is no longer in the queue of the task worker.")
            lost += 1
    return lost


def _finish_distribution(job: Job) -> None:
    plan = Distribution.from_dict(job.result["plan"])
    outputs = job.result["outputs"]
    plan.apply(*output_paths(outputs))
    shutil.rmtree(os.path.dirname(outputs), ignore_errors=True)
    job.refresh_from_db()
    job.result = {
        "errors": job.result["errors"],
        "pending_lines": job.result.get("pending_lines", []),
        "finished_name": os.path.basename(plan.finished_result),
        "pending_name": plan.pending_result and os.path.basename(plan.pending_result),
        "resumed": job.result.get("resumed", []),
        "recovered": True,
    }
    end_job(job, Job.SUCCESS)


def _interrupt(job: Job, reason: str) -> None:
    job.refresh_from_db()
    if job.kind == Job.PROCESS and resume_position(job):
        reason += " The rows up to there are applied; resume the job to process the rest."
    else:
        remove_partial_work(job)
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
    end_job(job, Job.INTERRUPTED, error=reason)
    fail_running_task(job.task_id, JobInterrupted, reason)
