from django.tasks import task

from .jobs import run_job
from .models import Job


@task
def run_job_task(job_id: int) -> str:
    """Carry out a queued job of the data center."""
    return run_job(Job.objects.select_related("user").get(pk=job_id)).status
