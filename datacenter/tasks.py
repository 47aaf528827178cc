from django.tasks import task

from .jobs import run_job
from .models import Job

#: The queue of the data center's jobs, served by ``task_worker --queue-name datacenter``.
JOBS_QUEUE = "datacenter"


@task(queue_name=JOBS_QUEUE)
def run_job_task(job_id: int) -> str:
    """Carry out a queued job of the data center."""
    return run_job(Job.objects.select_related("user").get(pk=job_id)).status
