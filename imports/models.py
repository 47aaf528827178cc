import os

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

from . import validation
from .spool import FileStore
from .transports import ConnectionSettings

OUTGOING_FOLDER = "out"


class CdsSourceQuerySet(models.QuerySet):
    def exporting(self):
        """The sources that deliver files to their partner: those with an export directory
        (the one rule, also of CdsSource.exports)."""
        return self.exclude(export_dir="")


class CdsSource(models.Model):
    """A partner's CDS directory on an FTP server, and the spool its files go to."""

    PROTOCOLS = [("ftp", "FTP"), ("ftps", "FTPS (explicit TLS)"), ("sftp", "SFTP (SSH)")]

    name = models.SlugField(max_length=100, unique=True, help_text="Used on the command line.")
    protocol = models.CharField(max_length=10, choices=PROTOCOLS, default="ftp")
    host = models.CharField(
        max_length=255,
        validators=[validation.validate_host],
        help_text="Host name or IP address of the partner's server.",
    )
    port = models.PositiveIntegerField(
        default=21,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
        help_text="21 for FTP and FTPS, 22 for SFTP, unless the partner says otherwise.",
    )
    user = models.CharField(max_length=255)
    password = models.CharField(max_length=255, blank=True)
    remote_dir = models.CharField(
        "remote directory",
        max_length=1024,
        default="/",
        validators=[validation.validate_remote_dir],
        help_text="Absolute path of the exchange directory on the server, such as /outbox.",
    )
    export_dir = models.CharField(
        "export directory",
        max_length=1024,
        blank=True,
        validators=[validation.validate_remote_dir],
        help_text="Absolute path of the directory on the server that our files are delivered "
        "to (from the outgoing spool, out/ in the spool folder). Empty: no export.",
    )
    spool_dir = models.CharField(
        "spool folder",
        max_length=4096,
        unique=True,
        validators=[validation.validate_spool_dir],
        help_text="Absolute local path; tmp/, new/ and cur/ are created in it.",
    )
    ca_file = models.CharField(
        "CA certificate file",
        max_length=4096,
        blank=True,
        validators=[validation.validate_ca_file],
        help_text="FTPS only: a PEM file of the certificate(s) the server's certificate must "
        "chain to, for partners with their own CA or a self-signed certificate. Empty: the "
        "system's trusted CAs.",
    )
    host_key = models.CharField(
        "SSH host key",
        max_length=1000,
        blank=True,
        validators=[validation.validate_host_key],
        help_text="SFTP only: the server's public key as a known_hosts line (ssh-ed25519 "
        "AAAA…) or its fingerprint (SHA256:…). A run fails before logging in when the server "
        "shows another key. Empty: the first run fails and shows the key it was offered, "
        "which you can then trust here.",
    )
    key_file = models.CharField(
        "private key file",
        max_length=4096,
        blank=True,
        validators=[validation.validate_key_file],
        help_text="SFTP only: absolute path of a private key (OpenSSH or PEM format) to log "
        "in with, instead of or with the password.",
    )
    passphrase = models.CharField(max_length=255, blank=True)
    # The host key an SFTP server offered that was not the pinned one, for staff to trust.
    offered_host_key = models.CharField(max_length=1000, blank=True, editable=False)
    enabled = models.BooleanField(
        default=True, help_text="Taken by cds_import --all and cds_export --all."
    )
    timeout = models.PositiveIntegerField(
        default=30,
        validators=[MinValueValidator(1)],
        help_text="Seconds any network operation may take.",
    )
    passive = models.BooleanField("passive mode", default=True)
    parallel = models.PositiveSmallIntegerField(
        "parallel transfers",
        default=4,
        validators=[MinValueValidator(1), MaxValueValidator(16)],
        help_text="Connections that fetch files at once under the one lock. 1 for servers "
        "that allow a single login at a time.",
    )
    stable_after = models.PositiveIntegerField(
        "stability check",
        null=True,
        blank=True,
        help_text="For partners that do not hold a 'write' lock while uploading: take a file "
        "only when its size stays the same between two listings and it is at least this many "
        "seconds old. Empty: off.",
    )
    alert_after_failures = models.PositiveSmallIntegerField(
        "alert after failed runs",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Send an alert when this many runs in a row failed. Empty: never.",
    )
    alert_after_hours = models.PositiveIntegerField(
        "alert after hours without success",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Send an alert when no run succeeded for this many hours (runs that found "
        "nothing to do count as successful). Empty: never.",
    )
    alert_emails = models.CharField(
        "alert addresses",
        max_length=1000,
        blank=True,
        validators=[validation.validate_email_list],
        help_text="Comma-separated e-mail addresses for the alerts of this source. Empty: the "
        "members of the import managers group.",
    )
    created = models.DateTimeField(default=timezone.now, editable=False)
    # The state of the alert: bad since when and why, and whether people were told.
    alert_since = models.DateTimeField(null=True, blank=True, editable=False)
    alert_reason = models.TextField(blank=True, editable=False)
    alerted = models.BooleanField(default=False, editable=False)
    # The claim of the run in progress, so that one source runs once at a time on any host.
    claimed_by = models.ForeignKey(
        "ImportRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_until = models.DateTimeField(null=True, blank=True)
    export_claimed_by = models.ForeignKey(
        "ImportRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    export_claimed_until = models.DateTimeField(null=True, blank=True)

    objects = CdsSourceQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        permissions = [
            ("run_import", "Can run CDS imports"),
            ("manage_spool", "Can mark spooled files as processed"),
        ]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        # Sources made by scripts and the shell are held to the rules of the admin form.
        self.full_clean(
            exclude=["claimed_by", "claimed_until", "export_claimed_by", "export_claimed_until"],
            validate_unique=False,
        )
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("imports:spool", kwargs={"name": self.name})

    def clean(self):
        errors = {}
        if self.ca_file and self.protocol != "ftps":
            errors["ca_file"] = "A CA file is used with FTPS only."
        for name in ("host_key", "key_file", "passphrase"):
            if getattr(self, name) and self.protocol != "sftp":
                label = self._meta.get_field(name).verbose_name
                errors[name] = f"The {label} is used with SFTP only."
        if self.key_file and "key_file" not in errors:
            problem = validation.key_file_problem(self.key_file, self.passphrase)
            if problem:
                errors["key_file"] = problem
        if self.export_dir and self.export_dir.rstrip("/") == self.remote_dir.rstrip("/"):
            errors["export_dir"] = (
                "The export directory must differ from the remote directory, or the import "
                "would take back the files we deliver."
            )
        if errors:
            raise ValidationError(errors)

    @property
    def store(self) -> FileStore:
        return FileStore(self.spool_dir)

    @property
    def outgoing_store(self) -> FileStore:
        """The spool of files to deliver to the partner: out/ in the spool folder."""
        return FileStore(os.path.join(self.spool_dir, OUTGOING_FOLDER))

    @property
    def exports(self) -> bool:
        """Whether this source delivers files to its partner: CdsSourceQuerySet.exporting's
        rule, for one source at hand."""
        return self.export_dir != ""

    def connection(self) -> ConnectionSettings:
        return ConnectionSettings(
            self.host,
            self.port,
            self.user,
            self.password,
            protocol=self.protocol,
            ca_file=self.ca_file or None,
            host_key=self.host_key,
            key_file=self.key_file,
            passphrase=self.passphrase,
            timeout=self.timeout,
            passive=self.passive,
        )

    def last_run(self, direction: str = "import"):
        runs = self.runs.filter(direction=direction).exclude(status=ImportRun.QUEUED)
        return runs.order_by("-pk").first()


class ImportRun(models.Model):
    QUEUED, RUNNING = "queued", "running"
    SUCCESS, NOTHING, LOCKED, BUSY, FAILED = "success", "nothing", "locked", "busy", "failed"
    INTERRUPTED = "interrupted"
    STATUSES = [
        (QUEUED, "queued"),
        (RUNNING, "running"),
        (SUCCESS, "success"),
        (NOTHING, "nothing to do"),
        (LOCKED, "locked out"),
        (BUSY, "busy"),
        (FAILED, "failed"),
        (INTERRUPTED, "interrupted"),
    ]
    TRIGGERS = [("cron", "cron"), ("admin", "admin"), ("page", "page")]
    IMPORT, EXPORT = "import", "export"
    DIRECTIONS = [(IMPORT, "import"), (EXPORT, "export")]

    source = models.ForeignKey(CdsSource, on_delete=models.CASCADE, related_name="runs")
    direction = models.CharField(max_length=6, choices=DIRECTIONS, default=IMPORT)
    trigger = models.CharField(max_length=10, choices=TRIGGERS)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    queued = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True, db_index=True)
    status = models.CharField(max_length=12, choices=STATUSES, default=QUEUED, db_index=True)
    # The process carrying out the run, so that its death is noticed (processes.py).
    host = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    task_id = models.CharField("task", max_length=64, blank=True)
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
