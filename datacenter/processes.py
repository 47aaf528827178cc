"""Which process holds something, whether it is still alive, and ending its task when not.

Claims and lock records name the host and process that made them, so that the next run on
the same host can tell at once that their owner died (SIGKILL, OOM, reboot) instead of waiting
out a lease. A process on another host cannot be asked; there the lease decides.
"""

import os
import socket

HOST = socket.gethostname()


def is_alive(pid: int | str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def died_on_this_host(host: str | None, pid: int | str | None) -> bool:
    """Whether `pid` of `host` is known to be gone: only this host can tell."""
    return host == HOST and not is_alive(pid)


def fail_running_task(task_id: str, exception: type[Exception], reason: str) -> None:
    """Mark the task `task_id` of a process that died failed with `exception`, so that the
    task list does not show it running for ever (nothing when there is no such task)."""
    if not task_id:
        return
    from django.tasks import TaskResultStatus
    from django.utils import timezone
    from django_tasks_db.models import DBTaskResult

    name = f"{exception.__module__}.{exception.__name__}"
    DBTaskResult.objects.filter(id=task_id, status=TaskResultStatus.RUNNING).update(
        status=TaskResultStatus.FAILED,
        finished_at=timezone.now(),
        exception_class_path=name,
        traceback=f"{name}: {reason}\n",
    )
