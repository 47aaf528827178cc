from django.tasks import task

from .models import ImportRun
from .runs import run_import


class RunFailed(Exception):
    """A run that ended failed: its task ends failed too, so that the task's record says
    what the run's does."""


@task
def run_import_task(run_id: int) -> str:
    """Carry out a queued run, an import or an export."""
    run = ImportRun.objects.select_related("source", "user").get(pk=run_id)
    run = run_import(run.source, trigger=run.trigger, user=run.user, run=run)
    if run.status in (ImportRun.FAILED, ImportRun.INTERRUPTED):
        raise RunFailed(f"Run {run}: {run.error}")
    return run.status
