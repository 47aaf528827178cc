from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import models
from django.urls import reverse

from .storage import RELOCATING, DataCenter, StorageError


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
    #: The job moving the storage right now: one at a time.
    relocating = models.ForeignKey(
        "Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        # Shown in the admin as "Data center | files and storage | Can …".
        verbose_name = verbose_name_plural = "files and storage"
        default_permissions = ()
        permissions = [
            ("view_files", "Can view and download files, jobs and logs"),
            ("upload_files", "Can upload files and fix pending files"),
            ("delete_files", "Can delete pending files"),
            ("process_files", "Can process pending files"),
            ("relocate_storage", "Can relocate the storage"),
            ("export_records", "Can export records and download own exports"),
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


@contextmanager
def storage_for_writing() -> Iterator[DataCenter]:
    """The current data center, held against relocation while the block writes into it:
    refused in words (StorageError) while a relocation is under way, so that no file lands
    at a place that the site is leaving."""
    datacenter = current_datacenter()
    with datacenter.held():
        location = StorageLocation.objects.filter(pk=1).select_related("relocating").first()
        if location is not None and (
            location.path != datacenter.storage
            or (location.relocating is not None and location.relocating.in_progress)
        ):
            raise StorageError(RELOCATING)
        yield datacenter


class WorkerHeartbeat(models.Model):
    """When a task worker (``manage.py task_worker``) last said that it is alive."""

    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    seen = models.DateTimeField()
    #: The task queues it serves, comma-separated, or "*" for all.
    queues = models.CharField(max_length=255, default="*")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "pid"], name="one_row_per_worker")]

    def __str__(self):
        return f"{self.host}:{self.pid}"


class Job(models.Model):
    """Long work of the data center (processing a file, its dry run, relocating the
    storage, exporting records), carried out by the task worker or at once, and followed on
    its page."""

    PROCESS, RELOCATE, EXPORT = "process", "relocate", "export"
    KINDS = [
        (PROCESS, "process a file"),
        (RELOCATE, "relocate the storage"),
        (EXPORT, "export records"),
    ]
    QUEUED, RUNNING, COMMITTED = "queued", "running", "committed"
    SUCCESS, FAILED, INTERRUPTED = "success", "failed", "interrupted"
    STATUSES = [
        (QUEUED, "queued"),
        (RUNNING, "running"),
        (COMMITTED, "distributing the results"),
        (SUCCESS, "success"),
        (FAILED, "failed"),
        (INTERRUPTED, "interrupted"),
    ]
    IN_PROGRESS = (QUEUED, RUNNING, COMMITTED)

    kind = models.CharField(max_length=10, choices=KINDS)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    #: The file processed, or the export written.
    file_name = models.CharField(max_length=255, blank=True)
    processor = models.CharField(max_length=100, blank=True)
    mode = models.CharField(max_length=10, blank=True)
    dry_run = models.BooleanField(default=False)
    path = models.CharField("new storage path", max_length=4096, blank=True)
    move = models.BooleanField(default=False)
    overwrite = models.BooleanField(default=False)
    #: Of a dry run: the SHA-256 of the file it checked. Of processing after a dry run: the
    #: SHA-256 the file must still have.
    sha256 = models.CharField(max_length=64, blank=True)
    #: Of an export: its format (see datacenter.exports.FORMATS).
    export_format = models.CharField(max_length=10, blank=True, default="csv")

    status = models.CharField(max_length=12, choices=STATUSES, default=QUEUED, db_index=True)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(null=True, blank=True)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    #: What the job found: errors, output names, what could not be moved, the plan of a
    #: distribution still to carry out.
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    host = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    task_id = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    #: The last sign of life of the process carrying out the job.
    updated = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-pk"]

    def __str__(self):
        return f"Job #{self.pk}"

    def get_absolute_url(self):
        return reverse("datacenter:job", kwargs={"pk": self.pk})

    @property
    def in_progress(self) -> bool:
        return self.status in self.IN_PROGRESS

    @property
    def resumable(self) -> bool:
        """Whether this processing stopped half-way, with rows applied, and can go on."""
        return (
            self.status == self.INTERRUPTED
            and self.kind == self.PROCESS
            and not self.dry_run
            and "position" in (self.result or {})
        )

    @property
    def title(self) -> str:
        if self.kind == self.EXPORT:
            return f"Export the records of {self.processor}"
        if self.kind == self.RELOCATE:
            files = " with its files" if self.move else ""
            return f"Relocate the storage to {self.path}{files}"
        action = "Dry run of" if self.dry_run else "Process"
        return f"{action} {self.file_name} ({self.mode}, {self.processor})"
