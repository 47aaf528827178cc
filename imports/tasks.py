from django.tasks import task

from .models import ImportRun
from .runs import run_import


@task
def run_import_task(run_id: int) -> str:
    """Carry out a queued run, an import or an export."""
    run = ImportRun.objects.select_related("source", "user").get(pk=run_id)
    return run_import(run.source, trigger=run.trigger, user=run.user, run=run).status
