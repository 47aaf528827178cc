from django.conf import settings
from django.db import models
from django.urls import reverse

from .spool import FileStore


class CdsSource(models.Model):
    """A partner's CDS directory on an FTP server, and the spool its files go to."""

    ENCODINGS = [("utf-8", "UTF-8"), ("latin-1", "Latin-1 (old servers)")]

    name = models.SlugField(max_length=100, unique=True, help_text="Used on the command line.")
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(default=21)
    user = models.CharField(max_length=255)
    password = models.CharField(max_length=255, blank=True)
    remote_dir = models.CharField("remote directory", max_length=1024, default="/")
    spool_dir = models.CharField(
        "spool folder",
        max_length=4096,
        help_text="Absolute local path; tmp/, new/ and cur/ are created in it.",
    )
    enabled = models.BooleanField(default=True, help_text="Taken by cds_import --all.")
    timeout = models.PositiveIntegerField(
        default=30, help_text="Seconds any network operation may take."
    )
    passive = models.BooleanField("passive mode", default=True)
    encoding = models.CharField(
        "file name encoding", max_length=20, choices=ENCODINGS, default="utf-8"
    )
    stable_after = models.PositiveIntegerField(
        "stability check",
        null=True,
        blank=True,
        help_text="For partners that do not hold a 'write' lock while uploading: take a file "
        "only when its size stays the same between two listings and it is at least this many "
        "seconds old. Empty: off.",
    )
    # The claim of the run in progress, so that one source runs once at a time on any host.
    claimed_by = models.ForeignKey(
        "ImportRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            ("run_import", "Can run CDS imports"),
            ("manage_spool", "Can mark spooled files as processed"),
        ]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("imports:spool", kwargs={"name": self.name})

    @property
    def store(self) -> FileStore:
        return FileStore(self.spool_dir)

    def last_run(self):
        return self.runs.exclude(status=ImportRun.QUEUED).order_by("-pk").first()


class ImportRun(models.Model):
    QUEUED, RUNNING = "queued", "running"
    SUCCESS, NOTHING, LOCKED, BUSY, FAILED = "success", "nothing", "locked", "busy", "failed"
    STATUSES = [
        (QUEUED, "queued"),
        (RUNNING, "running"),
        (SUCCESS, "success"),
        (NOTHING, "nothing to do"),
        (LOCKED, "locked out"),
        (BUSY, "busy"),
        (FAILED, "failed"),
    ]
    TRIGGERS = [("cron", "cron"), ("admin", "admin"), ("page", "page")]

    source = models.ForeignKey(CdsSource, on_delete=models.CASCADE, related_name="runs")
    trigger = models.CharField(max_length=10, choices=TRIGGERS)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    queued = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True, db_index=True)
    status = models.CharField(max_length=10, choices=STATUSES, default=QUEUED, db_index=True)
    files = models.PositiveIntegerField(default=0)
    bytes = models.PositiveBigIntegerField(default=0)
    files_done = models.PositiveIntegerField(default=0)
    files_listed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-pk"]

    def __str__(self):
        return f"{self.source} #{self.pk}"

    def get_absolute_url(self):
        return reverse("imports:run", kwargs={"pk": self.pk})

    @property
    def in_progress(self) -> bool:
        return self.status in {self.QUEUED, self.RUNNING}

    @property
    def percent(self) -> int:
        if not self.files_listed:
            return 0 if self.in_progress else 100
        return round(100 * self.files_done / self.files_listed)


class ImportLogEntry(models.Model):
    run = models.ForeignKey(ImportRun, on_delete=models.CASCADE, related_name="log_entries")
    time = models.DateTimeField()
    level = models.CharField(max_length=10)
    message = models.TextField()
    traceback = models.TextField(blank=True)

    class Meta:
        ordering = ["pk"]
        verbose_name_plural = "import log entries"

    def __str__(self):
        return self.message


class ImportedFile(models.Model):
    """What became of one file of a run: the audit trail of the run page."""

    OUTCOMES = [("delivered", "delivered"), ("failed", "failed"), ("skipped", "skipped")]

    run = models.ForeignKey(ImportRun, on_delete=models.CASCADE, related_name="file_records")
    name = models.CharField(max_length=1024)
    size = models.PositiveBigIntegerField(null=True, blank=True)
    sha256 = models.CharField("SHA-256", max_length=64, blank=True)
    local_name = models.CharField(max_length=1024, blank=True)
    outcome = models.CharField(max_length=10, choices=OUTCOMES)
    reason = models.TextField(blank=True)

    class Meta:
        ordering = ["pk"]

    def __str__(self):
        return f"{self.name}: {self.outcome}"
