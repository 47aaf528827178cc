from django.conf import settings
from django.db import models, transaction

from .storage import DataCenter


class StorageLocation(models.Model):
    """The current storage path: one row, so that every process agrees on it.

    Its permissions are the data center's: who may view, upload, delete, process and
    relocate.
    """

    path = models.CharField(max_length=4096)
    changed = models.DateTimeField(auto_now=True)
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        default_permissions = ()
        permissions = [
            ("view_files", "Can view and download data center files and logs"),
            ("upload_files", "Can upload CSV files to the data center"),
            ("delete_files", "Can delete pending data center files"),
            ("process_files", "Can process pending data center files"),
            ("relocate_storage", "Can relocate the data center storage"),
        ]

    def __str__(self):
        return self.path


class Upload(models.Model):
    """Who uploaded a file that is (or was) pending in the storage root."""

    name = models.CharField(max_length=255, unique=True)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    uploaded = models.DateTimeField(auto_now=True)

    def __str__(self):
        return self.name


def current_datacenter() -> DataCenter:
    """The data center at the path stored in the database (the setting until relocated)."""
    location = StorageLocation.objects.filter(pk=1).first()
    return DataCenter(location.path if location else settings.DATACENTER_STORAGE_ROOT)


def relocate_storage(*, path: str, move: bool, overwrite: bool, user) -> dict[str, str]:
    """Relocate the current data center to `path` and store the new path.

    Returns what could not be moved (name: reason); raises StorageError for a refused path.
    The row is locked for the whole move, so two relocations cannot run at once.
    """
    with transaction.atomic():
        location, _ = StorageLocation.objects.select_for_update().get_or_create(
            pk=1, defaults={"path": settings.DATACENTER_STORAGE_ROOT}
        )
        datacenter = DataCenter(location.path)
        old_path = datacenter.storage
        not_moved = datacenter.relocate(path, move=move, overwrite=overwrite)
        location.path = datacenter.storage
        location.changed_by = user
        location.save()
    datacenter.log_action(
        user,
        "relocate",
        f"{old_path} -> {datacenter.storage}, move={move}, overwrite={overwrite}, "
        f"not moved: {', '.join(sorted(not_moved)) or 'none'}",
    )
    return not_moved


class WorkerHeartbeat(models.Model):
    """When a task worker (``manage.py task_worker``) last said that it is alive."""

    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    seen = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "pid"], name="one_row_per_worker")]

    def __str__(self):
        return f"{self.host}:{self.pid}"
