from django.tasks import task

from .models import ImportRun
from .runs import run_import

#: The queue of CDS runs, served by ``task_worker --queue-name imports``: a run never waits
#: behind a data center job.
RUNS_QUEUE = "imports"


class RunFailed(Exception):
    """A run that ended failed: its task ends failed too, so that the task's record says
    what the run's does."""


@task(queue_name=RUNS_QUEUE)
def run_import_task(run_id: int) -> str:
    """Carry out a queued run, an import or an export."""
    run = ImportRun.objects.select_related("source", "user").get(pk=run_id)
    run = run_import(run.source, trigger=run.trigger, user=run.user, run=run)
    if run.status in (ImportRun.FAILED, ImportRun.INTERRUPTED):
        raise RunFailed(f"Run {run}: {run.error}")
    return run.status
