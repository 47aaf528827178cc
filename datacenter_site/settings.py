"""Settings for the Datacenter site.

Everything that differs between machines is read from the environment; the defaults give a
working development site on SQLite with all state kept in ``var/``.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("DATACENTER_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def mailer_from_env() -> dict:
    """The mailer of the environment: EMAIL_URL, else EMAIL_HOST and its companions, else
    the console (mail is printed, never sent by accident).

    EMAIL_URL is ``smtp://USER:PASSWORD@HOST:PORT`` (plain, or STARTTLS with ``?tls=true``),
    ``smtp+tls://`` (STARTTLS, port 587), ``smtps://`` (TLS from the start, port 465) or
    ``console://``.
    """
    console = {"BACKEND": "django.core.mail.backends.console.EmailBackend"}
    url, host = os.environ.get("EMAIL_URL", ""), os.environ.get("EMAIL_HOST", "")
    timeout = env_int("EMAIL_TIMEOUT", 10)
    if url:
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if parts.scheme == "console":
            return console
        if parts.scheme not in {"smtp", "smtp+tls", "smtps"}:
            raise ValueError(f"EMAIL_URL: unknown scheme {parts.scheme!r}")
        use_ssl = parts.scheme == "smtps" or query.get("ssl", "").lower() in {"1", "true"}
        use_tls = parts.scheme == "smtp+tls" or query.get("tls", "").lower() in {"1", "true"}
        default_port = 465 if use_ssl else 587 if use_tls else 25
        options = {
            "host": parts.hostname or "localhost",
            "port": parts.port or default_port,
            "username": unquote(parts.username or ""),
            "password": unquote(parts.password or ""),
            "use_ssl": use_ssl,
            "use_tls": use_tls,
        }
    elif host:
        options = {
            "host": host,
            "port": env_int("EMAIL_PORT", 25),
            "username": os.environ.get("EMAIL_HOST_USER", ""),
            "password": os.environ.get("EMAIL_HOST_PASSWORD", ""),
            "use_ssl": env_bool("EMAIL_USE_SSL", False),
            "use_tls": env_bool("EMAIL_USE_TLS", False),
        }
    else:
        return console
    return {
        "BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "OPTIONS": options | {"timeout": timeout},
    }


def secret_key() -> str:
    # A key generated once per installation keeps sessions valid across restarts without
    # shipping a known key; production sets DJANGO_SECRET_KEY instead.
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

# Behind TLS (a proxy that terminates it and sets X-Forwarded-Proto): cookies only over
# https, HSTS, and plain http redirected, except the health check of load balancers.
if env_bool("DJANGO_HTTPS", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", True)
    # The address of the client, for throttling logins, is the one the proxy saw.
    AXES_IPWARE_PROXY_COUNT = 1
    AXES_IPWARE_META_PRECEDENCE_ORDER = ["HTTP_X_FORWARDED_FOR", "REMOTE_ADDR"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "crispy_forms",
    "crispy_bootstrap5",
    "django_tasks_db",
    "axes",
    "datacenter",
    "imports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "datacenter.busy.BusyDatabaseMiddleware",
    # Last, as django-axes asks: it answers a locked-out login with its own page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "datacenter_site.urls"
WSGI_APPLICATION = "datacenter_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "datacenter.reach.pending_files",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}", conn_max_age=600
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Several processes (web, task worker, cron) share the embedded database: WAL lets them
    # read while one writes, and a write waits for the lock instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Repeated failed logins are throttled by django-axes: after DATACENTER_LOGIN_FAILURES wrong
# passwords for one account from one address, that pair may not log in for
# DATACENTER_LOGIN_COOLOFF_MINUTES (the right password included); a success forgets the
# failures. "manage.py axes_reset" lifts every lock at once.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("DATACENTER_LOGIN_FAILURES", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("DATACENTER_LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("DJANGO_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
FORMAT_MODULE_PATH = ["datacenter_site.formats"]

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Bootstrap comes from the npm registry at set-up (package-lock.json) and is served by the
# site itself, so the pages work on a closed network.
STATICFILES_DIRS = [("bootstrap", BASE_DIR / "node_modules" / "bootstrap" / "dist")]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

CRISPY_ALLOWED_TEMPLATE_PACKS = "bootstrap5"
CRISPY_TEMPLATE_PACK = "bootstrap5"

# Uploads always stream to a temporary file, never into memory, whatever their size.
FILE_UPLOAD_HANDLERS = ["django.core.files.uploadhandler.TemporaryFileUploadHandler"]

# The data center: the storage path used until staff relocate it (the current path lives in
# the database), and the largest CSV file accepted by an upload.
DATACENTER_STORAGE_ROOT = os.environ.get("DATACENTER_STORAGE_ROOT", str(VAR_DIR / "storage"))
# Staff may relocate the storage only to a folder strictly below one of these absolute paths
# (separated by ":"); empty: the folder that holds DATACENTER_STORAGE_ROOT.
DATACENTER_STORAGE_PARENTS = [
    path for path in os.environ.get("DATACENTER_STORAGE_PARENTS", "").split(":") if path
]
if any(not os.path.isabs(path) for path in DATACENTER_STORAGE_PARENTS):
    raise ValueError("DATACENTER_STORAGE_PARENTS: every path must be absolute.")
DATACENTER_MAX_UPLOAD_SIZE = env_int("DATACENTER_MAX_UPLOAD_SIZE", 100 * 1024 * 1024)
DATACENTER_PAGE_SIZE = env_int("DATACENTER_PAGE_SIZE", 25)
# Processing a file larger than this many bytes, and relocating with files, runs as a job
# of the task worker; smaller work runs at once. A job that gave no sign of life for
# DATACENTER_JOB_LEASE seconds is taken for dead (on its own host that is known at once).
DATACENTER_RUN_AT_ONCE_SIZE = env_int("DATACENTER_RUN_AT_ONCE_SIZE", 256 * 1024)
DATACENTER_JOB_LEASE = env_int("DATACENTER_JOB_LEASE", 600)
# Batch processors offered for pending files (dotted paths of Processor classes).
DATACENTER_PROCESSORS = ["datacenter.processing.UserProcessor"]

# Background work goes to a database-backed task queue. Each kind of work has a queue of its
# own (datacenter.health.QUEUES), served by its own "manage.py task_worker --queue-name
# NAME", so that a CDS run never waits behind a long job.
TASKS = {
    "default": {
        "BACKEND": "django_tasks_db.DatabaseBackend",
        "QUEUES": ["datacenter", "imports"],
    }
}
# A CDS run's claim on its source expires after this many seconds without progress.
CDS_CLAIM_LEASE = env_int("CDS_CLAIM_LEASE", 600)
# "manage.py task_worker" records that it is alive this often; /healthz calls a worker
# stale when none did for DATACENTER_WORKER_STALE seconds.
WORKER_HEARTBEAT_SECONDS = 5
DATACENTER_WORKER_STALE = env_int("DATACENTER_WORKER_STALE", 20)

# E-mail: the console by default (see mailer_from_env). Links in mails point to
# DATACENTER_SITE_URL, since cron has no request to take the address from.
MAILERS = {"default": mailer_from_env()}
DEFAULT_FROM_EMAIL = SERVER_EMAIL = os.environ.get(
    "DEFAULT_FROM_EMAIL", "Datacenter <datacenter@localhost>"
)
DATACENTER_SITE_URL = os.environ.get("DATACENTER_SITE_URL", "http://localhost:8000").rstrip("/")
# The group whose members hear of every upload and, unless a source names its own
# addresses, of the alerts of CDS sources.
DATACENTER_MANAGERS_GROUP = os.environ.get("DATACENTER_MANAGERS_GROUP", "Import managers")
# Exports of records: kept this many days in the storage's exports/ folder; an export of at
# most DATACENTER_EXPORT_AT_ONCE_ROWS records runs at once, a larger one as a job.
DATACENTER_EXPORT_DAYS = env_int("DATACENTER_EXPORT_DAYS", 7)
DATACENTER_EXPORT_AT_ONCE_ROWS = env_int("DATACENTER_EXPORT_AT_ONCE_ROWS", 5000)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        "imports.cds": {"level": "INFO"},
        # The run's own log says what matters; asyncssh's INFO lines are noise in cron mail.
        "asyncssh": {"level": "WARNING"},
        # django-axes tells of every login at INFO; its warnings (lock-outs) are kept.
        "axes": {"level": "WARNING"},
    },
}
